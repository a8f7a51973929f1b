//! Building blocks of the diffusers UNet and VAE, with diffusers' variable names:
//! `ResnetBlock2D` (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`),
//! `Downsample2D` / `Upsample2D` (`conv`), and the single-head spatial self-attention of the VAE's
//! mid block (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0`).

use tch::{nn, nn::Module, Tensor};

fn conv(vs: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    crate::nn::conv2d(vs, c_in, c_out, k, nn::ConvConfig { stride, padding, ..Default::default() })
}

/// `nn.GroupNorm` with affine parameters.
pub fn group_norm(vs: nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(vs, groups, channels, nn::GroupNormConfig { eps, ..Default::default() })
}

/// `ResnetBlock2D` (default "scale_shift" off: the time embedding is added after `conv1`).
///
/// # Shapes
/// `[B, C_in, H, W]` (+ optional `temb [B, T]`) → `[B, C_out, H, W]`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<nn::Linear>,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock2D {
    /// Creates the block; `temb_channels` adds `time_emb_proj`.
    pub fn new(
        vs: nn::Path,
        c_in: i64,
        c_out: i64,
        temb_channels: Option<i64>,
        groups: i64,
        eps: f64,
    ) -> Self {
        Self::with_shortcut(vs, c_in, c_out, temb_channels, groups, eps, "conv_shortcut")
    }

    /// Like [`ResnetBlock2D::new`], with the 1×1 shortcut under another name (taming-style VQGANs
    /// call it `nin_shortcut`).
    pub fn with_shortcut(
        vs: nn::Path,
        c_in: i64,
        c_out: i64,
        temb_channels: Option<i64>,
        groups: i64,
        eps: f64,
        shortcut: &str,
    ) -> Self {
        ResnetBlock2D {
            norm1: group_norm(&vs / "norm1", groups, c_in, eps),
            conv1: conv(&vs / "conv1", c_in, c_out, 3, 1, 1),
            time_emb_proj: temb_channels
                .map(|t| crate::nn::linear(&vs / "time_emb_proj", t, c_out, Default::default())),
            norm2: group_norm(&vs / "norm2", groups, c_out, eps),
            conv2: conv(&vs / "conv2", c_out, c_out, 3, 1, 1),
            conv_shortcut: (c_in != c_out).then(|| conv(&vs / shortcut, c_in, c_out, 1, 1, 0)),
        }
    }

    /// Applies the block.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let h = xs.apply(&self.norm1).silu().apply(&self.conv1);
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => h + proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1),
            _ => h,
        };
        let h = h.apply(&self.norm2).silu().apply(&self.conv2);
        let skip = match &self.conv_shortcut {
            Some(c) => xs.apply(c),
            None => xs.shallow_clone(),
        };
        skip + h
    }
}

/// `Downsample2D` with a stride-2 conv; `padding = 0` pads right/bottom by one first (the VAE).
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    asymmetric_pad: bool,
}

impl Downsample2D {
    /// Creates the downsampler (`padding` 1 in the UNet, 0 in the VAE).
    pub fn new(vs: nn::Path, channels: i64, padding: i64) -> Self {
        Downsample2D {
            conv: conv(&vs / "conv", channels, channels, 3, 2, padding),
            asymmetric_pad: padding == 0,
        }
    }

    /// Halves the spatial size.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        if self.asymmetric_pad {
            xs.constant_pad_nd([0, 1, 0, 1]).apply(&self.conv)
        } else {
            xs.apply(&self.conv)
        }
    }
}

/// `Upsample2D`: nearest ×2, then a 3×3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    /// Creates the upsampler.
    pub fn new(vs: nn::Path, channels: i64) -> Self {
        Upsample2D { conv: conv(&vs / "conv", channels, channels, 3, 1, 1) }
    }

    /// Doubles the spatial size.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let (h, w) = (xs.size()[2], xs.size()[3]);
        xs.upsample_nearest2d([h * 2, w * 2], None, None).apply(&self.conv)
    }
}

/// The VAE mid block's single-head spatial self-attention with a residual.
#[derive(Debug)]
pub struct SpatialAttention {
    group_norm: nn::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

impl SpatialAttention {
    /// Creates the attention over `channels`.
    pub fn new(vs: nn::Path, channels: i64, groups: i64, eps: f64) -> Self {
        let lin = |name: &str| crate::nn::linear(&vs / name, channels, channels, Default::default());
        SpatialAttention {
            group_norm: group_norm(&vs / "group_norm", groups, channels, eps),
            to_q: lin("to_q"),
            to_k: lin("to_k"),
            to_v: lin("to_v"),
            to_out: crate::nn::linear(&vs / "to_out" / 0, channels, channels, Default::default()),
        }
    }

    /// Applies attention over the `H·W` positions: one head of width `C`, through libtorch's fused
    /// scaled-dot-product attention (flash / memory-efficient kernels where the device has them),
    /// so the `[HW, HW]` weights (1 GiB an image at SDXL's 128×128 latents) are never materialised.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, c, h, w) = xs.size4().expect("[B, C, H, W]");
        let t = xs.apply(&self.group_norm).view([b, c, h * w]).transpose(1, 2); // [B, HW, C]
        let head = |x: Tensor| x.unsqueeze(1); // [B, 1, HW, C]
        let (q, k, v) =
            (head(self.to_q.forward(&t)), head(self.to_k.forward(&t)), head(self.to_v.forward(&t)));
        let attended =
            Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        let out = self.to_out.forward(&attended.squeeze_dim(1)); // [B, HW, C]
        out.transpose(1, 2).view([b, c, h, w]) + xs
    }
}
