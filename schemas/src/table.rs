//! The [`Table`] trait: one typed row type per stream/table, with its Arrow schema and row key.

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::columns::conform;
use crate::error::Result;
use crate::key::RowKey;

/// A typed row of one proxytune table. `to_batch` and `from_batch` round-trip exactly; every
/// batch carries a `key` column ([`crate::KEY_COLUMN`]) with each row's canonical [`RowKey`].
pub trait Table: Sized + Clone + Send + Sync + 'static {
    /// The table's name (also its dataset name in the corpus: `<corpus>/<NAME>.lance`).
    const NAME: &'static str;

    /// The table's Arrow schema (cached; cheap to call).
    fn schema() -> SchemaRef;

    /// The identity under which the row is stored once.
    fn key(&self) -> RowKey;

    /// Builds one batch from rows.
    fn to_batch(rows: &[Self]) -> Result<RecordBatch>;

    /// Reads rows back from a batch of this table (validated first).
    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>>;

    /// Validates `batch` against [`Table::schema`] and returns it with exactly that schema.
    fn conform(batch: &RecordBatch) -> Result<RecordBatch> {
        conform(Self::NAME, &Self::schema(), batch)
    }
}
