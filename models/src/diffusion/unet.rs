//! `UNet2DConditionModel` in the diffusers layout (Stable Diffusion 1.x / 2.x and SDXL's
//! `text_time` conditioning), configured by the model folder's `unet/config.json`.
//!
//! Supported: `CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D` / `UpBlock2D`, per-block head counts and transformer depths, conv or
//! linear projections, `addition_embed_type = "text_time"`. Anything else is refused by name.

use serde::Deserialize;
use tch::{nn, nn::Module, Kind, Tensor};

use super::blocks::{group_norm, Downsample2D, ResnetBlock2D, Upsample2D};
use crate::error::{ModelError, Result};
use crate::lora::{LoraLinear, LoraSpec};
use crate::recompute::{self, Segment};
use crate::transformer::multi_head_attention;

/// An int or a per-block list, as diffusers configs write them.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same for every block.
    One(i64),
    /// One per down block.
    Each(Vec<i64>),
}

impl PerBlock {
    /// The value of block `i`.
    pub fn get(&self, i: usize) -> i64 {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[i.min(v.len() - 1)],
        }
    }
}

fn one() -> PerBlock {
    PerBlock::One(1)
}
fn four() -> i64 {
    4
}
fn groups() -> i64 {
    32
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

/// The fields of a diffusers `UNet2DConditionModel` config this module uses.
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in.
    #[serde(default = "four")]
    pub in_channels: i64,
    /// Latent channels out.
    #[serde(default = "four")]
    pub out_channels: i64,
    /// Down block types.
    pub down_block_types: Vec<String>,
    /// Mid block type.
    #[serde(default = "mid")]
    pub mid_block_type: Option<String>,
    /// Up block types.
    pub up_block_types: Vec<String>,
    /// Channels per level.
    pub block_out_channels: Vec<i64>,
    /// ResNets per down block (up blocks have one more).
    pub layers_per_block: i64,
    /// GroupNorm groups.
    #[serde(default = "groups")]
    pub norm_num_groups: i64,
    /// Norm epsilon of the ResNets and the output norm.
    #[serde(default = "eps")]
    pub norm_eps: f64,
    /// Width of the text conditioning.
    pub cross_attention_dim: i64,
    /// Heads per block (diffusers' legacy name: it is the head count).
    pub attention_head_dim: PerBlock,
    /// Heads per block, when given under its real name (overrides `attention_head_dim`).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Transformer blocks per attention.
    #[serde(default = "one")]
    pub transformer_layers_per_block: PerBlock,
    /// Linear (SD 2.x, SDXL) instead of 1×1-conv projections in the transformers.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Sinusoid order of the timestep embedding.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    #[serde(default)]
    pub freq_shift: i64,
    /// `text_time` for SDXL.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Sinusoid width per SDXL time id.
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    /// Input width of the SDXL additional embedding (pooled text + time ids).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    /// Must be absent (class conditioning is not supported).
    #[serde(default)]
    pub class_embed_type: Option<String>,
}

impl UNetConfig {
    /// Reads a `config.json`, refusing what this implementation does not support.
    pub fn from_json(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { what: path.display().to_string(), message: e.to_string() })?;
        cfg.validate().map_err(|message| ModelError::Config { what: path.display().to_string(), message })?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let known = ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"];
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !known.contains(&t.as_str()) {
                return Err(format!("unsupported block type `{t}`"));
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return Err(format!("unsupported mid block type `{m}`"));
            }
        }
        if self.down_block_types.len() != self.block_out_channels.len()
            || self.up_block_types.len() != self.block_out_channels.len()
        {
            return Err("block type lists and block_out_channels differ in length".into());
        }
        if let Some(c) = &self.class_embed_type {
            return Err(format!("unsupported class_embed_type `{c}`"));
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if self.addition_time_embed_dim.is_some()
                    && self.projection_class_embeddings_input_dim.is_some() => {}
            Some(other) => {
                return Err(format!(
                    "unsupported addition_embed_type `{other}` (or its dimensions are missing)"
                ))
            }
        }
        Ok(())
    }

    fn heads(&self, i: usize) -> i64 {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(i)
    }
}

