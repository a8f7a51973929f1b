//! The training loop's optimiser parts, with PyTorch's and diffusers' numerics (proven against
//! them by a parity fixture): AdamW (`torch.optim.AdamW`), gradient-norm clipping
//! (`clip_grad_norm_`), the constant-with-warm-up learning-rate schedule, and an EMA of the
//! weights (`diffusers.training_utils.EMAModel`). Unlike libtorch's built-in optimisers, their whole
//! state is in named tensors here, so a checkpoint can save it and a resumed run continue exactly.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::weights::read_safetensors;

/// AdamW hyper-parameters (PyTorch's defaults, DreamBooth's weight decay).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// AdamW over named parameters. The moments live beside the parameters (same device, float32).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    steps: u64,
}

impl AdamW {
    /// An optimiser over `params` (sorted by name, so the order is stable).
    pub fn new(mut params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |p: &Vec<(String, Tensor)>| p.iter().map(|(_, t)| t.zeros_like().detach()).collect();
        AdamW { exp_avg: zeros(&params), exp_avg_sq: zeros(&params), params, config, steps: 0 }
    }

    /// The parameters, by name.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Optimiser steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Scales the gradients so that their joint L2 norm is at most `max_norm`; returns the norm
    /// before clipping (`clip_grad_norm_`'s rule: coefficient `max / (norm + 1e-6)`, applied only
    /// when below 1).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return Ok(0.0);
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        tch::no_grad(|| -> Result<()> {
            for g in &grads {
                let _ = g.shallow_clone().f_mul_(&coef.to_kind(g.kind()))?;
            }
            Ok(())
        })?;
        Ok(total.double_value(&[]))
    }

    /// One AdamW step at learning rate `lr` (parameters without a gradient are skipped).
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.steps += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.steps as i32)).sqrt();
        tch::no_grad(|| -> Result<()> {
            for (i, (_, p)) in self.params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                let m = &mut self.exp_avg[i];
                let _ = m.f_lerp_(&g, 1.0 - c.beta1)?;
                let v = &mut self.exp_avg_sq[i];
                let _ = v.f_mul_scalar_(c.beta2)?;
                let _ = v.f_add_(&(&g * &g * (1.0 - c.beta2)))?;
                let denom = v.sqrt() / bias2_sqrt + c.eps;
                let _ = p.f_sub_(&(&*m / &denom * (lr / bias1)))?;
            }
            Ok(())
        })
    }

    /// The tail of a training step: clips the gradients to `max_grad_norm`, refuses a non-finite
    /// norm (an error naming the step; the weights stay), steps at the warm-up schedule's rate
    /// (peak `lr`, `warmup` steps) and clears the gradients. Returns `(learning rate, grad norm)`.
    pub fn clipped_step(&mut self, max_grad_norm: f64, lr: f64, warmup: u64) -> Result<(f64, f64)> {
        let grad_norm = self.clip_grad_norm(max_grad_norm)?;
        if !grad_norm.is_finite() {
            self.zero_grad();
            return Err(ModelError::NonFiniteLoss { step: self.steps + 1, loss: grad_norm });
        }
        let lr = warmup_constant_lr(lr, warmup, self.steps);
        self.step(lr)?;
        self.zero_grad();
        Ok((lr, grad_norm))
    }

    /// The moments as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) for a checkpoint;
    /// the step count is saved by the caller.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("{name}.exp_avg"), self.exp_avg[i].shallow_clone()));
            out.push((format!("{name}.exp_avg_sq"), self.exp_avg_sq[i].shallow_clone()));
        }
        out
    }

    /// Restores the moments from `path` (written from [`AdamW::state`]) and the step count.
    pub fn load_state(&mut self, path: &Path, steps: u64) -> Result<()> {
        let mut saved = read_safetensors(path)?;
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (suffix, slot) in [("exp_avg", &mut self.exp_avg[i]), ("exp_avg_sq", &mut self.exp_avg_sq[i])]
            {
                let key = format!("{name}.{suffix}");
                let t = saved.remove(&key).ok_or_else(|| ModelError::MissingTensor {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    expected: p.size(),
                })?;
                if t.size() != p.size() {
                    return Err(ModelError::ShapeMismatch {
                        path: path.to_path_buf(),
                        key,
                        expected: p.size(),
                        found: t.size(),
                    });
                }
                *slot = t.to_device(p.device()).to_kind(slot.kind());
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Learning rate after `steps` optimiser steps: linear warm-up from 0 over `warmup` steps, then
/// constant (`get_constant_schedule_with_warmup`; the first step runs at 0 when warming up).
pub fn warmup_constant_lr(base: f64, warmup: u64, steps: u64) -> f64 {
    if steps < warmup {
        base * steps as f64 / warmup.max(1) as f64
    } else {
        base
    }
}

/// An exponential moving average of parameters (diffusers' `EMAModel` without its warm-up
/// variant: decay `min(decay, (1 + n) / (10 + n))` with `n` = updates so far − 1, so the first
/// update copies the weights).
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    shadow: Vec<(String, Tensor)>,
    updates: u64,
}

impl Ema {
    /// An average starting at the current values of `params`.
    pub fn new(params: &[(String, Tensor)], decay: f64) -> Self {
        let mut shadow: Vec<(String, Tensor)> =
            params.iter().map(|(k, p)| (k.clone(), p.detach().to_kind(Kind::Float).copy())).collect();
        shadow.sort_by(|a, b| a.0.cmp(&b.0));
        Ema { decay, shadow, updates: 0 }
    }

    /// The decay the next update uses.
    fn next_decay(&self) -> f64 {
        let n = self.updates; // (updates + 1) - 1
        if n == 0 {
            return 0.0;
        }
        ((1 + n) as f64 / (10 + n) as f64).min(self.decay)
    }

    /// Moves the average toward `params` (same names as at creation).
    pub fn update(&mut self, params: &[(String, Tensor)]) -> Result<()> {
        let one_minus = 1.0 - self.next_decay();
        let by_name: HashMap<&str, &Tensor> = params.iter().map(|(k, p)| (k.as_str(), p)).collect();
        tch::no_grad(|| -> Result<()> {
            for (name, s) in &mut self.shadow {
                let p = by_name.get(name.as_str()).ok_or_else(|| ModelError::Config {
                    what: "ema".into(),
                    message: format!("no parameter `{name}` to average"),
                })?;
                let delta = (&*s - p.to_kind(Kind::Float)) * one_minus;
                let _ = s.f_sub_(&delta)?;
            }
            Ok(())
        })?;
        self.updates += 1;
        Ok(())
    }

    /// The averaged values, by name.
    pub fn shadow(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    /// Updates so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Restores the average from `path` (its tensors by parameter name) and its update count.
    pub fn load_state(&mut self, path: &Path, updates: u64) -> Result<()> {
        let mut saved = read_safetensors(path)?;
        for (name, s) in &mut self.shadow {
            let t = saved.remove(name.as_str()).ok_or_else(|| ModelError::MissingTensor {
                path: path.to_path_buf(),
                key: name.clone(),
                expected: s.size(),
            })?;
            if t.size() != s.size() {
                return Err(ModelError::ShapeMismatch {
                    path: path.to_path_buf(),
                    key: name.clone(),
                    expected: s.size(),
                    found: t.size(),
                });
            }
            *s = t.to_device(s.device()).to_kind(Kind::Float);
        }
        self.updates = updates;
        Ok(())
    }
}
