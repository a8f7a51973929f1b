//! `proxytune bench pipeline`: the mission's central claim measured as time. One job (the world
//! preset through `proxytune demo`, or a job spec through `proxytune run`), the same budgets, run
//! twice on the same machine:
//!
//! - **streaming**, as jobs run: the student trains on kept proxies while the sampler still
//!   produces them;
//! - **stage by stage**: every proxy first, then all the training (the student waits for its
//!   whole input: `--student-min-rows`, or the spec's `student.rows_to_start`, beyond any corpus,
//!   so its first step comes once the stream has ended; the same code, the same rows).
//!
//! For each: the pipeline's wall time, the time to the first student step, and how long after the
//! first token rows and after the rows it waits for (`--student-min-rows`) were tokenized it came; the tuned student's evaluation scores (data order differs between
//! the two, so quality is reported, not asserted); and each actor's busy seconds. With the sampler
//! and the student on separate devices the ideal is max(generation, training) against their sum;
//! the streaming run's generation and training busy times give that model's figures and the
//! pipeline's wall time against it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Value};

/// Arguments of `proxytune bench pipeline`.
#[derive(Debug, clap::Args)]
pub struct PipelineArgs {
    /// Run this job spec (`proxytune run`'s TOML) instead of the world preset; its own budgets,
    /// devices and `student.rows_to_start` apply, and the world options below are ignored.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// The world's pretrained models.
    #[arg(long, default_value = "models/world")]
    world: PathBuf,
    /// The world subject of the job.
    #[arg(long, default_value = "dog_2")]
    subject: String,
    /// Class-prior images.
    #[arg(long, default_value_t = 16)]
    class_priors: usize,
    /// Supervisor DreamBooth steps.
    #[arg(long, default_value_t = 100)]
    supervisor_steps: u64,
    /// Proxies per prompt (16 prompts).
    #[arg(long, default_value_t = 8)]
    proxies_per_prompt: u32,
    /// Student LoRA steps.
    #[arg(long, default_value_t = 200)]
    student_steps: u64,
    /// Kept proxies before the streaming student's first step (8, the proxy writer's commit: the
    /// first committed batch can start it).
    #[arg(long, default_value_t = 8)]
    student_min_rows: usize,
    /// Evaluation images per prompt.
    #[arg(long, default_value_t = 1)]
    eval_images: usize,
    /// Evaluate the first this many prompts.
    #[arg(long, default_value_t = 4)]
    eval_prompts: usize,
    /// Device of the jobs: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Torch threads a call while the jobs' pipelines run (the spec's `devices.cpu_threads`,
    /// demo's `--cpu-threads`; default: half the cores on the CPU, so on 2 cores the sampler and
    /// the student each compute on one core at the same time, as on two devices).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    cpu_threads: Option<u64>,
    /// Where the two jobs write (a temporary folder, removed after, when absent).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The JSON report.
    #[arg(long, default_value = "bench-pipeline.json")]
    out: PathBuf,
}

/// Rows the stage-by-stage student waits for before its first step: more than any job keeps, so
/// it starts when its input ends.
const WHOLE_INPUT: usize = 1_000_000_000;

/// Runs the benchmark.
pub fn run(args: PipelineArgs) -> anyhow::Result<()> {
    let scratch = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("proxytune-bench-pipeline-{}", std::process::id())),
    };
    std::fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let result = (|| -> anyhow::Result<Value> {
        let streaming = job(&args, &scratch.join("streaming"), None)?;
        let staged = job(&args, &scratch.join("staged"), Some(WHOLE_INPUT))?;
        Ok(compare(&streaming, &staged))
    })();
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let report = result?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("{}", table(&report));
    println!("report: {}", args.out.display());
    Ok(())
}

