//! LlamaGen's text-to-image GPT (`autoregressive/models/gpt.py` of the LlamaGen repository):
//! a caption embedder (`cls_embedding.cap_proj`: Linear → GELU(tanh) → Linear from 2048-d Flan-T5
//! states, with the learnt-free `uncond_embedding` replacing a dropped caption), `tok_embeddings`
//! over VQ codes, Llama blocks (`attention.wqkv` / `wo`, SwiGLU `feed_forward.w1/w2/w3`, RMSNorms
//! `attention_norm`, `ffn_norm`) with **2D rotary positions** over the image grid (the caption
//! positions get zero rotations, as in the reference), a final `norm` and `output`. No biases.
//! Variable paths are the reference checkpoint's keys (its `"model"` state dict, converted to
//! safetensors by `tools/convert_llamagen.py`).
//!
//! The sequence is `[caption (cls_token_num positions), codes[..-1]]`; the logits from position
//! `cls_token_num - 1` on predict the codes.

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::chameleon::{grouped_attention, KvCache, RmsNorm};
use crate::error::{ModelError, Result};
use crate::lora::{LoraLinear, LoraSpec};

/// How fresh parameters are initialised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamInit {
    /// The reference's: normal(0, 0.02), the output layer zero.
    #[default]
    Reference,
    /// All zeros (lazily allocated; for shape checks of large configs before loading weights).
    Zeros,
}

/// The `ModelArgs` of the reference (the fields the architecture needs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaGenConfig {
    /// Width.
    pub dim: i64,
    /// Blocks.
    pub n_layer: i64,
    /// Heads.
    pub n_head: i64,
    /// Key/value heads (the reference's checkpoints use `n_head`).
    pub n_kv_head: Option<i64>,
    /// FFN width rounding.
    pub multiple_of: i64,
    /// Optional FFN width multiplier.
    pub ffn_dim_multiplier: Option<f64>,
    /// RoPE base.
    pub rope_base: f64,
    /// RMSNorm ε.
    pub norm_eps: f64,
    /// VQ codebook size.
    pub vocab_size: i64,
    /// Caption positions (120 for T2I).
    pub cls_token_num: i64,
    /// Caption feature width (2048: Flan-T5-XL).
    pub caption_dim: i64,
    /// Image tokens per side (16 at 256 px, 32 at 512 px).
    pub grid_size: i64,
    /// Probability of replacing a caption with the unconditional embedding in training.
    pub class_dropout_prob: f64,
    /// Initialisation of fresh weights.
    #[serde(default)]
    pub init: ParamInit,
}

impl LlamaGenConfig {
    /// `GPT-XL` for T2I (36 layers, 20 heads, width 1280) at `image_size` pixels (VQ-16).
    pub fn gpt_xl_t2i(image_size: i64) -> Self {
        LlamaGenConfig {
            dim: 1280,
            n_layer: 36,
            n_head: 20,
            n_kv_head: None,
            multiple_of: 256,
            ffn_dim_multiplier: None,
            rope_base: 10000.0,
            norm_eps: 1e-5,
            vocab_size: 16384,
            cls_token_num: 120,
            caption_dim: 2048,
            grid_size: image_size / 16,
            class_dropout_prob: 0.1,
            init: ParamInit::Reference,
        }
    }

    /// The SwiGLU width: `⌈(2/3 · 4 · dim) · multiplier / multiple_of⌉ · multiple_of`.
    pub fn ffn_dim(&self) -> i64 {
        let mut hidden = (2 * 4 * self.dim) / 3;
        if let Some(m) = self.ffn_dim_multiplier {
            hidden = (m * hidden as f64) as i64;
        }
        self.multiple_of * ((hidden + self.multiple_of - 1) / self.multiple_of)
    }

    fn kv_heads(&self) -> i64 {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config { what: "llamagen config".into(), message: m });
        if self.dim % self.n_head != 0 || (self.dim / self.n_head) % 4 != 0 {
            return bad(format!(
                "dim {} over {} heads must give a head width divisible by 4",
                self.dim, self.n_head
            ));
        }
        if self.n_head % self.kv_heads() != 0 {
            return bad(format!(
                "{} heads are not a multiple of {} key/value heads",
                self.n_head,
                self.kv_heads()
            ));
        }
        Ok(())
    }
}

