//! The T5 encoder in the transformers `T5EncoderModel` layout (Raffel et al. 2020): LlamaGen's
//! caption encoder (flan-t5-xl), and SD3's and FLUX's T5 tower. Both feed-forward variants: the
//! original T5's ReLU (`feed_forward_proj = "relu"`) and T5 v1.1 / flan-T5's gated GELU
//! (`"gated-gelu"`: `gelu_tanh(wi_0 x) * wi_1 x`). Configured by the checkpoint's own
//! `config.json`; variable paths are its keys (`shared.weight`, `encoder.block.N.layer.…`), so a
//! `T5ForConditionalGeneration` checkpoint loads too, its decoder ignored.
//!
//! Differences from the pre-LayerNorm encoders of [`super`]: RMS norms without bias or mean
//! (computed in float32), no biases anywhere, unscaled attention scores, and one learned relative
//! position bias (bucketed, bidirectional) computed by the first block and added in every block.

use std::path::Path;

use serde::Deserialize;
use tch::{nn, nn::Module, Kind, Tensor};

use super::{mask_min, Activation};
use crate::error::{ModelError, Result};

fn eps() -> f64 {
    1e-6
}

fn buckets() -> i64 {
    32
}

fn max_distance() -> i64 {
    128
}

fn relu() -> String {
    "relu".into()
}

/// The fields of a transformers `T5Config` that the encoder needs.
#[derive(Clone, Debug, Deserialize)]
pub struct T5Config {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Width.
    pub d_model: i64,
    /// Width of one attention head (not `d_model / num_heads` in general).
    pub d_kv: i64,
    /// Feed-forward width.
    pub d_ff: i64,
    /// Encoder blocks.
    pub num_layers: i64,
    /// Heads.
    pub num_heads: i64,
    /// Relative position buckets.
    #[serde(default = "buckets")]
    pub relative_attention_num_buckets: i64,
    /// Distance beyond which positions share the last bucket.
    #[serde(default = "max_distance")]
    pub relative_attention_max_distance: i64,
    /// RMS norm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_epsilon: f64,
    /// `relu`, `gated-gelu`, `gated-silu`, …: the feed-forward's activation, gated or not.
    #[serde(default = "relu")]
    pub feed_forward_proj: String,
}

impl T5Config {
    /// Reads a transformers `config.json`.
    pub fn from_json(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { what: path.display().to_string(), message: e.to_string() })
    }

    /// The feed-forward's activation and whether it is gated, as transformers reads
    /// `feed_forward_proj` (`gated-gelu` means the tanh GELU).
    pub fn feed_forward(&self) -> Result<(Activation, bool)> {
        let unsupported = || ModelError::Config {
            what: "feed_forward_proj".into(),
            message: format!(
                "unsupported `{}` (expected `relu`, `gelu`, `gated-gelu`, `gated-silu`, …)",
                self.feed_forward_proj
            ),
        };
        let (gated, act) = match self.feed_forward_proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, self.feed_forward_proj.as_str()),
            Some(_) => return Err(unsupported()),
        };
        let act = if gated && act == "gelu" { "gelu_new" } else { act };
        Ok((Activation::from_hf(act).ok_or_else(unsupported)?, gated))
    }
}

/// T5's norm: `x / sqrt(mean(x²) + eps) * weight`, the statistics in float32, the result in the
/// weight's kind (half-precision weights) or float32.
fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let xs = xs.to_kind(Kind::Float);
    let variance = xs.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    let normed = xs * (variance + eps).rsqrt();
    let normed = match weight.kind() {
        Kind::Half | Kind::BFloat16 => normed.to_kind(weight.kind()),
        _ => normed,
    };
    weight * normed
}

fn dotted<'a>(vs: &nn::Path<'a>, key: &str) -> nn::Path<'a> {
    key.split('.').fold(vs.clone(), |p, part| &p / part)
}

fn no_bias(vs: &nn::Path, key: &str, i: i64, o: i64) -> nn::Linear {
    crate::nn::linear(dotted(vs, key), i, o, nn::LinearConfig { bias: false, ..Default::default() })
}

