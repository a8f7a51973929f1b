//! Pre-LayerNorm transformer encoders shared by the ViT (DINO) and CLIP families, and the T5
//! encoder ([`t5`]: LlamaGen's caption encoder, and SD3's and FLUX's).
//!
//! One block is `h = x + attn(ln1(x)); h = h + mlp(ln2(h))`. The families differ only in their
//! checkpoint key names ([`LayerKeys`]), the MLP activation ([`Activation`]) and, for CLIP text, a
//! causal mask. Variable paths are the reference checkpoints' keys, so `transformers` safetensors
//! load by name.

pub mod clip;
pub mod t5;
pub mod vit;

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Kind, Tensor};

/// MLP activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact (erf) GELU (`"gelu"` in transformers configs).
    Gelu,
    /// `x * sigmoid(1.702 x)` (`"quick_gelu"`, the OpenAI CLIP checkpoints).
    QuickGelu,
    /// tanh-approximated GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
    /// `max(x, 0)` (`"relu"`: the original T5's feed-forward).
    Relu,
    /// `x * sigmoid(x)` (`"silu"`, `"swish"`).
    Silu,
}

impl Activation {
    /// Parses a transformers `hidden_act` string.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Activation::Gelu),
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            "silu" | "swish" => Some(Activation::Silu),
            _ => None,
        }
    }

    /// Applies the activation.
    pub fn apply(self, xs: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => xs.gelu("none"),
            Activation::QuickGelu => xs * (xs * 1.702).sigmoid(),
            Activation::GeluTanh => xs.gelu("tanh"),
            Activation::Relu => xs.relu(),
            Activation::Silu => xs.silu(),
        }
    }
}

/// Where a block's weights live, relative to the block's path.
#[derive(Clone, Copy, Debug)]
pub struct LayerKeys {
    /// Query, key, value and output projections.
    pub q: &'static str,
    /// Key projection.
    pub k: &'static str,
    /// Value projection.
    pub v: &'static str,
    /// Attention output projection.
    pub o: &'static str,
    /// LayerNorm before attention.
    pub ln1: &'static str,
    /// LayerNorm before the MLP.
    pub ln2: &'static str,
    /// MLP up projection.
    pub fc1: &'static str,
    /// MLP down projection.
    pub fc2: &'static str,
}

impl LayerKeys {
    /// transformers `ViTLayer` (`encoder.layer.N.…`).
    pub const VIT: LayerKeys = LayerKeys {
        q: "attention.attention.query",
        k: "attention.attention.key",
        v: "attention.attention.value",
        o: "attention.output.dense",
        ln1: "layernorm_before",
        ln2: "layernorm_after",
        fc1: "intermediate.dense",
        fc2: "output.dense",
    };

    /// transformers `CLIPEncoderLayer` (`encoder.layers.N.…`).
    pub const CLIP: LayerKeys = LayerKeys {
        q: "self_attn.q_proj",
        k: "self_attn.k_proj",
        v: "self_attn.v_proj",
        o: "self_attn.out_proj",
        ln1: "layer_norm1",
        ln2: "layer_norm2",
        fc1: "mlp.fc1",
        fc2: "mlp.fc2",
    };
}

/// Dimensions of a block.
#[derive(Clone, Copy, Debug)]
pub struct BlockDims {
    /// Model width.
    pub hidden: i64,
    /// Attention heads.
    pub heads: i64,
    /// MLP width.
    pub intermediate: i64,
    /// LayerNorm epsilon.
    pub ln_eps: f64,
    /// Whether q/k/v projections have a bias.
    pub qkv_bias: bool,
    /// MLP activation.
    pub activation: Activation,
}

fn path<'a>(vs: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted.split('.').fold(vs.clone(), |p, part| &p / part)
}

fn linear(vs: &nn::Path, key: &str, i: i64, o: i64, bias: bool) -> nn::Linear {
    crate::nn::linear(path(vs, key), i, o, nn::LinearConfig { bias, ..Default::default() })
}

/// A LayerNorm at `key` (weight and bias).
pub fn layer_norm(vs: &nn::Path, key: &str, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(path(vs, key), vec![dim], nn::LayerNormConfig { eps, ..Default::default() })
}

/// One pre-LayerNorm block.
///
/// # Shapes
/// `[B, T, hidden] -> [B, T, hidden]`; the optional additive mask is `[B or 1, 1, T, T]`.
#[derive(Debug)]
pub struct Block {
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    o: nn::Linear,
    ln1: nn::LayerNorm,
    ln2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
    activation: Activation,
}

impl Block {
    /// Creates the block's variables under `vs` with the family's key names.
    pub fn new(vs: nn::Path, keys: &LayerKeys, d: &BlockDims) -> Self {
        let h = d.hidden;
        Block {
            q: linear(&vs, keys.q, h, h, d.qkv_bias),
            k: linear(&vs, keys.k, h, h, d.qkv_bias),
            v: linear(&vs, keys.v, h, h, d.qkv_bias),
            o: linear(&vs, keys.o, h, h, true),
            ln1: layer_norm(&vs, keys.ln1, h, d.ln_eps),
            ln2: layer_norm(&vs, keys.ln2, h, d.ln_eps),
            fc1: linear(&vs, keys.fc1, h, d.intermediate, true),
            fc2: linear(&vs, keys.fc2, d.intermediate, h, true),
            heads: d.heads,
            activation: d.activation,
        }
    }

    fn attention(&self, xs: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let out = multi_head_attention(
            &self.q.forward(xs),
            &self.k.forward(xs),
            &self.v.forward(xs),
            self.heads,
            mask,
        );
        self.o.forward(&out)
    }

    /// Applies the block.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let h = xs + self.attention(&self.ln1.forward(xs), mask);
        let m = self.fc2.forward(&self.activation.apply(&self.fc1.forward(&self.ln2.forward(&h))));
        h + m
    }
}

/// Scaled dot-product attention over `heads` heads, through libtorch's fused kernel (the one the
/// reference implementations call), scale `1/sqrt(head_dim)`; the optional additive mask
/// (`[B or 1, 1, T, S]`: causal, padding) is applied inside.
///
/// # Shapes
/// `q [B, T, C]`, `k`/`v` `[B, S, C]` → `[B, T, C]`.
pub fn multi_head_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, mask: Option<&Tensor>) -> Tensor {
    let (b, t, c) = q.size3().expect("[B, T, C]");
    let split = |x: &Tensor| x.view([b, -1, heads, c / heads]).transpose(1, 2); // [B, H, *, hd]
    let out =
        Tensor::scaled_dot_product_attention(&split(q), &split(k), &split(v), mask, 0.0, false, None, false);
    out.transpose(1, 2).reshape([b, t, c]) // [B, T, C]
}

/// The most negative finite value of a float kind (`torch.finfo(kind).min`): what additive masks
/// fill with, so a bfloat16 or float16 mask does not overflow.
pub fn mask_min(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Half => -65504.0,
        Kind::Double => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

/// An additive causal mask `[1, 1, T, T]` (0 on and below the diagonal, a large negative above).
pub fn causal_mask(t: i64, kind: Kind, device: tch::Device) -> Tensor {
    let full = Tensor::full([t, t], mask_min(kind), (kind, device));
    full.triu(1).view([1, 1, t, t])
}
