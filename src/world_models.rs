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

pub(crate) fn student_sampling(world_dir: &Path) -> anyhow::Result<StudentSampling> {
    let path = world_dir.join("student/lumina_tokens.json");
    let tokens: LuminaTokens =
        serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)
            .with_context(|| format!("{}: not Lumina structure tokens", path.display()))?;
    Ok(StudentSampling {
        grid: (SIZE / 4) as i64,
        image: ImageSampling { guidance_scale: 3.0, image_top_k: Some(64), top_p: None, temperature: 1.0 },
        tokens,
        bf16: false,
        batch: 16,
    })
}

pub(crate) fn student_lora() -> LoraConfig {
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    LoraConfig { rank: 8, alpha: 8.0, target_modules: targets.map(String::from).to_vec() }
}

/// The world's Chameleon student, its VQ decoder in its folder.
pub(crate) fn student_files(world_dir: &Path, tokens: LuminaTokens) -> StudentFiles {
    StudentFiles::chameleon(&world_dir.join("student"), tokens)
}

/// The id written into the world student's VQ token rows.
pub(crate) const TOKENIZER_ID: &str = "world-vq@1";

/// Tokenization for the world student.
pub(crate) fn tokenize_config(world_dir: &Path, device: &str, only_kept: bool) -> TokenizeConfig {
    TokenizeConfig {
        student: student_files(world_dir, LuminaTokens::default()),
        tokenizer_id: TOKENIZER_ID.into(),
        caption_encoder_id: None,
        caption_bf16: false,
        resolution: SIZE,
        device: device.into(),
        only_kept,
    }
}

/// The world student's LoRA training: `steps` steps of 8, starting once `min_rows` rows are in,
/// with a checkpoint every `checkpoint_every` steps.
pub(crate) fn student_trainer_config(
    world_dir: &Path,
    device: &str,
    output_dir: &Path,
    steps: u64,
    min_rows: usize,
    corpus_version: Option<u64>,
    checkpoint_every: u64,
) -> anyhow::Result<ArTrainerConfig> {
    Ok(ArTrainerConfig {
        student: student_files(world_dir, student_sampling(world_dir)?.tokens),
        device: device.into(),
        lora: Some(student_lora()),
        train: ArTrainConfig {
            learning_rate: 1e-3,
            lr_warmup_steps: 20,
            max_train_steps: steps,
            batch_size: 8,
            condition_dropout: 0.1,
            ..Default::default()
        },
        tokenizer_id: TOKENIZER_ID.into(),
        caption_encoder_id: None,
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

/// The student of the world folder, with its adapter when given.
pub(crate) fn student(
    world_dir: &Path,
    adapter: Option<&Path>,
    device: &str,
) -> anyhow::Result<Box<dyn Generator>> {
    let sampling = student_sampling(world_dir)?;
    Ok(Box::new(StudentGenerator::load(
        &student_files(world_dir, sampling.tokens.clone()),
        adapter,
        device,
        sampling,
    )?))
}
