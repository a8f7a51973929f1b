//! LlamaGen's VQ-16 image tokenizer (`tokenizer/tokenizer_image/vq_model.py` of the LlamaGen
//! repository; transformers ships the same network as `JanusVQVAE`), with the reference checkpoint's
//! key names: `encoder.conv_blocks.{i}.res.{j}` / `.attn.{j}` / `.downsample.conv`, `encoder.mid.{0,1,2}`,
//! `decoder.conv_blocks.{i}` (level 0 is the lowest resolution) with `num_res_blocks + 1` resnets and
//! an `upsample`, `quant_conv`, `post_quant_conv` and `quantize.embedding.weight`. Attention sits at
//! the lowest resolution only. The quantizer compares l2-normalised latents with an l2-normalised
//! codebook (LlamaGen's `codebook_l2_norm`), and decoding embeds codes with normalised rows.
//!
//! # Shapes
//! `pixels [B, 3, R, R]` in `[-1, 1]` ⇄ `codes [B, R/f, R/f]`, `f = 2^(levels - 1)` (16 for VQ-16).

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use super::chameleon_vq::{check_codes, AttnBlock};
use crate::diffusion::blocks::{group_norm, Downsample2D, ResnetBlock2D, Upsample2D};
use crate::error::{ModelError, Result};

/// The reference's `ModelArgs` (the fields the architecture needs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaGenVqConfig {
    /// Codebook size (16384).
    pub codebook_size: i64,
    /// Codebook vector width (8).
    pub codebook_embed_dim: i64,
    /// Encoder output / decoder input channels (256).
    pub z_channels: i64,
    /// Width of the first level (128).
    pub ch: i64,
    /// Width multipliers per level (`[1, 1, 2, 2, 4]`).
    pub ch_mult: Vec<i64>,
    /// Resnets per encoder level (2; the decoder has one more).
    pub num_res_blocks: i64,
}

impl LlamaGenVqConfig {
    /// VQ-16 as published.
    pub fn vq_16() -> Self {
        LlamaGenVqConfig {
            codebook_size: 16384,
            codebook_embed_dim: 8,
            z_channels: 256,
            ch: 128,
            ch_mult: vec![1, 1, 2, 2, 4],
            num_res_blocks: 2,
        }
    }

    /// Reads a `config.json` with these fields.
    pub fn from_json(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { what: path.display().to_string(), message: e.to_string() })
    }
}

const GROUPS: i64 = 32;
const EPS: f64 = 1e-6;

fn conv(vs: nn::Path, c_in: i64, c_out: i64, k: i64, padding: i64) -> nn::Conv2D {
    crate::nn::conv2d(vs, c_in, c_out, k, nn::ConvConfig { padding, ..Default::default() })
}

fn resnet(vs: nn::Path, c_in: i64, c_out: i64) -> ResnetBlock2D {
    ResnetBlock2D::with_shortcut(vs, c_in, c_out, None, GROUPS, EPS, "nin_shortcut")
}

/// `(res, attn, res)` under `mid.{0,1,2}`.
#[derive(Debug)]
struct Mid(ResnetBlock2D, AttnBlock, ResnetBlock2D);

impl Mid {
    fn new(vs: nn::Path, c: i64) -> Self {
        Mid(resnet(&vs / 0, c, c), AttnBlock::new(&vs / 1, c), resnet(&vs / 2, c, c))
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        self.2.forward(&self.1.forward(&self.0.forward(xs, None)), None)
    }
}

#[derive(Debug)]
struct Level<R> {
    res: Vec<ResnetBlock2D>,
    attn: Vec<AttnBlock>,
    resample: Option<R>,
}

impl<R> Level<R> {
    fn blocks(&self, mut h: Tensor) -> Tensor {
        for (j, r) in self.res.iter().enumerate() {
            h = r.forward(&h, None);
            if let Some(a) = self.attn.get(j) {
                h = a.forward(&h);
            }
        }
        h
    }
}

