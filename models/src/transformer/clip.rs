//! CLIP in the transformers `CLIPModel` layout (Radford et al. 2021): the text tower (also the
//! Stable Diffusion text encoder: `CLIPTextModel`, and SDXL's `CLIPTextModelWithProjection`), the
//! vision tower and both projections. Configured by the checkpoint's own `config.json`.

use serde::Deserialize;
use tch::{nn, nn::Module, Kind, Tensor};

use super::{causal_mask, layer_norm, Activation, Block, BlockDims, LayerKeys};
use crate::error::{ModelError, Result};

fn eps() -> f64 {
    1e-5
}

fn three() -> i64 {
    3
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}

fn legacy_eos() -> i64 {
    2
}

/// The fields of a transformers `CLIPTextConfig` that the architecture needs.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Width.
    pub hidden_size: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// Blocks.
    pub num_hidden_layers: i64,
    /// Heads.
    pub num_attention_heads: i64,
    /// Context length.
    pub max_position_embeddings: i64,
    /// MLP activation.
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// End-of-text id. `2` means the legacy rule: pool at the highest id (OpenAI's EOT is the
    /// largest id of its vocabulary); otherwise pool at the first occurrence of this id.
    #[serde(default = "legacy_eos")]
    pub eos_token_id: i64,
    /// Width of `text_projection` (`CLIPTextModelWithProjection` only).
    #[serde(default)]
    pub projection_dim: Option<i64>,
}

/// The fields of a transformers `CLIPVisionConfig` that the architecture needs.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipVisionConfig {
    /// Width.
    pub hidden_size: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// Blocks.
    pub num_hidden_layers: i64,
    /// Heads.
    pub num_attention_heads: i64,
    /// Input resolution.
    pub image_size: i64,
    /// Patch size.
    pub patch_size: i64,
    /// Input channels.
    #[serde(default = "three")]
    pub num_channels: i64,
    /// MLP activation.
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

/// The fields of a transformers `CLIPConfig`.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipConfig {
    /// Text tower.
    pub text_config: ClipTextConfig,
    /// Vision tower.
    pub vision_config: ClipVisionConfig,
    /// Width of the shared embedding space.
    pub projection_dim: i64,
}

impl ClipConfig {
    /// Reads a `config.json`.
    pub fn from_json(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { what: path.display().to_string(), message: e.to_string() })
    }
}

/// Block dimensions of a CLIP tower (q/k/v always have a bias).
fn clip_dims(hidden: i64, heads: i64, intermediate: i64, ln_eps: f64, hidden_act: &str) -> Result<BlockDims> {
    let activation = Activation::from_hf(hidden_act).ok_or_else(|| ModelError::Config {
        what: "hidden_act".into(),
        message: format!("unsupported activation `{hidden_act}`"),
    })?;
    Ok(BlockDims { hidden, heads, intermediate, ln_eps, qkv_bias: true, activation })
}

/// What the text tower returns.
#[derive(Debug)]
pub struct TextOutput {
    /// Final hidden states after the final LayerNorm `[B, T, D]`.
    pub last_hidden_state: Tensor,
    /// The hidden state at each sequence's end-of-text token `[B, D]`.
    pub pooled: Tensor,
    /// Input embeddings and every block's output, before the final LayerNorm (`L + 1` tensors);
    /// SDXL conditions on `hidden_states[L - 1]` (the penultimate).
    pub hidden_states: Vec<Tensor>,
}

/// `CLIPTextTransformer` (`text_model.*`).
///
/// # Shapes
/// `input_ids [B, T]` (i64), `attention_mask [B, T]` (1 keep, 0 pad) → [`TextOutput`].
#[derive(Debug)]
pub struct ClipTextTransformer {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<Block>,
    final_layer_norm: nn::LayerNorm,
    eos_token_id: i64,
}

