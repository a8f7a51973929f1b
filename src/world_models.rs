//! The toy world's models as the demo and the replay use them: where they live in `models/world`,
//! their sampling settings, the student's LoRA training, the world scorers, and the world's
//! DreamBench evaluation with its two exact checks (was the asked-for context drawn, is the
//! subject's main colour there).

use std::path::Path;

use anyhow::Context;
use proxytune_actors::evaluation::dreambench::{Generator, GeneratorReport, ProtocolConfig};
use proxytune_actors::evaluation::generators::{StudentGenerator, StudentSampling, SupervisorGenerator};
use proxytune_actors::stages::ar_trainer::ArTrainerConfig;
use proxytune_actors::stages::diffusion_sampling::{SamplingConfig, UnetPrecision};
use proxytune_actors::stages::tokenize::TokenizeConfig;
use proxytune_actors::world::{classify_context, EDITS, IDENTIFIER};

use crate::job::evaluate::{evaluate_models, ModelLoader, Protocol};
use crate::job::plan::ScorerSource;
use crate::subject::JobSubject;
use proxytune_models::ar::lumina::{ImageSampling, LuminaTokens};
use proxytune_models::ar::student::StudentFiles;
use proxytune_models::ar::train::ArTrainConfig;
use proxytune_models::diffusion::pipeline::SamplerKind;
use proxytune_models::lora::LoraConfig;
use proxytune_schemas::EvalSample;
use serde::Serialize;

pub(crate) const SIZE: u32 = 32;

/// Checks that `world_dir` holds the pretrained world models `parts` (their manifests).
pub(crate) fn check_models(world_dir: &Path, parts: &[&str]) -> anyhow::Result<()> {
    for part in parts {
        let manifest = world_dir.join(part).join("manifest.json");
        anyhow::ensure!(
            manifest.is_file(),
            "{}: the pretrained world models are missing ({} not found; `tools/dev world` makes them)",
            world_dir.display(),
            manifest.display()
        );
    }
    Ok(())
}

pub(crate) fn supervisor_sampling() -> SamplingConfig {
    SamplingConfig {
        num_inference_steps: 25,
        guidance_scale: 5.0,
        sampler: SamplerKind::Ddim,
        resolution: SIZE,
        negative_prompt: String::new(),
        batch_images: 8,
        unet_precision: UnetPrecision::Fp32,
        vae_slicing: false,
    }
}

/// Which of the world's pretrained students a job fine-tunes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorldStudent {
    /// The Lumina-mGPT-style Chameleon student (`models/world/student`).
    #[default]
    Chameleon,
    /// The LlamaGen-style student (`models/world/llamagen`: GPT, VQ, T5 encoder).
    Llamagen,
}

impl WorldStudent {
    /// Its folder under the world's.
    pub(crate) fn folder(self) -> &'static str {
        match self {
            WorldStudent::Chameleon => "student",
            WorldStudent::Llamagen => "llamagen",
        }
    }

    /// Its folders as a job's student.
    pub(crate) fn files(self, world_dir: &Path) -> anyhow::Result<StudentFiles> {
        let dir = world_dir.join(self.folder());
        Ok(match self {
            WorldStudent::Chameleon => {
                let path = dir.join("lumina_tokens.json");
                let tokens: LuminaTokens = serde_json::from_str(
                    &std::fs::read_to_string(&path).with_context(|| path.display().to_string())?,
                )
                .with_context(|| format!("{}: not Lumina structure tokens", path.display()))?;
                StudentFiles::chameleon(&dir, tokens)
            }
            WorldStudent::Llamagen => llamagen_files(&dir),
        })
    }

    /// How it samples: a 8×8 code grid (32 px at factor 4), guidance 3, top-k 64.
    pub(crate) fn sampling(self, world_dir: &Path) -> anyhow::Result<StudentSampling> {
        Ok(StudentSampling {
            grid: (SIZE / 4) as i64,
            image: ImageSampling {
                guidance_scale: 3.0,
                image_top_k: Some(64),
                top_p: None,
                temperature: 1.0,
            },
            tokens: self.files(world_dir)?.tokens,
            bf16: false,
            batch: 16,
        })
    }

    /// Rank-8 LoRA on every attention and MLP projection.
    pub(crate) fn lora(self) -> LoraConfig {
        let targets: &[&str] = match self {
            WorldStudent::Chameleon => {
                &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            }
            WorldStudent::Llamagen => &["wqkv", "wo", "w1", "w2", "w3"],
        };
        LoraConfig { rank: 8, alpha: 8.0, target_modules: targets.iter().map(|t| t.to_string()).collect() }
    }

    /// The id written into its VQ token rows.
    pub(crate) fn tokenizer_id(self) -> &'static str {
        match self {
            WorldStudent::Chameleon => "world-vq@1",
            WorldStudent::Llamagen => "world-llamagen-vq@1",
        }
    }

    /// The id written into its caption rows, for a student with a caption encoder.
    pub(crate) fn caption_encoder_id(self) -> Option<String> {
        match self {
            WorldStudent::Chameleon => None,
            WorldStudent::Llamagen => Some("world-t5@1".into()),
        }
    }
}

