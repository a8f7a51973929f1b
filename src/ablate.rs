//! `proxytune ablate`: the paper's ablations as replays of one stored corpus version, with no
//! regeneration. The data-scaling curve trains the student on the first N kept proxies (in the
//! order the job stored them) for several N and plots the scores against N (`data_scaling.svg`).
//! The Filter ablation trains on every stored proxy, the rejected ones included, against the
//! Filter's stored decisions. Each run is a `proxytune replay` in its own folder under `--out`, with
//! the same steps, batch, seeds and evaluation prompts; `report.json` gathers them and a table is
//! printed.

use std::path::PathBuf;

use anyhow::Context;

use crate::job::pipeline::{JobCommand, ProgressHandle};
use crate::replay::{self, ReplayArgs};
use crate::world_models::WorldStudent;

/// Arguments of `proxytune ablate`.
#[derive(Clone, Debug, clap::Args)]
pub struct AblateArgs {
    /// The corpus (e.g. `out/demo/corpus`).
    #[arg(long)]
    pub corpus: PathBuf,
    /// The proxies table version (number or tag); the newest when absent.
    #[arg(long)]
    pub version: Option<String>,
    /// Kept-proxy counts of the data-scaling curve (comma-separated); counts beyond the kept
    /// proxies train on all of them, once.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
    pub sizes: Vec<usize>,
    /// Output folder: a folder per run, report.json, data_scaling.svg.
    #[arg(long, default_value = "out/ablate")]
    pub out: PathBuf,
    /// The pretrained world models.
    #[arg(long, default_value = "models/world")]
    pub world: PathBuf,
    /// World seed of the corpus' subject.
    #[arg(long, default_value_t = 7)]
    pub world_seed: u64,
    /// The world student the corpus' job taught.
    #[arg(long, value_enum, default_value_t = WorldStudent::Chameleon)]
    pub student: WorldStudent,
    /// Student LoRA optimiser steps of every run.
    #[arg(long, default_value_t = 400)]
    pub student_steps: u64,
    /// Evaluation images per prompt.
    #[arg(long, default_value_t = 2)]
    pub eval_images: usize,
    /// Evaluate only the first this many prompts.
    #[arg(long)]
    pub eval_prompts: Option<usize>,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// One run's replay settings, writing to `<out>/<name>`.
fn replay_args(args: &AblateArgs, name: &str, first: Option<usize>, no_filter: bool) -> ReplayArgs {
    ReplayArgs {
        corpus: args.corpus.clone(),
        version: args.version.clone(),
        min_fidelity: None,
        min_prompt_adherence: None,
        no_filter,
        first,
        out: args.out.join(name),
        world: args.world.clone(),
        world_seed: args.world_seed,
        student: args.student,
        student_steps: args.student_steps,
        eval_images: args.eval_images,
        eval_prompts: args.eval_prompts,
        device: args.device.clone(),
    }
}

/// The scores a run's report holds, as one row of the ablation's table.
fn row(name: &str, report: &serde_json::Value) -> serde_json::Value {
    let scores = &report["evaluation"][0]["scores"];
    serde_json::json!({
        "run": name,
        "rows_trained_on": report["rows_trained_on"],
        "selection": report["selection"],
        "metrics": scores["metrics"],
        "context_accuracy": scores["context_accuracy"],
        "subject_colour_present": scores["subject_colour_present"],
        "by_prompt_kind": scores["by_prompt_kind"],
    })
}

/// Runs the ablations (Ctrl-C cancels the run in progress); returns the process exit code.
pub async fn run(args: AblateArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        !args.sizes.is_empty() && !args.sizes.contains(&0),
        "--sizes: positive counts, at least one"
    );
    let (version, _, kept) = replay::check(&replay_args(&args, "check", None, false)).await?;
    let (_, _, stored) = replay::check(&replay_args(&args, "check", None, true)).await?;
    // Each distinct count once; counts at or beyond the kept proxies are the whole kept set.
    let mut sizes: Vec<usize> = args.sizes.iter().map(|&n| n.min(kept)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut runs: Vec<(String, Option<usize>, bool)> =
        sizes.iter().map(|&n| (format!("first_{n}"), (n < kept).then_some(n), false)).collect();
    if sizes.last() != Some(&kept) {
        runs.push(("filter_on".into(), None, false));
    }
    runs.push(("filter_off".into(), None, true));
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: cannot create it", args.out.display()))?;
    let (cancel, commands) = tokio::sync::watch::channel(JobCommand::Run);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = cancel.send(JobCommand::Cancel);
        }
    });
    let mut rows = Vec::new();
    for (name, first, no_filter) in &runs {
        eprintln!("proxytune: ablation `{name}`");
        let replay = replay_args(&args, name, *first, *no_filter);
        let code = replay::execute(&replay, commands.clone(), None, &ProgressHandle::default()).await?;
        if code != 0 {
            return Ok(code);
        }
        let path = replay.out.join("report.json");
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("{}: not the replay's report", path.display()))?;
        rows.push(row(name, &report));
    }
    let scaling: Vec<&serde_json::Value> = rows.iter().filter(|r| r["selection"] == "keep = true").collect();
    let metric_series: Vec<(&str, Vec<(f64, f64)>)> = ["DINO", "CLIP-I", "CLIP-T"]
        .into_iter()
        .map(|m| {
            let points = scaling
                .iter()
                .filter_map(|r| Some((r["rows_trained_on"].as_f64()?, r["metrics"][m].as_f64()?)))
                .collect();
            (m, points)
        })
        .collect();
    let svg = crate::plots::scaling_svg(&metric_series, "kept proxies trained on", 720, 420)?;
    if let Some(svg) = &svg {
        std::fs::write(args.out.join("data_scaling.svg"), svg)?;
    }
    let filter_on = rows
        .iter()
        .find(|r| r["selection"] == "keep = true" && r["rows_trained_on"].as_u64() == Some(kept as u64));
    let filter_off = rows.iter().find(|r| r["run"] == "filter_off");
    let report = serde_json::json!({
        "corpus": args.corpus.display().to_string(),
        "proxies_version": version,
        "kept_proxies": kept,
        "stored_proxies": stored,
        "student": args.student,
        "student_steps": args.student_steps,
        "data_scaling": scaling,
        "filter": { "on": filter_on, "off": filter_off },
        "plot": svg.as_ref().map(|_| "data_scaling.svg"),
    });
    std::fs::write(args.out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    println!("| run | rows | DINO | CLIP-I | CLIP-T | context | colour |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let f =
            |v: &serde_json::Value, d: usize| v.as_f64().map_or("–".to_string(), |x| format!("{x:.d$}"));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r["run"].as_str().unwrap_or_default(),
            r["rows_trained_on"],
            f(&r["metrics"]["DINO"], 3),
            f(&r["metrics"]["CLIP-I"], 3),
            f(&r["metrics"]["CLIP-T"], 3),
            f(&r["context_accuracy"], 2),
            f(&r["subject_colour_present"], 2)
        );
    }
    Ok(0)
}
