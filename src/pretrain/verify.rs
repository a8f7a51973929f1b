//! `proxytune pretrain verify`: loads every pretrained world model from its folder, re-measures the
//! held-out figures its manifest records, on the same held-out scenes, and compares: CLIP's
//! text-to-image and DINO's instance retrieval, the supervisor's VAE reconstruction and UNet
//! denoising loss, the student's VQ reconstruction and transformer cross-entropy, and the LlamaGen
//! student's VQ reconstruction and GPT cross-entropy.
//!
//! The held-out sets and noise are fixed by the world seed, so a re-measurement differs from the
//! manifest only by float rounding between CPUs (or a model that is not what its manifest says).
//! Tolerances: two of the 128 retrieval hits; 1 % of a loss or error.

use std::path::{Path, PathBuf};

use anyhow::Context;
use proxytune_actors::world::World;
use proxytune_models::ar::chameleon_vq::ChameleonVqDecoder;
use proxytune_models::ar::llamagen_vq::{LlamaGenVq, LlamaGenVqConfig};
use proxytune_models::ar::lumina::LuminaTokens;
use proxytune_models::ar::student::LlamaGenStudent;
use proxytune_models::ar::train::ChameleonStudent;
use proxytune_models::diffusion::pipeline::StableDiffusion;
use proxytune_models::diffusion::scheduler::NoiseSchedule;
use proxytune_models::tokenizer::clip::ClipTokenizer;
use proxytune_models::tokenizer::hf::{CaptionTokenizer, HfTokenizer};
use proxytune_models::transformer::clip::{Clip, ClipConfig};
use proxytune_models::transformer::t5::T5Encoder;
use proxytune_models::transformer::vit::{Vit, VitConfig};
use proxytune_models::weights::{load_safetensors, Strictness};
use tch::nn;

/// Arguments of `proxytune pretrain verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The world models' folder (`clip/`, `dino/`, `supervisor/`, `student/`, `llamagen/`, each
    /// with its `manifest.json`).
    #[arg(long, default_value = "models/world")]
    world: PathBuf,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// One re-measured figure.
struct Figure {
    model: &'static str,
    /// Its path in the manifest.
    key: &'static str,
    manifest: f64,
    measured: f64,
    tolerance: f64,
}

impl Figure {
    fn new(
        model: &'static str,
        key: &'static str,
        manifest: &serde_json::Value,
        measured: f64,
    ) -> anyhow::Result<Self> {
        let recorded = key
            .split('.')
            .fold(manifest, |v, part| &v[part])
            .as_f64()
            .with_context(|| format!("{model}/manifest.json has no number at `{key}`"))?;
        // Retrieval top-1 over 128 held-out items moves in steps of 1/128; losses are continuous.
        let tolerance = if key.contains("retrieval") { 2.0 / 128.0 } else { 0.01 * recorded.abs() };
        Ok(Figure { model, key, manifest: recorded, measured, tolerance })
    }

    fn holds(&self) -> bool {
        (self.measured - self.manifest).abs() <= self.tolerance
    }
}

