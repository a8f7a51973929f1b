//! `proxytune pretrain ...`: pretraining the toy world's models with the same model code as the
//! real path. `pretrain clip` trains a tiny CLIP (text and vision towers, `CLIPModel` layout) on
//! world renders and their captions, contrastively, and writes it as a transformers-layout folder
//! (`config.json`, `model.safetensors`) that `ClipScorer` and `--clip` load, with a manifest of
//! what was trained and the held-out retrieval accuracy it reached. `pretrain dino` trains a tiny
//! ViT (`ViTModel` layout, its CLS embedding) to recognise object *instances* across contexts: two
//! renders of one instance in different contexts are a positive pair, the batch's other instances
//! negatives; `--dino` loads the result.

mod llamagen;
mod student;
mod supervisor;
mod verify;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use proxytune_actors::world::{classify_context, vocabulary, Scene, World};
use proxytune_models::contrastive::{retrieval_top1, similarity, ContrastiveTrainer};
use proxytune_models::tokenizer::clip::ClipTokenizer;
use proxytune_models::transformer::clip::{Clip, ClipConfig};
use sha2::Digest;
use tch::{Device, Kind, Tensor};

/// Pretraining subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PretrainCommand {
    /// The world's CLIP-style text/image encoder (also its CLIP-I / CLIP-T scorer).
    Clip(ClipArgs),
    /// The world's DINO-style instance encoder (a ViT; its DINO scorer).
    Dino(ClipArgs),
    /// The supervisor: a Stable Diffusion folder (VAE, UNet) over the world CLIP's text tower.
    Supervisor(supervisor::SupervisorArgs),
    /// The student: a Chameleon / Lumina-mGPT folder (VQ tokenizer, decoder, transformer).
    Student(student::StudentArgs),
    /// The LlamaGen student: its T2I GPT, a VQ in the VQ-16 architecture and a T5 encoder.
    Llamagen(llamagen::LlamaGenArgs),
    /// Re-measure every pretrained world model's held-out figures and compare them with its
    /// manifest (exit 1 naming each figure outside its tolerance).
    Verify(verify::VerifyArgs),
}

/// Arguments of `proxytune pretrain clip`.
#[derive(Debug, clap::Args)]
pub struct ClipArgs {
    /// Output folder (config.json, model.safetensors, manifest.json).
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps.
    #[arg(long, default_value_t = 1500)]
    steps: u64,
    /// Pairs per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[command(flatten)]
    common: Common,
}

/// What every pretraining command takes: image size, world seed, learning rate, device.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Image side in pixels.
    #[arg(long, default_value_t = 32)]
    size: u32,
    /// World seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    learning_rate: f64,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

const CONTEXT: usize = 32;
const MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

fn config(size: u32, vocab_size: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 64,
        "text_config": {
            "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": CONTEXT, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "eos_token_id": 2
        },
        "vision_config": {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": size, "patch_size": 4, "num_channels": 3, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5
        }
    })
}

/// Rendered, normalised pixels `[B, 3, S, S]` and padded caption ids and masks `[B, T]`.
fn batch(
    world: &World,
    tokenizer: &ClipTokenizer,
    indices: impl Iterator<Item = u64>,
    size: u32,
    device: Device,
) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let (mut pixels, mut ids, mut masks) = (Vec::new(), Vec::new(), Vec::new());
    for i in indices {
        let scene = world.pretraining_scene(i);
        let img = scene.render(size);
        pixels.push(proxytune_models::scorers::preprocess::rgb8_to_tensor(
            size,
            size,
            img.as_raw(),
            Device::Cpu,
        )?);
        let enc = tokenizer.encode_padded(&scene.caption(None), CONTEXT, tokenizer.end_id())?;
        ids.extend(enc.ids);
        masks.extend(enc.attention_mask);
    }
    let n = pixels.len() as i64;
    let mean = Tensor::from_slice(&MEAN).to_kind(Kind::Float).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&STD).to_kind(Kind::Float).view([1, 3, 1, 1]);
    let pixels = ((Tensor::stack(&pixels, 0) - mean) / std).to_device(device);
    let ids = Tensor::from_slice(&ids).view([n, -1]).to_device(device);
    let masks = Tensor::from_slice(&masks).view([n, -1]).to_device(device);
    Ok((pixels, ids, masks))
}

/// Refuses a budget or size that cannot train, and an output folder that cannot be made, before
/// any work starts.
fn check(args: &ClipArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.steps > 0 && args.batch > 1, "--steps must be positive and --batch at least 2");
    anyhow::ensure!(
        args.common.size.is_multiple_of(4) && args.common.size >= 16,
        "--size must be a multiple of 4, at least 16"
    );
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    Ok(())
}

