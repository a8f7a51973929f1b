//! `AutoencoderKL` in the diffusers layout (Rombach et al. 2022): encoder → diagonal Gaussian over
//! the latent, decoder back to pixels, `scaling_factor` between latent and diffusion space.
//! Configured by the model folder's `vae/config.json`.

use serde::Deserialize;
use tch::{nn, Tensor};

use super::blocks::{group_norm, Downsample2D, ResnetBlock2D, SpatialAttention, Upsample2D};
use crate::error::{ModelError, Result};

fn three() -> i64 {
    3
}
fn four() -> i64 {
    4
}
fn groups() -> i64 {
    32
}
fn scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

/// The fields of a diffusers `AutoencoderKL` config this module uses.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: i64,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: i64,
    /// Channels per resolution level.
    pub block_out_channels: Vec<i64>,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub layers_per_block: i64,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: i64,
    /// GroupNorm groups.
    #[serde(default = "groups")]
    pub norm_num_groups: i64,
    /// Latent ↔ diffusion-space scale.
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    /// Attention in the mid blocks.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Block types (only the `DownEncoderBlock2D` / `UpDecoderBlock2D` family is supported).
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Block types.
    #[serde(default)]
    pub up_block_types: Vec<String>,
}

impl VaeConfig {
    /// Pixels per latent along each side: one halving per level after the first.
    pub fn scale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len().max(1) - 1)
    }

    /// Reads a `config.json`, rejecting block types this implementation does not have.
    pub fn from_json(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { what: path.display().to_string(), message: e.to_string() })?;
        for t in cfg.down_block_types.iter().chain(&cfg.up_block_types) {
            if t != "DownEncoderBlock2D" && t != "UpDecoderBlock2D" {
                return Err(ModelError::Config {
                    what: path.display().to_string(),
                    message: format!("unsupported block type `{t}`"),
                });
            }
        }
        Ok(cfg)
    }
}

const EPS: f64 = 1e-6;

#[derive(Debug)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vs: nn::Path, c: i64, groups: i64, attention: bool) -> Self {
        MidBlock {
            resnet0: ResnetBlock2D::new(&vs / "resnets" / 0, c, c, None, groups, EPS),
            attention: attention.then(|| SpatialAttention::new(&vs / "attentions" / 0, c, groups, EPS)),
            resnet1: ResnetBlock2D::new(&vs / "resnets" / 1, c, c, None, groups, EPS),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = self.resnet0.forward(xs, None);
        if let Some(a) = &self.attention {
            h = a.forward(&h);
        }
        self.resnet1.forward(&h, None)
    }
}

#[derive(Debug)]
struct Level {
    resnets: Vec<ResnetBlock2D>,
    down: Option<Downsample2D>,
    up: Option<Upsample2D>,
}

/// `AutoencoderKL`.
///
/// # Shapes
/// `encode`: `[B, 3, H, W]` in `[-1, 1]` → mean and log-variance `[B, z, H/f, W/f]`;
/// `decode`: `[B, z, H/f, W/f]` → `[B, 3, H, W]`, with `f = 2^(levels - 1)`.
#[derive(Debug)]
pub struct AutoencoderKl {
    enc_conv_in: nn::Conv2D,
    enc_levels: Vec<Level>,
    enc_mid: MidBlock,
    enc_norm_out: nn::GroupNorm,
    enc_conv_out: nn::Conv2D,
    quant_conv: nn::Conv2D,
    post_quant_conv: nn::Conv2D,
    dec_conv_in: nn::Conv2D,
    dec_mid: MidBlock,
    dec_levels: Vec<Level>,
    dec_norm_out: nn::GroupNorm,
    dec_conv_out: nn::Conv2D,
    /// Latent ↔ diffusion-space scale.
    pub scaling_factor: f64,
}

