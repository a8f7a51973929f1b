//! `proxytune corpus ...`: inspect a corpus.

use std::path::PathBuf;

use proxytune_actors::corpus::{Corpus, CorpusTable};
use proxytune_schemas::{CaptionStates, ClassPriorImage, EvalSample, Proxy, ReferenceImage, Table, VqTokens};
use serde::Serialize;

/// Corpus subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CorpusCommand {
    /// Print every table's rows, versions, fragments and tags as JSON.
    Info {
        /// The corpus directory.
        root: PathBuf,
    },
}

#[derive(Debug, Serialize)]
struct TableInfo {
    table: &'static str,
    exists: bool,
    rows: usize,
    version: Option<u64>,
    versions: usize,
    fragments: usize,
    tags: std::collections::BTreeMap<String, u64>,
}

async fn info<T: Table>(corpus: &Corpus) -> anyhow::Result<TableInfo> {
    let table: CorpusTable<T> = corpus.table::<T>().await?;
    Ok(TableInfo {
        table: T::NAME,
        exists: table.version().is_some(),
        rows: table.count_rows(None).await?,
        version: table.version(),
        versions: table.versions().await?.len(),
        fragments: table.fragment_count(),
        tags: table.tags().await?,
    })
}

/// Runs a corpus subcommand.
pub async fn run(command: CorpusCommand) -> anyhow::Result<()> {
    match command {
        CorpusCommand::Info { root } => {
            let corpus = Corpus::open(&root)?;
            let tables = vec![
                info::<ReferenceImage>(&corpus).await?,
                info::<ClassPriorImage>(&corpus).await?,
                info::<Proxy>(&corpus).await?,
                info::<VqTokens>(&corpus).await?,
                info::<CaptionStates>(&corpus).await?,
                info::<EvalSample>(&corpus).await?,
            ];
            println!("{}", serde_json::to_string_pretty(&tables)?);
        }
    }
    Ok(())
}
