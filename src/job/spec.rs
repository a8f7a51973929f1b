//! The job spec: everything one Proxy-Tuning job needs, as one typed document. The command line
//! reads it as TOML (`proxytune run job.toml`); the daemon takes the same structure as JSON. Unknown
//! keys are refused everywhere, so a misspelt setting is an error rather than a silent default.
//!
//! Defaults are published settings, not the toy world's: diffusers' DreamBooth-LoRA scripts for
//! the supervisor (rank 4 on the attention projections, learning rate 1e-4, 500 steps, prior
//! weight 1, 100 class images), the DreamBooth paper's 4 images per DreamBench prompt, and
//! Lumina-mGPT's sampling (temperature 1, guidance 4, image top-k 2000) and fine-tuning recipe
//! (learning rate 2e-5, weight decay 0.1, z-loss 1e-5) for the student. The README lists each.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Output folder: `corpus/`, `supervisor/`, `student/`, `report/`. Relative paths of the spec
    /// are resolved against the spec file's folder. (The daemon sets it to the job's folder.)
    #[serde(default)]
    pub output: PathBuf,
    /// Serve Prometheus `/metrics` on this loopback port while the job runs (absent: do not
    /// serve; 0: a free port, logged).
    #[serde(default)]
    pub metrics_port: Option<u16>,
    /// The subject to teach.
    pub subject: SubjectSpec,
    /// The diffusion supervisor and its DreamBooth tuning.
    pub supervisor: SupervisorSpec,
    /// How many proxies to generate.
    #[serde(default)]
    pub proxies: ProxiesSpec,
    /// Which proxies to keep.
    #[serde(default)]
    pub filter: FilterSpec,
    /// The autoregressive student and its tuning.
    pub student: StudentSpec,
    /// The DreamBench evaluation of supervisor and student.
    #[serde(default)]
    pub evaluation: EvaluationSpec,
    /// The device of each stage.
    #[serde(default)]
    pub devices: DevicesSpec,
}

/// The subject: its photos, class noun, identifier and prompts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectSpec {
    /// Name (the corpus's `subject` column): `[a-z0-9_-]{1,40}`.
    pub name: String,
    /// Folder of 3–6 photos (PNG or JPEG, any size; EXIF orientation applied). (The daemon also
    /// takes them uploaded.)
    #[serde(default)]
    pub photos: PathBuf,
    /// Class noun, a lower-case noun phrase (`dog`, `stuffed animal`).
    pub class_noun: String,
    /// The rare token that names the subject in prompts (`sks`); the supervisor's tokenizer must
    /// encode it.
    #[serde(default = "default_identifier")]
    pub identifier: String,
    /// Whether the subject is alive (DreamBench's `live` prompt list) or an object.
    #[serde(default)]
    pub live: bool,
    /// The prompt templates: `dreambench` (the 25 of the subject's kind), or a file of one
    /// template a line with `{}` where the subject (`identifier class_noun`) goes.
    #[serde(default)]
    pub prompts: PromptSource,
}

fn default_identifier() -> String {
    "sks".into()
}

/// Where a job's prompt templates come from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum PromptSource {
    /// DreamBench's 25 templates of the subject's kind (object or live).
    #[default]
    DreamBench,
    /// A text file: one template a line, `{}` for the subject; `#` lines are comments.
    File(PathBuf),
}

impl From<String> for PromptSource {
    fn from(s: String) -> Self {
        if s == "dreambench" {
            PromptSource::DreamBench
        } else {
            PromptSource::File(PathBuf::from(s))
        }
    }
}

impl From<PromptSource> for String {
    fn from(p: PromptSource) -> Self {
        match p {
            PromptSource::DreamBench => "dreambench".into(),
            PromptSource::File(f) => f.display().to_string(),
        }
    }
}

/// Diffusion families the supervisor can be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SupervisorFamily {
    /// Stable Diffusion 1.x (CLIP ViT-L/14 text encoder, 512 px).
    Sd1,
    /// Stable Diffusion 2.x (OpenCLIP ViT-H text encoder, 512/768 px).
    Sd2,
    /// Stable Diffusion XL (two text encoders, micro-conditioning, 1024 px).
    Sdxl,
}

