//! `proxytune bench load`: loading a sharded bfloat16 checkpoint, two ways side by side, each in a
//! fresh child process so its peak memory is its own. The checkpoint is a Chameleon decoder of the
//! chosen width and depth, written once by the bench in the transformers layout (shards and their
//! `model.safetensors.index.json`); the model is built and loads on the CPU in float32, or directly
//! in bfloat16 (`--into bf16`). Each mode runs `--repeats` times, alternating; the table gives the
//! median load time and the largest peak.
//!
//! - `streaming`: proxytune's loader (headers checked first, then one tensor at a time from its
//!   file offset);
//! - `whole-file`: every shard read whole into tensors first (libtorch's `read_safetensors`), then
//!   copied: what proxytune did before.
//!
//! Each child reports its resident memory before the model is built, after it is built and at its
//! peak; the table gives the peak above the built model against the largest shard (the goal:
//! ≤ 1.2× the largest shard beyond the model's own bytes) and the load time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use proxytune_models::ar::chameleon::{Chameleon, ChameleonConfig};
use proxytune_models::weights::{load_safetensors_files, read_safetensors, write_safetensors, Strictness};

/// Arguments of `proxytune bench load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Hidden width of the decoder.
    #[arg(long, default_value_t = 1024)]
    hidden: i64,
    /// Decoder layers.
    #[arg(long, default_value_t = 8)]
    layers: i64,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32768)]
    vocab: i64,
    /// Shards the checkpoint is written in.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// The kind the model is built and loaded in: `fp32` or `bf16` (built directly in bfloat16).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
    into: String,
    /// Where the checkpoint is written (a temporary folder when absent).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Runs of each mode (alternating); the median time and the largest peak are reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Internal: load `--dir` this way and print one JSON line.
    #[arg(long, hide = true)]
    child: Option<String>,
}

fn config(args: &LoadArgs) -> anyhow::Result<(serde_json::Value, ChameleonConfig)> {
    // The tiny reference folder's config (its VQ and vocabulary map), at the chosen size.
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tests/fixtures/chameleon_tiny/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&base)?)?;
    cfg["hidden_size"] = args.hidden.into();
    cfg["intermediate_size"] = (args.hidden * 11 / 4).into();
    cfg["num_hidden_layers"] = args.layers.into();
    cfg["num_attention_heads"] = (args.hidden / 64).max(1).into();
    cfg["num_key_value_heads"] = (args.hidden / 64).max(1).into();
    cfg["vocab_size"] = args.vocab.into();
    Ok((cfg.clone(), serde_json::from_value(cfg)?))
}

fn child(args: &LoadArgs, mode: &str) -> anyhow::Result<()> {
    let dir = args.dir.as_deref().ok_or_else(|| anyhow::anyhow!("--child needs --dir"))?;
    let before = crate::bench::status_kib_or_0("VmRSS:");
    let cfg = ChameleonConfig::from_json(&dir.join("config.json"))?;
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    vs.set_kind(if args.into == "bf16" { tch::Kind::BFloat16 } else { tch::Kind::Float });
    let _model = Chameleon::new(vs.root(), &cfg, None)?;
    let built = crate::bench::status_kib_or_0("VmRSS:");
    let files = proxytune_models::shapes::weight_files(dir, &["model"], None)?;
    let t = Instant::now();
    match mode {
        "streaming" => load_safetensors_files(&mut vs, &files, Strictness::Strict)?,
        "whole-file" => {
            let mut tensors = std::collections::HashMap::new();
            for f in &files {
                tensors.extend(read_safetensors(f)?);
            }
            tch::no_grad(|| {
                for (name, mut var) in vs.variables() {
                    var.copy_(&tensors[&name].to_kind(var.kind()));
                }
            });
        }
        other => anyhow::bail!("--child {other}: streaming or whole-file"),
    }
    let seconds = t.elapsed().as_secs_f64();
    let peak = crate::bench::status_kib_or_0("VmHWM:");
    println!(
        "{}",
        serde_json::json!({"mode": mode, "seconds": seconds, "before_kib": before, "built_kib": built, "peak_kib": peak})
    );
    Ok(())
}