/// The 2D rotary table `[cls + grid², head_dim / 2, 2]` (cos, sin): zeros for the caption
/// positions, then row-major cells whose first half of frequencies rotate by the row and second
/// half by the column.
pub fn rope_2d(cfg: &LlamaGenConfig, device: Device) -> Tensor {
    let half = cfg.dim / cfg.n_head / 2;
    let exps = Tensor::arange_start_step(0, half, 2, (Kind::Int64, device))
        .narrow(0, 0, half / 2)
        .to_kind(Kind::Float)
        / half as f64;
    let freqs = Tensor::from(cfg.rope_base).to_device(device).to_kind(Kind::Float).pow(&exps).reciprocal(); // [half/2]
    let t = Tensor::arange(cfg.grid_size, (Kind::Float, device));
    let f = t.outer(&freqs); // [g, half/2]
    let g = cfg.grid_size;
    let grid = Tensor::cat(
        &[f.unsqueeze(1).expand([g, g, half / 2], false), f.unsqueeze(0).expand([g, g, half / 2], false)],
        -1,
    ); // [g, g, half]
    let cache = Tensor::stack(&[grid.cos(), grid.sin()], -1).reshape([g * g, half, 2]);
    Tensor::cat(&[Tensor::zeros([cfg.cls_token_num, half, 2], (Kind::Float, device)), cache], 0)
}

/// Rotates adjacent pairs of `x [B, T, H, hd]` by `table [T, hd/2, 2]`.
fn apply_rope(x: &Tensor, table: &Tensor) -> Tensor {
    let (b, t, h, hd) = x.size4().expect("[B, T, H, hd]");
    let xs = x.to_kind(Kind::Float).reshape([b, t, h, hd / 2, 2]);
    let (x0, x1) = (xs.select(-1, 0), xs.select(-1, 1));
    let tab = table.view([1, t, 1, hd / 2, 2]);
    let (cos, sin) = (tab.select(-1, 0), tab.select(-1, 1));
    Tensor::stack(&[&x0 * &cos - &x1 * &sin, &x1 * &cos + &x0 * &sin], -1)
        .reshape([b, t, h, hd])
        .to_kind(x.kind())
}

fn linear(vs: nn::Path, i: i64, o: i64, init: ParamInit, zero: bool, lora: Option<LoraSpec>) -> LoraLinear {
    let ws_init = match (init, zero) {
        (ParamInit::Reference, false) => nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        _ => nn::Init::Const(0.0),
    };
    LoraLinear::new(vs, i, o, nn::LinearConfig { bias: false, ws_init, bs_init: None }, lora)
}

#[derive(Debug)]
struct Block {
    wqkv: LoraLinear,
    wo: LoraLinear,
    w1: LoraLinear,
    w2: LoraLinear,
    w3: LoraLinear,
    attention_norm: RmsNorm,
    ffn_norm: RmsNorm,
    heads: i64,
    kv_heads: i64,
}

impl Block {
    fn new(vs: nn::Path, cfg: &LlamaGenConfig, lora: Option<LoraSpec>) -> Self {
        let (d, hd, kv) = (cfg.dim, cfg.dim / cfg.n_head, cfg.kv_heads());
        let a = &vs / "attention";
        let f = &vs / "feed_forward";
        let ffn = cfg.ffn_dim();
        Block {
            wqkv: linear(&a / "wqkv", d, d + 2 * kv * hd, cfg.init, false, lora),
            wo: linear(&a / "wo", d, d, cfg.init, false, lora),
            w1: linear(&f / "w1", d, ffn, cfg.init, false, lora),
            w2: linear(&f / "w2", ffn, d, cfg.init, false, lora),
            w3: linear(&f / "w3", d, ffn, cfg.init, false, lora),
            attention_norm: RmsNorm::new(&vs / "attention_norm", d, cfg.norm_eps),
            ffn_norm: RmsNorm::new(&vs / "ffn_norm", d, cfg.norm_eps),
            heads: cfg.n_head,
            kv_heads: kv,
        }
    }

    fn forward(
        &self,
        xs: &Tensor,
        rope: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let (b, t, d) = xs.size3().expect("[B, T, D]");
        let hd = d / self.heads;
        let qkv = self.wqkv.forward(&self.attention_norm.forward(xs));
        let q = qkv.narrow(-1, 0, d).view([b, t, self.heads, hd]);
        let k = qkv.narrow(-1, d, self.kv_heads * hd).view([b, t, self.kv_heads, hd]);
        let v = qkv.narrow(-1, d + self.kv_heads * hd, self.kv_heads * hd).view([b, t, self.kv_heads, hd]);
        let (q, k) = (apply_rope(&q, rope).transpose(1, 2), apply_rope(&k, rope).transpose(1, 2));
        let v = v.transpose(1, 2);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let out = grouped_attention(&q, &k, &v, mask, false);
        let h = xs + self.wo.forward(&out.transpose(1, 2).reshape([b, t, d]));
        let n = self.ffn_norm.forward(&h);
        &h + self.w2.forward(&(self.w1.forward(&n).silu() * self.w3.forward(&n)))
    }
}

