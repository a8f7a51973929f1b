//! A job resolved once into each stage's own config (as Vector builds its component configs once):
//! the [`StagePlan`] the pipeline is built from. [`resolve`] makes it from a user's spec; the world
//! preset (`demo.rs`) makes it from the world's models. Nothing downstream reads the spec again.

use std::path::{Path, PathBuf};

use anyhow::Context;
use proxytune_actors::evaluation::generators::StudentSampling;
use proxytune_actors::stages::ar_trainer::ArTrainerConfig;
use proxytune_actors::stages::class_prior_sampler::ClassPriorConfig;
use proxytune_actors::stages::diffusion_sampling::{SamplingConfig, UnetPrecision};
use proxytune_actors::stages::filter::{FilterConfig, ImageMetric, PromptScorer};
use proxytune_actors::stages::proxy_generator::{PromptPlan, ProxyGeneratorConfig};
use proxytune_actors::stages::supervisor_tuner::SupervisorTunerConfig;
use proxytune_actors::stages::tokenize::TokenizeConfig;
use proxytune_models::ar::chameleon::ChameleonConfig;
use proxytune_models::ar::llamagen_vq::LlamaGenVqConfig;
use proxytune_models::ar::lumina::{ImageSampling, LuminaTokens};
use proxytune_models::ar::student::{StudentFamily, StudentFiles};
use proxytune_models::ar::train::ArTrainConfig;
use proxytune_models::diffusion::dreambooth::{DreamBoothConfig, Precision as TrainPrecision};
use proxytune_models::diffusion::pipeline::SamplerKind;
use proxytune_models::lora::LoraConfig;
use proxytune_models::scorers::clip_dino::{ClipScorer, Dino};
use proxytune_models::scorers::feat_i::{FeatI, WEIGHTS_FILE};
use proxytune_models::scorers::ImageEmbedder;
use proxytune_models::tokenizer::clip::ClipTokenizer;
use sha2::Digest;

use super::spec::{JobSpec, Precision, PromptSource, SchedulerChoice};

/// The longest side a stored reference keeps (each stage resizes for its model).
pub const REFERENCE_MAX_SIDE: u32 = 1024;

/// The subject as the pipeline and the evaluation see it.
#[derive(Clone, Debug)]
pub struct SubjectPlan {
    /// Name (the corpus's `subject` column).
    pub name: String,
    /// Class noun.
    pub class_noun: String,
    /// The identifier token.
    pub identifier: String,
    /// Live subject (DreamBench's live prompt list) or object.
    pub live: bool,
    /// The reference photos as stored.
    pub references: Vec<image::RgbImage>,
    /// Where each reference came from.
    pub sources: Vec<String>,
    /// The evaluation's prompt templates (`{}` for the subject).
    pub templates: Vec<String>,
}

/// Where the Filter's (and the evaluation's) encoders come from.
#[derive(Clone, Debug)]
pub enum ScorerSource {
    /// The toy world's DINO and CLIP (`models/world/{dino,clip}`).
    World(PathBuf),
    /// FEAT-I (EfficientNet-Lite0 from the assets folder), and DINO and CLIP folders when given.
    Real {
        /// The assets folder (`efficientnet_lite0.safetensors`, CLIP's BPE).
        assets: PathBuf,
        /// A DINO folder.
        dino: Option<PathBuf>,
        /// A CLIP folder.
        clip: Option<PathBuf>,
    },
}

/// Image encoders with their metric, and a CLIP-T scorer when there is one.
pub type LoadedScorers = (Vec<(ImageMetric, Box<dyn ImageEmbedder + Send>)>, Option<Box<dyn PromptScorer>>);

impl ScorerSource {
    /// The metric fidelity is judged by: DINO when there is one, else FEAT-I.
    pub fn fidelity_metric(&self) -> ImageMetric {
        match self {
            ScorerSource::World(_) | ScorerSource::Real { dino: Some(_), .. } => ImageMetric::Dino,
            ScorerSource::Real { dino: None, .. } => ImageMetric::FeatI,
        }
    }