/// Writes `named` (sorted by name) as `<stem>-0000i-of-0000n.safetensors` shards of at most
/// `max_bytes` each (a tensor larger than that gets a shard of its own) in `dir`, with the
/// `<stem>.safetensors.index.json` naming each tensor's shard, as transformers and diffusers do.
/// Returns the shard files.
pub(crate) fn write_sharded(
    mut named: Vec<(String, tch::Tensor)>,
    dir: &Path,
    stem: &str,
    max_bytes: u64,
) -> anyhow::Result<Vec<PathBuf>> {
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut chunks: Vec<Vec<(String, tch::Tensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, t) in named {
        let bytes = t.numel() as u64 * t.kind().elt_size_in_bytes() as u64;
        if size + bytes > max_bytes && !chunks.last().is_some_and(Vec::is_empty) {
            chunks.push(Vec::new());
            size = 0;
        }
        size += bytes;
        chunks.last_mut().expect("one chunk at least").push((name, t));
    }
    std::fs::create_dir_all(dir)?;
    let n = chunks.len();
    let mut map = serde_json::Map::new();
    let mut files = Vec::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let file = format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1);
        for (k, _) in &chunk {
            map.insert(k.clone(), file.clone().into());
        }
        write_safetensors(chunk, &dir.join(&file))?;
        files.push(dir.join(file));
    }
    std::fs::write(
        dir.join(format!("{stem}.safetensors.index.json")),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )?;
    Ok(files)
}

/// Runs `proxytune bench load`.
pub fn run(args: LoadArgs) -> anyhow::Result<()> {
    if let Some(mode) = &args.child {
        return child(&args, mode);
    }
    let temporary = std::env::temp_dir().join(format!("proxytune-bench-load-{}", std::process::id()));
    let dir = args.dir.clone().unwrap_or_else(|| temporary.clone());
    std::fs::create_dir_all(&dir)?;
    let result = measure(&args, &dir);
    std::fs::remove_dir_all(&temporary).ok();
    result
}

fn measure(args: &LoadArgs, dir: &Path) -> anyhow::Result<()> {
    // The checkpoint: the decoder in bfloat16, in `shards` files by layer, with its index.
    let (json, cfg) = config(args)?;
    let parameters = {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _model = Chameleon::new(vs.root(), &cfg, None)?;
        let named: Vec<(String, tch::Tensor)> =
            vs.variables().into_iter().map(|(k, v)| (k, v.to_kind(tch::Kind::BFloat16))).collect();
        let parameters: i64 = named.iter().map(|(_, t)| t.numel() as i64).sum();
        let bytes = parameters as u64 * 2;
        write_sharded(named, dir, "model", bytes.div_ceil(args.shards.max(1) as u64))?;
        std::fs::write(dir.join("config.json"), json.to_string())?;
        parameters
    };
    let files = proxytune_models::shapes::weight_files(dir, &["model"], None)?;
    let largest = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).max().unwrap_or(0);
    let mib = |kib: f64| kib / 1024.0;
    println!(
        "checkpoint: {parameters} parameters, {} shards of bfloat16, largest {:.0} MiB; the model is built and loads in {} ({:.0} MiB)",
        files.len(),
        largest as f64 / (1 << 20) as f64,
        args.into,
        parameters as f64 * if args.into == "bf16" { 2.0 } else { 4.0 } / (1 << 20) as f64
    );
    println!("{:>11} {:>9} {:>22} {:>20}", "mode", "median s", "peak above model MiB", "÷ largest shard");
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    let modes = ["streaming", "whole-file"];
    let mut measured: Vec<(Vec<f64>, f64)> = vec![(Vec::new(), 0.0); modes.len()];
    for _ in 0..args.repeats.max(1) {
        for (i, mode) in modes.iter().enumerate() {
            let out = std::process::Command::new(&exe)
                .args(["bench", "load", "--child", mode, "--into", &args.into, "--dir"])
                .arg(dir)
                .output()?;
            anyhow::ensure!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
            let r: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii())?;
            let above = r["peak_kib"].as_f64().unwrap_or(0.0) - r["built_kib"].as_f64().unwrap_or(0.0);
            measured[i].0.push(r["seconds"].as_f64().unwrap_or(0.0));
            measured[i].1 = measured[i].1.max(above);
            rows.push(r);
        }
    }
    for (mode, (mut seconds, above)) in modes.iter().zip(measured) {
        seconds.sort_by(f64::total_cmp);
        println!(
            "{mode:>11} {:>9.2} {:>22.0} {:>20.2}",
            seconds[seconds.len() / 2],
            mib(above),
            above * 1024.0 / largest.max(1) as f64
        );
    }
    println!(
        "{}",
        serde_json::json!({"parameters": parameters, "largest_shard_bytes": largest, "into": args.into, "runs": rows})
    );
    Ok(())
}
