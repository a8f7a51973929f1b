//! `proxytune evaluate ...`: the DreamBench evaluation commands.
//!
//! `evaluate real-images` computes the "real images" row of the protocol — every subject's
//! reference photos against each other — for FEAT-I (always: real weights fetched at setup) and
//! for DINO and CLIP-I when checkpoint folders are given, over all subjects and over the 9-subject
//! subset, and writes it as JSON and Markdown with a grid of each subject's photos.

use std::path::{Path, PathBuf};

use anyhow::Context;
use proxytune_actors::dreambench::{real_images_row, DreamBench, MetricTable, SUBSET_9};
use proxytune_models::scorers::clip_dino::{ClipScorer, Dino};
use proxytune_models::scorers::feat_i::{FeatI, WEIGHTS_FILE};
use proxytune_models::scorers::ImageEmbedder;
use proxytune_models::tokenizer::clip::ClipTokenizer;

/// Evaluation subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum EvaluateCommand {
    /// The "real images" row: each subject's references against each other.
    RealImages(RealImagesArgs),
}

/// Arguments of `proxytune evaluate real-images`.
#[derive(Debug, clap::Args)]
pub struct RealImagesArgs {
    /// DreamBench-layout folder.
    #[arg(long, default_value_os_t = crate::default_dreambench())]
    dreambench: PathBuf,
    /// Output folder (real_images.json, real_images.md, grids/).
    #[arg(long, default_value = "out/evaluate")]
    out: PathBuf,
    /// Folder with the converted EfficientNet-Lite0 weights ($PROXYTUNE_ASSETS by default).
    #[arg(long, env = "PROXYTUNE_ASSETS")]
    assets: PathBuf,
    /// A transformers DINO ViT checkpoint folder (config.json, model.safetensors).
    #[arg(long)]
    dino: Option<PathBuf>,
    /// A transformers CLIP checkpoint folder (config.json, model.safetensors).
    #[arg(long)]
    clip: Option<PathBuf>,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

fn markdown(tables: &std::collections::BTreeMap<String, MetricTable>) -> String {
    let metrics: Vec<&String> = tables.keys().collect();
    let fmt = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.3}"));
    let mut md = String::from("# DreamBench: real images (references against each other)\n\n");
    md.push_str(&format!(
        "| subjects | {} |\n|---|{}\n",
        metrics.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(" | "),
        "---|".repeat(metrics.len())
    ));
    md.push_str(&format!(
        "| all | {} |\n",
        metrics.iter().map(|m| fmt(tables[*m].all)).collect::<Vec<_>>().join(" | ")
    ));
    md.push_str(&format!(
        "| 9-subject subset | {} |\n\n",
        metrics.iter().map(|m| fmt(tables[*m].subset_9)).collect::<Vec<_>>().join(" | ")
    ));
    md.push_str(&format!("9-subject subset: {}.\n\n", SUBSET_9.join(", ")));
    md.push_str(&format!(
        "| subject | {} |\n|---|{}\n",
        metrics.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(" | "),
        "---|".repeat(metrics.len())
    ));
    let subjects: std::collections::BTreeSet<&String> =
        tables.values().flat_map(|t| t.per_subject.keys()).collect();
    for s in subjects {
        md.push_str(&format!(
            "| {s} | {} |\n",
            metrics
                .iter()
                .map(|m| fmt(tables[*m].per_subject.get(s).copied()))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    for (metric, table) in tables {
        for (subject, reason) in &table.failed {
            md.push_str(&format!("\n{metric}: `{subject}` failed: {reason}\n"));
        }
    }
    md.push_str(
        "\nFEAT-I is EfficientNet-Lite0's ImageNet features: an offline stand-in, not DINO or CLIP-I.\n",
    );
    md
}

/// Writes a one-row grid of a subject's photos.
fn grid(
    bench: &DreamBench,
    subject: &proxytune_actors::intake::SubjectEntry,
    out: &Path,
) -> anyhow::Result<()> {
    let images = bench.references(subject, tch::Device::Cpu)?; // [N, 3, S, S]
    let (n, s) = (images.size()[0], images.size()[2]);
    let row = images.permute([2, 0, 3, 1]).reshape([s, n * s, 3]); // [S, N*S, 3]
    let bytes: Vec<u8> =
        Vec::try_from((row * 255.0).round().clamp(0.0, 255.0).to_kind(tch::Kind::Uint8).flatten(0, -1))?;
    let img = image::RgbImage::from_raw((n * s) as u32, s as u32, bytes).context("grid size")?;
    img.save(out.join(format!("{}.png", subject.subject)))?;
    Ok(())
}

/// Runs an evaluation subcommand.
pub fn run(command: EvaluateCommand) -> anyhow::Result<()> {
    let EvaluateCommand::RealImages(args) = command;
    let device = proxytune_models::device::parse_device(&args.device)?;
    let bench = DreamBench::open(&args.dreambench)?;
    let feat = FeatI::load(&args.assets.join(WEIGHTS_FILE), device)?;
    let dino = args.dino.as_deref().map(|d| Dino::load(d, device)).transpose()?;
    let clip = match &args.clip {
        Some(dir) => {
            let tok = ClipTokenizer::from_openai_bpe(&args.assets.join("bpe_simple_vocab_16e6.txt.gz"))?;
            Some(ClipScorer::load(dir, tok, device)?)
        }
        None => None,
    };
    let mut embedders: Vec<&dyn ImageEmbedder> = vec![&feat];
    if let Some(d) = &dino {
        embedders.push(d);
    }
    if let Some(c) = &clip {
        embedders.push(c);
    }
    let tables = real_images_row(&bench, &embedders, device);
    std::fs::create_dir_all(args.out.join("grids")).with_context(|| args.out.display().to_string())?;
    std::fs::write(args.out.join("real_images.json"), serde_json::to_string_pretty(&tables)?)?;
    std::fs::write(args.out.join("real_images.md"), markdown(&tables))?;
    for subject in &bench.subjects {
        if let Err(e) = grid(&bench, subject, &args.out.join("grids")) {
            tracing::warn!(subject = %subject.subject, error = %e, "No grid for this subject.");
        }
    }
    println!("{}", markdown(&tables));
    Ok(())
}
