//! `proxytune bench real-size`: the paper's models at their published sizes, with random weights,
//! on the chosen device; nothing is downloaded.
//!
//! Models: Stable Diffusion 1.5 (UNet and VAE, 512 px), SDXL (UNet and VAE, 1024 px) and
//! Chameleon-7B in Lumina-mGPT 7B's configuration (768 px: 2,350-token sequences). `--scale small`
//! and `--scale tiny` shrink widths, depths, resolutions and sequences for machines without a GPU
//! (the suite runs `--scale tiny`, so the command never rots).
//!
//! Per model, each measurement in a fresh child process so its peaks are its own:
//! - **load**: a sharded bfloat16 checkpoint in the published layout (written once by the bench)
//!   loaded by proxytune's loader into a model built directly in the bench's precision on the
//!   device: seconds, and peak host memory above the process's baseline against the largest shard;
//!   with `--python`, transformers' `from_pretrained` of the same Chameleon folder beside it;
//! - **train**: one LoRA training micro-step (forward and backward, batch 1, the frozen base in the
//!   bench's precision, rank-8 adapters in float32): the UNet's denoising loss at the model's
//!   resolution; the student's next-token loss over a whole sequence. Plain, with activation
//!   checkpointing, and for the student with a chunked LM-head loss and both; seconds and peak
//!   memory (host resident memory on the CPU, device memory in use on CUDA) above the built model;
//! - **sample**: the supervisor's classifier-free-guided sampling (`--sample-steps` UNet evaluations
//!   of the doubled batch, then the VAE decode) and the student's CFG decoding (the job's batched
//!   sampler: a prefill, then one token per step for every row over a preallocated KV cache, the
//!   draw on the device); seconds per image at each `--sample-batches` size.
//!
//! Output: a table on stdout and the whole report as JSON (`--out`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _};
use proxytune_models::ar::chameleon::{Chameleon, ChameleonConfig};
use proxytune_models::ar::generate::{generate_batch, Allowed, TokenSampling};
use proxytune_models::ar::lumina::LuminaTokens;
use proxytune_models::ar::train::{ArTrainer, ChameleonStudent};
use proxytune_models::diffusion::unet::{AddedCond, UNet2DConditionModel, UNetConfig};
use proxytune_models::diffusion::vae::{AutoencoderKl, VaeConfig};
use proxytune_models::lora::{LoraConfig, LoraSpec, LoraSwitch};
use proxytune_models::weights::{load_safetensors_files, Strictness};
use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};

/// Arguments of `proxytune bench real-size`.
#[derive(Debug, clap::Args)]
pub struct RealSizeArgs {
    /// Device: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `full` (the published sizes), `small` (a CPU-sized cut) or `tiny` (seconds, for tests).
    #[arg(long, default_value = "full", value_parser = ["tiny", "small", "full"])]
    scale: String,
    /// Models, comma-separated: sd15, sdxl, chameleon-7b.
    #[arg(long, value_delimiter = ',', default_value = "sd15,sdxl,chameleon-7b")]
    models: Vec<String>,
    /// Measurements, comma-separated: load, train, sample.
    #[arg(long, value_delimiter = ',', default_value = "load,train,sample")]
    measure: Vec<String>,
    /// Precision of the frozen weights: bf16 (what real runs use) or fp32.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "fp32"])]
    precision: String,
    /// Timed repetitions of a training step (after one untimed); the median is reported.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Denoising steps of a supervisor sample.
    #[arg(long, default_value_t = 30)]
    sample_steps: usize,
    /// Batch sizes of the sampling measurements.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    sample_batches: Vec<i64>,
    /// Image tokens the student decodes per measurement (default: a whole image at the scale).
    #[arg(long)]
    student_tokens: Option<i64>,
    /// Python with torch and transformers: also time `from_pretrained` of the student's folder.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Where the checkpoints are written (a temporary folder, removed after, when absent).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The JSON report.
    #[arg(long, default_value = "bench-real-size.json")]
    out: PathBuf,
    /// Internal: run one measurement (`model/measure[/variant]`) and print one JSON line.
    #[arg(long, hide = true)]
    child: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Model {
    Sd15,
    Sdxl,
    Chameleon7b,
}

impl Model {
    fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "sd15" => Model::Sd15,
            "sdxl" => Model::Sdxl,
            "chameleon-7b" => Model::Chameleon7b,
            other => bail!("--models: unknown model `{other}` (sd15, sdxl, chameleon-7b)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Model::Sd15 => "sd15",
            Model::Sdxl => "sdxl",
            Model::Chameleon7b => "chameleon-7b",
        }
    }