/// Runs one job (the spec's through `proxytune run`, else the world preset through `proxytune
/// demo`) into `out`, the student waiting for `min_rows` kept proxies when given, and returns its
/// report.
fn job(args: &PipelineArgs, out: &Path, min_rows: Option<usize>) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("the proxytune binary")?;
    let mut command = std::process::Command::new(exe);
    let wanted = match &args.spec {
        Some(path) => {
            // The spec with its paths made absolute, written out with this run's output folder.
            let mut spec = crate::job::spec::JobSpec::read(path)?;
            spec.output = out.to_path_buf();
            if let Some(rows) = min_rows {
                spec.student.rows_to_start = rows;
            }
            if let Some(n) = args.cpu_threads {
                spec.devices.cpu_threads = Some(n as usize);
            }
            let wanted = spec.student.rows_to_start;
            std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
            let written = out.with_extension("toml");
            let text = toml::to_string(&spec)
                .with_context(|| format!("{}: cannot write it back", path.display()))?;
            std::fs::write(&written, text).with_context(|| written.display().to_string())?;
            command.arg("run").arg(&written);
            wanted
        }
        None => {
            world_job(args, &mut command, out, min_rows);
            min_rows.unwrap_or(args.student_min_rows)
        }
    };
    let output = command.output().context("cannot run the job")?;
    anyhow::ensure!(
        output.status.success(),
        "the job in {} failed: {}",
        out.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let path = out.join("report/report.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let mut report: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    // When the rows the student waits for were all tokenized: its first step cannot come sooner.
    let created = tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let corpus = proxytune_actors::corpus::Corpus::open(out.join("corpus"))?;
        let table = corpus.table::<proxytune_schemas::VqTokens>().await?;
        anyhow::Ok(table.timestamps("created_at").await?)
    })?;
    let mut created = created;
    created.sort_unstable();
    let ready = created.get(wanted.min(created.len()).saturating_sub(1)).copied();
    report["rows_ready_at_us"] = json!(ready);
    Ok(report)
}

/// The `proxytune demo` arguments of the world preset's job.
fn world_job(args: &PipelineArgs, command: &mut std::process::Command, out: &Path, min_rows: Option<usize>) {
    command
        .arg("demo")
        .arg("--out")
        .arg(out)
        .arg("--world")
        .arg(&args.world)
        .args(["--subject", &args.subject, "--device", &args.device, "--no-metrics", "--no-baselines"])
        .args(["--class-priors", &args.class_priors.to_string()])
        .args(["--supervisor-steps", &args.supervisor_steps.to_string()])
        .args(["--proxies-per-prompt", &args.proxies_per_prompt.to_string()])
        .args(["--student-steps", &args.student_steps.to_string()])
        .args(["--eval-images", &args.eval_images.to_string()])
        .args(["--eval-prompts", &args.eval_prompts.to_string()]);
    let rows = min_rows.unwrap_or(args.student_min_rows);
    command.args(["--student-min-rows", &rows.to_string()]);
    if let Some(n) = args.cpu_threads {
        command.args(["--cpu-threads", &n.to_string()]);
    }
}

/// One run's figures: wall time, the first step against the pipeline's start and the first
/// token rows, busy times, the tuned student's scores.
fn figures(report: &Value) -> Value {
    let us = |v: &Value| v.as_i64();
    let started = us(&report["pipeline_started_at_us"]).unwrap_or(0);
    let stages = &report["stages"];
    let first_step = us(&stages["student"]["first_step_at_us"]);
    let first_tokens = us(&stages["vq_tokens"]["first_at_us"]);
    let rows_ready = us(&report["rows_ready_at_us"]);
    let last_proxy = us(&stages["proxies"]["last_generated_at_us"]);
    let supervisor_ready = us(&stages["supervisor"]["ready_at_us"]);
    let ended = report["pipeline_seconds"].as_f64().map(|s| started + (s * 1e6) as i64);
    let seconds = |t: Option<i64>| t.map(|t| (t - started) as f64 / 1e6);
    let busy = &report["busy_seconds"];
    let models = report["evaluation"]["models"].as_array().cloned().unwrap_or_default();
    let tuned = models.last().map(|m| m["scores"]["metrics"].clone()).unwrap_or(Value::Null);
    json!({
        "wall_s": report["pipeline_seconds"],
        "first_step_s": seconds(first_step),
        "first_tokens_s": seconds(first_tokens),
        "first_step_after_first_tokens_s": first_step.zip(first_tokens).map(|(a, b)| (a - b) as f64 / 1e6),
        "rows_ready_s": seconds(rows_ready),
        "first_step_after_rows_ready_s": first_step.zip(rows_ready).map(|(a, b)| (a - b) as f64 / 1e6),
        "last_proxy_s": seconds(last_proxy),
        "supervisor_ready_s": seconds(supervisor_ready),
        "after_tuning_wall_s": ended.zip(supervisor_ready).map(|(e, r)| (e - r) as f64 / 1e6),
        "steps_per_second": stages["student"]["steps_per_second"],
        "steps_before_last_proxy": stages["student"]["steps_before_last_proxy"],
        "generation_busy_s": busy["proxy_generator"],
        "training_busy_s": busy["ar_trainer"],
        "busy_seconds": busy,
        "tuned_student": tuned,
    })
}