fn manifest(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

/// A `--flag N` of the manifest's recorded command (the seed and image size it was trained with).
fn flag(manifest: &serde_json::Value, name: &str) -> anyhow::Result<u64> {
    let command = manifest["command"].as_str().context("the manifest records no command")?;
    let mut words = command.split_whitespace();
    words
        .find(|w| *w == name)
        .and_then(|_| words.next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("the manifest's command `{command}` has no `{name} N`"))
}

/// Runs `proxytune pretrain verify`: prints every figure beside its manifest's and fails naming
/// those outside their tolerance.
pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let device = proxytune_models::device::parse_device(&args.device)?;
    let mut figures = Vec::new();

    let dir = args.world.join("clip");
    let m = manifest(&dir)?;
    let world = World::new(flag(&m, "--seed")?, 8);
    let size = flag(&m, "--size")? as u32;
    let tokenizer = ClipTokenizer::from_folder(&dir)?;
    let mut vs = nn::VarStore::new(device);
    let clip = Clip::new(vs.root(), &ClipConfig::from_json(&dir.join("config.json"))?)?;
    load_safetensors(&mut vs, &dir.join("model.safetensors"), Strictness::Strict)?;
    let held = super::clip_held_out(&world, &tokenizer, size, device)?;
    figures.push(Figure::new("clip", "retrieval_top1_after", &m, super::clip_retrieval(&clip, &held))?);

    let dir = args.world.join("dino");
    let m = manifest(&dir)?;
    let world = World::new(flag(&m, "--seed")?, 8);
    let mut vs = nn::VarStore::new(device);
    let vit = Vit::new(vs.root(), &VitConfig::from_json(&dir.join("config.json"))?)?;
    load_safetensors(&mut vs, &dir.join("model.safetensors"), Strictness::Strict)?;
    let held = super::dino_held_out(&world, flag(&m, "--size")? as u32, device)?;
    figures.push(Figure::new(
        "dino",
        "instance_retrieval_top1_after",
        &m,
        super::dino_retrieval(&vit, &held),
    )?);

    let dir = args.world.join("supervisor");
    let m = manifest(&dir)?;
    let world = World::new(flag(&m, "--seed")?, 8);
    let size = flag(&m, "--size")? as u32;
    let sd = StableDiffusion::load(&dir, device)?;
    let held = super::supervisor::vae_held_out(&world, size, device)?;
    let mse = super::supervisor::vae_reconstruction_mse(&sd.vae, &held);
    figures.push(Figure::new("supervisor", "vae.held_out_reconstruction_mse", &m, mse)?);
    let (x, captions) = super::supervisor::unet_held_out(&world, size, device)?;
    let captions: Vec<&str> = captions.iter().map(String::as_str).collect();
    let loss = super::supervisor::held_out_loss(&sd, &NoiseSchedule::new(&sd.scheduler)?, &x, &captions)?;
    figures.push(Figure::new("supervisor", "unet.held_out_denoising_loss_after", &m, loss)?);

    let dir = args.world.join("student");
    let m = manifest(&dir)?;
    let world = World::new(flag(&m, "--seed")?, 8);
    let size = flag(&m, "--size")? as u32;
    let tokens: LuminaTokens = serde_json::from_value(m["lumina_tokens"].clone())
        .context("student/manifest.json: no `lumina_tokens`")?;
    let student = ChameleonStudent::load(&dir, device, None, tokens)?;
    let mut decoder_vs = nn::VarStore::new(device);
    let decoder = ChameleonVqDecoder::new(decoder_vs.root(), student.model.vq.config())?;
    load_safetensors(&mut decoder_vs, &dir.join("vq_decoder.safetensors"), Strictness::Strict)?;
    let held = super::signed_pixels(&super::held_out_scenes(&world, 128), size, device)?;
    let (mse, _) = super::student::vq_held_out(&student.model.vq, &decoder, &held)?;
    figures.push(Figure::new("student", "vq.held_out_reconstruction_mse", &m, mse)?);
    let tokenizer = HfTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let examples =
        super::student::to_examples(&student, &tokenizer, &super::held_out_scenes(&world, 64), size, device)?;
    let ce = super::student::held_out_cross_entropy(&student, &examples)?;
    figures.push(Figure::new("student", "transformer.held_out_cross_entropy_after", &m, ce)?);

    let dir = args.world.join("llamagen");
    let m = manifest(&dir)?;
    let world = World::new(flag(&m, "--seed")?, 8);
    let size = flag(&m, "--size")? as u32;
    let files = crate::world_models::llamagen_files(&dir);
    let mut vq_vs = nn::VarStore::new(device);
    let vq = LlamaGenVq::new(vq_vs.root(), &LlamaGenVqConfig::from_json(&dir.join("vq/config.json"))?)?;
    load_safetensors(&mut vq_vs, &dir.join("vq/model.safetensors"), Strictness::Strict)?;
    let held = super::signed_pixels(&super::held_out_scenes(&world, 128), size, device)?;
    let (mse, _) = super::llamagen::vq_held_out(&vq, &held)?;
    figures.push(Figure::new("llamagen", "vq.held_out_reconstruction_mse", &m, mse)?);
    let gpt = LlamaGenStudent::load(&files.dir, device, None, tch::Kind::Float)?;
    let (_t5_vs, t5) = T5Encoder::load(&dir.join("t5"), device, tch::Kind::Float)?;
    let gpt_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("gpt/config.json"))?)?;
    let length = gpt_config["cls_token_num"].as_u64().context("gpt/config.json: no cls_token_num")?;
    let tokenizer = CaptionTokenizer::from_file(&dir.join("t5/tokenizer.json"), length as usize, "<pad>")?;
    let ce = super::llamagen::held_out_cross_entropy(&gpt.model, &t5, &tokenizer, &vq, &world, size)?;
    figures.push(Figure::new("llamagen", "gpt.held_out_cross_entropy_after", &m, ce)?);

    println!("| model | held-out figure | manifest | re-measured | tolerance | |");
    println!("|---|---|---|---|---|---|");
    for f in &figures {
        let verdict = if f.holds() { "ok" } else { "OUTSIDE" };
        println!(
            "| {} | {} | {:.6} | {:.6} | ±{:.6} | {verdict} |",
            f.model, f.key, f.manifest, f.measured, f.tolerance
        );
    }
    let outside: Vec<String> = figures
        .iter()
        .filter(|f| !f.holds())
        .map(|f| {
            format!("{}/manifest.json `{}`: {} re-measured as {}", f.model, f.key, f.manifest, f.measured)
        })
        .collect();
    anyhow::ensure!(
        outside.is_empty(),
        "held-out figures differ from their manifests:\n{}",
        outside.join("\n")
    );
    Ok(())
}
