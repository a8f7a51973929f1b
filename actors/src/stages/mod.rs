//! The stage actors of a job, in pipeline order, and what they share.
//!
//! - [`intake`]: subject folders of reference photos into validated rows.
//! - [`class_prior_sampler`]: the untuned supervisor sampling prior-preservation images (a source).
//! - [`supervisor_tuner`]: stage 1, DreamBooth on the references while class priors stream in;
//!   emits "supervisor ready".
//! - [`proxy_generator`]: stage 2, samples a prompt plan from each ready supervisor, batch by batch.
//! - [`diffusion_sampling`]: loading a supervisor (base + adapter) and seeded sampling, shared by
//!   those.
//! - [`filter`]: the Filter (fidelity, prompt adherence, near-duplicates; keep or reject with a
//!   reason).
//! - [`tokenize`]: kept proxies → VQ token rows (cacheable in the corpus).
//! - [`ar_trainer`]: stage 3, trains the AR student on token rows as they stream in.

pub mod ar_trainer;
pub mod class_prior_sampler;
pub mod diffusion_sampling;
pub mod filter;
pub mod intake;
pub mod proxy_generator;
pub mod supervisor_tuner;
pub mod tokenize;
