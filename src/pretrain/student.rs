//! `proxytune pretrain student`: the world's Lumina-mGPT-style student, as a Chameleon folder the
//! student path loads unchanged (`config.json` with its vocabulary map, `model.safetensors` with
//! `model.vqmodel.*`, `tokenizer.json`, `vq_decoder.safetensors`, plus `lumina_tokens.json` naming
//! the structure tokens).
//!
//! First the VQ tokenizer: the Chameleon VQ encoder and the decoder in the original tokenizer
//! layout, trained together on world renders with the straight-through estimator (reconstruction
//! MSE, codebook loss, 0.25 × commitment), the codebook initialised from encoder outputs and
//! unused codes restarted from the batch every 100 steps. Then the transformer, from scratch, on
//! the Lumina-mGPT text-to-image sequences of captioned world scenes (next-token loss on the image
//! part, 10 % of prompts dropped for guidance). The text vocabulary is word-level: the world's
//! words and the instruction's. The manifest records the VQ's held-out reconstruction error and
//! codebook use, the transformer's held-out loss before and after, and how often its samples of
//! held-out captions show the asked-for context.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use proxytune_actors::world::{vocabulary, Scene, World};
use proxytune_models::ar::chameleon::{Chameleon, ChameleonConfig};
use proxytune_models::ar::chameleon_vq::{nearest_codes, ChameleonVqDecoder, ChameleonVqVae};
use proxytune_models::ar::lumina::{sample_image_tokens, t2i_instruction, ImageSampling, LuminaTokens};
use proxytune_models::ar::train::{ArExample, ArTrainConfig, ArTrainer, ChameleonStudent};
use proxytune_models::optim::{AdamW, AdamWConfig};
use proxytune_models::tokenizer::hf::HfTokenizer;
use proxytune_models::weights::save_safetensors;
use tch::{Device, Kind, Tensor};

use super::{context_accuracy, finish, held_out_scenes, signed_pixels, write_json};

/// Arguments of `proxytune pretrain student`.
#[derive(Debug, clap::Args)]
pub struct StudentArgs {
    /// Output folder (a Chameleon folder plus manifest.json).
    #[arg(long)]
    out: PathBuf,
    /// VQ tokenizer optimiser steps.
    #[arg(long, default_value_t = 800)]
    vq_steps: u64,
    /// Transformer optimiser steps.
    #[arg(long, default_value_t = 2000)]
    ar_steps: u64,
    /// Images (sequences) per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[command(flatten)]
    common: super::Common,
}

/// Codebook size.
const CODES: i64 = 256;
/// Pixels per code along each side.
const FACTOR: u32 = 4;
/// The Lumina-mGPT structure tokens, by name.
const STRUCTURE: [&str; 4] = ["<reserved08706>", "<racm3:break>", "<eoss>", "<reserved08799>"];
/// Size tokens `<reserved08800>` … (size `n` in 32-pixel units).
const SIZE_TOKENS: i64 = 5;

/// Chameleon's name of the image token of `code`: `IMGIMG`, the decimal digits spelled `A`–`J`, `Z`.
fn image_token_name(code: i64) -> String {
    let digits: String = code.to_string().bytes().map(|d| (d + 17) as char).collect();
    format!("IMGIMG{digits}Z")
}

/// The text words (specials, the instruction's words, the world's) in id order.
fn text_words(size: u32) -> Vec<String> {
    let mut words: Vec<String> = ["<unk>", "<s>", "</s>", "<pad>", "<image>"].map(String::from).to_vec();
    let instruction = t2i_instruction("", size, size).to_lowercase();
    let pieces = instruction
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(String::from)
        .chain([":".to_string()])
        .chain(vocabulary().into_iter().map(String::from));
    for w in pieces {
        if !words.contains(&w) {
            words.push(w);
        }
    }
    words
}

fn vq_config(size: u32) -> serde_json::Value {
    serde_json::json!({
        "model_type": "chameleon_vqgan", "embed_dim": 16, "num_embeddings": CODES, "latent_channels": 16,
        "resolution": size, "in_channels": 3, "base_channels": 32, "channel_multiplier": [1, 1, 2],
        "num_res_blocks": 1, "attn_resolutions": [], "attn_type": "vanilla", "double_latent": false,
        "dropout": 0.0
    })
}

