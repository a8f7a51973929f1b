//! `proxytune pretrain supervisor`: the world's Stable Diffusion, as a diffusers model folder the
//! supervisor path loads unchanged. The text encoder is the world CLIP's text tower (frozen; its
//! `text_model.*` weights and word-level BPE vocabulary are copied), the `AutoencoderKL` is trained
//! on world renders (reconstruction plus a small KL term; the scaling factor is then set to
//! `1 / std` of the latents, diffusers' convention), and the `UNet2DConditionModel` is trained on
//! the latents of captioned world scenes with epsilon prediction under the DDPM scaled-linear
//! schedule, dropping 10 % of captions so classifier-free guidance has an unconditional model.
//! The manifest records the VAE's held-out reconstruction error, the UNet's held-out denoising
//! loss before and after, and prompt adherence: how often DDIM samples of held-out captions show
//! the asked-for context (the renderer's exact check).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use proxytune_actors::stages::diffusion_sampling::{sample_images, SamplingConfig, UnetPrecision};
use proxytune_actors::world::{Scene, World};
use proxytune_models::diffusion::pipeline::{SamplerKind, StableDiffusion};
use proxytune_models::diffusion::scheduler::NoiseSchedule;
use proxytune_models::diffusion::unet::{UNet2DConditionModel, UNetConfig};
use proxytune_models::diffusion::vae::{AutoencoderKl, VaeConfig};
use proxytune_models::optim::{AdamW, AdamWConfig};
use proxytune_models::rng::{Draws, Stream};
use proxytune_models::weights::{read_safetensors, save_safetensors, write_safetensors};
use tch::{Device, Kind, Tensor};

use super::{context_accuracy, finish, held_out_scenes, signed_pixels, write_json};

/// Arguments of `proxytune pretrain supervisor`.
#[derive(Debug, clap::Args)]
pub struct SupervisorArgs {
    /// Output folder (a diffusers model folder plus manifest.json).
    #[arg(long)]
    out: PathBuf,
    /// The world CLIP folder (`proxytune pretrain clip`): its text tower is the text encoder.
    #[arg(long)]
    clip: PathBuf,
    /// VAE optimiser steps.
    #[arg(long, default_value_t = 1000)]
    vae_steps: u64,
    /// UNet optimiser steps.
    #[arg(long, default_value_t = 3000)]
    unet_steps: u64,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[command(flatten)]
    common: super::Common,
}

fn vae_config(size: u32, scaling_factor: f64) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "act_fn": "silu",
        "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        "norm_num_groups": 8, "sample_size": size, "scaling_factor": scaling_factor,
        "mid_block_add_attention": true, "force_upcast": true
    })
}

fn unet_config(latent: u32, cross_attention_dim: i64) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "act_fn": "silu",
        "attention_head_dim": 4, "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": cross_attention_dim, "in_channels": 4, "out_channels": 4,
        "layers_per_block": 1, "norm_num_groups": 16, "norm_eps": 1e-5, "sample_size": latent,
        "flip_sin_to_cos": true, "freq_shift": 0, "transformer_layers_per_block": 1,
        "use_linear_projection": false, "center_input_sample": false, "downsample_padding": 1
    })
}

fn scheduler_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1", "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": false,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": false,
        "steps_offset": 1, "timestep_spacing": "leading"
    })
}

fn model_index() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [null, null],
        "feature_extractor": [null, null], "requires_safety_checker": false
    })
}

