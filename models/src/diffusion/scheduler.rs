//! Noise schedules and samplers as diffusers defines them (`DDPMScheduler` training schedule,
//! `DDIMScheduler`, `EulerDiscreteScheduler`), configured by a model folder's
//! `scheduler/scheduler_config.json`. Deterministic: DDIM with `eta = 0`, Euler without churn.

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};

fn default_train_steps() -> i64 {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_schedule() -> String {
    "linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_spacing() -> String {
    "leading".into()
}

/// The fields of a diffusers scheduler config this module uses (others are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    /// Training timesteps.
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: i64,
    /// First beta.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// Last beta.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// `linear` or `scaled_linear`.
    #[serde(default = "default_schedule")]
    pub beta_schedule: String,
    /// `epsilon`, `v_prediction` or `sample`.
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    /// `leading`, `linspace` or `trailing`.
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    /// Offset added to `leading` timesteps (1 for Stable Diffusion).
    #[serde(default)]
    pub steps_offset: i64,
    /// DDIM: use 1 (not `alphas_cumprod[0]`) as the final alpha.
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted clean sample to `±clip_sample_range` (diffusers' default is on;
    /// Stable Diffusion configs turn it off).
    #[serde(default = "yes")]
    pub clip_sample: bool,
    /// The clamp range of `clip_sample`.
    #[serde(default = "one")]
    pub clip_sample_range: f64,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

impl SchedulerConfig {
    /// Stable Diffusion 1.x / 2.x (and SDXL): scaled-linear betas 0.00085..0.012, leading spacing,
    /// offset 1, `set_alpha_to_one = false`.
    pub fn stable_diffusion() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: false,
            clip_sample_range: 1.0,
        }
    }

    /// Reads a `scheduler_config.json`.
    pub fn from_json(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { what: path.display().to_string(), message: e.to_string() })?;
        cfg.prediction()?;
        let _ = cfg.betas()?;
        Ok(cfg)
    }

    fn bad(&self, field: &str, value: &str) -> ModelError {
        ModelError::Config { what: field.into(), message: format!("unsupported value `{value}`") }
    }

    /// What the denoiser predicts.
    pub fn prediction(&self) -> Result<Prediction> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::V),
            "sample" => Ok(Prediction::Sample),
            other => Err(self.bad("prediction_type", other)),
        }
    }

    /// The training betas `[T]` (float32).
    pub fn betas(&self) -> Result<Tensor> {
        let n = self.num_train_timesteps;
        let opts = (Kind::Float, Device::Cpu);
        match self.beta_schedule.as_str() {
            "linear" => Ok(Tensor::linspace(self.beta_start, self.beta_end, n, opts)),
            "scaled_linear" => {
                Ok(Tensor::linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n, opts)
                    .pow_tensor_scalar(2))
            }
            other => Err(self.bad("beta_schedule", other)),
        }
    }

    /// Inference timesteps for `steps` sampling steps, highest first.
    pub fn timesteps(&self, steps: i64) -> Result<Vec<f64>> {
        let t = self.num_train_timesteps;
        if steps < 1 || steps > t {
            return Err(ModelError::Config {
                what: "num_inference_steps".into(),
                message: format!("{steps} is not in 1..={t}"),
            });
        }
        Ok(match self.timestep_spacing.as_str() {
            "linspace" => {
                (0..steps).rev().map(|i| i as f64 * (t - 1) as f64 / (steps - 1).max(1) as f64).collect()
            }
            "leading" => {
                let ratio = t / steps;
                (0..steps).rev().map(|i| (i * ratio + self.steps_offset) as f64).collect()
            }
            "trailing" => {
                let ratio = t as f64 / steps as f64;
                (0..steps).map(|i| (t as f64 - i as f64 * ratio).round() - 1.0).collect()
            }
            other => return Err(self.bad("timestep_spacing", other)),
        })
    }
}

/// What the denoiser predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The added noise.
    Epsilon,
    /// `v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x₀`.
    V,
    /// The clean sample.
    Sample,
}

/// The DDPM forward process, for training.
#[derive(Debug)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
}