impl ClipTextTransformer {
    /// Creates the variables under `vs` (the `text_model` path).
    pub fn new(vs: nn::Path, cfg: &ClipTextConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = &vs / "embeddings";
        let dims = clip_dims(
            d,
            cfg.num_attention_heads,
            cfg.intermediate_size,
            cfg.layer_norm_eps,
            &cfg.hidden_act,
        )?;
        Ok(ClipTextTransformer {
            token_embedding: crate::nn::embedding(
                &emb / "token_embedding",
                cfg.vocab_size,
                d,
                Default::default(),
            ),
            position_embedding: crate::nn::embedding(
                &emb / "position_embedding",
                cfg.max_position_embeddings,
                d,
                Default::default(),
            ),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Block::new(&vs / "encoder" / "layers" / i, &LayerKeys::CLIP, &dims))
                .collect(),
            final_layer_norm: layer_norm(&vs, "final_layer_norm", d, cfg.layer_norm_eps),
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Runs the text tower.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> TextOutput {
        let (b, t) = input_ids.size2().expect("[B, T]");
        let device = input_ids.device();
        let positions = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0); // [1, T]
        let mut h = self.token_embedding.forward(input_ids) + self.position_embedding.forward(&positions);
        let causal = causal_mask(t, h.kind(), device); // [1, 1, T, T]
        let mask = match attention_mask {
            // Padding positions get a large negative score too: [B, 1, T, T].
            Some(am) => {
                let keep = am.to_kind(h.kind());
                causal + ((keep.ones_like() - keep) * f64::from(f32::MIN)).view([b, 1, 1, t])
            }
            None => causal,
        };
        let mut hidden_states = vec![h.shallow_clone()];
        for layer in &self.layers {
            h = layer.forward(&h, Some(&mask));
            hidden_states.push(h.shallow_clone());
        }
        let last = self.final_layer_norm.forward(&h); // [B, T, D]
        let eos = if self.eos_token_id == 2 {
            input_ids.argmax(-1, false)
        } else {
            input_ids.eq(self.eos_token_id).to_kind(Kind::Int).argmax(-1, false)
        }; // [B]
        let pooled = last.index(&[Some(Tensor::arange(b, (Kind::Int64, device))), Some(eos)]); // [B, D]
        TextOutput { last_hidden_state: last, pooled, hidden_states }
    }
}

/// `CLIPTextModelWithProjection` (SDXL's second text encoder): the text tower and a bias-free
/// `text_projection` of its pooled output.
///
/// # Shapes
/// `input_ids [B, T]` → ([`TextOutput`], `text_embeds [B, projection_dim]`).
#[derive(Debug)]
pub struct ClipTextModelWithProjection {
    /// The text tower.
    pub text: ClipTextTransformer,
    text_projection: nn::Linear,
}

impl ClipTextModelWithProjection {
    /// The tower under `text` (`text_model` in published checkpoints) and the projection under
    /// `root / "text_projection"`.
    pub fn new(root: nn::Path, text: nn::Path, cfg: &ClipTextConfig) -> Result<Self> {
        let projection = cfg.projection_dim.ok_or_else(|| ModelError::Config {
            what: "projection_dim".into(),
            message: "CLIPTextModelWithProjection needs projection_dim in its config".into(),
        })?;
        Ok(ClipTextModelWithProjection {
            text: ClipTextTransformer::new(text, cfg)?,
            text_projection: crate::nn::linear(
                &root / "text_projection",
                cfg.hidden_size,
                projection,
                nn::LinearConfig { bias: false, ..Default::default() },
            ),
        })
    }

    /// Runs the tower and projects its pooled output.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> (TextOutput, Tensor) {
        let out = self.text.forward(input_ids, attention_mask);
        let embeds = self.text_projection.forward(&out.pooled);
        (out, embeds)
    }
}

/// `CLIPVisionTransformer` (`vision_model.*`).
///
/// # Shapes
/// `pixel_values [B, C, S, S]` → `(last_hidden_state [B, 1 + N, D], pooled [B, D])`.
#[derive(Debug)]
pub struct ClipVisionTransformer {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
    pre_layrnorm: nn::LayerNorm,
    layers: Vec<Block>,
    post_layernorm: nn::LayerNorm,
}