/// LlamaGen's T2I GPT.
#[derive(Debug)]
pub struct LlamaGen {
    fc1: LoraLinear,
    fc2: LoraLinear,
    uncond_embedding: Tensor,
    tok_embeddings: nn::Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    output: LoraLinear,
    rope: Tensor,
    config: LlamaGenConfig,
}

impl LlamaGen {
    /// Creates the variables under `vs` (the state dict's root).
    pub fn new(vs: nn::Path, cfg: &LlamaGenConfig, lora: Option<LoraSpec>) -> Result<Self> {
        cfg.check()?;
        let cap = &vs / "cls_embedding";
        let proj = &cap / "cap_proj";
        let std = match cfg.init {
            ParamInit::Reference => nn::Init::Randn { mean: 0.0, stdev: 0.02 },
            ParamInit::Zeros => nn::Init::Const(0.0),
        };
        let uncond_init = match cfg.init {
            ParamInit::Reference => {
                nn::Init::Randn { mean: 0.0, stdev: 1.0 / (cfg.caption_dim as f64).sqrt() }
            }
            ParamInit::Zeros => nn::Init::Const(0.0),
        };
        let uncond_embedding =
            cap.var("uncond_embedding", &[cfg.cls_token_num, cfg.caption_dim], uncond_init);
        Ok(LlamaGen {
            fc1: linear(&proj / "fc1", cfg.caption_dim, cfg.dim, cfg.init, false, None),
            fc2: linear(&proj / "fc2", cfg.dim, cfg.dim, cfg.init, false, None),
            uncond_embedding,
            tok_embeddings: crate::nn::embedding(
                &vs / "tok_embeddings",
                cfg.vocab_size,
                cfg.dim,
                nn::EmbeddingConfig { ws_init: std, ..Default::default() },
            ),
            layers: (0..cfg.n_layer).map(|i| Block::new(&vs / "layers" / i, cfg, lora)).collect(),
            norm: RmsNorm::new(&vs / "norm", cfg.dim, cfg.norm_eps),
            output: linear(&vs / "output", cfg.dim, cfg.vocab_size, cfg.init, true, None),
            rope: rope_2d(cfg, vs.device()),
            config: cfg.clone(),
        })
    }

    /// The config.
    pub fn config(&self) -> &LlamaGenConfig {
        &self.config
    }

    /// The device its weights are on.
    pub fn device(&self) -> Device {
        self.rope.device()
    }

    /// Caption embeddings `[B, cls, dim]`; rows with `drop[i]` use the unconditional embedding.
    pub fn embed_caption(&self, caption: &Tensor, drop: &[bool]) -> Result<Tensor> {
        let c = &self.config;
        if caption.size() != [drop.len() as i64, c.cls_token_num, c.caption_dim] {
            return Err(ModelError::Config {
                what: "caption features".into(),
                message: format!(
                    "expected [{}, {}, {}], got {:?}",
                    drop.len(),
                    c.cls_token_num,
                    c.caption_dim,
                    caption.size()
                ),
            });
        }
        let keep =
            Tensor::from_slice(&drop.iter().map(|&d| !d).collect::<Vec<_>>()).to_device(caption.device());
        let keep = keep.view([-1, 1, 1]);
        let features = caption
            .to_kind(self.uncond_embedding.kind())
            .where_self(&keep, &self.uncond_embedding.unsqueeze(0));
        Ok(self.fc2.forward(&self.fc1.forward(&features).gelu("tanh")))
    }