impl AutoencoderKl {
    /// Creates the variables under `vs` (keys as in a diffusers checkpoint).
    pub fn new(vs: nn::Path, cfg: &VaeConfig) -> Self {
        let g = cfg.norm_num_groups;
        let ch = &cfg.block_out_channels;
        let pad1 = nn::ConvConfig { padding: 1, ..Default::default() };
        let c3 = |p: nn::Path, i, o| crate::nn::conv2d(p, i, o, 3, pad1);
        let c1 = |p: nn::Path, i, o| crate::nn::conv2d(p, i, o, 1, Default::default());
        let enc = &vs / "encoder";
        let mut enc_levels = Vec::new();
        let mut c_prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let p = &enc / "down_blocks" / i;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(&p / "resnets" / j, if j == 0 { c_prev } else { c }, c, None, g, EPS)
                })
                .collect();
            let down = (i + 1 < ch.len()).then(|| Downsample2D::new(&p / "downsamplers" / 0, c, 0));
            enc_levels.push(Level { resnets, down, up: None });
            c_prev = c;
        }
        let top = *ch.last().expect("at least one level");
        let dec = &vs / "decoder";
        let rev: Vec<i64> = ch.iter().rev().copied().collect();
        let mut dec_levels = Vec::new();
        let mut c_prev = top;
        for (i, &c) in rev.iter().enumerate() {
            let p = &dec / "up_blocks" / i;
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(&p / "resnets" / j, if j == 0 { c_prev } else { c }, c, None, g, EPS)
                })
                .collect();
            let up = (i + 1 < rev.len()).then(|| Upsample2D::new(&p / "upsamplers" / 0, c));
            dec_levels.push(Level { resnets, down: None, up });
            c_prev = c;
        }
        let z = cfg.latent_channels;
        AutoencoderKl {
            enc_conv_in: c3(&enc / "conv_in", cfg.in_channels, ch[0]),
            enc_levels,
            enc_mid: MidBlock::new(&enc / "mid_block", top, g, cfg.mid_block_add_attention),
            enc_norm_out: group_norm(&enc / "conv_norm_out", g, top, EPS),
            enc_conv_out: c3(&enc / "conv_out", top, 2 * z),
            quant_conv: c1(&vs / "quant_conv", 2 * z, 2 * z),
            post_quant_conv: c1(&vs / "post_quant_conv", z, z),
            dec_conv_in: c3(&dec / "conv_in", z, top),
            dec_mid: MidBlock::new(&dec / "mid_block", top, g, cfg.mid_block_add_attention),
            dec_levels,
            dec_norm_out: group_norm(&dec / "conv_norm_out", g, ch[0], EPS),
            dec_conv_out: c3(&dec / "conv_out", ch[0], cfg.out_channels),
            scaling_factor: cfg.scaling_factor,
        }
    }

    /// The latent distribution's mean and log-variance (clamped to [-30, 20] like the reference).
    pub fn encode(&self, xs: &Tensor) -> (Tensor, Tensor) {
        let mut h = xs.apply(&self.enc_conv_in);
        for level in &self.enc_levels {
            for r in &level.resnets {
                h = r.forward(&h, None);
            }
            if let Some(d) = &level.down {
                h = d.forward(&h);
            }
        }
        let h = self.enc_mid.forward(&h).apply(&self.enc_norm_out).silu().apply(&self.enc_conv_out);
        let moments = h.apply(&self.quant_conv); // [B, 2z, h, w]
        let parts = moments.chunk(2, 1);
        (parts[0].shallow_clone(), parts[1].clamp(-30.0, 20.0))
    }

    /// A latent sample `mean + exp(logvar / 2) · ε` (`ε` from the caller, for determinism).
    pub fn sample_latent(mean: &Tensor, logvar: &Tensor, eps: &Tensor) -> Tensor {
        mean + (logvar * 0.5).exp() * eps
    }

    /// Pixels from a latent (not scaled: divide diffusion latents by `scaling_factor` first).
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let mut h = self.dec_mid.forward(&z.apply(&self.post_quant_conv).apply(&self.dec_conv_in));
        for level in &self.dec_levels {
            for r in &level.resnets {
                h = r.forward(&h, None);
            }
            if let Some(u) = &level.up {
                h = u.forward(&h);
            }
        }
        h.apply(&self.dec_norm_out).silu().apply(&self.dec_conv_out)
    }
}
