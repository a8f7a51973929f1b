//! The Chameleon VQ-VAE image tokenizer (a taming-style VQGAN): `encoder` → `quant_conv` →
//! nearest-codebook quantizer (`quantize.embedding`) gives the token grid; codes →
//! `quantize.embedding` → `post_quant_conv` → `decoder` gives the image back.
//!
//! [`ChameleonVqVae`] is the encoder side with transformers' paths (`model.vqmodel.*` inside a
//! Chameleon checkpoint). [`ChameleonVqDecoder`] is the decoder side, which transformers does not
//! ship, in the original tokenizer checkpoint's layout (`decoder.*`, `post_quant_conv.*`,
//! `quantize.embedding.weight`); it has its own variable store.
//!
//! # Shapes
//! `pixels [B, 3, R, R]` in `[-1, 1]` → `codes [B, R/f, R/f]` (i64), `f = 2^(levels - 1)`.

use serde::Deserialize;
use tch::{nn, Kind, Tensor};

use crate::diffusion::blocks::{group_norm, Downsample2D, ResnetBlock2D, Upsample2D};
use crate::error::{ModelError, Result};

/// transformers' `ChameleonVQVAEConfig` (the fields the architecture needs).
#[derive(Clone, Debug, Deserialize)]
pub struct ChameleonVqConfig {
    /// Codebook vector width.
    pub embed_dim: i64,
    /// Codebook size.
    pub num_embeddings: i64,
    /// Encoder output channels.
    pub latent_channels: i64,
    /// Training resolution (decides where attention sits).
    pub resolution: i64,
    /// Image channels.
    #[serde(default = "three")]
    pub in_channels: i64,
    /// Width of the first level.
    pub base_channels: i64,
    /// Width multiplier per level.
    pub channel_multiplier: Vec<i64>,
    /// Resnet blocks per encoder level.
    pub num_res_blocks: i64,
    /// Resolutions with attention blocks.
    #[serde(default)]
    pub attn_resolutions: Option<Vec<i64>>,
    /// `vanilla` (attention blocks) or `none`.
    #[serde(default = "vanilla")]
    pub attn_type: String,
    /// Twice the latent channels out of the encoder (not used by Chameleon).
    #[serde(default)]
    pub double_latent: bool,
}

fn three() -> i64 {
    3
}

fn vanilla() -> String {
    "vanilla".into()
}

const GROUPS: i64 = 32;
const EPS: f64 = 1e-6;

fn conv(vs: nn::Path, c_in: i64, c_out: i64, k: i64, padding: i64) -> nn::Conv2D {
    crate::nn::conv2d(vs, c_in, c_out, k, nn::ConvConfig { padding, ..Default::default() })
}

/// Single-head spatial self-attention with 1×1 convolutions (`norm`, `q`, `k`, `v`, `proj_out`).
#[derive(Debug)]
pub struct AttnBlock {
    norm: nn::GroupNorm,
    q: nn::Conv2D,
    k: nn::Conv2D,
    v: nn::Conv2D,
    proj_out: nn::Conv2D,
}

impl AttnBlock {
    /// Creates the block.
    pub fn new(vs: nn::Path, c: i64) -> Self {
        AttnBlock {
            norm: group_norm(&vs / "norm", GROUPS, c, EPS),
            q: conv(&vs / "q", c, c, 1, 0),
            k: conv(&vs / "k", c, c, 1, 0),
            v: conv(&vs / "v", c, c, 1, 0),
            proj_out: conv(&vs / "proj_out", c, c, 1, 0),
        }
    }

    /// `x + proj_out(attention(norm(x)))`.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, c, h, w) = xs.size4().expect("[B, C, H, W]");
        let n = xs.apply(&self.norm);
        let q = n.apply(&self.q).view([b, c, h * w]).transpose(1, 2); // [B, HW, C]
        let k = n.apply(&self.k).view([b, c, h * w]); // [B, C, HW]
        let v = n.apply(&self.v).view([b, c, h * w]); // [B, C, HW]
        let attn = (q.bmm(&k) * (c as f64).powf(-0.5)).softmax(2, q.kind()); // [B, HW(q), HW(k)]
        let out = v.bmm(&attn.transpose(1, 2)).view([b, c, h, w]);
        xs + out.apply(&self.proj_out)
    }
}

