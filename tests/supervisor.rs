//! Stages 1 and 2 as a streaming pipeline on the tiny SD fixture: the untuned model samples class
//! priors → the SupervisorTuner trains DreamBooth-LoRA while they stream in and emits "supervisor
//! ready" → the ProxyGenerator samples its plan with the adapter → Lance. Then the same job again:
//! the tuner resumes from its last checkpoint and the corpus gains no duplicate.

use std::collections::HashSet;
use std::path::PathBuf;

use proxytune_actors::class_prior_sampler::{ClassPriorConfig, ClassPriorSampler};
use proxytune_actors::corpus::Corpus;
use proxytune_actors::diffusion_sampling::{load_supervisor, sample_images, SamplingConfig};
use proxytune_actors::lance_writer::{LanceWriter, LanceWriterConfig};
use proxytune_actors::proxy_generator::{PromptPlan, ProxyGenerator, ProxyGeneratorConfig};
use proxytune_actors::runtime::{JobOutcome, Metrics, Pipeline, PipelineReport};
use proxytune_actors::supervisor_tuner::{SupervisorTuner, SupervisorTunerConfig};
use proxytune_models::diffusion::dreambooth::DreamBoothConfig;
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

async fn run_job(corpus: &Corpus, out_dir: &std::path::Path) -> PipelineReport {
    let metrics = Metrics::noop();
    let priors = ClassPriorSampler::new(
        ClassPriorConfig {
            job_id: "job".into(),
            class_noun: "dog".into(),
            class_prompt: "a dog".into(),
            model_dir: model_dir(),
            model_id: "sd_tiny".into(),
            device: "cpu".into(),
            num_images: 6,
            first_seed: 0,
            sampling: sampling(),
        },
        &metrics,
    );
    let tuner = SupervisorTuner::new(
        SupervisorTunerConfig {
            job_id: "job".into(),
            subject: "dog9".into(),
            class_noun: "dog".into(),
            model_dir: model_dir(),
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
        },
        references(),
        &metrics,
    )
    .unwrap();
    let generator = ProxyGenerator::new(
        ProxyGeneratorConfig {
            job_id: "job".into(),
            subject: "dog9".into(),
            model_dir: model_dir(),
            device: "cpu".into(),
            plan: plan(),
            sampling: sampling(),
        },
        &metrics,
    )
    .unwrap();
    let writer_config = LanceWriterConfig { commit_every_rows: 2, forward_committed: false };
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
    run_job(&corpus, &out_dir).await;

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
    assert!(proxies.iter().all(|p| p.supervisor_version == 12 && p.keep.is_none() && p.width == 16));

    // The proxies are the tuned model's samples: the same (prompt, seed) from the base model
    // differs, from base + adapter it is identical.
    let beach = proxies.iter().find(|p| p.prompt_index == 1).unwrap();
    let stored = image::load_from_memory(&beach.image_png).unwrap().to_rgb8();
    let tuned = load_supervisor(&model_dir(), "cpu", Some(&adapter)).unwrap();
    let again = &sample_images(&tuned, &[beach.prompt.as_str()], &[beach.seed], &sampling()).unwrap()[0];
    assert_eq!(&stored, again, "a proxy is reproducible from its key and the adapter");
    let base = load_supervisor(&model_dir(), "cpu", None).unwrap();
    let untuned = &sample_images(&base, &[beach.prompt.as_str()], &[beach.seed], &sampling()).unwrap()[0];
    assert_ne!(&stored, untuned, "the adapter changes the samples");

    // The same job again: the tuner resumes at its last step, nothing is stored twice.
    run_job(&corpus, &out_dir).await;
    assert_eq!(corpus.table::<Proxy>().await.unwrap().count_rows(None).await.unwrap(), 6);
    assert_eq!(corpus.table::<ClassPriorImage>().await.unwrap().count_rows(None).await.unwrap(), 6);
    assert_eq!(corpus.table::<Supervisor>().await.unwrap().count_rows(None).await.unwrap(), 1);
}
