//! `proxytune evaluate ...`: the DreamBench evaluation commands.
//!
//! `evaluate real-images` computes the "real images" row of the protocol — every subject's
//! reference photos against each other — for FEAT-I (always: real weights fetched at setup) and
//! for DINO and CLIP-I when checkpoint folders are given, over all subjects and over the 9-subject
//! subset, and writes it as JSON and Markdown with a grid of each subject's photos.
//!
//! `evaluate generators` runs the protocol for the supervisor and/or the student (25 prompts ×
//! 4 images per subject by default, the same seeds for both) and writes their tables side by side
//! (`report.md`), each model's JSON report and a grid per subject (rows: prompts, columns: images).

use std::path::{Path, PathBuf};

use anyhow::Context;
use proxytune_actors::evaluation::dreambench::{
    real_images_row, DreamBench, MetricTable, ProtocolConfig, SUBSET_9,
};
use proxytune_models::scorers::clip_dino::{ClipScorer, Dino};
use proxytune_models::scorers::feat_i::{FeatI, WEIGHTS_FILE};
use proxytune_models::scorers::ImageEmbedder;

/// Evaluation subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum EvaluateCommand {
    /// The "real images" row: each subject's references against each other.
    RealImages(RealImagesArgs),
    /// Supervisor and student side by side: every prompt x images-per-prompt with the same seeds.
    Generators(Box<GeneratorsArgs>),
}

/// Arguments of `proxytune evaluate generators`.
#[derive(Debug, clap::Args)]
pub struct GeneratorsArgs {
    /// Output folder (report.md, supervisor.json, student.json, grids/<role>/<subject>.png).
    #[arg(long, default_value = "out/evaluate")]
    out: PathBuf,
    #[command(flatten)]
    scorers: ScorerArgs,
    /// The supervisor: a diffusers model folder.
    #[arg(long)]
    supervisor: Option<PathBuf>,
    /// Its DreamBooth LoRA (`pytorch_lora_weights.safetensors`, `lora_config.json` beside it).
    #[arg(long, requires = "supervisor")]
    supervisor_adapter: Option<PathBuf>,
    /// The supervisor's sampling (JSON: num_inference_steps, guidance_scale, sampler, resolution, ...).
    #[arg(long)]
    supervisor_sampling: Option<PathBuf>,
    /// The student: a Chameleon / Lumina-mGPT folder (config.json, model.safetensors,
    /// tokenizer.json, vq_decoder.safetensors).
    #[arg(long)]
    student: Option<PathBuf>,
    /// Its LoRA (`adapter_model.safetensors`, `lora_config.json` beside it).
    #[arg(long, requires = "student")]
    student_adapter: Option<PathBuf>,
    /// The student's sampling (JSON: grid, image {guidance_scale, image_top_k, ...}, tokens {...}).
    #[arg(long)]
    student_sampling: Option<PathBuf>,
    /// Subjects: `all`, `subset9`, or a comma-separated list.
    #[arg(long, default_value = "all")]
    subjects: String,
    /// Images per prompt (DreamBench: 4).
    #[arg(long, default_value_t = 4)]
    images_per_prompt: usize,
    /// Only the first this many prompts of each subject (DreamBench: all 25).
    #[arg(long)]
    max_prompts: Option<usize>,
    /// Base of the sampling seeds (the same for every model).
    #[arg(long, default_value_t = 0)]
    seed_base: u64,
}

/// Arguments of `proxytune evaluate real-images`.
#[derive(Debug, clap::Args)]
pub struct RealImagesArgs {
    /// Output folder (real_images.json, real_images.md, grids/).
    #[arg(long, default_value = "out/evaluate")]
    out: PathBuf,
    #[command(flatten)]
    scorers: ScorerArgs,
}

