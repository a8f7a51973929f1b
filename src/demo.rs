//! `proxytune demo`: the whole mission on the toy world, end to end, with the pretrained world
//! models in `models/world` — the job's world preset.
//!
//! It renders one world subject's references (or reads a folder of photos of an object of a world
//! class, `--photos`), resolves the world's stage configs into a [`StagePlan`] and runs it as every
//! job runs ([`crate::job::execute`]): the streaming pipeline, then the untuned student, the tuned
//! supervisor and the tuned student evaluated on the subject's 25 world prompts with the same
//! seeds, with the world's two exact checks, and `report/index.html`. `/metrics` is served while
//! it runs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use proxytune_actors::corpus::Corpus;
use proxytune_actors::stages::class_prior_sampler::ClassPriorConfig;
use proxytune_actors::stages::filter::{FilterConfig, ImageMetric};
use proxytune_actors::stages::proxy_generator::{PromptPlan, ProxyGeneratorConfig};
use proxytune_actors::stages::supervisor_tuner::SupervisorTunerConfig;
use proxytune_actors::world::{World, CLASSES, IDENTIFIER};
use proxytune_models::diffusion::dreambooth::DreamBoothConfig;
use proxytune_models::lora::LoraConfig;

use crate::job::evaluate::ModelLoader;
use crate::job::execute::Evaluator;
use crate::job::pipeline::{JobCommand, ProgressHandle};
use crate::job::plan::{device_name, EvalPlan, ScorerSource, StagePlan};
use crate::job::spec::Baseline;
use crate::subject::JobSubject;
use crate::world_models::{
    evaluate, student, student_trainer_config, supervisor, supervisor_sampling, tokenize_config, EvalSpec,
    ModelScores, WorldStudent,
};

/// Arguments of `proxytune demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Output folder: corpus/, supervisor/, student/, report/.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// The pretrained world models (`tools/dev world`).
    #[arg(long, default_value = "models/world")]
    pub world: PathBuf,
    /// The world subject (`teapot_0`, `backpack_1`, `dog_2`, `cat_3`, `vase_4`, `sneaker_5`,
    /// `clock_6`, `robot_toy_7`), or the name of the subject of `--photos`.
    #[arg(long, default_value = "dog_2")]
    pub subject: String,
    /// Teach the subject from this folder of 3–6 photos (PNG or JPEG) instead of a world subject.
    #[arg(long, requires = "class_noun")]
    pub photos: Option<PathBuf>,
    /// The class noun of `--photos`' subject (one of the world's classes).
    #[arg(long)]
    pub class_noun: Option<String>,
    /// The rare-token identifier of the subject in prompts.
    #[arg(long, default_value = IDENTIFIER)]
    pub identifier: String,
    /// World seed (the pretrained models were trained on world 7).
    #[arg(long, default_value_t = 7)]
    pub world_seed: u64,
    /// Reference renders of the subject (4–6).
    #[arg(long, default_value_t = 5)]
    pub references: usize,
    /// Class-prior images the untuned supervisor samples for prior preservation.
    #[arg(long, default_value_t = 48)]
    pub class_priors: usize,
    /// DreamBooth-LoRA optimiser steps of the supervisor.
    #[arg(long, default_value_t = 400)]
    pub supervisor_steps: u64,
    /// Proxies per prompt (16 prompts: the subject prompt, 10 contexts, 5 property edits).
    #[arg(long, default_value_t = 24)]
    pub proxies_per_prompt: u32,
    /// The world student to teach: the Lumina-mGPT-style Chameleon or the LlamaGen-style one.
    #[arg(long, value_enum, default_value_t = WorldStudent::Chameleon)]
    pub student: WorldStudent,
    /// LoRA optimiser steps of the student.
    #[arg(long, default_value_t = 1500)]
    pub student_steps: u64,
    /// Kept proxies the student waits for before its first step.
    #[arg(long, default_value_t = 16)]
    pub student_min_rows: usize,
    /// Evaluation images per prompt (DreamBench: 4).
    #[arg(long, default_value_t = 4)]
    pub eval_images: usize,
    /// Evaluate only the first this many of the subject's 25 prompts.
    #[arg(long)]
    pub eval_prompts: Option<usize>,
    /// Reject proxies whose world-DINO fidelity to the references is below this (the paper
    /// filters nothing; the world DINO also scores contexts, so a high threshold drops whole
    /// contexts — see `proxytune replay` to compare).
    #[arg(long)]
    pub min_fidelity: Option<f32>,
    /// Reject a proxy whose DINO cosine to an already-kept one is above this.
    #[arg(long, default_value_t = 0.995)]
    pub max_duplicate_cosine: f32,
    /// Serve Prometheus `/metrics` on this loopback port while it runs (0: a free port; the
    /// address is logged).
    #[arg(long, default_value_t = 9464)]
    pub metrics_port: u16,
    /// Do not serve `/metrics`.
    #[arg(long)]
    pub no_metrics: bool,
    /// Keep serving `/metrics` this many seconds after the report is written (for a last scrape).
    #[arg(long, default_value_t = 0)]
    pub linger_seconds: u64,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Baselines trained and evaluated beside the Proxy-Tuned student (comma-separated; by default
    /// all three: the student's LoRA trained directly on the references, on augmented copies, and
    /// every weight on the references).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Baseline::ALL)]
    pub baselines: Vec<Baseline>,
    /// Train and evaluate no baseline.
    #[arg(long, conflicts_with = "baselines")]
    pub no_baselines: bool,
    /// Torch threads a call while the pipeline runs (the job spec's `devices.cpu_threads`; default:
    /// half the cores on the CPU, else all).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub cpu_threads: Option<u64>,
    /// Checkpoint the supervisor's and the student's training every this many steps (a restarted
    /// job resumes from the newest).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
}