impl SupervisorFamily {
    /// The family's native resolution.
    pub fn resolution(self) -> u32 {
        match self {
            SupervisorFamily::Sd1 | SupervisorFamily::Sd2 => 512,
            SupervisorFamily::Sdxl => 1024,
        }
    }

    /// Whether the family has a second text encoder.
    pub fn two_text_encoders(self) -> bool {
        self == SupervisorFamily::Sdxl
    }
}

/// Numeric precision of a stage's model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32.
    #[default]
    Fp32,
    /// float16.
    Fp16,
    /// bfloat16.
    Bf16,
}

/// The denoising scheduler used for sampling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerChoice {
    /// The folder's own `scheduler/scheduler_config.json` (DDIM or Euler discrete).
    #[default]
    Folder,
    /// DDIM.
    Ddim,
    /// Euler discrete.
    Euler,
}

/// The supervisor: a diffusers folder, how it samples, and its DreamBooth tuning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorSpec {
    /// `sd1`, `sd2` or `sdxl`.
    pub family: SupervisorFamily,
    /// The diffusers model folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, …).
    pub path: PathBuf,
    /// Weight-file variant (`fp16` reads `diffusion_pytorch_model.fp16.safetensors`).
    #[serde(default)]
    pub variant: Option<String>,
    /// Inference precision: `bf16` or `fp16` samples with the UNet built in that type (the text
    /// encoders and the VAE stay float32, as SDXL's VAE `force_upcast` asks).
    #[serde(default)]
    pub precision: Precision,
    /// Image side in pixels (default: the family's, 512 or 1024).
    #[serde(default)]
    pub resolution: Option<u32>,
    /// Sampler.
    #[serde(default)]
    pub scheduler: SchedulerChoice,
    /// Denoising steps.
    #[serde(default = "default_sampling_steps")]
    pub steps: u32,
    /// Classifier-free guidance scale.
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    /// Negative prompt.
    #[serde(default)]
    pub negative_prompt: String,
    /// Images per sampler call.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Decode (and encode) one image per VAE call: the VAE's peak memory is one image's whatever
    /// the batch (diffusers' `enable_vae_slicing`).
    #[serde(default)]
    pub vae_slicing: bool,
    /// DreamBooth tuning.
    #[serde(default)]
    pub dreambooth: DreamBoothSpec,
}

fn default_sampling_steps() -> u32 {
    30
}

fn default_guidance() -> f64 {
    7.5
}

fn default_batch() -> usize {
    4
}

impl SupervisorSpec {
    /// The resolution the job samples and trains at.
    pub fn resolution(&self) -> u32 {
        self.resolution.unwrap_or_else(|| self.family.resolution())
    }
}

/// DreamBooth-LoRA hyper-parameters (diffusers' `train_dreambooth_lora*.py` defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DreamBoothSpec {
    /// LoRA rank (ignored with `full = true`).
    pub lora_rank: i64,
    /// LoRA alpha (default: the rank, a scale of 1).
    pub lora_alpha: Option<f64>,
    /// Modules that get adapters.
    pub target_modules: Vec<String>,
    /// Fine-tune the whole UNet instead of LoRA adapters.
    pub full: bool,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Optimiser steps.
    pub steps: u64,
    /// Instance images per micro-step (and as many class images).
    pub batch: usize,
    /// Micro-steps per optimiser step.
    pub gradient_accumulation: u64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Weight of the prior-preservation loss (0: no prior preservation).
    pub prior_loss_weight: f64,
    /// Class images sampled by the untuned supervisor for prior preservation.
    pub class_images: usize,
    /// Checkpoint every this many steps (a restarted job resumes from the newest).
    pub checkpoint_every: u64,
    /// Training precision of the frozen base (`bf16` needs LoRA).
    pub precision: Precision,
    /// Recompute each UNet unit's activations in the backward instead of keeping them (less
    /// memory for one more forward; the gradients are the same).
    pub activation_checkpointing: bool,
}

impl Default for DreamBoothSpec {
    fn default() -> Self {
        DreamBoothSpec {
            lora_rank: 4,
            lora_alpha: None,
            target_modules: ["to_k", "to_q", "to_v", "to_out.0"].map(String::from).to_vec(),
            full: false,
            learning_rate: 1e-4,
            steps: 500,
            batch: 1,
            gradient_accumulation: 1,
            warmup_steps: 0,
            prior_loss_weight: 1.0,
            class_images: 100,
            checkpoint_every: 100,
            precision: Precision::Fp32,
            activation_checkpointing: false,
        }
    }
}

