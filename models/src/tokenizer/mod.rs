//! Text tokenizers.
//!
//! - [`clip`]: the CLIP byte-level BPE tokenizer (Stable Diffusion's text encoders and the CLIP-T
//!   scorer share it).
//! - [`hf`]: any `tokenizer.json` (the AR students' text tokenizers).

pub mod clip;
pub mod hf;
