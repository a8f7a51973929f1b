//! DreamBooth (Ruiz et al. 2023) on a [`StableDiffusion`] model, as stage 1 of Proxy-Tuning: the
//! denoising loss on the subject's images captioned with the identifier (`a sks dog`), plus the
//! prior-preservation loss on images of the bare class (`a dog`) sampled by the untuned model,
//! weighted by `prior_loss_weight`. The optimiser works on the LoRA adapters (or on the whole UNet
//! when the model has none); the VAE and the text encoder stay frozen.
//!
//! The loop is the one diffusers' `train_dreambooth_lora.py` runs: AdamW, linear warm-up then a
//! constant learning rate, gradient accumulation, gradient-norm clipping, optional EMA of the
//! trained weights, validation prompts sampled with fixed seeds every N steps, and bf16 mixed
//! precision (the frozen UNet in bfloat16, the adapters and optimiser state in float32).
//!
//! **Streaming priors.** Class images arrive while training runs ([`DreamBoothTrainer::add_class_images`]);
//! micro-step `k` uses class images `k·B .. k·B+B` (mod the planned pool size), so a step can run as
//! soon as the images it needs exist ([`DreamBoothTrainer::ready`]) and the result does not depend on
//! how fast they arrived.
//!
//! **Exact resume.** Every random draw of micro-step `k` comes from `(seed, k)` ([`crate::rng`]), the
//! instance order from a per-epoch shuffle of `(seed, epoch)`, and the optimiser and EMA state are
//! named tensors. A checkpoint folder (`checkpoint-<step>/`) holds the trained weights, the
//! optimiser moments, the EMA, the LoRA in diffusers' layout and `state.json` (step, RNG counter,
//! data position, config); resuming from it continues bit-identically on the CPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::pipeline::{Conditioning, SamplerKind, StableDiffusion};
use super::scheduler::NoiseSchedule;
use super::vae::AutoencoderKl;
use crate::checkpoint;
use crate::error::{ModelError, Result};
use crate::lora::{reset_lora, save_lora};
use crate::optim::{AdamW, AdamWConfig, Ema};
use crate::rng::{sample_noise, Draws, Stream};

/// Numeric precision of training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in float32.
    #[default]
    F32,
    /// The frozen UNet in bfloat16; adapters, gradients and optimiser state in float32 (LoRA only).
    Bf16,
}