    /// Loads the encoders on `device`.
    pub fn load(&self, device: tch::Device) -> anyhow::Result<LoadedScorers> {
        match self {
            ScorerSource::World(dir) => {
                let dino = Dino::load(&dir.join("dino"), device)?;
                let clip_dir = dir.join("clip");
                let clip = ClipScorer::load(&clip_dir, ClipTokenizer::from_folder(&clip_dir)?, device)?;
                let clip_t = ClipScorer::load(&clip_dir, ClipTokenizer::from_folder(&clip_dir)?, device)?;
                Ok((
                    vec![(ImageMetric::Dino, Box::new(dino)), (ImageMetric::ClipI, Box::new(clip))],
                    Some(Box::new(clip_t)),
                ))
            }
            ScorerSource::Real { assets, dino, clip } => {
                let feat = FeatI::load(&assets.join(WEIGHTS_FILE), device).with_context(|| {
                    format!("FEAT-I weights in {} (`tools/dev setup` fetches them)", assets.display())
                })?;
                let mut embedders: Vec<(ImageMetric, Box<dyn ImageEmbedder + Send>)> =
                    vec![(ImageMetric::FeatI, Box::new(feat))];
                if let Some(d) = dino {
                    embedders.push((ImageMetric::Dino, Box::new(Dino::load(d, device)?)));
                }
                let mut clip_t: Option<Box<dyn PromptScorer>> = None;
                if let Some(c) = clip {
                    embedders.push((
                        ImageMetric::ClipI,
                        Box::new(ClipScorer::load(c, clip_tokenizer(c, assets)?, device)?),
                    ));
                    clip_t = Some(Box::new(ClipScorer::load(c, clip_tokenizer(c, assets)?, device)?));
                }
                Ok((embedders, clip_t))
            }
        }
    }
}

/// A CLIP folder's own vocabulary when it has one, else OpenAI's BPE from the assets.
pub fn clip_tokenizer(dir: &Path, assets: &Path) -> anyhow::Result<ClipTokenizer> {
    let own = dir.join("vocab.json").is_file() || dir.join("tokenizer.json").is_file();
    Ok(if own {
        ClipTokenizer::from_folder(dir)?
    } else {
        ClipTokenizer::from_openai_bpe(&assets.join("bpe_simple_vocab_16e6.txt.gz"))?
    })
}