/// The world's LlamaGen student under `dir` (`gpt/`, `vq/`, `t5/`; `proxytune pretrain llamagen`).
pub(crate) fn llamagen_files(dir: &Path) -> StudentFiles {
    StudentFiles {
        family: proxytune_models::ar::student::StudentFamily::LlamaGen,
        dir: dir.join("gpt"),
        vq_dir: Some(dir.join("vq")),
        text_encoder_dir: Some(dir.join("t5")),
        tokens: Default::default(),
    }
}

/// Tokenization for the world student.
pub(crate) fn tokenize_config(
    world_dir: &Path,
    which: WorldStudent,
    device: &str,
    only_kept: bool,
) -> anyhow::Result<TokenizeConfig> {
    Ok(TokenizeConfig {
        student: which.files(world_dir)?,
        tokenizer_id: which.tokenizer_id().into(),
        caption_encoder_id: which.caption_encoder_id(),
        caption_bf16: false,
        resolution: SIZE,
        device: device.into(),
        only_kept,
    })
}

/// The world student's LoRA training: `steps` steps of 8, starting once `min_rows` rows are in,
/// with a checkpoint every `checkpoint_every` steps.
#[allow(clippy::too_many_arguments)]
pub(crate) fn student_trainer_config(
    world_dir: &Path,
    which: WorldStudent,
    device: &str,
    output_dir: &Path,
    steps: u64,
    min_rows: usize,
    corpus_version: Option<u64>,
    checkpoint_every: u64,
) -> anyhow::Result<ArTrainerConfig> {
    Ok(ArTrainerConfig {
        student: which.files(world_dir)?,
        device: device.into(),
        lora: Some(which.lora()),
        train: ArTrainConfig {
            learning_rate: 1e-3,
            lr_warmup_steps: 20,
            max_train_steps: steps,
            batch_size: 8,
            condition_dropout: 0.1,
            ..Default::default()
        },
        tokenizer_id: which.tokenizer_id().into(),
        caption_encoder_id: which.caption_encoder_id(),
        min_rows_to_start: min_rows,
        rows_per_step: 1,
        output_dir: output_dir.to_path_buf(),
        corpus_version,
        checkpoint_every,
    })
}

/// One model's evaluation with the world's exact checks.
#[derive(Debug, Serialize)]
pub(crate) struct ModelScores {
    /// Supervisor or student.
    pub role: String,
    /// The model folder (and adapter).
    pub version: String,
    /// DINO, CLIP-I, CLIP-T, FEAT-I means over the subject's samples.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Fraction of samples whose drawn context is the asked-for one (world subjects).
    pub context_accuracy: Option<f64>,
    /// Fraction of samples (prompts that keep the colour) showing the subject's main colour, when
    /// the subject's colour is known (world subjects).
    pub subject_colour_present: Option<f64>,
    /// The image metrics' means over the recontextualisation prompts (the subject first: contexts
    /// and accessories) and over the property edits (a word before the subject: `a red …`), the
    /// paper's editability split ([`crate::job::evaluate::split_by_prompt_kind`]).
    pub by_prompt_kind: std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>,
    /// Samples scored.
    pub samples: usize,
    /// Seconds the evaluation took.
    pub seconds: f64,
    /// The samples themselves (for the grids).
    #[serde(skip)]
    pub images: Vec<EvalSample>,
}