impl Precision {
    /// The element kind of the frozen weights.
    pub fn kind(self) -> tch::Kind {
        match self {
            Precision::F32 => tch::Kind::Float,
            Precision::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// A micro-step's loss: on its graph, or already back-propagated (activation checkpointing).
enum Loss {
    Graph(Tensor),
    Done(f64),
}

impl Loss {
    fn value(&self) -> f64 {
        match self {
            Loss::Graph(t) => t.double_value(&[]),
            Loss::Done(v) => *v,
        }
    }
}

/// Validation sampling during training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Prompts (with the identifier, e.g. `a sks dog on the beach`).
    pub prompts: Vec<String>,
    /// Seeds; every prompt is sampled once per seed.
    pub seeds: Vec<u64>,
    /// Sample after every this many optimiser steps.
    pub every_steps: u64,
    /// Denoising steps.
    pub num_inference_steps: i64,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// Sampler.
    pub sampler: SamplerKind,
    /// Image side in pixels.
    pub resolution: i64,
}

/// DreamBooth hyper-parameters (diffusers' DreamBooth-LoRA defaults where the Proxy-Tuning paper
/// is silent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DreamBoothConfig {
    /// Instance prompt, e.g. `a sks dog`.
    pub instance_prompt: String,
    /// Class prompt, e.g. `a dog`.
    pub class_prompt: String,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW moments and weight decay.
    pub adam: AdamWConfig,
    /// Linear warm-up length in optimiser steps (0: constant from the start).
    pub lr_warmup_steps: u64,
    /// Optimiser steps to train.
    pub max_train_steps: u64,
    /// Instance images per micro-step (and as many class images).
    pub train_batch_size: usize,
    /// Micro-steps per optimiser step.
    pub gradient_accumulation_steps: u64,
    /// Gradient-norm clip.
    pub max_grad_norm: f64,
    /// Weight λ of the prior-preservation loss.
    pub prior_loss_weight: f64,
    /// Size of the class-image pool (0: no prior preservation).
    pub num_class_images: usize,
    /// EMA decay of the trained weights (`None`: no EMA).
    pub ema_decay: Option<f64>,
    /// Precision.
    pub precision: Precision,
    /// Seed of every random draw.
    pub seed: u64,
    /// Write a checkpoint every this many optimiser steps (0: only when asked).
    pub checkpoint_every: u64,
    /// Checkpoints to keep (older ones are deleted; at least 1).
    pub checkpoints_to_keep: usize,
    /// Validation sampling.
    pub validation: Option<ValidationConfig>,
    /// Recompute each UNet unit's activations in the backward instead of keeping them
    /// ([`crate::recompute`]; diffusers' `--gradient_checkpointing`).
    pub activation_checkpointing: bool,
}

impl Default for DreamBoothConfig {
    fn default() -> Self {
        DreamBoothConfig {
            instance_prompt: "a sks dog".into(),
            class_prompt: "a dog".into(),
            learning_rate: 1e-4,
            adam: AdamWConfig::default(),
            lr_warmup_steps: 0,
            max_train_steps: 500,
            train_batch_size: 1,
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            prior_loss_weight: 1.0,
            num_class_images: 100,
            ema_decay: None,
            precision: Precision::F32,
            seed: 0,
            checkpoint_every: 0,
            checkpoints_to_keep: 2,
            validation: None,
            activation_checkpointing: false,
        }
    }
}

impl DreamBoothConfig {
    fn validate(&self) -> Result<()> {
        let bad = |what: &str, message: &str| {
            Err(ModelError::Config { what: format!("dreambooth.{what}"), message: message.into() })
        };
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad("learning_rate", "must be a positive number");
        }
        if self.train_batch_size == 0 {
            return bad("train_batch_size", "must be at least 1");
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be at least 1");
        }
        if self.max_grad_norm <= 0.0 {
            return bad("max_grad_norm", "must be positive");
        }
        if let Some(d) = self.ema_decay {
            if !(0.0..1.0).contains(&d) {
                return bad("ema_decay", "must be in [0, 1)");
            }
        }
        if let Some(v) = &self.validation {
            if v.every_steps == 0 || v.prompts.is_empty() || v.seeds.is_empty() {
                return bad("validation", "needs every_steps > 0, at least one prompt and one seed");
            }
        }
        Ok(())
    }
}

/// The losses and optimiser figures of one optimiser step (means over its micro-steps).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLosses {
    /// Optimiser step number (1-based).
    pub step: u64,
    /// Instance denoising loss.
    pub instance: f64,
    /// Prior-preservation loss (0 without class images).
    pub prior: f64,
    /// `instance + λ · prior`.
    pub total: f64,
    /// Learning rate the step used.
    pub learning_rate: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// One validation image.
#[derive(Debug)]
pub struct ValidationImage {
    /// Its prompt.
    pub prompt: String,
    /// Its seed.
    pub seed: u64,
    /// `[3, H, W]` in `[0, 1]`.
    pub image: Tensor,
}

/// What `state.json` of a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    /// Format version.
    pub format: u32,
    /// Optimiser steps taken.
    pub step: u64,
    /// RNG position: the next micro-step's counter (draws are a function of seed and counter).
    pub next_micro_step: u64,
    /// Data position: instance samples consumed (index into the per-epoch shuffled order).
    pub instance_samples_seen: u64,
    /// Data position: class samples consumed.
    pub class_samples_seen: u64,
    /// EMA updates so far.
    pub ema_updates: u64,
    /// Whether the trained weights are LoRA adapters.
    pub lora: bool,
    /// The config the run was started with.
    pub config: DreamBoothConfig,
    /// The last step's losses.
    pub last: Option<StepLosses>,
}