    /// Logits `[B, T, V]` for a prefix of caption embeddings `[B, cls, dim]` followed by `codes`
    /// `[B, N]` (N ≤ grid² − 1 in training). With a cache, `codes` continue the cached sequence
    /// and `caption` is `None`. `caption_mask` `[B, cls]` (1 for a caption token, 0 for padding;
    /// the same on every call of a cached sequence) hides the padded caption positions from every
    /// query, as LlamaGen's attention mask does; each position still sees itself, so a padded one
    /// attends to something. `None`: every caption position is a token.
    pub fn forward(
        &self,
        caption: Option<&Tensor>,
        caption_mask: Option<&Tensor>,
        codes: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        if codes.numel() > 0 {
            let (lo, hi) = (codes.min().int64_value(&[]), codes.max().int64_value(&[]));
            if lo < 0 || hi >= c.vocab_size {
                return Err(ModelError::Config {
                    what: "image codes".into(),
                    message: format!("codes span {lo}..={hi}, the vocabulary has {}", c.vocab_size),
                });
            }
        }
        let mut h = self.tok_embeddings.forward(codes);
        if let Some(cap) = caption {
            h = Tensor::cat(&[cap.to_kind(h.kind()), h], 1);
        }
        let past = cache.as_ref().map(|k| k.len()).unwrap_or(0);
        let t = h.size()[1];
        let total = c.cls_token_num + c.grid_size * c.grid_size;
        if past + t > total {
            return Err(ModelError::Config {
                what: "token sequence".into(),
                message: format!(
                    "{} positions exceed the {total} of a {g}x{g} grid with its caption",
                    past + t,
                    g = c.grid_size
                ),
            });
        }
        let rope = self.rope.narrow(0, past, t);
        let mask = match caption_mask {
            None => (t > 1).then(|| {
                Tensor::full([t, past + t], f64::from(f32::MIN), (h.kind(), h.device()))
                    .triu(past + 1)
                    .view([1, 1, t, past + t])
            }),
            Some(m) => Some(self.caption_attention_mask(m, past, t, h.kind())?),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, &rope, mask.as_ref(), cache.as_deref_mut().map(|k| (k, i)));
        }
        Ok(self.output.forward(&self.norm.forward(&h)))
    }
}

impl LlamaGen {
    /// The additive mask `[B, 1, T, past + T]` of `T` queries after `past` cached positions:
    /// causal, the padded caption keys hidden, each query's own key always seen.
    fn caption_attention_mask(&self, caption_mask: &Tensor, past: i64, t: i64, kind: Kind) -> Result<Tensor> {
        let cls = self.config.cls_token_num;
        let b = caption_mask.size()[0];
        if caption_mask.size() != [b, cls] {
            return Err(ModelError::Config {
                what: "caption mask".into(),
                message: format!("expected [B, {cls}], got {:?}", caption_mask.size()),
            });
        }
        let device = caption_mask.device();
        let keys = past + t;
        let seen = Tensor::ones([b, keys], (Kind::Bool, device));
        let n = cls.min(keys);
        seen.narrow(1, 0, n).copy_(&caption_mask.narrow(1, 0, n).ne(0));
        let causal = Tensor::ones([t, keys], (Kind::Bool, device)).tril(past);
        let own = Tensor::zeros([t, keys], (Kind::Bool, device));
        own.narrow(1, past, t).copy_(&Tensor::eye(t, (Kind::Bool, device)));
        let allowed = seen.view([b, 1, 1, keys]).logical_and(&causal.view([1, 1, t, keys])).logical_or(&own);
        Ok(Tensor::zeros([b, 1, t, keys], (kind, device))
            .masked_fill(&allowed.logical_not(), f64::from(f32::MIN)))
    }
}

impl LlamaGen {
    /// Next-token cross-entropy and z-loss of `codes [B, N]` after the captions `[B, cls, caption_dim]`
    /// (rows with `drop[i]` use the unconditional embedding; `caption_mask` as in
    /// [`LlamaGen::forward`], kept for dropped rows as LlamaGen keeps it): the logits from position
    /// `cls - 1` on predict every code.
    pub fn losses(
        &self,
        caption: &Tensor,
        caption_mask: Option<&Tensor>,
        drop: &[bool],
        codes: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let cls = self.config.cls_token_num;
        let n = codes.size()[1];
        let emb = self.embed_caption(caption, drop)?;
        let logits =
            self.forward(Some(&emb), caption_mask, &codes.narrow(1, 0, n - 1), None)?.to_kind(Kind::Float);
        let logits = logits.narrow(1, cls - 1, n).flatten(0, 1); // [B·N, V]
        let ce =
            logits.cross_entropy_loss::<Tensor>(&codes.flatten(0, 1), None, tch::Reduction::Mean, -100, 0.0);
        let z = logits.logsumexp([-1], false).square().mean(Kind::Float);
        Ok((ce, z))
    }

