//! `filter`: scores every proxy and keeps or rejects it, recording why.
//!
//! For each proxy: subject fidelity against the subject's reference images (mean cosine, per
//! configured image metric: DINO, CLIP-I, FEAT-I), prompt adherence (CLIP-T, identifier token
//! removed from the prompt), and the highest cosine to an already-kept proxy of the same subject
//! (near-duplicates). Thresholds are opt-in: the paper filters nothing, so the default keeps every
//! decodable proxy and only records its scores. Every proxy leaves the filter — kept or rejected,
//! with its scores, verdict and reason — so a stored corpus can be re-filtered in a replay.
//!
//! Torch work: this is an [`Operator`], so it runs on its own OS thread.

use std::collections::HashMap;

use arrow_array::RecordBatch;
use proxytune_models::scorers::similarity::l2_normalize;
use proxytune_models::scorers::ImageEmbedder;
use proxytune_schemas::{MetricName, Proxy, ReferenceImage, RejectReason, Table};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::runtime::{Context, Metrics, Operator, Output};
use crate::stages::intake::images_to_batch;

/// The image metrics a filter can compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageMetric {
    /// DINO ViT-S/16 CLS embeddings.
    Dino,
    /// CLIP image embeddings.
    ClipI,
    /// EfficientNet-Lite0 features (the offline stand-in, reported as FEAT-I).
    FeatI,
}

impl ImageMetric {
    fn label(self) -> &'static str {
        match self {
            ImageMetric::Dino => "dino",
            ImageMetric::ClipI => "clip_i",
            ImageMetric::FeatI => "feat_i",
        }
    }
}

/// Scores prompts against images (CLIP-T).
pub trait PromptScorer: Send {
    /// Cosine between each prompt and its image; `images01` is `[B, 3, H, W]` in `[0, 1]`.
    fn score(&self, prompts: &[String], images01: &Tensor) -> Result<Vec<f32>>;
}

impl PromptScorer for proxytune_models::scorers::clip_dino::ClipScorer {
    fn score(&self, prompts: &[String], images01: &Tensor) -> Result<Vec<f32>> {
        Ok(self.prompt_image_cosine(prompts, images01)?)
    }
}

/// Configuration of a [`Filter`]. Every threshold is optional; none set keeps everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Reject a proxy whose fidelity (per `fidelity_metric`) is below this.
    #[serde(default)]
    pub min_fidelity: Option<f32>,
    /// The metric `min_fidelity` applies to (the first configured embedder when absent).
    #[serde(default)]
    pub fidelity_metric: Option<ImageMetric>,
    /// Reject a proxy whose CLIP-T is below this (needs a prompt scorer).
    #[serde(default)]
    pub min_prompt_adherence: Option<f32>,
    /// Reject a proxy whose cosine to an already-kept proxy of its subject is above this.
    #[serde(default)]
    pub max_duplicate_cosine: Option<f32>,
    /// The identifier token removed from prompts before CLIP-T (e.g. `sks`).
    #[serde(default)]
    pub identifier: Option<String>,
}

/// `a sks dog on the beach` → `a dog on the beach` (the DreamBench CLIP-T convention).
pub fn strip_identifier(prompt: &str, identifier: Option<&str>) -> String {
    match identifier {
        Some(id) => prompt.split_whitespace().filter(|w| *w != id).collect::<Vec<_>>().join(" "),
        None => prompt.to_string(),
    }
}

struct SubjectState {
    /// Reference embeddings per metric, `[R, D]`, normalised.
    references: HashMap<ImageMetric, Tensor>,
    /// Embeddings of kept proxies under the duplicate metric, `[K, D]`.
    kept: Option<Tensor>,
}

/// The Filter actor.
pub struct Filter {
    config: FilterConfig,
    embedders: Vec<(ImageMetric, Box<dyn ImageEmbedder + Send>)>,
    prompt_scorer: Option<Box<dyn PromptScorer>>,
    references: Vec<ReferenceImage>,
    subjects: HashMap<String, SubjectState>,
    device: Device,
    accepted: metrics::Counter,
    rejected: HashMap<RejectReason, metrics::Counter>,
    scores: HashMap<&'static str, metrics::Histogram>,
}