fn compare(streaming: &Value, staged: &Value) -> Value {
    let (s, t) = (figures(streaming), figures(staged));
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let (generation, training) = (f(&s, "generation_busy_s"), f(&s, "training_busy_s"));
    let ideal = generation.max(training);
    json!({
        "streaming": s,
        "stage_by_stage": t,
        "wall_ratio": f(&s, "wall_s") / f(&t, "wall_s"),
        "one_step_s": 1.0 / f(&s, "steps_per_second"),
        "two_devices": {
            "generation_busy_s": generation,
            "training_busy_s": training,
            "ideal_s": ideal,
            "sum_s": generation + training,
            "ideal_over_sum": ideal / (generation + training),
            "streaming_wall_over_ideal": f(&s, "wall_s") / ideal,
            "streaming_after_tuning_over_ideal": f(&s, "after_tuning_wall_s") / ideal,
        },
    })
}

fn table(r: &Value) -> String {
    let n = |v: &Value| v.as_f64().map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let mut out = String::from("                          streaming  stage by stage\n");
    for (label, key) in [
        ("pipeline wall (s)", "wall_s"),
        ("first student step (s)", "first_step_s"),
        ("first token rows (s)", "first_tokens_s"),
        ("step after first rows (s)", "first_step_after_first_tokens_s"),
        ("rows to start ready (s)", "rows_ready_s"),
        ("step after rows ready (s)", "first_step_after_rows_ready_s"),
        ("last proxy (s)", "last_proxy_s"),
        ("supervisor ready (s)", "supervisor_ready_s"),
        ("wall after tuning (s)", "after_tuning_wall_s"),
        ("generation busy (s)", "generation_busy_s"),
        ("training busy (s)", "training_busy_s"),
    ] {
        out += &format!("{label:<26}{:>9}  {:>14}\n", n(&r["streaming"][key]), n(&r["stage_by_stage"][key]));
    }
    // The metrics the jobs measured (FEAT-I always; DINO and CLIP where the job has their models).
    for metric in ["DINO", "CLIP-I", "CLIP-T", "FEAT-I"] {
        if ["streaming", "stage_by_stage"].iter().all(|run| r[run]["tuned_student"][metric].is_null()) {
            continue;
        }
        let score = |v: &Value| v.as_f64().map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
        out += &format!(
            "{:<26}{:>9}  {:>14}\n",
            format!("tuned student {metric}"),
            score(&r["streaming"]["tuned_student"][metric]),
            score(&r["stage_by_stage"]["tuned_student"][metric])
        );
    }
    let d = &r["two_devices"];
    out += &format!(
        "pipeline wall (tuning included), streaming / stage by stage: {:.2}; one student step {:.2} s\n",
        r["wall_ratio"].as_f64().unwrap_or(f64::NAN),
        r["one_step_s"].as_f64().unwrap_or(f64::NAN)
    );
    out += &format!(
        "two devices: generation {:.1} s, training {:.1} s busy; ideal max {:.1} s against their sum {:.1} s ({:.2}); this machine's streaming pipeline wall is {:.2}x that ideal with tuning, {:.2}x from the supervisor ready on\n",
        d["generation_busy_s"].as_f64().unwrap_or(f64::NAN),
        d["training_busy_s"].as_f64().unwrap_or(f64::NAN),
        d["ideal_s"].as_f64().unwrap_or(f64::NAN),
        d["sum_s"].as_f64().unwrap_or(f64::NAN),
        d["ideal_over_sum"].as_f64().unwrap_or(f64::NAN),
        d["streaming_wall_over_ideal"].as_f64().unwrap_or(f64::NAN),
        d["streaming_after_tuning_over_ideal"].as_f64().unwrap_or(f64::NAN)
    );
    out
}
