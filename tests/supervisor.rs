//! Stages 1 and 2 as a streaming pipeline on the tiny SD fixture: the untuned model samples class
//! priors → the SupervisorTuner trains DreamBooth-LoRA while they stream in and emits "supervisor
//! ready" → the ProxyGenerator samples its plan with the adapter → Lance. Then the same job again:
//! the tuner resumes from its last checkpoint and the corpus gains no duplicate.

use std::collections::HashSet;
use std::path::PathBuf;

use proxytune_actors::corpus::writer::{LanceWriter, LanceWriterConfig};
use proxytune_actors::corpus::Corpus;
use proxytune_actors::runtime::{JobOutcome, Metrics, Pipeline, PipelineReport};
use proxytune_actors::stages::class_prior_sampler::{ClassPriorConfig, ClassPriorSampler};
use proxytune_actors::stages::diffusion_sampling::{
    load_supervisor, sample_images, SamplingConfig, SharedSupervisor, UnetPrecision,
};
use proxytune_actors::stages::intake::images_to_square_batch;
use proxytune_actors::stages::proxy_generator::{PromptPlan, ProxyGenerator, ProxyGeneratorConfig};
use proxytune_actors::stages::supervisor_tuner::{SupervisorTuner, SupervisorTunerConfig};
use proxytune_models::diffusion::dreambooth::{DreamBoothConfig, DreamBoothTrainer};
use proxytune_models::diffusion::pipeline::SamplerKind;
use proxytune_models::lora::LoraConfig;
use proxytune_schemas::{ClassPriorImage, Proxy, Supervisor};

use crate::runtime::config;
use crate::support::repo_root;

fn model_dir() -> PathBuf {
    repo_root().join("models/tests/fixtures/sd_tiny")
}

fn sampling() -> SamplingConfig {
    SamplingConfig {
        num_inference_steps: 4,
        guidance_scale: 3.0,
        sampler: SamplerKind::Ddim,
        resolution: 16,
        negative_prompt: String::new(),
        batch_images: 2,
        unet_precision: UnetPrecision::Fp32,
        vae_slicing: false,
    }
}

fn references() -> Vec<image::RgbImage> {
    (0..4u32)
        .map(|i| {
            image::RgbImage::from_fn(16, 16, |x, y| {
                let inside = (3 + i % 2..11 + i % 2).contains(&x) && (4..12).contains(&y);
                if inside {
                    image::Rgb([230, 40, 40])
                } else {
                    image::Rgb([100, 100, 100])
                }
            })
        })
        .collect()
}

fn plan() -> PromptPlan {
    PromptPlan {
        subject_prompts: vec!["a sks dog".into()],
        context_prompts: vec!["a sks dog on the beach".into()],
        images_per_prompt: 3,
        first_seed: 1000,
    }
}

/// The class-prior sampler's and the tuner's configs, the tuner writing into `out_dir`.
fn configs(out_dir: &std::path::Path) -> (ClassPriorConfig, SupervisorTunerConfig) {
    let prior_config = ClassPriorConfig {
        job_id: "job".into(),
        class_noun: "dog".into(),
        class_prompt: "a dog".into(),
        model_dir: model_dir(),
        variant: None,
        model_id: "sd_tiny".into(),
        device: "cpu".into(),
        num_images: 6,
        first_seed: 0,
        sampling: sampling(),
    };
    let tuner_config = SupervisorTunerConfig {
        job_id: "job".into(),
        subject: "dog9".into(),
        class_noun: "dog".into(),
        model_dir: model_dir(),
        variant: None,
        model_id: "sd_tiny".into(),
        device: "cpu".into(),
        lora: Some(LoraConfig::attention(4, 4.0)),
        dreambooth: DreamBoothConfig {
            learning_rate: 1e-2,
            max_train_steps: 12,
            train_batch_size: 2,
            num_class_images: 6,
            checkpoint_every: 5,
            ..Default::default()
        },
        resolution: 16,
        output_dir: out_dir.to_path_buf(),
        vae_slicing: false,
    };
    (prior_config, tuner_config)
}

