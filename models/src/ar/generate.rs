//! Autoregressive decoding with a KV cache: a prefill over the prompt, then one token per step,
//! with classifier-free guidance (conditional and unconditional rows in one batch), temperature,
//! top-k and top-p with transformers' semantics, and per-step constraints on which tokens may come
//! next (image tokens only, a forced row break, …). Deterministic given a seed: each step's draw
//! comes from `(seed, step)` ([`crate::rng`]), never from libtorch's global generator.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::chameleon::{Chameleon, KvCache};
use crate::error::{ModelError, Result};
use crate::rng::{Draws, Stream};

/// Sampling settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSampling {
    /// Take the most likely token (temperature, top-k and top-p are then ignored).
    pub greedy: bool,
    /// Softmax temperature.
    pub temperature: f64,
    /// Keep the `k` most likely tokens.
    pub top_k: Option<i64>,
    /// Keep the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f64>,
    /// Classifier-free guidance scale (1: no guidance).
    pub guidance_scale: f64,
    /// Where the random draws come from.
    pub draws: DrawSource,
}

/// Where sampling draws come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrawSource {
    /// `(seed, step)` counters: independent of every other thread (the default).
    #[default]
    Counter,
    /// libtorch's global generator seeded with the seed, `multinomial` per step: the same tokens as
    /// transformers' `generate(do_sample=True)` after `torch.manual_seed(seed)`. Only deterministic
    /// while nothing else draws from that generator meanwhile.
    Torch,
}

impl Default for TokenSampling {
    fn default() -> Self {
        TokenSampling {
            greedy: false,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            guidance_scale: 1.0,
            draws: DrawSource::Counter,
        }
    }
}

/// What may come next.
#[derive(Debug)]
pub enum Allowed {
    /// Any token.
    Any,
    /// Only tokens where the mask `[V]` is true.
    Mask(Tensor),
    /// Exactly this token (a structure token).
    Force(i64),
}

/// Applies temperature, top-k and top-p to `logits [B, V]` (transformers' warpers, in that order:
/// removed entries become −∞; at least one token is always kept).
pub fn warp(logits: &Tensor, s: &TokenSampling) -> Tensor {
    let mut scores = logits / s.temperature;
    let v = scores.size()[scores.dim() - 1];
    if let Some(k) = s.top_k.filter(|&k| k > 0 && k < v) {
        let (top, _) = scores.topk(k, -1, true, true);
        let threshold = top.narrow(-1, k - 1, 1);
        scores = scores.masked_fill(&scores.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    if let Some(p) = s.top_p.filter(|&p| p < 1.0) {
        let (sorted, indices) = scores.sort(-1, false); // ascending
        let cumulative = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let remove_sorted = cumulative.le(1.0 - p);
        // Always keep the most likely token (the last one in ascending order).
        let _ = remove_sorted.narrow(-1, v - 1, 1).fill_(0);
        let remove = remove_sorted.scatter(-1, &indices, &remove_sorted);
        scores = scores.masked_fill(&remove, f64::NEG_INFINITY);
    }
    scores
}

/// Picks one token per row of processed scores `[B, V]`: the arg-max when greedy, else a draw by
/// inverse CDF from `draws`.
pub(crate) fn pick(scores: &Tensor, greedy: bool, draws: &mut Draws) -> Result<Vec<i64>> {
    if greedy {
        return Ok(Vec::<i64>::try_from(scores.argmax(-1, false))?);
    }
    let probs = scores.softmax(-1, Kind::Double).to_device(tch::Device::Cpu);
    let cdf = probs.cumsum(-1, Kind::Double);
    let b = cdf.size()[0];
    let v = cdf.size()[1];
    (0..b)
        .map(|i| {
            let row = Vec::<f64>::try_from(cdf.get(i))?;
            let u = draws.unit() * row[v as usize - 1];
            Ok(row.iter().position(|&c| c > u).unwrap_or(v as usize - 1) as i64)
        })
        .collect()
}

/// Generates `max_new_tokens` tokens after `prompt [1, T]` (or `[2, T]` left-padded with
/// `attention_mask` when guiding: row 0 conditional, row 1 unconditional). `allowed(step, tokens)`
/// constrains each step. Returns the new tokens.
pub fn generate(
    model: &Chameleon,
    prompt: &Tensor,
    attention_mask: Option<&Tensor>,
    max_new_tokens: usize,
    sampling: &TokenSampling,
    seed: u64,
    mut allowed: impl FnMut(usize, &[i64]) -> Allowed,
) -> Result<Vec<i64>> {
    let rows = prompt.size()[0];
    let guided = sampling.guidance_scale != 1.0;
    if rows != if guided { 2 } else { 1 } {
        return Err(ModelError::Config {
            what: "generate".into(),
            message: format!(
                "{rows} prompt rows; expected 1, or 2 (conditional, unconditional) with guidance"
            ),
        });
    }
    let device = prompt.device();
    let mut cache = KvCache::new();
    let mut mask = attention_mask.map(|m| m.shallow_clone());
    let mut out = Vec::with_capacity(max_new_tokens);
    let mut logits = tch::no_grad(|| model.forward(prompt, mask.as_ref(), Some(&mut cache)))?;
    if sampling.draws == DrawSource::Torch {
        tch::manual_seed(seed as i64);
    }
    for step in 0..max_new_tokens {
        let last = logits.select(1, logits.size()[1] - 1).to_kind(Kind::Float); // [rows, V]
        let mut scores = if guided {
            let (cond, uncond) = (last.get(0), last.get(1));
            (&uncond + (&cond - &uncond) * sampling.guidance_scale).unsqueeze(0)
        } else {
            last
        };
        let token = match allowed(step, &out) {
            Allowed::Force(t) => t,
            constraint => {
                if let Allowed::Mask(m) = &constraint {
                    scores = scores.masked_fill(&m.logical_not().to_device(device), f64::NEG_INFINITY);
                }
                let warped = if sampling.greedy { scores } else { warp(&scores, sampling) };
                match (sampling.draws, sampling.greedy) {
                    (DrawSource::Torch, false) => {
                        warped.softmax(-1, Kind::Float).multinomial(1, false).int64_value(&[0, 0])
                    }
                    _ => pick(
                        &warped,
                        sampling.greedy,
                        &mut Draws::new(seed, Stream::TokenSample, step as u64),
                    )?[0],
                }
            }
        };
        out.push(token);
        if step + 1 == max_new_tokens {
            break;
        }
        let next = Tensor::from_slice(&vec![token; rows as usize]).view([rows, 1]).to_device(device);
        if let Some(m) = &mut mask {
            *m = Tensor::cat(&[m.shallow_clone(), m.ones_like().narrow(1, 0, 1)], 1);
        }
        logits = tch::no_grad(|| model.forward(&next, mask.as_ref(), Some(&mut cache)))?;
    }
    Ok(out)
}
