//! Benchmarks. `proxytune bench unet` and `proxytune bench ar` time the supervisor's UNet and the
//! AR student here against the Python reference on the same machine in one run (ratios printed);
//! `proxytune bench runtime`: what the streaming runtime costs next to the work it carries.
//!
//! Every figure is measured in one run, side by side, on 256-row batches of the proxy schema with
//! ~4 KiB PNG payloads (prebuilt, so batch construction is not counted):
//! 1. a no-op pipeline (source → pass-through → sink): rows/s and per-batch overhead;
//! 2. the same with a stage that works `work_ms` per batch: wall time against the stage's own busy
//!    time — the runtime's overhead in percent (goal: under 2 % at 10 ms);
//! 3. the Lance corpus sink against writing the same payload bytes to a plain file;
//! 4. peak resident memory after streaming `batches` and then 100× `batches` freshly built batches
//!    through the pipeline: bounded by the edge capacities, not by the volume.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use arrow_array::RecordBatch;
use proxytune_actors::corpus::writer::{LanceWriter, LanceWriterConfig};
use proxytune_actors::corpus::Corpus;
use proxytune_actors::runtime::synthetic::{Discard, PassThrough, SyntheticConfig, SyntheticProxies};
use proxytune_actors::runtime::{
    Context, JobOutcome, Metrics, Operator, Output, Pipeline, PipelineConfig, Produced, Source,
};
use serde::Serialize;

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// The streaming runtime: per-batch overhead, overhead next to a 10 ms stage, Lance sink vs a file.
    Runtime(RuntimeArgs),
    /// A ~35 M-parameter UNet: sampling step and train step (forward and backward apart) here vs
    /// diffusers (PyTorch) on the same machine and libtorch, alternating sides over several rounds.
    Unet(UnetArgs),
    /// A ~50 M-parameter Chameleon student: KV-cached generation (tokens/s) and train step here vs
    /// transformers (PyTorch) on the same weights, machine and libtorch, in one run.
    Ar(CompareArgs),
    /// Loading a sharded bfloat16 checkpoint: proxytune's tensor-by-tensor loader against reading
    /// whole shards, peak memory and time, each in its own process.
    Load(crate::bench_load::LoadArgs),
    /// SD 1.5, SDXL and Chameleon-7B at their published sizes with random weights: sharded load,
    /// LoRA training steps with and without activation checkpointing, CFG sampling; JSON and a table.
    RealSize(crate::bench_real::RealSizeArgs),
    /// The daemon under faults and load through its binary: world jobs run alone, under polling
    /// clients (latency, errors, slowdown), and under random SIGKILLs (same outcomes?).
    Soak(crate::bench_soak::SoakArgs),
    /// Images per second of the student's batched sampler and the supervisor's at several batch
    /// sizes, against transformers' `generate` and diffusers' pipeline on the same machine.
    Sample(crate::bench_sample::SampleArgs),
    /// One world job run streaming and stage by stage: wall time, time to the first student step,
    /// busy times and the two-device model, the tuned student's scores.
    Pipeline(crate::bench_pipeline::PipelineArgs),
}

/// Arguments of `proxytune bench unet` and `proxytune bench ar`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Timed iterations per measurement (after one warm-up); medians are reported.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Python with torch, diffusers and transformers ($PROXYTUNE_PYTHON).
    #[arg(long, env = "PROXYTUNE_PYTHON")]
    python: PathBuf,
    /// Device for the Rust side: auto, cpu, cuda, cuda:N (the Python side runs on CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Arguments of `proxytune bench unet`.
#[derive(Debug, clap::Args)]
pub struct UnetArgs {
    #[command(flatten)]
    compare: CompareArgs,
    /// Rounds, each timing diffusers and then proxytune; the medians over rounds are compared.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the JSON report goes.
    #[arg(long, default_value = "bench-unet.json")]
    out: PathBuf,
}