/// LlamaGen's VQ model.
#[derive(Debug)]
pub struct LlamaGenVq {
    enc_conv_in: nn::Conv2D,
    enc_levels: Vec<Level<Downsample2D>>,
    enc_mid: Mid,
    enc_norm_out: nn::GroupNorm,
    enc_conv_out: nn::Conv2D,
    quant_conv: nn::Conv2D,
    post_quant_conv: nn::Conv2D,
    codebook: Tensor,
    dec_conv_in: nn::Conv2D,
    dec_mid: Mid,
    dec_levels: Vec<Level<Upsample2D>>,
    dec_norm_out: nn::GroupNorm,
    dec_conv_out: nn::Conv2D,
    config: LlamaGenVqConfig,
}

impl LlamaGenVq {
    /// Creates the variables under `vs` (the checkpoint's root).
    pub fn new(vs: nn::Path, cfg: &LlamaGenVqConfig) -> Result<Self> {
        let n = cfg.ch_mult.len();
        if n == 0 || cfg.num_res_blocks < 1 {
            return Err(ModelError::Config {
                what: "vq config".into(),
                message: "needs at least one level and one resnet per level".into(),
            });
        }
        if let Some(c) = cfg.ch_mult.iter().map(|m| m * cfg.ch).find(|c| c % GROUPS != 0) {
            return Err(ModelError::Config {
                what: "vq config".into(),
                message: format!("{c} channels are not divisible into {GROUPS} groups"),
            });
        }
        let (e, d) = (&vs / "encoder", &vs / "decoder");
        let mut c_in = cfg.ch;
        let enc_levels = (0..n)
            .map(|i| {
                let l = &e / "conv_blocks" / i as i64;
                let c_out = cfg.ch * cfg.ch_mult[i];
                let mut res = Vec::new();
                let mut attn = Vec::new();
                for j in 0..cfg.num_res_blocks {
                    res.push(resnet(&l / "res" / j, c_in, c_out));
                    c_in = c_out;
                    if i == n - 1 {
                        attn.push(AttnBlock::new(&l / "attn" / j, c_in));
                    }
                }
                let resample = (i + 1 < n).then(|| Downsample2D::new(&l / "downsample", c_in, 0));
                Level { res, attn, resample }
            })
            .collect();
        let top = cfg.ch * cfg.ch_mult[n - 1];
        let enc_mid = Mid::new(&e / "mid", top);
        let mut c_in = top;
        let dec_levels = (0..n)
            .map(|i| {
                let l = &d / "conv_blocks" / i as i64;
                let c_out = cfg.ch * cfg.ch_mult[n - 1 - i];
                let mut res = Vec::new();
                let mut attn = Vec::new();
                for j in 0..=cfg.num_res_blocks {
                    res.push(resnet(&l / "res" / j, c_in, c_out));
                    c_in = c_out;
                    if i == 0 {
                        attn.push(AttnBlock::new(&l / "attn" / j, c_in));
                    }
                }
                let resample = (i + 1 < n).then(|| Upsample2D::new(&l / "upsample", c_in));
                Level { res, attn, resample }
            })
            .collect();
        Ok(LlamaGenVq {
            enc_conv_in: conv(&e / "conv_in", 3, cfg.ch, 3, 1),
            enc_levels,
            enc_mid,
            enc_norm_out: group_norm(&e / "norm_out", GROUPS, top, EPS),
            enc_conv_out: conv(&e / "conv_out", top, cfg.z_channels, 3, 1),
            quant_conv: conv(&vs / "quant_conv", cfg.z_channels, cfg.codebook_embed_dim, 1, 0),
            post_quant_conv: conv(&vs / "post_quant_conv", cfg.codebook_embed_dim, cfg.z_channels, 1, 0),
            codebook: (&vs / "quantize" / "embedding").var(
                "weight",
                &[cfg.codebook_size, cfg.codebook_embed_dim],
                nn::Init::Randn { mean: 0.0, stdev: 1.0 },
            ),
            dec_conv_in: conv(&d / "conv_in", cfg.z_channels, top, 3, 1),
            dec_mid: Mid::new(&d / "mid", top),
            dec_levels,
            dec_norm_out: group_norm(&d / "norm_out", GROUPS, c_in, EPS),
            dec_conv_out: conv(&d / "conv_out", c_in, 3, 3, 1),
            config: cfg.clone(),
        })
    }

