//! The actors of proxytune, their runtime, and the Lance corpus they read and write. One folder
//! per role:
//!
//! - [`runtime`]: the streaming actor runtime (bounded Arrow channels, runners, pipeline builder,
//!   actix job supervisor, metrics, synthetic load actors).
//! - [`corpus`]: the corpus store (one Lance dataset per table; idempotent appends by row key,
//!   filtered streaming scans, versions, tags, time travel, compaction) and its writer and reader
//!   actors.
//! - [`stages`]: the job's stage actors (intake, class priors, DreamBooth, proxy generation, the
//!   Filter, tokenization, the student's training).
//! - [`evaluation`]: the DreamBench protocol and the supervisor and student as its generators.
//! - [`world`]: the toy world (procedural captioned scenes, reserved subjects, the context check).
//! - [`error`]: [`Error`], the one error enum of this crate.
#![warn(missing_docs)]

pub mod corpus;
pub mod error;
pub mod evaluation;
pub mod runtime;
pub mod stages;
pub mod world;

pub use error::{Error, Result};
