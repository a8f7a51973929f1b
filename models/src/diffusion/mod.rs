//! The diffusion supervisor's pieces (Stable Diffusion family, diffusers layout).
//!
//! - [`scheduler`]: the DDPM training schedule, DDIM and Euler sampling, classifier-free guidance.

pub mod scheduler;
