//! `proxytune smoke` (hidden; development): DreamBench references into a Lance corpus and a few libtorch steps, end to end on real data.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use futures::TryStreamExt;
use proxytune_actors::corpus::{Corpus, Scan};
use proxytune_actors::stages::intake::{load_subject_folder, read_subjects_tsv, IntakeRules};
use proxytune_models::nn::{Mlp, MlpConfig};
use proxytune_schemas::ReferenceImage;
use serde::Serialize;
use tch::nn::OptimizerConfig;

/// Arguments of `proxytune smoke`.
#[derive(Debug, clap::Args)]
pub struct SmokeArgs {
    /// Corpus directory to create or reuse.
    #[arg(long, default_value = "out/smoke/corpus")]
    corpus: PathBuf,
    /// DreamBench-layout folder (subjects.tsv and one folder of images per subject).
    #[arg(long, default_value_os_t = crate::default_dreambench())]
    dreambench: PathBuf,
    /// Device for the tch step: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Debug, Serialize)]
struct SmokeReport {
    corpus: PathBuf,
    subjects: usize,
    first_import: ImportCounts,
    second_import: ImportCounts,
    references_version: Option<u64>,
    dog_references_scanned: usize,
    scan_batches: usize,
    tch_device: String,
    tch_loss_first: f64,
    tch_loss_last: f64,
    seconds: f64,
}

#[derive(Debug, Default, Serialize)]
struct ImportCounts {
    written: usize,
    skipped: usize,
}

/// Runs the smoke job and prints its report as JSON on stdout.
pub async fn run(args: SmokeArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let subjects = read_subjects_tsv(&args.dreambench.join("subjects.tsv"))?;
    let corpus = Corpus::open_or_create(&args.corpus)?;
    let mut table = corpus.table::<ReferenceImage>().await?;

    let mut imports = [ImportCounts::default(), ImportCounts::default()];
    for counts in &mut imports {
        for entry in &subjects {
            let dir = args.dreambench.join(&entry.subject);
            // Image decoding is CPU work: keep it off the async workers.
            let (folder, subject, class) = (dir.clone(), entry.subject.clone(), entry.class_noun.clone());
            let rows = tokio::task::spawn_blocking(move || {
                load_subject_folder(
                    &folder,
                    "smoke",
                    &subject,
                    &class,
                    &IntakeRules::default(),
                    proxytune_schemas::now_us(),
                )
            })
            .await??;
            anyhow::ensure!(
                rows.len() == entry.n_images,
                "{}: {} images, subjects.tsv says {}",
                dir.display(),
                rows.len(),
                entry.n_images
            );
            let outcome = table.append_rows(&rows).await?;
            counts.written += outcome.written;
            counts.skipped += outcome.skipped;
        }
    }

    let scan = Scan {
        filter: Some("class_noun = 'dog'".into()),
        columns: Some(vec!["subject".into(), "width".into()]),
        batch_size: Some(8),
        ..Default::default()
    };
    let (mut rows, mut batches) = (0, 0);
    let mut stream = table.scan(&scan).await?;
    while let Some(batch) = stream.try_next().await? {
        rows += batch.num_rows();
        batches += 1;
    }

    let device = proxytune_models::device::parse_device(&args.device)?;
    let (first, last) =
        tokio::task::spawn_blocking(move || train_tiny(device)).await.context("tch thread panicked")??;

    let report = SmokeReport {
        corpus: args.corpus,
        subjects: subjects.len(),
        first_import: std::mem::take(&mut imports[0]),
        second_import: std::mem::take(&mut imports[1]),
        references_version: table.version(),
        dog_references_scanned: rows,
        scan_batches: batches,
        tch_device: format!("{device:?}"),
        tch_loss_first: first,
        tch_loss_last: last,
        seconds: started.elapsed().as_secs_f64(),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A few Adam steps of a tiny MLP on a fixed regression; returns the first and last loss.
fn train_tiny(device: tch::Device) -> anyhow::Result<(f64, f64)> {
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(device);
    let mlp = Mlp::new(vs.root(), &MlpConfig { in_features: 8, hidden_features: 64, out_features: 1 });
    let xs = tch::Tensor::randn([256, 8], (tch::Kind::Float, device));
    let ys = xs.cos().sum_dim_intlist(1, true, tch::Kind::Float);
    let mut opt = tch::nn::Adam::default().build(&vs, 1e-2)?;
    let mut losses = Vec::new();
    for _ in 0..100 {
        let loss = mlp.forward(&xs).mse_loss(&ys, tch::Reduction::Mean);
        opt.backward_step(&loss);
        losses.push(loss.double_value(&[]));
    }
    Ok((losses[0], losses[losses.len() - 1]))
}
