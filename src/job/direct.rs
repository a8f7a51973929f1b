//! The paper's direct baselines (`direct-lora`, `direct-lora-augmented`, `direct-full`): the student's LoRA
//! trained on the subject's reference photos alone, with no supervisor and no proxies, so the
//! report shows whether the proxies were worth generating. The references are tokenized by the
//! job's own VQ encoder and captioned with the instance prompt (`a sks dog`). The trainer, its
//! LoRA, steps, batch and sampling settings are the Proxy-Tuned student's, so the budgets match.
//! Its rows are `reference-<i>`, and `<dir>/run.json` records the keys it consumed. `direct-full`
//! trains every weight on the same rows with the same optimiser settings (the paper's end-to-end
//! direct tuning) and writes the whole model.
//!
//! The augmented baseline trains on 8 copies of each reference instead, each drawn from
//! `(reference, copy)`: flipped left to right with probability ½, rotated by an angle uniform in
//! ±5° (bilinear, the border extended), and cropped to a square of 90–100 % of the shorter side at
//! a uniform position — the horizontal flip, ±5° rotation and 0.9–1.0 random crop that the
//! paper's ablation (its Fig. 5) names. Its rows are `reference-<i>-augmented-<j>`.

use anyhow::Context as _;
use proxytune_actors::runtime::{
    Context, JobOutcome, Metrics, Output, Pipeline, PipelineConfig, Produced, Source,
};
use proxytune_actors::stages::ar_trainer::ArTrainerActor;
use proxytune_actors::stages::intake::images_to_square_batch;
use proxytune_actors::stages::tokenize::square;
use proxytune_schemas::{now_us, CaptionStates, Table, VqTokens};

use super::pipeline::{steer, JobCommand};
use super::plan::StagePlan;
use super::spec::Baseline;

/// The key of reference `i`'s token row, or of its augmented copy `j`.
pub(crate) fn reference_key(i: usize, copy: Option<usize>) -> String {
    match copy {
        None => format!("reference-{i}"),
        Some(j) => format!("reference-{i}-augmented-{j}"),
    }
}

/// The pixel of `img` at real coordinates `(x, y)`, bilinear, the border extended.
fn bilinear(img: &image::RgbImage, x: f32, y: f32) -> [f32; 3] {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let at = |xi: i64, yi: i64| img.get_pixel(xi.clamp(0, w - 1) as u32, yi.clamp(0, h - 1) as u32).0;
    let (x0, y0) = (x.floor() as i64, y.floor() as i64);
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let mut out = [0.0; 3];
    for (dx, dy, weight) in
        [(0, 0, (1.0 - fx) * (1.0 - fy)), (1, 0, fx * (1.0 - fy)), (0, 1, (1.0 - fx) * fy), (1, 1, fx * fy)]
    {
        let p = at(x0 + dx, y0 + dy);
        for c in 0..3 {
            out[c] += weight * p[c] as f32;
        }
    }
    out
}

/// Copy `copy` of reference `reference`: flipped with probability ½, rotated by up to ±5°, then a
/// square crop of 90–100 % of the shorter side at a uniform position.
pub(crate) fn augment(img: &image::RgbImage, seed: u64, reference: usize, copy: usize) -> image::RgbImage {
    use proxytune_models::rng::{Draws, Stream};
    let mut draws = Draws::new(seed, Stream::Augment, ((reference as u64) << 32) | copy as u64);
    let flip = draws.unit() < 0.5;
    let angle = ((draws.unit() * 2.0 - 1.0) * 5.0).to_radians() as f32;
    let scale = 0.9 + 0.1 * draws.unit() as f32;
    let (w, h) = (img.width(), img.height());
    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    let (sin, cos) = angle.sin_cos();
    // Each output pixel samples the input rotated back about the centre (after the flip).
    let turned = image::RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let (sx, sy) = (cos * dx + sin * dy + cx, -sin * dx + cos * dy + cy);
        let sx = if flip { w as f32 - 1.0 - sx } else { sx };
        let p = bilinear(img, sx, sy);
        image::Rgb(p.map(|v| v.round().clamp(0.0, 255.0) as u8))
    });
    let side = ((w.min(h) as f32 * scale).round() as u32).max(1);
    let x = ((w - side) as f64 * draws.unit()).round() as u32;
    let y = ((h - side) as f64 * draws.unit()).round() as u32;
    image::imageops::crop_imm(&turned, x, y, side, side).to_image()
}

