//! `proxytune bench sample`: images per second of the job's two samplers at several batch sizes,
//! side by side with the reference way of sampling on the same machine, in one run.
//!
//! - **Student**: the ~50 M-parameter Chameleon of `bench ar` (random weights, written once by the
//!   Python side so both sample the very same model), a Lumina-mGPT image of `--grid`² codes with
//!   guidance 4 and image top-k 2000: proxytune's batched sampler
//!   ([`proxytune_models::ar::lumina::sample_image_tokens_batch`]) at each `--batches` size against
//!   transformers' `generate` one image at a time with its unbatched guidance processor
//!   (`tools/bench/sample_transformers.py`).
//! - **Supervisor**: the world's supervisor folder (diffusers layout), DDIM with guidance:
//!   [`proxytune_actors::stages::diffusion_sampling::sample_images`] against diffusers'
//!   `StableDiffusionPipeline` at the same batch sizes (`tools/bench/sample_diffusers.py`).
//!
//! Ratios are images per second over batch 1's and over the reference's. Output: a table on
//! stdout and the whole report as JSON (`--out`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use proxytune_actors::stages::diffusion_sampling::{load_supervisor, sample_images, SamplingConfig};
use proxytune_models::ar::lumina::{sample_image_tokens_batch, ImageSampling, LuminaTokens};
use proxytune_models::ar::train::ChameleonStudent;
use proxytune_models::diffusion::pipeline::SamplerKind;
use serde_json::{json, Value};

/// Arguments of `proxytune bench sample`.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// Python with torch, diffusers and transformers ($PROXYTUNE_PYTHON).
    #[arg(long, env = "PROXYTUNE_PYTHON")]
    python: PathBuf,
    /// Batch sizes (images sampled at once), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,16")]
    batches: Vec<usize>,
    /// The student's code grid side (a grid² image, plus a row break a row and the end).
    #[arg(long, default_value_t = 16)]
    grid: i64,
    /// Images the reference samples, one at a time (their mean time per image is reported).
    #[arg(long, default_value_t = 2)]
    reference_images: usize,
    /// The world's pretrained models (the supervisor folder is `<world>/supervisor`).
    #[arg(long, default_value = "models/world")]
    world: PathBuf,
    /// Denoising steps of a supervisor sample.
    #[arg(long, default_value_t = 25)]
    steps: i64,
    /// Timed supervisor calls per batch size after a warm-up (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Device of proxytune's side: auto, cpu, cuda, cuda:N (the Python side runs on the CPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The JSON report.
    #[arg(long, default_value = "bench-sample.json")]
    out: PathBuf,
}

/// The structure tokens of the bench vocabulary (`tools/bench/ar_transformers.py`).
fn bench_tokens() -> LuminaTokens {
    LuminaTokens {
        bos: 1,
        separator: 5,
        begin_image: 6,
        end_image: 7,
        new_line: 8,
        size_base: 9,
        codes_per_unit: 2,
    }
}

/// Runs a Python bench script and parses the JSON line it prints.
fn python(python: &Path, script: &str, args: &[String]) -> anyhow::Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench").join(script);
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("{}: cannot run {}", python.display(), script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).with_context(|| format!("{}: not JSON", script.display()))
}

fn sync(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Runs the benchmark.
pub fn run(args: SampleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.batches.is_empty() && args.batches.iter().all(|&b| b > 0),
        "--batches: give one or more sizes of at least 1"
    );
    anyhow::ensure!(args.grid > 0 && args.grid % 2 == 0, "--grid: a positive even number of codes");
    let device = proxytune_models::device::parse_device(&args.device)?;
    let student = student(&args, device)?;
    let supervisor = supervisor(&args, device)?;
    let report = json!({ "device": format!("{device:?}"), "student": student, "supervisor": supervisor });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("{}", table(&report));
    println!("report: {}", args.out.display());
    Ok(())
}