impl NoiseSchedule {
    /// From a scheduler config.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let alphas = Tensor::ones_like(&cfg.betas()?) - cfg.betas()?;
        let cumprod = alphas.cumprod(0, Kind::Float);
        Ok(NoiseSchedule { alphas_cumprod: Vec::<f32>::try_from(cumprod)?, prediction: cfg.prediction()? })
    }

    /// ᾱ per training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn coefficients(&self, timesteps: &[i64], device: Device) -> (Tensor, Tensor) {
        let a: Vec<f32> = timesteps.iter().map(|&t| self.alphas_cumprod[t as usize]).collect();
        let a = Tensor::from_slice(&a).to_device(device).view([-1, 1, 1, 1]);
        (a.sqrt(), (a.ones_like() - &a).sqrt())
    }

    /// `x_t = sqrt(ᾱ_t) x₀ + sqrt(1 − ᾱ_t) ε` for a batch `[B, C, H, W]` with one timestep each.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[i64]) -> Tensor {
        let (sa, sb) = self.coefficients(timesteps, x0.device());
        sa * x0 + sb * noise
    }

    /// The training target for the configured prediction type.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[i64]) -> Tensor {
        match self.prediction {
            Prediction::Epsilon => noise.shallow_clone(),
            Prediction::Sample => x0.shallow_clone(),
            Prediction::V => {
                let (sa, sb) = self.coefficients(timesteps, x0.device());
                sa * noise - sb * x0
            }
        }
    }
}

/// Classifier-free guidance: `uncond + scale (cond − uncond)`.
pub fn guide(uncond: &Tensor, cond: &Tensor, scale: f64) -> Tensor {
    uncond + (cond - uncond) * scale
}

/// A sampler: DDIM (η = 0) or Euler.
#[derive(Debug)]
pub enum Sampler {
    /// `DDIMScheduler`.
    Ddim {
        /// ᾱ per training step.
        alphas_cumprod: Vec<f32>,
        /// ᾱ used after the last step.
        final_alpha_cumprod: f32,
        /// Integer timesteps, highest first.
        timesteps: Vec<i64>,
        /// Prediction type.
        prediction: Prediction,
        /// Training steps / inference steps.
        stride: i64,
        /// Clamp range of the predicted clean sample, when clamping.
        clip: Option<f64>,
    },
    /// `EulerDiscreteScheduler`.
    Euler {
        /// Timesteps, highest first (fractional for `linspace`).
        timesteps: Vec<f64>,
        /// σ per step, with a final 0.
        sigmas: Vec<f32>,
        /// Prediction type.
        prediction: Prediction,
        /// Scale of the initial noise.
        init_noise_sigma: f64,
    },
}

