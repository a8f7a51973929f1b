//! The corpus store: every stored row of a deployment, in real Lance datasets on disk, and the
//! actors that write it ([`writer`]: idempotent appends, commits on barriers and close) and stream
//! it ([`reader`]: a pinned version, filtered).
//!
//! A corpus is a directory holding a `corpus.json` marker and one Lance dataset per table,
//! `<root>/<table>.lance` (see [`proxytune_schemas::rows`] for the tables):
//!
//! - **Idempotent appends.** [`CorpusTable::append`] writes each row key once: rows whose key is
//!   already stored (or repeated within the batch) are skipped and counted, so a restarted job that
//!   re-sends what it already wrote neither loses nor duplicates a row. The key set is kept in
//!   memory (keys only, never images) and re-read whenever another writer has committed.
//! - **Validated writes.** A batch is checked against the table's schema before anything is
//!   written; a bad batch leaves the dataset as it was.
//! - **Streaming reads.** [`CorpusTable::scan`] returns a stream of batches with an optional
//!   filter expression, projection and pinned version; nothing collects a whole table.
//! - **Versions.** Each append commits a new Lance version; versions can be listed, tagged,
//!   checked out read-only (the replay source) and compacted without losing old versions.
//!
//! - **Damaged commits.** A table whose newest manifest is damaged (cut short: it lacks Lance's
//!   closing magic) opens at its newest whole version, the damaged manifest moved to
//!   `<table>.lance/_damaged_manifests/` and logged; the rows of that commit are gone from the
//!   table, and a resumed job writes them again (a row's key is fixed by its plan). Lance itself
//!   would fail (or, in a build with overflow checks, panic) reading it.
//!
//! One writer per table at a time (the corpus writer actor); any number of readers.

pub mod reader;
pub mod writer;

use std::collections::{BTreeMap, HashSet};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, BooleanArray, RecordBatch, StringArray};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use lance::dataset::optimize::{compact_files, CompactionOptions};
use lance::dataset::{InsertBuilder, WriteMode, WriteParams};
use lance::Dataset;
use proxytune_schemas::{Table, KEY_COLUMN};
use serde::{Deserialize, Serialize};

use crate::error::{Error, LanceContext, Result};

/// Name of the marker file at the root of a corpus.
pub const MARKER_FILE: &str = "corpus.json";
const FORMAT: &str = "proxytune-corpus";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Marker {
    format: String,
    format_version: u32,
}

/// A corpus directory. Cheap to clone; tables are opened with [`Corpus::table`].
#[derive(Clone, Debug)]
pub struct Corpus {
    root: PathBuf,
}

impl Corpus {
    /// Opens the corpus at `root`, creating it when `root` does not exist or is an empty directory.
    /// Refuses a file, or a non-empty directory that is not a corpus, so nothing is written into
    /// a folder that holds something else.
    pub fn open_or_create(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let io = |source| Error::Io { path: root.clone(), source };
        if root.exists() {
            if !root.is_dir() {
                return Err(not_a_corpus(&root, "it is a file, not a directory"));
            }
            let empty = std::fs::read_dir(&root).map_err(io)?.next().is_none();
            if !empty {
                return Self::open(&root);
            }
        }
        std::fs::create_dir_all(&root).map_err(io)?;
        let marker = Marker { format: FORMAT.into(), format_version: FORMAT_VERSION };
        let text = serde_json::to_string_pretty(&marker).expect("marker serialises");
        std::fs::write(root.join(MARKER_FILE), text).map_err(io)?;
        Ok(Corpus { root })
    }

