//! Contrastive training on matched pairs: the symmetric InfoNCE loss over a batch with CLIP's
//! learnt temperature (`logit_scale`, initialised to `ln(1/0.07)`, clamped at `ln(100)`), AdamW
//! with clipping. The toy world's [`Clip`] (image–caption pairs; its text encoder and CLIP-I /
//! CLIP-T scorer) and its DINO-style instance encoder (two views of one object instance in different
//! contexts) are pretrained this way.

use tch::{nn, Kind, Tensor};

use crate::error::Result;
use crate::optim::{AdamW, AdamWConfig};
use crate::transformer::clip::Clip;

/// The contrastive trainer.
#[derive(Debug)]
pub struct ContrastiveTrainer {
    optimizer: AdamW,
    logit_scale: Tensor,
    learning_rate: f64,
    warmup: u64,
}

fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

/// Cosine similarities `[B_images, B_texts]` between the images' and the captions' embeddings.
pub fn similarity(clip: &Clip, pixels: &Tensor, ids: &Tensor, mask: &Tensor) -> Tensor {
    cosine_matrix(&clip.image_embeds(pixels), &clip.text_embeds(ids, Some(mask)))
}

/// Top-1 retrieval accuracy of matched pairs on the diagonal of `similarity`, averaged over
/// text→image and image→text.
pub fn retrieval_top1(similarity: &Tensor) -> f64 {
    let n = similarity.size()[0];
    let target = Tensor::arange(n, (Kind::Int64, similarity.device()));
    let t2i = similarity.argmax(0, false).eq_tensor(&target).to_kind(Kind::Float).mean(Kind::Float);
    let i2t = similarity.argmax(1, false).eq_tensor(&target).to_kind(Kind::Float).mean(Kind::Float);
    (t2i.double_value(&[]) + i2t.double_value(&[])) / 2.0
}

impl ContrastiveTrainer {
    /// A trainer over every variable of `vs` (the CLIP model's store) and the temperature.
    pub fn new(vs: &nn::VarStore, learning_rate: f64, warmup: u64, weight_decay: f64) -> Self {
        let logit_scale = Tensor::from((1.0f64 / 0.07).ln())
            .to_kind(Kind::Float)
            .to_device(vs.device())
            .set_requires_grad(true);
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        params.push(("logit_scale".into(), logit_scale.shallow_clone()));
        let optimizer = AdamW::new(params, AdamWConfig { weight_decay, ..Default::default() });
        ContrastiveTrainer { optimizer, logit_scale, learning_rate, warmup }
    }

    /// The current temperature `exp(logit_scale)`.
    pub fn scale(&self) -> f64 {
        self.logit_scale.double_value(&[]).exp()
    }

    /// One step on a batch of CLIP image–caption pairs; returns the loss.
    pub fn step(&mut self, clip: &Clip, pixels: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<f64> {
        self.step_pairs(&clip.image_embeds(pixels), &clip.text_embeds(ids, Some(mask)))
    }

    /// One step on embeddings `[B, D]` of matched pairs (row i of `a` matches row i of `b`);
    /// returns the loss.
    pub fn step_pairs(&mut self, a: &Tensor, b: &Tensor) -> Result<f64> {
        let sim = normalize(a).matmul(&normalize(b).tr()) * self.logit_scale.clamp_max(100f64.ln()).exp();
        let n = sim.size()[0];
        let target = Tensor::arange(n, (Kind::Int64, sim.device()));
        let loss = (sim.cross_entropy_for_logits(&target) + sim.tr().cross_entropy_for_logits(&target)) / 2.0;
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(crate::error::ModelError::NonFiniteLoss {
                step: self.optimizer.steps() + 1,
                loss: value,
            });
        }
        self.optimizer.zero_grad();
        loss.backward();
        self.optimizer.clipped_step(1.0, self.learning_rate, self.warmup)?;
        Ok(value)
    }
}

/// Cosine similarities `[B, B]` between two sets of embeddings.
pub fn cosine_matrix(a: &Tensor, b: &Tensor) -> Tensor {
    normalize(a).matmul(&normalize(b).tr())
}
