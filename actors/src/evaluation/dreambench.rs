//! The DreamBench protocol (Ruiz et al. 2023): subjects, prompts, subsets, and the evaluation of
//! any [`Generator`] — 25 prompts × 4 images per subject, the same seeds for every model — with
//! DINO / CLIP-I / FEAT-I (mean pairwise cosine between generated and reference images) and CLIP-T
//! (prompt–image cosine, identifier token removed from the prompt).
//!
//! A DreamBench folder (layout of the vendored copy in `actors/dreambench`): `subjects.tsv`, `prompts.txt`
//! (`kind<TAB>template`, kinds `object` and `live`, `{0}` identifier, `{1}` class noun), and one
//! folder of PNG/JPEG photos per subject.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proxytune_models::scorers::similarity::{mean_distinct_pair_cosine, mean_pairwise_cosine};
use proxytune_models::scorers::ImageEmbedder;
use serde::Serialize;
use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::stages::intake::{read_subjects_tsv, SubjectEntry};

/// The 9-subject subset (4 live, 5 objects) reported next to all 30, for comparison with
/// Proxy-Tuning's own numbers. The paper does not name its 9 subjects; this is proxytune's fixed
/// choice: the live subjects and objects below, spread over classes.
pub const SUBSET_9: [&str; 9] =
    ["cat", "dog", "dog2", "dog6", "backpack", "bear_plushie", "clock", "robot_toy", "teapot"];

/// Which prompt list a subject gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptKind {
    /// Objects: recontextualisations and property edits.
    Object,
    /// Live subjects (cats, dogs): recontextualisations, accessories, property edits.
    Live,
}

/// The prompt templates, by kind.
#[derive(Clone, Debug)]
pub struct PromptTemplates {
    /// Object templates, in order.
    pub object: Vec<String>,
    /// Live-subject templates, in order.
    pub live: Vec<String>,
}

impl PromptTemplates {
    /// Reads `prompts.txt`; errors name the file and line.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let (mut object, mut live) = (Vec::new(), Vec::new());
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let bad =
                |message: String| Error::BadInput { input: format!("{}:{}", path.display(), i + 1), message };
            let (kind, template) =
                line.split_once('\t').ok_or_else(|| bad("expected `kind<TAB>template`".into()))?;
            if !template.contains("{0}") || !template.contains("{1}") {
                return Err(bad(format!("template `{template}` lacks {{0}} (identifier) or {{1}} (class)")));
            }
            match kind {
                "object" => object.push(template.to_string()),
                "live" => live.push(template.to_string()),
                other => return Err(bad(format!("unknown prompt kind `{other}` (expected object or live)"))),
            }
        }
        if object.is_empty() || live.is_empty() {
            return Err(Error::BadInput {
                input: path.display().to_string(),
                message: format!(
                    "{} object and {} live prompts; both kinds are needed",
                    object.len(),
                    live.len()
                ),
            });
        }
        Ok(PromptTemplates { object, live })
    }

    /// The prompts of a subject, with `identifier` and its class noun filled in.
    pub fn prompts(&self, subject: &SubjectEntry, identifier: &str) -> Vec<String> {
        let templates = if subject.live { &self.live } else { &self.object };
        templates.iter().map(|t| t.replace("{0}", identifier).replace("{1}", &subject.class_noun)).collect()
    }
}

/// A DreamBench-layout folder.
#[derive(Clone, Debug)]
pub struct DreamBench {
    /// The folder.
    pub root: PathBuf,
    /// Its subjects.
    pub subjects: Vec<SubjectEntry>,
    /// Its prompts.
    pub prompts: PromptTemplates,
}

impl DreamBench {
    /// Reads `subjects.tsv` and `prompts.txt` under `root`.
    pub fn open(root: &Path) -> Result<Self> {
        Ok(DreamBench {
            root: root.to_path_buf(),
            subjects: read_subjects_tsv(&root.join("subjects.tsv"))?,
            prompts: PromptTemplates::read(&root.join("prompts.txt"))?,
        })
    }

    /// The reference photos of `subject` as `[N, 3, H, W]` in `[0, 1]` (resized to the first
    /// photo's size when they differ). Errors name the folder or file.
    pub fn references(&self, subject: &SubjectEntry, device: Device) -> Result<Tensor> {
        let rules = crate::stages::intake::IntakeRules { min_side: 16, max_images: 64 };
        let images: Vec<image::RgbImage> =
            crate::stages::intake::load_subject_images(&self.root.join(&subject.subject), &rules)?
                .into_iter()
                .map(|(_, rgb)| rgb)
                .collect();
        crate::stages::intake::images_to_batch(&images, device)
    }
}

/// One metric's value per subject and in aggregate.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MetricTable {
    /// Per subject.
    pub per_subject: BTreeMap<String, f64>,
    /// Mean over all subjects evaluated.
    pub all: Option<f64>,
    /// Mean over the 9-subject subset (when all 9 were evaluated).
    pub subset_9: Option<f64>,
    /// Subjects that could not be evaluated, with the reason.
    pub failed: BTreeMap<String, String>,
}