/// The class-prior sampler, the tuner and the generator on `corpus`; the first two share one
/// supervisor copy when `share`.
async fn run_job(corpus: &Corpus, out_dir: &std::path::Path, share: bool) -> PipelineReport {
    let metrics = Metrics::noop();
    let (prior_config, tuner_config) = configs(out_dir);
    let shared = SharedSupervisor::for_stages(&prior_config, &tuner_config).unwrap();
    let mut priors = ClassPriorSampler::new(prior_config, &metrics);
    let mut tuner = SupervisorTuner::new(tuner_config, references(), &metrics).unwrap();
    if share {
        priors = priors.sharing(shared.clone());
        tuner = tuner.sharing(shared);
    }
    let generator = ProxyGenerator::new(
        ProxyGeneratorConfig {
            job_id: "job".into(),
            subject: "dog9".into(),
            model_dir: model_dir(),
            variant: None,
            device: "cpu".into(),
            plan: plan(),
            sampling: sampling(),
            stored_seeds: Default::default(),
        },
        &metrics,
    )
    .unwrap();
    let writer_config = LanceWriterConfig { commit_every_rows: 2, ..Default::default() };
    let (prior_writer, _) =
        LanceWriter::<ClassPriorImage>::new(corpus.clone(), writer_config.clone(), &metrics);
    let (supervisor_writer, _) =
        LanceWriter::<Supervisor>::new(corpus.clone(), writer_config.clone(), &metrics);
    let (proxy_writer, proxy_stats) = LanceWriter::<Proxy>::new(corpus.clone(), writer_config, &metrics);

    let mut p = Pipeline::new(config(8), metrics);
    let priors = p.source("class_prior_sampler", priors);
    let tuner = p.operator("supervisor_tuner", tuner);
    let generator = p.operator("proxy_generator", generator);
    let prior_sink = p.async_operator("class_prior_writer", prior_writer);
    let supervisor_sink = p.async_operator("supervisor_writer", supervisor_writer);
    let proxy_sink = p.async_operator("proxy_writer", proxy_writer);
    p.connect(priors, tuner).connect(priors, prior_sink);
    p.connect(tuner, generator).connect(tuner, supervisor_sink);
    p.connect(generator, proxy_sink);
    let report = p.start(&tokio::runtime::Handle::current()).unwrap().wait().await;
    assert_eq!(report.outcome, JobOutcome::Succeeded, "{report:?}");
    let _ = proxy_stats;
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_priors_stream_into_dreambooth_and_the_tuned_supervisor_samples_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::open_or_create(dir.path().join("corpus")).unwrap();
    let out_dir = dir.path().join("supervisor");
    run_job(&corpus, &out_dir, true).await;

    let supervisors: Vec<Supervisor> =
        corpus.table::<Supervisor>().await.unwrap().read_rows(None).await.unwrap();
    assert_eq!(supervisors.len(), 1);
    let s = &supervisors[0];
    assert_eq!((s.supervisor_version, s.train_steps), (12, 12));
    assert_eq!(s.instance_prompt, "a sks dog");
    assert!(s.final_loss.is_some_and(f32::is_finite));
    let adapter = PathBuf::from(&s.adapter_path);
    assert!(adapter.ends_with("pytorch_lora_weights.safetensors") && adapter.is_file());
    let checkpoints: Vec<String> = std::fs::read_dir(out_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(checkpoints.contains(&"checkpoint-00000012".to_string()), "{checkpoints:?}");

    let priors = corpus.table::<ClassPriorImage>().await.unwrap().read_rows(None).await.unwrap();
    assert_eq!(priors.len(), 6);
    assert!(priors.iter().all(|r| r.prompt == "a dog" && r.width == 16));

    let proxies: Vec<Proxy> = corpus.table::<Proxy>().await.unwrap().read_rows(None).await.unwrap();
    assert_eq!(proxies.len(), 6, "2 prompts x 3 images");
    let seeds: HashSet<u64> = proxies.iter().map(|p| p.seed).collect();
    assert_eq!(seeds, (1000..1006).collect());
    // Encoded off the sampling thread, the batches still arrive in the plan's order.
    let order: Vec<u64> = proxies.iter().map(|p| p.seed).collect();
    assert_eq!(order, plan().items().iter().map(|i| i.seed).collect::<Vec<_>>());
    assert!(proxies.iter().all(|p| p.supervisor_version == 12 && p.keep.is_none() && p.width == 16));

    // The proxies are the tuned model's samples: the same (prompt, seed) from the base model
    // differs, from base + adapter it is identical.
    let beach = proxies.iter().find(|p| p.prompt_index == 1).unwrap();
    let stored = image::load_from_memory(&beach.image_png).unwrap().to_rgb8();
    let tuned = load_supervisor(&model_dir(), None, "cpu", Some(&adapter), &sampling()).unwrap();
    let again = &sample_images(&tuned, &[beach.prompt.as_str()], &[beach.seed], &sampling()).unwrap()[0];
    assert_eq!(&stored, again, "a proxy is reproducible from its key and the adapter");
    let base = load_supervisor(&model_dir(), None, "cpu", None, &sampling()).unwrap();
    let untuned = &sample_images(&base, &[beach.prompt.as_str()], &[beach.seed], &sampling()).unwrap()[0];
    assert_ne!(&stored, untuned, "the adapter changes the samples");

    // The same job again: the tuner resumes at its last step, nothing is stored twice.
    run_job(&corpus, &out_dir, true).await;
    assert_eq!(corpus.table::<Proxy>().await.unwrap().count_rows(None).await.unwrap(), 6);
    assert_eq!(corpus.table::<ClassPriorImage>().await.unwrap().count_rows(None).await.unwrap(), 6);
    assert_eq!(corpus.table::<Supervisor>().await.unwrap().count_rows(None).await.unwrap(), 1);
}

/// Every row of table `T` as (seed, PNG), by seed.
async fn by_seed<T: proxytune_schemas::Table>(
    corpus: &Corpus,
    row: impl Fn(T) -> (u64, Vec<u8>),
) -> Vec<(u64, Vec<u8>)> {
    let mut rows: Vec<(u64, Vec<u8>)> =
        corpus.table::<T>().await.unwrap().read_rows(None).await.unwrap().into_iter().map(row).collect();
    rows.sort();
    rows
}

/// One copy for the class priors and the tuning: the priors are drawn from the copy whose
/// adapters train meanwhile, with the adapters off, and come out bit for bit the base model's; the
/// adapter and the proxies equal those of a job where each stage loads its own copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_supervisor_copy_gives_the_rows_and_adapter_of_separate_copies() {
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for share in [false, true] {
        let root = dir.path().join(if share { "shared" } else { "separate" });
        let corpus = Corpus::open_or_create(root.join("corpus")).unwrap();
        run_job(&corpus, &root.join("supervisor"), share).await;
        let priors = by_seed::<ClassPriorImage>(&corpus, |r| (r.seed, r.image_png)).await;
        let proxies = by_seed::<Proxy>(&corpus, |r| (r.seed, r.image_png)).await;
        let adapter = std::fs::read(root.join("supervisor/pytorch_lora_weights.safetensors")).unwrap();
        outputs.push((priors, proxies, adapter));
    }
    let (separate, shared) = (&outputs[0], &outputs[1]);
    assert_eq!(shared.0.len(), 6);
    assert!(shared.0 == separate.0, "the class priors differ");
    assert!(shared.2 == separate.2, "the adapters differ");
    assert!(shared.1 == separate.1, "the proxies differ");
    // The priors are the base model's own samples.
    let base = load_supervisor(&model_dir(), None, "cpu", None, &sampling()).unwrap();
    let (seed, png) = &shared.0[5];
    let sampled = &sample_images(&base, &["a dog"], &[*seed], &sampling()).unwrap()[0];
    assert_eq!(&image::load_from_memory(png).unwrap().to_rgb8(), sampled);
}

