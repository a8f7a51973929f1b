//! Every `tch` model of proxytune: architectures, weight loading by the reference checkpoints' key
//! names, and the building blocks they share. No lance, actix or channels here: the actors own
//! threads and data flow, this crate owns tensors.
//!
//! Component map:
//! - [`error`]: [`ModelError`], the one error enum of this crate.
//! - [`ar`]: the AR students (Chameleon / Lumina-mGPT), their VQ tokenizer and KV-cached decoding.
//! - [`contrastive`]: CLIP-style contrastive training (the toy world's text/image encoder).
//! - [`checkpoint`]: training checkpoints (atomic folders, retention, restore).
//! - [`device`]: choosing CPU/CUDA from config.
//! - [`weights`]: loading and saving safetensors with errors that name the file, key and shape.
//! - [`shapes`]: weight shapes from configs and from safetensors headers, without loading weights.
//! - [`lora`]: LoRA adapters and their interchange with diffusers/PEFT files.
//! - [`nn`]: shared building blocks ([`nn::Mlp`]).
//! - [`optim`]: AdamW, clipping, warm-up and EMA with state that checkpoints can save.
//! - [`recompute`]: activation checkpointing (segments recomputed in the backward).
//! - [`rng`]: counter-based random draws (reproducible across threads and resumes).
//! - [`diffusion`]: the supervisor's schedules and samplers (diffusers semantics).
//! - [`transformer`]: pre-LN transformer encoders: ViT (DINO) and CLIP (text and vision).
//! - [`tokenizer`]: text tokenizers (CLIP BPE).
//! - [`scorers`]: evaluation encoders (EfficientNet-Lite for FEAT-I) and the similarity metrics.
#![warn(missing_docs)]

pub mod ar;
pub mod checkpoint;
pub mod contrastive;
pub mod device;
pub mod diffusion;
pub mod error;
pub mod lora;
pub mod nn;
pub mod optim;
pub mod recompute;
pub mod rng;
pub mod scorers;
pub mod shapes;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use error::{ModelError, Result};
