//! The error type of the models crate.

use std::path::PathBuf;

/// Result with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;

/// What went wrong in model code. Weight errors name the file and the tensor key.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An error raised by libtorch.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint lacks a tensor the model needs.
    #[error("{}: missing tensor `{key}` (expected shape {expected:?})", path.display())]
    MissingTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The model's variable path.
        key: String,
        /// The shape the model expects.
        expected: Vec<i64>,
    },
    /// A checkpoint tensor has a different shape than the model's variable.
    #[error("{}: tensor `{key}` has shape {found:?}, the model expects {expected:?}", path.display())]
    ShapeMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The variable path.
        key: String,
        /// The model's shape.
        expected: Vec<i64>,
        /// The checkpoint's shape.
        found: Vec<i64>,
    },
    /// A checkpoint holds tensors the model does not have (strict loading only).
    #[error("{}: unexpected tensors {keys:?}", path.display())]
    UnexpectedTensors {
        /// The checkpoint file.
        path: PathBuf,
        /// The keys (at most a few, sorted).
        keys: Vec<String>,
    },
    /// A model configuration is invalid.
    #[error("invalid config `{what}`: {message}")]
    Config {
        /// Which config (file or field).
        what: String,
        /// What is wrong.
        message: String,
    },
    /// A loss became NaN or infinite.
    #[error("non-finite loss {loss} at step {step}")]
    NonFiniteLoss {
        /// Optimiser step at which it happened.
        step: u64,
        /// The loss value.
        loss: f64,
    },
}