const CHECKPOINT_FORMAT: u32 = 1;
/// The LoRA file in diffusers' layout (`load_lora_weights` reads this name from a folder).
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// Encoded latent distributions of images (the VAE is frozen, so each image is encoded once).
#[derive(Debug)]
struct Encoded {
    mean: Tensor,
    logvar: Tensor,
}

impl Encoded {
    fn rows(&self, idx: &[i64]) -> (Tensor, Tensor) {
        let i = Tensor::from_slice(idx).to_device(self.mean.device());
        (self.mean.index_select(0, &i), self.logvar.index_select(0, &i))
    }
}

/// DreamBooth training state.
pub struct DreamBoothTrainer {
    config: DreamBoothConfig,
    schedule: NoiseSchedule,
    optimizer: AdamW,
    ema: Option<Ema>,
    lora: bool,
    step: u64,
    contexts: HashMap<String, Conditioning>,
    instance: Option<Encoded>,
    class_pool: Vec<Encoded>,
    class_closed: bool,
    last: Option<StepLosses>,
}

impl std::fmt::Debug for DreamBoothTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DreamBoothTrainer").field("config", &self.config).field("step", &self.step).finish()
    }
}

impl DreamBoothTrainer {
    /// A trainer for `model`: its LoRA adapters when it has any (re-initialised from the seed), else
    /// the whole UNet. Under
    /// [`Precision::Bf16`] the frozen UNet is converted to bfloat16 here.
    pub fn new(model: &mut StableDiffusion, config: DreamBoothConfig) -> Result<Self> {
        config.validate()?;
        model.stores.vae.freeze();
        model.stores.text_encoder.freeze();
        let lora = !model.stores.unet_lora.variables().is_empty();
        if lora {
            model.stores.unet.freeze();
        }
        if config.precision == Precision::Bf16 {
            if !lora {
                return Err(ModelError::Config {
                    what: "dreambooth.precision".into(),
                    message: "bf16 trains LoRA adapters over a bfloat16 UNet; full fine-tuning runs in f32"
                        .into(),
                });
            }
            model.stores.unet.bfloat16();
        }
        if lora {
            reset_lora(&model.stores.unet_lora, config.seed)?;
        }
        let trained = if lora { &model.stores.unet_lora } else { &model.stores.unet };
        let params: Vec<(String, Tensor)> = trained.variables().into_iter().collect();
        let optimizer = AdamW::new(params, config.adam);
        let ema = config.ema_decay.map(|d| Ema::new(optimizer.params(), d));
        Ok(DreamBoothTrainer {
            schedule: NoiseSchedule::new(&model.scheduler)?,
            config,
            optimizer,
            ema,
            lora,
            step: 0,
            contexts: HashMap::new(),
            instance: None,
            class_pool: Vec::new(),
            class_closed: false,
            last: None,
        })
    }

    /// The config.
    pub fn config(&self) -> &DreamBoothConfig {
        &self.config
    }

    /// Optimiser steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The last step's losses.
    pub fn last_losses(&self) -> Option<StepLosses> {
        self.last
    }

    /// True once `max_train_steps` steps are done.
    pub fn finished(&self) -> bool {
        self.step >= self.config.max_train_steps
    }

    /// The noise schedule used for training.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The trained parameters, by variable name.
    pub fn params(&self) -> &[(String, Tensor)] {
        self.optimizer.params()
    }

    /// Sets the subject's images (`[N, 3, H, W]` in `[-1, 1]`), encoded once by the frozen VAE.
    pub fn set_instance_images(&mut self, model: &StableDiffusion, pixels: &Tensor) -> Result<()> {
        self.instance = Some(encode(model, pixels)?);
        Ok(())
    }