/// `config.json`, `tokenizer.json` and `lumina_tokens.json`; returns the structure tokens.
fn write_configs(args: &StudentArgs) -> anyhow::Result<LuminaTokens> {
    let words = text_words(args.common.size);
    let mut map: BTreeMap<String, i64> = BTreeMap::new();
    let mut next = 0i64;
    let mut add = |name: String, map: &mut BTreeMap<String, i64>| {
        map.insert(name, next);
        next += 1;
    };
    for w in &words {
        add(w.clone(), &mut map);
    }
    for s in STRUCTURE {
        add(s.to_string(), &mut map);
    }
    for n in 0..SIZE_TOKENS {
        add(format!("<reserved{:05}>", 8800 + n), &mut map);
    }
    for code in 0..CODES {
        add(image_token_name(code), &mut map);
    }
    let vocab_size = map.len();
    let text_vocab: BTreeMap<&String, i64> = words.iter().map(|w| (w, map[w])).collect();
    let config = serde_json::json!({
        "architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon",
        "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 192,
        "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "attention_bias": false, "mlp_bias": false, "swin_norm": false, "hidden_act": "silu",
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
        "image_token_id": 4, "vocabulary_map": map, "vq_config": vq_config(args.common.size)
    });
    write_json(&args.out.join("config.json"), &config)?;
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": text_vocab, "unk_token": "<unk>"}
    });
    write_json(&args.out.join("tokenizer.json"), &tokenizer)?;
    let tokens = LuminaTokens {
        bos: map["<s>"],
        separator: map["<reserved08706>"],
        begin_image: map["<racm3:break>"],
        end_image: map["<eoss>"],
        new_line: map["<reserved08799>"],
        size_base: map["<reserved08800>"],
        codes_per_unit: (32 / FACTOR) as i64,
    };
    write_json(&args.out.join("lumina_tokens.json"), &serde_json::to_value(&tokens)?)?;
    Ok(tokens)
}

fn scenes(world: &World, from: u64, n: usize) -> Vec<Scene> {
    (from..from + n as u64).map(|i| world.pretraining_scene(i)).collect()
}

/// Trains encoder and decoder; returns (held-out reconstruction MSE, codebook use, seconds).
fn train_vq(
    args: &StudentArgs,
    world: &World,
    vq: &ChameleonVqVae,
    vq_vs: &tch::nn::VarStore,
    decoder: &ChameleonVqDecoder,
    decoder_vs: &tch::nn::VarStore,
    device: Device,
) -> anyhow::Result<(f64, f64, f64)> {
    let started = Instant::now();
    // The encoder's own codebook and post_quant_conv are copies of the decoder's, set at the end.
    let trained: Vec<(String, Tensor)> = vq_vs
        .variables()
        .into_iter()
        .filter(|(k, _)| !k.contains("quantize") && !k.contains("post_quant_conv"))
        .chain(decoder_vs.variables())
        .collect();
    let mut opt = AdamW::new(trained, AdamWConfig { weight_decay: 0.0, ..Default::default() });
    let codebook = decoder.codebook().shallow_clone();
    let d = codebook.size()[1];
    for step in 0..args.vq_steps {
        let x =
            signed_pixels(&scenes(world, step * args.batch as u64, args.batch), args.common.size, device)?;
        let z = vq.encode_latent(&x)?;
        let flat = z.detach().permute([0, 2, 3, 1]).reshape([-1, d]);
        if step % 100 == 0 {
            // Initialise (step 0) or restart unused codes from this batch's encoder outputs.
            let codes = nearest_codes(&z.detach(), &codebook).flatten(0, -1);
            let used = codes.bincount::<Tensor>(None, CODES);
            let n = flat.size()[0];
            tch::no_grad(|| {
                let pick = Tensor::randint(n, [CODES], (Kind::Int64, device));
                let fresh = flat.index_select(0, &pick);
                let dead = if step == 0 { used.ones_like().to_kind(Kind::Bool) } else { used.eq(0) };
                let updated = fresh.where_self(&dead.unsqueeze(1), &codebook);
                codebook.shallow_clone().copy_(&updated);
            });
        }
        let codes = nearest_codes(&z.detach(), &codebook);
        let (b, h, w) = codes.size3()?;
        let e = codebook.index_select(0, &codes.flatten(0, -1)).view([b, h, w, d]).permute([0, 3, 1, 2]);
        let codebook_loss = e.mse_loss(&z.detach(), tch::Reduction::Mean);
        let commitment = z.mse_loss(&e.detach(), tch::Reduction::Mean);
        let zq = &z + (&e - &z).detach();
        let recon = decoder.decode_latent(&zq).mse_loss(&x, tch::Reduction::Mean);
        let loss = &recon + codebook_loss + commitment * 0.25;
        let value = recon.double_value(&[]);
        anyhow::ensure!(value.is_finite(), "VQ loss is {value} at step {}", step + 1);
        opt.zero_grad();
        loss.backward();
        opt.clipped_step(1.0, args.common.learning_rate, 50)?;
        if (step + 1) % 100 == 0 {
            tracing::info!(step = step + 1, reconstruction = value, "pretrain student: vq");
        }
    }
    tch::no_grad(|| {
        let named = vq_vs.variables();
        named["model.vqmodel.quantize.embedding.weight"].shallow_clone().copy_(&codebook);
        for (k, v) in decoder_vs.variables() {
            if let Some(rest) = k.strip_prefix("post_quant_conv.") {
                named[&format!("model.vqmodel.post_quant_conv.{rest}")].shallow_clone().copy_(&v);
            }
        }
    });
    let held = signed_pixels(&held_out_scenes(world, 128), args.common.size, device)?;
    let (mse, used) = vq_held_out(vq, decoder, &held)?;
    Ok((mse, used, started.elapsed().as_secs_f64()))
}