/// The instance prompt's caption states, for a student that conditions on them.
fn instance_caption(plan: &StagePlan) -> anyhow::Result<Option<CaptionStates>> {
    let t = &plan.tokenize;
    let kind = if t.caption_bf16 { tch::Kind::BFloat16 } else { tch::Kind::Float };
    let device = proxytune_models::device::parse_device(&t.device)?;
    let Some(captioner) = t.student.load_captioner(device, kind)? else { return Ok(None) };
    let prompt = plan.tuner.dreambooth.instance_prompt.clone();
    let states = captioner.encode(&[&prompt])?.pop().expect("one prompt");
    Ok(Some(CaptionStates {
        prompt,
        encoder_id: t.caption_encoder_id.clone().context("the caption encoder has no id")?,
        job_id: plan.job_id.clone(),
        tokens: states.tokens as u32,
        dim: states.dim as u32,
        states_bf16: states.to_bf16_bytes(),
        created_at_us: now_us(),
    }))
}

/// The references' token rows, each captioned with the instance prompt.
fn reference_rows(plan: &StagePlan, baseline: Baseline) -> anyhow::Result<Vec<VqTokens>> {
    let t = &plan.tokenize;
    let vq = t.student.load_vq_encoder(proxytune_models::device::parse_device(&t.device)?)?;
    let copies = baseline.copies_per_reference();
    let seed = plan.trainer.train.seed;
    // Cropped as the tokenize actor crops a proxy, or augmented copies of each.
    let (keys, squares): (Vec<String>, Vec<image::RgbImage>) = plan
        .subject
        .references
        .iter()
        .enumerate()
        .flat_map(|(i, r)| -> Vec<(String, image::RgbImage)> {
            if copies == 0 {
                vec![(reference_key(i, None), square(image::DynamicImage::ImageRgb8(r.clone())))]
            } else {
                (0..copies).map(|j| (reference_key(i, Some(j)), augment(r, seed, i, j))).collect()
            }
        })
        .unzip();
    let pixels = images_to_square_batch(&squares, t.resolution as i64, vq.device())? * 2.0 - 1.0;
    let codes = vq.encode(&pixels)?; // [N, h, w]
    let (h, w) = (codes.size()[1], codes.size()[2]);
    let created_at_us = now_us();
    keys.into_iter()
        .enumerate()
        .map(|(i, key)| {
            let tokens = Vec::<i64>::try_from(codes.get(i as i64).flatten(0, -1))?;
            Ok(VqTokens {
                proxy_key: key,
                job_id: plan.job_id.clone(),
                subject: plan.subject.name.clone(),
                prompt: plan.tuner.dreambooth.instance_prompt.clone(),
                tokenizer_id: t.tokenizer_id.clone(),
                grid_height: h as u32,
                grid_width: w as u32,
                tokens: tokens.into_iter().map(|c| c as i32).collect(),
                created_at_us,
            })
        })
        .collect()
}

/// Emits one prebuilt batch.
pub(crate) struct Once(pub(crate) Option<arrow_array::RecordBatch>);

impl Source for Once {
    fn produce(&mut self, _: &mut Context, out: &mut Output) -> proxytune_actors::Result<Produced> {
        match self.0.take() {
            Some(batch) => {
                out.emit(batch);
                Ok(Produced::More)
            }
            None => Ok(Produced::Done),
        }
    }
}