    /// Adds streamed class images (`[N, 3, H, W]` in `[-1, 1]`) to the prior pool, in order.
    pub fn add_class_images(&mut self, model: &StableDiffusion, pixels: &Tensor) -> Result<()> {
        let e = encode(model, pixels)?;
        for i in 0..pixels.size()[0] {
            self.class_pool.push(Encoded { mean: e.mean.narrow(0, i, 1), logvar: e.logvar.narrow(0, i, 1) });
        }
        Ok(())
    }

    /// Declares that no more class images will come: steps then cycle over those that did.
    pub fn close_class_images(&mut self) {
        self.class_closed = true;
    }

    /// Class images received so far.
    pub fn class_images(&self) -> usize {
        self.class_pool.len()
    }

    fn prior_enabled(&self) -> bool {
        self.config.num_class_images > 0 && !(self.class_closed && self.class_pool.is_empty())
    }

    /// The class-pool index of class sample number `n`, if it has arrived.
    fn class_index(&self, n: u64) -> Option<usize> {
        let planned = self.config.num_class_images as u64;
        let cycle = if self.class_closed { (self.class_pool.len() as u64).min(planned) } else { planned };
        let i = (n % cycle.max(1)) as usize;
        (i < self.class_pool.len()).then_some(i)
    }

    /// Whether the next optimiser step has all its data (instance images set; class images it
    /// needs arrived or the pool closed).
    pub fn ready(&self) -> bool {
        if self.instance.is_none() || self.finished() {
            return false;
        }
        if !self.prior_enabled() {
            return true;
        }
        let b = self.config.train_batch_size as u64;
        let first = self.step * self.config.gradient_accumulation_steps * b;
        let last = first + self.config.gradient_accumulation_steps * b - 1;
        self.class_index(last).is_some() && self.class_index(first).is_some()
    }

    /// The instance-image indices of instance sample numbers `from .. from + n` (epoch shuffles).
    fn instance_indices(&self, from: u64, n: usize, count: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(n);
        let mut perms: HashMap<u64, Vec<usize>> = HashMap::new();
        for g in from..from + n as u64 {
            let epoch = g / count as u64;
            let perm = perms
                .entry(epoch)
                .or_insert_with(|| Draws::new(self.config.seed, Stream::Shuffle, epoch).permutation(count));
            out.push(perm[(g % count as u64) as usize] as i64);
        }
        out
    }

    /// The frozen text encoder's output for `prompt`, encoded once per prompt.
    fn context(&mut self, model: &StableDiffusion, prompt: &str) -> Result<Conditioning> {
        if let Some(c) = self.contexts.get(prompt) {
            return Ok(c.shallow_clone());
        }
        let c = tch::no_grad(|| model.encode_prompts(&[prompt]))?;
        self.contexts.insert(prompt.to_string(), c.shallow_clone());
        Ok(c)
    }