/// The mechanism under the test above, without its timing: the one copy, its adapters trained
/// three steps, samples the base model bit for bit with them off, and the tuned one with them on.
#[test]
fn the_shared_copy_samples_the_base_model_with_its_trained_adapters_off() {
    let dir = tempfile::tempdir().unwrap();
    let (prior_config, tuner_config) = configs(dir.path());
    let shared = SharedSupervisor::for_stages(&prior_config, &tuner_config).unwrap();
    let copy = shared.get().unwrap();
    assert!(std::sync::Arc::ptr_eq(&copy, &shared.get().unwrap()), "one copy while it is held");
    let sd = &mut *copy.lock().unwrap();
    let config = DreamBoothConfig {
        learning_rate: 1e-2,
        max_train_steps: 3,
        train_batch_size: 2,
        prior_loss_weight: 0.0,
        num_class_images: 0,
        ..Default::default()
    };
    let mut trainer = DreamBoothTrainer::new(sd, config).unwrap();
    let pixels = images_to_square_batch(&references(), 16, tch::Device::Cpu).unwrap() * 2.0 - 1.0;
    trainer.set_instance_images(sd, &pixels).unwrap();
    for _ in 0..3 {
        trainer.train_step(sd).unwrap();
    }
    let base = load_supervisor(&model_dir(), None, "cpu", None, &sampling()).unwrap();
    let sample = |model: &_| sample_images(model, &["a dog", "a dog"], &[3, 4], &sampling()).unwrap();
    let want = sample(&base);
    assert!(sd.without_adapters(|sd| sample(sd)) == want, "adapters off: the base model");
    assert!(sd.lora_switch.is_on(), "on again after");
    assert!(sample(sd) != want, "adapters on: the tuned model");
    // Other settings cannot share: full fine-tuning, or a UNet of another precision.
    let full = SupervisorTunerConfig { lora: None, ..tuner_config.clone() };
    assert!(SharedSupervisor::for_stages(&prior_config, &full).unwrap_err().contains("whole UNet"));
    let mut bf16 = prior_config.clone();
    bf16.sampling.unet_precision = UnetPrecision::Bf16;
    let why = SharedSupervisor::for_stages(&bf16, &tuner_config).err().unwrap();
    assert!(why.contains("BFloat16") && why.contains("supervisor.dreambooth.precision"), "{why}");
}

