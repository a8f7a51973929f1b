//! DINO and CLIP scorers for the DreamBench metrics, built on [`crate::transformer`] and the
//! reference image processors. They load real `facebook/dino-vits16` and
//! `openai/clip-vit-base-patch32` checkpoints (transformers layout, safetensors) where a machine
//! has them; the tests prove the architectures at tiny random configs.

use std::path::Path;

use tch::{nn, Device, Tensor};

use super::preprocess::ImageProcessor;
use super::similarity::l2_normalize;
use super::ImageEmbedder;
use crate::error::Result;
use crate::tokenizer::clip::ClipTokenizer;
use crate::transformer::clip::{Clip, ClipConfig};
use crate::transformer::vit::{Vit, VitConfig};
use crate::weights::{load_safetensors, Strictness};

/// DINO: the final-LayerNorm CLS embedding of a ViT.
#[derive(Debug)]
pub struct Dino {
    model: Vit,
    processor: ImageProcessor,
    device: Device,
    _vs: nn::VarStore,
}

impl Dino {
    /// Loads `config.json` and `model.safetensors` from a transformers checkpoint folder.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let cfg = VitConfig::from_json(&dir.join("config.json"))?;
        let mut vs = nn::VarStore::new(device);
        let model = Vit::new(vs.root(), &cfg)?;
        // The published checkpoint also carries the unused pooler.
        load_safetensors(&mut vs, &dir.join("model.safetensors"), Strictness::AllowUnexpected)?;
        vs.freeze();
        let mut processor = ImageProcessor::dino();
        processor.resize = super::preprocess::Resize::Exact(cfg.image_size, cfg.image_size);
        Ok(Dino { model, processor, device, _vs: vs })
    }
}

impl ImageEmbedder for Dino {
    fn metric_name(&self) -> &'static str {
        "DINO"
    }

    fn embed(&self, images01: &Tensor) -> Tensor {
        // Images cross actor boundaries on the CPU; the model moves them to its own device.
        let images = images01.to_device(self.device);
        tch::no_grad(|| l2_normalize(&self.model.cls_embedding(&self.processor.process(&images))))
    }
}

/// CLIP image and text embeddings: CLIP-I (image–image) and CLIP-T (prompt–image).
#[derive(Debug)]
pub struct ClipScorer {
    model: Clip,
    tokenizer: ClipTokenizer,
    processor: ImageProcessor,
    context: usize,
    text_vocab: i64,
    device: Device,
    _vs: nn::VarStore,
}

impl ClipScorer {
    /// Loads a transformers CLIP checkpoint folder and the tokenizer.
    pub fn load(dir: &Path, tokenizer: ClipTokenizer, device: Device) -> Result<Self> {
        let cfg = ClipConfig::from_json(&dir.join("config.json"))?;
        let mut vs = nn::VarStore::new(device);
        let model = Clip::new(vs.root(), &cfg)?;
        load_safetensors(&mut vs, &dir.join("model.safetensors"), Strictness::AllowUnexpected)?;
        vs.freeze();
        let mut processor = ImageProcessor::clip();
        let size = cfg.vision_config.image_size;
        processor.resize = super::preprocess::Resize::ShortestEdge(size);
        processor.center_crop = Some(size);
        let context = cfg.text_config.max_position_embeddings as usize;
        let text_vocab = cfg.text_config.vocab_size;
        Ok(ClipScorer { model, tokenizer, processor, context, text_vocab, device, _vs: vs })
    }

    /// Normalised text embeddings of `prompts`.
    pub fn embed_text(&self, prompts: &[String]) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut masks = Vec::new();
        for p in prompts {
            let enc = self.tokenizer.encode_padded(p, self.context, self.tokenizer.end_id())?;
            ids.extend(enc.ids);
            masks.extend(enc.attention_mask);
        }
        if let Some(&id) = ids.iter().find(|&&id| id < 0 || id >= self.text_vocab) {
            return Err(crate::error::ModelError::Config {
                what: "CLIP tokenizer".into(),
                message: format!(
                    "token id {id} is outside the text encoder's vocabulary of {}: the tokenizer does not belong to this checkpoint",
                    self.text_vocab
                ),
            });
        }
        let n = prompts.len() as i64;
        let ids = Tensor::from_slice(&ids).view([n, -1]).to_device(self.device);
        let mask = Tensor::from_slice(&masks).view([n, -1]).to_device(self.device);
        Ok(tch::no_grad(|| l2_normalize(&self.model.text_embeds(&ids, Some(&mask)))))
    }

    /// CLIP-T: cosine between each prompt and its image.
    pub fn prompt_image_cosine(&self, prompts: &[String], images01: &Tensor) -> Result<Vec<f32>> {
        let text = self.embed_text(prompts)?;
        let image = self.embed(images01);
        let cos = (text * image).sum_dim_intlist(-1, false, tch::Kind::Float);
        Ok(Vec::<f32>::try_from(cos)?)
    }
}

impl ImageEmbedder for ClipScorer {
    fn metric_name(&self) -> &'static str {
        "CLIP-I"
    }

    fn embed(&self, images01: &Tensor) -> Tensor {
        tch::no_grad(|| {
            l2_normalize(&self.model.image_embeds(&self.processor.process(&images01.to_device(self.device))))
        })
    }
}
