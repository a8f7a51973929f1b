//! The error type of the actors crate.

use std::path::PathBuf;

use proxytune_schemas::SchemaError;

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong in an actor or the corpus. Variants name the input (path, table, filter).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A batch or row does not fit its table.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// A path that should hold a corpus (or one of its tables) does not.
    #[error("{}: not a proxytune corpus: {reason}", path.display())]
    NotACorpus {
        /// The path.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// A filter expression was rejected.
    #[error("table `{table}`: invalid filter `{filter}`: {message}")]
    Filter {
        /// Table scanned.
        table: &'static str,
        /// The expression.
        filter: String,
        /// Lance's complaint.
        message: String,
    },
    /// A version or tag that the table does not have.
    #[error("table `{table}` at {uri}: no version `{version}`: {message}")]
    NoSuchVersion {
        /// Table.
        table: &'static str,
        /// Dataset URI.
        uri: String,
        /// Requested version or tag.
        version: String,
        /// Lance's message.
        message: String,
    },
    /// Any other Lance failure, with what we were doing.
    #[error("lance: {context}: {source}")]
    Lance {
        /// What we were doing (names the table and path).
        context: String,
        /// The Lance error.
        #[source]
        source: lance::Error,
    },
    /// A user input (file, folder, value) that cannot be used.
    #[error("{input}: {message}")]
    BadInput {
        /// The input: a path or a config field.
        input: String,
        /// What is wrong with it.
        message: String,
    },
    /// An actor's own failure (e.g. a stage that cannot go on).
    #[error("{message}")]
    Operator {
        /// What went wrong.
        message: String,
    },
    /// A model failed.
    #[error(transparent)]
    Model(#[from] proxytune_models::ModelError),
    /// A pipeline that cannot be built (bad wiring or config).
    #[error("pipeline: {message}")]
    Pipeline {
        /// What is wrong.
        message: String,
    },
    /// A file-system failure.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A fixed, low-cardinality label for metrics (`error_type`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Schema(_) => "schema",
            Error::NotACorpus { .. } => "not_a_corpus",
            Error::Filter { .. } => "filter",
            Error::NoSuchVersion { .. } => "no_such_version",
            Error::Lance { .. } => "lance",
            Error::BadInput { .. } => "bad_input",
            Error::Operator { .. } => "operator",
            Error::Model(_) => "model",
            Error::Pipeline { .. } => "pipeline",
            Error::Io { .. } => "io",
        }
    }
}

/// Attaches context to a Lance result.
pub(crate) trait LanceContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> LanceContext<T> for std::result::Result<T, lance::Error> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Lance { context: context(), source })
    }
}