const JOB: &str = "demo";

/// Every check that can fail before work starts: the subject, budgets, folders, the models.
pub(crate) fn check_settings(args: &DemoArgs) -> anyhow::Result<JobSubject> {
    let world = World::new(args.world_seed, CLASSES.len());
    crate::subject::check_identifier(&args.identifier).context("--identifier")?;
    let subject = match (&args.photos, &args.class_noun) {
        (Some(dir), Some(class)) => JobSubject::folder(&world, &args.subject, class, dir)
            .with_context(|| format!("--photos {}", dir.display()))?,
        (Some(_), None) => anyhow::bail!("--photos needs --class-noun"),
        (None, class) => {
            let s = JobSubject::world(&world, &args.subject, args.references).context("--subject")?;
            if let Some(c) = class.as_deref().filter(|c| *c != s.class_noun()) {
                anyhow::bail!("--class-noun `{c}`: world subject `{}` is a {}", s.name, s.class_noun());
            }
            s
        }
    };
    anyhow::ensure!(
        (4..=6).contains(&args.references),
        "--references must be 4 to 6, got {}",
        args.references
    );
    for (name, value) in [
        ("--class-priors", args.class_priors as u64),
        ("--supervisor-steps", args.supervisor_steps),
        ("--checkpoint-every", args.checkpoint_every),
        ("--proxies-per-prompt", args.proxies_per_prompt as u64),
        ("--student-steps", args.student_steps),
        ("--student-min-rows", args.student_min_rows as u64),
        ("--eval-images", args.eval_images as u64),
    ] {
        anyhow::ensure!(value > 0, "{name} is 0: a budget must be positive");
    }
    if args.eval_prompts == Some(0) {
        anyhow::bail!("--eval-prompts is 0: a budget must be positive");
    }
    crate::world_models::check_models(&args.world, &["clip", "dino", "supervisor", args.student.folder()])?;
    Ok(subject)
}

