//! The error type of the schemas crate.

use arrow_schema::DataType;

/// Result with [`SchemaError`].
pub type Result<T> = std::result::Result<T, SchemaError>;

/// Why a batch or a row does not fit its table. Every variant names the table and the column so
/// the user can find the bad input.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The batch has no column of this name.
    #[error("table `{table}`: column `{column}` is missing")]
    MissingColumn {
        /// Table the batch was meant for.
        table: &'static str,
        /// Column that is missing.
        column: String,
    },
    /// The batch has a column the table does not define.
    #[error("table `{table}`: unexpected column `{column}`")]
    UnexpectedColumn {
        /// Table the batch was meant for.
        table: &'static str,
        /// Column that is not part of the table.
        column: String,
    },
    /// A column has the wrong Arrow type.
    #[error("table `{table}`: column `{column}` has type {found}, expected {expected}")]
    WrongType {
        /// Table the batch was meant for.
        table: &'static str,
        /// Column with the wrong type.
        column: String,
        /// The table's type for the column.
        expected: DataType,
        /// The type found in the batch.
        found: DataType,
    },
    /// A non-nullable column holds a null.
    #[error("table `{table}`: column `{column}` has a null at row {row} but is not nullable")]
    UnexpectedNull {
        /// Table the batch was meant for.
        table: &'static str,
        /// Column holding the null.
        column: String,
        /// Row index of the first null.
        row: usize,
    },
    /// A value is outside what the column allows (e.g. an unknown enum label).
    #[error("table `{table}`: column `{column}` row {row}: {message}")]
    InvalidValue {
        /// Table the batch was meant for.
        table: &'static str,
        /// Column holding the value.
        column: String,
        /// Row index.
        row: usize,
        /// What is wrong with it.
        message: String,
    },
    /// Building a batch failed inside arrow.
    #[error("table `{table}`: {source}")]
    Arrow {
        /// Table the batch was meant for.
        table: &'static str,
        /// The arrow error.
        #[source]
        source: arrow_schema::ArrowError,
    },
}