/// Proxy generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxiesSpec {
    /// Images per prompt (the subject prompt and every template).
    pub per_prompt: u32,
    /// Seed of the first proxy (each proxy's noise depends on its seed alone).
    pub first_seed: u64,
}

impl Default for ProxiesSpec {
    fn default() -> Self {
        // 26 prompts (the bare subject prompt and DreamBench's 25) × 40 ≈ the paper's ~1000.
        ProxiesSpec { per_prompt: 40, first_seed: 1_000_000 }
    }
}

/// The Filter's thresholds; the defaults keep every proxy (the paper filters nothing).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterSpec {
    /// Reject proxies whose fidelity to the references is below this.
    pub min_fidelity: Option<f32>,
    /// Reject proxies whose prompt adherence (CLIP-T) is below this (needs `evaluation.clip`).
    pub min_prompt_adherence: Option<f32>,
    /// Reject a proxy whose image embedding is closer than this cosine to an already-kept one.
    pub max_duplicate_cosine: Option<f32>,
}

/// Student families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StudentFamily {
    /// Meta's Chameleon (transformers layout).
    Chameleon,
    /// Lumina-mGPT (a Chameleon fine-tune; the same layout and prompt format).
    LuminaMgpt,
    /// LlamaGen's T2I GPT over its VQ-16, conditioned on Flan-T5 states of the prompt.
    Llamagen,
}

impl StudentFamily {
    /// The model family behind the job's name for it.
    pub fn model_family(self) -> proxytune_models::ar::student::StudentFamily {
        use proxytune_models::ar::student::StudentFamily as F;
        match self {
            StudentFamily::Chameleon | StudentFamily::LuminaMgpt => F::Chameleon,
            StudentFamily::Llamagen => F::LlamaGen,
        }
    }
}

/// The autoregressive student.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSpec {
    /// `chameleon`, `lumina-mgpt` or `llamagen`.
    pub family: StudentFamily,
    /// The model folder: Chameleon's (`config.json`, `model.safetensors` or shards with their
    /// index, `tokenizer.json`), or LlamaGen's GPT (`config.json` with the GPT's arguments,
    /// `model.safetensors` from `tools/convert_llamagen.py`).
    pub path: PathBuf,
    /// Chameleon: the folder holding the VQ decoder (`vq_decoder.safetensors`; default: `path`).
    /// LlamaGen: the VQ-16 folder (`config.json`, `model.safetensors`; required).
    #[serde(default)]
    pub vq_path: Option<PathBuf>,
    /// LlamaGen: the caption encoder, a transformers Flan-T5 folder (`config.json`,
    /// `model.safetensors` or shards, `tokenizer.json`); required for LlamaGen.
    #[serde(default)]
    pub text_encoder_path: Option<PathBuf>,
    /// Image side in pixels; a multiple of the VQ's downsampling factor (Lumina-mGPT 768: 768).
    #[serde(default = "default_student_resolution")]
    pub resolution: u32,
    /// Precision of the frozen base, for training (`bf16` needs LoRA) and for sampling (the
    /// adapters and the VQ decoder stay float32).
    #[serde(default)]
    pub precision: Precision,
    /// LoRA rank (ignored with `full = true`).
    #[serde(default = "default_student_rank")]
    pub lora_rank: i64,
    /// LoRA alpha (default: the rank).
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    /// Linear layers that get adapters (default: every attention and MLP projection of the
    /// family: Chameleon's `q_proj` … `down_proj`, LlamaGen's `wqkv`, `wo`, `w1`, `w2`, `w3`).
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
    /// Fine-tune every weight instead of LoRA adapters.
    #[serde(default)]
    pub full: bool,
    /// Peak learning rate.
    #[serde(default = "default_student_lr")]
    pub learning_rate: f64,
    /// Optimiser steps.
    #[serde(default = "default_student_steps")]
    pub steps: u64,
    /// Examples per micro-step.
    #[serde(default = "default_student_batch")]
    pub batch: usize,
    /// Micro-steps per optimiser step.
    #[serde(default = "one")]
    pub gradient_accumulation: u64,
    /// Linear warm-up steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Kept proxies the student waits for before its first step.
    #[serde(default = "default_rows_to_start")]
    pub rows_to_start: usize,
    /// Checkpoint every this many steps.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Recompute each decoder layer's activations in the backward instead of keeping them (less
    /// memory for one more forward; the gradients are the same).
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// Positions whose full-vocabulary logits the loss holds at once (0: the whole sequence).
    #[serde(default)]
    pub loss_chunk_tokens: usize,
    /// How the student samples.
    #[serde(default)]
    pub sampling: StudentSamplingSpec,
    /// The Lumina structure tokens, when the vocabulary does not name them (`<racm3:break>`,
    /// `<eoss>`, `<reserved08706>`, `<reserved08799>`, `<reserved08800>`).
    #[serde(default)]
    pub structure_tokens: Option<StructureTokens>,
}