/// Codes outside `0..codebook` are an error naming the span.
pub(crate) fn check_codes(codes: &Tensor, codebook: i64) -> Result<()> {
    if codes.numel() > 0 {
        let (lo, hi) = (codes.min().int64_value(&[]), codes.max().int64_value(&[]));
        if lo < 0 || hi >= codebook {
            return Err(ModelError::Config {
                what: "VQ codes".into(),
                message: format!("codes span {lo}..={hi}, the codebook has {codebook}"),
            });
        }
    }
    Ok(())
}

impl ChameleonVqConfig {
    /// Pixels per code along each side: one halving per level after the first.
    pub fn downsample_factor(&self) -> i64 {
        1 << (self.channel_multiplier.len().max(1) - 1)
    }
}

fn check(cfg: &ChameleonVqConfig) -> Result<()> {
    let bad = |message: String| Err(ModelError::Config { what: "vq_config".into(), message });
    if cfg.channel_multiplier.is_empty() || cfg.num_res_blocks < 1 {
        return bad("needs at least one level and one resnet block per level".into());
    }
    if cfg.double_latent {
        return bad("double_latent is not supported".into());
    }
    if !matches!(cfg.attn_type.as_str(), "vanilla" | "none") {
        return bad(format!("unsupported attn_type `{}`", cfg.attn_type));
    }
    if let Some(c) = cfg.channel_multiplier.iter().map(|m| m * cfg.base_channels).find(|c| c % GROUPS != 0) {
        return bad(format!("{c} channels are not divisible into {GROUPS} groups"));
    }
    Ok(())
}

#[derive(Debug)]
struct Level {
    blocks: Vec<ResnetBlock2D>,
    attn: Vec<AttnBlock>,
    resample: Option<Downsample2D>,
}

/// The encoder (`encoder.*`).
#[derive(Debug)]
struct Encoder {
    conv_in: nn::Conv2D,
    levels: Vec<Level>,
    mid: (ResnetBlock2D, Option<AttnBlock>, ResnetBlock2D),
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(vs: nn::Path, cfg: &ChameleonVqConfig) -> Self {
        let base = cfg.base_channels;
        let attn_at = |res: i64| {
            cfg.attn_type == "vanilla" && cfg.attn_resolutions.as_ref().is_some_and(|r| r.contains(&res))
        };
        let mut res = cfg.resolution;
        let mut c_in = base;
        let n = cfg.channel_multiplier.len();
        let levels = (0..n)
            .map(|i| {
                let lvs = &vs / "down" / i as i64;
                let c_out = base * cfg.channel_multiplier[i];
                let mut blocks = Vec::new();
                let mut attn = Vec::new();
                for j in 0..cfg.num_res_blocks {
                    blocks.push(ResnetBlock2D::with_shortcut(
                        &lvs / "block" / j,
                        c_in,
                        c_out,
                        None,
                        GROUPS,
                        EPS,
                        "nin_shortcut",
                    ));
                    c_in = c_out;
                    if attn_at(res) {
                        attn.push(AttnBlock::new(&lvs / "attn" / j, c_in));
                    }
                }
                let resample = (i + 1 < n).then(|| {
                    res /= 2;
                    Downsample2D::new(&lvs / "downsample", c_in, 0)
                });
                Level { blocks, attn, resample }
            })
            .collect();
        let mid = &vs / "mid";
        Encoder {
            conv_in: conv(&vs / "conv_in", cfg.in_channels, base, 3, 1),
            levels,
            mid: (
                ResnetBlock2D::with_shortcut(&mid / "block_1", c_in, c_in, None, GROUPS, EPS, "nin_shortcut"),
                (cfg.attn_type == "vanilla").then(|| AttnBlock::new(&mid / "attn_1", c_in)),
                ResnetBlock2D::with_shortcut(&mid / "block_2", c_in, c_in, None, GROUPS, EPS, "nin_shortcut"),
            ),
            norm_out: group_norm(&vs / "norm_out", GROUPS, c_in, EPS),
            conv_out: conv(&vs / "conv_out", c_in, cfg.latent_channels, 3, 1),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = xs.apply(&self.conv_in);
        for level in &self.levels {
            for (j, block) in level.blocks.iter().enumerate() {
                h = block.forward(&h, None);
                if let Some(a) = level.attn.get(j) {
                    h = a.forward(&h);
                }
            }
            if let Some(down) = &level.resample {
                h = down.forward(&h);
            }
        }
        h = self.mid.0.forward(&h, None);
        if let Some(a) = &self.mid.1 {
            h = a.forward(&h);
        }
        h = self.mid.2.forward(&h, None);
        h.apply(&self.norm_out).silu().apply(&self.conv_out)
    }
}

/// The Chameleon VQ-VAE.
#[derive(Debug)]
pub struct ChameleonVqVae {
    encoder: Encoder,
    quant_conv: nn::Conv2D,
    codebook: Tensor,
    config: ChameleonVqConfig,
}

impl ChameleonVqVae {
    /// Creates the variables under `vs` (`model.vqmodel` in a Chameleon checkpoint).
    pub fn new(vs: nn::Path, cfg: &ChameleonVqConfig) -> Result<Self> {
        check(cfg)?;
        // transformers checkpoints carry `post_quant_conv` here too; the decoder side has its own.
        let _ = conv(&vs / "post_quant_conv", cfg.embed_dim, cfg.latent_channels, 1, 0);
        Ok(ChameleonVqVae {
            encoder: Encoder::new(&vs / "encoder", cfg),
            quant_conv: conv(&vs / "quant_conv", cfg.latent_channels, cfg.embed_dim, 1, 0),
            codebook: (&vs / "quantize" / "embedding").var(
                "weight",
                &[cfg.num_embeddings, cfg.embed_dim],
                nn::Init::Randn { mean: 0.0, stdev: 1.0 },
            ),
            config: cfg.clone(),
        })
    }

