//! `proxytune pretrain llamagen`: the world's LlamaGen-style student, as the three folders a
//! `family = "llamagen"` student names: `gpt/` (the T2I GPT's arguments and weights under the
//! reference's keys), `vq/` (a VQ in LlamaGen's VQ-16 architecture, at factor 4 for 32-pixel
//! images) and `t5/` (a T5 encoder in transformers' `T5EncoderModel` layout with a word-level
//! `tokenizer.json` that ends every caption with `</s>`, as T5's does).
//!
//! First the VQ, on world renders with the straight-through estimator (reconstruction MSE,
//! codebook loss, 0.25 × commitment, over LlamaGen's l2-normalised latents and codebook), the
//! codebook initialised from encoder outputs and unused codes restarted every 100 steps. Then the
//! GPT from scratch on captioned world scenes, with the T5 encoder trained jointly: a real
//! student's Flan-T5 was pretrained on text, and a frozen random encoder would leave the GPT to
//! decode noise, so the world's encoder learns the world's captions here and is frozen after.
//! Its states reach the GPT rounded to bfloat16 (straight through), as the job stores them, and
//! prepared as LlamaGen prepares them (padding in front, masked); 10 % of captions are dropped for
//! the unconditional embedding. The manifest records the VQ's held-out reconstruction error and
//! codebook use, the GPT's held-out loss before and after, and how often samples of held-out
//! captions, drawn through the job's own student interface, show the asked-for context.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use proxytune_actors::world::{vocabulary, Scene, World};
use proxytune_models::ar::chameleon_vq::nearest_codes;
use proxytune_models::ar::llamagen::{left_padded_captions, LlamaGen, LlamaGenConfig, ParamInit};
use proxytune_models::ar::llamagen_vq::{LlamaGenVq, LlamaGenVqConfig};
use proxytune_models::ar::lumina::ImageSampling;
use proxytune_models::ar::student::StudentSampling;
use proxytune_models::optim::{AdamW, AdamWConfig};
use proxytune_models::rng::{Draws, Stream};
use proxytune_models::tokenizer::hf::CaptionTokenizer;
use proxytune_models::transformer::t5::{T5Config, T5Encoder};
use proxytune_models::weights::save_safetensors;
use tch::{Device, Kind, Tensor};

use super::{context_accuracy, finish, held_out_scenes, signed_pixels, write_json};

/// Arguments of `proxytune pretrain llamagen`.
#[derive(Debug, clap::Args)]
pub struct LlamaGenArgs {
    /// Output folder (`gpt/`, `vq/`, `t5/` and manifest.json).
    #[arg(long)]
    out: PathBuf,
    /// VQ optimiser steps.
    #[arg(long, default_value_t = 800)]
    vq_steps: u64,
    /// GPT (and caption encoder) optimiser steps.
    #[arg(long, default_value_t = 2000)]
    ar_steps: u64,
    /// Images (sequences) per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[command(flatten)]
    common: super::Common,
}

/// Codebook size (the GPT's vocabulary).
const CODES: i64 = 256;
/// Pixels per code along each side.
const FACTOR: u32 = 4;
/// Caption positions: the longest world caption and its `</s>` fit with room to spare.
const CAPTION_TOKENS: i64 = 24;
/// T5's special tokens, at T5's ids.
const SPECIALS: [&str; 3] = ["<pad>", "</s>", "<unk>"];

fn vq_config() -> LlamaGenVqConfig {
    LlamaGenVqConfig {
        codebook_size: CODES,
        codebook_embed_dim: 8,
        z_channels: 64,
        ch: 32,
        ch_mult: vec![1, 1, 2],
        num_res_blocks: 1,
    }
}

fn gpt_config(size: u32) -> LlamaGenConfig {
    LlamaGenConfig {
        dim: 128,
        n_layer: 3,
        n_head: 4,
        n_kv_head: None,
        multiple_of: 32,
        ffn_dim_multiplier: None,
        rope_base: 10000.0,
        norm_eps: 1e-5,
        vocab_size: CODES,
        cls_token_num: CAPTION_TOKENS,
        caption_dim: 64,
        grid_size: (size / FACTOR) as i64,
        class_dropout_prob: 0.1,
        init: ParamInit::Reference,
    }
}