impl MetricTable {
    fn finish(&mut self) {
        let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        self.all = mean(self.per_subject.values().copied().collect());
        let subset: Vec<f64> = SUBSET_9.iter().filter_map(|s| self.per_subject.get(*s).copied()).collect();
        self.subset_9 = if subset.len() == SUBSET_9.len() { mean(subset) } else { None };
    }
}

/// The "real images" row: each subject's references against each other (distinct pairs), per
/// image metric. A subject whose folder fails is reported as failed; the others still evaluate.
pub fn real_images_row(
    bench: &DreamBench,
    embedders: &[&dyn ImageEmbedder],
    device: Device,
) -> BTreeMap<String, MetricTable> {
    let mut tables: BTreeMap<String, MetricTable> =
        embedders.iter().map(|e| (e.metric_name().to_string(), MetricTable::default())).collect();
    for subject in &bench.subjects {
        match bench.references(subject, device) {
            Ok(images) => {
                for e in embedders {
                    let emb = e.embed(&images);
                    let table = tables.get_mut(e.metric_name()).expect("one table per metric");
                    match mean_distinct_pair_cosine(&emb) {
                        Some(v) => {
                            table.per_subject.insert(subject.subject.clone(), v);
                        }
                        None => {
                            table
                                .failed
                                .insert(subject.subject.clone(), "fewer than two reference photos".into());
                        }
                    }
                }
            }
            Err(error) => {
                for table in tables.values_mut() {
                    table.failed.insert(subject.subject.clone(), error.to_string());
                }
            }
        }
    }
    tables.values_mut().for_each(MetricTable::finish);
    tables
}

/// Mean pairwise cosine between generated and reference embeddings (DINO / CLIP-I / FEAT-I).
pub fn fidelity(generated: &Tensor, references: &Tensor) -> f64 {
    mean_pairwise_cosine(generated, references)
}

/// A model under evaluation (the tuned supervisor, the AR student).
pub trait Generator {
    /// Role name for reports (`supervisor`, `student`).
    fn role(&self) -> proxytune_schemas::ModelRole;
    /// Version (checkpoint id) for reports and sample keys.
    fn version(&self) -> String;
    /// One image per seed for `prompt`, as `[N, 3, H, W]` RGB in `[0, 1]`.
    fn generate(&mut self, subject: &SubjectEntry, prompt: &str, seeds: &[u64]) -> Result<Tensor>;
}

/// How the protocol runs.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolConfig {
    /// The identifier token in prompts (`{0}`); removed for CLIP-T.
    pub identifier: String,
    /// Images per prompt (4 in DreamBench).
    pub images_per_prompt: usize,
    /// Base of the seeds; every model gets the same seeds.
    pub seed_base: u64,
    /// Evaluate only the first this many prompts of each subject (all when absent).
    pub max_prompts: Option<usize>,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig { identifier: "sks".into(), images_per_prompt: 4, seed_base: 0, max_prompts: None }
    }
}

/// The seed of one sample: identical for every model, distinct per (subject, prompt, sample).
pub fn sample_seed(cfg: &ProtocolConfig, subject_index: usize, prompt_index: usize, sample: usize) -> u64 {
    cfg.seed_base + (subject_index as u64) * 100_000 + (prompt_index as u64) * 100 + sample as u64
}

/// Scores of one prompt (means over its images).
#[derive(Clone, Debug, Serialize)]
pub struct PromptScores {
    /// Prompt index in the subject's list.
    pub prompt_index: usize,
    /// The prompt (with the identifier).
    pub prompt: String,
    /// Metric name → mean over the prompt's images.
    pub scores: BTreeMap<String, f64>,
}

/// A generator's evaluation.
#[derive(Debug, Serialize)]
pub struct GeneratorReport {
    /// Supervisor or student.
    pub role: proxytune_schemas::ModelRole,
    /// Its version.
    pub version: String,
    /// Per metric: per-subject means, the all-subject and 9-subset means.
    pub metrics: BTreeMap<String, MetricTable>,
    /// Per subject, per prompt.
    pub per_prompt: BTreeMap<String, Vec<PromptScores>>,
    /// Every generated image with its scores (for the corpus and the grids).
    #[serde(skip)]
    pub samples: Vec<proxytune_schemas::EvalSample>,
}