impl Filter {
    /// A filter with image `embedders` (the first also judges duplicates), an optional CLIP-T
    /// scorer and the subjects' reference images. Fails when a threshold has no scorer to apply it.
    pub fn new(
        config: FilterConfig,
        embedders: Vec<(ImageMetric, Box<dyn ImageEmbedder + Send>)>,
        prompt_scorer: Option<Box<dyn PromptScorer>>,
        references: Vec<ReferenceImage>,
        device: Device,
        metrics: &Metrics,
    ) -> Result<Self> {
        let bad = |message: String| Error::BadInput { input: "filter config".into(), message };
        if embedders.is_empty() {
            return Err(bad("at least one image metric is needed".into()));
        }
        if let Some(m) = config.fidelity_metric {
            if !embedders.iter().any(|(e, _)| *e == m) {
                return Err(bad(format!("fidelity_metric `{}` has no embedder", m.label())));
            }
        }
        if config.min_prompt_adherence.is_some() && prompt_scorer.is_none() {
            return Err(bad("min_prompt_adherence is set but no CLIP-T scorer is configured".into()));
        }
        let rejected = RejectReason::ALL
            .into_iter()
            .map(|r| (r, metrics.counter(MetricName::FilterRejectedRows, "reason", r.as_str())))
            .collect();
        let scores = ["dino", "clip_i", "clip_t", "feat_i", "dup"]
            .into_iter()
            .map(|m| (m, metrics.histogram(MetricName::FilterScore, "metric", m)))
            .collect();
        Ok(Filter {
            config,
            embedders,
            prompt_scorer,
            references,
            subjects: HashMap::new(),
            device,
            accepted: metrics.counter_labels(MetricName::FilterAcceptedRows, &[]),
            rejected,
            scores,
        })
    }

    fn embed_all(&self, images: &Tensor) -> HashMap<ImageMetric, Tensor> {
        self.embedders.iter().map(|(m, e)| (*m, l2_normalize(&e.embed(images)))).collect()
    }

    /// Decodes PNGs into one `[B, 3, S, S]` batch (all resized to the first image's size);
    /// `None` for rows that do not decode.
    fn decode(&self, pngs: &[&[u8]]) -> Result<(Option<Tensor>, Vec<bool>)> {
        let decoded: Vec<Option<image::RgbImage>> =
            pngs.iter().map(|png| image::load_from_memory(png).ok().map(|i| i.to_rgb8())).collect();
        let ok = decoded.iter().map(Option::is_some).collect();
        let images: Vec<image::RgbImage> = decoded.into_iter().flatten().collect();
        let batch = if images.is_empty() { None } else { Some(images_to_batch(&images, self.device)?) };
        Ok((batch, ok))
    }

    fn subject(&mut self, subject: &str) -> Result<&mut SubjectState> {
        if !self.subjects.contains_key(subject) {
            let refs: Vec<&[u8]> = self
                .references
                .iter()
                .filter(|r| r.subject == subject)
                .map(|r| r.image_png.as_slice())
                .collect();
            if refs.is_empty() {
                return Err(Error::BadInput {
                    input: format!("subject `{subject}`"),
                    message: "the filter has no reference images for this subject".into(),
                });
            }
            let (images, ok) = self.decode(&refs)?;
            let images = match images {
                Some(i) if ok.iter().all(|&o| o) => i,
                _ => {
                    return Err(Error::BadInput {
                        input: format!("subject `{subject}`"),
                        message: "a reference image does not decode".into(),
                    })
                }
            };
            let references = tch::no_grad(|| self.embed_all(&images));
            self.subjects.insert(subject.to_string(), SubjectState { references, kept: None });
        }
        Ok(self.subjects.get_mut(subject).expect("inserted above"))
    }

    /// Takes proxies kept earlier (a resumed job's stored ones) as already kept, so new proxies
    /// are checked for duplicates against them as in an uninterrupted run.
    pub fn remember_kept(&mut self, kept: &[Proxy]) -> Result<()> {
        for p in kept {
            let (images, ok) = self.decode(&[p.image_png.as_slice()])?;
            let Some(images) = images.filter(|_| ok[0]) else {
                return Err(Error::BadInput {
                    input: format!("stored proxy {}", p.key()),
                    message: "kept, but its image does not decode".into(),
                });
            };
            let dup_metric = self.embedders[0].0;
            let emb =
                tch::no_grad(|| self.embed_all(&images)).remove(&dup_metric).expect("every metric embeds");
            let state = self.subject(&p.subject)?;
            state.kept = Some(match state.kept.take() {
                Some(k) => Tensor::cat(&[k, emb], 0),
                None => emb,
            });
        }
        Ok(())
    }

