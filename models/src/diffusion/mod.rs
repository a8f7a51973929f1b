//! The diffusion supervisor's pieces (Stable Diffusion family, diffusers layout).
//!
//! - [`blocks`]: ResNet, up/down-sampling and attention blocks with diffusers' names.
//! - [`vae`]: the `AutoencoderKL` variational autoencoder.
//! - [`scheduler`]: the DDPM training schedule, DDIM and Euler sampling, classifier-free guidance.

pub mod blocks;
pub mod scheduler;
pub mod vae;