/// diffusers' `get_timestep_embedding`: sinusoids of `timesteps [B]` → `[B, dim]`.
pub fn timestep_embedding(timesteps: &Tensor, dim: i64, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor {
    let half = dim / 2;
    let device = timesteps.device();
    let exponent =
        Tensor::arange(half, (Kind::Float, device)) * (-(10000f64).ln()) / (half as f64 - freq_shift);
    let args = timesteps.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0); // [B, half]
    let (sin, cos) = (args.sin(), args.cos());
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], -1) } else { Tensor::cat(&[sin, cos], -1) };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}

#[derive(Debug)]
struct TimestepMlp {
    linear_1: nn::Linear,
    linear_2: nn::Linear,
}

impl TimestepMlp {
    fn new(vs: nn::Path, c_in: i64, c_out: i64) -> Self {
        TimestepMlp {
            linear_1: crate::nn::linear(&vs / "linear_1", c_in, c_out, Default::default()),
            linear_2: crate::nn::linear(&vs / "linear_2", c_out, c_out, Default::default()),
        }
    }
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(xs).silu())
    }
}

#[derive(Debug)]
struct Attention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: i64,
}

impl Attention {
    fn new(
        vs: nn::Path,
        query_dim: i64,
        context_dim: i64,
        heads: i64,
        head_dim: i64,
        lora: Option<LoraSpec>,
    ) -> Self {
        let inner = heads * head_dim;
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        Attention {
            to_q: LoraLinear::new(&vs / "to_q", query_dim, inner, no_bias, lora),
            to_k: LoraLinear::new(&vs / "to_k", context_dim, inner, no_bias, lora),
            to_v: LoraLinear::new(&vs / "to_v", context_dim, inner, no_bias, lora),
            to_out: LoraLinear::new(&vs / "to_out" / 0, inner, query_dim, Default::default(), lora),
            heads,
        }
    }

    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let context = context.unwrap_or(xs);
        let (q, k, v) = (self.to_q.forward(xs), self.to_k.forward(context), self.to_v.forward(context));
        let out = multi_head_attention(&q, &k, &v, self.heads, None);
        self.to_out.forward(&out)
    }
}

#[derive(Debug)]
struct TransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff_in: nn::Linear,
    ff_out: nn::Linear,
}

impl TransformerBlock {
    fn new(
        vs: nn::Path,
        dim: i64,
        context_dim: i64,
        heads: i64,
        head_dim: i64,
        lora: Option<LoraSpec>,
    ) -> Self {
        let ln = |name: &str| nn::layer_norm(&vs / name, vec![dim], Default::default());
        let inner = dim * 4;
        TransformerBlock {
            norm1: ln("norm1"),
            attn1: Attention::new(&vs / "attn1", dim, dim, heads, head_dim, lora),
            norm2: ln("norm2"),
            attn2: Attention::new(&vs / "attn2", dim, context_dim, heads, head_dim, lora),
            norm3: ln("norm3"),
            // GEGLU: `ff.net.0.proj` makes the value and its gate; `ff.net.2` projects back.
            ff_in: crate::nn::linear(&vs / "ff" / "net" / 0 / "proj", dim, inner * 2, Default::default()),
            ff_out: crate::nn::linear(&vs / "ff" / "net" / 2, inner, dim, Default::default()),
        }
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Tensor {
        let h = xs + self.attn1.forward(&self.norm1.forward(xs), None);
        let h = &h + self.attn2.forward(&self.norm2.forward(&h), Some(context));
        let parts = self.ff_in.forward(&self.norm3.forward(&h)).chunk(2, -1);
        let ff = self.ff_out.forward(&(&parts[0] * parts[1].gelu("none")));
        h + ff
    }
}

#[derive(Debug)]
enum Proj {
    Conv(nn::Conv2D),
    Linear(nn::Linear),
}

#[derive(Debug)]
struct Transformer2D {
    norm: nn::GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    fn new(vs: nn::Path, c: i64, cfg: &UNetConfig, heads: i64, depth: i64, lora: Option<LoraSpec>) -> Self {
        let head_dim = c / heads;
        let proj = |name: &str| {
            if cfg.use_linear_projection {
                Proj::Linear(crate::nn::linear(&vs / name, c, c, Default::default()))
            } else {
                Proj::Conv(crate::nn::conv2d(&vs / name, c, c, 1, Default::default()))
            }
        };
        Transformer2D {
            norm: group_norm(&vs / "norm", cfg.norm_num_groups, c, 1e-6),
            proj_in: proj("proj_in"),
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::new(
                        &vs / "transformer_blocks" / i,
                        c,
                        cfg.cross_attention_dim,
                        heads,
                        head_dim,
                        lora,
                    )
                })
                .collect(),
            proj_out: proj("proj_out"),
        }
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Tensor {
        let (b, c, h, w) = xs.size4().expect("[B, C, H, W]");
        let normed = xs.apply(&self.norm);
        let tokens = |x: Tensor| x.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let mut t = match &self.proj_in {
            Proj::Conv(p) => tokens(normed.apply(p)),
            Proj::Linear(p) => p.forward(&tokens(normed)),
        };
        for block in &self.blocks {
            t = block.forward(&t, context);
        }
        let spatial = |x: Tensor| x.reshape([b, h, w, c]).permute([0, 3, 1, 2]);
        let out = match &self.proj_out {
            Proj::Conv(p) => spatial(t).apply(p),
            Proj::Linear(p) => spatial(p.forward(&t)),
        };
        out + xs
    }
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    down: Option<Downsample2D>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    up: Option<Upsample2D>,
}

