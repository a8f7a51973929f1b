//! The Chameleon / Lumina-mGPT decoder (transformers' `ChameleonForConditionalGeneration`): one
//! vocabulary for text and image tokens, Llama-style pre-norm blocks (RMSNorm, SwiGLU MLP,
//! grouped-query attention with rotary positions) with Chameleon's per-head qk-norm (LayerNorm
//! statistics over each head, a separate affine per head), optionally the "swin" norm placement,
//! and the VQ-VAE image tokenizer under `model.vqmodel`. Variable paths are the checkpoint's keys
//! (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`, …). LoRA adapters can sit on every
//! projection (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
//!
//! Decoding runs with a [`KvCache`]: a prefill over the prompt, then one token per step.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::chameleon_vq::{ChameleonVqConfig, ChameleonVqVae};
use crate::error::{ModelError, Result};
use crate::lora::{LoraLinear, LoraSpec};
use crate::recompute::Segment;

/// RoPE parameters (transformers 5 `rope_parameters`).
#[derive(Clone, Debug, Deserialize)]
pub struct RopeParameters {
    /// Base θ.
    pub rope_theta: f64,
    /// Only `default` is supported.
    #[serde(default = "default_rope")]
    pub rope_type: String,
}

fn default_rope() -> String {
    "default".into()
}

fn rms_eps() -> f64 {
    1e-5
}

fn silu() -> String {
    "silu".into()
}

/// transformers' `ChameleonConfig` (the fields the architecture needs).
#[derive(Clone, Debug, Deserialize)]
pub struct ChameleonConfig {
    /// Vocabulary (text and image tokens).
    pub vocab_size: i64,
    /// Width.
    pub hidden_size: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// Blocks.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    /// Longest sequence.
    pub max_position_embeddings: i64,
    /// RMSNorm ε.
    #[serde(default = "rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE (transformers 5).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// RoPE base (older configs).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Norm after attention/MLP instead of before (Chameleon-30B).
    #[serde(default)]
    pub swin_norm: bool,
    /// MLP activation (`silu`).
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// The VQ-VAE.
    pub vq_config: ChameleonVqConfig,
    /// Token names to ids (image tokens are named `IMGIMG<digits as A-J>Z`).
    pub vocabulary_map: BTreeMap<String, i64>,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// Begin-of-sequence id.
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    /// `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl ChameleonConfig {
    /// Reads and checks a `config.json`; errors name the file and the field.
    pub fn from_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        let cfg: ChameleonConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { what: path.display().to_string(), message: e.to_string() })?;
        cfg.check().map_err(|message| ModelError::Config { what: path.display().to_string(), message })?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not divisible by {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err(format!(
                "{} heads are not a multiple of {} key/value heads",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!("unsupported hidden_act `{}`", self.hidden_act));
        }
        if let Some(r) = &self.rope_parameters {
            if r.rope_type != "default" {
                return Err(format!("unsupported rope_type `{}`", r.rope_type));
            }
        }
        Ok(())
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one head.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// RoPE base.
    pub fn rope_base(&self) -> f64 {
        self.rope_parameters.as_ref().map(|r| r.rope_theta).or(self.rope_theta).unwrap_or(10000.0)
    }
}

/// The image part of the vocabulary: which ids are image tokens and which VQ code each stands for.
#[derive(Clone, Debug)]
pub struct ImageVocabulary {
    code_to_token: Vec<i64>,
    token_to_code: BTreeMap<i64, i64>,
    /// The `<image>` placeholder id, if the vocabulary has one.
    pub image_placeholder: Option<i64>,
}

impl ImageVocabulary {
    /// Reads the `IMGIMG…Z` entries of a vocabulary map (digits spelled `A`–`J`).
    pub fn from_map(map: &BTreeMap<String, i64>, codebook: i64) -> Result<Self> {
        let mut token_to_code = BTreeMap::new();
        for (name, &id) in map {
            let Some(body) = name.strip_prefix("IMGIMG") else { continue };
            let digits: String = body
                .strip_suffix('Z')
                .unwrap_or(body)
                .chars()
                .map(|c| if ('A'..='J').contains(&c) { char::from(b'0' + (c as u8 - b'A')) } else { c })
                .collect();
            let code: i64 = digits.parse().map_err(|_| ModelError::Config {
                what: "vocabulary_map".into(),
                message: format!("image token `{name}` does not spell a code"),
            })?;
            token_to_code.insert(id, code);
        }
        let mut code_to_token = vec![-1; codebook as usize];
        for (&id, &code) in &token_to_code {
            if let Some(slot) = code_to_token.get_mut(code as usize) {
                *slot = id;
            }
        }
        if let Some(code) = code_to_token.iter().position(|&t| t < 0) {
            return Err(ModelError::Config {
                what: "vocabulary_map".into(),
                message: format!("no image token for VQ code {code} (codebook of {codebook})"),
            });
        }
        Ok(ImageVocabulary { code_to_token, token_to_code, image_placeholder: map.get("<image>").copied() })
    }

