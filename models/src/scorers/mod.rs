//! Scorers: image (and later text) encoders whose embeddings give the evaluation metrics, and the
//! metric arithmetic itself.
//!
//! - [`efficientnet_lite`]: EfficientNet-Lite with real ImageNet weights — the offline real-photo
//!   subject-similarity scorer, reported as **FEAT-I**.
//! - [`clip_dino`]: DINO (ViT CLS) and CLIP (CLIP-I, CLIP-T) scorers with the reference preprocessing.
//! - [`feat_i`]: the FEAT-I embedder (preprocessing + EfficientNet-Lite0 features).
//! - [`similarity`]: cosine similarity arithmetic of the DreamBench protocol.
//! - [`preprocess`]: RGB8 pixels to tensors, resizing.

pub mod clip_dino;
pub mod efficientnet_lite;
pub mod feat_i;
pub mod preprocess;
pub mod similarity;

use tch::Tensor;

/// An image encoder used as a similarity metric.
pub trait ImageEmbedder {
    /// The metric's report name (e.g. `FEAT-I`, `DINO`, `CLIP-I`).
    fn metric_name(&self) -> &'static str;
    /// L2-normalised embeddings of images given as `[B, 3, H, W]` RGB in `[0, 1]` (any size; the
    /// embedder applies its own preprocessing).
    fn embed(&self, images01: &Tensor) -> Tensor;
}