/// Trains `baseline`'s student under its folder of `plan.out` (resuming from its newest checkpoint
/// when a rerun finds one), steered by `commands`. Returns how its pipeline ended.
pub(crate) async fn train(
    plan: &StagePlan,
    baseline: Baseline,
    commands: tokio::sync::watch::Receiver<JobCommand>,
) -> anyhow::Result<JobOutcome> {
    let (rows, caption) = {
        let plan = plan.clone();
        tokio::task::spawn_blocking(move || {
            anyhow::Ok((reference_rows(&plan, baseline)?, instance_caption(&plan)?))
        })
        .await??
    };
    let mut config = plan.trainer.clone();
    config.output_dir = plan.out.join(baseline.dir());
    if baseline.full() {
        config.lora = None;
    }
    config.min_rows_to_start = rows.len();
    config.corpus_version = None;
    // Its own metrics would overwrite the Proxy-Tuned student's `proxytune_train_*` series.
    let (trainer, _stats) = ArTrainerActor::new(config, &Metrics::noop())?;
    let mut p = Pipeline::new(PipelineConfig::default(), Metrics::noop());
    let source = p.source("references", Once(Some(VqTokens::to_batch(&rows)?)));
    let trainer = p.operator("ar_trainer", trainer);
    p.connect(source, trainer);
    if let Some(caption) = caption {
        let captions = p.source("captions", Once(Some(CaptionStates::to_batch(&[caption])?)));
        p.connect(captions, trainer);
    }
    let running = p.start(&tokio::runtime::Handle::current())?;
    let report = steer(running, commands, || {}).await;
    if let Some(error) = report.tasks.iter().find_map(|t| t.error.clone()) {
        anyhow::bail!("the direct baseline's student failed: {error}");
    }
    Ok(report.outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy is a function of (seed, reference, copy) alone; it is a square of 90–100 % of the
    /// shorter side; some copies are flipped and some not; a rotation keeps the content in place
    /// within a few pixels (a flat image stays flat, a centre mark stays near the centre).
    #[test]
    fn augmented_copies_are_seeded_flipped_rotated_slightly_and_cropped_to_90_to_100_percent() {
        // Dark on the left, bright on the right, a red mark at the centre.
        let img = image::RgbImage::from_fn(100, 80, |x, y| {
            if (48..52).contains(&x) && (38..42).contains(&y) {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([(x * 2) as u8, (x * 2) as u8, (x * 2) as u8])
            }
        });
        let copies: Vec<image::RgbImage> = (0..8).map(|j| augment(&img, 0, 1, j)).collect();
        assert_eq!(copies[3], augment(&img, 0, 1, 3), "the same draw, the same copy");
        assert_ne!(copies[3], augment(&img, 1, 1, 3), "another seed, another copy");
        let mut flipped = 0;
        for c in &copies {
            assert_eq!(c.width(), c.height());
            assert!((72..=80).contains(&c.width()), "90-100 % of 80: {}", c.width());
            let mean = |x0: u32, x1: u32| {
                let n = (x1 - x0) * c.height();
                (x0..x1)
                    .flat_map(|x| (0..c.height()).map(move |y| (x, y)))
                    .map(|(x, y)| c.get_pixel(x, y).0[1] as u32)
                    .sum::<u32>()
                    / n
            };
            let (left, right) = (mean(0, 10), mean(c.width() - 10, c.width()));
            flipped += usize::from(left > right);
            // The red mark: rotated by at most 5° about the centre and cropped by at most 8 px.
            let red: Vec<(u32, u32)> = c
                .enumerate_pixels()
                .filter(|(_, _, p)| p.0[0] > 200 && p.0[1] < 60)
                .map(|(x, y, _)| (x, y))
                .collect();
            assert!(!red.is_empty());
            let (cx, cy) = (c.width() as f32 / 2.0, c.height() as f32 / 2.0);
            for (x, y) in red {
                assert!((x as f32 - cx).abs() < 14.0 && (y as f32 - cy).abs() < 10.0, "mark at ({x}, {y})");
            }
        }
        assert!((1..8).contains(&flipped), "{flipped} of 8 copies flipped");
        assert_eq!(reference_key(2, Some(7)), "reference-2-augmented-7");
    }
}
