//! Pixels to tensors: RGB8 buffers to `[3, H, W]` float tensors in `[0, 1]`, and resizing.

use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};

/// An RGB8 buffer (`height * width * 3` bytes, row-major) as a `[3, H, W]` float tensor in `[0, 1]`.
pub fn rgb8_to_tensor(width: u32, height: u32, rgb: &[u8], device: Device) -> Result<Tensor> {
    let expected = width as usize * height as usize * 3;
    if rgb.len() != expected {
        return Err(ModelError::Config {
            what: "image".into(),
            message: format!("{} bytes for a {width}x{height} RGB image (expected {expected})", rgb.len()),
        });
    }
    let t = Tensor::from_slice(rgb).view([height as i64, width as i64, 3]).permute([2, 0, 1]);
    Ok((t.to_kind(Kind::Float) / 255.0).to_device(device))
}

/// Resizes `[B, 3, H, W]` to `[B, 3, size, size]` with bilinear interpolation (antialiased when
/// shrinking, like PIL's bilinear resize).
pub fn resize_square(images: &Tensor, size: i64) -> Tensor {
    let (h, w) = (images.size()[2], images.size()[3]);
    if h == size && w == size {
        return images.shallow_clone();
    }
    images.internal_upsample_bilinear2d_aa([size, size], false, None, None)
}

/// Resampling filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resample {
    /// PIL `BILINEAR` (antialiased when shrinking).
    Bilinear,
    /// PIL `BICUBIC` (a = -0.5, antialiased when shrinking).
    Bicubic,
}

/// How an image is resized before cropping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// The shorter side becomes this; the aspect ratio is kept (longer side truncated like the reference).
    ShortestEdge(i64),
    /// Exactly `height` × `width`.
    Exact(i64, i64),
}

/// A transformers image processor (PIL backend): resize on 8-bit pixels, optional centre crop,
/// rescale to `[0, 1]`, normalise.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageProcessor {
    /// Resize rule.
    pub resize: Resize,
    /// Resampling filter.
    pub resample: Resample,
    /// Centre crop to this square size.
    pub center_crop: Option<i64>,
    /// Per-channel mean.
    pub mean: [f64; 3],
    /// Per-channel standard deviation.
    pub std: [f64; 3],
}

impl ImageProcessor {
    /// `CLIPImageProcessor` as configured for `openai/clip-vit-base-patch32`: shortest edge 224,
    /// bicubic, centre crop 224, CLIP mean/std.
    pub fn clip() -> Self {
        ImageProcessor {
            resize: Resize::ShortestEdge(224),
            resample: Resample::Bicubic,
            center_crop: Some(224),
            mean: [0.48145466, 0.4578275, 0.40821073],
            std: [0.26862954, 0.26130258, 0.27577711],
        }
    }

    /// `ViTImageProcessor` for the DINO ViT-S/16 checkpoint: 224 × 224 bilinear, ImageNet mean/std.
    pub fn dino() -> Self {
        ImageProcessor {
            resize: Resize::Exact(224, 224),
            resample: Resample::Bilinear,
            center_crop: None,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// Processes `[B, 3, H, W]` RGB in `[0, 1]` (8-bit pixels divided by 255) into model input.
    pub fn process(&self, images01: &Tensor) -> Tensor {
        let (h, w) = (images01.size()[2], images01.size()[3]);
        let (oh, ow) = match self.resize {
            Resize::Exact(oh, ow) => (oh, ow),
            Resize::ShortestEdge(s) if h <= w => (s, (s as f64 * w as f64 / h as f64) as i64),
            Resize::ShortestEdge(s) => ((s as f64 * h as f64 / w as f64) as i64, s),
        };
        // PIL resizes 8-bit images in two passes, horizontal then vertical, rounding and clipping
        // to 8 bits after each; doing the same keeps overshoot at sharp edges identical.
        let pass = |x: &Tensor, size: [i64; 2]| {
            let y = match self.resample {
                Resample::Bilinear => x.internal_upsample_bilinear2d_aa(size, false, None, None),
                Resample::Bicubic => x.internal_upsample_bicubic2d_aa(size, false, None, None),
            };
            (y + 0.5).floor().clamp(0.0, 255.0) // round half up, like PIL
        };
        let mut resized = (images01 * 255.0).round();
        if ow != w {
            resized = pass(&resized, [h, ow]);
        }
        if oh != h {
            resized = pass(&resized, [oh, ow]);
        }
        let cropped = match self.center_crop {
            Some(c) => {
                let (top, left) = ((oh - c).max(0) / 2, (ow - c).max(0) / 2);
                resized.narrow(2, top, c.min(oh)).narrow(3, left, c.min(ow))
            }
            None => resized,
        };
        let device = images01.device();
        let mean =
            Tensor::from_slice(&self.mean).to_kind(tch::Kind::Float).view([1, 3, 1, 1]).to_device(device);
        let std =
            Tensor::from_slice(&self.std).to_kind(tch::Kind::Float).view([1, 3, 1, 1]).to_device(device);
        (cropped / 255.0 - mean) / std
    }
}
