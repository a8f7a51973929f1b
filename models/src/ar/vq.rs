//! The students' image tokenizers behind one encoder: a [`VqEncoder`] loads the family's VQ
//! (Chameleon's VQ-VAE from the student checkpoint's `model.vqmodel.*`, or LlamaGen's VQ-16 from
//! its own folder) and turns pixels into code grids. The one place that matches on the family.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};

use super::chameleon::ChameleonConfig;
use super::chameleon_vq::ChameleonVqVae;
use super::llamagen_vq::{LlamaGenVq, LlamaGenVqConfig};
use crate::error::Result;
use crate::shapes::{read_header, weight_files};
use crate::weights::{load_safetensors_files, Strictness};

/// The family of a student's VQ image tokenizer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VqFamily {
    /// Chameleon / Lumina-mGPT's VQ-VAE, inside the student checkpoint (`model.vqmodel.*`).
    #[default]
    Chameleon,
    /// LlamaGen's VQ-16 (`config.json` and `model.safetensors` of its own folder).
    #[serde(rename = "llamagen")]
    LlamaGen,
}

/// Boxed: the two differ much in size, and an encoder is loaded once.
enum Model {
    Chameleon(Box<ChameleonVqVae>),
    LlamaGen(Box<LlamaGenVq>),
}

/// A loaded VQ encoder.
pub struct VqEncoder {
    vs: nn::VarStore,
    model: Model,
    family: VqFamily,
}

impl std::fmt::Debug for VqEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VqEncoder").field("family", &self.family).field("device", &self.vs.device()).finish()
    }
}

impl VqEncoder {
    /// Loads the `family`'s VQ from `dir` onto `device`, frozen. For Chameleon only the checkpoint
    /// files (shards) that hold `model.vqmodel.*` are read.
    pub fn load(family: VqFamily, dir: &Path, device: Device) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        let files = weight_files(dir, &["model"], None)?;
        let model = match family {
            VqFamily::Chameleon => {
                let cfg = ChameleonConfig::from_json(&dir.join("config.json"))?;
                let vq = crate::nn::for_loading(|| {
                    ChameleonVqVae::new(vs.root() / "model" / "vqmodel", &cfg.vq_config)
                })?;
                let mut vq_files = Vec::new();
                for f in files {
                    if read_header(&f)?.keys().any(|k| k.starts_with("model.vqmodel.")) {
                        vq_files.push(f);
                    }
                }
                load_safetensors_files(&mut vs, &vq_files, Strictness::AllowUnexpected)?;
                Model::Chameleon(Box::new(vq))
            }
            VqFamily::LlamaGen => {
                let cfg = LlamaGenVqConfig::from_json(&dir.join("config.json"))?;
                let vq = crate::nn::for_loading(|| LlamaGenVq::new(vs.root(), &cfg))?;
                load_safetensors_files(&mut vs, &files, Strictness::Strict)?;
                Model::LlamaGen(Box::new(vq))
            }
        };
        vs.freeze();
        Ok(VqEncoder { vs, model, family })
    }

    /// The family.
    pub fn family(&self) -> VqFamily {
        self.family
    }

    /// The device it computes on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Pixels per code along each side.
    pub fn downsample_factor(&self) -> i64 {
        match &self.model {
            Model::Chameleon(vq) => vq.downsample_factor(),
            Model::LlamaGen(vq) => vq.downsample_factor(),
        }
    }

    /// Codes `[B, R/f, R/f]` of `pixels [B, 3, R, R]` in `[-1, 1]`.
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| match &self.model {
            Model::Chameleon(vq) => vq.encode(pixels),
            Model::LlamaGen(vq) => vq.encode(pixels),
        })
    }
}