/// Lumina-mGPT's structure tokens by id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructureTokens {
    /// `<s>`.
    pub bos: i64,
    /// `<reserved08706>`: ends a turn.
    pub separator: i64,
    /// `<racm3:break>`: begins an image.
    pub begin_image: i64,
    /// `<eoss>`: ends an image.
    pub end_image: i64,
    /// `<reserved08799>`: ends a row of codes.
    pub new_line: i64,
    /// `<reserved08800>`: the size token of 0 units.
    pub size_base: i64,
}

fn default_student_resolution() -> u32 {
    768
}
fn default_student_rank() -> i64 {
    8
}

fn default_student_lr() -> f64 {
    2e-5
}
fn default_student_steps() -> u64 {
    1000
}
fn default_student_batch() -> usize {
    8
}
fn one() -> u64 {
    1
}
fn default_rows_to_start() -> usize {
    16
}
fn default_checkpoint_every() -> u64 {
    100
}

/// The student's sampling (Lumina-mGPT's published defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudentSamplingSpec {
    /// Softmax temperature.
    pub temperature: f64,
    /// Top-k over image tokens (0: none).
    pub top_k: i64,
    /// Top-p (nucleus).
    pub top_p: Option<f64>,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Images sampled at once, each with its own seed (twice the rows with guidance): one forward
    /// a token for the whole batch.
    pub batch: usize,
}

impl Default for StudentSamplingSpec {
    fn default() -> Self {
        StudentSamplingSpec { temperature: 1.0, top_k: 2000, top_p: None, guidance: 4.0, batch: 16 }
    }
}

/// The DreamBench evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluationSpec {
    /// A DINO folder (transformers `ViTModel` layout); scored as `DINO` when given.
    pub dino: Option<PathBuf>,
    /// A CLIP folder (transformers `CLIPModel` layout); CLIP-I and CLIP-T when given.
    pub clip: Option<PathBuf>,
    /// Images per prompt (DreamBench: 4).
    pub images_per_prompt: usize,
    /// Evaluate only the first this many prompts.
    pub prompts: Option<usize>,
    /// Skip the evaluation.
    pub skip: bool,
    /// Baselines trained and evaluated beside the Proxy-Tuned student (`direct-lora`,
    /// `direct-lora-augmented`, `direct-full`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub baselines: Vec<Baseline>,
}

/// A baseline the report shows beside Proxy-Tuning. (Every one is a direct tuning today; the names
/// are the spec's.)
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Baseline {
    /// The student's LoRA trained directly on the subject's reference photos (no supervisor, no
    /// proxies) with the instance prompt, the same trainer, steps and batch as the Proxy-Tuned
    /// student: the paper's "direct subject-tuning".
    #[serde(rename = "direct-lora")]
    DirectLora,
    /// The same on augmented copies of the references (horizontal flips, rotations within ±5°,
    /// square crops of 90–100 % of the side): the augmentations the paper's ablation names.
    #[serde(rename = "direct-lora-augmented")]
    DirectLoraAugmented,
    /// Every weight of the student fine-tuned on the references (the paper's end-to-end direct
    /// tuning), with the same optimiser settings, steps and batch.
    #[serde(rename = "direct-full")]
    DirectFull,
}

