//! Arrow schemas, row keys and typed rows of every stream and table of proxytune, plus the metric
//! names. This crate is the contract between the actors, the corpus and the models; it depends on
//! arrow and serde only (never tch, lance or actix).
//!
//! Component map:
//! - [`error`]: [`SchemaError`], the one error enum of this crate.
//! - [`columns`]: checked column access and batch validation (errors name the column).
//! - [`table`]: the [`Table`] trait that ties a typed row to its Arrow schema and row key.
//! - [`rows`]: the typed rows: [`ReferenceImage`], [`ClassPriorImage`], [`Supervisor`], [`Proxy`], [`VqTokens`],
//!   [`CaptionStates`], [`EvalSample`].
//! - [`key`]: [`RowKey`], the canonical idempotency key of a row.
//! - [`metrics`]: [`MetricName`], every exported metric's name, kind and help.
#![warn(missing_docs)]

pub mod columns;
pub mod error;
pub mod key;
pub mod metrics;
pub mod rows;
pub mod table;

pub use error::{Result, SchemaError};
pub use key::RowKey;
pub use metrics::MetricName;
pub use rows::{
    CaptionStates, ClassPriorImage, EvalSample, ModelRole, Proxy, ReferenceImage, RejectReason, Supervisor,
    VqTokens,
};
pub use table::Table;

/// Now, in microseconds since the epoch (UTC): the unit of every `*_at` column.
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Name of the string column every table carries with its row's canonical [`RowKey`].
pub const KEY_COLUMN: &str = "key";