    /// One optimiser step (`gradient_accumulation_steps` micro-steps). Errors when the data is not
    /// [`ready`](Self::ready), and on a non-finite loss (naming the step; the weights are left as
    /// they were after the previous step).
    pub fn train_step(&mut self, model: &StableDiffusion) -> Result<StepLosses> {
        if !self.ready() {
            return Err(ModelError::Config {
                what: "dreambooth step".into(),
                message: format!(
                    "step {} is not ready: instance images {}, class images {} of {} needed",
                    self.step + 1,
                    if self.instance.is_some() { "set" } else { "missing" },
                    self.class_pool.len(),
                    self.config.num_class_images
                ),
            });
        }
        let accum = self.config.gradient_accumulation_steps;
        let b = self.config.train_batch_size;
        let instance_ctx = self.context(model, &self.config.instance_prompt.clone())?;
        let class_ctx = self.context(model, &self.config.class_prompt.clone())?;
        let prior = self.prior_enabled();
        let count = self.instance.as_ref().map(|e| e.mean.size()[0] as usize).unwrap_or(1);
        self.optimizer.zero_grad();
        let (mut sum_i, mut sum_p, mut sum_t) = (0.0, 0.0, 0.0);
        for a in 0..accum {
            let k = self.step * accum + a;
            let mut draws = Draws::new(self.config.seed, Stream::Train, k);
            let idx = self.instance_indices(k * b as u64, b, count);
            let (mean, logvar) = self.instance.as_ref().expect("ready() checked").rows(&idx);
            // With checkpointing each loss runs its own backward, weighted as the total's share.
            let recompute = self.config.activation_checkpointing;
            let weight = self.config.prior_loss_weight;
            let instance = self.denoise_loss(
                model,
                &mut draws,
                &mean,
                &logvar,
                &instance_ctx,
                recompute,
                1.0 / accum as f64,
            )?;
            let prior = if prior {
                let idx: Vec<usize> = (0..b as u64)
                    .map(|j| self.class_index(k * b as u64 + j).expect("ready() checked"))
                    .collect();
                let mean = Tensor::cat(&idx.iter().map(|&i| &self.class_pool[i].mean).collect::<Vec<_>>(), 0);
                let logvar =
                    Tensor::cat(&idx.iter().map(|&i| &self.class_pool[i].logvar).collect::<Vec<_>>(), 0);
                Some(self.denoise_loss(
                    model,
                    &mut draws,
                    &mean,
                    &logvar,
                    &class_ctx,
                    recompute,
                    weight / accum as f64,
                )?)
            } else {
                None
            };
            let (instance_value, prior_value) =
                (instance.value(), prior.as_ref().map(Loss::value).unwrap_or(0.0));
            let total_value = instance_value + prior_value * weight;
            if !total_value.is_finite() {
                self.optimizer.zero_grad();
                return Err(ModelError::NonFiniteLoss { step: self.step + 1, loss: total_value });
            }
            if let Loss::Graph(instance) = instance {
                // A new tensor for the total: `+=` on a shallow clone would add into `instance`.
                let total = match prior {
                    Some(Loss::Graph(p)) => instance + p * weight,
                    _ => instance,
                };
                (total / accum as f64).backward();
            }
            sum_i += instance_value;
            sum_p += prior_value;
            sum_t += total_value;
        }
        let (lr, grad_norm) = self.optimizer.clipped_step(
            self.config.max_grad_norm,
            self.config.learning_rate,
            self.config.lr_warmup_steps,
        )?;
        if let Some(ema) = &mut self.ema {
            ema.update(self.optimizer.params())?;
        }
        self.step += 1;
        let n = accum as f64;
        let losses = StepLosses {
            step: self.step,
            instance: sum_i / n,
            prior: sum_p / n,
            total: sum_t / n,
            learning_rate: lr,
            grad_norm,
        };
        self.last = Some(losses);
        Ok(losses)
    }

    /// The denoising loss of latents drawn from `(mean, logvar)` at random timesteps, all draws
    /// from `draws`; the UNet runs in its own precision, the loss in float32. With `recompute` the
    /// backward of `loss · scale` runs here, through the UNet's segments recomputed one at a time.
    #[allow(clippy::too_many_arguments)]
    fn denoise_loss(
        &self,
        model: &StableDiffusion,
        draws: &mut Draws,
        mean: &Tensor,
        logvar: &Tensor,
        context: &Conditioning,
        recompute: bool,
        scale: f64,
    ) -> Result<Loss> {
        let device = mean.device();
        let b = mean.size()[0];
        let latents = AutoencoderKl::sample_latent(mean, logvar, &draws.normal(&mean.size(), device))
            * model.vae.scaling_factor;
        let timesteps = draws.below(self.schedule.alphas_cumprod().len() as u64, b as usize);
        let noise = draws.normal(&latents.size(), device);
        if !recompute {
            return Ok(Loss::Graph(Self::loss_at(
                model,
                &self.schedule,
                &latents,
                &noise,
                context,
                &timesteps,
            )?));
        }
        let noisy = self.schedule.add_noise(&latents, &noise, &timesteps);
        let target = self.schedule.target(&latents, &noise, &timesteps);
        let t = Tensor::from_slice(&timesteps).to_device(device);
        let (segments, input) = model.predict_segments(&noisy, &t, &context.repeat_row(0, b))?;
        let value = crate::recompute::backward(&segments, vec![input], true, |ends| {
            let loss = ends[0].to_kind(tch::Kind::Float).mse_loss(&target, tch::Reduction::Mean);
            (&loss * scale).f_backward()?;
            Ok(loss.double_value(&[]))
        })?;
        Ok(Loss::Done(value))
    }

