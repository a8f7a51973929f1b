//! The supervisor's training loop: optimiser parity with PyTorch/diffusers
//! (`tools/parity/optim.py`), DreamBooth on the tiny SD fixture (the subject is learnt, the class
//! prior kept, the base UNet untouched), streamed class images, exact resume, non-finite losses,
//! bf16 mixed precision and validation sampling.

mod common;

use std::path::{Path, PathBuf};

use proxytune_models::diffusion::dreambooth::{
    latest_checkpoint, list_checkpoints, DreamBoothConfig, DreamBoothTrainer, Precision, ValidationConfig,
};
use proxytune_models::diffusion::pipeline::{SamplerKind, StableDiffusion};
use proxytune_models::lora::LoraConfig;
use proxytune_models::optim::{warmup_constant_lr, AdamW, AdamWConfig, Ema};
use proxytune_models::rng::sample_noise;
use proxytune_models::weights::read_safetensors;
use proxytune_models::ModelError;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn mse(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).square().mean(Kind::Float).double_value(&[])
}

#[test]
fn optimiser_loop_matches_torch_adamw_clipping_warmup_and_diffusers_ema() {
    let f = read_safetensors(&fixture("optim.safetensors")).unwrap();
    let cfg = Vec::<f64>::try_from(&f["config"]).unwrap();
    let (lr, wd, b1, b2, eps, clip, warmup, decay) =
        (cfg[0], cfg[1], cfg[2], cfg[3], cfg[4], cfg[5], cfg[6] as u64, cfg[7]);
    let a = f["init.a"].copy().set_requires_grad(true);
    let b = f["init.b"].copy().set_requires_grad(true);
    let params = vec![("a".to_string(), a.shallow_clone()), ("b".to_string(), b.shallow_clone())];
    let named =
        |p: &[(String, Tensor)]| p.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect::<Vec<_>>();
    let mut opt = AdamW::new(named(&params), AdamWConfig { beta1: b1, beta2: b2, eps, weight_decay: wd });
    let mut ema = Ema::new(&params, decay);
    let mut worst: f64 = 0.0;
    for s in 0..6 {
        opt.zero_grad();
        let loss = (&a * &f[&format!("grad.{s}.a")]).sum(Kind::Float)
            + (&b * &f[&format!("grad.{s}.b")]).sum(Kind::Float);
        loss.backward();
        opt.clip_grad_norm(clip).unwrap();
        let step_lr = warmup_constant_lr(lr, warmup, s);
        assert!((step_lr - f[&format!("lr.{s}")].double_value(&[0])).abs() < 1e-12, "lr at step {s}");
        opt.step(step_lr).unwrap();
        ema.update(&params).unwrap();
        for (name, p) in [("a", &a), ("b", &b)] {
            worst = worst.max(max_abs(p, &f[&format!("param.{s}.{name}")]));
            let shadow = &ema.shadow().iter().find(|(k, _)| k == name).unwrap().1;
            worst = worst.max(max_abs(shadow, &f[&format!("ema.{s}.{name}")]));
        }
    }
    eprintln!("AdamW + clip + warm-up + EMA vs torch/diffusers over 6 steps: max abs error {worst:.2e}");
    assert!(worst < 1e-6, "optimiser loop differs from the reference: {worst}");
}

const INSTANCE: &str = "a sks dog";
const CLASS: &str = "a dog";
const GUIDANCE: f64 = 3.0;

fn tiny_sd(lora: bool) -> StableDiffusion {
    let cfg = LoraConfig::attention(4, 4.0);
    StableDiffusion::load_with_lora(&fixture("sd_tiny"), Device::Cpu, lora.then_some(&cfg)).unwrap()
}

/// Four "photos" of one subject in `[-1, 1]`: a red square on grey, slightly shifted per photo.
fn subject_photos() -> Tensor {
    let photos = Tensor::full([4, 3, 16, 16], -0.2, (Kind::Float, Device::Cpu));
    for i in 0..4 {
        let _ = photos.get(i).narrow(0, 0, 1).narrow(1, 3 + i % 2, 8).narrow(2, 4 + i / 2, 8).fill_(0.9);
    }
    photos
}

/// Images `[N, 3, 16, 16]` in `[0, 1]` sampled with one seed each.
fn sample(sd: &StableDiffusion, prompt: &str, seeds: &[u64]) -> Tensor {
    sd.decode(&sample_latents(sd, prompt, seeds))
}

/// Final latents `[N, 4, 8, 8]` of 10-step DDIM sampling with guidance 3, one seed each.
fn sample_latents(sd: &StableDiffusion, prompt: &str, seeds: &[u64]) -> Tensor {
    let shape = sd.latent_shape(16, 16).unwrap();
    let latents: Vec<Tensor> = seeds
        .iter()
        .map(|&s| {
            let noise = sample_noise(s, &shape, Device::Cpu);
            sd.sample_latents(&[prompt], &[""], &noise, 10, GUIDANCE, SamplerKind::Ddim).unwrap()
        })
        .collect();
    Tensor::cat(&latents, 0)
}

/// Mean over `samples` of the squared distance to the nearest of `refs` (per element).
fn to_nearest(samples: &Tensor, refs: &Tensor) -> f64 {
    let n = samples.size()[0];
    let per: Vec<f64> = (0..n)
        .map(|i| {
            let d =
                (refs - samples.get(i).unsqueeze(0)).square().mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
            d.min().double_value(&[])
        })
        .collect();
    per.iter().sum::<f64>() / n as f64
}

fn config(steps: u64) -> DreamBoothConfig {
    DreamBoothConfig {
        instance_prompt: INSTANCE.into(),
        class_prompt: CLASS.into(),
        learning_rate: 1e-2,
        max_train_steps: steps,
        train_batch_size: 2,
        num_class_images: 4,
        seed: 7,
        ..Default::default()
    }
}