/// Runs a pretraining subcommand.
pub fn run(command: PretrainCommand) -> anyhow::Result<()> {
    let args = match command {
        PretrainCommand::Clip(args) => args,
        PretrainCommand::Dino(args) => return dino(args),
        PretrainCommand::Supervisor(args) => return supervisor::run(args),
        PretrainCommand::Student(args) => return student::run(args),
        PretrainCommand::Llamagen(args) => return llamagen::run(args),
        PretrainCommand::Verify(args) => return verify::run(args),
    };
    check(&args)?;
    let device = proxytune_models::device::parse_device(&args.common.device)?;
    // The world's own BPE vocabulary (every caption word one token), written beside the weights
    // in the CLIP folder format, so the text embedding is small.
    let (vocab_json, merges_txt) = ClipTokenizer::word_vocabulary(&vocabulary());
    std::fs::write(args.out.join("vocab.json"), vocab_json)?;
    std::fs::write(args.out.join("merges.txt"), merges_txt)?;
    let tokenizer = ClipTokenizer::from_folder(&args.out)?;
    let world = World::new(args.common.seed, 8);
    let cfg_json = config(args.common.size, tokenizer.vocab_size());
    let cfg: ClipConfig = serde_json::from_value(cfg_json.clone())?;
    tch::manual_seed(args.common.seed as i64);
    let vs = tch::nn::VarStore::new(device);
    let clip = Clip::new(vs.root(), &cfg)?;
    let mut trainer = ContrastiveTrainer::new(&vs, args.common.learning_rate, args.steps / 20, 0.1);
    let held_out = clip_held_out(&world, &tokenizer, args.common.size, device)?;
    let eval = |clip: &Clip| clip_retrieval(clip, &held_out);
    let before = eval(&clip);
    let started = Instant::now();
    let mut last = f64::NAN;
    for step in 0..args.steps {
        let from = step * args.batch as u64;
        let (pixels, ids, masks) =
            batch(&world, &tokenizer, from..from + args.batch as u64, args.common.size, device)?;
        last = trainer.step(&clip, &pixels, &ids, &masks)?;
        if (step + 1) % 100 == 0 {
            tracing::info!(step = step + 1, loss = last, "pretrain clip");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = eval(&clip);
    write_json(&args.out.join("config.json"), &cfg_json)?;
    proxytune_models::weights::save_safetensors(&vs, &args.out.join("model.safetensors"))?;
    let manifest = serde_json::json!({
        "model": "world CLIP (CLIPModel layout, the world's word-level BPE vocabulary)",
        "command": format!("proxytune pretrain clip --steps {} --batch {} --size {} --seed {} --learning-rate {}",
                           args.steps, args.batch, args.common.size, args.common.seed, args.common.learning_rate),
        "pairs_seen": args.steps * args.batch as u64,
        "final_loss": last,
        "temperature": trainer.scale(),
        "held_out_pairs": 128,
        "retrieval_top1_before": before,
        "retrieval_top1_after": after,
        "seconds": seconds,
    });
    finish(&args.out, &manifest)
}

/// The CLIP's held-out pairs: 128 scenes whose indices are far from the training ones.
fn clip_held_out(
    world: &World,
    tokenizer: &ClipTokenizer,
    size: u32,
    device: Device,
) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    batch(world, tokenizer, (0..128).map(|i| 1_000_000_000 + i), size, device)
}

/// Text-to-image retrieval top-1 over the held-out pairs.
fn clip_retrieval(clip: &Clip, held: &(Tensor, Tensor, Tensor)) -> f64 {
    tch::no_grad(|| retrieval_top1(&similarity(clip, &held.0, &held.1, &held.2)))
}

/// The DINO's held-out instances: two views each of 128 scenes far from the training ones.
fn dino_held_out(world: &World, size: u32, device: Device) -> anyhow::Result<(Tensor, Tensor)> {
    let held: Vec<_> = (0..128).map(|i| views(world, 1_000_000_000 + i)).collect();
    Ok((
        pixels(&held.iter().map(|v| v.0).collect::<Vec<_>>(), size, device)?,
        pixels(&held.iter().map(|v| v.1).collect::<Vec<_>>(), size, device)?,
    ))
}

/// Instance retrieval top-1 across the two views of the held-out instances.
fn dino_retrieval(vit: &proxytune_models::transformer::vit::Vit, held: &(Tensor, Tensor)) -> f64 {
    use proxytune_models::contrastive::cosine_matrix;
    tch::no_grad(|| retrieval_top1(&cosine_matrix(&vit.cls_embedding(&held.0), &vit.cls_embedding(&held.1))))
}

const DINO_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const DINO_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Two views (different contexts and layouts) of the instance of pretraining scene `i`.
fn views(world: &World, i: u64) -> (proxytune_actors::world::Scene, proxytune_actors::world::Scene) {
    let a = world.pretraining_scene(i);
    let b = proxytune_actors::world::Scene {
        context: (a.context + 1 + (i as usize % 9)) % 10,
        edit: None,
        seed: a.seed.wrapping_mul(31).wrapping_add(17),
        ..a
    };
    (proxytune_actors::world::Scene { edit: None, ..a }, b)
}

fn pixels(scenes: &[proxytune_actors::world::Scene], size: u32, device: Device) -> anyhow::Result<Tensor> {
    let images = scenes
        .iter()
        .map(|s| {
            let img = s.render(size);
            Ok(proxytune_models::scorers::preprocess::rgb8_to_tensor(size, size, img.as_raw(), Device::Cpu)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mean = Tensor::from_slice(&DINO_MEAN).to_kind(Kind::Float).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&DINO_STD).to_kind(Kind::Float).view([1, 3, 1, 1]);
    Ok(((Tensor::stack(&images, 0) - mean) / std).to_device(device))
}

fn dino(args: ClipArgs) -> anyhow::Result<()> {
    use proxytune_models::transformer::vit::{Vit, VitConfig};
    check(&args)?;
    let device = proxytune_models::device::parse_device(&args.common.device)?;
    let world = World::new(args.common.seed, 8);
    let cfg_json = serde_json::json!({
        "architectures": ["ViTModel"], "model_type": "vit",
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": args.common.size, "patch_size": 4,
        "num_channels": 3, "qkv_bias": true
    });
    let cfg: VitConfig = serde_json::from_value(cfg_json.clone())?;
    tch::manual_seed(args.common.seed as i64);
    let vs = tch::nn::VarStore::new(device);
    let vit = Vit::new(vs.root(), &cfg)?;
    let mut trainer = ContrastiveTrainer::new(&vs, args.common.learning_rate, args.steps / 20, 0.05);
    let held = dino_held_out(&world, args.common.size, device)?;
    let eval = |vit: &Vit| dino_retrieval(vit, &held);
    let before = eval(&vit);
    let started = Instant::now();
    let mut last = f64::NAN;
    for step in 0..args.steps {
        let from = step * args.batch as u64;
        let pairs: Vec<_> = (from..from + args.batch as u64).map(|i| views(&world, i)).collect();
        let a = pixels(&pairs.iter().map(|v| v.0).collect::<Vec<_>>(), args.common.size, device)?;
        let b = pixels(&pairs.iter().map(|v| v.1).collect::<Vec<_>>(), args.common.size, device)?;
        last = trainer.step_pairs(&vit.cls_embedding(&a), &vit.cls_embedding(&b))?;
        if (step + 1) % 100 == 0 {
            tracing::info!(step = step + 1, loss = last, "pretrain dino");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = eval(&vit);
    write_json(&args.out.join("config.json"), &cfg_json)?;
    proxytune_models::weights::save_safetensors(&vs, &args.out.join("model.safetensors"))?;
    let manifest = serde_json::json!({
        "model": "world DINO-style instance encoder (ViTModel layout, CLS embedding)",
        "command": format!("proxytune pretrain dino --steps {} --batch {} --size {} --seed {} --learning-rate {}",
                           args.steps, args.batch, args.common.size, args.common.seed, args.common.learning_rate),
        "pairs_seen": args.steps * args.batch as u64,
        "final_loss": last,
        "held_out_instances": 128,
        "instance_retrieval_top1_before": before,
        "instance_retrieval_top1_after": after,
        "seconds": seconds,
    });
    finish(&args.out, &manifest)
}

/// Writes `value` as pretty JSON to `path`.
fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `manifest.json` in `out` with the SHA-256 of every file beside it, and prints it.
fn finish(out: &Path, manifest: &serde_json::Value) -> anyhow::Result<()> {
    let mut manifest = manifest.clone();
    let mut files = serde_json::Map::new();
    let mut names: Vec<PathBuf> = walk(out)?;
    names.sort();
    for path in names {
        let rel = path.strip_prefix(out)?.to_string_lossy().into_owned();
        if rel == "manifest.json" {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let digest = sha2::Sha256::digest(&bytes);
        files.insert(rel, serde_json::json!({"bytes": bytes.len(), "sha256": hex(&digest)}));
    }
    manifest["files"] = serde_json::Value::Object(files);
    write_json(&out.join("manifest.json"), &manifest)?;
    println!("{}", serde_json::to_string_pretty(&manifest)?);
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

/// Renders of scenes as `[B, 3, S, S]` in `[-1, 1]` on `device`.
fn signed_pixels(scenes: &[Scene], size: u32, device: Device) -> anyhow::Result<Tensor> {
    let images = scenes
        .iter()
        .map(|s| {
            let img = s.render(size);
            Ok(proxytune_models::scorers::preprocess::rgb8_to_tensor(size, size, img.as_raw(), Device::Cpu)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((Tensor::stack(&images, 0) * 2.0 - 1.0).to_device(device))
}

/// The fraction of `images` whose drawn context (by the renderer's classifier) is the context
/// their scene asked for: the world's exact prompt-adherence check.
fn context_accuracy(images: &[image::RgbImage], scenes: &[Scene]) -> f64 {
    let hits = images.iter().zip(scenes).filter(|(img, s)| classify_context(img) == s.context).count();
    hits as f64 / images.len().max(1) as f64
}

/// Held-out scenes for quality checks: `n` scenes, each context equally often, far from the
/// training indices.
fn held_out_scenes(world: &World, n: usize) -> Vec<Scene> {
    (0..n as u64)
        .map(|i| Scene { context: i as usize % 10, ..world.pretraining_scene(2_000_000_000 + i) })
        .collect()
}
