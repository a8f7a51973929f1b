//! A job's report: image grids with a labelled row per prompt, per-stage throughput from corpus
//! timestamps, the plots of [`crate::plots`], and `report/index.html`.

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

/// Tiles of a report grid are at most this many pixels a side (larger images are scaled down, so
/// a report of 1024-px proxies stays light) and small ones are scaled up by whole factors to about
/// 96 pixels, so they are visible on a page.
const MAX_TILE: u32 = 256;

pub(crate) fn save_grid(images: &[image::RgbImage], cols: usize, path: &Path) -> anyhow::Result<bool> {
    let Some(first) = images.first() else { return Ok(false) };
    let scaled_down: Vec<image::RgbImage>;
    let tiles = if first.width() > MAX_TILE {
        scaled_down = images
            .iter()
            .map(|img| {
                let h = (img.height() as u64 * MAX_TILE as u64 / img.width().max(1) as u64).max(1) as u32;
                image::imageops::resize(img, MAX_TILE, h, image::imageops::FilterType::Triangle)
            })
            .collect();
        &scaled_down[..]
    } else {
        images
    };
    let mut g = grid(tiles, cols).expect("at least one image");
    let scale = (96 / tiles[0].width().max(1)).max(1);
    if scale > 1 {
        g = image::imageops::resize(
            &g,
            g.width() * scale,
            g.height() * scale,
            image::imageops::FilterType::Nearest,
        );
    }
    g.save(path).with_context(|| path.display().to_string())?;
    Ok(true)
}

/// `items` grouped by `key`, groups in the order their first item came.
pub(crate) fn group_in_order<T, K: PartialEq>(
    items: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> K,
) -> Vec<(K, Vec<T>)> {
    let mut groups: Vec<(K, Vec<T>)> = Vec::new();
    for item in items {
        let k = key(&item);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, members)) => members.push(item),
            None => groups.push((k, vec![item])),
        }
    }
    groups
}

/// A row of a report table: its label and one image strip per column (`None` where the column
/// has no images for it), as paths relative to the report folder.
pub(crate) struct LabelledRow {
    pub label: String,
    pub strips: Vec<Option<String>>,
}

/// Saves each group's images as one strip, `rows/{prefix}_{row:03}_{column}.png`, for a table with
/// one labelled row per group.
pub(crate) fn save_rows(
    rows: &[(String, Vec<Vec<image::RgbImage>>)],
    report_dir: &Path,
    prefix: &str,
) -> anyhow::Result<Vec<LabelledRow>> {
    let dir = report_dir.join("rows");
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let mut out = Vec::new();
    for (r, (label, columns)) in rows.iter().enumerate() {
        let mut strips = Vec::new();
        for (c, images) in columns.iter().enumerate() {
            let file = format!("rows/{prefix}_{r:03}_{c}.png");
            strips.push(save_grid(images, images.len().max(1), &report_dir.join(&file))?.then_some(file));
        }
        out.push(LabelledRow { label: label.clone(), strips });
    }
    Ok(out)
}

/// A table of labelled image rows under `columns`' headings (no header row when `columns` is empty).
fn rows_table(first_heading: &str, columns: &[String], rows: &[LabelledRow]) -> String {
    let mut html = String::from("<table class=\"rows\">\n");
    if !columns.is_empty() {
        html.push_str(&format!("<tr><th>{}</th>", escape(first_heading)));
        for c in columns {
            html.push_str(&format!("<th>{}</th>", escape(c)));
        }
        html.push_str("</tr>\n");
    }
    for row in rows {
        html.push_str(&format!("<tr><td>{}</td>", escape(&row.label)));
        for strip in &row.strips {
            match strip {
                Some(file) => {
                    html.push_str(&format!("<td><img src=\"{file}\" alt=\"{}\"></td>", escape(&row.label)))
                }
                None => html.push_str("<td>–</td>"),
            }
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    html
}

/// The files of a report besides `report.json`, for its page.
#[derive(Default)]
pub(crate) struct ReportFiles {
    /// `timeline.svg` was written.
    pub timeline: bool,
    /// `losses.svg` was written.
    pub losses: bool,
    /// The first kept proxies, a row per prompt.
    pub kept: Vec<LabelledRow>,
    /// The first rejected proxies, a row per reason.
    pub rejected: Vec<LabelledRow>,
    /// The evaluation's samples, a row per prompt and a column per model.
    pub samples: Vec<LabelledRow>,
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
    files: &ReportFiles,
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
    // The editability split: each metric over the recontextualisation prompts and the edits.
    let kinds = [("recontextualisation", "recontextualisation"), ("property_edit", "property edits")];
    let mut split_rows = String::new();
    for (label, s) in scores {
        let cells: String = metric_names
            .iter()
            .flat_map(|m| kinds.iter().map(move |(k, _)| (*m, *k)))
            .map(|(m, k)| {
                format!("<td>{}</td>", fmt(s.by_prompt_kind.get(k).and_then(|v| v.get(m)).copied(), 3))
            })
            .collect();
        split_rows.push_str(&format!("<tr><td>{}</td>{cells}</tr>\n", escape(label)));
    }
    let split_header: String = metric_names
        .iter()
        .flat_map(|m| kinds.iter().map(move |(_, name)| format!("<th>{m}, {name}</th>")))
        .collect();
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
    let mut plots = String::new();
    if files.timeline {
        plots.push_str(&img(
            "timeline.svg",
            "proxies generated, kept by the Filter and committed to the corpus, and the student's steps, \
             against time; dashed: the first student step and the last proxy",
        ));
    }
    if files.losses {
        plots.push_str(&img("losses.svg", "each trainer's total loss at each step of this run"));
    }
    if !plots.is_empty() {
        plots.insert_str(0, "<h2>Timeline and losses</h2>\n");
    }
    let mut grids = img("references.png", "references");
    if !files.samples.is_empty() {
        let models: Vec<String> = scores.iter().map(|(label, _)| label.clone()).collect();
        grids.push_str("<h3>Samples by prompt (the same seeds for every model)</h3>\n");
        grids.push_str(&rows_table("prompt", &models, &files.samples));
    }
    if !files.kept.is_empty() {
        grids.push_str("<h3>Proxies kept by the Filter (the first 48), by prompt</h3>\n");
        grids.push_str(&rows_table("", &[], &files.kept));
    }
    if !files.rejected.is_empty() {
        grids.push_str("<h3>Proxies rejected (the first 48), by reason</h3>\n");
        grids.push_str(&rows_table("", &[], &files.rejected));
    }
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>proxytune: {subject}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}img{{image-rendering:pixelated;max-width:100%}}table.rows td{{vertical-align:middle}}table.rows td:first-child{{max-width:260px}}table.rows img{{display:block}}</style></head>
<body>
<h1>proxytune — {subject} (a {class}, identifier <code>{identifier}</code>)</h1>
<h2>Scores on the subject's prompts (same seeds for every model)</h2>
<table><tr><th>model</th>{header}<th>samples</th></tr>
{rows}</table>
<p>{note}</p>
<h3>Recontextualisation against property edits</h3>
<p>The same scores over the prompts that place the subject (contexts, accessories) and over those that edit it (<code>a red …</code>, <code>a cube shaped …</code>).</p>
<table><tr><th>model</th>{split_header}</tr>
{split_rows}</table>
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
{plots}
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
