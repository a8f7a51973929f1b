//! ViT in the transformers `ViTModel` layout (Dosovitskiy et al. 2020), as published for DINO
//! (`facebook/dino-vits16`): the DreamBench DINO metric is the cosine of the final-LayerNorm CLS
//! embeddings. Configured by the checkpoint's own `config.json`.

use serde::Deserialize;
use tch::{nn, nn::Module, Tensor};

use super::{layer_norm, Activation, Block, BlockDims, LayerKeys};
use crate::error::{ModelError, Result};

fn three() -> i64 {
    3
}

fn yes() -> bool {
    true
}

/// The fields of a transformers `ViTConfig` that the architecture needs (others are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct VitConfig {
    /// Width.
    pub hidden_size: i64,
    /// Blocks.
    pub num_hidden_layers: i64,
    /// Heads.
    pub num_attention_heads: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// MLP activation (`gelu`).
    pub hidden_act: String,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Input resolution.
    pub image_size: i64,
    /// Patch size.
    pub patch_size: i64,
    /// Input channels.
    #[serde(default = "three")]
    pub num_channels: i64,
    /// Bias on q/k/v.
    #[serde(default = "yes")]
    pub qkv_bias: bool,
}

impl VitConfig {
    /// Reads a `config.json`.
    pub fn from_json(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { what: path.display().to_string(), message: e.to_string() })
    }

    fn activation(&self) -> Result<Activation> {
        Activation::from_hf(&self.hidden_act).ok_or_else(|| ModelError::Config {
            what: "hidden_act".into(),
            message: format!("unsupported activation `{}`", self.hidden_act),
        })
    }
}

/// `ViTModel` without its pooler.
///
/// # Shapes
/// `pixel_values [B, C, S, S]` → `last_hidden_state [B, 1 + (S/P)², hidden]`.
#[derive(Debug)]
pub struct Vit {
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch: nn::Conv2D,
    layers: Vec<Block>,
    layernorm: nn::LayerNorm,
    config: VitConfig,
}

impl Vit {
    /// Creates the variables under `vs` (keys as in the reference checkpoint).
    pub fn new(vs: nn::Path, cfg: &VitConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let patches = (cfg.image_size / cfg.patch_size).pow(2);
        let emb = &vs / "embeddings";
        let cls_token = emb.zeros("cls_token", &[1, 1, d]);
        let position_embeddings = emb.zeros("position_embeddings", &[1, patches + 1, d]);
        let conv = nn::ConvConfig { stride: cfg.patch_size, ..Default::default() };
        let patch = crate::nn::conv2d(
            &emb / "patch_embeddings" / "projection",
            cfg.num_channels,
            d,
            cfg.patch_size,
            conv,
        );
        let dims = BlockDims {
            hidden: d,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            ln_eps: cfg.layer_norm_eps,
            qkv_bias: cfg.qkv_bias,
            activation: cfg.activation()?,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::new(&vs / "encoder" / "layer" / i, &LayerKeys::VIT, &dims))
            .collect();
        let layernorm = layer_norm(&vs, "layernorm", d, cfg.layer_norm_eps);
        Ok(Vit { cls_token, position_embeddings, patch, layers, layernorm, config: cfg.clone() })
    }

    /// The configuration.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// The final hidden states (after the last LayerNorm).
    pub fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let b = pixel_values.size()[0];
        let patches = self.patch.forward(pixel_values).flatten(2, 3).transpose(1, 2); // [B, N, D]
        let cls = self.cls_token.expand([b, -1, -1], false); // [B, 1, D]
        let mut h = Tensor::cat(&[cls, patches], 1) + &self.position_embeddings; // [B, N+1, D]
        for layer in &self.layers {
            h = layer.forward(&h, None);
        }
        self.layernorm.forward(&h)
    }

    /// The CLS embedding (the DINO feature).
    pub fn cls_embedding(&self, pixel_values: &Tensor) -> Tensor {
        self.forward(pixel_values).select(1, 0) // [B, D]
    }
}