    /// Vocabulary ids of codes (any shape).
    pub fn codes_to_tokens(&self, codes: &Tensor) -> Tensor {
        let table = Tensor::from_slice(&self.code_to_token).to_device(codes.device());
        table.index_select(0, &codes.flatten(0, -1)).view(codes.size().as_slice())
    }

    /// Codes of image-token ids; an id that is not an image token is an error naming it.
    pub fn tokens_to_codes(&self, tokens: &[i64]) -> Result<Vec<i64>> {
        tokens
            .iter()
            .map(|t| {
                self.token_to_code.get(t).copied().ok_or_else(|| ModelError::Config {
                    what: "image tokens".into(),
                    message: format!("token {t} is not an image token"),
                })
            })
            .collect()
    }

    /// Every image-token id, ascending.
    pub fn image_token_ids(&self) -> Vec<i64> {
        self.token_to_code.keys().copied().collect()
    }
}

/// Chameleon's RMSNorm (statistics in float32).
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `weight` at `vs`.
    pub fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm { weight: vs.var("weight", &[dim], nn::Init::Const(1.0)), eps }
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let x = xs.to_kind(Kind::Float);
        let var = x.square().mean_dim(-1, true, Kind::Float);
        &self.weight * (x * (var + self.eps).rsqrt()).to_kind(xs.kind())
    }
}

/// Per-head LayerNorm: statistics over each head's width, a separate affine per head.
#[derive(Debug)]
struct HeadNorm {
    weight: Tensor,
    bias: Tensor,
    head_dim: i64,
}

impl HeadNorm {
    fn new(vs: nn::Path, heads: i64, head_dim: i64) -> Self {
        HeadNorm {
            weight: vs.var("weight", &[heads, head_dim], nn::Init::Const(1.0)),
            bias: vs.var("bias", &[heads, head_dim], nn::Init::Const(0.0)),
            head_dim,
        }
    }

    /// `[.., H, hd]` → same.
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.layer_norm([self.head_dim], None::<Tensor>, None::<Tensor>, 1e-5, false) * &self.weight
            + &self.bias
    }
}

/// Rotary position tables.
#[derive(Debug)]
struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    fn new(head_dim: i64, base: f64, device: Device) -> Self {
        let exponents = Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device)).to_kind(Kind::Float)
            / head_dim as f64;
        let inv_freq = Tensor::from(base).to_device(device).to_kind(Kind::Float).pow(&exponents).reciprocal();
        Rope { inv_freq }
    }

    /// `(cos, sin)` `[B, T, hd]` for `positions [B, T]`.
    fn tables(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq; // [B, T, hd/2]
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1)
}

/// Scaled dot-product attention of `q [B, H, T, hd]` over `k`, `v` `[B, Hkv, S, hd]` with
/// grouped-query sharing (each key/value head serves `H / Hkv` query heads), as transformers'
/// `repeat_kv` does; `mask` is additive `[B|1, 1, T, S]`, or with `causal` (and no mask) SDPA's own
/// causal flag, which lets libtorch pick its fused kernels.
pub(crate) fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
) -> Tensor {
    let rep = q.size()[1] / k.size()[1];
    let expand = |x: &Tensor| {
        if rep == 1 {
            return x.shallow_clone();
        }
        let (b, kv, s, hd) = x.size4().expect("[B, Hkv, S, hd]");
        x.unsqueeze(2).expand([b, kv, rep, s, hd], false).reshape([b, kv * rep, s, hd])
    };
    Tensor::scaled_dot_product_attention(q, &expand(k), &expand(v), mask, 0.0, causal, None, false)
}

/// Keys and values of every layer so far, `[B, Hkv, T, hd]` each. Made with a capacity
/// ([`KvCache::with_capacity`]), each layer's buffers are allocated once, at the first append, for
/// that many positions, and every later step writes its keys and values in place: no step
/// reallocates or copies what is cached. Without one, each append concatenates.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    capacity: Option<i64>,
}

/// One layer's keys and values: the first `len` positions of the buffers are filled.
#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: i64,
}