impl ClipVisionTransformer {
    /// Creates the variables under `vs` (the `vision_model` path).
    pub fn new(vs: nn::Path, cfg: &ClipVisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = &vs / "embeddings";
        let positions = (cfg.image_size / cfg.patch_size).pow(2) + 1;
        let conv = nn::ConvConfig { stride: cfg.patch_size, bias: false, ..Default::default() };
        let dims = clip_dims(
            d,
            cfg.num_attention_heads,
            cfg.intermediate_size,
            cfg.layer_norm_eps,
            &cfg.hidden_act,
        )?;
        Ok(ClipVisionTransformer {
            class_embedding: emb.zeros("class_embedding", &[d]),
            patch_embedding: crate::nn::conv2d(
                &emb / "patch_embedding",
                cfg.num_channels,
                d,
                cfg.patch_size,
                conv,
            ),
            position_embedding: crate::nn::embedding(
                &emb / "position_embedding",
                positions,
                d,
                Default::default(),
            ),
            // (sic) the reference spells it `pre_layrnorm`.
            pre_layrnorm: layer_norm(&vs, "pre_layrnorm", d, cfg.layer_norm_eps),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Block::new(&vs / "encoder" / "layers" / i, &LayerKeys::CLIP, &dims))
                .collect(),
            post_layernorm: layer_norm(&vs, "post_layernorm", d, cfg.layer_norm_eps),
        })
    }

    /// Runs the vision tower.
    pub fn forward(&self, pixel_values: &Tensor) -> (Tensor, Tensor) {
        let b = pixel_values.size()[0];
        let patches = self.patch_embedding.forward(pixel_values).flatten(2, 3).transpose(1, 2); // [B, N, D]
        let d = patches.size()[2];
        let cls = self.class_embedding.view([1, 1, d]).expand([b, 1, d], false);
        let n = patches.size()[1] + 1;
        let positions = Tensor::arange(n, (Kind::Int64, pixel_values.device())).unsqueeze(0);
        let mut h = Tensor::cat(&[cls, patches], 1) + self.position_embedding.forward(&positions);
        h = self.pre_layrnorm.forward(&h);
        for layer in &self.layers {
            h = layer.forward(&h, None);
        }
        let pooled = self.post_layernorm.forward(&h.select(1, 0)); // [B, D]
        (h, pooled)
    }
}

/// `CLIPModel`: both towers and their projections into the shared space.
#[derive(Debug)]
pub struct Clip {
    /// The text tower.
    pub text: ClipTextTransformer,
    /// The vision tower.
    pub vision: ClipVisionTransformer,
    text_projection: nn::Linear,
    visual_projection: nn::Linear,
    /// `logit_scale` (log of the softmax temperature's inverse).
    pub logit_scale: Tensor,
}

impl Clip {
    /// Creates the variables under `vs` (keys as in the reference checkpoint).
    pub fn new(vs: nn::Path, cfg: &ClipConfig) -> Result<Self> {
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        Ok(Clip {
            text: ClipTextTransformer::new(&vs / "text_model", &cfg.text_config)?,
            vision: ClipVisionTransformer::new(&vs / "vision_model", &cfg.vision_config)?,
            text_projection: crate::nn::linear(
                &vs / "text_projection",
                cfg.text_config.hidden_size,
                cfg.projection_dim,
                no_bias,
            ),
            visual_projection: crate::nn::linear(
                &vs / "visual_projection",
                cfg.vision_config.hidden_size,
                cfg.projection_dim,
                no_bias,
            ),
            logit_scale: vs.zeros("logit_scale", &[]),
        })
    }

    /// Text embeddings in the shared space (not normalised) `[B, projection_dim]`.
    pub fn text_embeds(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        self.text_projection.forward(&self.text.forward(input_ids, attention_mask).pooled)
    }

    /// Image embeddings in the shared space (not normalised) `[B, projection_dim]`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Tensor {
        self.visual_projection.forward(&self.vision.forward(pixel_values).1)
    }
}