/// Copies the world CLIP's text tower and vocabulary into `out/text_encoder` and `out/tokenizer`;
/// returns the tower's width (the UNet's cross-attention width).
fn text_encoder(clip: &Path, out: &Path) -> anyhow::Result<i64> {
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()));
    let clip_cfg: serde_json::Value = serde_json::from_str(&read(clip.join("config.json"))?)
        .with_context(|| format!("{} is not JSON", clip.join("config.json").display()))?;
    let mut text = clip_cfg["text_config"].clone();
    anyhow::ensure!(text.is_object(), "{} has no text_config: not a CLIP folder", clip.display());
    text["architectures"] = serde_json::json!(["CLIPTextModel"]);
    text["model_type"] = "clip_text_model".into();
    text["projection_dim"] = clip_cfg["projection_dim"].clone();
    let width = text["hidden_size"].as_i64().context("text_config.hidden_size")?;
    std::fs::create_dir_all(out.join("text_encoder"))?;
    std::fs::create_dir_all(out.join("tokenizer"))?;
    write_json(&out.join("text_encoder/config.json"), &text)?;
    let tower: Vec<(String, Tensor)> = read_safetensors(&clip.join("model.safetensors"))?
        .into_iter()
        .filter(|(k, _)| k.starts_with("text_model."))
        .collect();
    anyhow::ensure!(!tower.is_empty(), "{} has no text_model.* weights", clip.display());
    write_safetensors(tower, &out.join("text_encoder/model.safetensors"))?;
    for file in ["vocab.json", "merges.txt"] {
        std::fs::copy(clip.join(file), out.join("tokenizer").join(file))
            .with_context(|| format!("{} lacks {file}", clip.display()))?;
    }
    write_json(&out.join("tokenizer/tokenizer_config.json"), &tokenizer_config(&text)?)?;
    Ok(width)
}

/// The `tokenizer_config.json` transformers' `CLIPTokenizer` needs to load the folder as the
/// reference pipeline does: its class, special tokens and maximum length (the text tower's
/// positions; without it the tokenizer pads to no length and the pipeline fails).
fn tokenizer_config(text_config: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let positions =
        text_config["max_position_embeddings"].as_i64().context("text_config.max_position_embeddings")?;
    Ok(serde_json::json!({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": positions,
        "do_lower_case": true,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }))
}

fn scenes(world: &World, from: u64, n: usize) -> Vec<Scene> {
    (from..from + n as u64).map(|i| world.pretraining_scene(i)).collect()
}

/// Trains the VAE; returns (held-out reconstruction MSE in `[-1, 1]` units, scaling factor).
fn train_vae(args: &SupervisorArgs, world: &World, device: Device) -> anyhow::Result<(f64, f64, f64)> {
    let dir = args.out.join("vae");
    std::fs::create_dir_all(&dir)?;
    write_json(&dir.join("config.json"), &vae_config(args.common.size, 1.0))?;
    let cfg = VaeConfig::from_json(&dir.join("config.json"))?;
    let vs = tch::nn::VarStore::new(device);
    let vae = AutoencoderKl::new(vs.root(), &cfg);
    let mut opt = AdamW::new(
        vs.variables().into_iter().collect(),
        AdamWConfig { weight_decay: 0.0, ..Default::default() },
    );
    let held = vae_held_out(world, args.common.size, device)?;
    let mut last = f64::NAN;
    for step in 0..args.vae_steps {
        let x =
            signed_pixels(&scenes(world, step * args.batch as u64, args.batch), args.common.size, device)?;
        let mut draws = Draws::new(args.common.seed, Stream::Train, step);
        let (mean, logvar) = vae.encode(&x);
        let z = AutoencoderKl::sample_latent(&mean, &logvar, &draws.normal(&mean.size(), device));
        let recon = vae.decode(&z).mse_loss(&x, tch::Reduction::Mean);
        let kl = (mean.square() + logvar.exp() - 1.0 - &logvar).mean(Kind::Float) * 0.5;
        let loss = &recon + kl * 1e-4;
        last = recon.double_value(&[]);
        anyhow::ensure!(last.is_finite(), "VAE loss is {last} at step {}", step + 1);
        opt.zero_grad();
        loss.backward();
        opt.clipped_step(1.0, args.common.learning_rate, 50)?;
        if (step + 1) % 100 == 0 {
            tracing::info!(step = step + 1, reconstruction = last, "pretrain supervisor: vae");
        }
    }
    let mse = vae_reconstruction_mse(&vae, &held);
    let std = tch::no_grad(|| vae.encode(&held).0.std(true).double_value(&[]));
    let scaling = 1.0 / std.max(1e-6);
    write_json(&dir.join("config.json"), &vae_config(args.common.size, scaling))?;
    save_safetensors(&vs, &dir.join("diffusion_pytorch_model.safetensors"))?;
    Ok((mse, scaling, last))
}

/// The VAE's held-out images: 128 scenes far from the training ones, in `[-1, 1]`.
pub(super) fn vae_held_out(world: &World, size: u32, device: Device) -> anyhow::Result<Tensor> {
    signed_pixels(&held_out_scenes(world, 128), size, device)
}

