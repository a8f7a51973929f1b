//! What the diffusion actors share: loading the supervisor (a diffusers model folder, optionally
//! with a LoRA adapter in diffusers' layout), one copy of it for the class-prior sampler and the
//! tuner ([`SharedSupervisor`]), and sampling `(prompt, seed)` pairs into RGB images. An image's
//! initial noise depends on its seed alone ([`proxytune_models::rng::sample_noise`]), so the same
//! pair gives the same image whatever batch it is sampled in.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use proxytune_models::device::parse_device;
use proxytune_models::diffusion::pipeline::{LoadOptions, SamplerKind, StableDiffusion};
use proxytune_models::lora::{load_lora, read_config, LoraConfig};
use proxytune_models::rng::sample_noise;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Error, Result};

/// How images are sampled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Denoising steps.
    pub num_inference_steps: i64,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// Sampler.
    pub sampler: SamplerKind,
    /// Image side in pixels.
    pub resolution: u32,
    /// The negative (unconditional) prompt.
    pub negative_prompt: String,
    /// Images per sampler call (and per emitted batch).
    pub batch_images: usize,
    /// The UNet's weights' element type (the text encoders and the VAE stay float32, which is
    /// what SDXL's VAE `force_upcast` asks for).
    #[serde(default)]
    pub unet_precision: UnetPrecision,
    /// Decode one image per VAE call (diffusers' VAE slicing): the decode's peak memory is one
    /// image's, whatever the batch.
    #[serde(default)]
    pub vae_slicing: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            num_inference_steps: 30,
            guidance_scale: 7.5,
            sampler: SamplerKind::Ddim,
            resolution: 512,
            negative_prompt: String::new(),
            batch_images: 4,
            unet_precision: UnetPrecision::Fp32,
            vae_slicing: false,
        }
    }
}

/// The element type of a sampling UNet's weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnetPrecision {
    /// float32.
    #[default]
    Fp32,
    /// bfloat16: float32's range, 8 bits of mantissa.
    Bf16,
    /// float16: 11 bits of mantissa, a range to 65,504 (SD 1.x and SDXL UNets sample in it in
    /// diffusers; their VAEs may not, and stay float32 here).
    Fp16,
}

impl UnetPrecision {
    /// The tensor kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            UnetPrecision::Fp32 => tch::Kind::Float,
            UnetPrecision::Bf16 => tch::Kind::BFloat16,
            UnetPrecision::Fp16 => tch::Kind::Half,
        }
    }
}

/// Loads the model folder `model_dir` (its weight files of `variant`, e.g. `fp16`, when given) on
/// `device` (`cpu`, `cuda`, `cuda:N`) to sample as `sampling` says (its UNet built directly in its
/// precision), with the LoRA adapter at `adapter` when given (its config read from
/// `lora_config.json` in the same folder).
pub fn load_supervisor(
    model_dir: &Path,
    variant: Option<&str>,
    device: &str,
    adapter: Option<&Path>,
    sampling: &SamplingConfig,
) -> Result<StableDiffusion> {
    let device = parse_device(device)?;
    let unet_kind = sampling.unet_precision.kind();
    let options = LoadOptions { lora: None, variant, unet_kind };
    let vae_batch = sampling.vae_slicing.then_some(1);
    let Some(adapter) = adapter else {
        let mut sd = StableDiffusion::load_with(model_dir, device, &options)?;
        sd.vae_batch = vae_batch;
        return Ok(sd);
    };
    let lora = read_config(adapter)?;
    let mut sd =
        StableDiffusion::load_with(model_dir, device, &LoadOptions { lora: Some(&lora), ..options })?;
    load_lora(&mut sd.stores.unet_lora, &lora, "unet", adapter)?;
    sd.vae_batch = vae_batch;
    Ok(sd)
}

/// A supervisor an actor holds: its own copy, or the one it shares (locked for each use).
pub type SupervisorCopy = Arc<Mutex<StableDiffusion>>;

/// Locks `copy` for one use (a sampler call, a training step). A poisoned lock means the other
/// stage sharing it panicked mid-use: an error, not a second panic.
pub fn lock(copy: &SupervisorCopy) -> Result<MutexGuard<'_, StableDiffusion>> {
    copy.lock().map_err(|_| Error::Operator {
        message: "the supervisor copy is unusable: the stage sharing it failed while using it".into(),
    })
}

/// One copy of the supervisor for the class-prior sampler and the supervisor tuner, which run at
/// the same time: the tuner trains LoRA adapters on it while the sampler draws the class priors
/// from it with the adapters off ([`StableDiffusion::without_adapters`]: the untuned model, bit
/// for bit). Each takes the lock for one sampler call or one training step. The first to ask
/// loads it with the tuner's settings; it is freed when both have let it go.
#[derive(Clone)]
pub struct SharedSupervisor(Arc<Shared>);