    /// Scores and judges a batch of proxies.
    pub fn judge(&mut self, mut rows: Vec<Proxy>, now_us: i64) -> Result<Vec<Proxy>> {
        let pngs: Vec<&[u8]> = rows.iter().map(|r| r.image_png.as_slice()).collect();
        let (images, ok) = self.decode(&pngs)?;
        let embeddings = images.as_ref().map(|i| tch::no_grad(|| self.embed_all(i))).unwrap_or_default();
        let clip_t = match (&self.prompt_scorer, &images) {
            (Some(scorer), Some(images)) => {
                let id = self.config.identifier.as_deref();
                let prompts: Vec<String> = rows
                    .iter()
                    .zip(&ok)
                    .filter(|(_, ok)| **ok)
                    .map(|(r, _)| strip_identifier(&r.prompt, id))
                    .collect();
                Some(scorer.score(&prompts, images)?)
            }
            _ => None,
        };
        let dup_metric = self.embedders[0].0;
        let fidelity_metric = self.config.fidelity_metric.unwrap_or(dup_metric);
        let mut decoded = 0i64; // index into the decoded batch
        for (row, ok) in rows.iter_mut().zip(ok) {
            row.filtered_at_us = Some(now_us);
            if !ok {
                row.keep = Some(false);
                row.reject_reason = Some(RejectReason::InvalidImage);
                self.rejected[&RejectReason::InvalidImage].increment(1);
                continue;
            }
            let i = decoded;
            decoded += 1;
            let state = self.subject(&row.subject)?;
            let mut fidelity = HashMap::new();
            for (metric, emb) in &embeddings {
                let e = emb.get(i).unsqueeze(0); // [1, D]
                let score =
                    e.matmul(&state.references[metric].transpose(0, 1)).mean(Kind::Float).double_value(&[])
                        as f32;
                fidelity.insert(*metric, score);
            }
            let dup_emb = embeddings[&dup_metric].get(i).unsqueeze(0);
            let dup = state
                .kept
                .as_ref()
                .map(|k| dup_emb.matmul(&k.transpose(0, 1)).max().double_value(&[]) as f32);
            row.score_dino = fidelity.get(&ImageMetric::Dino).copied();
            row.score_clip_i = fidelity.get(&ImageMetric::ClipI).copied();
            row.score_feat_i = fidelity.get(&ImageMetric::FeatI).copied();
            row.score_clip_t = clip_t.as_ref().map(|s| s[i as usize]);
            row.dup_max_cosine = dup;
            let c = &self.config;
            let reason = if c.min_fidelity.is_some_and(|m| fidelity[&fidelity_metric] < m) {
                Some(RejectReason::LowFidelity)
            } else if c.min_prompt_adherence.zip(row.score_clip_t).is_some_and(|(m, s)| s < m) {
                Some(RejectReason::LowPromptAdherence)
            } else if c.max_duplicate_cosine.zip(dup).is_some_and(|(m, d)| d > m) {
                Some(RejectReason::NearDuplicate)
            } else {
                None
            };
            row.keep = Some(reason.is_none());
            row.reject_reason = reason;
            match reason {
                Some(r) => self.rejected[&r].increment(1),
                None => {
                    self.accepted.increment(1);
                    let state = self.subjects.get_mut(&row.subject).expect("scored above");
                    state.kept = Some(match state.kept.take() {
                        Some(k) => Tensor::cat(&[k, dup_emb], 0),
                        None => dup_emb,
                    });
                }
            }
            for (metric, value) in [
                ("dino", row.score_dino),
                ("clip_i", row.score_clip_i),
                ("clip_t", row.score_clip_t),
                ("feat_i", row.score_feat_i),
                ("dup", row.dup_max_cosine),
            ] {
                if let Some(v) = value {
                    self.scores[metric].record(f64::from(v));
                }
            }
        }
        Ok(rows)
    }
}