/// Mean squared error of decoding the encoded means of `held`.
pub(super) fn vae_reconstruction_mse(vae: &AutoencoderKl, held: &Tensor) -> f64 {
    tch::no_grad(|| vae.decode(&vae.encode(held).0).mse_loss(held, tch::Reduction::Mean).double_value(&[]))
}

/// The UNet's held-out images and captions: 64 scenes far from the training ones.
pub(super) fn unet_held_out(
    world: &World,
    size: u32,
    device: Device,
) -> anyhow::Result<(Tensor, Vec<String>)> {
    let held = held_out_scenes(world, 64);
    Ok((signed_pixels(&held, size, device)?, held.iter().map(|s| s.caption(None)).collect()))
}

/// The mean denoising loss over `scenes` at fixed timesteps and noise (seeded): comparable
/// before and after training.
pub(super) fn held_out_loss(
    sd: &StableDiffusion,
    schedule: &NoiseSchedule,
    x: &Tensor,
    captions: &[&str],
) -> anyhow::Result<f64> {
    tch::no_grad(|| {
        let device = x.device();
        let mut draws = Draws::new(99, Stream::Train, u64::MAX);
        let (mean, _) = sd.vae.encode(x);
        let latents = mean * sd.vae.scaling_factor;
        let n = latents.size()[0] as usize;
        let timesteps: Vec<i64> = (0..n).map(|i| 50 + (i as i64 * 900) / n as i64).collect();
        let noise = draws.normal(&latents.size(), device);
        let noisy = schedule.add_noise(&latents, &noise, &timesteps);
        let cond = sd.encode_prompts(captions)?;
        let t = Tensor::from_slice(&timesteps).to_device(device);
        let pred = sd.predict(&noisy, &t, &cond)?;
        Ok(pred
            .mse_loss(&schedule.target(&latents, &noise, &timesteps), tch::Reduction::Mean)
            .double_value(&[]))
    })
}

