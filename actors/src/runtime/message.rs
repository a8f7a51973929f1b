//! What travels on an edge: data batches and in-band control signals, in order.

use arrow_array::RecordBatch;

/// A control signal. Signals travel in order with the data, so a barrier separates exactly the
/// batches before it from those after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// A checkpoint barrier. An actor with several inputs acts on it once every open input has
    /// delivered the same epoch (alignment), then forwards it.
    Barrier {
        /// Epoch number, increasing.
        epoch: u64,
    },
    /// Write out buffered state now (e.g. the corpus writer commits).
    Flush,
    /// No more data will come on this edge. (A closed sender means the same.)
    EndOfData,
}

/// One message on an edge.
#[derive(Clone, Debug)]
pub enum Msg {
    /// A batch of rows.
    Data(RecordBatch),
    /// A control signal.
    Signal(Signal),
}

impl Msg {
    /// Rows this message counts against an edge's capacity (signals count zero).
    pub fn rows(&self) -> usize {
        match self {
            Msg::Data(batch) => batch.num_rows(),
            Msg::Signal(_) => 0,
        }
    }
}