/// The student's rows: proxytune's batched sampler at each batch size, the reference's one at a
/// time.
fn student(args: &SampleArgs, device: tch::Device) -> anyhow::Result<Value> {
    let dir = std::env::temp_dir().join(format!("proxytune-bench-sample-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let loaded = python(
        &args.python,
        "sample_transformers.py",
        &[dir.display().to_string(), args.grid.to_string(), args.reference_images.to_string()],
    )
    .and_then(|reference| {
        let model = ChameleonStudent::load(&dir, device, None, bench_tokens())?;
        Ok((reference, model))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let (reference, model) = loaded?;
    let tokens = bench_tokens();
    // The reference's prompt: `<s>`, 32 text tokens, the separator.
    let text: Vec<i64> = (20..52).collect();
    let prompt = tokens.prompt_ids(&text);
    let sampling =
        ImageSampling { guidance_scale: 4.0, image_top_k: Some(2000), top_p: None, temperature: 1.0 };
    let reference_rate = 1.0 / reference["per_image_s"].as_f64().context("the reference's per_image_s")?;
    let mut rows = Vec::new();
    for &batch in &args.batches {
        let seeds: Vec<u64> = (0..batch as u64).collect();
        let prompts = vec![prompt.as_slice(); batch];
        let start = Instant::now();
        let grids = tch::no_grad(|| {
            sample_image_tokens_batch(
                &model.model,
                &tokens,
                &prompts,
                args.grid,
                args.grid,
                &sampling,
                &seeds,
            )
        })?;
        sync(device);
        let seconds = start.elapsed().as_secs_f64();
        anyhow::ensure!(grids.len() == batch, "{} grids for a batch of {batch}", grids.len());
        rows.push(json!({ "batch": batch, "call_s": seconds, "images_per_s": batch as f64 / seconds }));
    }
    let base = rows[0]["images_per_s"].as_f64().unwrap_or(f64::NAN);
    for row in &mut rows {
        let rate = row["images_per_s"].as_f64().unwrap_or(f64::NAN);
        row["vs_first_batch"] = json!(rate / base);
        row["vs_reference"] = json!(rate / reference_rate);
    }
    Ok(json!({
        "model": "Chameleon (bench ar's config), random weights",
        "params": reference["params"],
        "grid": args.grid,
        "tokens_per_image": reference["tokens_per_image"],
        "reference": { "way": "transformers generate, one image at a time, unbatched guidance processor",
                       "threads": reference["threads"], "images": reference["images"],
                       "images_per_s": reference_rate },
        "rows": rows,
    }))
}

/// The supervisor's rows: proxytune's sampler and diffusers' pipeline at each batch size.
fn supervisor(args: &SampleArgs, device: tch::Device) -> anyhow::Result<Value> {
    let folder = args.world.join("supervisor");
    anyhow::ensure!(
        folder.join("model_index.json").is_file(),
        "{}: not a diffusers folder",
        folder.display()
    );
    let resolution = 64;
    let guidance = 5.0;
    let batches: Vec<String> = args.batches.iter().map(usize::to_string).collect();
    let reference = python(
        &args.python,
        "sample_diffusers.py",
        &[
            folder.display().to_string(),
            resolution.to_string(),
            args.steps.to_string(),
            guidance.to_string(),
            batches.join(","),
            args.repeats.to_string(),
        ],
    )?;
    let mut rows = Vec::new();
    for (i, &batch) in args.batches.iter().enumerate() {
        let sampling = SamplingConfig {
            num_inference_steps: args.steps,
            guidance_scale: guidance,
            sampler: SamplerKind::Ddim,
            resolution,
            negative_prompt: String::new(),
            batch_images: batch,
            ..Default::default()
        };
        let sd = load_supervisor(&folder, None, &args.device, None, &sampling)?;
        let prompts = vec!["a photo of a dog"; batch];
        let seeds: Vec<u64> = (0..batch as u64).collect();
        let call = || -> anyhow::Result<f64> {
            let start = Instant::now();
            sample_images(&sd, &prompts, &seeds, &sampling)?;
            sync(device);
            Ok(start.elapsed().as_secs_f64())
        };
        call()?; // warm-up
        let mut times = (0..args.repeats.max(1)).map(|_| call()).collect::<anyhow::Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        let seconds = times[times.len() / 2];
        let theirs = reference["rows"][i]["images_per_s"].as_f64().unwrap_or(f64::NAN);
        let rate = batch as f64 / seconds;
        rows.push(json!({ "batch": batch, "call_s": seconds, "images_per_s": rate,
                          "reference_images_per_s": theirs, "vs_reference": rate / theirs }));
    }
    Ok(json!({
        "model": folder.display().to_string(),
        "resolution": resolution,
        "steps": args.steps,
        "guidance": guidance,
        "reference": { "way": "diffusers StableDiffusionPipeline, DDIM, float32, CPU", "threads": reference["threads"] },
        "rows": rows,
    }))
}

/// The report as a table.
fn table(report: &Value) -> String {
    let mut out = String::new();
    let s = &report["student"];
    out += &format!(
        "student: {:.1} M params, {} tokens an image; reference (transformers, one at a time): {:.3} images/s\n",
        s["params"].as_f64().unwrap_or(0.0) / 1e6,
        s["tokens_per_image"],
        s["reference"]["images_per_s"].as_f64().unwrap_or(f64::NAN)
    );
    out += "  batch  images/s  vs batch 1  vs reference\n";
    for r in s["rows"].as_array().into_iter().flatten() {
        out += &format!(
            "  {:>5}  {:>8.3}  {:>10.2}  {:>12.2}\n",
            r["batch"].as_u64().unwrap_or(0),
            r["images_per_s"].as_f64().unwrap_or(f64::NAN),
            r["vs_first_batch"].as_f64().unwrap_or(f64::NAN),
            r["vs_reference"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let v = &report["supervisor"];
    out += &format!(
        "supervisor: {} at {} px, {} DDIM steps; against diffusers' pipeline at the same batch\n",
        v["model"], v["resolution"], v["steps"]
    );
    out += "  batch  images/s  diffusers  vs diffusers\n";
    for r in v["rows"].as_array().into_iter().flatten() {
        out += &format!(
            "  {:>5}  {:>8.3}  {:>9.3}  {:>11.2}\n",
            r["batch"].as_u64().unwrap_or(0),
            r["images_per_s"].as_f64().unwrap_or(f64::NAN),
            r["reference_images_per_s"].as_f64().unwrap_or(f64::NAN),
            r["vs_reference"].as_f64().unwrap_or(f64::NAN)
        );
    }
    out
}
