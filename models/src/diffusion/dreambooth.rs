//! The DreamBooth objective (Ruiz et al. 2023) on a [`StableDiffusion`] model: the denoising loss
//! on the subject's images captioned with the identifier (`a sks dog`), plus the prior-preservation
//! loss on images of the bare class (`a dog`) weighted by `prior_loss_weight`. One optimiser step
//! per call, over the LoRA adapters (or the full UNet when there are none), with gradient
//! clipping. The VAE and text encoder stay frozen.
//!
//! Stage 1 of Proxy-Tuning. Not yet here: gradient accumulation, mixed precision, EMA, exact
//! resume and the streaming of prior images (the `SupervisorTuner` actor's job).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::pipeline::StableDiffusion;
use super::scheduler::NoiseSchedule;
use super::vae::AutoencoderKl;
use crate::error::{ModelError, Result};

/// DreamBooth hyper-parameters (DreamBooth's defaults where the Proxy-Tuning paper is silent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DreamBoothConfig {
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Weight of the prior-preservation loss (λ; DreamBooth uses 1).
    pub prior_loss_weight: f64,
    /// Gradient-norm clip.
    pub max_grad_norm: f64,
}

impl Default for DreamBoothConfig {
    fn default() -> Self {
        DreamBoothConfig {
            learning_rate: 1e-4,
            weight_decay: 1e-2,
            prior_loss_weight: 1.0,
            max_grad_norm: 1.0,
        }
    }
}

/// One training batch: pixels in `[-1, 1]` with their prompts.
#[derive(Debug)]
pub struct DreamBoothBatch<'a> {
    /// Subject images `[B, 3, H, W]`.
    pub instance_pixels: &'a Tensor,
    /// `a sks dog`.
    pub instance_prompt: &'a str,
    /// Class images `[B', 3, H, W]` for prior preservation, when used.
    pub class_pixels: Option<&'a Tensor>,
    /// `a dog`.
    pub class_prompt: &'a str,
}

/// The losses of one step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepLosses {
    /// Optimiser step number (1-based).
    pub step: u64,
    /// Instance denoising loss.
    pub instance: f64,
    /// Prior-preservation loss (0 without class images).
    pub prior: f64,
    /// `instance + λ · prior`.
    pub total: f64,
}

/// DreamBooth training state.
pub struct DreamBoothTrainer {
    config: DreamBoothConfig,
    schedule: NoiseSchedule,
    optimizer: nn::Optimizer,
    step: u64,
    contexts: HashMap<String, Tensor>,
}

impl std::fmt::Debug for DreamBoothTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DreamBoothTrainer").field("config", &self.config).field("step", &self.step).finish()
    }
}

impl DreamBoothTrainer {
    /// A trainer for `model`: its LoRA adapters when it has any, else the whole UNet.
    pub fn new(model: &mut StableDiffusion, config: DreamBoothConfig) -> Result<Self> {
        model.stores.vae.freeze();
        model.stores.text_encoder.freeze();
        let lora = !model.stores.unet_lora.variables().is_empty();
        if lora {
            model.stores.unet.freeze();
        }
        let trained = if lora { &model.stores.unet_lora } else { &model.stores.unet };
        let optimizer = nn::AdamW { wd: config.weight_decay, ..Default::default() }
            .build(trained, config.learning_rate)?;
        Ok(DreamBoothTrainer {
            schedule: NoiseSchedule::new(&model.scheduler)?,
            config,
            optimizer,
            step: 0,
            contexts: HashMap::new(),
        })
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The denoising loss of `pixels` under `prompt` at `timesteps`, with latent noise drawn from
    /// the global RNG (seed it for a reproducible evaluation).
    pub fn loss(
        model: &StableDiffusion,
        schedule: &NoiseSchedule,
        pixels: &Tensor,
        prompt: &str,
        timesteps: &[i64],
    ) -> Result<Tensor> {
        let context = tch::no_grad(|| model.encode_prompts(&[prompt]))?;
        Self::loss_with_context(model, schedule, pixels, &context, timesteps)
    }

    /// The denoising loss with a prompt already encoded (`[1, T, D]`, broadcast to the batch).
    fn loss_with_context(
        model: &StableDiffusion,
        schedule: &NoiseSchedule,
        pixels: &Tensor,
        context: &Tensor,
        timesteps: &[i64],
    ) -> Result<Tensor> {
        let b = pixels.size()[0];
        let latents = tch::no_grad(|| {
            let (mean, logvar) = model.vae.encode(pixels);
            AutoencoderKl::sample_latent(&mean, &logvar, &Tensor::randn_like(&mean))
                * model.vae.scaling_factor
        });
        let context = context.expand([b, -1, -1], false);
        let noise = Tensor::randn_like(&latents);
        let noisy = schedule.add_noise(&latents, &noise, timesteps);
        let target = schedule.target(&latents, &noise, timesteps);
        let t = Tensor::from_slice(timesteps).to_device(pixels.device());
        let pred = model.unet.forward(&noisy, &t, &context, None)?;
        Ok(pred.mse_loss(&target, tch::Reduction::Mean))
    }

    fn draw_timesteps(&self, n: i64) -> Vec<i64> {
        let max = self.schedule.alphas_cumprod().len() as i64;
        Vec::try_from(Tensor::randint(max, [n], (Kind::Int64, Device::Cpu))).unwrap_or_default()
    }

    /// The frozen text encoder's output for `prompt`, encoded once per prompt.
    fn context(&mut self, model: &StableDiffusion, prompt: &str) -> Result<Tensor> {
        if let Some(c) = self.contexts.get(prompt) {
            return Ok(c.shallow_clone());
        }
        let c = tch::no_grad(|| model.encode_prompts(&[prompt]))?;
        self.contexts.insert(prompt.to_string(), c.shallow_clone());
        Ok(c)
    }

    /// One optimiser step on `batch`, with noise and timesteps from the global RNG.
    pub fn train_step(&mut self, model: &StableDiffusion, batch: &DreamBoothBatch) -> Result<StepLosses> {
        let instance_t = self.draw_timesteps(batch.instance_pixels.size()[0]);
        let context = self.context(model, batch.instance_prompt)?;
        let instance =
            Self::loss_with_context(model, &self.schedule, batch.instance_pixels, &context, &instance_t)?;
        let (prior, total) = match batch.class_pixels {
            Some(class) => {
                let class_t = self.draw_timesteps(class.size()[0]);
                let context = self.context(model, batch.class_prompt)?;
                let prior = Self::loss_with_context(model, &self.schedule, class, &context, &class_t)?;
                let total = &instance + &prior * self.config.prior_loss_weight;
                (prior.double_value(&[]), total)
            }
            None => (0.0, instance.shallow_clone()),
        };
        let total_value = total.double_value(&[]);
        if !total_value.is_finite() {
            return Err(ModelError::NonFiniteLoss { step: self.step + 1, loss: total_value });
        }
        self.optimizer.zero_grad();
        total.backward();
        self.optimizer.clip_grad_norm(self.config.max_grad_norm);
        self.optimizer.step();
        self.step += 1;
        Ok(StepLosses { step: self.step, instance: instance.double_value(&[]), prior, total: total_value })
    }

    /// The noise schedule used for training.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
}