    /// Samples a full code grid (`grid²` codes, row-major) for one caption `[1, cls, caption_dim]`:
    /// KV-cached, with classifier-free guidance against the unconditional embedding when
    /// `sampling.guidance_scale != 1` (both rows in one batch), deterministic given `seed`. One
    /// seed's [`LlamaGen::generate_batch`].
    pub fn generate(
        &self,
        caption: &Tensor,
        caption_mask: Option<&Tensor>,
        sampling: &super::generate::TokenSampling,
        seed: u64,
    ) -> Result<Vec<i64>> {
        Ok(self.generate_batch(caption, caption_mask, sampling, &[seed])?.pop().expect("one grid"))
    }

    /// Samples one code grid per seed, caption `i` of `captions [B, cls, caption_dim]` with
    /// `seeds[i]`, all in one batch: `2B` rows with guidance (the unconditional embedding in rows
    /// `B..2B`), a preallocated KV cache, guidance, warping and the draw on the device, and the
    /// codes copied to the host once. Grid `i` is the one `seeds[i]` gives alone (up to the float
    /// rounding of a wider batch). `caption_mask` as in [`LlamaGen::forward`]; the unconditional
    /// rows keep their caption's mask, as LlamaGen's sampler does.
    pub fn generate_batch(
        &self,
        captions: &Tensor,
        caption_mask: Option<&Tensor>,
        sampling: &super::generate::TokenSampling,
        seeds: &[u64],
    ) -> Result<Vec<Vec<i64>>> {
        use super::generate::{next_tokens, Allowed};
        let b = seeds.len() as i64;
        if b == 0 || captions.size().first() != Some(&b) {
            return Err(ModelError::Config {
                what: "generate".into(),
                message: format!("{:?} captions for {b} seeds", captions.size()),
            });
        }
        let guided = sampling.guidance_scale != 1.0;
        let emb = if guided {
            let drop: Vec<bool> = (0..2 * b).map(|r| r >= b).collect();
            self.embed_caption(&Tensor::cat(&[captions, captions], 0), &drop)?
        } else {
            self.embed_caption(captions, &vec![false; b as usize])?
        };
        let mask = caption_mask.map(|m| if guided { Tensor::cat(&[m, m], 0) } else { m.shallow_clone() });
        let rows = emb.size()[0];
        let device = emb.device();
        let n = self.config.grid_size * self.config.grid_size;
        let mut cache = KvCache::with_capacity(self.config.cls_token_num + n);
        let empty = Tensor::zeros([rows, 0], (Kind::Int64, device));
        let out = Tensor::zeros([b, n], (Kind::Int64, device));
        let mut logits = tch::no_grad(|| self.forward(Some(&emb), mask.as_ref(), &empty, Some(&mut cache)))?;
        for step in 0..n {
            let token = next_tokens(&logits, b, sampling, seeds, step as usize, Allowed::Any);
            out.narrow(1, step, 1).copy_(&token.view([b, 1]));
            if step + 1 < n {
                let next = if guided { Tensor::cat(&[&token, &token], 0) } else { token }.view([rows, 1]);
                logits = tch::no_grad(|| self.forward(None, mask.as_ref(), &next, Some(&mut cache)))?;
            }
        }
        Ok(Vec::<Vec<i64>>::try_from(out.to_device(Device::Cpu))?)
    }
}

/// LlamaGen's caption preparation from a text encoder's right-padded output (`states [B, L, D]`
/// with `mask [B, L]`, T5's): each row's `n` valid states moved to the end and the padding in
/// front zeroed, and the mask flipped to match (the reference's sampler rotates
/// `cat(states[n:], states[:n])` and multiplies by the flipped mask; its training data are left
/// padded the same way). `L` must be the GPT's `cls_token_num`.
///
/// # Shapes
/// `states [B, L, D]`, `mask [B, L]` → `(features [B, L, D], mask [B, L])`.
pub fn left_padded_captions(states: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, l, _) = states.size3().map_err(|e| ModelError::Config {
        what: "caption states".into(),
        message: format!("expected [B, L, D]: {e}"),
    })?;
    if mask.size() != [b, l] {
        return Err(ModelError::Config {
            what: "caption mask".into(),
            message: format!("expected [{b}, {l}], got {:?}", mask.size()),
        });
    }
    let valid: Vec<i64> =
        Vec::try_from(mask.ne(0).sum_dim_intlist(1, false, Kind::Int64).to_device(Device::Cpu))?;
    let rows: Vec<Tensor> =
        valid.iter().enumerate().map(|(i, &n)| states.get(i as i64).roll([l - n], [0])).collect();
    let flipped = mask.flip([1]);
    let features = Tensor::stack(&rows, 0) * flipped.unsqueeze(-1).to_kind(states.kind());
    Ok((features, flipped))
}