    /// Opens an existing corpus; fails when `root` is not one.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(not_a_corpus(&root, "no such directory"));
        }
        let marker_path = root.join(MARKER_FILE);
        let text = std::fs::read_to_string(&marker_path)
            .map_err(|_| not_a_corpus(&root, &format!("no readable {MARKER_FILE}")))?;
        let marker: Marker =
            serde_json::from_str(&text).map_err(|e| not_a_corpus(&root, &format!("{MARKER_FILE}: {e}")))?;
        if marker.format != FORMAT || marker.format_version != FORMAT_VERSION {
            return Err(not_a_corpus(
                &root,
                &format!(
                    "{MARKER_FILE} says format `{}` v{}, expected `{FORMAT}` v{FORMAT_VERSION}",
                    marker.format, marker.format_version
                ),
            ));
        }
        Ok(Corpus { root })
    }

    /// The corpus directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Tidies every table ([`CorpusTable::tidy`]), naming each one's newest version `tag`.
    pub async fn tidy(&self, tag: &str) -> Result<Vec<TidyReport>> {
        use proxytune_schemas::{
            CaptionStates, ClassPriorImage, EvalSample, Proxy, ReferenceImage, Supervisor, VqTokens,
        };
        Ok(vec![
            self.table::<ReferenceImage>().await?.tidy(tag).await?,
            self.table::<ClassPriorImage>().await?.tidy(tag).await?,
            self.table::<Supervisor>().await?.tidy(tag).await?,
            self.table::<Proxy>().await?.tidy(tag).await?,
            self.table::<VqTokens>().await?.tidy(tag).await?,
            self.table::<CaptionStates>().await?.tidy(tag).await?,
            self.table::<EvalSample>().await?.tidy(tag).await?,
        ])
    }

    /// Compacts every written table ([`CorpusTable::compact`]). A job's writers commit every
    /// few rows, each commit a fragment; a finished job's tables are rewritten into fragments of
    /// up to `target_rows_per_fragment` rows (at 100k proxies, 12,500 fragments become about
    /// a hundred), so scans and replays open a few files, not thousands.
    pub async fn compact(&self, target_rows_per_fragment: usize) -> Result<Vec<CompactionReport>> {
        use proxytune_schemas::{
            CaptionStates, ClassPriorImage, EvalSample, Proxy, ReferenceImage, Supervisor, VqTokens,
        };
        async fn one<T: Table>(corpus: &Corpus, rows: usize) -> Result<Option<CompactionReport>> {
            let mut table = corpus.table::<T>().await?;
            if table.version().is_none() {
                return Ok(None);
            }
            table.compact(rows).await.map(Some)
        }
        let rows = target_rows_per_fragment;
        Ok([
            one::<ReferenceImage>(self, rows).await?,
            one::<ClassPriorImage>(self, rows).await?,
            one::<Supervisor>(self, rows).await?,
            one::<Proxy>(self, rows).await?,
            one::<VqTokens>(self, rows).await?,
            one::<CaptionStates>(self, rows).await?,
            one::<EvalSample>(self, rows).await?,
        ]
        .into_iter()
        .flatten()
        .collect())
    }

    /// Where table `T`'s dataset lives.
    pub fn table_path<T: Table>(&self) -> PathBuf {
        self.root.join(format!("{}.lance", T::NAME))
    }

    /// Opens table `T` for reading and appending (its dataset is created by the first append).
    pub async fn table<T: Table>(&self) -> Result<CorpusTable<T>> {
        CorpusTable::open(self.table_path::<T>()).await
    }
}

/// Lance's closing bytes of every manifest it writes.
const MANIFEST_MAGIC: &[u8; 4] = b"LANC";

/// The version a manifest's file name stands for (Lance's v2 names count down from `u64::MAX`, so
/// the newest sorts first; v1 names are the version).
fn manifest_version(name: &str) -> Option<u64> {
    let n: u64 = name.strip_suffix(".manifest")?.parse().ok()?;
    Some(if n > u64::MAX / 2 { u64::MAX - n } else { n })
}

/// Whether a manifest file is whole: at least a footer long and ending with Lance's magic.
fn manifest_is_whole(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len < 16 {
        return Ok(false);
    }
    let mut tail = [0u8; 4];
    file.seek(SeekFrom::End(-4))?;
    file.read_exact(&mut tail)?;
    Ok(&tail == MANIFEST_MAGIC)
}