impl Operator for Filter {
    fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        _ctx: &mut Context,
        out: &mut Output,
    ) -> Result<()> {
        let rows = Proxy::from_batch(&batch)?;
        let judged = self.judge(rows, proxytune_schemas::now_us())?;
        out.emit(Proxy::to_batch(&judged)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Embeds an image as its mean colour (enough to test the filter's logic).
    struct MeanColour;

    impl ImageEmbedder for MeanColour {
        fn metric_name(&self) -> &'static str {
            "TEST"
        }
        fn embed(&self, images01: &Tensor) -> Tensor {
            images01.mean_dim(&[2i64, 3][..], false, Kind::Float) - 0.5
        }
    }

    fn png(rgb: [u8; 3]) -> Vec<u8> {
        crate::stages::intake::encode_png(&image::RgbImage::from_pixel(8, 8, image::Rgb(rgb)))
    }

    fn proxy(seed: u64, rgb: [u8; 3]) -> Proxy {
        Proxy {
            job_id: "j".into(),
            subject: "red".into(),
            class_noun: "thing".into(),
            prompt: format!("a sks thing {seed}"),
            prompt_index: 0,
            seed,
            supervisor_id: "s".into(),
            supervisor_version: 1,
            image_png: png(rgb),
            width: 8,
            height: 8,
            score_dino: None,
            score_clip_i: None,
            score_clip_t: None,
            score_feat_i: None,
            dup_max_cosine: None,
            keep: None,
            reject_reason: None,
            generated_at_us: 0,
            filtered_at_us: None,
        }
    }

    fn references() -> Vec<ReferenceImage> {
        [[250, 10, 10], [230, 30, 20]]
            .into_iter()
            .enumerate()
            .map(|(i, rgb)| ReferenceImage {
                job_id: "j".into(),
                subject: "red".into(),
                class_noun: "thing".into(),
                image_index: i as u32,
                source: format!("{i}.png"),
                image_png: png(rgb),
                width: 8,
                height: 8,
                created_at_us: 0,
            })
            .collect()
    }

    fn filter(config: FilterConfig) -> Filter {
        let embedders: Vec<(ImageMetric, Box<dyn ImageEmbedder + Send>)> =
            vec![(ImageMetric::FeatI, Box::new(MeanColour))];
        Filter::new(config, embedders, None, references(), Device::Cpu, &Metrics::noop()).unwrap()
    }

    fn batch() -> Vec<Proxy> {
        let mut broken = proxy(4, [0, 0, 0]);
        broken.image_png = b"not a png".to_vec();
        vec![
            proxy(0, [240, 20, 15]), // on subject
            proxy(1, [240, 20, 15]), // duplicate of 0
            proxy(2, [10, 20, 240]), // off subject (blue)
            proxy(3, [200, 60, 40]), // on subject, distinct
            broken,
        ]
    }

    #[test]
    fn defaults_keep_every_decodable_proxy_and_record_scores() {
        let mut f = filter(FilterConfig::default());
        let out = f.judge(batch(), 7).unwrap();
        let verdicts: Vec<_> = out.iter().map(|p| (p.keep, p.reject_reason)).collect();
        assert_eq!(verdicts[..4], [(Some(true), None); 4]);
        assert_eq!(verdicts[4], (Some(false), Some(RejectReason::InvalidImage)));
        assert!(out[..4].iter().all(|p| p.score_feat_i.is_some() && p.filtered_at_us == Some(7)));
        assert!(out[0].score_feat_i.unwrap() > 0.9 && out[2].score_feat_i.unwrap() < 0.0);
        assert_eq!(out[0].dup_max_cosine, None, "nothing kept before the first proxy");
        assert!(out[1].dup_max_cosine.unwrap() > 0.999);
    }

    #[test]
    fn thresholds_reject_with_the_right_reason() {
        let mut f = filter(FilterConfig {
            min_fidelity: Some(0.5),
            max_duplicate_cosine: Some(0.999),
            ..Default::default()
        });
        let out = f.judge(batch(), 0).unwrap();
        let reasons: Vec<_> = out.iter().map(|p| p.reject_reason).collect();
        assert_eq!(
            reasons,
            [
                None,
                Some(RejectReason::NearDuplicate),
                Some(RejectReason::LowFidelity),
                None,
                Some(RejectReason::InvalidImage)
            ]
        );
        // Kept proxies of earlier batches count as duplicates too.
        let again = f.judge(vec![proxy(9, [240, 20, 15])], 0).unwrap();
        assert_eq!(again[0].reject_reason, Some(RejectReason::NearDuplicate));
    }

    #[test]
    fn bad_configs_and_unknown_subjects_are_named() {
        let embedders: Vec<(ImageMetric, Box<dyn ImageEmbedder + Send>)> =
            vec![(ImageMetric::FeatI, Box::new(MeanColour))];
        let config = FilterConfig { min_prompt_adherence: Some(0.2), ..Default::default() };
        let err =
            Filter::new(config, embedders, None, references(), Device::Cpu, &Metrics::noop()).err().unwrap();
        assert!(err.to_string().contains("no CLIP-T scorer"), "{err}");
        let mut f = filter(FilterConfig::default());
        let mut stranger = proxy(0, [1, 2, 3]);
        stranger.subject = "ghost".into();
        let err = f.judge(vec![stranger], 0).unwrap_err().to_string();
        assert!(err.contains("`ghost`"), "{err}");
        assert_eq!(strip_identifier("a sks dog  on sks", Some("sks")), "a dog on");
    }
}