    fn is_unet(self) -> bool {
        self != Model::Chameleon7b
    }
}

/// How far the published sizes are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scale {
    Tiny,
    Small,
    Full,
}

impl Scale {
    fn parse(name: &str) -> Self {
        match name {
            "tiny" => Scale::Tiny,
            "small" => Scale::Small,
            _ => Scale::Full,
        }
    }

    /// Width divisor of the diffusion models.
    fn divisor(self) -> i64 {
        match self {
            Scale::Tiny => 10,
            Scale::Small => 5,
            Scale::Full => 1,
        }
    }

    /// `width / divisor`, a multiple of 32 (the GroupNorm groups), at least 32.
    fn width(self, published: i64) -> i64 {
        (published / self.divisor() / 32 * 32).max(32)
    }
}

/// The diffusers UNet config of `model` at `scale` (published: SD 1.5's and SDXL's base configs).
fn unet_config(model: Model, scale: Scale) -> Value {
    let w = |c: i64| scale.width(c);
    if model == Model::Sd15 {
        return json!({
            "block_out_channels": [w(320), w(640), w(1280), w(1280)],
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": w(768),
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "norm_num_groups": 32,
            "sample_size": resolution(model, scale) / 8,
        });
    }
    let channels = [w(320), w(640), w(1280)];
    let depth = if scale == Scale::Tiny { [1, 1, 2] } else { [1, 2, 10] };
    json!({
        "block_out_channels": channels,
        "layers_per_block": 2,
        "attention_head_dim": channels.map(|c| (c / 64).max(1)),
        "transformer_layers_per_block": depth,
        "cross_attention_dim": w(2048),
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": true,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": pooled_width(scale) + 6 * 256,
        "norm_num_groups": 32,
        "sample_size": resolution(model, scale) / 8,
    })
}

/// SDXL's pooled text embedding width (1280 published).
fn pooled_width(scale: Scale) -> i64 {
    scale.width(1280)
}

/// The VAE both supervisors use (four levels of 128–512 channels).
fn vae_config(scale: Scale) -> Value {
    let w = |c: i64| scale.width(c);
    json!({
        "block_out_channels": [w(128), w(256), w(512), w(512)],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    })
}

/// Image side in pixels.
fn resolution(model: Model, scale: Scale) -> i64 {
    match (model, scale) {
        (Model::Sdxl, Scale::Full) => 1024,
        (_, Scale::Full) => 512,
        (Model::Sdxl, Scale::Small) => 512,
        (_, Scale::Small) => 256,
        (_, Scale::Tiny) => 64,
    }
}

/// Chameleon-7B as Lumina-mGPT 7B configures it (the tiny reference folder's VQ and vocabulary
/// map, which the bench does not exercise, at the published decoder size).
fn chameleon_config(scale: Scale) -> anyhow::Result<Value> {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tests/fixtures/chameleon_tiny/config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&base)?)?;
    let (hidden, layers, heads, intermediate, vocab) = match scale {
        Scale::Full => (4096, 32, 32, 11008, 65536),
        Scale::Small => (512, 8, 8, 1376, 65536),
        Scale::Tiny => (64, 2, 2, 172, 4096),
    };
    cfg["hidden_size"] = hidden.into();
    cfg["num_hidden_layers"] = layers.into();
    cfg["num_attention_heads"] = heads.into();
    cfg["num_key_value_heads"] = heads.into();
    cfg["intermediate_size"] = intermediate.into();
    cfg["vocab_size"] = vocab.into();
    cfg["max_position_embeddings"] = 4096.into();
    cfg["dtype"] = "bfloat16".into();
    Ok(cfg)
}

/// Tokens of one training sequence: Lumina-mGPT 768's image (48 rows of 48 codes and a row end)
/// with its prompt and structure tokens, about 2,350.
fn sequence_tokens(scale: Scale) -> i64 {
    match scale {
        Scale::Full => 2350,
        Scale::Small => 1024,
        Scale::Tiny => 128,
    }
}

/// LoRA rank of both trainers' adapters in the bench.
const RANK: i64 = 8;