/// Moves damaged manifests at the head of `table`'s history into `_damaged_manifests/`, newest
/// first, until the newest is whole; returns where they went. Refuses (changing nothing) when no
/// whole manifest would remain.
fn set_aside_damaged_manifests(table: &Path) -> Result<Vec<PathBuf>> {
    let versions = table.join("_versions");
    let io = |e: std::io::Error| not_a_corpus(table, &format!("cannot read its manifests ({e})"));
    let Ok(entries) = std::fs::read_dir(&versions) else { return Ok(Vec::new()) };
    let mut manifests: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((manifest_version(e.file_name().to_str()?)?, e.path())))
        .collect();
    manifests.sort_by_key(|m| std::cmp::Reverse(m.0)); // newest first
    let damaged: Vec<&PathBuf> = manifests
        .iter()
        .map(|(_, p)| manifest_is_whole(p).map(|whole| (p, whole)))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io)?
        .into_iter()
        .take_while(|(_, whole)| !whole)
        .map(|(p, _)| p)
        .collect();
    if damaged.is_empty() {
        return Ok(Vec::new());
    }
    if damaged.len() == manifests.len() {
        return Err(not_a_corpus(table, "every manifest is damaged (cut short); nothing was changed"));
    }
    let aside = table.join("_damaged_manifests");
    std::fs::create_dir_all(&aside).map_err(io)?;
    let mut moved = Vec::new();
    for path in damaged {
        let to = aside.join(path.file_name().expect("a manifest file"));
        std::fs::rename(path, &to).map_err(io)?;
        moved.push(to);
    }
    Ok(moved)
}

fn not_a_corpus(path: &Path, reason: &str) -> Error {
    Error::NotACorpus { path: path.to_path_buf(), reason: reason.to_string() }
}

/// What tidying one table did ([`CorpusTable::tidy`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TidyReport {
    /// The table.
    pub table: &'static str,
    /// The newest version, kept and tagged (`None`: the table was never written).
    pub kept_version: Option<u64>,
    /// Versions removed.
    pub versions_removed: u64,
    /// Bytes removed.
    pub bytes_removed: u64,
}

/// A version to read: a number or a tag name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VersionRef {
    /// A version number.
    Number(u64),
    /// A tag created with [`CorpusTable::tag`].
    Tag(String),
}

impl std::str::FromStr for VersionRef {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(s.parse::<u64>().map(VersionRef::Number).unwrap_or_else(|_| VersionRef::Tag(s.into())))
    }
}

impl std::fmt::Display for VersionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VersionRef::Number(v) => write!(f, "{v}"),
            VersionRef::Tag(t) => f.write_str(t),
        }
    }
}

/// What a scan reads. The default reads every column of every row of the current version.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Read this version instead of the handle's current one.
    pub version: Option<VersionRef>,
    /// A Lance filter expression (SQL-like, e.g. `keep = true AND subject = 'dog2'`).
    pub filter: Option<String>,
    /// Only these columns, in this order.
    pub columns: Option<Vec<String>>,
    /// At most this many rows per batch (Lance's default batching when `None`).
    pub batch_size: Option<usize>,
}

/// The outcome of one append.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AppendOutcome {
    /// Rows written.
    pub written: usize,
    /// Rows skipped because their key was already stored or repeated in the batch.
    pub skipped: usize,
    /// The table's version after the append (`None`: the table still does not exist).
    pub version: Option<u64>,
}

/// One version of a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// Version number.
    pub version: u64,
    /// Commit time, µs since the epoch.
    pub timestamp_us: i64,
}

/// The outcome of a compaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CompactionReport {
    /// The table.
    pub table: &'static str,
    /// Fragments before.
    pub fragments_before: usize,
    /// Fragments after.
    pub fragments_after: usize,
    /// Version after compaction.
    pub version: u64,
}

/// A stream of batches from a scan.
pub type BatchStream = BoxStream<'static, Result<RecordBatch>>;

#[derive(Debug)]
struct KeySet {
    version: u64,
    keys: HashSet<String>,
}

/// One table of a corpus: a Lance dataset of `T` rows.
pub struct CorpusTable<T> {
    path: PathBuf,
    uri: String,
    dataset: Option<Dataset>,
    keys: Option<KeySet>,
    read_only: bool,
    _rows: PhantomData<fn() -> T>,
}

impl<T: Table> std::fmt::Debug for CorpusTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CorpusTable")
            .field("table", &T::NAME)
            .field("uri", &self.uri)
            .field("version", &self.version())
            .finish()
    }
}

impl<T: Table> CorpusTable<T> {
    /// Opens the dataset at `path` (which may not exist yet) as table `T`, checking its schema.
    pub async fn open(path: PathBuf) -> Result<Self> {
        let uri = path.to_string_lossy().into_owned();
        let dataset = if path.exists() {
            for damaged in set_aside_damaged_manifests(&path)? {
                tracing::warn!(table = %path.display(), manifest = %damaged.display(), "the newest manifest was damaged (cut short); set aside, the table opens at its newest whole version");
            }
            let ds = Dataset::open(&uri)
                .await
                .map_err(|e| not_a_corpus(&path, &format!("not a Lance dataset ({e})")))?;
            check_schema::<T>(&path, &ds)?;
            Some(ds)
        } else {
            None
        };
        Ok(CorpusTable { path, uri, dataset, keys: None, read_only: false, _rows: PhantomData })
    }