/// The assets folder: `$PROXYTUNE_ASSETS`, else `~/.cache/proxytune/assets` (where `tools/dev
/// setup` puts them).
pub fn assets_dir() -> PathBuf {
    if let Some(a) = std::env::var_os("PROXYTUNE_ASSETS") {
        return PathBuf::from(a);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/proxytune/assets")
}

/// How the evaluation loads the two tuned models.
#[derive(Clone, Debug)]
pub struct EvalPlan {
    /// The supervisor folder and its weight variant.
    pub supervisor_dir: PathBuf,
    /// Weight variant of the supervisor folder.
    pub supervisor_variant: Option<String>,
    /// The supervisor's sampling.
    pub supervisor_sampling: SamplingConfig,
    /// The student's folders.
    pub student: StudentFiles,
    /// The student's sampling.
    pub student_sampling: StudentSampling,
    /// Images per prompt.
    pub images_per_prompt: usize,
    /// Only the first this many prompts.
    pub max_prompts: Option<usize>,
    /// No evaluation.
    pub skip: bool,
    /// The scorers' device.
    pub device: String,
    /// Baselines trained after the pipeline and evaluated after the Proxy-Tuned student.
    pub baselines: Vec<super::spec::Baseline>,
}

/// Each stage's own config.
#[derive(Clone, Debug)]
pub struct StagePlan {
    /// Job id written into every row.
    pub job_id: String,
    /// The subject.
    pub subject: SubjectPlan,
    /// Class priors (the untuned supervisor).
    pub class_priors: ClassPriorConfig,
    /// DreamBooth.
    pub tuner: SupervisorTunerConfig,
    /// Proxy generation (its `stored_seeds` are filled when the pipeline is built).
    pub generator: ProxyGeneratorConfig,
    /// The Filter's thresholds.
    pub filter: FilterConfig,
    /// The Filter's and the evaluation's encoders.
    pub scorers: ScorerSource,
    /// Their device.
    pub scorer_device: String,
    /// VQ tokenization.
    pub tokenize: TokenizeConfig,
    /// The student's training.
    pub trainer: ArTrainerConfig,
    /// The evaluation.
    pub eval: EvalPlan,
    /// The output folder.
    pub out: PathBuf,
    /// Let float32 matrix products on CUDA use TF32 tensor cores (the job spec's `devices.tf32`).
    pub tf32: bool,
    /// libtorch's intra-op threads while the pipeline runs (the spec's `devices.cpu_threads`);
    /// `None`: [`StagePlan::pipeline_cpu_threads`].
    pub cpu_threads: Option<usize>,
}

/// The cores of this machine (at least 1).
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl StagePlan {
    /// libtorch's intra-op threads while the pipeline runs: the spec's, else half the cores (at
    /// least 1) when a stage computes on the CPU, where the sampler and the student run at once,
    /// else one per core.
    pub fn pipeline_cpu_threads(&self) -> usize {
        match self.cpu_threads {
            Some(n) => n,
            None if self.uses_cpu() => (cores() / 2).max(1),
            None => cores(),
        }
    }

    /// Whether any stage runs on a CUDA device.
    pub fn uses_cuda(&self) -> bool {
        self.devices().iter().any(|d| d.starts_with("cuda"))
    }

    /// Whether any stage computes on the CPU.
    pub fn uses_cpu(&self) -> bool {
        self.devices().contains(&"cpu")
    }

    fn devices(&self) -> [&str; 6] {
        [
            &self.class_priors.device,
            &self.tuner.device,
            &self.generator.device,
            &self.scorer_device,
            &self.tokenize.device,
            &self.trainer.device,
        ]
    }
}

/// The sampler of a diffusers folder's own scheduler (`scheduler/scheduler_config.json`'s class).
pub fn folder_sampler(dir: &Path) -> Result<SamplerKind, String> {
    let path = dir.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    match json.get("_class_name").and_then(|c| c.as_str()) {
        Some("DDIMScheduler") => Ok(SamplerKind::Ddim),
        Some("EulerDiscreteScheduler") => Ok(SamplerKind::Euler),
        other => Err(format!(
            "the folder's scheduler {} is not one proxytune samples with; set supervisor.scheduler to `ddim` or `euler`",
            other.unwrap_or("(no _class_name)")
        )),
    }
}

/// The student's folders as the stages load them, and its VQ's downsampling factor.
pub fn student_files(spec: &JobSpec) -> anyhow::Result<(StudentFiles, u32)> {
    let st = &spec.student;
    let family = st.family.model_family();
    match family {
        StudentFamily::Chameleon => {
            let cfg = ChameleonConfig::from_json(&st.path.join("config.json"))?;
            let factor = cfg.vq_config.downsample_factor() as u32;
            let tokens = structure_tokens(spec, &cfg).map_err(anyhow::Error::msg)?;
            let mut files = StudentFiles::chameleon(&st.path, tokens);
            files.vq_dir = st.vq_path.clone();
            Ok((files, factor))
        }
        StudentFamily::LlamaGen => {
            let vq_dir = st.vq_path.clone().context("student.vq_path: LlamaGen needs its VQ-16 folder")?;
            let cfg = LlamaGenVqConfig::from_json(&vq_dir.join("config.json"))?;
            let factor = 1u32 << (cfg.ch_mult.len() - 1);
            let files = StudentFiles {
                family,
                dir: st.path.clone(),
                vq_dir: Some(vq_dir),
                text_encoder_dir: Some(
                    st.text_encoder_path
                        .clone()
                        .context("student.text_encoder_path: LlamaGen needs its T5 folder")?,
                ),
                tokens: Default::default(),
            };
            Ok((files, factor))
        }
    }
}

/// The student's Lumina structure tokens: the folder's `lumina_tokens.json` when it has one, else
/// the spec's `student.structure_tokens`, else the ids its vocabulary gives Lumina-mGPT's names;
/// the size tokens count 32-pixel units of the VQ's codes.
pub fn structure_tokens(spec: &JobSpec, cfg: &ChameleonConfig) -> Result<LuminaTokens, String> {
    let file = spec.student.path.join("lumina_tokens.json");
    if spec.student.structure_tokens.is_none() && file.is_file() {
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        return serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()));
    }
    let codes_per_unit = (32 / cfg.vq_config.downsample_factor()).max(1);
    if let Some(t) = spec.student.structure_tokens {
        return Ok(LuminaTokens {
            bos: t.bos,
            separator: t.separator,
            begin_image: t.begin_image,
            end_image: t.end_image,
            new_line: t.new_line,
            size_base: t.size_base,
            codes_per_unit,
        });
    }
    let names = ["<s>", "<reserved08706>", "<racm3:break>", "<eoss>", "<reserved08799>", "<reserved08800>"];
    let missing: Vec<&str> = names.iter().copied().filter(|n| !cfg.vocabulary_map.contains_key(*n)).collect();
    if !missing.is_empty() {
        return Err(format!(
            "the vocabulary names none of {} (Lumina-mGPT's structure tokens); give them as student.structure_tokens",
            missing.join(", ")
        ));
    }
    let id = |n: &str| cfg.vocabulary_map[n];
    Ok(LuminaTokens {
        bos: id(names[0]),
        separator: id(names[1]),
        begin_image: id(names[2]),
        end_image: id(names[3]),
        new_line: id(names[4]),
        size_base: id(names[5]),
        codes_per_unit,
    })
}