/// The T5 folder's `config.json` (transformers' keys) and `tokenizer.json` (word level over the
/// world's words, lower-cased, `</s>` appended); returns the config.
fn write_t5_files(dir: &std::path::Path) -> anyhow::Result<T5Config> {
    let mut words: Vec<String> = SPECIALS.map(String::from).to_vec();
    for w in vocabulary() {
        if !words.iter().any(|x| x == w) {
            words.push(w.to_string());
        }
    }
    let vocab: serde_json::Map<String, serde_json::Value> =
        words.iter().enumerate().map(|(i, w)| (w.clone(), serde_json::json!(i))).collect();
    let eos = serde_json::json!({"SpecialToken": {"id": "</s>", "type_id": 0}});
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": SPECIALS.iter().enumerate().map(|(i, t)| serde_json::json!({
            "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true})).collect::<Vec<_>>(),
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, eos],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, eos, {"Sequence": {"id": "B", "type_id": 0}}, eos],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    let config = serde_json::json!({
        "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": words.len(),
        "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 16, "relative_attention_max_distance": 32,
        "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": false,
        "pad_token_id": 0, "eos_token_id": 1, "dropout_rate": 0.0, "tie_word_embeddings": false
    });
    write_json(&dir.join("config.json"), &config)?;
    Ok(serde_json::from_value(config)?)
}

fn scenes(world: &World, from: u64, n: usize) -> Vec<Scene> {
    (from..from + n as u64).map(|i| world.pretraining_scene(i)).collect()
}

/// Trains the VQ; returns (held-out reconstruction MSE, codebook use, seconds).
fn train_vq(
    args: &LlamaGenArgs,
    world: &World,
    vq: &LlamaGenVq,
    vs: &tch::nn::VarStore,
    device: Device,
) -> anyhow::Result<(f64, f64, f64)> {
    let started = Instant::now();
    let mut opt = AdamW::new(
        vs.variables().into_iter().collect(),
        AdamWConfig { weight_decay: 0.0, ..Default::default() },
    );
    let codebook = vq.codebook().shallow_clone();
    for step in 0..args.vq_steps {
        let x =
            signed_pixels(&scenes(world, step * args.batch as u64, args.batch), args.common.size, device)?;
        let z = vq.encode_latent(&x)?; // unit vectors [B, D, h, w]
        let d = z.size()[1];
        if step % 100 == 0 {
            // Initialise (step 0) or restart unused codes from this batch's latents.
            let flat = z.detach().permute([0, 2, 3, 1]).reshape([-1, d]);
            let codes = nearest_codes(&z.detach(), &vq.unit_codebook()).flatten(0, -1);
            let used = codes.bincount::<Tensor>(None, CODES);
            tch::no_grad(|| {
                let fresh =
                    flat.index_select(0, &Tensor::randint(flat.size()[0], [CODES], (Kind::Int64, device)));
                let dead = if step == 0 { used.ones_like().to_kind(Kind::Bool) } else { used.eq(0) };
                codebook.shallow_clone().copy_(&fresh.where_self(&dead.unsqueeze(1), &codebook));
            });
        }
        let unit = vq.unit_codebook();
        let codes = nearest_codes(&z.detach(), &unit.detach());
        let (b, h, w) = codes.size3()?;
        let e = unit.index_select(0, &codes.flatten(0, -1)).view([b, h, w, d]).permute([0, 3, 1, 2]);
        let codebook_loss = e.mse_loss(&z.detach(), tch::Reduction::Mean);
        let commitment = z.mse_loss(&e.detach(), tch::Reduction::Mean);
        let zq = &z + (&e - &z).detach();
        let recon = vq.decode_latent(&zq).mse_loss(&x, tch::Reduction::Mean);
        let loss = &recon + codebook_loss + commitment * 0.25;
        let value = recon.double_value(&[]);
        anyhow::ensure!(value.is_finite(), "VQ loss is {value} at step {}", step + 1);
        opt.zero_grad();
        loss.backward();
        opt.clipped_step(1.0, args.common.learning_rate, 50)?;
        if (step + 1) % 100 == 0 {
            tracing::info!(step = step + 1, reconstruction = value, "pretrain llamagen: vq");
        }
    }
    let held = signed_pixels(&held_out_scenes(world, 128), args.common.size, device)?;
    let (mse, used) = vq_held_out(vq, &held)?;
    Ok((mse, used, started.elapsed().as_secs_f64()))
}

/// The VQ's held-out reconstruction MSE (encode to codes, decode) over `held` (`[-1, 1]`) and the
/// share of the codebook its codes use.
pub(super) fn vq_held_out(vq: &LlamaGenVq, held: &Tensor) -> anyhow::Result<(f64, f64)> {
    tch::no_grad(|| -> anyhow::Result<(f64, f64)> {
        let codes = vq.encode(held)?;
        let mse = vq.decode(&codes)?.mse_loss(held, tch::Reduction::Mean).double_value(&[]);
        let distinct: HashSet<i64> = Vec::<i64>::try_from(codes.flatten(0, -1))?.into_iter().collect();
        Ok((mse, distinct.len() as f64 / CODES as f64))
    })
}