    /// The dataset's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The version this handle reads (`None` before the first append).
    pub fn version(&self) -> Option<u64> {
        self.dataset.as_ref().map(|d| d.version().version)
    }

    /// Number of fragments (data files) of this handle's version.
    pub fn fragment_count(&self) -> usize {
        self.dataset.as_ref().map_or(0, Dataset::count_fragments)
    }

    /// Moves the handle to the newest committed version (a reader following a writer).
    pub async fn refresh(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        match &mut self.dataset {
            Some(ds) => ds.checkout_latest().await.context(|| format!("refresh {}", self.uri)),
            None if self.path.exists() => {
                *self = Self::open(self.path.clone()).await?;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Rows in this handle's version matching `filter` (all rows when `None`).
    pub async fn count_rows(&self, filter: Option<&str>) -> Result<usize> {
        let Some(ds) = &self.dataset else {
            return Ok(0);
        };
        ds.count_rows(filter.map(str::to_string)).await.map_err(|e| self.filter_error(filter, e))
    }

    /// Appends the rows of `batch` whose keys are not stored yet, as one new version.
    /// The batch is validated against `T`'s schema first; on any error nothing is written.
    pub async fn append(&mut self, batch: &RecordBatch) -> Result<AppendOutcome> {
        Ok(self.append_new_rows(batch).await?.0)
    }

    /// Like [`CorpusTable::append`], and also returns the rows that were new (those written).
    pub async fn append_new_rows(&mut self, batch: &RecordBatch) -> Result<(AppendOutcome, RecordBatch)> {
        let batch = T::conform(batch)?;
        if self.read_only {
            return Err(not_a_corpus(&self.path, "this handle is a read-only checkout of an old version"));
        }
        let fresh = self.fresh_rows(&batch).await?;
        let written = fresh.true_count();
        let skipped = batch.num_rows() - written;
        let batch = if skipped == 0 {
            batch
        } else {
            arrow_select::filter::filter_record_batch(&batch, &fresh)
                .map_err(|source| proxytune_schemas::SchemaError::Arrow { table: T::NAME, source })?
        };
        if written == 0 {
            return Ok((AppendOutcome { written, skipped, version: self.version() }, batch));
        }
        let new_keys = key_strings(&batch)?;
        let dataset = match &self.dataset {
            None => {
                let params = WriteParams { mode: WriteMode::Create, ..Default::default() };
                InsertBuilder::new(self.uri.as_str()).with_params(&params).execute(vec![batch.clone()]).await
            }
            Some(ds) => {
                let params = WriteParams { mode: WriteMode::Append, ..Default::default() };
                InsertBuilder::new(Arc::new(ds.clone()))
                    .with_params(&params)
                    .execute(vec![batch.clone()])
                    .await
            }
        }
        .context(|| format!("append {} rows to {}", written, self.uri))?;
        let version = dataset.version().version;
        let keys = self.keys.get_or_insert_with(|| KeySet { version, keys: HashSet::new() });
        keys.keys.extend(new_keys);
        keys.version = version;
        self.dataset = Some(dataset);
        Ok((AppendOutcome { written, skipped, version: Some(version) }, batch))
    }

    /// Typed convenience over [`CorpusTable::append`].
    pub async fn append_rows(&mut self, rows: &[T]) -> Result<AppendOutcome> {
        self.append(&T::to_batch(rows)?).await
    }

    /// Which rows of `batch` are new: not stored, and first of their key within the batch.
    async fn fresh_rows(&mut self, batch: &RecordBatch) -> Result<BooleanArray> {
        self.sync_keys().await?;
        let stored = self.keys.as_ref().map(|k| &k.keys);
        let keys = key_column(batch)?;
        let mut seen = HashSet::with_capacity(keys.len());
        Ok((0..keys.len())
            .map(|i| {
                let key = keys.value(i);
                Some(!stored.is_some_and(|s| s.contains(key)) && seen.insert(key))
            })
            .collect())
    }

    /// Makes the in-memory key set match the newest committed version (re-reading the key column
    /// when another writer committed since we last looked).
    async fn sync_keys(&mut self) -> Result<()> {
        if self.dataset.is_none() && self.path.exists() {
            // Another writer created the table since we opened it.
            *self = Self::open(self.path.clone()).await?;
        }
        let Some(ds) = &mut self.dataset else {
            return Ok(());
        };
        let latest = ds.latest_version_id().await.context(|| format!("latest version of {}", self.uri))?;
        if self.keys.as_ref().is_some_and(|k| k.version == latest) {
            return Ok(());
        }
        ds.checkout_latest().await.context(|| format!("checkout latest of {}", self.uri))?;
        let mut keys = HashSet::new();
        let mut stream =
            self.scan(&Scan { columns: Some(vec![KEY_COLUMN.to_string()]), ..Default::default() }).await?;
        while let Some(batch) = stream.try_next().await? {
            keys.extend(key_strings(&batch)?);
        }
        self.keys = Some(KeySet { version: latest, keys });
        Ok(())
    }

    /// Streams the rows selected by `scan`, in storage order.
    pub async fn scan(&self, scan: &Scan) -> Result<BatchStream> {
        let Some(ds) = &self.dataset else {
            return Ok(futures::stream::empty().boxed());
        };
        let pinned;
        let ds = match &scan.version {
            None => ds,
            Some(v) => {
                pinned = self.checkout_dataset(v).await?;
                &pinned
            }
        };
        let mut scanner = ds.scan();
        let filter = scan.filter.as_deref();
        if let Some(f) = filter {
            scanner.filter(f).map_err(|e| self.filter_error(filter, e))?;
        }
        if let Some(columns) = &scan.columns {
            scanner.project(columns.as_slice()).context(|| format!("project {columns:?} of {}", self.uri))?;
        }
        if let Some(n) = scan.batch_size {
            scanner.batch_size(n);
        }
        scanner.scan_in_order(true);
        let stream = scanner.try_into_stream().await.map_err(|e| self.filter_error(filter, e))?;
        let uri = self.uri.clone();
        let max_rows = scan.batch_size.unwrap_or(usize::MAX).max(1);
        Ok(stream
            .map_err(move |source| Error::Lance { context: format!("scan {uri}"), source })
            // Lance treats the batch size as a hint (a filter can merge batches); make it a bound.
            .map_ok(move |batch| futures::stream::iter(split(batch, max_rows).into_iter().map(Ok)))
            .try_flatten()
            .boxed())
    }

    /// The rows `filter` selects without their binary columns (images): those columns are never
    /// read from disk and come back empty, so a table of 100k 1024-px proxies costs its metadata
    /// alone. For tables whose rows accept an empty binary (images), not for token rows.
    pub async fn read_rows_light(&self, filter: Option<&str>) -> Result<Vec<T>> {
        let schema = T::schema();
        let heavy = |f: &arrow_schema::Field| matches!(f.data_type(), arrow_schema::DataType::LargeBinary);
        let columns: Vec<String> =
            schema.fields().iter().filter(|f| !heavy(f)).map(|f| f.name().clone()).collect();
        let scan = Scan { filter: filter.map(String::from), columns: Some(columns), ..Default::default() };
        let mut stream = self.scan(&scan).await?;
        let mut rows = Vec::new();
        while let Some(batch) = stream.try_next().await? {
            let n = batch.num_rows();
            let mut full: Vec<Arc<dyn Array>> = Vec::with_capacity(schema.fields().len());
            for field in schema.fields() {
                full.push(if heavy(field) {
                    Arc::new(arrow_array::LargeBinaryArray::from_iter_values(std::iter::repeat_n(
                        &b""[..],
                        n,
                    )))
                } else {
                    batch.column_by_name(field.name()).expect("projected").clone()
                });
            }
            let batch = RecordBatch::try_new(schema.clone(), full)
                .map_err(|source| proxytune_schemas::SchemaError::Arrow { table: T::NAME, source })?;
            rows.extend(T::from_batch(&batch)?);
        }
        Ok(rows)
    }

    /// At most `limit` typed rows `filter` selects, in storage order; reading stops there.
    pub async fn read_rows_limited(&self, filter: Option<&str>, limit: usize) -> Result<Vec<T>> {
        let scan = Scan {
            filter: filter.map(String::from),
            batch_size: Some(limit.clamp(1, 64)),
            ..Default::default()
        };
        let mut stream = self.scan(&scan).await?;
        let mut rows = Vec::new();
        while rows.len() < limit {
            let Some(batch) = stream.try_next().await? else { break };
            rows.extend(T::from_batch(&batch)?);
        }
        rows.truncate(limit);
        Ok(rows)
    }

    /// The values of a timestamp column (microseconds), every row, in storage order.
    pub async fn timestamps(&self, column: &str) -> Result<Vec<i64>> {
        let scan = Scan { columns: Some(vec![column.to_string()]), ..Default::default() };
        let mut stream = self.scan(&scan).await?;
        let mut out = Vec::new();
        while let Some(batch) = stream.try_next().await? {
            let values = batch
                .column(0)
                .as_any()
                .downcast_ref::<arrow_array::TimestampMicrosecondArray>()
                .ok_or_else(|| not_a_corpus(&self.path, &format!("`{column}` is not a timestamp column")))?;
            out.extend(values.values().iter().copied());
        }
        Ok(out)
    }

    /// The typed rows `filter` selects (all with `None`) in storage order; for small tables.
    pub async fn read_rows(&self, filter: Option<&str>) -> Result<Vec<T>> {
        let mut stream = self.scan(&Scan { filter: filter.map(String::from), ..Default::default() }).await?;
        let mut rows = Vec::new();
        while let Some(batch) = stream.try_next().await? {
            rows.extend(T::from_batch(&batch)?);
        }
        Ok(rows)
    }

    /// Every version of the table, oldest first.
    pub async fn versions(&self) -> Result<Vec<VersionInfo>> {
        let Some(ds) = &self.dataset else {
            return Ok(vec![]);
        };
        let versions = ds.versions().await.context(|| format!("list versions of {}", self.uri))?;
        Ok(versions
            .into_iter()
            .map(|v| VersionInfo { version: v.version, timestamp_us: v.timestamp.timestamp_micros() })
            .collect())
    }

    /// Names `version` with `tag` (e.g. the corpus version a training run consumed).
    pub async fn tag(&self, tag: &str, version: u64) -> Result<()> {
        let ds = self.existing("tag a version")?;
        ds.tags().create(tag, version).await.context(|| format!("tag {}@{version} as `{tag}`", self.uri))
    }

    /// Tags and the versions they name.
    pub async fn tags(&self) -> Result<BTreeMap<String, u64>> {
        let Some(ds) = &self.dataset else {
            return Ok(BTreeMap::new());
        };
        let tags = ds.tags().list().await.context(|| format!("list tags of {}", self.uri))?;
        Ok(tags.into_iter().map(|(name, contents)| (name, contents.version)).collect())
    }

    /// A read-only handle on an older version (by number or tag): the source of a replay.
    pub async fn checkout(&self, version: &VersionRef) -> Result<CorpusTable<T>> {
        let dataset = self.checkout_dataset(version).await?;
        Ok(CorpusTable {
            path: self.path.clone(),
            uri: self.uri.clone(),
            dataset: Some(dataset),
            keys: None,
            read_only: true,
            _rows: PhantomData,
        })
    }

    /// Names the newest version `tag` (unless the tag exists) and removes every other version no
    /// tag names: their manifests and transaction files, and data files only they use (after a
    /// [`CorpusTable::compact`], the small fragments it rewrote). The newest version and every tagged one stay readable. What a
    /// finished job's corpus keeps: each of its thousands of commits left a manifest listing every
    /// fragment so far, so manifests grow with the square of the commits.
    pub async fn tidy(&mut self, tag: &str) -> Result<TidyReport> {
        if self.read_only {
            return Err(not_a_corpus(&self.path, "cannot tidy a read-only checkout"));
        }
        let uri = self.uri.clone();
        let Some(ds) = self.dataset.as_mut() else {
            return Ok(TidyReport {
                table: T::NAME,
                kept_version: None,
                versions_removed: 0,
                bytes_removed: 0,
            });
        };
        ds.checkout_latest().await.context(|| format!("checkout latest of {uri}"))?;
        let latest = ds.version().version;
        let tags = ds.tags().list().await.context(|| format!("list tags of {uri}"))?;
        if !tags.contains_key(tag) {
            ds.tags().create(tag, latest).await.context(|| format!("tag {uri}@{latest} as `{tag}`"))?;
        }
        let stats = ds
            .cleanup_old_versions(chrono::Duration::zero(), Some(false), Some(false))
            .await
            .context(|| format!("remove old versions of {uri}"))?;
        Ok(TidyReport {
            table: T::NAME,
            kept_version: Some(latest),
            versions_removed: stats.old_versions,
            bytes_removed: stats.bytes_removed,
        })
    }

    /// Rewrites small fragments into fragments of up to `target_rows_per_fragment` rows, as a new
    /// version. Rows and their order are unchanged and older versions stay readable (until
    /// [`CorpusTable::tidy`] removes them). A table of one fragment is left as it is (no new
    /// version).
    pub async fn compact(&mut self, target_rows_per_fragment: usize) -> Result<CompactionReport> {
        if self.read_only {
            return Err(not_a_corpus(&self.path, "cannot compact a read-only checkout"));
        }
        let uri = self.uri.clone();
        let ds = self
            .dataset
            .as_mut()
            .ok_or_else(|| not_a_corpus(&self.path, "cannot compact a table that was never written"))?;
        ds.checkout_latest().await.context(|| format!("checkout latest of {uri}"))?;
        let fragments_before = ds.count_fragments();
        if fragments_before <= 1 {
            return Ok(CompactionReport {
                table: T::NAME,
                fragments_before,
                fragments_after: fragments_before,
                version: ds.version().version,
            });
        }
        let options = CompactionOptions { target_rows_per_fragment, ..Default::default() };
        compact_files(ds, options, None).await.context(|| format!("compact {uri}"))?;
        Ok(CompactionReport {
            table: T::NAME,
            fragments_before,
            fragments_after: ds.count_fragments(),
            version: ds.version().version,
        })
    }

    fn existing(&self, what: &str) -> Result<&Dataset> {
        self.dataset.as_ref().ok_or_else(|| {
            not_a_corpus(&self.path, &format!("cannot {what}: table `{}` was never written", T::NAME))
        })
    }

    async fn checkout_dataset(&self, version: &VersionRef) -> Result<Dataset> {
        let ds = self.existing("check out a version")?;
        let result = match version {
            VersionRef::Number(v) => ds.checkout_version(*v).await,
            VersionRef::Tag(t) => ds.checkout_version(t.as_str()).await,
        };
        result.map_err(|e| Error::NoSuchVersion {
            table: T::NAME,
            uri: self.uri.clone(),
            version: version.to_string(),
            message: e.to_string(),
        })
    }

    /// Errors while applying or planning a filter are reported as [`Error::Filter`] (naming the
    /// expression); anything else as a Lance error.
    fn filter_error(&self, filter: Option<&str>, source: lance::Error) -> Error {
        match filter {
            Some(f) => Error::Filter { table: T::NAME, filter: f.to_string(), message: source.to_string() },
            None => Error::Lance { context: format!("scan {}", self.uri), source },
        }
    }
}

/// Zero-copy slices of at most `max_rows` rows.
fn split(batch: RecordBatch, max_rows: usize) -> Vec<RecordBatch> {
    if batch.num_rows() <= max_rows {
        return vec![batch];
    }
    (0..batch.num_rows())
        .step_by(max_rows)
        .map(|start| batch.slice(start, max_rows.min(batch.num_rows() - start)))
        .collect()
}

fn check_schema<T: Table>(path: &Path, ds: &Dataset) -> Result<()> {
    let schema = arrow_schema::Schema::from(ds.schema());
    let empty = RecordBatch::new_empty(Arc::new(schema));
    T::conform(&empty)
        .map(|_| ())
        .map_err(|e| not_a_corpus(path, &format!("its schema is not proxytune's `{}` table: {e}", T::NAME)))
}

fn key_column(batch: &RecordBatch) -> Result<&StringArray> {
    batch.column_by_name(KEY_COLUMN).and_then(|c| c.as_any().downcast_ref::<StringArray>()).ok_or_else(|| {
        Error::Schema(proxytune_schemas::SchemaError::MissingColumn {
            table: "corpus",
            column: KEY_COLUMN.into(),
        })
    })
}

fn key_strings(batch: &RecordBatch) -> Result<Vec<String>> {
    let keys = key_column(batch)?;
    Ok((0..keys.len()).filter(|&i| keys.is_valid(i)).map(|i| keys.value(i).to_string()).collect())
}