/// `UNet2DConditionModel`.
///
/// # Shapes
/// `sample [B, C, H, W]`, `timesteps [B]`, `encoder_hidden_states [B, T, cross_attention_dim]`,
/// for SDXL also `text_embeds [B, P]` and `time_ids [B, 6]` → `[B, out_channels, H, W]`.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: nn::Conv2D,
    time_embedding: TimestepMlp,
    add_embedding: Option<TimestepMlp>,
    down: Vec<DownBlock>,
    mid: Option<(ResnetBlock2D, Transformer2D, ResnetBlock2D)>,
    up: Vec<UpBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    config: UNetConfig,
}

/// The SDXL additional conditioning: pooled text embeddings and the six size/crop time ids.
#[derive(Debug)]
pub struct AddedCond<'a> {
    /// Pooled text embeddings `[B, P]`.
    pub text_embeds: &'a Tensor,
    /// `(orig_h, orig_w, crop_top, crop_left, target_h, target_w)` per sample `[B, 6]`.
    pub time_ids: &'a Tensor,
}

impl UNet2DConditionModel {
    /// Creates the variables under `vs` (keys as in a diffusers checkpoint).
    pub fn new(vs: nn::Path, cfg: &UNetConfig) -> Result<Self> {
        Self::with_lora(vs, cfg, None)
    }