impl KvCache {
    /// An empty cache that grows by concatenation.
    pub fn new() -> Self {
        KvCache::default()
    }

    /// An empty cache for at most `positions` positions (prompt and generated tokens), written in
    /// place.
    pub fn with_capacity(positions: i64) -> Self {
        KvCache { layers: Vec::new(), capacity: Some(positions) }
    }

    /// Positions cached.
    pub fn len(&self) -> i64 {
        self.layers.first().and_then(|l| l.as_ref()).map(|l| l.len).unwrap_or(0)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the batch rows `rows` (e.g. after dropping finished sequences).
    pub fn select_rows(&mut self, rows: &Tensor) {
        for l in self.layers.iter_mut().flatten() {
            l.k = l.k.index_select(0, rows);
            l.v = l.v.index_select(0, rows);
        }
    }

    /// Appends a layer's new keys and values and returns the whole sequence's (a view of the
    /// buffers when the cache has a capacity).
    pub(crate) fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let t = k.size()[2];
        let entry = match (self.layers[layer].take(), self.capacity) {
            (None, Some(cap)) if t <= cap => {
                let (b, h, _, hd) = k.size4().expect("[B, Hkv, T, hd]");
                let buffer = |x: &Tensor| {
                    let buf = Tensor::zeros([b, h, cap, hd], (x.kind(), x.device()));
                    buf.narrow(2, 0, t).copy_(x);
                    buf
                };
                LayerCache { k: buffer(&k), v: buffer(&v), len: t }
            }
            (None, _) => LayerCache { k, v, len: t },
            (Some(l), Some(_)) if l.len + t <= l.k.size()[2] => {
                l.k.narrow(2, l.len, t).copy_(&k);
                l.v.narrow(2, l.len, t).copy_(&v);
                LayerCache { len: l.len + t, ..l }
            }
            (Some(l), _) => {
                let (pk, pv) = (l.k.narrow(2, 0, l.len), l.v.narrow(2, 0, l.len));
                LayerCache { k: Tensor::cat(&[pk, k], 2), v: Tensor::cat(&[pv, v], 2), len: l.len + t }
            }
        };
        let out = (entry.k.narrow(2, 0, entry.len), entry.v.narrow(2, 0, entry.len));
        self.layers[layer] = Some(entry);
        out
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    q_norm: HeadNorm,
    k_norm: HeadNorm,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(vs: nn::Path, cfg: &ChameleonConfig, lora: Option<LoraSpec>) -> Self {
        let (d, hd, h, kv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads());
        let lin = nn::LinearConfig { bias: cfg.attention_bias, ..Default::default() };
        let proj = |name: &str, i: i64, o: i64| LoraLinear::new(&vs / name, i, o, lin, lora);
        Attention {
            q_proj: proj("q_proj", d, h * hd),
            k_proj: proj("k_proj", d, kv * hd),
            v_proj: proj("v_proj", d, kv * hd),
            o_proj: proj("o_proj", h * hd, d),
            q_norm: HeadNorm::new(&vs / "q_norm", h, hd),
            k_norm: HeadNorm::new(&vs / "k_norm", kv, hd),
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        }
    }

    fn forward(
        &self,
        xs: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        causal: bool,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let (b, t, _) = xs.size3().expect("[B, T, D]");
        let hd = self.head_dim;
        let q = self.q_norm.forward(&self.q_proj.forward(xs).view([b, t, self.heads, hd])).transpose(1, 2);
        let k = self.k_norm.forward(&self.k_proj.forward(xs).view([b, t, self.kv_heads, hd])).transpose(1, 2);
        let v = self.v_proj.forward(xs).view([b, t, self.kv_heads, hd]).transpose(1, 2);
        let (cos, sin) = (rope.0.unsqueeze(1), rope.1.unsqueeze(1)); // [B, 1, T, hd]
        let q = &q * &cos + rotate_half(&q) * &sin;
        let k = &k * &cos + rotate_half(&k) * &sin;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let out = grouped_attention(&q, &k, &v, mask, causal);
        self.o_proj.forward(&out.transpose(1, 2).reshape([b, t, self.heads * hd]))
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: LoraLinear,
    up_proj: LoraLinear,
    down_proj: LoraLinear,
}

impl Mlp {
    fn new(vs: nn::Path, cfg: &ChameleonConfig, lora: Option<LoraSpec>) -> Self {
        let lin = nn::LinearConfig { bias: cfg.mlp_bias, ..Default::default() };
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Mlp {
            gate_proj: LoraLinear::new(&vs / "gate_proj", d, i, lin, lora),
            up_proj: LoraLinear::new(&vs / "up_proj", d, i, lin, lora),
            down_proj: LoraLinear::new(&vs / "down_proj", i, d, lin, lora),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(xs).silu() * self.up_proj.forward(xs)))
    }
}

#[derive(Debug)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    swin: bool,
}