/// The benchmark folder, the scorers and the device, shared by the evaluation commands.
#[derive(Debug, clap::Args)]
pub struct ScorerArgs {
    /// DreamBench-layout folder.
    #[arg(long, default_value_os_t = crate::default_dreambench())]
    dreambench: PathBuf,
    /// Folder with the converted EfficientNet-Lite0 weights and CLIP's BPE ($PROXYTUNE_ASSETS).
    #[arg(long, env = "PROXYTUNE_ASSETS")]
    assets: PathBuf,
    /// A transformers DINO ViT checkpoint folder (config.json, model.safetensors).
    #[arg(long)]
    dino: Option<PathBuf>,
    /// A transformers CLIP checkpoint folder (config.json, model.safetensors, and its tokenizer
    /// files when it has its own vocabulary): CLIP-I and CLIP-T.
    #[arg(long)]
    clip: Option<PathBuf>,
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// The loaded scorers: FEAT-I always, DINO and CLIP when their folders are given.
struct Scorers {
    feat: FeatI,
    dino: Option<Dino>,
    clip: Option<ClipScorer>,
    device: tch::Device,
}

impl Scorers {
    fn load(args: &ScorerArgs) -> anyhow::Result<Self> {
        let device = proxytune_models::device::parse_device(&args.device)?;
        let feat = FeatI::load(&args.assets.join(WEIGHTS_FILE), device)?;
        let dino = args.dino.as_deref().map(|d| Dino::load(d, device)).transpose()?;
        let clip = match &args.clip {
            Some(dir) => {
                Some(ClipScorer::load(dir, crate::job::plan::clip_tokenizer(dir, &args.assets)?, device)?)
            }
            None => None,
        };
        Ok(Scorers { feat, dino, clip, device })
    }

