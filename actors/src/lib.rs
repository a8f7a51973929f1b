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
//! - [`synthetic`]: load-generation actors (proxy rows with real PNG payloads, pass-through).
//! - [`dreambench`]: the DreamBench protocol (subjects, prompts, subsets, the real-images row).
//! - [`intake`]: subject folders of reference photos into validated rows.
#![warn(missing_docs)]

pub mod corpus;
pub mod corpus_reader;
pub mod dreambench;
pub mod error;
pub mod filter;
pub mod intake;
pub mod lance_writer;
pub mod runtime;
pub mod synthetic;

pub use error::{Error, Result};