fn norm_weight(vs: &nn::Path, key: &str, dim: i64) -> Tensor {
    dotted(vs, key).var("weight", &[dim], crate::nn::init(nn::Init::Const(1.0)))
}

/// The feed-forward of a block.
#[derive(Debug)]
enum FeedForward {
    /// `wo(act(wi x))`.
    Plain { wi: nn::Linear, wo: nn::Linear },
    /// `wo(act(wi_0 x) * wi_1 x)`.
    Gated { wi_0: nn::Linear, wi_1: nn::Linear, wo: nn::Linear },
}

/// One encoder block: self-attention and feed-forward, each after an RMS norm, each residual.
#[derive(Debug)]
struct T5Block {
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    o: nn::Linear,
    attention_norm: Tensor,
    feed_forward: FeedForward,
    feed_forward_norm: Tensor,
}

/// The encoder (`T5EncoderModel`).
///
/// # Shapes
/// `input_ids [B, T]` (and the attention mask `[B, T]`, 1 for tokens, 0 for padding) →
/// `last_hidden_state [B, T, d_model]`.
#[derive(Debug)]
pub struct T5Encoder {
    shared: nn::Embedding,
    blocks: Vec<T5Block>,
    relative_attention_bias: Tensor,
    final_norm: Tensor,
    activation: Activation,
    config: T5Config,
}