    /// Like [`UNet2DConditionModel::new`], with LoRA adapters on the attention layers that `lora`
    /// targets (created in the adapters' own variable store).
    pub fn with_lora(vs: nn::Path, cfg: &UNetConfig, lora: Option<LoraSpec>) -> Result<Self> {
        cfg.validate().map_err(|message| ModelError::Config { what: "unet config".into(), message })?;
        let ch = &cfg.block_out_channels;
        let (g, e) = (cfg.norm_num_groups, cfg.norm_eps);
        let temb = ch[0] * 4;
        let pad1 = nn::ConvConfig { padding: 1, ..Default::default() };
        let mut down = Vec::new();
        let mut c_out = ch[0];
        for (i, t) in cfg.down_block_types.iter().enumerate() {
            let c_in = c_out;
            c_out = ch[i];
            let p = &vs / "down_blocks" / i;
            let with_attn = t == "CrossAttnDownBlock2D";
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        &p / "resnets" / j,
                        if j == 0 { c_in } else { c_out },
                        c_out,
                        Some(temb),
                        g,
                        e,
                    )
                })
                .collect();
            let attentions = if with_attn {
                (0..cfg.layers_per_block)
                    .map(|j| {
                        Transformer2D::new(
                            &p / "attentions" / j,
                            c_out,
                            cfg,
                            cfg.heads(i),
                            cfg.transformer_layers_per_block.get(i),
                            lora,
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let down_s = (i + 1 < ch.len()).then(|| Downsample2D::new(&p / "downsamplers" / 0, c_out, 1));
            down.push(DownBlock { resnets, attentions, down: down_s });
        }
        let top = *ch.last().expect("levels");
        let last = ch.len() - 1;
        let mid = cfg.mid_block_type.as_ref().map(|_| {
            let p = &vs / "mid_block";
            (
                ResnetBlock2D::new(&p / "resnets" / 0, top, top, Some(temb), g, e),
                Transformer2D::new(
                    &p / "attentions" / 0,
                    top,
                    cfg,
                    cfg.heads(last),
                    cfg.transformer_layers_per_block.get(last),
                    lora,
                ),
                ResnetBlock2D::new(&p / "resnets" / 1, top, top, Some(temb), g, e),
            )
        });
        let rev: Vec<i64> = ch.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut prev_out = top;
        for (i, t) in cfg.up_block_types.iter().enumerate() {
            let out = rev[i];
            let input = rev[(i + 1).min(rev.len() - 1)];
            let level = ch.len() - 1 - i; // the down level this up block mirrors
            let p = &vs / "up_blocks" / i;
            let n = cfg.layers_per_block + 1;
            let resnets = (0..n)
                .map(|j| {
                    let skip = if j == n - 1 { input } else { out };
                    let res_in = if j == 0 { prev_out } else { out };
                    ResnetBlock2D::new(&p / "resnets" / j, res_in + skip, out, Some(temb), g, e)
                })
                .collect();
            let attentions = if t == "CrossAttnUpBlock2D" {
                (0..n)
                    .map(|j| {
                        Transformer2D::new(
                            &p / "attentions" / j,
                            out,
                            cfg,
                            cfg.heads(level),
                            cfg.transformer_layers_per_block.get(level),
                            lora,
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let up_s = (i + 1 < ch.len()).then(|| Upsample2D::new(&p / "upsamplers" / 0, out));
            up.push(UpBlock { resnets, attentions, up: up_s });
            prev_out = out;
        }
        let add_embedding = match cfg.addition_embed_type.as_deref() {
            Some("text_time") => {
                let input = cfg.projection_class_embeddings_input_dim.expect("validated");
                Some(TimestepMlp::new(&vs / "add_embedding", input, temb))
            }
            _ => None,
        };
        Ok(UNet2DConditionModel {
            conv_in: crate::nn::conv2d(&vs / "conv_in", cfg.in_channels, ch[0], 3, pad1),
            time_embedding: TimestepMlp::new(&vs / "time_embedding", ch[0], temb),
            add_embedding,
            down,
            mid,
            up,
            conv_norm_out: group_norm(&vs / "conv_norm_out", g, ch[0], e),
            conv_out: crate::nn::conv2d(&vs / "conv_out", ch[0], cfg.out_channels, 3, pad1),
            config: cfg.clone(),
        })
    }

    /// The element type of the weights (bfloat16 after mixed-precision set-up).
    pub fn kind(&self) -> Kind {
        self.conv_in.ws.kind()
    }

    /// Predicts noise (or v, or x₀, per the scheduler's prediction type).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<AddedCond>,
    ) -> Result<Tensor> {
        let segments = self.segments(timesteps, context, added)?;
        Ok(recompute::forward(&segments, vec![sample.shallow_clone()])?.swap_remove(0))
    }

    /// The forward as [`Segment`]s, one per unit diffusers checkpoints (a resnet with its
    /// transformer, a resampler, the mid block), for [`recompute::backward`]. The state between
    /// units is `[h, emb, skips…]`: the hidden state, the time embedding and the skip connections
    /// the up blocks will consume. The first segment takes `[sample]`; the last gives `[prediction]`.
    pub fn segments(
        &self,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<AddedCond>,
    ) -> Result<Vec<Segment<'_>>> {
        let cfg = &self.config;
        let added = match (&self.add_embedding, added) {
            (Some(_), Some(a)) => Some((a.text_embeds.shallow_clone(), a.time_ids.shallow_clone())),
            (Some(_), None) => {
                return Err(ModelError::Config {
                    what: "unet input".into(),
                    message: "this UNet needs text_embeds and time_ids (addition_embed_type text_time)"
                        .into(),
                })
            }
            (None, _) => None,
        };
        let timesteps = timesteps.shallow_clone();
        let mut segments: Vec<Segment<'_>> = vec![Box::new(move |s: &[Tensor]| {
            let sample = &s[0];
            let ch0 = cfg.block_out_channels[0];
            let t = timestep_embedding(&timesteps, ch0, cfg.flip_sin_to_cos, cfg.freq_shift as f64);
            let base = self.time_embedding.forward(&t.to_kind(sample.kind()));
            let emb = match (&self.add_embedding, &added) {
                (Some(add), Some((text_embeds, time_ids))) => {
                    let dim = cfg.addition_time_embed_dim.expect("validated");
                    let b = time_ids.size()[0];
                    let ids = timestep_embedding(
                        &time_ids.flatten(0, -1),
                        dim,
                        cfg.flip_sin_to_cos,
                        cfg.freq_shift as f64,
                    )
                    .reshape([b, -1]);
                    let input =
                        Tensor::cat(&[text_embeds.shallow_clone(), ids.to_kind(text_embeds.kind())], -1);
                    base + add.forward(&input)
                }
                _ => base,
            };
            let h = sample.apply(&self.conv_in);
            Ok(vec![h.shallow_clone(), emb, h])
        })];
        // The next state: `h`, the same `emb`, the first `keep` skips, then `push` if any.
        fn next(h: Tensor, s: &[Tensor], keep: usize, push: bool) -> Vec<Tensor> {
            let mut out = Vec::with_capacity(keep + 3);
            out.push(h.shallow_clone());
            out.extend(s[1..2 + keep].iter().map(Tensor::shallow_clone));
            if push {
                out.push(h);
            }
            out
        }
        for block in &self.down {
            for (k, resnet) in block.resnets.iter().enumerate() {
                let ctx = context.shallow_clone();
                segments.push(Box::new(move |s: &[Tensor]| {
                    let mut h = resnet.forward(&s[0], Some(&s[1]));
                    if let Some(a) = block.attentions.get(k) {
                        h = a.forward(&h, &ctx);
                    }
                    Ok(next(h, s, s.len() - 2, true))
                }));
            }
            if let Some(d) = &block.down {
                segments.push(Box::new(move |s: &[Tensor]| Ok(next(d.forward(&s[0]), s, s.len() - 2, true))));
            }
        }
        if let Some((r0, a, r1)) = &self.mid {
            let ctx = context.shallow_clone();
            segments.push(Box::new(move |s: &[Tensor]| {
                let emb = Some(&s[1]);
                let h = r1.forward(&a.forward(&r0.forward(&s[0], emb), &ctx), emb);
                Ok(next(h, s, s.len() - 2, false))
            }));
        }
        for block in &self.up {
            for (k, resnet) in block.resnets.iter().enumerate() {
                let ctx = context.shallow_clone();
                segments.push(Box::new(move |s: &[Tensor]| {
                    let skip = s.last().filter(|_| s.len() > 2).ok_or_else(|| ModelError::Config {
                        what: "unet".into(),
                        message: "an up block ran out of skip connections".into(),
                    })?;
                    let mut h = resnet.forward(&Tensor::cat(&[&s[0], skip], 1), Some(&s[1]));
                    if let Some(a) = block.attentions.get(k) {
                        h = a.forward(&h, &ctx);
                    }
                    Ok(next(h, s, s.len() - 3, false))
                }));
            }
            if let Some(u) = &block.up {
                segments
                    .push(Box::new(move |s: &[Tensor]| Ok(next(u.forward(&s[0]), s, s.len() - 2, false))));
            }
        }
        segments.push(Box::new(move |s: &[Tensor]| {
            Ok(vec![s[0].apply(&self.conv_norm_out).silu().apply(&self.conv_out)])
        }));
        Ok(segments)
    }
}
