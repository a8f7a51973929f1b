//! `corpus_reader`: a source that streams one corpus table — a pinned version, optionally
//! filtered and projected — into the pipeline. This is how a replay feeds a stored corpus
//! version into a new training run with no generation. Batches are read one at a time from
//! Lance's stream; the table is never collected in memory. With `limit_rows` it stops after the
//! first rows in storage order (a data-scaling ablation's first N proxies).

use proxytune_schemas::Table;
use serde::{Deserialize, Serialize};

use crate::corpus::{BatchStream, Corpus, Scan, VersionRef};
use crate::error::Result;
use crate::runtime::{AsyncSource, Context, Output, Produced};

fn default_batch_rows() -> usize {
    256
}

/// Configuration of a [`CorpusReader`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusReaderConfig {
    /// The version to read (number or tag); the newest when absent.
    #[serde(default)]
    pub version: Option<VersionRef>,
    /// A Lance filter expression, e.g. `keep = true`.
    #[serde(default)]
    pub filter: Option<String>,
    /// Rows per emitted batch.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// Stop after this many rows (the first ones in storage order, which is commit order).
    #[serde(default)]
    pub limit_rows: Option<usize>,
}

impl Default for CorpusReaderConfig {
    fn default() -> Self {
        CorpusReaderConfig { version: None, filter: None, batch_rows: default_batch_rows(), limit_rows: None }
    }
}

/// Streams table `T` of a corpus.
pub struct CorpusReader<T: Table> {
    corpus: Corpus,
    config: CorpusReaderConfig,
    stream: Option<BatchStream>,
    /// The version actually read (resolved at start).
    version: Option<u64>,
    /// Rows emitted so far.
    emitted: usize,
    _rows: std::marker::PhantomData<fn() -> T>,
}

impl<T: Table> CorpusReader<T> {
    /// A reader of `corpus`.
    pub fn new(corpus: Corpus, config: CorpusReaderConfig) -> Self {
        CorpusReader {
            corpus,
            config,
            stream: None,
            version: None,
            emitted: 0,
            _rows: std::marker::PhantomData,
        }
    }
}

impl<T: Table> AsyncSource for CorpusReader<T> {
    async fn on_start(&mut self, ctx: &mut Context, _out: &mut Output) -> Result<()> {
        let table = self.corpus.table::<T>().await?;
        let table = match &self.config.version {
            Some(v) => table.checkout(v).await?,
            None => table,
        };
        self.version = table.version();
        tracing::info!(actor = ctx.actor(), table = T::NAME, version = ?self.version, filter = ?self.config.filter, "Reading corpus.");
        let scan = Scan {
            filter: self.config.filter.clone(),
            batch_size: Some(self.config.batch_rows.max(1)),
            ..Default::default()
        };
        self.stream = Some(table.scan(&scan).await?);
        Ok(())
    }

    async fn produce(&mut self, _ctx: &mut Context, out: &mut Output) -> Result<Produced> {
        use futures::TryStreamExt;
        let Some(stream) = self.stream.as_mut() else {
            return Ok(Produced::Done);
        };
        let left = self.config.limit_rows.map_or(usize::MAX, |n| n.saturating_sub(self.emitted));
        if left == 0 {
            return Ok(Produced::Done);
        }
        match stream.try_next().await? {
            Some(batch) => {
                let batch = T::conform(&batch)?;
                let batch = if batch.num_rows() > left { batch.slice(0, left) } else { batch };
                self.emitted += batch.num_rows();
                out.emit(batch);
                Ok(Produced::More)
            }
            None => Ok(Produced::Done),
        }
    }
}
