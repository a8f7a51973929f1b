//! A job's report: image grids, per-stage throughput from corpus timestamps, and
//! `report/index.html`.

use std::path::Path;

use anyhow::Context;

use crate::world_models::ModelScores;

/// A grid of equally sized images, `cols` per row.
pub(crate) fn grid(images: &[image::RgbImage], cols: usize) -> Option<image::RgbImage> {
    let first = images.first()?;
    let (w, h) = first.dimensions();
    let rows = images.len().div_ceil(cols);
    let mut out = image::RgbImage::from_pixel(
        cols as u32 * (w + 2),
        rows as u32 * (h + 2),
        image::Rgb([255, 255, 255]),
    );
    for (i, img) in images.iter().enumerate() {
        let (x, y) = ((i % cols) as u32 * (w + 2), (i / cols) as u32 * (h + 2));
        image::imageops::overlay(&mut out, img, x as i64, y as i64);
    }
    Some(out)
}

pub(crate) fn save_grid(images: &[image::RgbImage], cols: usize, path: &Path) -> anyhow::Result<bool> {
    match grid(images, cols) {
        Some(g) => {
            // Small images scaled up (32-pixel ones 3×) so they are visible on a page.
            let scale = (96 / images[0].width().max(1)).max(1);
            let big = image::imageops::resize(
                &g,
                g.width() * scale,
                g.height() * scale,
                image::imageops::FilterType::Nearest,
            );
            big.save(path).with_context(|| path.display().to_string())?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// `images` as centred squares of one side (the smallest image's shorter side, at most `max_side`),
/// for a grid of photos of different sizes.
pub(crate) fn squares(images: &[image::RgbImage], max_side: u32) -> Vec<image::RgbImage> {
    let side = images.iter().map(|i| i.width().min(i.height())).min().unwrap_or(1).min(max_side).max(1);
    images
        .iter()
        .map(|img| {
            let s = img.width().min(img.height());
            let crop = image::imageops::crop_imm(img, (img.width() - s) / 2, (img.height() - s) / 2, s, s)
                .to_image();
            if s == side {
                crop
            } else {
                image::imageops::resize(&crop, side, side, image::imageops::FilterType::Triangle)
            }
        })
        .collect()
}

pub(crate) fn decode(png: &[u8]) -> Option<image::RgbImage> {
    image::load_from_memory(png).ok().map(|i| i.to_rgb8())
}

/// The metric label of a DreamBench metric name (`CLIP-I` → `clip_i`).
pub(crate) fn metric_label(name: &str) -> &'static str {
    match name {
        "DINO" => "dino",
        "CLIP-I" => "clip_i",
        "CLIP-T" => "clip_t",
        "FEAT-I" => "feat_i",
        _ => "other",
    }
}

/// Rows, first and last timestamps and rows per second of a stage's output.
pub(crate) fn throughput(times: impl Iterator<Item = i64>) -> serde_json::Value {
    let times: Vec<i64> = times.collect();
    let (first, last) = (times.iter().min().copied(), times.iter().max().copied());
    let span = match (first, last) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e6,
        _ => 0.0,
    };
    serde_json::json!({
        "rows": times.len(), "first_at_us": first, "last_at_us": last,
        "per_second": if span > 0.0 { times.len() as f64 / span } else { 0.0 },
    })
}

pub(crate) fn html(
    report: &serde_json::Value,
    scores: &[(String, ModelScores)],
    has_kept: bool,
    has_rejected: bool,
) -> String {
    // The metrics any model has, in the protocol's order; the world's exact checks when measured.
    let metric_names: Vec<&str> = ["DINO", "CLIP-I", "CLIP-T", "FEAT-I"]
        .into_iter()
        .filter(|m| scores.iter().any(|(_, s)| s.metrics.contains_key(*m)))
        .collect();
    let world_checks = scores.iter().any(|(_, s)| s.context_accuracy.is_some());
    let fmt = |v: Option<f64>, digits: usize| v.map(|v| format!("{v:.digits$}")).unwrap_or("–".into());
    let mut rows = String::new();
    for (label, s) in scores {
        let mut cells: String =
            metric_names.iter().map(|m| format!("<td>{}</td>", fmt(s.metrics.get(*m).copied(), 3))).collect();
        if world_checks {
            cells.push_str(&format!(
                "<td>{}</td><td>{}</td>",
                fmt(s.context_accuracy, 2),
                fmt(s.subject_colour_present, 2)
            ));
        }
        rows.push_str(&format!("<tr><td>{}</td>{cells}<td>{}</td></tr>\n", escape(label), s.samples));
    }
    let mut header: String = metric_names.iter().map(|m| format!("<th>{m}</th>")).collect();
    if world_checks {
        header.push_str("<th>context drawn as asked</th><th>subject colour present</th>");
    }
    let note = escape(report["evaluation"]["note"].as_str().unwrap_or_default());
    let stages = &report["stages"];
    let corpus = &report["corpus"];
    let img = |file: &str, caption: &str| {
        format!("<figure><img src=\"{file}\"><figcaption>{caption}</figcaption></figure>\n")
    };
    let mut grids = img("references.png", "references");
    if has_kept {
        grids.push_str(&img("proxies_kept.png", "proxies kept by the Filter (first 48)"));
    }
    if has_rejected {
        grids.push_str(&img("proxies_rejected.png", "proxies rejected (first 48)"));
    }
    for (i, (label, _)) in scores.iter().enumerate() {
        grids.push_str(&img(
            &format!("samples_{i}.png"),
            &format!(
                "{}: one row per prompt pair (prompts in order, images per prompt side by side)",
                escape(label)
            ),
        ));
    }
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>proxytune: {subject}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}img{{image-rendering:pixelated;max-width:100%}}</style></head>
<body>
<h1>proxytune — {subject} (a {class}, identifier <code>{identifier}</code>)</h1>
<h2>Scores on the subject's prompts (same seeds for every model)</h2>
<table><tr><th>model</th>{header}<th>samples</th></tr>
{rows}</table>
<p>{note}</p>
<h2>Pipeline</h2>
<table>
<tr><td>class priors</td><td>{priors} rows, {priors_ps:.2}/s</td></tr>
<tr><td>supervisor</td><td>{sup_steps} DreamBooth-LoRA steps, {sup_sps:.2} steps/s while priors streamed in</td></tr>
<tr><td>proxies</td><td>{proxies} generated, {kept} kept, {rejected} rejected {reasons}, {pps:.2}/s</td></tr>
<tr><td>filter</td><td>{filtered} judged, {filter_ps:.2}/s</td></tr>
<tr><td>VQ token rows</td><td>{vq}, {vq_ps:.2}/s</td></tr>
<tr><td>student</td><td>{steps} steps, {before} of them before the last proxy was generated, {sps:.2} steps/s</td></tr>
<tr><td>corpus</td><td>{path}: proxies version {pv}, {trained} rows trained on</td></tr>
<tr><td>time</td><td>pipeline {pipe:.0} s, evaluation {eval:.0} s, total {total:.0} s</td></tr>
</table>
<h2>Images</h2>
{grids}
</body></html>
"#,
        subject = escape(report["subject"].as_str().unwrap_or_default()),
        class = escape(report["class"].as_str().unwrap_or_default()),
        identifier = escape(report["identifier"].as_str().unwrap_or_default()),
        priors = stages["class_priors"]["rows"],
        priors_ps = stages["class_priors"]["per_second"].as_f64().unwrap_or(0.0),
        sup_steps = stages["supervisor"]["steps"],
        sup_sps = stages["supervisor"]["steps_per_second"].as_f64().unwrap_or(0.0),
        filtered = stages["filter"]["rows"],
        filter_ps = stages["filter"]["per_second"].as_f64().unwrap_or(0.0),
        vq_ps = stages["vq_tokens"]["per_second"].as_f64().unwrap_or(0.0),
        proxies = stages["proxies"]["rows"],
        kept = stages["proxies"]["kept"],
        rejected = stages["proxies"]["rejected"],
        reasons = stages["proxies"]["reject_reasons"],
        pps = stages["proxies"]["per_second"].as_f64().unwrap_or(0.0),
        vq = stages["vq_tokens"]["rows"],
        steps = stages["student"]["steps"],
        before = stages["student"]["steps_before_last_proxy"],
        sps = stages["student"]["steps_per_second"].as_f64().unwrap_or(0.0),
        path = escape(corpus["path"].as_str().unwrap_or_default()),
        pv = corpus["proxies_version"],
        trained = corpus["rows_trained_on"],
        pipe = report["pipeline_seconds"].as_f64().unwrap_or(0.0),
        eval = report["evaluation_seconds"].as_f64().unwrap_or(0.0),
        total = report["total_seconds"].as_f64().unwrap_or(0.0),
    )
}

/// Sets `proxytune_eval_score{model, metric}` for each of a model's scores.
pub(crate) fn record_scores(
    metrics: &proxytune_actors::runtime::Metrics,
    model: &str,
    scores: &crate::world_models::ModelScores,
) {
    let mut values: Vec<(&str, f64)> = scores.metrics.iter().map(|(k, v)| (metric_label(k), *v)).collect();
    if let Some(v) = scores.context_accuracy {
        values.push(("context_accuracy", v));
    }
    if let Some(v) = scores.subject_colour_present {
        values.push(("subject_colour_present", v));
    }
    for (metric, value) in values {
        metrics
            .gauge_labels(
                proxytune_schemas::MetricName::EvalScore,
                &[("model", model.into()), ("metric", metric.into())],
            )
            .set(value);
    }
}

/// `text` with HTML's special characters escaped.
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