impl Baseline {
    /// Every baseline, in the order the report shows them.
    pub const ALL: [Baseline; 3] =
        [Baseline::DirectLora, Baseline::DirectLoraAugmented, Baseline::DirectFull];

    /// Its name in the spec and `report.json`.
    pub fn name(self) -> &'static str {
        match self {
            Baseline::DirectLora => "direct-lora",
            Baseline::DirectLoraAugmented => "direct-lora-augmented",
            Baseline::DirectFull => "direct-full",
        }
    }

    /// Its folder under the job's output folder.
    pub fn dir(self) -> &'static str {
        match self {
            Baseline::DirectLora => "student_direct",
            Baseline::DirectLoraAugmented => "student_direct_augmented",
            Baseline::DirectFull => "student_direct_full",
        }
    }

    /// Its row label in the report.
    pub fn label(self) -> &'static str {
        match self {
            Baseline::DirectLora => "student (direct LoRA on the references)",
            Baseline::DirectLoraAugmented => "student (direct LoRA on augmented references)",
            Baseline::DirectFull => "student (direct full fine-tune on the references)",
        }
    }

    /// The `model` label of its metric series.
    pub fn metric_model(self) -> &'static str {
        match self {
            Baseline::DirectLora => "student_direct_lora",
            Baseline::DirectLoraAugmented => "student_direct_lora_augmented",
            Baseline::DirectFull => "student_direct_full",
        }
    }

    /// Augmented copies of each reference it trains on (none: the references themselves).
    pub fn copies_per_reference(self) -> usize {
        match self {
            Baseline::DirectLora | Baseline::DirectFull => 0,
            Baseline::DirectLoraAugmented => 8,
        }
    }

    /// Whether it fine-tunes every weight instead of LoRA adapters.
    pub fn full(self) -> bool {
        self == Baseline::DirectFull
    }
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec {
            dino: None,
            clip: None,
            images_per_prompt: 4,
            prompts: None,
            skip: false,
            baselines: Vec::new(),
        }
    }
}

/// The device of each stage (`auto`, `cpu`, `cuda`, `cuda:N`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesSpec {
    /// Class priors, DreamBooth and proxy generation.
    pub supervisor: String,
    /// Tokenization and the student's training.
    pub student: String,
    /// The Filter's and the evaluation's encoders.
    pub scorers: String,
    /// Let float32 matrix products on CUDA use TF32 tensor cores (PyTorch's
    /// `torch.backends.cuda.matmul.allow_tf32`); bf16 work is unaffected, and so is the CPU.
    pub tf32: bool,
    /// Threads each torch call may use while the pipeline runs (libtorch's intra-op threads).
    /// Absent: half the cores, at least one, when a stage runs on the CPU (the sampler and the
    /// student compute at the same time; a team of threads per core for each oversubscribes the
    /// cores), else one per core. The evaluation, which runs alone, always uses one per core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_threads: Option<usize>,
}

impl Default for DevicesSpec {
    fn default() -> Self {
        let auto = || "auto".to_string();
        DevicesSpec { supervisor: auto(), student: auto(), scorers: auto(), tf32: true, cpu_threads: None }
    }
}

impl JobSpec {
    /// Parses a TOML spec; errors name the file, the line and the key.
    pub fn from_toml(text: &str, path: &Path) -> anyhow::Result<Self> {
        let mut spec: JobSpec =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        spec.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(spec)
    }