/// Sampling with the UNet in bfloat16 or float16 (built so, the text encoders and the VAE in
/// float32) draws the float32 model's images to within a grey level or two: the mean squared
/// pixel difference (0-255) over four images is under 2. Measured on a 2-vCPU AMD EPYC machine:
/// 0.32 (bfloat16) and 0.037 (float16).
#[test]
fn a_half_precision_unet_samples_near_the_float32_one() {
    let prompts = ["a dog", "a sks dog", "a dog on the beach", "a red dog"];
    let seeds = [1, 2, 3, 4];
    let sample = |precision: UnetPrecision| {
        let sampling = SamplingConfig { unet_precision: precision, batch_images: 4, ..sampling() };
        let model = load_supervisor(&model_dir(), None, "cpu", None, &sampling).unwrap();
        assert_eq!(model.unet_kind(), precision.kind());
        sample_images(&model, &prompts, &seeds, &sampling).unwrap()
    };
    let float = sample(UnetPrecision::Fp32);
    for precision in [UnetPrecision::Bf16, UnetPrecision::Fp16] {
        let mse = pixel_mse(&float, &sample(precision));
        eprintln!("{precision:?} sampling: pixel MSE {mse:.3} against float32");
        assert!(mse < 2.0, "{precision:?}: {mse}");
    }
}

/// Mean squared pixel difference of two image lists (0–255 scale).
fn pixel_mse(a: &[image::RgbImage], b: &[image::RgbImage]) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.as_raw().iter().zip(y.as_raw()) {
            sum += (*p as f64 - *q as f64).powi(2);
            n += 1;
        }
    }
    sum / n as f64
}

