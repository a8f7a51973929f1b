//! Building blocks shared by the model families.

mod mlp;

pub use mlp::{Mlp, MlpConfig};