/// Runs `proxytune pretrain supervisor`.
pub fn run(args: SupervisorArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.vae_steps > 0 && args.unet_steps > 0 && args.batch > 0,
        "--vae-steps, --unet-steps and --batch must be positive"
    );
    anyhow::ensure!(
        args.common.size.is_multiple_of(8) && args.common.size >= 16,
        "--size must be a multiple of 8, at least 16"
    );
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let device = proxytune_models::device::parse_device(&args.common.device)?;
    let world = World::new(args.common.seed, 8);
    tch::manual_seed(args.common.seed as i64);
    let started = Instant::now();
    let width = text_encoder(&args.clip, &args.out)?;
    std::fs::create_dir_all(args.out.join("scheduler"))?;
    write_json(&args.out.join("scheduler/scheduler_config.json"), &scheduler_config())?;
    write_json(&args.out.join("model_index.json"), &model_index())?;
    let (vae_mse, scaling, vae_last) = train_vae(&args, &world, device)?;
    let vae_seconds = started.elapsed().as_secs_f64();

    let unet_dir = args.out.join("unet");
    std::fs::create_dir_all(&unet_dir)?;
    write_json(&unet_dir.join("config.json"), &unet_config(args.common.size / 4, width))?;
    {
        let vs = tch::nn::VarStore::new(device);
        let _unet =
            UNet2DConditionModel::new(vs.root(), &UNetConfig::from_json(&unet_dir.join("config.json"))?)?;
        save_safetensors(&vs, &unet_dir.join("diffusion_pytorch_model.safetensors"))?;
    }
    let mut sd = StableDiffusion::load(&args.out, device)?;
    sd.stores.vae.freeze();
    sd.stores.text_encoder.freeze();
    let schedule = NoiseSchedule::new(&sd.scheduler)?;
    let held = held_out_scenes(&world, 64); // also the prompt-adherence probe below
    let (held_x, held_captions) = unet_held_out(&world, args.common.size, device)?;
    let held_refs: Vec<&str> = held_captions.iter().map(String::as_str).collect();
    let loss_before = held_out_loss(&sd, &schedule, &held_x, &held_refs)?;
    let params: Vec<(String, Tensor)> = sd.stores.unet.variables().into_iter().collect();
    let mut opt = AdamW::new(params, AdamWConfig::default());
    let unet_started = Instant::now();
    let mut last = f64::NAN;
    for step in 0..args.unet_steps {
        let batch = scenes(&world, 10_000_000 + step * args.batch as u64, args.batch);
        let x = signed_pixels(&batch, args.common.size, device)?;
        let mut draws = Draws::new(args.common.seed, Stream::Train, 1_000_000 + step);
        let (mean, logvar) = tch::no_grad(|| sd.vae.encode(&x));
        let latents = AutoencoderKl::sample_latent(&mean, &logvar, &draws.normal(&mean.size(), device))
            * sd.vae.scaling_factor;
        let captions: Vec<String> =
            batch.iter().map(|s| if draws.unit() < 0.1 { String::new() } else { s.caption(None) }).collect();
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let cond = tch::no_grad(|| sd.encode_prompts(&refs))?;
        let timesteps = draws.below(schedule.alphas_cumprod().len() as u64, args.batch);
        let noise = draws.normal(&latents.size(), device);
        let noisy = schedule.add_noise(&latents, &noise, &timesteps);
        let t = Tensor::from_slice(&timesteps).to_device(device);
        let loss = sd
            .predict(&noisy, &t, &cond)?
            .mse_loss(&schedule.target(&latents, &noise, &timesteps), tch::Reduction::Mean);
        last = loss.double_value(&[]);
        anyhow::ensure!(last.is_finite(), "UNet loss is {last} at step {}", step + 1);
        opt.zero_grad();
        loss.backward();
        opt.clipped_step(1.0, args.common.learning_rate, 100)?;
        if (step + 1) % 100 == 0 {
            tracing::info!(step = step + 1, loss = last, "pretrain supervisor: unet");
        }
    }
    let unet_seconds = unet_started.elapsed().as_secs_f64();
    let loss_after = held_out_loss(&sd, &schedule, &held_x, &held_refs)?;
    save_safetensors(&sd.stores.unet, &unet_dir.join("diffusion_pytorch_model.safetensors"))?;

    // Prompt adherence: DDIM samples of 20 held-out captions (two per context).
    let sampling = SamplingConfig {
        num_inference_steps: 25,
        guidance_scale: 5.0,
        sampler: SamplerKind::Ddim,
        resolution: args.common.size,
        negative_prompt: String::new(),
        batch_images: 20,
        unet_precision: UnetPrecision::Fp32,
        vae_slicing: false,
    };
    let probe = &held[..20];
    let probe_captions: Vec<&str> = held_refs[..20].to_vec();
    let seeds: Vec<u64> = (0..20).collect();
    let images = sample_images(&sd, &probe_captions, &seeds, &sampling)?;
    let adherence = context_accuracy(&images, probe);
    let unconditional = sample_images(&sd, &[""; 20], &seeds, &sampling)?;
    let chance = context_accuracy(&unconditional, probe);
    let params = sd.stores.unet.variables().values().map(Tensor::numel).sum::<usize>();
    let manifest = serde_json::json!({
        "model": "world Stable Diffusion (diffusers folder: world CLIP text tower, AutoencoderKL, UNet2DConditionModel)",
        "command": format!(
            "proxytune pretrain supervisor --clip <world clip> --vae-steps {} --unet-steps {} --batch {} --size {} --seed {} --learning-rate {}",
            args.vae_steps, args.unet_steps, args.batch, args.common.size, args.common.seed, args.common.learning_rate),
        "seed": args.common.seed,
        "vae": { "images_seen": args.vae_steps * args.batch as u64, "final_reconstruction_mse": vae_last,
                 "held_out_reconstruction_mse": vae_mse, "scaling_factor": scaling, "seconds": vae_seconds },
        "unet": { "parameters": params, "images_seen": args.unet_steps * args.batch as u64,
                  "final_loss": last, "held_out_denoising_loss_before": loss_before,
                  "held_out_denoising_loss_after": loss_after, "seconds": unet_seconds },
        "prompt_adherence": { "samples": 20, "sampler": "DDIM 25 steps, guidance 5",
                              "context_accuracy": adherence, "context_accuracy_unconditional": chance },
        "seconds": started.elapsed().as_secs_f64(),
    });
    finish(&args.out, &manifest)
}