impl Sampler {
    /// DDIM with `steps` steps.
    pub fn ddim(cfg: &SchedulerConfig, steps: i64) -> Result<Self> {
        let schedule = NoiseSchedule::new(cfg)?;
        let timesteps = cfg.timesteps(steps)?.into_iter().map(|t| t.round() as i64).collect();
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { schedule.alphas_cumprod[0] };
        Ok(Sampler::Ddim {
            alphas_cumprod: schedule.alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            prediction: cfg.prediction()?,
            stride: cfg.num_train_timesteps / steps,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range),
        })
    }

    /// Euler with `steps` steps (linear σ interpolation, final σ = 0).
    pub fn euler(cfg: &SchedulerConfig, steps: i64) -> Result<Self> {
        let schedule = NoiseSchedule::new(cfg)?;
        let all: Vec<f64> =
            schedule.alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).map(f64::from).collect();
        let timesteps = cfg.timesteps(steps)?;
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| {
                let (lo, frac) = (t.floor() as usize, t - t.floor());
                let hi = (lo + 1).min(all.len() - 1);
                (all[lo] + (all[hi] - all[lo]) * frac) as f32
            })
            .collect();
        sigmas.push(0.0);
        let max = f64::from(sigmas.iter().cloned().fold(0.0, f32::max));
        let init_noise_sigma = if matches!(cfg.timestep_spacing.as_str(), "linspace" | "trailing") {
            max
        } else {
            (max * max + 1.0).sqrt()
        };
        Ok(Sampler::Euler { timesteps, sigmas, prediction: cfg.prediction()?, init_noise_sigma })
    }

    /// The timesteps to condition the denoiser on, highest first.
    pub fn timesteps(&self) -> Vec<f64> {
        match self {
            Sampler::Ddim { timesteps, .. } => timesteps.iter().map(|&t| t as f64).collect(),
            Sampler::Euler { timesteps, .. } => timesteps.clone(),
        }
    }

    /// Scale of the initial Gaussian noise.
    pub fn init_noise_sigma(&self) -> f64 {
        match self {
            Sampler::Ddim { .. } => 1.0,
            Sampler::Euler { init_noise_sigma, .. } => *init_noise_sigma,
        }
    }

    /// The denoiser's input at step `i` (Euler divides by `sqrt(σ² + 1)`).
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor {
        match self {
            Sampler::Ddim { .. } => sample.shallow_clone(),
            Sampler::Euler { sigmas, .. } => sample / (f64::from(sigmas[i]).powi(2) + 1.0).sqrt(),
        }
    }

    /// One step: the sample at step `i + 1` from the denoiser's output at step `i`.
    pub fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Tensor {
        match self {
            Sampler::Ddim { alphas_cumprod, final_alpha_cumprod, timesteps, prediction, stride, clip } => {
                let t = timesteps[i];
                let prev = t - stride;
                let a_t = f64::from(alphas_cumprod[t as usize]);
                let a_prev = if prev >= 0 {
                    f64::from(alphas_cumprod[prev as usize])
                } else {
                    f64::from(*final_alpha_cumprod)
                };
                let b_t = 1.0 - a_t;
                let (x0, eps) = match prediction {
                    Prediction::Epsilon => {
                        ((sample - model_output * b_t.sqrt()) / a_t.sqrt(), model_output.shallow_clone())
                    }
                    Prediction::Sample => {
                        (model_output.shallow_clone(), (sample - model_output * a_t.sqrt()) / b_t.sqrt())
                    }
                    Prediction::V => (
                        sample * a_t.sqrt() - model_output * b_t.sqrt(),
                        model_output * a_t.sqrt() + sample * b_t.sqrt(),
                    ),
                };
                // As the reference (without `use_clipped_model_output`): clamp x₀, keep ε.
                let x0 = match clip {
                    Some(r) => x0.clamp(-r, *r),
                    None => x0,
                };
                x0 * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt()
            }
            Sampler::Euler { sigmas, prediction, .. } => {
                let sigma = f64::from(sigmas[i]);
                let x0 = match prediction {
                    Prediction::Epsilon => sample - model_output * sigma,
                    Prediction::Sample => model_output.shallow_clone(),
                    Prediction::V => {
                        model_output * (-sigma / (sigma * sigma + 1.0).sqrt())
                            + sample / (sigma * sigma + 1.0)
                    }
                };
                let derivative = (sample - x0) / sigma;
                let dt = f64::from(sigmas[i + 1]) - sigma;
                sample + derivative * dt
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v_targets_invert_and_bad_configs_are_named() {
        let mut cfg = SchedulerConfig::stable_diffusion();
        cfg.prediction_type = "v_prediction".into();
        let schedule = NoiseSchedule::new(&cfg).unwrap();
        let x0 = crate::rng::Draws::new(1, crate::rng::Stream::Train, 0).normal(&[2, 4, 3, 3], Device::Cpu);
        let noise =
            crate::rng::Draws::new(1, crate::rng::Stream::Train, 1).normal(&[2, 4, 3, 3], Device::Cpu);
        let t = [10i64, 900];
        let xt = schedule.add_noise(&x0, &noise, &t);
        let v = schedule.target(&x0, &noise, &t);
        // x0 = sqrt(a) x_t - sqrt(1 - a) v, per sample.
        for (i, &ti) in t.iter().enumerate() {
            let a = f64::from(schedule.alphas_cumprod()[ti as usize]);
            let back = xt.get(i as i64) * a.sqrt() - v.get(i as i64) * (1.0 - a).sqrt();
            assert!((back - x0.get(i as i64)).abs().max().double_value(&[]) < 1e-5);
        }
        cfg.beta_schedule = "cosine-ish".into();
        assert!(cfg.betas().unwrap_err().to_string().contains("cosine-ish"));
        assert!(SchedulerConfig::stable_diffusion()
            .timesteps(0)
            .unwrap_err()
            .to_string()
            .contains("num_inference_steps"));
    }
}
