//! The diffusion supervisor's pieces (Stable Diffusion family, diffusers layout).
//!
//! - [`blocks`]: ResNet, up/down-sampling and attention blocks with diffusers' names.
//! - [`unet`]: the `UNet2DConditionModel` denoiser (SD 1.x/2.x, SDXL text_time).
//! - [`vae`]: the `AutoencoderKL` variational autoencoder.
//! - [`dreambooth`]: the DreamBooth objective (instance + prior preservation) and its optimiser step.
//! - [`pipeline`]: text-to-image over a diffusers model folder with CFG.
//! - [`scheduler`]: the DDPM training schedule, DDIM and Euler sampling, classifier-free guidance.

pub mod blocks;
pub mod dreambooth;
pub mod pipeline;
pub mod scheduler;
pub mod unet;
pub mod vae;