    /// The denoising loss of `latents` noised with `noise` at `timesteps` under the conditioning of
    /// one prompt (broadcast to the batch).
    pub fn loss_at(
        model: &StableDiffusion,
        schedule: &NoiseSchedule,
        latents: &Tensor,
        noise: &Tensor,
        context: &Conditioning,
        timesteps: &[i64],
    ) -> Result<Tensor> {
        let b = latents.size()[0];
        let noisy = schedule.add_noise(latents, noise, timesteps);
        let target = schedule.target(latents, noise, timesteps);
        let t = Tensor::from_slice(timesteps).to_device(latents.device());
        let pred = model.predict(&noisy, &t, &context.repeat_row(0, b))?;
        Ok(pred.mse_loss(&target, tch::Reduction::Mean))
    }

    /// The subject loss of `pixels` under `prompt` at fixed `timesteps`, with every draw from
    /// `seed` (for before/after comparisons).
    pub fn eval_loss(
        model: &StableDiffusion,
        schedule: &NoiseSchedule,
        pixels: &Tensor,
        prompt: &str,
        timesteps: &[i64],
        seed: u64,
    ) -> Result<f64> {
        tch::no_grad(|| {
            let e = encode(model, pixels)?;
            let mut draws = Draws::new(seed, Stream::Train, u64::MAX);
            let latents = AutoencoderKl::sample_latent(
                &e.mean,
                &e.logvar,
                &draws.normal(&e.mean.size(), e.mean.device()),
            ) * model.vae.scaling_factor;
            let noise = draws.normal(&latents.size(), latents.device());
            let context = model.encode_prompts(&[prompt])?;
            Ok(Self::loss_at(model, schedule, &latents, &noise, &context, timesteps)?.double_value(&[]))
        })
    }

    /// Whether validation is due after the step just taken.
    pub fn validation_due(&self) -> bool {
        matches!(&self.config.validation, Some(v) if self.step > 0 && self.step.is_multiple_of(v.every_steps))
    }

    /// Samples the validation prompts with their fixed seeds, with the current weights.
    pub fn validate(&self, model: &StableDiffusion) -> Result<Vec<ValidationImage>> {
        let Some(v) = &self.config.validation else { return Ok(Vec::new()) };
        let shape = model.latent_shape(v.resolution, v.resolution)?;
        let mut out = Vec::new();
        for prompt in &v.prompts {
            for &seed in &v.seeds {
                let noise = sample_noise(seed, &shape, model.device());
                let image = model.sample(
                    &[prompt],
                    &[""],
                    &noise,
                    v.num_inference_steps,
                    v.guidance_scale,
                    v.sampler,
                )?;
                out.push(ValidationImage { prompt: prompt.clone(), seed, image: image.squeeze_dim(0) });
            }
        }
        Ok(out)
    }

    /// Copies the EMA weights into the model (no-op without EMA): call once training is over,
    /// before exporting or sampling.
    pub fn apply_ema(&self) -> Result<()> {
        let Some(ema) = &self.ema else { return Ok(()) };
        let shadow: HashMap<&str, &Tensor> = ema.shadow().iter().map(|(k, t)| (k.as_str(), t)).collect();
        tch::no_grad(|| -> Result<()> {
            for (name, p) in self.optimizer.params() {
                p.shallow_clone().f_copy_(&shadow[name.as_str()].to_kind(p.kind()))?;
            }
            Ok(())
        })
    }

