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