/// The VQ's held-out reconstruction MSE (encode to codes, decode) over `held` (`[-1, 1]`) and the
/// share of the codebook its codes use.
pub(super) fn vq_held_out(
    vq: &ChameleonVqVae,
    decoder: &ChameleonVqDecoder,
    held: &Tensor,
) -> anyhow::Result<(f64, f64)> {
    tch::no_grad(|| -> anyhow::Result<(f64, f64)> {
        let codes = vq.encode(held)?;
        let mse = decoder.decode(&codes)?.mse_loss(held, tch::Reduction::Mean).double_value(&[]);
        let distinct: HashSet<i64> = Vec::<i64>::try_from(codes.flatten(0, -1))?.into_iter().collect();
        Ok((mse, distinct.len() as f64 / CODES as f64))
    })
}

/// The transformer's mean cross-entropy over `held` examples, without condition dropout.
pub(super) fn held_out_cross_entropy(student: &ChameleonStudent, held: &[ArExample]) -> anyhow::Result<f64> {
    tch::no_grad(|| {
        let (ids, labels) = ArTrainer::batch(student, held, &vec![false; held.len()])?;
        Ok(ArTrainer::losses(student, &ids, &labels)?.0.double_value(&[]))
    })
}

/// Training examples of `scenes`: their captions' instruction ids and their VQ image tokens.
pub(super) fn to_examples(
    student: &ChameleonStudent,
    tokenizer: &HfTokenizer,
    scenes: &[Scene],
    size: u32,
    device: Device,
) -> anyhow::Result<Vec<ArExample>> {
    let grid = (size / FACTOR) as i64;
    let pixels = signed_pixels(scenes, size, device)?;
    let codes = tch::no_grad(|| student.model.vq.encode(&pixels))?;
    let ids = student.model.image_vocab.codes_to_tokens(&codes).to_device(Device::Cpu);
    let ids = Vec::<i64>::try_from(ids.flatten(0, -1))?;
    scenes
        .iter()
        .zip(ids.chunks((grid * grid) as usize))
        .map(|(s, image)| {
            Ok(ArExample {
                text_ids: tokenizer.encode(&t2i_instruction(&s.caption(None), size, size))?,
                image_tokens: image.to_vec(),
                rows: grid,
                cols: grid,
            })
        })
        .collect()
}