/// Runs `tools/bench/<script> <dir> <iters>` with the reference's Python and reads the one JSON
/// line it prints (`side` names it in errors).
fn reference_side(
    args: &CompareArgs,
    script: &str,
    dir: &std::path::Path,
    side: &str,
) -> anyhow::Result<serde_json::Value> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench").join(script);
    let out = std::process::Command::new(&args.python)
        .arg(&script)
        .arg(dir)
        .arg(args.iters.to_string())
        .output()?;
    anyhow::ensure!(out.status.success(), "{side} side failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(out.stdout.trim_ascii()).with_context(|| format!("{side} side: not JSON"))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn median_seconds(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// One side's medians of a round (seconds): a sampling step, and a train step's forward, backward
/// and whole (gradients cleared, forward, MSE, backward); proxytune's side also a train step whose
/// gradients autograd returns instead of adding them into the parameters' zeroed ones.
#[derive(Clone, Copy, Debug)]
struct UnetTimes {
    sample: f64,
    forward: f64,
    backward: f64,
    train: f64,
    train_returned: f64,
}

impl UnetTimes {
    fn median_over(rounds: &[UnetTimes]) -> UnetTimes {
        let of = |f: fn(&UnetTimes) -> f64| median(rounds.iter().map(f).collect());
        UnetTimes {
            sample: of(|t| t.sample),
            forward: of(|t| t.forward),
            backward: of(|t| t.backward),
            train: of(|t| t.train),
            train_returned: of(|t| t.train_returned),
        }
    }
}

/// Runs the UNet benchmark: each round times diffusers (which also writes the shared config) and
/// then tch; the medians over rounds are compared, phase by phase.
pub fn unet(args: UnetArgs) -> anyhow::Result<()> {
    use proxytune_models::diffusion::unet::{UNet2DConditionModel, UNetConfig};
    let UnetArgs { compare: args, rounds, out: report_path } = args;
    anyhow::ensure!(rounds >= 1 && args.iters >= 1, "--rounds and --iters must be at least 1");
    let dir = tempfile_dir()?;
    let diffusers_round = || -> anyhow::Result<(UnetTimes, serde_json::Value)> {
        let py = reference_side(&args, "unet_diffusers.py", &dir, "diffusers")?;
        let field =
            |k: &str| py[k].as_f64().ok_or_else(|| anyhow::anyhow!("diffusers side: no `{k}` in {py}"));
        let times = UnetTimes {
            sample: field("sample_step_s")?,
            forward: field("train_forward_s")?,
            backward: field("train_backward_s")?,
            train: field("train_step_s")?,
            train_returned: f64::NAN,
        };
        Ok((times, py))
    };
    let (first, py) = diffusers_round()?;
    let cfg = UNetConfig::from_json(&dir.join("config.json"))?;
    let device = proxytune_models::device::parse_device(&args.device)?;
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(device);
    let unet = UNet2DConditionModel::new(vs.root(), &cfg)?;
    let params: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    let opts = (tch::Kind::Float, device);
    let x = tch::Tensor::randn([2, 4, 32, 32], opts);
    let t = tch::Tensor::from_slice(&[500i64, 500]).to_device(device);
    let ctx = tch::Tensor::randn([2, 77, 256], opts);
    let target = tch::Tensor::randn([2, 4, 32, 32], opts);
    let sync = || {
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let vars = vs.trainable_variables();
    let tch_round = || {
        let sample = median_seconds(args.iters, || {
            let _ = tch::no_grad(|| unet.forward(&x, &t, &ctx, None)).expect("forward");
            sync();
        });
        // A train step as diffusers' side takes it: gradients cleared, forward, MSE, backward.
        let mut phases = Vec::new();
        for i in 0..=args.iters {
            let t0 = Instant::now();
            for v in &vars {
                v.shallow_clone().zero_grad();
            }
            let loss =
                unet.forward(&x, &t, &ctx, None).expect("forward").mse_loss(&target, tch::Reduction::Mean);
            sync();
            let t1 = Instant::now();
            loss.backward();
            sync();
            let t2 = Instant::now();
            if i > 0 {
                phases.push(((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t2 - t0).as_secs_f64()));
            }
        }
        // The same step with the gradients returned by autograd (`autograd::grad`): no zeroed
        // buffers to clear and add into, what diffusers' `zero_grad(set_to_none=True)` gets.
        let train_returned = median_seconds(args.iters, || {
            let loss =
                unet.forward(&x, &t, &ctx, None).expect("forward").mse_loss(&target, tch::Reduction::Mean);
            drop(tch::Tensor::run_backward(&[&loss], &vars, false, false));
            sync();
        });
        UnetTimes {
            sample,
            train_returned,
            forward: median(phases.iter().map(|p| p.0).collect()),
            backward: median(phases.iter().map(|p| p.1).collect()),
            train: median(phases.iter().map(|p| p.2).collect()),
        }
    };
    let (mut py_rounds, mut tch_rounds) = (vec![first], vec![tch_round()]);
    for _ in 1..rounds {
        py_rounds.push(diffusers_round()?.0);
        tch_rounds.push(tch_round());
    }
    println!(
        "unet bench: {:.1} M params here, {:.1} M in diffusers; 2 x 4 x 32 x 32 latents, 77 x 256 context; \
         medians of {} steps a round, then over {rounds} rounds (diffusers, then proxytune, each round); \
         proxytune on {device:?}, diffusers on cpu with {} threads",
        params as f64 / 1e6,
        py["params"].as_f64().unwrap_or(0.0) / 1e6,
        args.iters,
        py["threads"],
    );
    let (here, there) = (UnetTimes::median_over(&tch_rounds), UnetTimes::median_over(&py_rounds));
    // Each row: proxytune's time, diffusers' time (their train step for the last row).
    type Of = fn(&UnetTimes) -> f64;
    let rows: [(&str, Of, Of); 5] = [
        ("sampling step", |t| t.sample, |t| t.sample),
        ("train step", |t| t.train, |t| t.train),
        ("  forward", |t| t.forward, |t| t.forward),
        ("  backward", |t| t.backward, |t| t.backward),
        ("train step, gradients returned", |t| t.train_returned, |t| t.train),
    ];
    println!("  {:<31} {:>10} {:>10} {:>7}   ratio each round", "", "proxytune", "diffusers", "ratio");
    let mut json_rows = Vec::new();
    for (name, ours, theirs) in rows {
        let each: Vec<f64> = tch_rounds.iter().zip(&py_rounds).map(|(a, b)| ours(a) / theirs(b)).collect();
        let (a, b) = (ours(&here), theirs(&there));
        println!(
            "  {name:<31} {a:>8.3} s {b:>8.3} s {:>7.2}   {}",
            a / b,
            each.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" ")
        );
        json_rows.push(serde_json::json!({
            "measure": name.trim(), "proxytune_s": a, "diffusers_s": b, "ratio": a / b, "ratio_each_round": each,
        }));
    }
    let report = serde_json::json!({
        "params": params, "device": format!("{device:?}"), "diffusers_threads": py["threads"],
        "iters": args.iters, "rounds": rounds, "rows": json_rows,
    });
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| report_path.display().to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Runs the AR benchmark: transformers first (it writes the shared weights), then tch.
pub fn ar(args: CompareArgs) -> anyhow::Result<()> {
    use proxytune_models::ar::generate::{generate, Allowed, TokenSampling};
    use proxytune_models::ar::lumina::LuminaTokens;
    use proxytune_models::ar::train::{ArTrainer, ChameleonStudent};
    let dir = tempfile_dir()?;
    let py = reference_side(&args, "ar_transformers.py", &dir, "transformers")?;
    let device = proxytune_models::device::parse_device(&args.device)?;
    let student = ChameleonStudent::load(&dir, device, None, LuminaTokens::default())?;
    let new_tokens = py["new_tokens"].as_u64().unwrap_or(256) as usize;
    let prompt = tch::Tensor::randint_low(5, 64, [1, 32], (tch::Kind::Int64, device));
    let seqs = tch::Tensor::randint_low(5, 64, [2, 32 + new_tokens as i64], (tch::Kind::Int64, device));
    let greedy = TokenSampling { greedy: true, ..Default::default() };
    let sync = || {
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let generate_s = median_seconds(args.iters, || {
        let tokens = generate(&student.model, &prompt, None, new_tokens, &greedy, 0, |_| Allowed::Any)
            .expect("generate");
        assert_eq!(tokens.len(), new_tokens);
        sync();
    });
    let vars = student.base.trainable_variables();
    let train_s = median_seconds(args.iters, || {
        for mut v in vars.iter().map(|v| v.shallow_clone()) {
            v.zero_grad();
        }
        let (ce, _) = ArTrainer::losses(&student, &seqs, &seqs).expect("loss");
        ce.backward();
        sync();
    });
    let (py_gen, py_train) =
        (py["generate_s"].as_f64().unwrap_or(f64::NAN), py["train_step_s"].as_f64().unwrap_or(f64::NAN));
    println!(
        "ar bench: Chameleon {:.1} M params (decoder); {new_tokens} tokens after a 32-token prompt; train on 2 x {} tokens; median of {}",
        py["params"].as_f64().unwrap_or(0.0) / 1e6,
        32 + new_tokens,
        args.iters
    );
    println!(
        "  generation (KV cache) : tch {:.1} tokens/s ({:?})  transformers {:.1} tokens/s (cpu, {} threads)  time ratio {:.2}",
        new_tokens as f64 / generate_s,
        device,
        new_tokens as f64 / py_gen,
        py["threads"],
        generate_s / py_gen
    );
    println!(
        "  train step            : tch {:.3} s ({:?})  transformers {:.3} s (cpu, {} threads)  ratio {:.2}",
        train_s,
        device,
        py_train,
        py["threads"],
        train_s / py_train
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("proxytune-bench-unet-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Arguments of `proxytune bench runtime`.
#[derive(Debug, clap::Args)]
pub struct RuntimeArgs {
    /// Batches per measurement.
    #[arg(long, default_value_t = 100)]
    batches: u64,
    /// Rows per batch.
    #[arg(long, default_value_t = 256)]
    batch_rows: usize,
    /// PNG payload bytes per row.
    #[arg(long, default_value_t = 4096)]
    payload_bytes: usize,
    /// Simulated compute of the working stage, per batch.
    #[arg(long, default_value_t = 10)]
    work_ms: u64,
    /// Edge capacity in rows.
    #[arg(long, default_value_t = 1024)]
    capacity_rows: usize,
    /// Scratch directory for the Lance and file measurements (a temporary one by default).
    #[arg(long)]
    scratch: Option<PathBuf>,
}

/// Emits prebuilt batches.
struct Prebuilt {
    batches: std::vec::IntoIter<RecordBatch>,
}

impl Source for Prebuilt {
    fn produce(&mut self, _: &mut Context, out: &mut Output) -> proxytune_actors::Result<Produced> {
        match self.batches.next() {
            Some(b) => {
                out.emit(b);
                Ok(Produced::More)
            }
            None => Ok(Produced::Done),
        }
    }
}

/// Sleeps `work` per batch and records the time spent inside its calls.
struct TimedWork {
    inner: PassThrough,
    busy_ns: Arc<AtomicU64>,
}

impl Operator for TimedWork {
    fn process_batch(
        &mut self,
        i: usize,
        b: RecordBatch,
        ctx: &mut Context,
        out: &mut Output,
    ) -> proxytune_actors::Result<()> {
        let t = Instant::now();
        let r = self.inner.process_batch(i, b, ctx, out);
        self.busy_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

/// Peak resident set size of this process so far, in bytes (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|kb| kb * 1024)
}

/// [`status_kib`], 0 where it cannot be read.
pub(crate) fn status_kib_or_0(field: &str) -> u64 {
    status_kib(field).unwrap_or(0)
}

/// A `kB` field of this process's `/proc/self/status` (`VmRSS:`, `VmHWM:`), Linux only.
pub(crate) fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Streams `batches` freshly generated batches through source -> pass -> sink.
async fn stream_generated(cfg: &PipelineConfig, args: &RuntimeArgs, batches: u64) -> anyhow::Result<u64> {
    let (source, produced) = SyntheticProxies::new(SyntheticConfig {
        batch_rows: args.batch_rows,
        batches: Some(batches),
        payload_bytes: args.payload_bytes,
        ..Default::default()
    });
    let mut p = Pipeline::new(cfg.clone(), Metrics::noop());
    let src = p.source("gen", source);
    let mid = p.operator("pass", PassThrough::default());
    let sink = p.operator("sink", Discard);
    p.connect(src, mid).connect(mid, sink);
    let report = p.start(&tokio::runtime::Handle::current())?.wait().await;
    anyhow::ensure!(report.outcome == JobOutcome::Succeeded, "memory pipeline ended {:?}", report.outcome);
    Ok(produced.load(Ordering::SeqCst))
}

#[derive(Debug, Serialize)]
struct RuntimeReport {
    peak_rss_mb_after_small: f64,
    peak_rss_mb_after_100x: f64,
    rows_small: u64,
    rows_100x: u64,
    batches: u64,
    batch_rows: usize,
    payload_bytes_per_row: usize,
    batch_bytes: usize,
    noop_rows_per_second: f64,
    noop_overhead_ms_per_batch: f64,
    work_ms_per_batch: u64,
    work_stage_busy_seconds: f64,
    work_pipeline_wall_seconds: f64,
    runtime_overhead_percent: f64,
    lance_sink_seconds: f64,
    lance_sink_mb_per_second: f64,
    raw_file_seconds: f64,
    raw_file_mb_per_second: f64,
    lance_over_raw_ratio: f64,
}

async fn run_pipeline(
    cfg: &PipelineConfig,
    batches: Vec<RecordBatch>,
    work: Option<(u64, Arc<AtomicU64>)>,
) -> anyhow::Result<Duration> {
    let mut p = Pipeline::new(cfg.clone(), Metrics::noop());
    let src = p.source("gen", Prebuilt { batches: batches.into_iter() });
    let mid = match work {
        Some((ms, busy)) => {
            p.operator("work", TimedWork { inner: PassThrough { work_ms: ms }, busy_ns: busy })
        }
        None => p.operator("pass", PassThrough::default()),
    };
    let sink = p.operator("sink", Discard);
    p.connect(src, mid).connect(mid, sink);
    let started = Instant::now();
    let report = p.start(&tokio::runtime::Handle::current())?.wait().await;
    anyhow::ensure!(report.outcome == JobOutcome::Succeeded, "bench pipeline ended {:?}", report.outcome);
    Ok(started.elapsed())
}

/// Runs the runtime benchmark and prints its table (and the JSON report).
pub async fn runtime(args: RuntimeArgs) -> anyhow::Result<()> {
    let cfg = PipelineConfig { edge_capacity_rows: args.capacity_rows.try_into()?, ..Default::default() };
    // 4 first, before anything else is resident: memory against volume.
    let rows_small = stream_generated(&cfg, &args, args.batches).await?;
    let rss_small = peak_rss_bytes().unwrap_or(0);
    let rows_100x = stream_generated(&cfg, &args, args.batches * 100).await?;
    let rss_100x = peak_rss_bytes().unwrap_or(0);
    let (gen, _) = SyntheticProxies::new(SyntheticConfig {
        batch_rows: args.batch_rows,
        batches: Some(args.batches),
        payload_bytes: args.payload_bytes,
        ..Default::default()
    });
    let batches: Vec<RecordBatch> = (0..args.batches).map(|n| gen.batch(n)).collect::<Result<_, _>>()?;
    let batch_bytes = batches[0].get_array_memory_size();
    let rows = args.batches * args.batch_rows as u64;

    // 1. No-op pipeline (warm up once, then measure).
    run_pipeline(&cfg, batches[..batches.len().min(8)].to_vec(), None).await?;
    let noop = run_pipeline(&cfg, batches.clone(), None).await?;

    // 2. A working stage.
    let busy = Arc::new(AtomicU64::new(0));
    let wall = run_pipeline(&cfg, batches.clone(), Some((args.work_ms, busy.clone()))).await?;
    let busy = Duration::from_nanos(busy.load(Ordering::Relaxed));

    // 3. Lance sink vs a plain file.
    let scratch = match &args.scratch {
        Some(p) => p.clone(),
        None => std::env::temp_dir().join(format!("proxytune-bench-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&scratch);
    let corpus = Corpus::open_or_create(scratch.join("corpus"))?;
    let (writer, stats) = LanceWriter::<proxytune_schemas::Proxy>::new(
        corpus,
        LanceWriterConfig { commit_every_rows: args.batch_rows * 8, ..Default::default() },
        &Metrics::noop(),
    );
    let mut p = Pipeline::new(cfg.clone(), Metrics::noop());
    let src = p.source("gen", Prebuilt { batches: batches.clone().into_iter() });
    let sink = p.async_operator("lance_writer", writer);
    p.connect(src, sink);
    let started = Instant::now();
    let report = p.start(&tokio::runtime::Handle::current())?.wait().await;
    let lance = started.elapsed();
    anyhow::ensure!(report.outcome == JobOutcome::Succeeded, "lance bench ended {:?}", report.outcome);
    anyhow::ensure!(stats.lock().expect("stats").written_rows == rows, "lance sink wrote {:?}", stats);

    let payload: u64 = batches.iter().map(|b| b.get_array_memory_size() as u64).sum();
    let file_path = scratch.join("raw.bin");
    let started = Instant::now();
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&file_path)?);
        for b in &batches {
            for column in b.columns() {
                for buffer in column.to_data().buffers() {
                    file.write_all(buffer.as_slice())?;
                }
            }
        }
        file.into_inner()?.sync_all()?;
    }
    let raw = started.elapsed();
    let _ = std::fs::remove_dir_all(&scratch);

    let mb = payload as f64 / 1e6;
    let report = RuntimeReport {
        peak_rss_mb_after_small: rss_small as f64 / 1e6,
        peak_rss_mb_after_100x: rss_100x as f64 / 1e6,
        rows_small,
        rows_100x,
        batches: args.batches,
        batch_rows: args.batch_rows,
        payload_bytes_per_row: args.payload_bytes,
        batch_bytes,
        noop_rows_per_second: rows as f64 / noop.as_secs_f64(),
        noop_overhead_ms_per_batch: noop.as_secs_f64() * 1e3 / args.batches as f64,
        work_ms_per_batch: args.work_ms,
        work_stage_busy_seconds: busy.as_secs_f64(),
        work_pipeline_wall_seconds: wall.as_secs_f64(),
        runtime_overhead_percent: (wall.as_secs_f64() - busy.as_secs_f64()) / busy.as_secs_f64() * 100.0,
        lance_sink_seconds: lance.as_secs_f64(),
        lance_sink_mb_per_second: mb / lance.as_secs_f64(),
        raw_file_seconds: raw.as_secs_f64(),
        raw_file_mb_per_second: mb / raw.as_secs_f64(),
        lance_over_raw_ratio: lance.as_secs_f64() / raw.as_secs_f64(),
    };
    println!(
        "runtime bench: {} batches x {} rows, ~{} B PNG per row ({:.1} MB in all)",
        args.batches, args.batch_rows, args.payload_bytes, mb
    );
    println!(
        "  no-op pipeline (3 actors) : {:>12.0} rows/s   {:.3} ms per batch",
        report.noop_rows_per_second, report.noop_overhead_ms_per_batch
    );
    println!(
        "  {} ms stage               : wall {:.3} s vs stage busy {:.3} s -> runtime overhead {:.2} %",
        args.work_ms,
        report.work_pipeline_wall_seconds,
        report.work_stage_busy_seconds,
        report.runtime_overhead_percent
    );
    println!(
        "  lance sink                : {:.3} s  {:>8.1} MB/s",
        report.lance_sink_seconds, report.lance_sink_mb_per_second
    );
    println!(
        "  raw file write (+fsync)   : {:.3} s  {:>8.1} MB/s",
        report.raw_file_seconds, report.raw_file_mb_per_second
    );
    println!("  lance / raw file          : {:.2}x", report.lance_over_raw_ratio);
    println!(
        "  peak RSS                  : {:.1} MB after {} rows, {:.1} MB after {} more rows (100x)",
        report.peak_rss_mb_after_small, rows_small, report.peak_rss_mb_after_100x, rows_100x
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