/// A model's identity in the corpus: family, folder and a content hash of its configs.
pub fn model_identity(family: &str, dir: &Path, configs: &[&str]) -> String {
    let mut hash = sha2::Sha256::new();
    for c in configs {
        if let Ok(bytes) = std::fs::read(dir.join(c)) {
            hash.update(c.as_bytes());
            hash.update(&bytes);
        }
    }
    let digest = hash.finalize();
    let short: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{family}:{}#{short}", dir.display())
}

/// The concrete device (`cpu`, `cuda:N`) that `auto` and friends resolve to.
pub fn device_name(device: &str) -> anyhow::Result<String> {
    Ok(match proxytune_models::device::parse_device(device)? {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    })
}

fn train_precision(p: Precision) -> TrainPrecision {
    match p {
        Precision::Bf16 => TrainPrecision::Bf16,
        _ => TrainPrecision::F32,
    }
}

/// The references of a photos folder: decoded (EXIF orientation applied), RGB, and no longer than
/// [`REFERENCE_MAX_SIDE`] on their long side.
pub fn read_photos(dir: &Path) -> anyhow::Result<(Vec<image::RgbImage>, Vec<String>)> {
    let files = proxytune_actors::stages::intake::image_files(dir)?;
    let mut images = Vec::new();
    let mut names = Vec::new();
    for f in &files {
        let mut decoder = image::ImageReader::open(f)
            .and_then(|r| r.with_guessed_format())
            .with_context(|| f.display().to_string())?
            .into_decoder()
            .with_context(|| format!("{}: not a readable image", f.display()))?;
        let orientation = image::ImageDecoder::orientation(&mut decoder)
            .unwrap_or(image::metadata::Orientation::NoTransforms);
        let mut img = image::DynamicImage::from_decoder(decoder)
            .with_context(|| format!("{}: cannot decode", f.display()))?;
        img.apply_orientation(orientation);
        let (w, h) = (img.width(), img.height());
        if w.max(h) > REFERENCE_MAX_SIDE {
            img = img.resize(REFERENCE_MAX_SIDE, REFERENCE_MAX_SIDE, image::imageops::FilterType::Lanczos3);
        }
        images.push(img.to_rgb8());
        names.push(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    Ok((images, names))
}

/// The spec resolved into each stage's config (the spec must have passed its check).
pub fn resolve(spec: &JobSpec, job_id: &str) -> anyhow::Result<StagePlan> {
    let s = &spec.subject;
    let (references, sources) = read_photos(&s.photos)?;
    let templates = match &s.prompts {
        PromptSource::DreamBench => super::prompts::dreambench_templates(s.live),
        PromptSource::File(f) => super::prompts::read_template_file(f).map_err(anyhow::Error::msg)?,
    };
    let subject = SubjectPlan {
        name: s.name.clone(),
        class_noun: s.class_noun.clone(),
        identifier: s.identifier.clone(),
        live: s.live,
        references,
        sources,
        templates: templates.clone(),
    };
    let sup = &spec.supervisor;
    let sup_device = device_name(&spec.devices.supervisor)?;
    let student_device = device_name(&spec.devices.student)?;
    let scorer_device = device_name(&spec.devices.scorers)?;
    let sampler = match sup.scheduler {
        SchedulerChoice::Ddim => SamplerKind::Ddim,
        SchedulerChoice::Euler => SamplerKind::Euler,
        SchedulerChoice::Folder => folder_sampler(&sup.path).map_err(anyhow::Error::msg)?,
    };
    let sampling = SamplingConfig {
        num_inference_steps: sup.steps as i64,
        guidance_scale: sup.guidance,
        sampler,
        resolution: sup.resolution(),
        negative_prompt: sup.negative_prompt.clone(),
        batch_images: sup.batch,
        unet_precision: match sup.precision {
            Precision::Fp32 => UnetPrecision::Fp32,
            Precision::Bf16 => UnetPrecision::Bf16,
            Precision::Fp16 => UnetPrecision::Fp16,
        },
        vae_slicing: sup.vae_slicing,
    };
    let model_id = model_identity(
        &format!("{:?}", sup.family).to_lowercase(),
        &sup.path,
        &["model_index.json", "unet/config.json", "text_encoder/config.json", "vae/config.json"],
    );
    let class_prompt = format!("a {}", s.class_noun);
    let instance_prompt = format!("a {} {}", s.identifier, s.class_noun);
    let d = &sup.dreambooth;
    let class_priors = ClassPriorConfig {
        job_id: job_id.into(),
        class_noun: s.class_noun.clone(),
        class_prompt: class_prompt.clone(),
        model_dir: sup.path.clone(),
        variant: sup.variant.clone(),
        model_id: model_id.clone(),
        device: sup_device.clone(),
        num_images: if d.prior_loss_weight > 0.0 { d.class_images } else { 0 },
        first_seed: 0,
        sampling: sampling.clone(),
    };
    let tuner = SupervisorTunerConfig {
        job_id: job_id.into(),
        subject: s.name.clone(),
        class_noun: s.class_noun.clone(),
        model_dir: sup.path.clone(),
        variant: sup.variant.clone(),
        model_id,
        device: sup_device.clone(),
        lora: (!d.full).then(|| LoraConfig {
            rank: d.lora_rank,
            alpha: d.lora_alpha.unwrap_or(d.lora_rank as f64),
            target_modules: d.target_modules.clone(),
        }),
        dreambooth: DreamBoothConfig {
            instance_prompt: instance_prompt.clone(),
            class_prompt,
            learning_rate: d.learning_rate,
            max_train_steps: d.steps,
            train_batch_size: d.batch,
            gradient_accumulation_steps: d.gradient_accumulation,
            lr_warmup_steps: d.warmup_steps,
            prior_loss_weight: d.prior_loss_weight,
            num_class_images: if d.prior_loss_weight > 0.0 { d.class_images } else { 0 },
            precision: train_precision(d.precision),
            checkpoint_every: d.checkpoint_every,
            activation_checkpointing: d.activation_checkpointing,
            ..Default::default()
        },
        resolution: sup.resolution(),
        output_dir: spec.output.join("supervisor"),
        vae_slicing: sup.vae_slicing,
    };
    let plan = PromptPlan {
        subject_prompts: vec![instance_prompt],
        context_prompts: templates
            .iter()
            .map(|t| super::prompts::fill(t, &s.identifier, &s.class_noun))
            .collect(),
        images_per_prompt: spec.proxies.per_prompt,
        first_seed: spec.proxies.first_seed,
    };
    let generator = ProxyGeneratorConfig {
        job_id: job_id.into(),
        subject: s.name.clone(),
        model_dir: sup.path.clone(),
        variant: sup.variant.clone(),
        device: sup_device,
        plan,
        sampling: sampling.clone(),
        stored_seeds: Default::default(),
    };
    let scorers = ScorerSource::Real {
        assets: assets_dir(),
        dino: spec.evaluation.dino.clone(),
        clip: spec.evaluation.clip.clone(),
    };
    let filter = FilterConfig {
        min_fidelity: spec.filter.min_fidelity,
        fidelity_metric: Some(scorers.fidelity_metric()),
        min_prompt_adherence: spec.filter.min_prompt_adherence,
        max_duplicate_cosine: spec.filter.max_duplicate_cosine,
        identifier: Some(s.identifier.clone()),
    };
    let st = &spec.student;
    let (student, factor) = student_files(spec)?;
    let vq_identity_dir = student.vq_encoder_dir()?.to_path_buf();
    let tokenizer_id =
        model_identity(&format!("{:?}-vq", st.family).to_lowercase(), &vq_identity_dir, &["config.json"]);
    let caption_encoder_id = student
        .text_encoder_dir
        .as_deref()
        .map(|dir| model_identity("t5", dir, &["config.json", "tokenizer.json"]));
    let tokenize = TokenizeConfig {
        student: student.clone(),
        tokenizer_id: tokenizer_id.clone(),
        caption_encoder_id: caption_encoder_id.clone(),
        caption_bf16: st.precision == Precision::Bf16,
        resolution: st.resolution,
        device: student_device.clone(),
        only_kept: true,
    };
    let trainer = ArTrainerConfig {
        student: student.clone(),
        device: student_device,
        lora: (!st.full).then(|| LoraConfig {
            rank: st.lora_rank,
            alpha: st.lora_alpha.unwrap_or(st.lora_rank as f64),
            target_modules: spec.student_targets(),
        }),
        train: ArTrainConfig {
            learning_rate: st.learning_rate,
            lr_warmup_steps: st.warmup_steps,
            max_train_steps: st.steps,
            batch_size: st.batch,
            gradient_accumulation_steps: st.gradient_accumulation,
            precision: train_precision(st.precision),
            activation_checkpointing: st.activation_checkpointing,
            loss_chunk_tokens: st.loss_chunk_tokens,
            ..Default::default()
        },
        tokenizer_id,
        caption_encoder_id,
        min_rows_to_start: st.rows_to_start,
        rows_per_step: 1,
        output_dir: spec.output.join("student"),
        corpus_version: None,
        checkpoint_every: st.checkpoint_every,
    };
    let eval = EvalPlan {
        supervisor_dir: sup.path.clone(),
        supervisor_variant: sup.variant.clone(),
        supervisor_sampling: sampling,
        student_sampling: StudentSampling {
            grid: (st.resolution / factor) as i64,
            image: ImageSampling {
                guidance_scale: st.sampling.guidance,
                image_top_k: (st.sampling.top_k > 0).then_some(st.sampling.top_k),
                top_p: st.sampling.top_p,
                temperature: st.sampling.temperature,
            },
            tokens: student.tokens.clone(),
            bf16: st.precision == Precision::Bf16,
            batch: st.sampling.batch,
        },
        student: student.clone(),
        images_per_prompt: spec.evaluation.images_per_prompt,
        max_prompts: spec.evaluation.prompts,
        skip: spec.evaluation.skip,
        baselines: spec.evaluation.baselines.clone(),
        device: scorer_device.clone(),
    };
    Ok(StagePlan {
        job_id: job_id.into(),
        subject,
        class_priors,
        tuner,
        generator,
        filter,
        scorers,
        scorer_device,
        tokenize,
        trainer,
        eval,
        out: spec.output.clone(),
        tf32: spec.devices.tf32,
        cpu_threads: spec.devices.cpu_threads,
    })
}
