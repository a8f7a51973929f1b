//! The AR students and their image tokenizers: Chameleon / Lumina-mGPT (one vocabulary for text
//! and image tokens, the Chameleon VQ-VAE), with KV-cached decoding and its logits processors, the
//! Lumina-mGPT text-to-image format, and fine-tuning ([`train`]); LlamaGen's T2I GPT ([`llamagen`]) and
//! VQ-16 tokenizer ([`llamagen_vq`]); one encoder over both VQ families ([`vq`]); one student interface over both families
//! ([`student`]).

pub mod chameleon;
pub mod chameleon_vq;
pub mod generate;
pub mod llamagen;
pub mod llamagen_vq;
pub mod lumina;
pub mod student;
pub mod train;
pub mod vq;