impl DecoderLayer {
    fn forward(
        &self,
        xs: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        causal: bool,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        if self.swin {
            let attn = self.self_attn.forward(xs, rope, mask, causal, cache);
            let h = xs + self.input_layernorm.forward(&attn);
            return &h + self.post_attention_layernorm.forward(&self.mlp.forward(&h));
        }
        let h = xs + self.self_attn.forward(&self.input_layernorm.forward(xs), rope, mask, causal, cache);
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
    }
}

/// `ChameleonForConditionalGeneration`.
#[derive(Debug)]
pub struct Chameleon {
    embed_tokens: nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: nn::Linear,
    rope: Rope,
    /// The image tokenizer.
    pub vq: ChameleonVqVae,
    /// Image tokens of the vocabulary.
    pub image_vocab: ImageVocabulary,
    config: ChameleonConfig,
}

impl Chameleon {
    /// Creates the variables under `vs` (the checkpoint root), with LoRA adapters on the
    /// projections `lora` targets.
    pub fn new(vs: nn::Path, cfg: &ChameleonConfig, lora: Option<LoraSpec>) -> Result<Self> {
        cfg.check().map_err(|message| ModelError::Config { what: "chameleon config".into(), message })?;
        let m = &vs / "model";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = &m / "layers" / i;
                DecoderLayer {
                    self_attn: Attention::new(&l / "self_attn", cfg, lora),
                    mlp: Mlp::new(&l / "mlp", cfg, lora),
                    input_layernorm: RmsNorm::new(&l / "input_layernorm", cfg.hidden_size, cfg.rms_norm_eps),
                    post_attention_layernorm: RmsNorm::new(
                        &l / "post_attention_layernorm",
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                    ),
                    swin: cfg.swin_norm,
                }
            })
            .collect();
        let embed_tokens =
            crate::nn::embedding(&m / "embed_tokens", cfg.vocab_size, cfg.hidden_size, Default::default());
        let lm_head = if cfg.tie_word_embeddings {
            nn::Linear { ws: embed_tokens.ws.shallow_clone(), bs: None }
        } else {
            crate::nn::linear(
                &vs / "lm_head",
                cfg.hidden_size,
                cfg.vocab_size,
                nn::LinearConfig { bias: false, ..Default::default() },
            )
        };
        Ok(Chameleon {
            embed_tokens,
            layers,
            norm: RmsNorm::new(&m / "norm", cfg.hidden_size, cfg.rms_norm_eps),
            lm_head,
            rope: Rope::new(cfg.head_dim(), cfg.rope_base(), vs.device()),
            vq: ChameleonVqVae::new(&m / "vqmodel", &cfg.vq_config)?,
            image_vocab: ImageVocabulary::from_map(&cfg.vocabulary_map, cfg.vq_config.num_embeddings)?,
            config: cfg.clone(),
        })
    }

    /// The config.
    pub fn config(&self) -> &ChameleonConfig {
        &self.config
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.embed_tokens.ws.device()
    }

    /// The element type of the weights.
    pub fn kind(&self) -> Kind {
        self.embed_tokens.ws.kind()
    }

    /// Checks that ids are inside the vocabulary and the sequence fits the context.
    pub fn check_ids(&self, ids: &Tensor, past: i64) -> Result<()> {
        let (_, t) = ids.size2().map_err(ModelError::from)?;
        if past + t > self.config.max_position_embeddings {
            return Err(ModelError::Config {
                what: "token sequence".into(),
                message: format!(
                    "{} positions exceed the context of {}",
                    past + t,
                    self.config.max_position_embeddings
                ),
            });
        }
        if ids.numel() > 0 {
            let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            if lo < 0 || hi >= self.config.vocab_size {
                return Err(ModelError::Config {
                    what: "token ids".into(),
                    message: format!("ids span {lo}..={hi}, the vocabulary has {}", self.config.vocab_size),
                });
            }
        }
        Ok(())
    }

    /// Logits `[B, T, V]` for `ids [B, T]` (no image-token masking). `attention_mask [B, S]`
    /// (1 keep, 0 pad; `S` = cached + new positions) supports left-padded batches; positions then
    /// count kept tokens only, as transformers does. With a cache, `ids` continue it.
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_masked(ids, attention_mask, cache, false)
    }

    /// [`Chameleon::forward`] for decoding: a prompt with no padding over an empty cache is masked
    /// by SDPA's causal flag instead of a mask tensor, so libtorch may use its fused (flash /
    /// memory-efficient) kernels; a padded batch keeps the explicit mask. The same logits up to
    /// float rounding.
    pub fn decode(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_masked(ids, attention_mask, cache, true)
    }

    fn forward_masked(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        fused_causal: bool,
    ) -> Result<Tensor> {
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        self.check_ids(ids, past)?;
        let (b, t) = ids.size2()?;
        let device = ids.device();
        let positions = match attention_mask {
            Some(m) => {
                let pos = m.to_kind(Kind::Int64).cumsum(-1, Kind::Int64) - 1;
                pos.clamp_min(0).narrow(1, past, t)
            }
            None => (Tensor::arange(t, (Kind::Int64, device)) + past).unsqueeze(0).expand([b, t], false),
        };
        let mut h = self.embed_tokens.forward(ids);
        let rope = self.rope.tables(&positions, h.kind());
        // Only the first call sees no cache: a causal flag is right for a square, unpadded block.
        let causal = fused_causal && attention_mask.is_none() && past == 0 && t > 1;
        let mask = if causal { None } else { self.mask(b, t, past, attention_mask, h.kind(), device) };
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, &rope, mask.as_ref(), causal, cache.as_deref_mut().map(|c| (c, i)));
        }
        Ok(self.head(&h))
    }

    /// The decoder as [`Segment`]s for training on whole sequences `ids [B, T]` (no cache, no
    /// padding mask): the embedding (`[ids] → [h]`), then one segment per layer (`[h] → [h]`). The
    /// final norm and the LM head are [`Chameleon::head`], so a loss can run them a chunk of
    /// positions at a time. Folded with [`crate::recompute::forward`] they are [`Chameleon::forward`].
    pub fn segments(&self, ids: &Tensor) -> Result<Vec<Segment<'_>>> {
        self.check_ids(ids, 0)?;
        let (b, t) = ids.size2()?;
        let device = ids.device();
        let positions = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0).expand([b, t], false);
        let kind = self.kind();
        let rope = self.rope.tables(&positions, kind);
        let mask = self.mask(b, t, 0, None, kind, device);
        let mut segments: Vec<Segment<'_>> =
            vec![Box::new(move |s: &[Tensor]| Ok(vec![self.embed_tokens.forward(&s[0])]))];
        for layer in &self.layers {
            let rope = (rope.0.shallow_clone(), rope.1.shallow_clone());
            let mask = mask.as_ref().map(Tensor::shallow_clone);
            segments.push(Box::new(move |s: &[Tensor]| {
                Ok(vec![layer.forward(&s[0], &rope, mask.as_ref(), false, None)])
            }));
        }
        Ok(segments)
    }

    /// Logits `[B, T, V]` of the last layer's hidden states `[B, T, D]` (final norm, LM head).
    pub fn head(&self, hidden: &Tensor) -> Tensor {
        self.lm_head.forward(&self.norm.forward(hidden))
    }

    /// Additive mask `[B, 1, T, past + T]`: causal, plus padding; `None` when nothing is masked.
    fn mask(
        &self,
        b: i64,
        t: i64,
        past: i64,
        attention_mask: Option<&Tensor>,
        kind: Kind,
        device: Device,
    ) -> Option<Tensor> {
        let s = past + t;
        let neg = crate::transformer::mask_min(kind);
        let causal =
            (t > 1).then(|| Tensor::full([t, s], neg, (kind, device)).triu(past + 1).view([1, 1, t, s]));
        let pad = attention_mask.map(|m| ((m.ones_like() - m).to_kind(kind) * neg).view([b, 1, 1, s]));
        match (causal, pad) {
            (Some(c), Some(p)) => Some((c + p).clamp_min(neg)),
            (Some(c), None) => Some(c),
            (None, Some(p)) => Some(p),
            (None, None) => None,
        }
    }

    /// Image-token ids `[B, h·w]` of `pixels [B, 3, R, R]` in `[-1, 1]`.
    pub fn image_tokens(&self, pixels: &Tensor) -> Result<Tensor> {
        let codes = self.vq.encode(pixels)?;
        Ok(self.image_vocab.codes_to_tokens(&codes).view([codes.size()[0], -1]))
    }
}
