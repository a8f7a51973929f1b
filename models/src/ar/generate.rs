//! Autoregressive decoding with a preallocated KV cache: a prefill over the prompts, then one token
//! per step for a whole batch of sequences, with classifier-free guidance (conditional and
//! unconditional rows in one forward), temperature, top-k and top-p with transformers' semantics,
//! and per-step constraints on which tokens may come next (image tokens only, a forced row break,
//! …), all on the model's device. Deterministic given the seeds: each sequence's draw at each step
//! comes from `(seed, step)` ([`crate::rng`]), never from libtorch's global generator (unless
//! [`DrawSource::Torch`] asks for it).

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

/// What may come next: the same for every row of a batch at a step.
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

/// Picks one token per row of processed scores `[B, V]` on their device: the arg-max when
/// greedy, else a draw by inverse CDF, row `i`'s uniform number coming from `(seeds[i], step)`.
/// The distribution never leaves the device; only the `B` uniforms go to it. Returns `[B]` ids.
pub(crate) fn pick(scores: &Tensor, greedy: bool, seeds: &[u64], step: u64) -> Tensor {
    if greedy {
        return scores.argmax(-1, false);
    }
    let v = scores.size()[scores.dim() - 1];
    let cdf = scores.softmax(-1, Kind::Double).cumsum(-1, Kind::Double);
    let units: Vec<f64> =
        seeds.iter().map(|&seed| Draws::new(seed, Stream::TokenSample, step).unit()).collect();
    let total = cdf.narrow(1, v - 1, 1); // [B, 1]
    let u = Tensor::from_slice(&units).to_device(scores.device()).view([-1, 1]) * total;
    // The first position whose cumulative probability exceeds u: the count of those at or below.
    cdf.le_tensor(&u).sum_dim_intlist(-1, false, Kind::Int64).clamp_max(v - 1)
}

/// One step's tokens `[B]` from the newest logits `[rows, T, V]` of a batch: guidance (rows `0..B`
/// against `B..2B` when `sampling` guides), then `allowed`, the warpers and the draw of
/// [`pick`] (or libtorch's generator for [`DrawSource::Torch`]), all on the logits' device.
pub(crate) fn next_tokens(
    logits: &Tensor,
    b: i64,
    sampling: &TokenSampling,
    seeds: &[u64],
    step: usize,
    allowed: Allowed,
) -> Tensor {
    let device = logits.device();
    let last = logits.select(1, logits.size()[1] - 1).to_kind(Kind::Float); // [rows, V]
    let mut scores = if sampling.guidance_scale != 1.0 {
        let (cond, uncond) = (last.narrow(0, 0, b), last.narrow(0, b, b));
        &uncond + (&cond - &uncond) * sampling.guidance_scale
    } else {
        last
    };
    match allowed {
        Allowed::Force(id) => Tensor::full([b], id, (Kind::Int64, device)),
        constraint => {
            if let Allowed::Mask(m) = &constraint {
                scores = scores.masked_fill(&m.logical_not().to_device(device), f64::NEG_INFINITY);
            }
            let warped = if sampling.greedy { scores } else { warp(&scores, sampling) };
            match (sampling.draws, sampling.greedy) {
                (DrawSource::Torch, false) => warped.softmax(-1, Kind::Float).multinomial(1, false).view([b]),
                _ => pick(&warped, sampling.greedy, seeds, step as u64),
            }
        }
    }
}

/// Generates `max_new_tokens` tokens after `prompt [1, T]` (or `[2, T]` left-padded with
/// `attention_mask` when guiding: row 0 conditional, row 1 unconditional). `allowed(step)`
/// constrains each step. Returns the new tokens. One seed's [`generate_batch`].
pub fn generate(
    model: &Chameleon,
    prompt: &Tensor,
    attention_mask: Option<&Tensor>,
    max_new_tokens: usize,
    sampling: &TokenSampling,
    seed: u64,
    allowed: impl FnMut(usize) -> Allowed,
) -> Result<Vec<i64>> {
    let mut out = generate_batch(model, prompt, attention_mask, max_new_tokens, sampling, &[seed], allowed)?;
    Ok(out.pop().expect("one sequence"))
}

/// Generates `max_new_tokens` tokens for each of `B = seeds.len()` sequences at once. `prompts`
/// holds `B` rows, or `2B` when guiding (rows `0..B` conditional, `B..2B` unconditional, row `i`
/// and `B + i` guiding each other), left-padded to one length with `attention_mask [rows, T]`
/// (1 keep, 0 pad). Each step is one forward of every row over a preallocated KV cache; guidance,
/// the constraint of `allowed(step)`, temperature, top-k, top-p and the draw all happen on the
/// model's device, and the tokens come to the host once, at the end. Sequence `i` draws from
/// `seeds[i]`, so it gets the tokens it gets alone (up to the float rounding of a wider batch).
/// Torch draws (one global generator) sample one sequence at a time only.
pub fn generate_batch(
    model: &Chameleon,
    prompts: &Tensor,
    attention_mask: Option<&Tensor>,
    max_new_tokens: usize,
    sampling: &TokenSampling,
    seeds: &[u64],
    mut allowed: impl FnMut(usize) -> Allowed,
) -> Result<Vec<Vec<i64>>> {
    let (rows, t) = prompts.size2()?;
    let b = seeds.len() as i64;
    let guided = sampling.guidance_scale != 1.0;
    let bad = |message: String| ModelError::Config { what: "generate".into(), message };
    if b == 0 || rows != if guided { 2 * b } else { b } {
        return Err(bad(format!(
            "{rows} prompt rows for {b} seeds; expected one a seed, or two (conditional, unconditional) with guidance"
        )));
    }
    if sampling.draws == DrawSource::Torch && b > 1 && !sampling.greedy {
        return Err(bad(format!("torch draws sample one sequence at a time, not {b}")));
    }
    if max_new_tokens == 0 {
        return Ok(vec![Vec::new(); b as usize]);
    }
    let device = prompts.device();
    let capacity = t + max_new_tokens as i64;
    let mut cache = KvCache::with_capacity(capacity);
    // The padding mask, preallocated: every generated position is kept.
    let full_mask = match attention_mask {
        Some(m) => {
            let full = Tensor::ones([rows, capacity], (m.kind(), device));
            full.narrow(1, 0, t).copy_(m);
            Some(full)
        }
        None => None,
    };
    let mask_to = |len: i64| full_mask.as_ref().map(|m| m.narrow(1, 0, len));
    let mut logits = tch::no_grad(|| model.decode(prompts, mask_to(t).as_ref(), Some(&mut cache)))?;
    if sampling.draws == DrawSource::Torch {
        tch::manual_seed(seeds[0] as i64);
    }
    let out = Tensor::zeros([b, max_new_tokens as i64], (Kind::Int64, device));
    for step in 0..max_new_tokens {
        let token = next_tokens(&logits, b, sampling, seeds, step, allowed(step));
        out.narrow(1, step as i64, 1).copy_(&token.view([b, 1]));
        if step + 1 == max_new_tokens {
            break;
        }
        let next = if guided { Tensor::cat(&[&token, &token], 0) } else { token }.view([rows, 1]);
        let len = t + step as i64 + 1;
        logits = tch::no_grad(|| model.decode(&next, mask_to(len).as_ref(), Some(&mut cache)))?;
    }
    Ok(Vec::<Vec<i64>>::try_from(out.to_device(tch::Device::Cpu))?)
}