    /// The config.
    pub fn config(&self) -> &ChameleonVqConfig {
        &self.config
    }

    /// Pixels per code along each side.
    pub fn downsample_factor(&self) -> i64 {
        self.config.downsample_factor()
    }

    /// The encoder's continuous output `[B, D, R/f, R/f]` (after `quant_conv`, before the codebook)
    /// of `pixels [B, 3, R, R]` in `[-1, 1]`.
    pub fn encode_latent(&self, pixels: &Tensor) -> Result<Tensor> {
        let size = pixels.size();
        let f = self.downsample_factor();
        if size.len() != 4 || size[1] != self.config.in_channels || size[2] % f != 0 || size[3] % f != 0 {
            return Err(ModelError::Config {
                what: "VQ input".into(),
                message: format!(
                    "expected [B, {}, H, W] with H and W multiples of {f}, got {size:?}",
                    self.config.in_channels
                ),
            });
        }
        Ok(self.encoder.forward(pixels).apply(&self.quant_conv))
    }

    /// Encodes `pixels [B, 3, R, R]` in `[-1, 1]` to the code grid `[B, R/f, R/f]`.
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(nearest_codes(&self.encode_latent(pixels)?, &self.codebook))
    }

    /// The codebook `[num_embeddings, embed_dim]`.
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }
}

/// The index of the nearest codebook row of every vector of `z [B, D, h, w]`: `[B, h, w]`.
pub fn nearest_codes(z: &Tensor, codebook: &Tensor) -> Tensor {
    let (b, d, h, w) = z.size4().expect("[B, D, h, w]");
    let flat = z.permute([0, 2, 3, 1]).reshape([-1, d]); // [BHW, D]
                                                         // ‖z − e‖² = ‖z‖² + ‖e‖² − 2 z·e, as the reference computes it (same ties).
    let distances = flat.square().sum_dim_intlist(1, true, Kind::Float)
        + codebook.square().sum_dim_intlist(1, false, Kind::Float)
        - flat.matmul(&codebook.tr()) * 2.0;
    distances.argmin(1, false).view([b, h, w])
}

/// The decoder side of the VQ-VAE (`decoder.*`, `post_quant_conv.*`, `quantize.embedding.weight`).
///
/// # Shapes
/// `codes [B, h, w]` → `pixels [B, 3, h·f, w·f]` in about `[-1, 1]`.
#[derive(Debug)]
pub struct ChameleonVqDecoder {
    codebook: Tensor,
    post_quant_conv: nn::Conv2D,
    conv_in: nn::Conv2D,
    mid: (ResnetBlock2D, Option<AttnBlock>, ResnetBlock2D),
    /// Levels from the highest resolution (`up.0`) to the lowest; run in reverse.
    up: Vec<(Vec<ResnetBlock2D>, Vec<AttnBlock>, Option<Upsample2D>)>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    num_embeddings: i64,
}