    /// Reads and parses the TOML spec at `path`.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read the job spec: {e}", path.display()))?;
        Self::from_toml(&text, path)
    }

    /// Makes every relative path of the spec relative to `base` (the spec file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.output);
        fix(&mut self.subject.photos);
        if let PromptSource::File(f) = &mut self.subject.prompts {
            fix(f);
        }
        fix(&mut self.supervisor.path);
        fix(&mut self.student.path);
        for p in [&mut self.student.vq_path, &mut self.student.text_encoder_path].into_iter().flatten() {
            fix(p);
        }
        for p in [&mut self.evaluation.dino, &mut self.evaluation.clip].into_iter().flatten() {
            fix(p);
        }
    }

    /// The folder that holds the student's VQ decoder.
    pub fn vq_dir(&self) -> &Path {
        self.student.vq_path.as_deref().unwrap_or(&self.student.path)
    }

    /// The student's LoRA target modules: the spec's, else the family's attention and MLP
    /// projections.
    pub fn student_targets(&self) -> Vec<String> {
        if let Some(t) = &self.student.target_modules {
            return t.clone();
        }
        let names: &[&str] = match self.student.family {
            StudentFamily::Chameleon | StudentFamily::LuminaMgpt => {
                &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            }
            StudentFamily::Llamagen => &["wqkv", "wo", "w1", "w2", "w3"],
        };
        names.iter().map(|n| n.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        output = "out"
        [subject]
        name = "rex"
        photos = "photos"
        class_noun = "dog"
        live = true
        [supervisor]
        family = "sdxl"
        path = "/models/sdxl"
        [student]
        family = "lumina-mgpt"
        path = "/models/lumina"
    "#;

    #[test]
    fn a_minimal_spec_takes_published_defaults_and_resolves_relative_paths() {
        let spec = JobSpec::from_toml(MINIMAL, Path::new("/jobs/rex/job.toml")).unwrap();
        assert_eq!(spec.output, PathBuf::from("/jobs/rex/out"));
        assert_eq!(spec.subject.photos, PathBuf::from("/jobs/rex/photos"));
        assert_eq!(spec.supervisor.path, PathBuf::from("/models/sdxl"));
        assert_eq!(spec.supervisor.resolution(), 1024);
        assert_eq!(spec.subject.identifier, "sks");
        assert_eq!(spec.subject.prompts, PromptSource::DreamBench);
        assert_eq!(spec.supervisor.dreambooth.lora_rank, 4);
        assert_eq!(spec.supervisor.dreambooth.learning_rate, 1e-4);
        assert_eq!(spec.student.sampling, StudentSamplingSpec::default());
        assert_eq!(spec.student.sampling.top_k, 2000);
        assert_eq!(spec.vq_dir(), Path::new("/models/lumina"));
        assert_eq!(spec.filter, FilterSpec::default());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let bad = MINIMAL.replace("live = true", "live = true\nclass_nuon = \"dog\"");
        let err = JobSpec::from_toml(&bad, Path::new("job.toml")).unwrap_err().to_string();
        assert!(err.contains("job.toml") && err.contains("class_nuon"), "{err}");
        let bad = MINIMAL.replace("[student]", "[student]\nsampling = { temprature = 1.0 }");
        let err = JobSpec::from_toml(&bad, Path::new("job.toml")).unwrap_err().to_string();
        assert!(err.contains("temprature"), "{err}");
    }

    #[test]
    fn a_spec_round_trips_through_json_as_the_daemon_takes_it() {
        let spec = JobSpec::from_toml(MINIMAL, Path::new("/j/job.toml")).unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        let back: JobSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        let prompts = MINIMAL.replace("live = true", "live = true\nprompts = \"my_prompts.txt\"");
        let spec = JobSpec::from_toml(&prompts, Path::new("/j/job.toml")).unwrap();
        assert_eq!(spec.subject.prompts, PromptSource::File("/j/my_prompts.txt".into()));
    }

    #[test]
    fn the_readme_examples_are_valid_specs() {
        let readme = include_str!("../../README.md");
        let section = readme.split("## Job spec").nth(1).unwrap().split("\n## ").next().unwrap();
        let blocks: Vec<&str> =
            section.split("```toml\n").skip(1).map(|b| b.split("```").next().unwrap()).collect();
        assert_eq!(blocks.len(), 2);
        let sdxl = JobSpec::from_toml(blocks[0], Path::new("/j/job.toml")).unwrap();
        assert_eq!(sdxl.supervisor.family, SupervisorFamily::Sdxl);
        assert_eq!(sdxl.student.family, StudentFamily::LuminaMgpt);
        assert_eq!(sdxl.devices.student, "cuda:1");
        assert_eq!(sdxl.filter.max_duplicate_cosine, Some(0.995));
        let sd = JobSpec::from_toml(blocks[1], Path::new("/j/job.toml")).unwrap();
        assert_eq!((sd.supervisor.family, sd.supervisor.resolution()), (SupervisorFamily::Sd1, 512));
        assert_eq!(sd.student.family, StudentFamily::Chameleon);
        assert_eq!(sd.supervisor.dreambooth, DreamBoothSpec::default());
    }
}