impl T5Encoder {
    /// Creates the encoder's variables under `vs` (the checkpoint's root).
    pub fn new(vs: nn::Path, config: &T5Config) -> Result<Self> {
        let (activation, gated) = config.feed_forward()?;
        let c = config;
        let inner = c.num_heads * c.d_kv;
        let encoder = &vs / "encoder";
        let blocks = (0..c.num_layers)
            .map(|i| {
                let b = &encoder / "block" / i;
                let attention = &b / "layer" / 0;
                let sa = &attention / "SelfAttention";
                let ff = &b / "layer" / 1;
                let dense = &ff / "DenseReluDense";
                let feed_forward = if gated {
                    FeedForward::Gated {
                        wi_0: no_bias(&dense, "wi_0", c.d_model, c.d_ff),
                        wi_1: no_bias(&dense, "wi_1", c.d_model, c.d_ff),
                        wo: no_bias(&dense, "wo", c.d_ff, c.d_model),
                    }
                } else {
                    FeedForward::Plain {
                        wi: no_bias(&dense, "wi", c.d_model, c.d_ff),
                        wo: no_bias(&dense, "wo", c.d_ff, c.d_model),
                    }
                };
                T5Block {
                    q: no_bias(&sa, "q", c.d_model, inner),
                    k: no_bias(&sa, "k", c.d_model, inner),
                    v: no_bias(&sa, "v", c.d_model, inner),
                    o: no_bias(&sa, "o", inner, c.d_model),
                    attention_norm: norm_weight(&attention, "layer_norm", c.d_model),
                    feed_forward,
                    feed_forward_norm: norm_weight(&ff, "layer_norm", c.d_model),
                }
            })
            .collect();
        let relative_attention_bias =
            (&encoder / "block" / 0 / "layer" / 0 / "SelfAttention").sub("relative_attention_bias").var(
                "weight",
                &[c.relative_attention_num_buckets, c.num_heads],
                crate::nn::init(nn::Init::Randn { mean: 0.0, stdev: 1.0 }),
            );
        Ok(T5Encoder {
            shared: crate::nn::embedding(&vs / "shared", c.vocab_size, c.d_model, Default::default()),
            blocks,
            relative_attention_bias,
            final_norm: norm_weight(&encoder, "final_layer_norm", c.d_model),
            activation,
            config: config.clone(),
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// The bucket of each (query, key) pair's relative position `key - query`, bidirectional:
    /// half the buckets for each direction, exact up to half of those, then logarithmic up to
    /// `max_distance`, beyond which all share the last.
    ///
    /// # Shapes
    /// `→ [T, T]` (int64).
    pub fn position_buckets(&self, t: i64, device: tch::Device) -> Tensor {
        let c = &self.config;
        let positions = Tensor::arange(t, (Kind::Int64, device));
        let relative = positions.unsqueeze(0) - positions.unsqueeze(1); // [T, T]: key - query
        let half = c.relative_attention_num_buckets / 2;
        let direction = relative.gt(0).to_kind(Kind::Int64) * half;
        let distance = relative.abs();
        let max_exact = half / 2;
        let scale =
            (half - max_exact) as f64 / (c.relative_attention_max_distance as f64 / max_exact as f64).ln();
        let large = ((distance.to_kind(Kind::Float) / max_exact as f64).log() * scale).to_kind(Kind::Int64)
            + max_exact;
        let large = large.clamp_max(half - 1);
        direction + distance.where_self(&distance.lt(max_exact), &large)
    }

    /// The additive attention bias `[1 or B, H, T, T]`: the relative position bias, and the most
    /// negative value of `kind` where the mask hides a key.
    fn attention_bias(&self, t: i64, mask: Option<&Tensor>, kind: Kind, device: tch::Device) -> Tensor {
        let buckets = self.position_buckets(t, device);
        let bias = Tensor::embedding(&self.relative_attention_bias, &buckets, -1, false, false) // [T, T, H]
            .permute([2, 0, 1])
            .unsqueeze(0)
            .to_kind(kind);
        match mask {
            Some(mask) => {
                let hidden: Tensor = (1.0 - mask.to_kind(kind)) * mask_min(kind); // [B, T]
                bias + hidden.unsqueeze(1).unsqueeze(1)
            }
            None => bias,
        }
    }

    /// The encoder's last hidden state.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        let c = &self.config;
        let (b, t) = input_ids.size2().expect("input_ids [B, T]");
        let mut h = self.shared.forward(input_ids);
        let bias = self.attention_bias(t, attention_mask, h.kind(), h.device());
        let heads = |x: Tensor| x.view([b, t, c.num_heads, c.d_kv]).transpose(1, 2); // [B, H, T, d_kv]
        for block in &self.blocks {
            let n = rms_norm(&h, &block.attention_norm, c.layer_norm_epsilon);
            let (q, k, v) =
                (heads(block.q.forward(&n)), heads(block.k.forward(&n)), heads(block.v.forward(&n)));
            // Unscaled scores: T5 folds the 1/sqrt(d_kv) into its initialisation.
            let out =
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&bias), 0.0, false, Some(1.0), false);
            // New tensors, not in place: the graph keeps each block's input.
            h = &h + block.o.forward(&out.transpose(1, 2).reshape([b, t, c.num_heads * c.d_kv]));
            let n = rms_norm(&h, &block.feed_forward_norm, c.layer_norm_epsilon);
            let f = match &block.feed_forward {
                FeedForward::Plain { wi, wo } => wo.forward(&self.activation.apply(&wi.forward(&n))),
                FeedForward::Gated { wi_0, wi_1, wo } => {
                    wo.forward(&(self.activation.apply(&wi_0.forward(&n)) * wi_1.forward(&n)))
                }
            };
            h = &h + f;
        }
        rms_norm(&h, &self.final_norm, c.layer_norm_epsilon)
    }

    /// Loads a transformers T5 folder (`config.json`, `model.safetensors` or its shards; a
    /// `T5ForConditionalGeneration` checkpoint's decoder and head are ignored) onto `device`, its
    /// weights in `kind`.
    pub fn load(dir: &Path, device: tch::Device, kind: Kind) -> Result<(nn::VarStore, T5Encoder)> {
        let config = T5Config::from_json(&dir.join("config.json"))?;
        let mut vs = nn::VarStore::new(device);
        let encoder = crate::nn::for_loading(|| T5Encoder::new(vs.root(), &config))?;
        let files = crate::shapes::weight_files(dir, &["model"], None)?;
        crate::weights::load_safetensors_files(&mut vs, &files, crate::weights::Strictness::AllowUnexpected)?;
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        vs.freeze();
        Ok((vs, encoder))
    }
}