/// [`check_settings`], then the output folder: creatable, writable, and its `corpus/` a corpus or
/// nothing.
pub(crate) fn check(args: &DemoArgs) -> anyhow::Result<JobSubject> {
    let subject = check_settings(args)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: cannot create it", args.out.display()))?;
    let probe = args.out.join(".writable");
    std::fs::write(&probe, b"").with_context(|| format!("--out {}: not writable", args.out.display()))?;
    std::fs::remove_file(&probe).ok();
    Corpus::open_or_create(args.out.join("corpus"))
        .with_context(|| format!("{}: cannot hold the demo's corpus", args.out.join("corpus").display()))?;
    Ok(subject)
}

/// The proxy plan: the subject prompt, one phrasing of each context, the five edits. (The
/// evaluation also uses the contexts' second phrasings, which no proxy prompt has.)
fn plan(subject: &JobSubject, class: &str, images_per_prompt: u32) -> PromptPlan {
    let contexts = subject.prompts.iter().filter(|p| p.phrasing == 0 || p.edit.is_some());
    PromptPlan {
        subject_prompts: vec![format!("a {IDENTIFIER} {class}")],
        context_prompts: contexts.map(|p| p.caption(Some(IDENTIFIER))).collect(),
        images_per_prompt,
        first_seed: 1_000_000,
    }
}

/// The world preset: each stage's config for the world's models (the world supervisor, DINO and
/// CLIP, and Chameleon student at 32 px).
pub(crate) fn world_plan(args: &DemoArgs, subject: &JobSubject) -> anyhow::Result<StagePlan> {
    let class = subject.class_noun();
    let model_dir = args.world.join("supervisor");
    let device = device_name(&args.device)?;
    let sampling = supervisor_sampling();
    let class_priors = ClassPriorConfig {
        job_id: JOB.into(),
        class_noun: class.into(),
        class_prompt: format!("a {class}"),
        model_dir: model_dir.clone(),
        variant: None,
        model_id: "world-sd".into(),
        device: device.clone(),
        num_images: args.class_priors,
        first_seed: 0,
        sampling: sampling.clone(),
    };
    let tuner = SupervisorTunerConfig {
        job_id: JOB.into(),
        subject: subject.name.clone(),
        class_noun: class.into(),
        model_dir: model_dir.clone(),
        variant: None,
        model_id: "world-sd".into(),
        device: device.clone(),
        lora: Some(LoraConfig::attention(8, 8.0)),
        dreambooth: DreamBoothConfig {
            instance_prompt: format!("a {IDENTIFIER} {class}"),
            class_prompt: format!("a {class}"),
            learning_rate: 1e-3,
            max_train_steps: args.supervisor_steps,
            train_batch_size: 4,
            num_class_images: args.class_priors,
            lr_warmup_steps: 20,
            checkpoint_every: args.checkpoint_every,
            ..Default::default()
        },
        resolution: crate::world_models::SIZE,
        output_dir: args.out.join("supervisor"),
        vae_slicing: false,
    };
    let generator = ProxyGeneratorConfig {
        job_id: JOB.into(),
        subject: subject.name.clone(),
        model_dir: model_dir.clone(),
        variant: None,
        device: device.clone(),
        plan: plan(subject, class, args.proxies_per_prompt),
        sampling: sampling.clone(),
        stored_seeds: Default::default(),
    };
    let filter = FilterConfig {
        min_fidelity: args.min_fidelity,
        fidelity_metric: Some(ImageMetric::Dino),
        min_prompt_adherence: None,
        max_duplicate_cosine: Some(args.max_duplicate_cosine),
        identifier: Some(IDENTIFIER.into()),
    };
    let trainer = student_trainer_config(
        &args.world,
        args.student,
        &device,
        &args.out.join("student"),
        args.student_steps,
        args.student_min_rows,
        None,
        args.checkpoint_every,
    )?;
    Ok(StagePlan {
        job_id: JOB.into(),
        subject: subject.subject_plan(),
        class_priors,
        tuner,
        generator,
        filter,
        scorers: ScorerSource::World(args.world.clone()),
        scorer_device: device.clone(),
        tokenize: tokenize_config(&args.world, args.student, &device, true)?,
        trainer,
        eval: EvalPlan {
            supervisor_dir: model_dir,
            supervisor_variant: None,
            supervisor_sampling: sampling,
            student: args.student.files(&args.world)?,
            student_sampling: args.student.sampling(&args.world)?,
            images_per_prompt: args.eval_images,
            max_prompts: args.eval_prompts,
            skip: false,
            baselines: if args.no_baselines { Vec::new() } else { args.baselines.clone() },
            device,
        },
        out: args.out.clone(),
        tf32: true,
        cpu_threads: args.cpu_threads.map(|n| n as usize),
    })
}