/// Runs the protocol for `generator` on `subjects` of `bench`: per subject, every prompt ×
/// `images_per_prompt` images with the shared seeds; image metrics against the references, CLIP-T
/// against the prompt without the identifier.
pub fn evaluate_generator(
    bench: &DreamBench,
    subjects: &[SubjectEntry],
    generator: &mut dyn Generator,
    image_metrics: &[&dyn ImageEmbedder],
    clip_t: Option<&dyn crate::stages::filter::PromptScorer>,
    cfg: &ProtocolConfig,
    device: Device,
) -> Result<GeneratorReport> {
    let mut metrics: BTreeMap<String, MetricTable> =
        image_metrics.iter().map(|e| (e.metric_name().to_string(), MetricTable::default())).collect();
    if clip_t.is_some() {
        metrics.insert("CLIP-T".into(), MetricTable::default());
    }
    let mut per_prompt = BTreeMap::new();
    let mut samples = Vec::new();
    let (role, version) = (generator.role(), generator.version());
    for subject in subjects {
        let subject_index = bench.subjects.iter().position(|s| s.subject == subject.subject).unwrap_or(0);
        let references = match bench.references(subject, device) {
            Ok(r) => r,
            Err(error) => {
                metrics.values_mut().for_each(|t| {
                    t.failed.insert(subject.subject.clone(), error.to_string());
                });
                continue;
            }
        };
        let reference_embeddings: Vec<Tensor> = image_metrics.iter().map(|e| e.embed(&references)).collect();
        let mut prompts = bench.prompts.prompts(subject, &cfg.identifier);
        prompts.truncate(cfg.max_prompts.unwrap_or(usize::MAX));
        let mut subject_scores: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut rows = Vec::new();
        for (pi, prompt) in prompts.iter().enumerate() {
            let seeds: Vec<u64> =
                (0..cfg.images_per_prompt).map(|k| sample_seed(cfg, subject_index, pi, k)).collect();
            let images = generator.generate(subject, prompt, &seeds)?;
            if images.size().first() != Some(&(seeds.len() as i64)) {
                return Err(Error::Operator {
                    message: format!(
                        "generator returned {:?} images for {} seeds",
                        images.size(),
                        seeds.len()
                    ),
                });
            }
            let mut scores = BTreeMap::new();
            let mut per_image: Vec<BTreeMap<String, f32>> = vec![BTreeMap::new(); seeds.len()];
            for (e, refs) in image_metrics.iter().zip(&reference_embeddings) {
                let emb = e.embed(&images); // [N, D], unit rows
                let sims = emb.matmul(&refs.transpose(0, 1)).mean_dim(1i64, false, tch::Kind::Float); // [N]
                let sims: Vec<f32> = Vec::try_from(sims).map_err(proxytune_models::ModelError::from)?;
                for (k, v) in sims.iter().enumerate() {
                    per_image[k].insert(e.metric_name().to_string(), *v);
                }
                scores.insert(e.metric_name().to_string(), fidelity(&emb, refs));
            }
            if let Some(scorer) = clip_t {
                let text = crate::stages::filter::strip_identifier(prompt, Some(&cfg.identifier));
                let t = scorer.score(&vec![text; seeds.len()], &images)?;
                for (k, v) in t.iter().enumerate() {
                    per_image[k].insert("CLIP-T".into(), *v);
                }
                scores.insert("CLIP-T".into(), t.iter().map(|v| f64::from(*v)).sum::<f64>() / t.len() as f64);
            }
            for (m, v) in &scores {
                subject_scores.entry(m.clone()).or_default().push(*v);
            }
            for (k, seed) in seeds.iter().enumerate() {
                let img = images.get(k as i64);
                let (h, w) = (img.size()[1], img.size()[2]);
                let rgb = crate::stages::intake::tensor_to_rgb(&img)?;
                samples.push(proxytune_schemas::EvalSample {
                    job_id: String::new(),
                    model_role: role,
                    model_version: version.clone(),
                    subject: subject.subject.clone(),
                    prompt_index: pi as u32,
                    prompt: prompt.clone(),
                    sample_index: k as u32,
                    seed: *seed,
                    image_png: crate::stages::intake::encode_png(&rgb),
                    width: w as u32,
                    height: h as u32,
                    score_dino: per_image[k].get("DINO").copied(),
                    score_clip_i: per_image[k].get("CLIP-I").copied(),
                    score_clip_t: per_image[k].get("CLIP-T").copied(),
                    score_feat_i: per_image[k].get("FEAT-I").copied(),
                    created_at_us: 0,
                });
            }
            rows.push(PromptScores { prompt_index: pi, prompt: prompt.clone(), scores });
        }
        for (m, values) in subject_scores {
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            metrics.get_mut(&m).expect("metric table").per_subject.insert(subject.subject.clone(), mean);
        }
        per_prompt.insert(subject.subject.clone(), rows);
    }
    metrics.values_mut().for_each(MetricTable::finish);
    Ok(GeneratorReport { role, version, metrics, per_prompt, samples })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_files_are_checked_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.txt");
        std::fs::write(&path, "# c\nobject\ta {0} {1} on a beach\nlive\ta {0} {1} in a hat\n").unwrap();
        let t = PromptTemplates::read(&path).unwrap();
        let dog = SubjectEntry { subject: "dog2".into(), class_noun: "dog".into(), live: true, n_images: 6 };
        assert_eq!(t.prompts(&dog, "sks"), ["a sks dog in a hat"]);
        std::fs::write(&path, "object\ta {0} {1}\nplant\ta {0} {1}\n").unwrap();
        let err = PromptTemplates::read(&path).unwrap_err().to_string();
        assert!(err.contains("prompts.txt:2") && err.contains("unknown prompt kind `plant`"), "{err}");
        std::fs::write(&path, "object\ta {1}\n").unwrap();
        assert!(PromptTemplates::read(&path).unwrap_err().to_string().contains("lacks"));
    }
}