/// Whether at least 3 % of `img`'s pixels are within 40 levels per channel of `rgb` (its shaded
/// tones included): the subject's main colour is drawn.
fn has_colour(img: &image::RgbImage, rgb: [u8; 3]) -> bool {
    let close = img
        .pixels()
        .filter(|p| {
            // Shading scales the colour by 0.82..1: compare against the scaled range.
            (0..=4).any(|k| {
                let s = 1.0 - 0.045 * k as f32;
                (0..3).map(|c| (p.0[c] as f32 - rgb[c] as f32 * s).abs()).fold(0.0, f32::max) < 40.0
            })
        })
        .count();
    close as f64 >= 0.03 * (img.width() * img.height()) as f64
}

fn exact_checks(subject: &JobSubject, samples: &[EvalSample]) -> (f64, Option<f64>) {
    let (mut ctx_hits, mut colour_hits, mut colour_n) = (0usize, 0usize, 0usize);
    for s in samples {
        let Ok(img) = image::load_from_memory(&s.image_png).map(|i| i.to_rgb8()) else { continue };
        let scene = &subject.prompts[s.prompt_index as usize];
        ctx_hits += usize::from(classify_context(&img) == scene.context);
        let recoloured = scene.edit.is_some_and(|e| matches!(EDITS[e], "red" | "purple" | "wet"));
        if let (Some(colour), false) = (subject.colour, recoloured) {
            colour_n += 1;
            colour_hits += usize::from(has_colour(&img, colour));
        }
    }
    let n = samples.len().max(1) as f64;
    (ctx_hits as f64 / n, subject.colour.map(|_| colour_hits as f64 / colour_n.max(1) as f64))
}

pub(crate) fn score(subject: &JobSubject, report: GeneratorReport, seconds: f64) -> ModelScores {
    let metrics = report
        .metrics
        .iter()
        .filter_map(|(name, table)| table.per_subject.get(&subject.name).map(|v| (name.clone(), *v)))
        .collect();
    let (context_accuracy, subject_colour_present) = exact_checks(subject, &report.samples);
    ModelScores {
        role: report.role.as_str().to_string(),
        version: report.version,
        metrics,
        context_accuracy: Some(context_accuracy),
        subject_colour_present,
        by_prompt_kind: crate::job::evaluate::split_by_prompt_kind(&report.samples, IDENTIFIER),
        samples: report.samples.len(),
        seconds,
        images: report.samples,
    }
}

/// What an evaluation runs on: the world models, where the bench goes, how many samples.
pub(crate) struct EvalSpec<'a> {
    pub world_dir: &'a Path,
    pub out_dir: &'a Path,
    pub device: &'a str,
    pub images_per_prompt: usize,
    pub max_prompts: Option<usize>,
}

/// The world's DreamBench protocol for `models` (loaded one at a time) on `subject` (its
/// references, its class's 25 prompts), with the same seeds for each.
pub(crate) fn evaluate(
    spec: &EvalSpec,
    subject: &JobSubject,
    models: Vec<(String, ModelLoader<'_>)>,
) -> anyhow::Result<Vec<(String, ModelScores)>> {
    let bench_dir = spec.out_dir.join("world_bench");
    subject.write_bench(&bench_dir)?;
    let protocol = Protocol {
        bench_dir: &bench_dir,
        subject: &subject.name,
        scorers: &ScorerSource::World(spec.world_dir.to_path_buf()),
        device: spec.device,
        config: ProtocolConfig {
            identifier: IDENTIFIER.into(),
            images_per_prompt: spec.images_per_prompt,
            seed_base: 0,
            max_prompts: spec.max_prompts,
        },
    };
    evaluate_models(&protocol, models, &|report, seconds| score(subject, report, seconds))
}

/// The world supervisor (the SD folder of `world_dir`) with a DreamBooth-LoRA adapter.
pub(crate) fn supervisor(
    world_dir: &Path,
    adapter: &Path,
    device: &str,
) -> anyhow::Result<Box<dyn Generator>> {
    Ok(Box::new(SupervisorGenerator::load(
        &world_dir.join("supervisor"),
        None,
        Some(adapter),
        device,
        supervisor_sampling(),
    )?))
}

/// A student of the world folder, with its adapter when given.
pub(crate) fn student(
    world_dir: &Path,
    which: WorldStudent,
    adapter: Option<&Path>,
    device: &str,
) -> anyhow::Result<Box<dyn Generator>> {
    Ok(Box::new(StudentGenerator::load(
        &which.files(world_dir)?,
        adapter,
        device,
        which.sampling(world_dir)?,
    )?))
}