fn kind_of(precision: &str) -> Kind {
    if precision == "bf16" {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

/// Bytes of one element of `kind` (the two the bench uses).
fn element_bytes(kind: Kind) -> u64 {
    if kind == Kind::BFloat16 {
        2
    } else {
        4
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Peak device memory in use while it lives (CUDA: the driver's used bytes, polled every
/// millisecond, which includes the caching allocator's reserve; the CPU has none).
struct DevicePeak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
type SetDevice = unsafe extern "C" fn(i32) -> i32;

/// The CUDA runtime's `cudaMemGetInfo` and `cudaSetDevice`, from the libcudart libtorch loaded.
fn cuda_runtime() -> Option<(MemGetInfo, SetDevice)> {
    // SAFETY: dlsym on the global scope with NUL-terminated names; the symbols, when present, are
    // the CUDA runtime's functions with these C signatures.
    unsafe {
        let info = libc::dlsym(libc::RTLD_DEFAULT, c"cudaMemGetInfo".as_ptr());
        let set = libc::dlsym(libc::RTLD_DEFAULT, c"cudaSetDevice".as_ptr());
        if info.is_null() || set.is_null() {
            return None;
        }
        Some((
            std::mem::transmute::<*mut libc::c_void, MemGetInfo>(info),
            std::mem::transmute::<*mut libc::c_void, SetDevice>(set),
        ))
    }
}

/// Device bytes in use on CUDA device `index` now.
fn cuda_used(index: usize) -> Option<u64> {
    let (info, set) = cuda_runtime()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: plain CUDA runtime calls writing two out-parameters we own.
    let ok = unsafe { set(index as i32) == 0 && info(&mut free, &mut total) == 0 };
    ok.then(|| (total - free) as u64)
}

impl DevicePeak {
    fn start(device: Device) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = match device {
            Device::Cuda(index) => {
                let (stop, peak) = (stop.clone(), peak.clone());
                Some(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(used) = cuda_used(index) {
                            peak.fetch_max(used, Ordering::Relaxed);
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }))
            }
            _ => None,
        };
        DevicePeak { stop, peak, thread }
    }

    /// The highest reading so far (0 on the CPU or without the CUDA runtime).
    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for DevicePeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Memory the current measurement may be charged with, in bytes: host resident memory on the CPU,
/// device memory in use on CUDA.
struct Meter {
    device: Device,
    poller: DevicePeak,
}

impl Meter {
    fn new(device: Device) -> Self {
        // Create the CUDA context first, so the baseline includes it.
        if device.is_cuda() {
            let _ = Tensor::zeros([1], (Kind::Float, device));
            sync(device);
        }
        Meter { device, poller: DevicePeak::start(device) }
    }

    /// Starts a measurement: syncs the device, resets both peaks to what is in use now, and
    /// returns that baseline.
    fn begin(&self) -> u64 {
        sync(self.device);
        reset_host_peak();
        self.poller.peak.store(0, Ordering::Relaxed);
        self.now()
    }

    /// Memory in use now.
    fn now(&self) -> u64 {
        match self.device {
            Device::Cuda(i) => cuda_used(i).unwrap_or(0),
            _ => crate::bench::status_kib_or_0("VmRSS:") * 1024,
        }
    }

    /// Peak memory so far.
    fn peak(&self) -> u64 {
        match self.device {
            Device::Cuda(i) => self.poller.peak().max(cuda_used(i).unwrap_or(0)),
            _ => crate::bench::status_kib_or_0("VmHWM:") * 1024,
        }
    }
}

/// The run whose `seconds` is the median (a failed run, if any, instead: it is what to report).
fn median_run(mut runs: Vec<Value>, seconds: impl Fn(&Value) -> f64) -> Value {
    if let Some(failed) = runs.iter().find(|r| r.get("failed").is_some()) {
        return failed.clone();
    }
    runs.sort_by(|a, b| seconds(a).total_cmp(&seconds(b)));
    runs.swap_remove(runs.len() / 2)
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// What a child needs to know.
struct Setup {
    model: Model,
    scale: Scale,
    device: Device,
    kind: Kind,
    dir: PathBuf,
}

/// Runs `proxytune bench real-size`.
pub fn run(args: RealSizeArgs) -> anyhow::Result<()> {
    let device = proxytune_models::device::parse_device(&args.device)?;
    let scale = Scale::parse(&args.scale);
    let kind = kind_of(&args.precision);
    if device.is_cuda() {
        proxytune_models::device::allow_tf32(true)?;
    }
    if let Some(child) = &args.child {
        let mut parts = child.splitn(3, '/');
        let model = Model::parse(parts.next().unwrap_or(""))?;
        let measure = parts.next().unwrap_or("").to_string();
        let variant = parts.next().unwrap_or("").to_string();
        let dir = args.dir.clone().context("--child needs --dir")?;
        let setup = Setup { model, scale, device, kind, dir };
        let report = match measure.as_str() {
            "load" => child_load(&setup)?,
            "train" => child_train(&setup, &variant, args.iters.max(1))?,
            "sample" => child_sample(&setup, variant.parse()?, &args)?,
            other => bail!("--child: unknown measurement `{other}`"),
        };
        println!("{report}");
        return Ok(());
    }
    let models = args.models.iter().map(|m| Model::parse(m)).collect::<anyhow::Result<Vec<_>>>()?;
    for m in &args.measure {
        ensure!(
            ["load", "train", "sample"].contains(&m.as_str()),
            "--measure: unknown `{m}` (load, train, sample)"
        );
    }
    let temporary = std::env::temp_dir().join(format!("proxytune-bench-real-size-{}", std::process::id()));
    let root = args.dir.clone().unwrap_or_else(|| temporary.clone());
    let result = measure_all(&args, &models, scale, device, &root);
    std::fs::remove_dir_all(&temporary).ok();
    let report = result?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("report: {}", args.out.display());
    Ok(())
}

fn measure_all(
    args: &RealSizeArgs,
    models: &[Model],
    scale: Scale,
    device: Device,
    root: &Path,
) -> anyhow::Result<Value> {
    let exe = std::env::current_exe()?;
    let machine = machine_name(device);
    println!(
        "bench real-size: scale {}, {} weights, device {} ({machine})",
        args.scale, args.precision, args.device
    );
    let mut report = json!({
        "scale": args.scale, "precision": args.precision, "device": args.device, "machine": machine,
        "models": {},
    });
    for &model in models {
        let dir = root.join(model.name());
        std::fs::create_dir_all(&dir)?;
        write_configs(model, scale, &dir)?;
        let mut entry = json!({});
        let child = |spec: String| -> anyhow::Result<Value> {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["bench", "real-size", "--scale", &args.scale, "--device", &args.device])
                .args(["--precision", &args.precision, "--iters", &args.iters.to_string()])
                .args(["--sample-steps", &args.sample_steps.to_string()]);
            if let Some(n) = args.student_tokens {
                cmd.args(["--student-tokens", &n.to_string()]);
            }
            let out = cmd.arg("--child").arg(&spec).arg("--dir").arg(&dir).output()?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
                return Ok(json!({ "failed": last }));
            }
            Ok(serde_json::from_slice(out.stdout.trim_ascii())?)
        };
        if args.measure.iter().any(|m| m == "load") {
            write_checkpoint(model, &dir)?;
            // `--iters` loads (alternating with transformers' when asked); the median by time.
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for _ in 0..args.iters.max(1) {
                ours.push(child(format!("{}/load", model.name()))?);
                if let (Some(python), Model::Chameleon7b) = (&args.python, model) {
                    theirs.push(from_pretrained(python, &dir, &args.device, &args.precision)?);
                }
            }
            let mut load = median_run(ours, |r| {
                r["build_s"].as_f64().unwrap_or(0.0) + r["load_s"].as_f64().unwrap_or(0.0)
            });
            if !theirs.is_empty() {
                load["transformers"] = median_run(theirs, |r| r["seconds"].as_f64().unwrap_or(0.0));
            }
            load["runs"] = args.iters.max(1).into();
            entry["load"] = load;
        }
        if args.measure.iter().any(|m| m == "train") {
            let mut train = Vec::new();
            for v in train_variants(model) {
                let mut r = child(format!("{}/train/{v}", model.name()))?;
                r["variant"] = (*v).into();
                train.push(r);
            }
            entry["train"] = train.into();
        }
        if args.measure.iter().any(|m| m == "sample") {
            let mut sample = Vec::new();
            for b in &args.sample_batches {
                let mut r = child(format!("{}/sample/{b}", model.name()))?;
                r["batch"] = (*b).into();
                sample.push(r);
            }
            entry["sample"] = sample.into();
        }
        print_model(model, &entry);
        report["models"][model.name()] = entry;
    }
    Ok(report)
}

/// The CPU or GPU model name, for the report.
fn machine_name(device: Device) -> String {
    if device.is_cuda() {
        let out = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader"])
            .output();
        if let Ok(out) = out {
            if let Some(line) = String::from_utf8_lossy(&out.stdout).lines().next() {
                return line.trim().to_string();
            }
        }
        return "a CUDA GPU".into();
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{name}, {cores} cores")
}

fn write_configs(model: Model, scale: Scale, dir: &Path) -> anyhow::Result<()> {
    if model.is_unet() {
        std::fs::create_dir_all(dir.join("unet"))?;
        std::fs::create_dir_all(dir.join("vae"))?;
        std::fs::write(dir.join("unet/config.json"), unet_config(model, scale).to_string())?;
        std::fs::write(dir.join("vae/config.json"), vae_config(scale).to_string())?;
    } else {
        std::fs::write(dir.join("config.json"), chameleon_config(scale)?.to_string())?;
    }
    Ok(())
}

/// The UNet (with LoRA adapters when `adapters` is given) of a model folder, built in `kind`.
fn build_unet(
    dir: &Path,
    device: Device,
    kind: Kind,
    adapters: Option<&nn::VarStore>,
) -> anyhow::Result<(nn::VarStore, UNet2DConditionModel, UNetConfig)> {
    let cfg = UNetConfig::from_json(&dir.join("unet/config.json"))?;
    let mut vs = nn::VarStore::new(device);
    vs.set_kind(kind);
    let lora = LoraConfig::attention(RANK, RANK as f64);
    let root = adapters.map(|a| a.root());
    let switch = LoraSwitch::default();
    let unet = UNet2DConditionModel::with_lora(
        vs.root(),
        &cfg,
        root.as_ref().map(|root| LoraSpec { root, config: &lora, switch: &switch }),
    )?;
    Ok((vs, unet, cfg))
}

/// The training variants measured: plain, activation checkpointing, and for the student the
/// chunked LM-head loss alone and with checkpointing.
fn train_variants(model: Model) -> &'static [&'static str] {
    if model.is_unet() {
        &["plain", "checkpointed"]
    } else {
        &["plain", "checkpointed", "chunked", "checkpointed+chunked"]
    }
}

/// The student decoder with random weights in `kind` (rank-8 adapters on every projection when
/// `lora`), built on `device`.
fn build_student(dir: &Path, device: Device, kind: Kind, lora: bool) -> anyhow::Result<ChameleonStudent> {
    let cfg = ChameleonConfig::from_json(&dir.join("config.json"))?;
    let mut base = nn::VarStore::new(device);
    base.set_kind(kind);
    let adapters = nn::VarStore::new(device);
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let config =
        LoraConfig { rank: RANK, alpha: RANK as f64, target_modules: targets.map(String::from).to_vec() };
    let root = adapters.root();
    let model = Chameleon::new(
        base.root(),
        &cfg,
        lora.then_some(LoraSpec { root: &root, config: &config, switch: &LoraSwitch::default() }),
    )?;
    base.freeze();
    Ok(ChameleonStudent {
        model,
        base,
        adapters,
        lora: lora.then_some(config),
        tokens: LuminaTokens::default(),
    })
}

/// Writes the model's weights in bfloat16 as the published layout shards them (at most 5 GiB a
/// shard, and at least four shards at the cut scales), unless they are there already.
fn write_checkpoint(model: Model, dir: &Path) -> anyhow::Result<()> {
    let (folder, stem) = if model.is_unet() {
        (dir.join("unet"), "diffusion_pytorch_model")
    } else {
        (dir.to_path_buf(), "model")
    };
    if folder.join(format!("{stem}.safetensors.index.json")).is_file() {
        return Ok(());
    }
    let named: Vec<(String, Tensor)> = if model.is_unet() {
        let (vs, _unet, _) = build_unet(dir, Device::Cpu, Kind::BFloat16, None)?;
        vs.variables().into_iter().collect()
    } else {
        let student = build_student(dir, Device::Cpu, Kind::BFloat16, false)?;
        student.base.variables().into_iter().collect()
    };
    let total: u64 = named.iter().map(|(_, t)| t.numel() as u64 * 2).sum();
    let max = (total.div_ceil(4)).min(5 << 30);
    crate::bench_load::write_sharded(named, &folder, stem, max)?;
    Ok(())
}

/// Resets the kernel's peak-RSS counter (`VmHWM`) to the current RSS (Linux `clear_refs` 5).
fn reset_host_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn child_load(s: &Setup) -> anyhow::Result<Value> {
    let meter = Meter::new(s.device);
    let host_base = crate::bench::status_kib_or_0("VmRSS:") * 1024;
    reset_host_peak();
    let t = Instant::now();
    // Built as the loaders build: no initial values drawn for variables the load overwrites.
    let (mut vs, files) = if s.model.is_unet() {
        let (vs, _unet, _) =
            proxytune_models::nn::for_loading(|| build_unet(&s.dir, s.device, s.kind, None))?;
        (vs, proxytune_models::shapes::weight_files(&s.dir.join("unet"), &["diffusion_pytorch_model"], None)?)
    } else {
        let student = proxytune_models::nn::for_loading(|| build_student(&s.dir, s.device, s.kind, false))?;
        (student.base, proxytune_models::shapes::weight_files(&s.dir, &["model"], None)?)
    };
    sync(s.device);
    let build_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    load_safetensors_files(&mut vs, &files, Strictness::Strict)?;
    sync(s.device);
    let load_s = t.elapsed().as_secs_f64();
    let parameters: u64 = vs.variables().values().map(|v| v.numel() as u64).sum();
    let largest = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).max().unwrap_or(0);
    let host_peak = crate::bench::status_kib_or_0("VmHWM:") * 1024;
    let on_host = if s.device.is_cuda() { 0 } else { parameters * element_bytes(s.kind) };
    Ok(json!({
        "parameters": parameters,
        "shards": files.len(),
        "largest_shard_bytes": largest,
        "build_s": build_s,
        "load_s": load_s,
        "host_peak_above_baseline_bytes": host_peak.saturating_sub(host_base),
        "model_bytes_on_host": on_host,
        "device_peak_bytes": if s.device.is_cuda() { meter.peak() } else { 0 },
    }))
}

fn child_train(s: &Setup, variant: &str, iters: usize) -> anyhow::Result<Value> {
    let meter = Meter::new(s.device);
    let recompute = variant.contains("checkpointed");
    let chunked = variant.contains("chunked");
    let adapters = nn::VarStore::new(s.device);
    // What the step closure borrows (declared first, so it outlives the closure).
    let unet_parts;
    let student;
    let mut step: Box<dyn FnMut() -> anyhow::Result<()>>;
    let parameters: u64;
    if s.model.is_unet() {
        ensure!(!chunked, "the UNet has no LM head to chunk");
        let (vs, unet, cfg) = build_unet(&s.dir, s.device, s.kind, Some(&adapters))?;
        parameters = vs.variables().values().map(|v| v.numel() as u64).sum();
        let mut vs = vs;
        vs.freeze();
        let side = resolution(s.model, s.scale) / 8;
        let opts = (s.kind, s.device);
        let x = Tensor::randn([1, 4, side, side], opts);
        let target = Tensor::randn([1, 4, side, side], (Kind::Float, s.device));
        let t = Tensor::from_slice(&[500i64]).to_device(s.device);
        let ctx = Tensor::randn([1, 77, cfg.cross_attention_dim], opts);
        let pooled = Tensor::randn([1, pooled_width(s.scale)], opts);
        let px = (side * 8) as f32;
        let time_ids =
            Tensor::from_slice(&[px, px, 0.0, 0.0, px, px]).to_device(s.device).to_kind(s.kind).view([1, 6]);
        unet_parts = (vs, unet, x, target, t, ctx, pooled, time_ids, cfg);
        let (_, unet, x, target, t, ctx, pooled, time_ids, cfg) = &unet_parts;
        let sdxl = cfg.addition_embed_type.is_some();
        let trained = adapters.trainable_variables();
        step = Box::new(move || {
            for mut v in trained.iter().map(Tensor::shallow_clone) {
                v.zero_grad();
            }
            let added = sdxl.then_some(AddedCond { text_embeds: pooled, time_ids });
            let segments = unet.segments(t, ctx, added)?;
            proxytune_models::recompute::backward(&segments, vec![x.shallow_clone()], recompute, |ends| {
                ends[0].to_kind(Kind::Float).mse_loss(target, tch::Reduction::Mean).f_backward()?;
                Ok(())
            })?;
            sync(s.device);
            Ok(())
        });
    } else {
        student = build_student(&s.dir, s.device, s.kind, true)?;
        parameters = student.base.variables().values().map(|v| v.numel() as u64).sum();
        let vocab = student.model.config().vocab_size;
        let ids = Tensor::randint_low(0, vocab, [1, sequence_tokens(s.scale)], (Kind::Int64, s.device));
        let chunk = if chunked {
            if s.scale == Scale::Tiny {
                32
            } else {
                512
            }
        } else {
            0
        };
        let trained = student.adapters.trainable_variables();
        let student = &student;
        step = Box::new(move || {
            for mut v in trained.iter().map(Tensor::shallow_clone) {
                v.zero_grad();
            }
            if recompute || chunked {
                ArTrainer::backward_losses(student, &ids, &ids, recompute, chunk, 1e-5, 1.0)?;
            } else {
                let (ce, z) = ArTrainer::losses(student, &ids, &ids)?;
                (ce + z * 1e-5).f_backward()?;
            }
            sync(s.device);
            Ok(())
        });
    }
    let built = meter.begin();
    let mut times = Vec::new();
    for i in 0..=iters {
        let t = Instant::now();
        step()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let peak = meter.peak();
    Ok(json!({
        "parameters": parameters,
        "variant": variant,
        "step_s": median(times),
        "peak_above_model_bytes": peak.saturating_sub(built),
    }))
}

fn child_sample(s: &Setup, batch: i64, args: &RealSizeArgs) -> anyhow::Result<Value> {
    ensure!(batch > 0, "--sample-batches: sizes must be at least 1");
    let meter = Meter::new(s.device);
    let _no_graph = tch::no_grad_guard();
    if s.model.is_unet() {
        let (_vs, unet, cfg) = build_unet(&s.dir, s.device, s.kind, None)?;
        let vae_vs = nn::VarStore::new(s.device);
        let vae = AutoencoderKl::new(vae_vs.root(), &VaeConfig::from_json(&s.dir.join("vae/config.json"))?);
        let side = resolution(s.model, s.scale) / 8;
        let rows = 2 * batch;
        let opts = (s.kind, s.device);
        let ctx = Tensor::randn([rows, 77, cfg.cross_attention_dim], opts);
        let pooled = Tensor::randn([rows, pooled_width(s.scale)], opts);
        let px = (side * 8) as f32;
        let time_ids = Tensor::from_slice(&[px, px, 0.0, 0.0, px, px])
            .to_device(s.device)
            .to_kind(s.kind)
            .view([1, 6])
            .expand([rows, 6], false);
        let sdxl = cfg.addition_embed_type.is_some();
        let mut x = Tensor::randn([batch, 4, side, side], (Kind::Float, s.device));
        let built = meter.begin();
        let start = Instant::now();
        let mut steps = Vec::new();
        for i in 0..args.sample_steps.max(1) {
            let t0 = Instant::now();
            let input = Tensor::cat(&[&x, &x], 0).to_kind(s.kind);
            let t = Tensor::full([rows], 999 - (i as i64 * 33) % 999, (Kind::Int64, s.device));
            let added = sdxl.then_some(AddedCond { text_embeds: &pooled, time_ids: &time_ids });
            let out = unet.forward(&input, &t, &ctx, added)?.to_kind(Kind::Float);
            let parts = out.chunk(2, 0);
            let guided = &parts[0] + (&parts[1] - &parts[0]) * 7.5;
            x = &x - guided * 0.01;
            sync(s.device);
            steps.push(t0.elapsed().as_secs_f64());
        }
        let t0 = Instant::now();
        let _images = vae.decode(&(&x / 0.18215));
        sync(s.device);
        let decode_s = t0.elapsed().as_secs_f64();
        let total = start.elapsed().as_secs_f64();
        return Ok(json!({
            "batch": batch,
            "steps": steps.len(),
            "step_s": median(steps),
            "decode_s": decode_s,
            "sample_s": total,
            "per_image_s": total / batch as f64,
            "peak_above_model_bytes": meter.peak().saturating_sub(built),
        }));
    }
    let student = build_student(&s.dir, s.device, s.kind, false)?;
    let model = &student.model;
    let vocab = model.config().vocab_size;
    let prompt_len = 32;
    let image_tokens = sequence_tokens(s.scale) - prompt_len;
    let n = args.student_tokens.unwrap_or(image_tokens).clamp(1, image_tokens);
    let rows = 2 * batch; // conditional rows, then unconditional ones
    let prompt = Tensor::randint_low(0, vocab, [rows, prompt_len], (Kind::Int64, s.device));
    // The job's sampler: guidance 4 and Lumina's top-k, drawn on the device.
    let sampling = TokenSampling { guidance_scale: 4.0, top_k: Some(2000), ..Default::default() };
    let seeds: Vec<u64> = (0..batch as u64).collect();
    let built = meter.begin();
    let start = Instant::now();
    tch::no_grad(|| generate_batch(model, &prompt, None, n as usize, &sampling, &seeds, |_| Allowed::Any))?;
    sync(s.device);
    let total = start.elapsed().as_secs_f64();
    Ok(json!({
        "batch": batch,
        "tokens": n,
        "image_tokens": image_tokens,
        "tokens_per_s": (batch * n) as f64 / total,
        "per_image_s": total / batch as f64 * image_tokens as f64 / n as f64,
        "peak_above_model_bytes": meter.peak().saturating_sub(built),
    }))
}

/// transformers' `from_pretrained` of the student folder onto the device, in its own process.
fn from_pretrained(python: &Path, dir: &Path, device: &str, precision: &str) -> anyhow::Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench/load_transformers.py");
    let device = if device == "cuda" { "cuda:0" } else { device };
    let out = std::process::Command::new(python).arg(&script).arg(dir).args([device, precision]).output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Ok(json!({ "failed": stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("") }));
    }
    Ok(serde_json::from_slice(out.stdout.trim_ascii())?)
}

fn gib(bytes: &Value) -> String {
    match bytes.as_f64() {
        Some(b) if b >= (1u64 << 30) as f64 => format!("{:.2} GiB", b / (1u64 << 30) as f64),
        Some(b) => format!("{:.0} MiB", b / (1u64 << 20) as f64),
        None => "?".into(),
    }
}

fn seconds(v: &Value) -> String {
    v.as_f64().map(|s| format!("{s:.3} s")).unwrap_or_else(|| "?".into())
}

fn print_model(model: Model, entry: &Value) {
    let parameters = std::iter::once(&entry["load"])
        .chain(entry["train"].as_array().into_iter().flatten())
        .find_map(|r| r["parameters"].as_u64())
        .unwrap_or(0);
    println!("{} ({:.1} M parameters)", model.name(), parameters as f64 / 1e6);
    let failed = |v: &Value| v.get("failed").and_then(Value::as_str).map(str::to_string);
    if let Some(load) = entry.get("load") {
        match failed(load) {
            Some(why) => println!("  load    failed: {why}"),
            None => {
                let largest = load["largest_shard_bytes"].as_f64().unwrap_or(1.0).max(1.0);
                let above = load["host_peak_above_baseline_bytes"].as_f64().unwrap_or(0.0)
                    - load["model_bytes_on_host"].as_f64().unwrap_or(0.0);
                println!(
                    "  load    build {} + load {} from {} shards (largest {}); host peak beyond the model's bytes {} = {:.2}x the largest shard",
                    seconds(&load["build_s"]),
                    seconds(&load["load_s"]),
                    load["shards"],
                    gib(&load["largest_shard_bytes"]),
                    gib(&json!(above.max(0.0))),
                    above.max(0.0) / largest
                );
                if let Some(t) = load.get("transformers") {
                    match failed(t) {
                        Some(why) => println!("          transformers from_pretrained failed: {why}"),
                        None => println!(
                            "          transformers from_pretrained {} (host peak above baseline {}); time ratio proxytune/transformers {:.2}",
                            seconds(&t["seconds"]),
                            gib(&t["host_peak_above_baseline_bytes"]),
                            (load["build_s"].as_f64().unwrap_or(0.0) + load["load_s"].as_f64().unwrap_or(0.0))
                                / t["seconds"].as_f64().unwrap_or(f64::NAN)
                        ),
                    }
                }
            }
        }
    }
    if let Some(train) = entry.get("train").and_then(Value::as_array) {
        let plain = train.first().and_then(|p| p["peak_above_model_bytes"].as_f64());
        for r in train {
            let variant = r["variant"].as_str().unwrap_or("?");
            match failed(r) {
                Some(why) => println!("  train   {variant:<21} failed: {why}"),
                None => {
                    let peak = r["peak_above_model_bytes"].as_f64().unwrap_or(0.0);
                    let versus = match plain {
                        Some(p) if variant != "plain" && p > 0.0 => {
                            format!(" ({:+.0} % vs plain)", (peak / p - 1.0) * 100.0)
                        }
                        _ => String::new(),
                    };
                    println!(
                        "  train   {variant:<21} {} a step, peak above the model {}{versus}",
                        seconds(&r["step_s"]),
                        gib(&r["peak_above_model_bytes"])
                    );
                }
            }
        }
    }
    if let Some(sample) = entry.get("sample").and_then(Value::as_array) {
        for r in sample {
            let batch = r["batch"].as_u64().unwrap_or(0);
            match failed(r) {
                Some(why) => println!("  sample  batch {batch:<3} failed: {why}"),
                None if model.is_unet() => println!(
                    "  sample  batch {batch:<3} {} a CFG step, {} steps + decode {} = {} an image; peak above the model {}",
                    seconds(&r["step_s"]),
                    r["steps"],
                    seconds(&r["decode_s"]),
                    seconds(&r["per_image_s"]),
                    gib(&r["peak_above_model_bytes"])
                ),
                None => println!(
                    "  sample  batch {batch:<3} {:.1} tokens/s with CFG, {} an image of {} tokens; peak above the model {}",
                    r["tokens_per_s"].as_f64().unwrap_or(0.0),
                    seconds(&r["per_image_s"]),
                    r["image_tokens"],
                    gib(&r["peak_above_model_bytes"])
                ),
            }
        }
    }
}
