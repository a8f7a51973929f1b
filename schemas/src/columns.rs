//! Checked access to the columns of a batch, batch validation against a table's schema, and the
//! small array builders the typed rows use. Every error names the table and the column.

use std::sync::Arc;

use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float32Array, LargeBinaryArray, ListArray, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::error::{Result, SchemaError};

/// The timestamp type of every `*_at` column: microseconds since the epoch, UTC.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The type of a token-list column: a list of non-null `Int32`.
pub fn token_list_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Int32, false)))
}

/// Checks `batch` against `schema` and returns it re-assembled with exactly the table's schema
/// (column order, nullability and metadata of the table). Fails on a missing, extra or mistyped
/// column, or on a null in a non-nullable column.
pub fn conform(table: &'static str, schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch> {
    for field in batch.schema().fields() {
        if schema.field_with_name(field.name()).is_err() {
            return Err(SchemaError::UnexpectedColumn { table, column: field.name().clone() });
        }
    }
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column = batch
            .column_by_name(field.name())
            .ok_or_else(|| SchemaError::MissingColumn { table, column: field.name().clone() })?;
        if column.data_type() != field.data_type() {
            return Err(SchemaError::WrongType {
                table,
                column: field.name().clone(),
                expected: field.data_type().clone(),
                found: column.data_type().clone(),
            });
        }
        if !field.is_nullable() && column.null_count() > 0 {
            let row = (0..column.len()).find(|&i| column.is_null(i)).unwrap_or(0);
            return Err(SchemaError::UnexpectedNull { table, column: field.name().clone(), row });
        }
        columns.push(column.clone());
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|source| SchemaError::Arrow { table, source })
}

/// Typed, checked column access on a batch that belongs to `table`.
pub struct Columns<'a> {
    table: &'static str,
    batch: &'a RecordBatch,
}

macro_rules! typed_getter {
    ($(#[$doc:meta])* $name:ident, $array:ty) => {
        $(#[$doc])*
        pub fn $name(&self, column: &str) -> Result<&'a $array> {
            let array = self.column(column)?;
            array.as_any().downcast_ref::<$array>().ok_or_else(|| SchemaError::InvalidValue {
                table: self.table,
                column: column.to_string(),
                row: 0,
                message: format!(
                    "column has type {}, expected {}",
                    array.data_type(),
                    stringify!($array)
                ),
            })
        }
    };
}

impl<'a> Columns<'a> {
    /// Wraps a batch of `table`.
    pub fn new(table: &'static str, batch: &'a RecordBatch) -> Self {
        Columns { table, batch }
    }

    /// The column, or [`SchemaError::MissingColumn`].
    pub fn column(&self, column: &str) -> Result<&'a ArrayRef> {
        self.batch
            .column_by_name(column)
            .ok_or_else(|| SchemaError::MissingColumn { table: self.table, column: column.to_string() })
    }

    typed_getter!(
        /// A `Utf8` column.
        utf8, StringArray);
    typed_getter!(
        /// A `LargeBinary` column.
        large_binary, LargeBinaryArray);
    typed_getter!(
        /// A `UInt32` column.
        u32, UInt32Array);
    typed_getter!(
        /// A `UInt64` column.
        u64, UInt64Array);
    typed_getter!(
        /// A `Float32` column.
        f32, Float32Array);
    typed_getter!(
        /// A `Boolean` column.
        boolean, BooleanArray);
    typed_getter!(
        /// A `Timestamp(Microsecond, UTC)` column.
        timestamp, TimestampMicrosecondArray);
    typed_getter!(
        /// A `List<Int32>` column.
        list, ListArray);

    /// An error for an invalid value at `row` of `column`.
    pub fn invalid(&self, column: &str, row: usize, message: impl Into<String>) -> SchemaError {
        SchemaError::InvalidValue {
            table: self.table,
            column: column.to_string(),
            row,
            message: message.into(),
        }
    }
}

/// `Some(value)` unless the array is null at `i`.
pub fn opt<T>(array: &dyn Array, i: usize, value: impl FnOnce() -> T) -> Option<T> {
    if array.is_null(i) {
        None
    } else {
        Some(value())
    }
}

/// A field; shorthand for the schema definitions.
pub fn field(name: &str, data_type: DataType, nullable: bool) -> Field {
    Field::new(name, data_type, nullable)
}

/// A schema from fields.
pub fn schema(fields: Vec<Field>) -> SchemaRef {
    Arc::new(Schema::new(fields))
}

/// A `Utf8` array.
pub fn utf8<'s>(values: impl IntoIterator<Item = &'s str>) -> ArrayRef {
    Arc::new(values.into_iter().map(Some).collect::<StringArray>())
}

/// A nullable `Utf8` array.
pub fn opt_utf8<'s>(values: impl IntoIterator<Item = Option<&'s str>>) -> ArrayRef {
    Arc::new(values.into_iter().collect::<StringArray>())
}

/// A `LargeBinary` array.
pub fn large_binary<'s>(values: impl IntoIterator<Item = &'s [u8]>) -> ArrayRef {
    Arc::new(values.into_iter().map(Some).collect::<LargeBinaryArray>())
}

/// A `UInt32` array.
pub fn u32s(values: impl IntoIterator<Item = u32>) -> ArrayRef {
    Arc::new(UInt32Array::from_iter_values(values))
}

/// A `UInt64` array.
pub fn u64s(values: impl IntoIterator<Item = u64>) -> ArrayRef {
    Arc::new(UInt64Array::from_iter_values(values))
}

/// A nullable `Float32` array.
pub fn opt_f32s(values: impl IntoIterator<Item = Option<f32>>) -> ArrayRef {
    Arc::new(values.into_iter().collect::<Float32Array>())
}

/// A nullable `Boolean` array.
pub fn opt_bools(values: impl IntoIterator<Item = Option<bool>>) -> ArrayRef {
    Arc::new(values.into_iter().collect::<BooleanArray>())
}

/// A `Timestamp(Microsecond, UTC)` array.
pub fn timestamps(micros: impl IntoIterator<Item = i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter_values(micros).with_timezone("UTC"))
}

/// A nullable `Timestamp(Microsecond, UTC)` array.
pub fn opt_timestamps(micros: impl IntoIterator<Item = Option<i64>>) -> ArrayRef {
    Arc::new(micros.into_iter().collect::<TimestampMicrosecondArray>().with_timezone("UTC"))
}

/// A `List<Int32>` array with non-null items.
pub fn token_lists<'s>(lists: impl IntoIterator<Item = &'s [i32]>) -> ArrayRef {
    let mut builder = ListBuilder::new(Int32Builder::new()).with_field(Arc::new(Field::new(
        "item",
        DataType::Int32,
        false,
    )));
    for list in lists {
        builder.values().append_slice(list);
        builder.append(true);
    }
    Arc::new(builder.finish())
}