/// Issue 4's last proof, on the world's pretrained Stable Diffusion (whose text encoder tells
/// `a dog` from `a sks dog`): DreamBooth-LoRA on a world subject with prior preservation (λ = 1,
/// class images from the untuned model) moves `a dog` samples away from the base model's far less
/// than the same training without it, and both learn the subject (world-DINO similarity of
/// `a sks dog` samples to the references rises).
#[test]
fn prior_preservation_keeps_class_samples_near_the_base_model() {
    use proxytune_actors::world::{World, CLASSES};
    use proxytune_models::diffusion::dreambooth::DreamBoothTrainer;
    use proxytune_models::diffusion::pipeline::StableDiffusion;
    use proxytune_models::scorers::clip_dino::Dino;
    use proxytune_models::scorers::ImageEmbedder;

    let root = repo_root().join("models/world");
    let dir = root.join("supervisor");
    let dino = Dino::load(&root.join("dino"), tch::Device::Cpu).unwrap();
    let world = World::new(7, 8);
    let subject = world.subject(2, 5).unwrap();
    let class = CLASSES[subject.instance.class];
    let sampling =
        SamplingConfig { resolution: 32, num_inference_steps: 20, guidance_scale: 5.0, ..sampling() };
    let batch01 = |images: &[image::RgbImage]| {
        proxytune_actors::stages::intake::images_to_batch(images, tch::Device::Cpu).unwrap()
    };
    let references: Vec<image::RgbImage> = subject.references.iter().map(|s| s.render(32)).collect();
    let embed = |images: &[image::RgbImage]| {
        let e = tch::no_grad(|| dino.embed(&batch01(images)));
        &e / e.norm_scalaropt_dim(2.0, [1], true)
    };
    let reference_embeddings = embed(&references);
    let fidelity = |images: &[image::RgbImage]| {
        embed(images).matmul(&reference_embeddings.tr()).mean(tch::Kind::Float).double_value(&[])
    };
    let base = load_supervisor(&dir, None, "cpu", None, &sampling).unwrap();
    let class_prompt = format!("a {class}");
    let instance_prompt = format!("a sks {class}");
    let probe_seeds: Vec<u64> = (500..508).collect();
    let probe = |sd: &StableDiffusion, prompt: &str| {
        sample_images(sd, &vec![prompt; probe_seeds.len()], &probe_seeds, &sampling).unwrap()
    };
    let base_class = probe(&base, &class_prompt);
    let base_fidelity = fidelity(&probe(&base, &instance_prompt));
    let prior_seeds: Vec<u64> = (0..16).collect();
    let priors = sample_images(&base, &vec![class_prompt.as_str(); 16], &prior_seeds, &sampling).unwrap();

    let train = |lambda: f64| {
        let lora = LoraConfig::attention(8, 8.0);
        let mut sd = StableDiffusion::load_with_lora(&dir, tch::Device::Cpu, Some(&lora)).unwrap();
        let config = DreamBoothConfig {
            instance_prompt: instance_prompt.clone(),
            class_prompt: class_prompt.clone(),
            learning_rate: 1e-3,
            max_train_steps: STEPS,
            train_batch_size: 4,
            prior_loss_weight: lambda,
            num_class_images: if lambda > 0.0 { 16 } else { 0 },
            seed: 3,
            ..Default::default()
        };
        let mut trainer = DreamBoothTrainer::new(&mut sd, config).unwrap();
        trainer.set_instance_images(&sd, &(batch01(&references) * 2.0 - 1.0)).unwrap();
        if lambda > 0.0 {
            trainer.add_class_images(&sd, &(batch01(&priors) * 2.0 - 1.0)).unwrap();
        }
        while !trainer.finished() {
            trainer.train_step(&sd).unwrap();
        }
        (pixel_mse(&probe(&sd, &class_prompt), &base_class), fidelity(&probe(&sd, &instance_prompt)))
    };
    let (drift_prior, fidelity_prior) = train(1.0);
    let (drift_none, fidelity_none) = train(0.0);
    eprintln!(
        "world SD, DreamBooth-LoRA {STEPS} steps on {}: `{class_prompt}` drift from the base (pixel MSE) {drift_prior:.1} with prior preservation vs {drift_none:.1} without; \
         `{instance_prompt}` world-DINO fidelity to the references {base_fidelity:.3} before, {fidelity_prior:.3} with / {fidelity_none:.3} without",
        subject.name
    );
    assert!(drift_prior < 0.5 * drift_none, "{drift_prior} vs {drift_none}");
    assert!(fidelity_prior > base_fidelity && fidelity_none > base_fidelity);
}

const STEPS: u64 = 120;
