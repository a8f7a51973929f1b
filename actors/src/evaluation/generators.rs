//! The two models the DreamBench protocol compares, as [`Generator`]s: the supervisor (a diffusers
//! model folder, optionally with a DreamBooth LoRA) and the student (a Chameleon / Lumina-mGPT
//! folder, optionally with a LoRA adapter, its `tokenizer.json` and VQ decoder). Both draw every
//! image's randomness from its seed alone, so every model gets the same seeds.

use std::path::Path;

use proxytune_models::ar::chameleon_vq::ChameleonVqDecoder;
use proxytune_models::ar::lumina::{sample_image_tokens_batch, t2i_instruction, ImageSampling, LuminaTokens};
use proxytune_models::ar::train::ChameleonStudent;
use proxytune_models::diffusion::pipeline::StableDiffusion;
use proxytune_models::lora::{load_lora, read_config};
use proxytune_models::tokenizer::hf::HfTokenizer;
use proxytune_models::weights::{load_safetensors, Strictness};
use proxytune_schemas::ModelRole;
use tch::{Device, Tensor};

use crate::error::Result;
use crate::evaluation::dreambench::Generator;
use crate::stages::diffusion_sampling::{load_supervisor, sample_images, SamplingConfig};
use crate::stages::intake::{images_to_square_batch, SubjectEntry};

/// The supervisor: Stable Diffusion with its subject adapter.
pub struct SupervisorGenerator {
    model: StableDiffusion,
    sampling: SamplingConfig,
    version: String,
}

impl SupervisorGenerator {
    /// Loads `model_dir` (its weight files of `variant` when given) with the LoRA at `adapter` (its
    /// `lora_config.json` beside it).
    pub fn load(
        model_dir: &Path,
        variant: Option<&str>,
        adapter: Option<&Path>,
        device: &str,
        sampling: SamplingConfig,
    ) -> Result<Self> {
        let version = match adapter {
            Some(a) => format!("{}+{}", model_dir.display(), a.display()),
            None => model_dir.display().to_string(),
        };
        Ok(SupervisorGenerator {
            model: load_supervisor(model_dir, variant, device, adapter, &sampling)?,
            sampling,
            version,
        })
    }
}

impl Generator for SupervisorGenerator {
    fn role(&self) -> ModelRole {
        ModelRole::Supervisor
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    fn generate(&mut self, _subject: &SubjectEntry, prompt: &str, seeds: &[u64]) -> Result<Tensor> {
        let prompts = vec![prompt; seeds.len()];
        let images = sample_images(&self.model, &prompts, seeds, &self.sampling)?;
        images_to_square_batch(&images, self.sampling.resolution as i64, Device::Cpu)
    }
}

/// How the student samples an image.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSampling {
    /// Code grid side (rows = columns).
    pub grid: i64,
    /// Guidance, top-k, temperature.
    #[serde(default)]
    pub image: ImageSampling,
    /// Structure tokens.
    #[serde(default)]
    pub tokens: LuminaTokens,
    /// Sample with the decoder's weights in bfloat16 (its adapters and the VQ decoder stay float32).
    #[serde(default)]
    pub bf16: bool,
    /// Images sampled at once, each with its own seed (twice the rows with guidance).
    #[serde(default = "default_batch")]
    pub batch: usize,
}

fn default_batch() -> usize {
    16
}

/// The student: a Chameleon / Lumina-mGPT model with its adapter, text tokenizer and VQ decoder.
pub struct StudentGenerator {
    student: ChameleonStudent,
    tokenizer: HfTokenizer,
    decoder: ChameleonVqDecoder,
    _decoder_vs: tch::nn::VarStore,
    sampling: StudentSampling,
    version: String,
}

impl StudentGenerator {
    /// Loads `dir` (`config.json`, `model.safetensors`, `tokenizer.json`, `vq_decoder.safetensors`)
    /// with the PEFT-layout LoRA at `adapter` (its `lora_config.json` beside it).
    pub fn load(dir: &Path, adapter: Option<&Path>, device: &str, sampling: StudentSampling) -> Result<Self> {
        Self::load_with_vq(dir, dir, adapter, device, sampling)
    }

    /// Like [`StudentGenerator::load`], with the VQ decoder (`vq_decoder.safetensors`) read from
    /// `vq_dir`.
    pub fn load_with_vq(
        dir: &Path,
        vq_dir: &Path,
        adapter: Option<&Path>,
        device: &str,
        sampling: StudentSampling,
    ) -> Result<Self> {
        let device = proxytune_models::device::parse_device(device)?;
        let lora = match adapter {
            Some(a) => Some(read_config(a)?),
            None => None,
        };
        let kind = if sampling.bf16 { tch::Kind::BFloat16 } else { tch::Kind::Float };
        let mut student =
            ChameleonStudent::load_in(dir, device, lora.as_ref(), sampling.tokens.clone(), kind)?;
        if let (Some(a), Some(cfg)) = (adapter, &lora) {
            load_lora(&mut student.adapters, cfg, "base_model.model", a)?;
        }
        student.base.freeze();
        let mut decoder_vs = tch::nn::VarStore::new(device);
        let decoder = ChameleonVqDecoder::new(decoder_vs.root(), student.model.vq.config())?;
        load_safetensors(&mut decoder_vs, &vq_dir.join("vq_decoder.safetensors"), Strictness::Strict)?;
        let tokenizer = HfTokenizer::from_file(&dir.join("tokenizer.json"))?;
        let version = match adapter {
            Some(a) => format!("{}+{}", dir.display(), a.display()),
            None => dir.display().to_string(),
        };
        Ok(StudentGenerator { student, tokenizer, decoder, _decoder_vs: decoder_vs, sampling, version })
    }
}

impl Generator for StudentGenerator {
    fn role(&self) -> ModelRole {
        ModelRole::Student
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    fn generate(&mut self, _subject: &SubjectEntry, prompt: &str, seeds: &[u64]) -> Result<Tensor> {
        let s = &self.sampling;
        let side = (s.grid * self.student.model.vq.downsample_factor()) as u32;
        let text = self.tokenizer.encode(&t2i_instruction(prompt, side, side))?;
        let prompt_ids = s.tokens.prompt_ids(&text);
        let mut images = Vec::with_capacity(seeds.len());
        for chunk in seeds.chunks(s.batch.max(1)) {
            let prompts = vec![prompt_ids.as_slice(); chunk.len()];
            let grids = tch::no_grad(|| {
                sample_image_tokens_batch(
                    &self.student.model,
                    &s.tokens,
                    &prompts,
                    s.grid,
                    s.grid,
                    &s.image,
                    chunk,
                )
            })?;
            let mut codes = Vec::with_capacity(grids.len() * (s.grid * s.grid) as usize);
            for tokens in &grids {
                codes.extend(self.student.model.image_vocab.tokens_to_codes(tokens)?);
            }
            let codes = Tensor::from_slice(&codes)
                .view([chunk.len() as i64, s.grid, s.grid])
                .to_device(self.student.model.device());
            let pixels = tch::no_grad(|| self.decoder.decode(&codes))?; // [B, 3, H, W] in about [-1, 1]
            images.push(((pixels + 1.0) / 2.0).clamp(0.0, 1.0).to_device(Device::Cpu));
        }
        Ok(Tensor::cat(&images, 0))
    }
}