    /// Pixels per code along each side.
    pub fn downsample_factor(&self) -> i64 {
        1 << (self.config.ch_mult.len() - 1)
    }

    /// The codebook with l2-normalised rows `[codebook_size, codebook_embed_dim]`: what latents
    /// are compared with and codes decode to.
    pub fn unit_codebook(&self) -> Tensor {
        let norm = self.codebook.square().sum_dim_intlist(-1, true, Kind::Float).sqrt().clamp_min(1e-12);
        &self.codebook / norm
    }

    /// The codebook variable (`quantize.embedding.weight`).
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }

    /// The l2-normalised latents `[B, codebook_embed_dim, R/f, R/f]` of `pixels [B, 3, R, R]` in
    /// `[-1, 1]`, before quantisation (differentiable; what training's straight-through estimator
    /// needs).
    pub fn encode_latent(&self, pixels: &Tensor) -> Result<Tensor> {
        let size = pixels.size();
        let f = self.downsample_factor();
        if size.len() != 4 || size[1] != 3 || size[2] % f != 0 || size[3] % f != 0 {
            return Err(ModelError::Config {
                what: "VQ input".into(),
                message: format!("expected [B, 3, H, W] with H and W multiples of {f}, got {size:?}"),
            });
        }
        let mut h = pixels.apply(&self.enc_conv_in);
        for level in &self.enc_levels {
            h = level.blocks(h);
            if let Some(down) = &level.resample {
                h = down.forward(&h);
            }
        }
        h = self.enc_mid.forward(&h);
        let z = h.apply(&self.enc_norm_out).silu().apply(&self.enc_conv_out).apply(&self.quant_conv);
        Ok(&z / z.square().sum_dim_intlist(1, true, Kind::Float).sqrt().clamp_min(1e-12))
    }

    /// Encodes `pixels [B, 3, R, R]` in `[-1, 1]` to codes `[B, R/f, R/f]`.
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        // Unit vectors against the unit codebook (cosine), by the VQ's shared nearest-code rule.
        Ok(super::chameleon_vq::nearest_codes(&self.encode_latent(pixels)?, &self.unit_codebook()))
    }

    /// Pixels `[B, 3, h·f, w·f]` (about `[-1, 1]`) of quantised latents `[B, codebook_embed_dim, h, w]`.
    pub fn decode_latent(&self, zq: &Tensor) -> Tensor {
        let mut h = zq.apply(&self.post_quant_conv).apply(&self.dec_conv_in);
        h = self.dec_mid.forward(&h);
        for level in &self.dec_levels {
            h = level.blocks(h);
            if let Some(up) = &level.resample {
                h = up.forward(&h);
            }
        }
        h.apply(&self.dec_norm_out).silu().apply(&self.dec_conv_out)
    }

    /// Decodes codes `[B, h, w]` to pixels `[B, 3, h·f, w·f]` (about `[-1, 1]`).
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let size = codes.size();
        if size.len() != 3 {
            return Err(ModelError::Config {
                what: "VQ codes".into(),
                message: format!("expected [B, h, w], got {size:?}"),
            });
        }
        check_codes(codes, self.config.codebook_size)?;
        let z =
            self.unit_codebook().index_select(0, &codes.flatten(0, -1)).view([size[0], size[1], size[2], -1]);
        Ok(self.decode_latent(&z.permute([0, 3, 1, 2])))
    }
}