    /// Writes `checkpoint-<step>/` under `root` ([`crate::checkpoint`]) with the LoRA in diffusers'
    /// layout beside the training state, and deletes checkpoints beyond `checkpoints_to_keep`.
    pub fn save_checkpoint(&self, model: &StableDiffusion, root: &Path) -> Result<PathBuf> {
        let accum = self.config.gradient_accumulation_steps;
        let samples = self.step * accum * self.config.train_batch_size as u64;
        let state = CheckpointState {
            format: CHECKPOINT_FORMAT,
            step: self.step,
            next_micro_step: self.step * accum,
            instance_samples_seen: samples,
            class_samples_seen: if self.prior_enabled() { samples } else { 0 },
            ema_updates: self.ema.as_ref().map(|e| e.updates()).unwrap_or(0),
            lora: self.lora,
            config: self.config.clone(),
            last: self.last,
        };
        checkpoint::save(
            root,
            self.step,
            self.config.checkpoints_to_keep,
            &self.optimizer,
            self.ema.as_ref(),
            &state,
            |dir| match (self.lora, &model.lora) {
                (true, Some(lora)) => {
                    save_lora(&model.stores.unet_lora, lora, "unet", &dir.join(LORA_FILE))?;
                    crate::lora::save_config(lora, dir)
                }
                _ => Ok(()),
            },
        )
    }

    /// Restores a run from a checkpoint folder: weights, optimiser moments, EMA, step, RNG and data
    /// position. The trainer must have been built with the checkpoint's config (a different seed,
    /// batch size, accumulation or pool size is refused, naming the field).
    pub fn resume(&mut self, checkpoint: &Path) -> Result<()> {
        let state: CheckpointState = checkpoint::read_state(checkpoint)?;
        let state_path = checkpoint.join("state.json");
        if state.format != CHECKPOINT_FORMAT {
            return Err(ModelError::Config {
                what: state_path.display().to_string(),
                message: format!("checkpoint format {} (this build reads {CHECKPOINT_FORMAT})", state.format),
            });
        }
        let (saved, ours) = (&state.config, &self.config);
        let fields = [
            ("seed", saved.seed == ours.seed),
            ("train_batch_size", saved.train_batch_size == ours.train_batch_size),
            (
                "gradient_accumulation_steps",
                saved.gradient_accumulation_steps == ours.gradient_accumulation_steps,
            ),
            ("num_class_images", saved.num_class_images == ours.num_class_images),
            ("ema_decay", saved.ema_decay == ours.ema_decay),
            ("instance_prompt", saved.instance_prompt == ours.instance_prompt),
            ("class_prompt", saved.class_prompt == ours.class_prompt),
        ];
        checkpoint::same_settings(checkpoint, "dreambooth", &fields)?;
        if state.lora != self.lora {
            return Err(ModelError::Config {
                what: checkpoint.display().to_string(),
                message: format!(
                    "checkpoint trained {}, this model trains the other",
                    if state.lora { "LoRA" } else { "the full UNet" }
                ),
            });
        }
        checkpoint::restore(
            checkpoint,
            &mut self.optimizer,
            state.step,
            self.ema.as_mut().map(|e| (e, state.ema_updates)),
        )?;
        self.step = state.step;
        self.last = state.last;
        Ok(())
    }
}

/// Checkpoint folders under `root`, oldest first, with their steps.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    checkpoint::list(root)
}

/// The newest complete checkpoint under `root`, if any.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    checkpoint::latest(root)
}

fn encode(model: &StableDiffusion, pixels: &Tensor) -> Result<Encoded> {
    let (n, c) = (pixels.size().first().copied().unwrap_or(0), pixels.size().get(1).copied().unwrap_or(0));
    if pixels.dim() != 4 || c != 3 || n == 0 {
        return Err(ModelError::Config {
            what: "training images".into(),
            message: format!("expected [N, 3, H, W] with N > 0, got {:?}", pixels.size()),
        });
    }
    let (mean, logvar) = model.encode_pixels(pixels);
    Ok(Encoded { mean, logvar })
}