fn snapshot(params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    params.iter().map(|(k, v)| (k.clone(), v.detach().copy())).collect()
}

#[test]
fn dreambooth_lora_learns_the_subject_from_streamed_priors_and_leaves_the_base_alone() {
    let mut sd = tiny_sd(true);
    let base_before = snapshot(&sd.stores.unet.variables().into_iter().collect::<Vec<_>>());
    let photos = subject_photos();
    // The tiny VAE is random, so "toward the references" is measured where the UNet works: in
    // latent space, against the references' encoded latents.
    let refs = tch::no_grad(|| sd.vae.encode(&photos).0) * sd.vae.scaling_factor;
    let (sks_seeds, dog_seeds) = ([100, 101, 102, 103], [200, 201, 202, 203]);
    let sks_before = sample_latents(&sd, INSTANCE, &sks_seeds);
    let dog_before = sample_latents(&sd, CLASS, &dog_seeds);
    // Class images from the untuned model, as DreamBooth prescribes.
    let class_images = sample(&sd, CLASS, &[1, 2, 3, 4]) * 2.0 - 1.0;

    let mut trainer = DreamBoothTrainer::new(&mut sd, config(150)).unwrap();
    trainer.set_instance_images(&sd, &photos).unwrap();
    let t = [100i64, 300, 500, 700];
    let loss_before =
        DreamBoothTrainer::eval_loss(&sd, trainer.schedule(), &photos, INSTANCE, &t, 1).unwrap();
    // Streamed priors: a step runs once the class images it needs have arrived.
    assert!(!trainer.ready(), "no class image yet");
    trainer.add_class_images(&sd, &class_images.narrow(0, 0, 1)).unwrap();
    assert!(!trainer.ready(), "step 1 uses class images 0 and 1");
    trainer.add_class_images(&sd, &class_images.narrow(0, 1, 1)).unwrap();
    assert!(trainer.ready());
    trainer.train_step(&sd).unwrap();
    assert!(!trainer.ready(), "step 2 needs class images 2 and 3");
    let err = trainer.train_step(&sd).unwrap_err().to_string();
    assert!(err.contains("step 2 is not ready") && err.contains("class images 2 of 4"), "{err}");
    trainer.add_class_images(&sd, &class_images.narrow(0, 2, 2)).unwrap();
    let mut last = None;
    while trainer.ready() {
        last = Some(trainer.train_step(&sd).unwrap());
    }
    let last = last.unwrap();
    assert_eq!(last.step, 150);
    assert!(trainer.finished());
    assert!(last.prior > 0.0 && last.total > last.instance);
    let loss_after = DreamBoothTrainer::eval_loss(&sd, trainer.schedule(), &photos, INSTANCE, &t, 1).unwrap();

    let sks_after = sample_latents(&sd, INSTANCE, &sks_seeds);
    let dog_after = sample_latents(&sd, CLASS, &dog_seeds);
    let to_ref_before = to_nearest(&sks_before, &refs);
    let to_ref_after = to_nearest(&sks_after, &refs);
    let sks_moved = mse(&sks_after, &sks_before);
    let dog_moved = mse(&dog_after, &dog_before);
    eprintln!(
        "DreamBooth-LoRA, tiny SD, 150 steps: subject loss {loss_before:.4} -> {loss_after:.4}; \
         `{INSTANCE}` sample latents to the nearest reference latent (MSE) {to_ref_before:.4} -> {to_ref_after:.4}; \
         sample latents moved: `{INSTANCE}` {sks_moved:.4}, `{CLASS}` {dog_moved:.4}"
    );
    assert!(loss_after < loss_before * 0.8, "the subject loss did not drop: {loss_before} -> {loss_after}");
    assert!(to_ref_after < to_ref_before * 0.85, "subject samples did not move toward the reference");
    // `a dog` samples move about as much as `a sks dog` ones here: the random tiny text encoder
    // barely tells the two prompts apart, so prior preservation is measured on the toy world's
    // pretrained models instead. What holds here: the prior term is trained on.
    // Measured 10.5 and 9.3 (latent MSE); untrained adapters would leave both at 0.
    assert!(sks_moved > 1.0 && dog_moved > 1.0, "{sks_moved} / {dog_moved}");
    let base_after = sd.stores.unet.variables();
    assert!(base_before.iter().all(|(k, v)| v.equal(&base_after[k])), "base UNet bit-identical");
}