/// The GPT's mean next-code cross-entropy over the 64 held-out scenes, no caption dropped.
pub(super) fn held_out_cross_entropy(
    gpt: &LlamaGen,
    t5: &T5Encoder,
    tokenizer: &CaptionTokenizer,
    vq: &LlamaGenVq,
    world: &World,
    size: u32,
) -> anyhow::Result<f64> {
    let held = held_out_scenes(world, 64);
    let pixels = signed_pixels(&held, size, gpt.device())?;
    tch::no_grad(|| {
        let codes = vq.encode(&pixels)?.flatten(1, -1);
        let (ce, _) = losses(gpt, t5, tokenizer, &held, &codes, &vec![false; held.len()])?;
        Ok(ce.double_value(&[]))
    })
}

/// The GPT's next-code cross-entropy and z-loss for `scenes` (codes `[B, N]` given), the
/// captions through the T5 encoder with LlamaGen's preparation; `drop[i]` replaces caption `i`
/// with the unconditional embedding.
fn losses(
    gpt: &LlamaGen,
    t5: &T5Encoder,
    tokenizer: &CaptionTokenizer,
    scenes: &[Scene],
    codes: &Tensor,
    drop: &[bool],
) -> anyhow::Result<(Tensor, Tensor)> {
    let captions: Vec<String> = scenes.iter().map(|s| s.caption(None)).collect();
    let texts: Vec<&str> = captions.iter().map(String::as_str).collect();
    let (ids, mask) = tokenizer.encode_batch(&texts, codes.device())?;
    let states = t5.forward(&ids, Some(&mask));
    // bfloat16 as the job stores them, the gradient passed straight through.
    let states = &states + (states.to_kind(Kind::BFloat16).to_kind(Kind::Float) - &states).detach();
    let (features, caption_mask) = left_padded_captions(&states, &mask)?;
    Ok(gpt.losses(&features, Some(&caption_mask), drop, codes)?)
}