impl ChameleonVqDecoder {
    /// Creates the variables under `vs` (the root of the tokenizer checkpoint).
    pub fn new(vs: nn::Path, cfg: &ChameleonVqConfig) -> Result<Self> {
        check(cfg)?;
        let d = &vs / "decoder";
        let n = cfg.channel_multiplier.len();
        let base = cfg.base_channels;
        let attn_at = |res: i64| {
            cfg.attn_type == "vanilla" && cfg.attn_resolutions.as_ref().is_some_and(|r| r.contains(&res))
        };
        let mut c_in = base * cfg.channel_multiplier[n - 1];
        let mut res = cfg.resolution >> (n - 1);
        let resnet = |p: nn::Path, a: i64, b: i64| {
            ResnetBlock2D::with_shortcut(p, a, b, None, GROUPS, EPS, "nin_shortcut")
        };
        let conv_in = conv(&d / "conv_in", cfg.latent_channels, c_in, 3, 1);
        let mid = &d / "mid";
        let mid = (
            resnet(&mid / "block_1", c_in, c_in),
            (cfg.attn_type == "vanilla").then(|| AttnBlock::new(&mid / "attn_1", c_in)),
            resnet(&mid / "block_2", c_in, c_in),
        );
        let mut up: Vec<(Vec<ResnetBlock2D>, Vec<AttnBlock>, Option<Upsample2D>)> = Vec::new();
        for i in (0..n).rev() {
            let lvs = &d / "up" / i as i64;
            let c_out = base * cfg.channel_multiplier[i];
            let mut blocks = Vec::new();
            let mut attn = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                blocks.push(resnet(&lvs / "block" / j, c_in, c_out));
                c_in = c_out;
                if attn_at(res) {
                    attn.push(AttnBlock::new(&lvs / "attn" / j, c_in));
                }
            }
            let upsample = (i != 0).then(|| {
                res *= 2;
                Upsample2D::new(&lvs / "upsample", c_in)
            });
            up.push((blocks, attn, upsample));
        }
        up.reverse();
        Ok(ChameleonVqDecoder {
            codebook: (&vs / "quantize" / "embedding").var(
                "weight",
                &[cfg.num_embeddings, cfg.embed_dim],
                nn::Init::Randn { mean: 0.0, stdev: 1.0 },
            ),
            post_quant_conv: conv(&vs / "post_quant_conv", cfg.embed_dim, cfg.latent_channels, 1, 0),
            conv_in,
            mid,
            up,
            norm_out: group_norm(&d / "norm_out", GROUPS, c_in, EPS),
            conv_out: conv(&d / "conv_out", c_in, cfg.in_channels, 3, 1),
            num_embeddings: cfg.num_embeddings,
        })
    }

    /// Decodes `codes [B, h, w]`; codes outside the codebook are an error.
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let size = codes.size();
        if size.len() != 3 {
            return Err(ModelError::Config {
                what: "VQ codes".into(),
                message: format!("expected [B, h, w], got {size:?}"),
            });
        }
        check_codes(codes, self.num_embeddings)?;
        let z = self.codebook.index_select(0, &codes.flatten(0, -1)).view([size[0], size[1], size[2], -1]);
        Ok(self.decode_latent(&z.permute([0, 3, 1, 2])))
    }

    /// The codebook `[num_embeddings, embed_dim]`.
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }

    /// Decodes (quantised) code vectors `z [B, D, h, w]` — what training passes through with the
    /// straight-through estimator.
    pub fn decode_latent(&self, z: &Tensor) -> Tensor {
        let mut h = z.apply(&self.post_quant_conv).apply(&self.conv_in);
        h = self.mid.0.forward(&h, None);
        if let Some(a) = &self.mid.1 {
            h = a.forward(&h);
        }
        h = self.mid.2.forward(&h, None);
        for (blocks, attn, upsample) in self.up.iter().rev() {
            for (j, block) in blocks.iter().enumerate() {
                h = block.forward(&h, None);
                if let Some(a) = attn.get(j) {
                    h = a.forward(&h);
                }
            }
            if let Some(u) = upsample {
                h = u.forward(&h);
            }
        }
        h.apply(&self.norm_out).silu().apply(&self.conv_out)
    }
}