    /// The image metrics, FEAT-I first.
    fn embedders(&self) -> Vec<&dyn ImageEmbedder> {
        let mut embedders: Vec<&dyn ImageEmbedder> = vec![&self.feat];
        if let Some(d) = &self.dino {
            embedders.push(d);
        }
        if let Some(c) = &self.clip {
            embedders.push(c);
        }
        embedders
    }
}

fn markdown(tables: &std::collections::BTreeMap<String, MetricTable>) -> String {
    let metrics: Vec<&String> = tables.keys().collect();
    let fmt = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.3}"));
    let mut md = String::from("# DreamBench: real images (references against each other)\n\n");
    md.push_str(&format!(
        "| subjects | {} |\n|---|{}\n",
        metrics.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(" | "),
        "---|".repeat(metrics.len())
    ));
    md.push_str(&format!(
        "| all | {} |\n",
        metrics.iter().map(|m| fmt(tables[*m].all)).collect::<Vec<_>>().join(" | ")
    ));
    md.push_str(&format!(
        "| 9-subject subset | {} |\n\n",
        metrics.iter().map(|m| fmt(tables[*m].subset_9)).collect::<Vec<_>>().join(" | ")
    ));
    md.push_str(&format!("9-subject subset: {}.\n\n", SUBSET_9.join(", ")));
    md.push_str(&format!(
        "| subject | {} |\n|---|{}\n",
        metrics.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(" | "),
        "---|".repeat(metrics.len())
    ));
    let subjects: std::collections::BTreeSet<&String> =
        tables.values().flat_map(|t| t.per_subject.keys()).collect();
    for s in subjects {
        md.push_str(&format!(
            "| {s} | {} |\n",
            metrics
                .iter()
                .map(|m| fmt(tables[*m].per_subject.get(s).copied()))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    for (metric, table) in tables {
        for (subject, reason) in &table.failed {
            md.push_str(&format!("\n{metric}: `{subject}` failed: {reason}\n"));
        }
    }
    md.push_str(
        "\nFEAT-I is EfficientNet-Lite0's ImageNet features: an offline stand-in, not DINO or CLIP-I.\n",
    );
    md
}

/// Writes a one-row grid of a subject's photos.
fn grid(
    bench: &DreamBench,
    subject: &proxytune_actors::stages::intake::SubjectEntry,
    out: &Path,
) -> anyhow::Result<()> {
    let images = bench.references(subject, tch::Device::Cpu)?; // [N, 3, S, S]
    let (n, s) = (images.size()[0], images.size()[2]);
    let row = images.permute([2, 0, 3, 1]).reshape([s, n * s, 3]); // [S, N*S, 3]
    let bytes: Vec<u8> =
        Vec::try_from((row * 255.0).round().clamp(0.0, 255.0).to_kind(tch::Kind::Uint8).flatten(0, -1))?;
    let img = image::RgbImage::from_raw((n * s) as u32, s as u32, bytes).context("grid size")?;
    img.save(out.join(format!("{}.png", subject.subject)))?;
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    match path {
        Some(p) => {
            Ok(serde_json::from_str(&std::fs::read_to_string(p).with_context(|| p.display().to_string())?)
                .with_context(|| format!("{}: not a valid sampling config", p.display()))?)
        }
        None => Ok(T::default()),
    }
}

/// A grid of a subject's samples: one row per prompt, one column per image.
fn sample_grid(samples: &[&proxytune_schemas::EvalSample], path: &Path) -> anyhow::Result<()> {
    let (Some(first), true) = (samples.first(), !samples.is_empty()) else { return Ok(()) };
    let (w, h) = (first.width, first.height);
    let rows = samples.iter().map(|s| s.prompt_index).max().unwrap_or(0) + 1;
    let cols = samples.iter().map(|s| s.sample_index).max().unwrap_or(0) + 1;
    let mut grid = image::RgbImage::new(cols * w, rows * h);
    for s in samples {
        let img = image::load_from_memory(&s.image_png)?.to_rgb8();
        image::imageops::replace(&mut grid, &img, (s.sample_index * w) as i64, (s.prompt_index * h) as i64);
    }
    grid.save(path).with_context(|| path.display().to_string())?;
    Ok(())
}

fn side_by_side(
    reports: &[proxytune_actors::evaluation::dreambench::GeneratorReport],
    protocol: &ProtocolConfig,
) -> String {
    let fmt = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.3}"));
    let roles: Vec<String> = reports.iter().map(|r| r.role.as_str().to_string()).collect();
    let mut md = String::from("# DreamBench: supervisor and student\n\n");
    md.push_str(&format!(
        "{} image(s) per prompt, seeds from {} (the same for every model); CLIP-T uses the prompt with the \
         identifier `{}` removed. FEAT-I is EfficientNet-Lite0's ImageNet features: an offline stand-in, \
         not DINO or CLIP-I.\n\n",
        protocol.images_per_prompt, protocol.seed_base, protocol.identifier
    ));
    let metrics: std::collections::BTreeSet<&String> =
        reports.iter().flat_map(|r| r.metrics.keys()).collect();
    md.push_str(&format!(
        "| metric | subjects | {} |\n|---|---|{}\n",
        roles.join(" | "),
        "---|".repeat(roles.len())
    ));
    for m in &metrics {
        for (label, pick) in [("all", 0), ("9-subject subset", 1)] {
            let cells: Vec<String> = reports
                .iter()
                .map(|r| fmt(r.metrics.get(*m).and_then(|t| if pick == 0 { t.all } else { t.subset_9 })))
                .collect();
            md.push_str(&format!("| {m} | {label} | {} |\n", cells.join(" | ")));
        }
    }
    md.push_str(&format!("\n9-subject subset: {}.\n", SUBSET_9.join(", ")));
    for m in &metrics {
        md.push_str(&format!(
            "\n## {m} per subject\n\n| subject | {} |\n|---|{}\n",
            roles.join(" | "),
            "---|".repeat(roles.len())
        ));
        let subjects: std::collections::BTreeSet<&String> =
            reports.iter().filter_map(|r| r.metrics.get(*m)).flat_map(|t| t.per_subject.keys()).collect();
        for subject in subjects {
            let cells: Vec<String> = reports
                .iter()
                .map(|r| fmt(r.metrics.get(*m).and_then(|t| t.per_subject.get(subject).copied())))
                .collect();
            md.push_str(&format!("| {subject} | {} |\n", cells.join(" | ")));
        }
        for r in reports {
            if let Some(t) = r.metrics.get(*m) {
                for (subject, reason) in &t.failed {
                    md.push_str(&format!("\n{}: `{subject}` failed: {reason}\n", r.role.as_str()));
                }
            }
        }
    }
    md
}

fn generators(args: GeneratorsArgs) -> anyhow::Result<()> {
    use proxytune_actors::evaluation::dreambench::{evaluate_generator, Generator};
    use proxytune_actors::evaluation::generators::{StudentGenerator, SupervisorGenerator};
    anyhow::ensure!(
        args.supervisor.is_some() || args.student.is_some(),
        "give --supervisor and/or --student"
    );
    let scorers = Scorers::load(&args.scorers)?;
    let (device, embedders) = (scorers.device, scorers.embedders());
    let bench = DreamBench::open(&args.scorers.dreambench)?;
    let subjects: Vec<proxytune_actors::stages::intake::SubjectEntry> = match args.subjects.as_str() {
        "all" => bench.subjects.clone(),
        "subset9" => {
            bench.subjects.iter().filter(|s| SUBSET_9.contains(&s.subject.as_str())).cloned().collect()
        }
        list => {
            let names: Vec<&str> = list.split(',').map(str::trim).collect();
            if let Some(missing) = names.iter().find(|n| !bench.subjects.iter().any(|s| s.subject == **n)) {
                anyhow::bail!("--subjects: no subject `{missing}` in {}", args.scorers.dreambench.display());
            }
            bench.subjects.iter().filter(|s| names.contains(&s.subject.as_str())).cloned().collect()
        }
    };
    let protocol = ProtocolConfig {
        images_per_prompt: args.images_per_prompt,
        seed_base: args.seed_base,
        max_prompts: args.max_prompts,
        ..Default::default()
    };
    let device_name = args.scorers.device.clone();
    let mut models: Vec<Box<dyn Generator>> = Vec::new();
    if let Some(dir) = &args.supervisor {
        let sampling = read_json(args.supervisor_sampling.as_deref())?;
        models.push(Box::new(SupervisorGenerator::load(
            dir,
            None,
            args.supervisor_adapter.as_deref(),
            &device_name,
            sampling,
        )?));
    }
    if let Some(dir) = &args.student {
        let path = args.student_sampling.as_deref();
        let sampling: proxytune_actors::evaluation::generators::StudentSampling = match path {
            Some(p) => {
                serde_json::from_str(&std::fs::read_to_string(p).with_context(|| p.display().to_string())?)
                    .with_context(|| format!("{}: not a valid student sampling config", p.display()))?
            }
            None => proxytune_actors::evaluation::generators::StudentSampling {
                grid: 32,
                image: Default::default(),
                tokens: Default::default(),
                bf16: false,
                batch: 16,
            },
        };
        let files = proxytune_models::ar::student::StudentFiles::chameleon(dir, sampling.tokens.clone());
        models.push(Box::new(StudentGenerator::load(
            &files,
            args.student_adapter.as_deref(),
            &device_name,
            sampling,
        )?));
    }
    let mut reports = Vec::new();
    for model in &mut models {
        let clip_t = scorers.clip.as_ref().map(|c| c as &dyn proxytune_actors::stages::filter::PromptScorer);
        let report =
            evaluate_generator(&bench, &subjects, model.as_mut(), &embedders, clip_t, &protocol, device)?;
        let role = report.role.as_str().to_string();
        let grids = args.out.join("grids").join(&role);
        std::fs::create_dir_all(&grids).with_context(|| grids.display().to_string())?;
        std::fs::write(args.out.join(format!("{role}.json")), serde_json::to_string_pretty(&report)?)?;
        for subject in &subjects {
            let samples: Vec<&proxytune_schemas::EvalSample> =
                report.samples.iter().filter(|s| s.subject == subject.subject).collect();
            sample_grid(&samples, &grids.join(format!("{}.png", subject.subject)))?;
        }
        reports.push(report);
    }
    let md = side_by_side(&reports, &protocol);
    std::fs::write(args.out.join("report.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// Runs an evaluation subcommand.
pub fn run(command: EvaluateCommand) -> anyhow::Result<()> {
    let args = match command {
        EvaluateCommand::RealImages(args) => args,
        EvaluateCommand::Generators(args) => return generators(*args),
    };
    let scorers = Scorers::load(&args.scorers)?;
    let bench = DreamBench::open(&args.scorers.dreambench)?;
    let tables = real_images_row(&bench, &scorers.embedders(), scorers.device);
    std::fs::create_dir_all(args.out.join("grids")).with_context(|| args.out.display().to_string())?;
    std::fs::write(args.out.join("real_images.json"), serde_json::to_string_pretty(&tables)?)?;
    std::fs::write(args.out.join("real_images.md"), markdown(&tables))?;
    for subject in &bench.subjects {
        if let Err(e) = grid(&bench, subject, &args.out.join("grids")) {
            tracing::warn!(subject = %subject.subject, error = %e, "No grid for this subject.");
        }
    }
    println!("{}", markdown(&tables));
    Ok(())
}
