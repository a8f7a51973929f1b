//! Text tokenizers.
//!
//! - [`clip`]: the CLIP byte-level BPE tokenizer (Stable Diffusion's text encoders and the CLIP-T
//!   scorer share it).

pub mod clip;