/// Runs `proxytune pretrain llamagen`.
pub fn run(args: LlamaGenArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.vq_steps > 0 && args.ar_steps > 0 && args.batch > 0,
        "--vq-steps, --ar-steps and --batch must be positive"
    );
    anyhow::ensure!(args.common.size == 32, "--size: the world student is built for 32-pixel images");
    let (gpt_dir, vq_dir, t5_dir) = (args.out.join("gpt"), args.out.join("vq"), args.out.join("t5"));
    for dir in [&gpt_dir, &vq_dir, &t5_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let device = proxytune_models::device::parse_device(&args.common.device)?;
    let world = World::new(args.common.seed, 8);
    tch::manual_seed(args.common.seed as i64);
    let started = Instant::now();

    let vq_cfg = vq_config();
    let vq_vs = tch::nn::VarStore::new(device);
    let vq = LlamaGenVq::new(vq_vs.root(), &vq_cfg)?;
    let (vq_mse, codebook_use, vq_seconds) = train_vq(&args, &world, &vq, &vq_vs, device)?;
    write_json(&vq_dir.join("config.json"), &serde_json::to_value(&vq_cfg)?)?;
    save_safetensors(&vq_vs, &vq_dir.join("model.safetensors"))?;

    let t5_cfg = write_t5_files(&t5_dir)?;
    let tokenizer =
        CaptionTokenizer::from_file(&t5_dir.join("tokenizer.json"), CAPTION_TOKENS as usize, "<pad>")?;
    let t5_vs = tch::nn::VarStore::new(device);
    let t5 = T5Encoder::new(t5_vs.root(), &t5_cfg)?;
    let cfg = gpt_config(args.common.size);
    let gpt_vs = tch::nn::VarStore::new(device);
    let gpt = LlamaGen::new(gpt_vs.root(), &cfg, None)?;
    let params: Vec<(String, Tensor)> = gpt_vs
        .variables()
        .into_iter()
        .map(|(k, v)| (format!("gpt.{k}"), v))
        .chain(t5_vs.variables().into_iter().map(|(k, v)| (format!("t5.{k}"), v)))
        .collect();
    let mut opt = AdamW::new(params, AdamWConfig { weight_decay: 0.01, ..Default::default() });
    let encode = |scenes: &[Scene]| -> anyhow::Result<Tensor> {
        let pixels = signed_pixels(scenes, args.common.size, device)?;
        Ok(tch::no_grad(|| vq.encode(&pixels))?.flatten(1, -1))
    };
    let held_loss = || held_out_cross_entropy(&gpt, &t5, &tokenizer, &vq, &world, args.common.size);
    let loss_before = held_loss()?;
    let ar_started = Instant::now();
    let mut last = f64::NAN;
    // Pre-encoded chunks of scenes, so the VQ runs in large batches.
    let chunk = 512usize;
    let mut pool: Vec<(Scene, Tensor)> = Vec::new();
    for step in 0..args.ar_steps {
        if pool.len() < args.batch {
            let batch = scenes(&world, 20_000_000 + step * args.batch as u64, chunk);
            let codes = encode(&batch)?;
            pool.extend(batch.into_iter().enumerate().map(|(i, s)| (s, codes.get(i as i64))));
        }
        let taken: Vec<(Scene, Tensor)> = pool.drain(..args.batch).collect();
        let batch_scenes: Vec<Scene> = taken.iter().map(|(s, _)| *s).collect();
        let codes = Tensor::stack(&taken.iter().map(|(_, c)| c.shallow_clone()).collect::<Vec<_>>(), 0);
        let mut draws = Draws::new(args.common.seed, Stream::Train, step);
        let drop: Vec<bool> = (0..args.batch).map(|_| draws.unit() < 0.1).collect();
        let (ce, z) = losses(&gpt, &t5, &tokenizer, &batch_scenes, &codes, &drop)?;
        let loss = &ce + z * 1e-5;
        last = ce.double_value(&[]);
        anyhow::ensure!(last.is_finite(), "GPT loss is {last} at step {}", step + 1);
        opt.zero_grad();
        loss.backward();
        opt.clipped_step(1.0, args.common.learning_rate, 100)?;
        if (step + 1) % 100 == 0 {
            tracing::info!(step = step + 1, loss = last, "pretrain llamagen: gpt");
        }
    }
    let ar_seconds = ar_started.elapsed().as_secs_f64();
    let loss_after = held_loss()?;
    write_json(&gpt_dir.join("config.json"), &serde_json::to_value(&cfg)?)?;
    save_safetensors(&gpt_vs, &gpt_dir.join("model.safetensors"))?;
    save_safetensors(&t5_vs, &t5_dir.join("model.safetensors"))?;

    // Prompt adherence through the job's own student interface: the saved folders loaded as a
    // `llamagen` student, 20 held-out captions (two per context), one seed each.
    let sampling = StudentSampling {
        grid: cfg.grid_size,
        image: ImageSampling { guidance_scale: 3.0, image_top_k: Some(64), top_p: None, temperature: 1.0 },
        tokens: Default::default(),
        bf16: false,
        batch: 16,
    };
    let sampler =
        crate::world_models::llamagen_files(&args.out).load_sampler(device, None, sampling.clone())?;
    let held = held_out_scenes(&world, 20);
    let probe = &held[..];
    let mut images = Vec::new();
    for (i, s) in probe.iter().enumerate() {
        let pixels = sampler.sample(&s.caption(None), &[i as u64])?;
        images.push(proxytune_actors::stages::intake::tensor_to_rgb(&pixels.get(0))?);
    }
    let adherence = context_accuracy(&images, probe);
    let count = |vs: &tch::nn::VarStore| vs.variables().values().map(|v| v.numel()).sum::<usize>();
    let manifest = serde_json::json!({
        "model": "world LlamaGen-style student (gpt/: T2I GPT, vq/: VQ in the VQ-16 architecture, t5/: T5 encoder)",
        "command": format!(
            "proxytune pretrain llamagen --vq-steps {} --ar-steps {} --batch {} --size {} --seed {} --learning-rate {}",
            args.vq_steps, args.ar_steps, args.batch, args.common.size, args.common.seed, args.common.learning_rate),
        "seed": args.common.seed,
        "vq": { "codebook": CODES, "grid": cfg.grid_size, "images_seen": args.vq_steps * args.batch as u64,
                "held_out_reconstruction_mse": vq_mse, "codebook_use": codebook_use, "seconds": vq_seconds },
        "caption_encoder": { "parameters": count(&t5_vs), "caption_tokens": CAPTION_TOKENS,
                             "trained": "jointly with the GPT, then frozen" },
        "gpt": { "parameters": count(&gpt_vs), "sequences_seen": args.ar_steps * args.batch as u64,
                 "final_cross_entropy": last, "held_out_cross_entropy_before": loss_before,
                 "held_out_cross_entropy_after": loss_after, "seconds": ar_seconds },
        "prompt_adherence": { "samples": 20, "sampling": sampling.image, "context_accuracy": adherence,
                              "chance": 0.1 },
        "seconds": started.elapsed().as_secs_f64(),
    });
    finish(&args.out, &manifest)
}