/// The trained variables' gradients after `backward` (zeroed before), by name.
fn unet_gradients(trained: &tch::nn::VarStore, backward: impl FnOnce()) -> Vec<(String, Tensor)> {
    for (_, t) in trained.variables() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    backward();
    let mut out: Vec<_> = trained.variables().into_iter().map(|(k, t)| (k, t.grad().copy())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn recomputed_unet_units_give_the_plain_gradients() {
    use proxytune_models::recompute;
    use proxytune_models::rng::{Draws, Stream};
    for (name, lora) in [("sd_tiny", true), ("sd_tiny", false), ("sdxl_tiny", false)] {
        let cfg = LoraConfig::attention(4, 4.0);
        let sd = StableDiffusion::load_with_lora(&fixture(name), Device::Cpu, lora.then_some(&cfg)).unwrap();
        let trained = if lora { &sd.stores.unet_lora } else { &sd.stores.unet };
        if lora {
            // Fresh adapters have B = 0, which leaves A without a gradient: draw both.
            tch::no_grad(|| {
                for (i, (_, mut t)) in trained.variables().into_iter().enumerate() {
                    t.copy_(&(Draws::new(5, Stream::Init, i as u64).normal(&t.size(), Device::Cpu) * 0.1));
                }
            });
        }
        let mut draws = Draws::new(9, Stream::Train, 0);
        let one = draws.normal(&sd.latent_shape(16, 16).unwrap(), Device::Cpu);
        let x = Tensor::cat(&[&one, &(&one * 0.5)], 0);
        let target = draws.normal(&x.size(), Device::Cpu);
        let t = Tensor::from_slice(&[10i64, 500]);
        let cond = tch::no_grad(|| sd.encode_prompts(&[INSTANCE, CLASS])).unwrap();
        let mut plain_value = 0.0;
        let plain = unet_gradients(trained, || {
            let loss = sd.predict(&x, &t, &cond).unwrap().mse_loss(&target, tch::Reduction::Mean);
            plain_value = loss.double_value(&[]);
            loss.backward();
        });
        let mut value = 0.0;
        let got = unet_gradients(trained, || {
            let (segments, input) = sd.predict_segments(&x, &t, &cond).unwrap();
            value = recompute::backward(&segments, vec![input], true, |ends| {
                let loss = ends[0].to_kind(Kind::Float).mse_loss(&target, tch::Reduction::Mean);
                loss.backward();
                Ok(loss.double_value(&[]))
            })
            .unwrap();
        });
        assert_eq!(value, plain_value, "{name}: the recomputed forward is the same forward");
        let mut worst = 0.0f64;
        for ((k, g), (_, p)) in got.iter().zip(&plain) {
            assert!(p.defined() && g.defined(), "{name}: {k} has no gradient");
            worst = worst.max(max_abs(g, p));
        }
        eprintln!("{name}, lora {lora}: {} tensors, largest gradient difference {worst:.2e}", plain.len());
        assert!(worst <= 1e-5, "{name}, lora {lora}: {worst}");
    }
}

#[test]
fn a_checkpointed_dreambooth_run_takes_the_plain_runs_steps() {
    let run = |cfg: DreamBoothConfig| {
        let (sd, mut trainer) = start(cfg);
        train(&sd, &mut trainer, 3)
    };
    let plain = run(resume_config());
    let lean = run(DreamBoothConfig { activation_checkpointing: true, ..resume_config() });
    for (a, b) in plain.iter().zip(&lean) {
        assert!((a - b).abs() < 1e-5, "{plain:?} vs {lean:?}");
    }
}

fn train(sd: &StableDiffusion, trainer: &mut DreamBoothTrainer, upto: u64) -> Vec<f64> {
    let mut totals = Vec::new();
    while trainer.step_count() < upto {
        totals.push(trainer.train_step(sd).unwrap().total);
    }
    totals
}

fn resume_config() -> DreamBoothConfig {
    DreamBoothConfig {
        gradient_accumulation_steps: 2,
        lr_warmup_steps: 2,
        ema_decay: Some(0.9),
        num_class_images: 3,
        checkpoints_to_keep: 2,
        ..config(6)
    }
}

fn start(cfg: DreamBoothConfig) -> (StableDiffusion, DreamBoothTrainer) {
    let mut sd = tiny_sd(true);
    let mut trainer = DreamBoothTrainer::new(&mut sd, cfg).unwrap();
    trainer.set_instance_images(&sd, &subject_photos()).unwrap();
    let class = Tensor::linspace(-1.0, 1.0, 3 * 3 * 16 * 16, (Kind::Float, Device::Cpu)).view([3, 3, 16, 16]);
    trainer.add_class_images(&sd, &class).unwrap();
    (sd, trainer)
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let (sd, mut straight) = start(resume_config());
    let straight_losses = train(&sd, &mut straight, 6);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    {
        let (sd, mut first) = start(resume_config());
        train(&sd, &mut first, 1);
        first.save_checkpoint(&sd, &root).unwrap();
        train(&sd, &mut first, 3);
        first.save_checkpoint(&sd, &root).unwrap();
        // The process dies here: model and trainer are dropped.
    }
    let (sd2, mut resumed) = start(resume_config());
    let ckpt = latest_checkpoint(&root).unwrap().unwrap();
    assert!(ckpt.ends_with("checkpoint-00000003"), "{}", ckpt.display());
    assert!(
        ckpt.join("pytorch_lora_weights.safetensors").is_file(),
        "diffusers-layout LoRA in the checkpoint"
    );
    resumed.resume(&ckpt).unwrap();
    assert_eq!(resumed.step_count(), 3);
    let resumed_losses = train(&sd2, &mut resumed, 6);
    assert_eq!(resumed_losses, straight_losses[3..], "losses after resume");
    for ((k, a), (_, b)) in straight.params().iter().zip(resumed.params()) {
        assert!(a.equal(b), "weight {k} differs after resume");
    }
    straight.apply_ema().unwrap();
    resumed.apply_ema().unwrap();
    for ((k, a), (_, b)) in straight.params().iter().zip(resumed.params()) {
        assert!(a.equal(b), "EMA weight {k} differs after resume");
    }
    // Retention: two checkpoints kept, the newest last.
    resumed.save_checkpoint(&sd2, &root).unwrap();
    let kept: Vec<u64> = list_checkpoints(&root).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(kept, vec![3, 6]);

    // A trainer of another seed cannot resume this run.
    let (_, mut other) = start(DreamBoothConfig { seed: 8, ..resume_config() });
    let err = other.resume(&ckpt).unwrap_err().to_string();
    assert!(err.contains("dreambooth.seed"), "{err}");
    // A damaged checkpoint names the file.
    std::fs::write(ckpt.join("state.json"), "{").unwrap();
    let err = other.resume(&ckpt).unwrap_err().to_string();
    assert!(err.contains("state.json"), "{err}");
}

#[test]
fn a_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint() {
    let (sd, mut trainer) = start(resume_config());
    let tmp = tempfile::tempdir().unwrap();
    train(&sd, &mut trainer, 2);
    let good = trainer.save_checkpoint(&sd, tmp.path()).unwrap();
    let before = snapshot(trainer.params());
    let poisoned = Tensor::full([4, 3, 16, 16], f64::NAN, (Kind::Float, Device::Cpu));
    trainer.set_instance_images(&sd, &poisoned).unwrap();
    match trainer.train_step(&sd) {
        Err(ModelError::NonFiniteLoss { step, .. }) => assert_eq!(step, 3),
        other => panic!("expected a non-finite loss error, got {other:?}"),
    }
    assert_eq!(trainer.step_count(), 2);
    for ((k, a), (_, b)) in before.iter().zip(trainer.params()) {
        assert!(a.equal(b), "{k} changed by the failed step");
    }
    assert_eq!(latest_checkpoint(tmp.path()).unwrap().unwrap(), good);
}

/// The subject loss after 30 bf16 steps, as a share of the loss before, at most (measured 0.87 on
/// the AMD EPYC CPU: 1.124 -> 0.974).
const BF16_SUBJECT_LOSS_RATIO: f64 = 0.95;

#[test]
fn bf16_mixed_precision_trains_float32_adapters_over_a_bfloat16_unet() {
    let mut sd = tiny_sd(false);
    let err = DreamBoothTrainer::new(&mut sd, DreamBoothConfig { precision: Precision::Bf16, ..config(3) })
        .unwrap_err()
        .to_string();
    assert!(err.contains("dreambooth.precision"), "{err}");

    let mut sd = tiny_sd(true);
    let mut trainer =
        DreamBoothTrainer::new(&mut sd, DreamBoothConfig { precision: Precision::Bf16, ..config(30) })
            .unwrap();
    assert_eq!(sd.unet_kind(), Kind::BFloat16);
    assert!(trainer.params().iter().all(|(_, p)| p.kind() == Kind::Float));
    let base = snapshot(&sd.stores.unet.variables().into_iter().collect::<Vec<_>>());
    trainer.set_instance_images(&sd, &subject_photos()).unwrap();
    trainer.add_class_images(&sd, &(sample(&sd, CLASS, &[1, 2, 3, 4]) * 2.0 - 1.0)).unwrap();
    // The subject's loss at fixed timesteps and noise, before and after: the training signal.
    let t = [100i64, 300, 500, 700];
    let eval = |sd: &StableDiffusion, trainer: &DreamBoothTrainer| {
        DreamBoothTrainer::eval_loss(sd, trainer.schedule(), &subject_photos(), INSTANCE, &t, 1).unwrap()
    };
    let loss_before = eval(&sd, &trainer);
    let losses = train(&sd, &mut trainer, 30);
    let loss_after = eval(&sd, &trainer);
    let (first, last) = (losses[..5].iter().sum::<f64>() / 5.0, losses[25..].iter().sum::<f64>() / 5.0);
    eprintln!(
        "bf16 LoRA: mean loss of steps 1-5 {first:.4}, of steps 26-30 {last:.4}; subject loss at fixed \
         timesteps {loss_before:.4} -> {loss_after:.4}"
    );
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(
        loss_after < loss_before * BF16_SUBJECT_LOSS_RATIO,
        "bf16 training does not learn: {loss_before} -> {loss_after}"
    );
    let after = sd.stores.unet.variables();
    assert!(base.iter().all(|(k, v)| v.equal(&after[k])), "the bf16 base stays frozen");
    assert!(sample(&sd, INSTANCE, &[5]).isfinite().all().int64_value(&[]) == 1, "bf16 sampling works");
}

#[test]
fn validation_samples_fixed_prompts_and_seeds_on_schedule() {
    let validation = ValidationConfig {
        prompts: vec![INSTANCE.into(), "a sks dog on the beach".into()],
        seeds: vec![1, 2],
        every_steps: 2,
        num_inference_steps: 4,
        guidance_scale: 3.0,
        sampler: SamplerKind::Euler,
        resolution: 16,
    };
    let (sd, mut trainer) = start(DreamBoothConfig { validation: Some(validation), ..resume_config() });
    assert!(!trainer.validation_due());
    train(&sd, &mut trainer, 1);
    assert!(!trainer.validation_due());
    train(&sd, &mut trainer, 2);
    assert!(trainer.validation_due());
    let a = trainer.validate(&sd).unwrap();
    let b = trainer.validate(&sd).unwrap();
    assert_eq!(a.len(), 4);
    assert_eq!((a[3].prompt.as_str(), a[3].seed), ("a sks dog on the beach", 2));
    assert_eq!(a[0].image.size(), [3, 16, 16]);
    assert!(a.iter().zip(&b).all(|(x, y)| x.image.equal(&y.image)), "fixed seeds give fixed images");
    assert!(!a[0].image.equal(&a[1].image), "different seeds give different images");

    let bad = DreamBoothTrainer::new(
        &mut tiny_sd(true),
        DreamBoothConfig { gradient_accumulation_steps: 0, ..config(1) },
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("dreambooth.gradient_accumulation_steps"), "{bad}");
}

#[test]
fn dreambooth_trains_lora_on_an_sdxl_unet_with_its_text_time_conditioning() {
    let lora = LoraConfig::attention(4, 4.0);
    let mut sd = StableDiffusion::load_with_lora(&fixture("sdxl_tiny"), Device::Cpu, Some(&lora)).unwrap();
    let mut trainer =
        DreamBoothTrainer::new(&mut sd, DreamBoothConfig { num_class_images: 0, ..config(40) }).unwrap();
    let photos = subject_photos();
    trainer.set_instance_images(&sd, &photos).unwrap();
    let t = [100i64, 300, 500, 700];
    let before = DreamBoothTrainer::eval_loss(&sd, trainer.schedule(), &photos, INSTANCE, &t, 1).unwrap();
    train(&sd, &mut trainer, 40);
    let after = DreamBoothTrainer::eval_loss(&sd, trainer.schedule(), &photos, INSTANCE, &t, 1).unwrap();
    eprintln!("DreamBooth-LoRA on the tiny SDXL: subject loss {before:.4} -> {after:.4} in 40 steps");
    assert!(after < before, "SDXL subject loss did not drop: {before} -> {after}");
}

// ---- The AR student (Chameleon / Lumina-mGPT format) ----

mod student {
    use super::*;
    use proxytune_models::ar::chameleon_vq::ChameleonVqDecoder;
    use proxytune_models::ar::lumina::{sample_image_tokens, ImageSampling, LuminaTokens};
    use proxytune_models::ar::train::{ArExample, ArTrainConfig, ArTrainer, ChameleonStudent};
    use proxytune_models::weights::{load_safetensors, Strictness};

    /// Structure tokens inside the tiny fixture's 96-token vocabulary (image tokens are 64..96).
    fn tokens() -> LuminaTokens {
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

    fn student(lora: bool) -> ChameleonStudent {
        let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
        let cfg = LoraConfig { rank: 4, alpha: 8.0, target_modules: targets.map(String::from).to_vec() };
        ChameleonStudent::load(&fixture("chameleon_tiny"), Device::Cpu, lora.then_some(&cfg), tokens())
            .unwrap()
    }

    /// Example `i`: a 4-token instruction and a 4x4 grid of image tokens, both a function of `i`.
    fn example(i: u64) -> ArExample {
        let text_ids = (0..4).map(|j| 20 + ((i * 7 + j * 3) % 40) as i64).collect();
        let image_tokens = (0..16).map(|j| 64 + ((i * 11 + j * 5 + j * j) % 32) as i64).collect();
        ArExample { text_ids, image_tokens, rows: 4, cols: 4 }
    }

    fn config(steps: u64) -> ArTrainConfig {
        ArTrainConfig {
            learning_rate: 1e-2,
            max_train_steps: steps,
            batch_size: 2,
            condition_dropout: 0.0,
            seed: 3,
            ..Default::default()
        }
    }

    #[test]
    fn lora_fine_tuning_learns_the_sequences_and_leaves_the_base_alone() {
        let mut s = student(true);
        // The random fixture's output layer is tiny (|logit| < 2 after the final RMSNorm), which
        // caps how peaked any distribution can get when only adapters train; give it the scale of a
        // trained head.
        tch::no_grad(|| {
            let _ = s.base.variables()["lm_head.weight"].shallow_clone().f_mul_scalar_(20.0).unwrap();
        });
        let base = snapshot(&s.base.variables().into_iter().collect::<Vec<_>>());
        let mut trainer = ArTrainer::new(&mut s, config(80)).unwrap();
        assert!(trainer.params().iter().all(|(k, _)| k.contains("lora_")));
        let data: Vec<ArExample> = (0..2).map(example).collect();
        let first = trainer.train_step(&s, &data).unwrap();
        let mut last = first;
        while !trainer.finished() {
            last = trainer.train_step(&s, &data).unwrap();
        }
        eprintln!(
            "AR LoRA (all 7 projections, rank 4) on 2 sequences: cross-entropy {:.4} -> {:.4}, z-loss {:.3}",
            first.cross_entropy, last.cross_entropy, last.z_loss
        );
        assert!(last.cross_entropy < first.cross_entropy * 0.2, "{first:?} -> {last:?}");
        let after = s.base.variables();
        assert!(base.iter().all(|(k, v)| v.equal(&after[k])), "base weights bit-identical");
    }

    /// The trained variables' gradients after `backward`, by name (zeroed before; variables the
    /// loss does not reach, such as the VQ tokenizer's, have none).
    fn gradients_of(trained: &tch::nn::VarStore, backward: impl FnOnce()) -> Vec<(String, Option<Tensor>)> {
        for (_, t) in trained.variables() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        backward();
        let mut out: Vec<_> = trained
            .variables()
            .into_iter()
            .map(|(k, t)| (k, Some(t.grad()).filter(Tensor::defined).map(|g| g.copy())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn recomputed_layers_and_a_chunked_loss_give_the_plain_gradients() {
        let z_weight = 1e-2;
        for lora in [true, false] {
            let mut s = student(lora);
            let trainer = ArTrainer::new(&mut s, config(1)).unwrap(); // freezes the base, draws adapters
            let trained = if lora { &s.adapters } else { &s.base };
            let examples: Vec<ArExample> = (0..2).map(example).collect();
            // The second example without its prompt: rows of different lengths, padding included.
            let (ids, labels) = ArTrainer::batch(&s, &examples, &[false, true]).unwrap();
            let mut plain_values = (0.0, 0.0);
            let plain = gradients_of(trained, || {
                let (ce, z) = ArTrainer::losses(&s, &ids, &labels).unwrap();
                plain_values = (ce.double_value(&[]), z.double_value(&[]));
                (ce + z * z_weight).backward();
            });
            assert_eq!(plain.len(), trainer.params().len());
            for (recompute, chunk) in [(true, 0), (false, 3), (true, 5)] {
                let mut values = (0.0, 0.0);
                let got = gradients_of(trained, || {
                    values = ArTrainer::backward_losses(&s, &ids, &labels, recompute, chunk, z_weight, 1.0)
                        .unwrap();
                });
                let what = format!("lora {lora}, recompute {recompute}, chunk {chunk}");
                assert!((values.0 - plain_values.0).abs() < 1e-5, "{what}: {values:?} vs {plain_values:?}");
                assert!((values.1 - plain_values.1).abs() < 1e-4 * plain_values.1, "{what}");
                let mut worst = 0.0f64;
                for ((name, g), (_, p)) in got.iter().zip(&plain) {
                    match (g, p) {
                        (Some(g), Some(p)) => worst = worst.max((g - p).abs().max().double_value(&[])),
                        (None, None) => assert!(name.contains("vqmodel"), "{what}: no gradient for {name}"),
                        _ => panic!("{what}: {name} has a gradient in one run only"),
                    }
                }
                eprintln!("{what}: largest gradient difference {worst:.2e}");
                assert!(worst <= 1e-5, "{what}: gradients differ by {worst}");
            }
        }
    }

    #[test]
    fn a_checkpointed_chunked_run_takes_the_plain_runs_steps() {
        let data: Vec<ArExample> = (0..4).map(example).collect();
        let cfg = ArTrainConfig { gradient_accumulation_steps: 2, ..config(3) };
        let losses = |cfg: ArTrainConfig| {
            let mut s = student(true);
            let mut trainer = ArTrainer::new(&mut s, cfg).unwrap();
            (0..3).map(|_| trainer.train_step(&s, &data).unwrap().total).collect::<Vec<_>>()
        };
        let plain = losses(cfg.clone());
        let lean = losses(ArTrainConfig { activation_checkpointing: true, loss_chunk_tokens: 4, ..cfg });
        for (a, b) in plain.iter().zip(&lean) {
            assert!((a - b).abs() < 1e-5, "{plain:?} vs {lean:?}");
        }
        assert!(plain[2] < plain[0], "the run learns: {plain:?}");
    }

    fn run(trainer: &mut ArTrainer, s: &ChameleonStudent, upto: u64) -> Vec<f64> {
        let mut totals = Vec::new();
        while trainer.step_count() < upto {
            let k = trainer.step_count();
            let batch: Vec<ArExample> = (0..4).map(|i| example(k * 4 + i)).collect();
            totals.push(trainer.train_step(s, &batch).unwrap().total);
        }
        totals
    }

    #[test]
    fn a_resumed_student_run_is_bit_identical() {
        let cfg = ArTrainConfig {
            gradient_accumulation_steps: 2,
            lr_warmup_steps: 2,
            condition_dropout: 0.3,
            ..config(6)
        };
        let mut s = student(true);
        let mut straight = ArTrainer::new(&mut s, cfg.clone()).unwrap();
        let straight_losses = run(&mut straight, &s, 6);
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut s = student(true);
            let mut first = ArTrainer::new(&mut s, cfg.clone()).unwrap();
            run(&mut first, &s, 3);
            let ckpt = first.save_checkpoint(&s, tmp.path(), serde_json::json!({ "examples": 12 })).unwrap();
            assert!(ckpt.join("adapter_model.safetensors").is_file());
        }
        let mut s2 = student(true);
        let mut resumed = ArTrainer::new(&mut s2, cfg.clone()).unwrap();
        let state = resumed.resume(&latest_checkpoint(tmp.path()).unwrap().unwrap()).unwrap();
        assert_eq!((state.step, state.data["examples"].as_u64()), (3, Some(12)));
        assert_eq!(run(&mut resumed, &s2, 6), straight_losses[3..]);
        for ((k, a), (_, b)) in straight.params().iter().zip(resumed.params()) {
            assert!(a.equal(b), "{k} differs after resume");
        }
        let mut other = ArTrainer::new(&mut student(true), ArTrainConfig { seed: 4, ..cfg }).unwrap();
        let err = other.resume(&latest_checkpoint(tmp.path()).unwrap().unwrap()).unwrap_err().to_string();
        assert!(err.contains("ar_train.seed"), "{err}");
    }

    #[test]
    fn bad_examples_and_non_finite_losses_are_named() {
        let mut s = student(true);
        let mut trainer = ArTrainer::new(&mut s, config(5)).unwrap();
        let mut bad = example(0);
        bad.image_tokens[3] = 12; // a text token inside the image grid
        let err = trainer.train_step(&s, &[bad, example(1)]).unwrap_err().to_string();
        assert!(err.contains("token 12 is not an image token"), "{err}");
        let long = ArExample { text_ids: vec![20; 120], ..example(0) };
        let err = trainer.train_step(&s, &[long, example(1)]).unwrap_err().to_string();
        assert!(err.contains("exceed the context of 128"), "{err}");
        let err = trainer.train_step(&s, &[example(1)]).unwrap_err().to_string();
        assert!(err.contains("1 examples, a step takes 2"), "{err}");
        let _ =
            tch::no_grad(|| s.adapters.variables().values().next().unwrap().shallow_clone().fill_(f64::NAN));
        match trainer.train_step(&s, &[example(0), example(1)]) {
            Err(ModelError::NonFiniteLoss { step, .. }) => assert_eq!(step, 1),
            other => panic!("expected a non-finite loss, got {other:?}"),
        }
        let err =
            ArTrainer::new(&mut student(false), ArTrainConfig { precision: Precision::Bf16, ..config(1) })
                .unwrap_err()
                .to_string();
        assert!(err.contains("ar_train.precision"), "{err}");
    }

    /// A plain sampler to hold the batched one against: no cache (every step runs the whole
    /// sequence), one seed, guidance, the image-token mask, the warpers and an inverse-CDF draw on
    /// the host, Lumina's forced row ends.
    fn plain_sampler(
        model: &proxytune_models::ar::chameleon::Chameleon,
        t: &LuminaTokens,
        prompt: &[i64],
        side: i64,
        sampling: &ImageSampling,
        seed: u64,
    ) -> Vec<i64> {
        use proxytune_models::ar::generate::{warp, TokenSampling};
        use proxytune_models::rng::{Draws, Stream};
        let header = t.image_header(side, side).unwrap();
        let mut cond: Vec<i64> = prompt.iter().chain(&header).copied().collect();
        let mut uncond: Vec<i64> = header.to_vec();
        let warpers = TokenSampling {
            temperature: sampling.temperature,
            top_k: sampling.image_top_k,
            top_p: sampling.top_p,
            ..Default::default()
        };
        let image_ids = model.image_vocab.image_token_ids();
        let body_len = side * (side + 1) + 1;
        let mut body = Vec::new();
        for step in 0..body_len {
            let position = step + 1;
            let token =
                if position == body_len {
                    t.end_image
                } else if position % (side + 1) == 0 {
                    t.new_line
                } else {
                    let pad = cond.len() - uncond.len();
                    let ids: Vec<i64> =
                        cond.iter().chain(std::iter::repeat_n(&t.bos, pad)).chain(&uncond).copied().collect();
                    let keep: Vec<i64> = std::iter::repeat_n(1, cond.len())
                        .chain(std::iter::repeat_n(0, pad))
                        .chain(std::iter::repeat_n(1, uncond.len()))
                        .collect();
                    let ids = Tensor::from_slice(&ids).view([2, -1]);
                    let keep = Tensor::from_slice(&keep).view([2, -1]);
                    let logits = tch::no_grad(|| model.forward(&ids, Some(&keep), None)).unwrap();
                    let last = logits.select(1, -1).to_kind(tch::Kind::Float);
                    let (c, u) = (last.get(0), last.get(1));
                    let mut scores = (&u + (&c - &u) * sampling.guidance_scale).unsqueeze(0);
                    let allowed = Tensor::zeros([scores.size()[1]], (tch::Kind::Bool, Device::Cpu))
                        .index_fill(0, &Tensor::from_slice(&image_ids), 1);
                    scores = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
                    let probs = warp(&scores, &warpers).softmax(-1, tch::Kind::Double).get(0);
                    let cdf = Vec::<f64>::try_from(probs.cumsum(0, tch::Kind::Double)).unwrap();
                    let draw = Draws::new(seed, Stream::TokenSample, step as u64).unit() * cdf[cdf.len() - 1];
                    cdf.iter().position(|&c| c > draw).unwrap_or(cdf.len() - 1) as i64
                };
            body.push(token);
            cond.push(token);
            uncond.push(token);
        }
        t.parse_body(&body, side, side).unwrap()
    }

    /// The batched sampler (KV cache written in place, guidance and draws on the device, tokens to
    /// the host once) draws the plain sampler's very tokens at batch 1, and a batch of seeds and
    /// prompts of different lengths gives each seed the tokens it gets alone; with guidance and
    /// without, with top-p too.
    #[test]
    fn batched_lumina_sampling_draws_the_plain_samplers_tokens_and_each_seed_its_own() {
        use proxytune_models::ar::lumina::sample_image_tokens_batch;
        let s = student(false);
        let t = tokens();
        let prompts: Vec<Vec<i64>> = [&[20, 21, 22][..], &[30, 31, 32, 33, 34], &[40], &[20, 21, 22]]
            .iter()
            .map(|p| t.prompt_ids(p))
            .collect();
        let seeds = [9u64, 10, 11, 12];
        for sampling in [
            ImageSampling { guidance_scale: 3.0, image_top_k: Some(8), ..Default::default() },
            ImageSampling { guidance_scale: 1.0, image_top_k: Some(16), top_p: Some(0.9), temperature: 0.8 },
        ] {
            let alone: Vec<Vec<i64>> = prompts
                .iter()
                .zip(seeds)
                .map(|(p, seed)| {
                    tch::no_grad(|| sample_image_tokens(&s.model, &t, p, 4, 4, &sampling, seed)).unwrap()
                })
                .collect();
            if sampling.guidance_scale != 1.0 {
                for ((p, seed), got) in prompts.iter().zip(seeds).zip(&alone) {
                    assert_eq!(got, &plain_sampler(&s.model, &t, p, 4, &sampling, seed), "seed {seed}");
                }
            }
            let refs: Vec<&[i64]> = prompts.iter().map(Vec::as_slice).collect();
            let batch =
                tch::no_grad(|| sample_image_tokens_batch(&s.model, &t, &refs, 4, 4, &sampling, &seeds))
                    .unwrap();
            assert_eq!(batch, alone, "{sampling:?}");
            assert_ne!(alone[0], alone[3], "another seed, another grid");
        }
    }

    #[test]
    fn lumina_image_sampling_follows_the_grid_and_decodes() {
        let s = student(false);
        let t = tokens();
        let prompt = t.prompt_ids(&[20, 21, 22]);
        let sampling = ImageSampling { guidance_scale: 3.0, image_top_k: Some(8), ..Default::default() };
        let a = tch::no_grad(|| sample_image_tokens(&s.model, &t, &prompt, 4, 4, &sampling, 9)).unwrap();
        let b = tch::no_grad(|| sample_image_tokens(&s.model, &t, &prompt, 4, 4, &sampling, 9)).unwrap();
        assert_eq!(a, b, "deterministic given a seed");
        assert_eq!(a.len(), 16);
        let codes = s.model.image_vocab.tokens_to_codes(&a).unwrap();
        let mut vs = tch::nn::VarStore::new(Device::Cpu);
        let decoder = ChameleonVqDecoder::new(vs.root(), s.model.vq.config()).unwrap();
        load_safetensors(&mut vs, &fixture("chameleon_tiny/vq_decoder.safetensors"), Strictness::Strict)
            .unwrap();
        let image = tch::no_grad(|| decoder.decode(&Tensor::from_slice(&codes).view([1, 4, 4]))).unwrap();
        assert_eq!(image.size(), [1, 3, 8, 8]);
        // The serialised form round-trips and training labels cover the image only.
        let seq = t.image_sequence(&a, 4, 4).unwrap();
        assert_eq!(&seq[..3], &[6, 11, 11], "begin, then 4 rows and 4 columns as 2 units each");
        assert_eq!(t.parse_body(&seq[3..seq.len() - 1], 4, 4).unwrap(), a);
        let (ids, labels) = t.training_example(&prompt, &seq);
        assert_eq!(ids.len(), labels.len());
        assert!(labels[..prompt.len()].iter().all(|&l| l == -100) && labels[prompt.len()..] == seq[..]);
        let err = t.image_header(3, 4).unwrap_err().to_string();
        assert!(err.contains("multiple of 2"), "{err}");

        // The student built in bfloat16 samples a grid of image tokens the same way.
        let half = ChameleonStudent::load_in(
            &fixture("chameleon_tiny"),
            Device::Cpu,
            None,
            t.clone(),
            tch::Kind::BFloat16,
        )
        .unwrap();
        assert_eq!(half.model.kind(), tch::Kind::BFloat16);
        let c = tch::no_grad(|| sample_image_tokens(&half.model, &t, &prompt, 4, 4, &sampling, 9)).unwrap();
        assert_eq!(c.len(), 16);
        assert!(half.model.image_vocab.tokens_to_codes(&c).is_ok(), "image tokens only: {c:?}");
    }
}

mod llamagen {
    use super::*;
    use proxytune_models::ar::generate::TokenSampling;
    use proxytune_models::ar::llamagen::{LlamaGen, LlamaGenConfig};
    use proxytune_models::ar::train::{ArTrainConfig, ArTrainer, MicroLosses};
    use proxytune_models::lora::{LoraSpec, LoraSwitch};

    fn tiny() -> LlamaGenConfig {
        crate::common::tiny_llamagen()
    }

    #[test]
    fn llamagen_lora_learns_captioned_grids_and_guided_sampling_is_seeded() {
        use proxytune_models::rng::{redraw_initial_values, Draws, Stream};
        let mut base = tch::nn::VarStore::new(Device::Cpu);
        let adapters = tch::nn::VarStore::new(Device::Cpu);
        let targets = ["wqkv", "wo", "w1", "w2", "w3"];
        let lora = LoraConfig { rank: 4, alpha: 8.0, target_modules: targets.map(String::from).to_vec() };
        let model = LlamaGen::new(
            base.root(),
            &tiny(),
            Some(LoraSpec { root: &adapters.root(), config: &lora, switch: &LoraSwitch::default() }),
        )
        .unwrap();
        redraw_initial_values(&base, 11);
        // A pretrained output layer (the reference zero-initialises it before training).
        tch::no_grad(|| {
            let mut output = base.variables()["output.weight"].shallow_clone();
            output.copy_(&(Draws::new(11, Stream::Init, 0).normal(&output.size(), Device::Cpu) * 0.5));
        });
        let before = snapshot(&base.variables().into_iter().collect::<Vec<_>>());
        let cfg = ArTrainConfig {
            learning_rate: 1e-2,
            max_train_steps: 100,
            batch_size: 2,
            condition_dropout: 0.1,
            ..Default::default()
        };
        let mut trainer = ArTrainer::for_stores(&mut base, &adapters, true, cfg).unwrap();
        let captions = Draws::new(11, Stream::Train, 0).normal(&[2, 4, 12], Device::Cpu);
        let codes = Tensor::from_slice(&[3i64, 14, 15, 9, 26, 5, 35, 8, 9, 60, 2, 7, 1, 8, 28, 18, 28, 4])
            .view([2, 9]);
        let mut first = None;
        let mut last = None;
        while !trainer.finished() {
            let l = trainer
                .step_with(|_, draws| {
                    let drop: Vec<bool> = (0..2).map(|_| draws.unit() < 0.1).collect();
                    model.losses(&captions, None, &drop, &codes).map(|(ce, z)| MicroLosses::Graph(ce, z))
                })
                .unwrap();
            first.get_or_insert(l);
            last = Some(l);
        }
        let (first, last) = (first.unwrap(), last.unwrap());
        eprintln!(
            "LlamaGen LoRA on 2 captioned 3x3 grids: cross-entropy {:.3} -> {:.4}",
            first.cross_entropy, last.cross_entropy
        );
        assert!(last.cross_entropy < first.cross_entropy * 0.1, "{first:?} -> {last:?}");
        let after = base.variables();
        assert!(before.iter().all(|(k, v)| v.equal(&after[k])), "base weights bit-identical");

        let greedy = TokenSampling { greedy: true, ..Default::default() };
        let memorised = model.generate(&captions.narrow(0, 0, 1), None, &greedy, 0).unwrap();
        assert_eq!(
            memorised,
            Vec::<i64>::try_from(codes.get(0)).unwrap(),
            "greedy decoding recalls the grid"
        );
        let guided =
            TokenSampling { guidance_scale: 3.0, top_k: Some(8), temperature: 0.9, ..Default::default() };
        let a = model.generate(&captions.narrow(0, 1, 1), None, &guided, 4).unwrap();
        let b = model.generate(&captions.narrow(0, 1, 1), None, &guided, 4).unwrap();
        assert_eq!((a.len(), &a), (9, &b), "seeded");
        // A batch of captions and seeds gives each seed the grid it gets alone, with guidance and
        // without.
        let n = captions.size()[0];
        let seeds: Vec<u64> = (0..n as u64).map(|i| 4 + 3 * i).collect();
        for sampling in [guided.clone(), TokenSampling { top_k: Some(8), ..Default::default() }] {
            let alone: Vec<Vec<i64>> = (0..n)
                .map(|i| {
                    model.generate(&captions.narrow(0, i, 1), None, &sampling, seeds[i as usize]).unwrap()
                })
                .collect();
            assert_eq!(
                model.generate_batch(&captions, None, &sampling, &seeds).unwrap(),
                alone,
                "{sampling:?}"
            );
        }
    }
}