/// Runs `proxytune pretrain student`.
pub fn run(args: StudentArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.vq_steps > 0 && args.ar_steps > 0 && args.batch > 0,
        "--vq-steps, --ar-steps and --batch must be positive"
    );
    anyhow::ensure!(args.common.size == 32, "--size: the world student is built for 32-pixel images");
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let device = proxytune_models::device::parse_device(&args.common.device)?;
    let world = World::new(args.common.seed, 8);
    tch::manual_seed(args.common.seed as i64);
    let started = Instant::now();
    let tokens = write_configs(&args)?;
    let cfg = ChameleonConfig::from_json(&args.out.join("config.json"))?;

    let vq_vs = tch::nn::VarStore::new(device);
    let vq = ChameleonVqVae::new(vq_vs.root() / "model" / "vqmodel", &cfg.vq_config)?;
    let decoder_vs = tch::nn::VarStore::new(device);
    let decoder = ChameleonVqDecoder::new(decoder_vs.root(), &cfg.vq_config)?;
    let (vq_mse, codebook_use, vq_seconds) =
        train_vq(&args, &world, &vq, &vq_vs, &decoder, &decoder_vs, device)?;
    save_safetensors(&decoder_vs, &args.out.join("vq_decoder.safetensors"))?;

    let base = tch::nn::VarStore::new(device);
    let model = Chameleon::new(base.root(), &cfg, None)?;
    tch::no_grad(|| {
        let named = base.variables();
        for (k, v) in vq_vs.variables() {
            named[&k].shallow_clone().copy_(&v);
        }
    });
    let mut student = ChameleonStudent {
        model,
        base,
        adapters: tch::nn::VarStore::new(device),
        lora: None,
        tokens: tokens.clone(),
    };
    let tokenizer = HfTokenizer::from_file(&args.out.join("tokenizer.json"))?;
    let grid = (args.common.size / FACTOR) as i64;
    let examples = |student: &ChameleonStudent, scenes: &[Scene]| {
        to_examples(student, &tokenizer, scenes, args.common.size, device)
    };
    let held = held_out_scenes(&world, 64);
    let held_examples = examples(&student, &held)?;
    let held_loss = |student: &ChameleonStudent| held_out_cross_entropy(student, &held_examples);
    let loss_before = held_loss(&student)?;
    let config = ArTrainConfig {
        learning_rate: args.common.learning_rate,
        adam: AdamWConfig { weight_decay: 0.01, ..Default::default() },
        lr_warmup_steps: 100,
        max_train_steps: args.ar_steps,
        batch_size: args.batch,
        max_grad_norm: 1.0,
        condition_dropout: 0.1,
        seed: args.common.seed,
        ..Default::default()
    };
    let mut trainer = ArTrainer::new(&mut student, config)?;
    let ar_started = Instant::now();
    let mut last = f64::NAN;
    // Pre-encoded chunks of scenes, so the encoder runs in large batches.
    let chunk = 512usize;
    let mut pool: Vec<ArExample> = Vec::new();
    for step in 0..args.ar_steps {
        let need = args.batch;
        if pool.len() < need {
            let from = 20_000_000 + step * args.batch as u64;
            pool.extend(examples(&student, &scenes(&world, from, chunk))?);
        }
        let batch: Vec<ArExample> = pool.drain(..need).collect();
        last = trainer.train_step(&student, &batch)?.cross_entropy;
        if (step + 1) % 100 == 0 {
            tracing::info!(step = step + 1, loss = last, "pretrain student: transformer");
        }
    }
    let ar_seconds = ar_started.elapsed().as_secs_f64();
    let loss_after = held_loss(&student)?;
    save_safetensors(&student.base, &args.out.join("model.safetensors"))?;

    // Prompt adherence: samples of 20 held-out captions (two per context).
    let sampling =
        ImageSampling { guidance_scale: 3.0, image_top_k: Some(64), top_p: None, temperature: 1.0 };
    let probe = &held[..20];
    let mut images = Vec::new();
    for (i, s) in probe.iter().enumerate() {
        let text =
            tokenizer.encode(&t2i_instruction(&s.caption(None), args.common.size, args.common.size))?;
        let ids = tch::no_grad(|| {
            sample_image_tokens(
                &student.model,
                &tokens,
                &tokens.prompt_ids(&text),
                grid,
                grid,
                &sampling,
                i as u64,
            )
        })?;
        let codes = student.model.image_vocab.tokens_to_codes(&ids)?;
        let codes = Tensor::from_slice(&codes).view([1, grid, grid]).to_device(device);
        let pixels = tch::no_grad(|| decoder.decode(&codes))?;
        images.push(proxytune_actors::stages::intake::tensor_to_rgb(&((pixels.get(0) + 1.0) / 2.0))?);
    }
    let adherence = context_accuracy(&images, probe);
    let params = student
        .base
        .variables()
        .iter()
        .filter(|(k, _)| !k.contains("vqmodel"))
        .map(|(_, v)| v.numel())
        .sum::<usize>();
    let manifest = serde_json::json!({
        "model": "world Lumina-mGPT-style student (Chameleon folder: VQ encoder, decoder, transformer)",
        "command": format!(
            "proxytune pretrain student --vq-steps {} --ar-steps {} --batch {} --size {} --seed {} --learning-rate {}",
            args.vq_steps, args.ar_steps, args.batch, args.common.size, args.common.seed, args.common.learning_rate),
        "seed": args.common.seed,
        "vq": { "codebook": CODES, "grid": grid, "images_seen": args.vq_steps * args.batch as u64,
                "held_out_reconstruction_mse": vq_mse, "codebook_use": codebook_use, "seconds": vq_seconds },
        "transformer": { "parameters": params, "sequences_seen": args.ar_steps * args.batch as u64,
                         "final_cross_entropy": last, "held_out_cross_entropy_before": loss_before,
                         "held_out_cross_entropy_after": loss_after, "seconds": ar_seconds },
        "prompt_adherence": { "samples": 20, "sampling": sampling, "context_accuracy": adherence,
                              "chance": 0.1 },
        "lumina_tokens": tokens,
        "seconds": started.elapsed().as_secs_f64(),
    });
    finish(&args.out, &manifest)
}
