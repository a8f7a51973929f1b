//! What the diffusion actors share: loading the supervisor (a diffusers model folder, optionally
//! with a LoRA adapter in diffusers' layout) and sampling `(prompt, seed)` pairs into RGB images.
//! An image's initial noise depends on its seed alone ([`proxytune_models::rng::sample_noise`]), so
//! the same pair gives the same image whatever batch it is sampled in.

use std::path::Path;

use proxytune_models::device::parse_device;
use proxytune_models::diffusion::pipeline::{LoadOptions, SamplerKind, StableDiffusion};
use proxytune_models::lora::{load_lora, read_config};
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
    /// Sample with the UNet in bfloat16 (the text encoders and the VAE stay float32).
    #[serde(default)]
    pub bf16_unet: bool,
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
            bf16_unet: false,
            vae_slicing: false,
        }
    }
}

/// Loads the model folder `model_dir` (its weight files of `variant`, e.g. `fp16`, when given) on
/// `device` (`cpu`, `cuda`, `cuda:N`) to sample as `sampling` says (its UNet built in bfloat16 when
/// asked), with the LoRA adapter at `adapter` when given (its config read from
/// `lora_config.json` in the same folder).
pub fn load_supervisor(
    model_dir: &Path,
    variant: Option<&str>,
    device: &str,
    adapter: Option<&Path>,
    sampling: &SamplingConfig,
) -> Result<StableDiffusion> {
    let device = parse_device(device)?;
    let unet_kind = if sampling.bf16_unet { tch::Kind::BFloat16 } else { tch::Kind::Float };
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
