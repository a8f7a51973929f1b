//! The actors of proxytune, their runner, and the Lance corpus they read and write.
//!
//! Component map:
//! - [`error`]: [`Error`], the one error enum of this crate.
//! - [`corpus`]: the corpus store: one Lance dataset per table under a corpus directory;
//!   idempotent appends by row key, filtered/projected streaming scans, versions, tags,
//!   time travel and compaction.
//! - [`runtime`]: the streaming actor runtime (bounded Arrow channels, runners, pipeline builder,
//!   actix job supervisor, metrics).
//! - [`lance_writer`]: the corpus sink actor (idempotent appends, commits on barrier/close).
//! - [`corpus_reader`]: the corpus source actor (a pinned version, filtered, streamed).
//! - [`filter`]: the Filter actor (fidelity, prompt adherence, near-duplicates; keep or reject with a reason).
//! - [`class_prior_sampler`]: the untuned supervisor sampling prior-preservation images (a source).
//! - [`supervisor_tuner`]: stage 1, DreamBooth on the references while class priors stream in;
//!   emits "supervisor ready".
//! - [`proxy_generator`]: stage 2, samples a prompt plan from each ready supervisor, batch by batch.
//! - [`tokenize`]: kept proxies → VQ token rows (cacheable in the corpus).
//! - [`ar_trainer`]: stage 3, trains the AR student on token rows as they stream in.
//! - [`diffusion_sampling`]: loading a supervisor (base + adapter) and seeded sampling, shared by those.
//! - [`synthetic`]: load-generation actors (proxy rows with real PNG payloads, pass-through).
//! - [`generators`]: supervisor and student as DreamBench `Generator`s.
//! - [`dreambench`]: the DreamBench protocol (subjects, prompts, subsets, the real-images row).
//! - [`world`]: the toy world (procedural captioned scenes, reserved subjects, the context check).
//! - [`intake`]: subject folders of reference photos into validated rows.
#![warn(missing_docs)]

pub mod ar_trainer;
pub mod class_prior_sampler;
pub mod corpus;
pub mod corpus_reader;
pub mod diffusion_sampling;
pub mod dreambench;
pub mod error;
pub mod filter;
pub mod generators;
pub mod intake;
pub mod lance_writer;
pub mod proxy_generator;
pub mod runtime;
pub mod supervisor_tuner;
pub mod synthetic;
pub mod tokenize;
pub mod world;

pub use error::{Error, Result};
