//! `lance_writer`: the corpus sink. Appends the batches it receives to a corpus table, idempotent
//! by row key, committing one Lance version per commit: when `commit_every_rows` rows are buffered,
//! on every barrier or flush signal, and on close. With `forward_committed`, each committed batch
//! (only rows that were new) is passed downstream, so a consumer only ever sees persisted rows.
//! With `replay_stored` too, the rows the table already holds are passed downstream first, in
//! storage order (which is commit order): a resumed job's consumers see exactly the sequence an
//! uninterrupted run would have shown them, the stored rows and then the new ones.

use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use metrics::{Counter, Gauge};
use proxytune_schemas::{MetricName, Table};
use serde::{Deserialize, Serialize};

use crate::corpus::{AppendOutcome, Corpus, CorpusTable};
use crate::error::{Error, Result};
use crate::runtime::{AsyncOperator, Context, Metrics, Output, Signal};

fn default_commit_rows() -> usize {
    256
}

/// Configuration of a [`LanceWriter`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanceWriterConfig {
    /// Commit once this many rows are buffered (signals and close commit earlier).
    #[serde(default = "default_commit_rows")]
    pub commit_every_rows: usize,
    /// Pass each committed batch (the new rows) to the next actor.
    #[serde(default)]
    pub forward_committed: bool,
    /// With `forward_committed`: pass the rows already stored downstream first, on start.
    #[serde(default)]
    pub replay_stored: bool,
}

impl Default for LanceWriterConfig {
    fn default() -> Self {
        LanceWriterConfig {
            commit_every_rows: default_commit_rows(),
            forward_committed: false,
            replay_stored: false,
        }
    }
}

/// What a writer has done so far (shared with whoever built it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WriterStats {
    /// Rows received.
    pub received_rows: u64,
    /// Rows written.
    pub written_rows: u64,
    /// Rows skipped (key already stored).
    pub skipped_rows: u64,
    /// Commits that wrote rows.
    pub commits: u64,
    /// The table's version after the last commit.
    pub version: Option<u64>,
    /// When each commit that wrote rows landed (µs since the epoch) and the rows written by then.
    pub commit_log: Vec<(i64, u64)>,
    /// Stored rows passed downstream on start (`replay_stored`).
    pub replayed_rows: u64,
}

/// Rows per batch when stored rows are passed on at start.
const REPLAY_BATCH_ROWS: usize = 16;

/// The corpus sink actor for table `T`.
pub struct LanceWriter<T: Table> {
    corpus: Corpus,
    config: LanceWriterConfig,
    table: Option<CorpusTable<T>>,
    buffer: Vec<RecordBatch>,
    buffered_rows: usize,
    stats: Arc<Mutex<WriterStats>>,
    written: Counter,
    skipped: Counter,
    version: Gauge,
    fragments: Gauge,
    /// Stored rows still to pass on (`replay_stored`), a batch per pending-work call.
    replay: Option<crate::corpus::BatchStream>,
}

impl<T: Table> LanceWriter<T> {
    /// A writer into `corpus`; the returned handle shows its progress.
    pub fn new(
        corpus: Corpus,
        config: LanceWriterConfig,
        metrics: &Metrics,
    ) -> (Self, Arc<Mutex<WriterStats>>) {
        let stats = Arc::new(Mutex::new(WriterStats::default()));
        let writer = LanceWriter {
            corpus,
            config,
            table: None,
            buffer: Vec::new(),
            buffered_rows: 0,
            stats: stats.clone(),
            written: metrics.counter(MetricName::CorpusWrittenRows, "table", T::NAME),
            skipped: metrics.counter(MetricName::CorpusSkippedRows, "table", T::NAME),
            version: metrics.gauge(MetricName::CorpusVersion, "table", T::NAME),
            fragments: metrics.gauge(MetricName::CorpusFragments, "table", T::NAME),
            replay: None,
        };
        (writer, stats)
    }

    async fn commit(&mut self, out: &mut Output) -> Result<()> {
        if self.buffered_rows == 0 {
            return Ok(());
        }
        let batch = arrow_select::concat::concat_batches(&T::schema(), &self.buffer)
            .map_err(|source| proxytune_schemas::SchemaError::Arrow { table: T::NAME, source })?;
        let table =
            self.table.as_mut().ok_or_else(|| Error::Operator { message: "writer not started".into() })?;
        let (AppendOutcome { written, skipped, version }, new_rows) = table.append_new_rows(&batch).await?;
        self.buffer.clear();
        self.buffered_rows = 0;
        self.written.increment(written as u64);
        self.skipped.increment(skipped as u64);
        if let Some(v) = version {
            self.version.set(v as f64);
        }
        self.fragments.set(table.fragment_count() as f64);
        {
            let mut stats = self.stats.lock().expect("writer stats");
            stats.written_rows += written as u64;
            stats.skipped_rows += skipped as u64;
            stats.commits += u64::from(written > 0);
            stats.version = version;
            if written > 0 {
                let rows = stats.written_rows;
                stats.commit_log.push((proxytune_schemas::now_us(), rows));
            }
        }
        if self.config.forward_committed {
            out.emit(new_rows);
        }
        Ok(())
    }
}

impl<T: Table> AsyncOperator for LanceWriter<T> {
    async fn on_start(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        let table = self.corpus.table::<T>().await?;
        if self.config.forward_committed && self.config.replay_stored {
            // Passed on as pending work, a small batch at a time under backpressure, before any
            // new row: a resumed job never holds its stored images in memory at once.
            let scan = crate::corpus::Scan { batch_size: Some(REPLAY_BATCH_ROWS), ..Default::default() };
            self.replay = Some(table.scan(&scan).await?);
        }
        if let Some(v) = table.version() {
            self.version.set(v as f64);
            self.stats.lock().expect("writer stats").version = Some(v);
        }
        self.table = Some(table);
        Ok(())
    }

    fn has_pending_work(&self) -> bool {
        self.replay.is_some()
    }

    async fn do_pending_work(&mut self, _ctx: &mut Context, out: &mut Output) -> Result<()> {
        let Some(stream) = self.replay.as_mut() else { return Ok(()) };
        match futures::TryStreamExt::try_next(stream).await? {
            Some(batch) => {
                self.stats.lock().expect("writer stats").replayed_rows += batch.num_rows() as u64;
                out.emit(batch);
            }
            None => {
                self.replay = None;
                let replayed = self.stats.lock().expect("writer stats").replayed_rows;
                if replayed > 0 {
                    tracing::info!(table = T::NAME, rows = replayed, "stored rows passed on before new ones");
                }
            }
        }
        Ok(())
    }

    async fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        _ctx: &mut Context,
        out: &mut Output,
    ) -> Result<()> {
        let batch = T::conform(&batch)?;
        self.stats.lock().expect("writer stats").received_rows += batch.num_rows() as u64;
        self.buffered_rows += batch.num_rows();
        self.buffer.push(batch);
        if self.buffered_rows >= self.config.commit_every_rows {
            self.commit(out).await?;
        }
        Ok(())
    }

    async fn on_signal(&mut self, signal: Signal, _ctx: &mut Context, out: &mut Output) -> Result<()> {
        match signal {
            Signal::Barrier { .. } | Signal::Flush => self.commit(out).await,
            Signal::EndOfData => Ok(()),
        }
    }

    async fn on_close(&mut self, _ctx: &mut Context, out: &mut Output) -> Result<()> {
        self.commit(out).await
    }
}