struct Shared {
    model_dir: PathBuf,
    variant: Option<String>,
    device: String,
    lora: Option<LoraConfig>,
    unet_kind: tch::Kind,
    vae_slicing: bool,
    loaded: Mutex<Weak<Mutex<StableDiffusion>>>,
}

impl std::fmt::Debug for SharedSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.0;
        f.debug_struct("SharedSupervisor")
            .field("model_dir", &s.model_dir)
            .field("device", &s.device)
            .field("unet_kind", &s.unet_kind)
            .field("loaded", &(s.loaded.lock().map(|w| w.strong_count() > 0).unwrap_or(false)))
            .finish()
    }
}

impl SharedSupervisor {
    /// One copy for `sampler` and `tuner` when they can share it: the same folder, variant and
    /// device, a tuner that trains LoRA adapters (full fine-tuning changes the base the sampler
    /// needs), a UNet of one precision for both, and the same VAE slicing. Otherwise why not.
    pub fn for_stages(
        sampler: &crate::stages::class_prior_sampler::ClassPriorConfig,
        tuner: &crate::stages::supervisor_tuner::SupervisorTunerConfig,
    ) -> std::result::Result<Self, String> {
        let sampler_kind = sampler.sampling.unet_precision.kind();
        let tuner_kind = tuner.dreambooth.precision.kind();
        if tuner.lora.is_none() {
            return Err("the tuner fine-tunes the whole UNet, which the class priors must not see".into());
        }
        if (&sampler.model_dir, &sampler.variant, &sampler.device)
            != (&tuner.model_dir, &tuner.variant, &tuner.device)
        {
            return Err("the class-prior sampler and the tuner load different folders or devices".into());
        }
        if sampler_kind != tuner_kind {
            return Err(format!(
                "the sampler's UNet is {sampler_kind:?} and the tuner's {tuner_kind:?} (supervisor.precision against supervisor.dreambooth.precision)"
            ));
        }
        if sampler.sampling.vae_slicing != tuner.vae_slicing {
            return Err("the sampler and the tuner slice the VAE differently".into());
        }
        Ok(SharedSupervisor::for_tuner(tuner))
    }

    /// The tuner's model as `tuner` loads it (its LoRA adapters, its training precision's UNet,
    /// its VAE slicing); shared only when handed to the sampler too, else the tuner's own copy.
    pub fn for_tuner(tuner: &crate::stages::supervisor_tuner::SupervisorTunerConfig) -> Self {
        SharedSupervisor(Arc::new(Shared {
            model_dir: tuner.model_dir.clone(),
            variant: tuner.variant.clone(),
            device: tuner.device.clone(),
            lora: tuner.lora.clone(),
            // A bf16 run's frozen UNet is built in bfloat16, never in float32.
            unet_kind: tuner.dreambooth.precision.kind(),
            vae_slicing: tuner.vae_slicing,
            loaded: Mutex::new(Weak::new()),
        }))
    }

    /// The copy: the one loaded already while either stage holds it, or a fresh load (on the
    /// calling actor's thread; the other caller waits for it).
    pub fn get(&self) -> Result<SupervisorCopy> {
        let s = &self.0;
        let mut loaded = s.loaded.lock().map_err(|_| Error::Operator {
            message: "the shared supervisor's load failed in another stage".into(),
        })?;
        if let Some(copy) = loaded.upgrade() {
            return Ok(copy);
        }
        let options =
            LoadOptions { lora: s.lora.as_ref(), variant: s.variant.as_deref(), unet_kind: s.unet_kind };
        let mut sd = StableDiffusion::load_with(&s.model_dir, parse_device(&s.device)?, &options)?;
        sd.vae_batch = s.vae_slicing.then_some(1);
        let copy = Arc::new(Mutex::new(sd));
        *loaded = Arc::downgrade(&copy);
        Ok(copy)
    }
}

/// Samples one image per `(prompt, seed)` pair, in one sampler call.
pub fn sample_images(
    sd: &StableDiffusion,
    prompts: &[&str],
    seeds: &[u64],
    config: &SamplingConfig,
) -> Result<Vec<image::RgbImage>> {
    if prompts.len() != seeds.len() || prompts.is_empty() {
        return Err(Error::Operator {
            message: format!("{} prompts for {} seeds", prompts.len(), seeds.len()),
        });
    }
    let side = config.resolution as i64;
    let shape = sd.latent_shape(side, side)?;
    let noise: Vec<Tensor> = seeds.iter().map(|&s| sample_noise(s, &shape, sd.device())).collect();
    let negative = vec![config.negative_prompt.as_str(); prompts.len()];
    let images = sd.sample(
        prompts,
        &negative,
        &Tensor::cat(&noise, 0),
        config.num_inference_steps,
        config.guidance_scale,
        config.sampler,
    )?;
    (0..prompts.len() as i64).map(|i| crate::stages::intake::tensor_to_rgb(&images.get(i))).collect()
}