/// The world's evaluation: the world DINO and CLIP, and the renderer's exact checks.
struct WorldEvaluator<'a> {
    args: &'a DemoArgs,
    subject: &'a JobSubject,
}

impl Evaluator for WorldEvaluator<'_> {
    fn evaluate(&self, plan: &StagePlan) -> anyhow::Result<Vec<(String, ModelScores)>> {
        let spec = EvalSpec {
            world_dir: &self.args.world,
            out_dir: &plan.out,
            device: &plan.eval.device,
            images_per_prompt: plan.eval.images_per_prompt,
            max_prompts: plan.eval.max_prompts,
        };
        evaluate(&spec, self.subject, demo_models(self.args, &plan.eval.device, &plan.eval.baselines))
    }

    fn note(&self) -> String {
        "DINO, CLIP-I and CLIP-T use the world's own pretrained encoders (world DINO, world CLIP). The \
         last two columns are the renderer's exact checks."
            .into()
    }
}

fn demo_models<'a>(
    args: &'a DemoArgs,
    device: &'a str,
    baselines: &[Baseline],
) -> Vec<(String, ModelLoader<'a>)> {
    let adapter = args.out.join("supervisor").join(proxytune_models::diffusion::dreambooth::LORA_FILE);
    let tuned = args.out.join("student/adapter_model.safetensors");
    let mut models: Vec<(String, ModelLoader<'a>)> = vec![
        ("student (untuned)".into(), Box::new(move || student(&args.world, args.student, None, device))),
        ("supervisor (DreamBooth-LoRA)".into(), Box::new(move || supervisor(&args.world, &adapter, device))),
        (
            "student (Proxy-Tuned LoRA)".into(),
            Box::new(move || student(&args.world, args.student, Some(&tuned), device)),
        ),
    ];
    for b in baselines {
        let dir = args.out.join(b.dir());
        let adapter = proxytune_models::ar::student::trained_weights(&dir);
        models.push((
            b.label().into(),
            Box::new(move || student(&args.world, args.student, Some(&adapter), device)),
        ));
    }
    models
}

/// Runs the demo from the command line (Ctrl-C cancels); returns the process exit code.
pub async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    check_settings(&args)?; // the folders are checked by `execute`, still before any work
    if !args.no_metrics {
        crate::metrics_server::install(args.metrics_port).await?;
    }
    let (cancel, commands) = tokio::sync::watch::channel(JobCommand::Run);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = cancel.send(JobCommand::Cancel);
        }
    });
    let code = execute(&args, commands, None, &ProgressHandle::default()).await?;
    if code == 0 && !args.no_metrics && args.linger_seconds > 0 {
        tokio::time::sleep(Duration::from_secs(args.linger_seconds)).await;
    }
    Ok(code)
}

/// One demo job: the world preset run as every job runs, under `args.out`, with the global
/// metrics recorder (with `job_id` on every series when given), steered by `commands` (pause,
/// resume, cancel: a cancel drains it). Returns the exit code (0 done, 130 cancelled).
pub async fn execute(
    args: &DemoArgs,
    commands: tokio::sync::watch::Receiver<JobCommand>,
    job_id: Option<&str>,
    progress: &ProgressHandle,
) -> anyhow::Result<i32> {
    let subject = check(args)?;
    let plan = world_plan(args, &subject)?;
    let evaluator = WorldEvaluator { args, subject: &subject };
    crate::job::execute::execute(&plan, &evaluator, commands, job_id, progress).await
}
