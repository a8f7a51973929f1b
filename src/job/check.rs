//! `proxytune run --check`: everything about a job spec that can be known without loading a
//! weight. Every config and tokenizer is read, every weight file the job needs must exist (single
//! files, variants or shards with their index) and hold the shapes its config makes (compared from
//! the safetensors headers: a 7B checkpoint costs a few megabytes of reads), the identifier must
//! encode, the resolutions must fit the models, and the photos must be 3–6 readable images. Every
//! problem is collected, not only the first, each named by the spec key it comes from.

use std::path::{Path, PathBuf};

use proxytune_models::ar::chameleon::ChameleonConfig;
use proxytune_models::ar::chameleon_vq::{ChameleonVqDecoder, ChameleonVqVae};
use proxytune_models::diffusion::scheduler::SchedulerConfig;
use proxytune_models::diffusion::unet::UNetConfig;
use proxytune_models::diffusion::vae::{AutoencoderKl, VaeConfig};
use proxytune_models::shapes::{self, of_store, read_headers, weight_files, Header};
use proxytune_models::tokenizer::clip::ClipTokenizer;
use proxytune_models::tokenizer::hf::HfTokenizer;
use proxytune_models::transformer::clip::ClipTextConfig;

use super::spec::{JobSpec, Precision, PromptSource};

/// Fewest and most reference photos of a subject.
pub const PHOTOS: std::ops::RangeInclusive<usize> = 3..=6;

/// What a check found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// What each stage will load: `(stage, description)`.
    pub loads: Vec<(String, String)>,
    /// Every problem, prefixed by the spec key it concerns.
    pub problems: Vec<String>,
}

impl CheckReport {
    fn problem(&mut self, key: &str, message: impl std::fmt::Display) {
        self.problems.push(format!("{key}: {message}"));
    }

    fn load(&mut self, stage: &str, what: String) {
        self.loads.push((stage.to_string(), what));
    }

    /// The report as text: what each stage loads, then the problems.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (stage, what) in &self.loads {
            out.push_str(&format!("{stage:>12}  {what}\n"));
        }
        if self.problems.is_empty() {
            out.push_str("no problems found\n");
        } else {
            out.push_str(&format!("{} problem(s):\n", self.problems.len()));
            for p in &self.problems {
                out.push_str(&format!("  - {p}\n"));
            }
        }
        out
    }
}

fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::Fp32 => "fp32",
        Precision::Fp16 => "fp16",
        Precision::Bf16 => "bf16",
    }
}

fn bytes_per_parameter(p: Precision) -> u64 {
    match p {
        Precision::Fp32 => 4,
        Precision::Fp16 | Precision::Bf16 => 2,
    }
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The headers of a component folder's weights (`stems` tried in order, with the spec's variant).
fn headers(dir: &Path, stems: &[&str], variant: Option<&str>) -> Result<(Vec<PathBuf>, Header), String> {
    let files = weight_files(dir, stems, variant).map_err(|e| e.to_string())?;
    let header = read_headers(&files).map_err(|e| e.to_string())?;
    Ok((files, header))
}

/// Checks `spec`; never loads a weight.
pub fn check(spec: &JobSpec) -> CheckReport {
    let mut r = CheckReport::default();
    check_subject(spec, &mut r);
    check_supervisor(spec, &mut r);
    check_student(spec, &mut r);
    check_evaluation(spec, &mut r);
    check_budgets(spec, &mut r);
    for (key, device) in [
        ("devices.supervisor", &spec.devices.supervisor),
        ("devices.student", &spec.devices.student),
        ("devices.scorers", &spec.devices.scorers),
    ] {
        if let Err(e) = proxytune_models::device::parse_device(device) {
            r.problem(key, e);
        }
    }
    if spec.devices.cpu_threads == Some(0) {
        r.problem("devices.cpu_threads", "must be at least 1 (leave it out for half the cores)");
    }
    if spec.output.as_os_str().is_empty() {
        r.problem("output", "missing: the folder the job writes its corpus, models and report to");
    } else if spec.output.exists() && !spec.output.is_dir() {
        r.problem("output", format!("{} exists and is not a folder", spec.output.display()));
    }
    r
}

fn check_subject(spec: &JobSpec, r: &mut CheckReport) {
    let s = &spec.subject;
    let name_ok = !s.name.is_empty()
        && s.name.len() <= 40
        && s.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !name_ok {
        r.problem("subject.name", format!("`{}` must be 1–40 of a-z, 0-9, _ and -", s.name));
    }
    let noun_ok = !s.class_noun.trim().is_empty()
        && s.class_noun.len() <= 60
        && s.class_noun.chars().all(|c| c.is_lowercase() || c == ' ' || c == '-')
        && !s.class_noun.contains("  ");
    if !noun_ok {
        r.problem("subject.class_noun", format!("`{}` must be a lower-case noun phrase", s.class_noun));
    }
    if s.identifier.is_empty() || s.identifier.chars().any(char::is_whitespace) || s.identifier.len() > 32 {
        r.problem(
            "subject.identifier",
            format!("`{}` must be one word of at most 32 characters", s.identifier),
        );
    } else if s.class_noun.split(' ').any(|w| w == s.identifier) {
        r.problem("subject.identifier", format!("`{}` is a word of the class noun", s.identifier));
    }
    if s.photos.as_os_str().is_empty() {
        r.problem("subject.photos", "missing: a folder of the subject's 3 to 6 photos");
    } else {
        match photo_sizes(&s.photos) {
            Err(e) => r.problem("subject.photos", e),
            Ok(photos) => {
                if !PHOTOS.contains(&photos.len()) {
                    r.problem(
                        "subject.photos",
                        format!(
                            "{} holds {} photo(s); a subject needs {} to {}",
                            s.photos.display(),
                            photos.len(),
                            PHOTOS.start(),
                            PHOTOS.end()
                        ),
                    );
                }
                for (name, size) in &photos {
                    match size {
                        Err(e) => r.problem("subject.photos", format!("{name}: {e}")),
                        Ok((w, h)) if *w.min(h) < 32 => {
                            r.problem("subject.photos", format!("{name}: {w}×{h} is smaller than 32×32"))
                        }
                        Ok(_) => {}
                    }
                }
                let sizes: Vec<String> = photos
                    .iter()
                    .filter_map(|(n, s)| s.as_ref().ok().map(|(w, h)| format!("{n} {w}×{h}")))
                    .collect();
                r.load("subject", format!("{} photos: {}", photos.len(), sizes.join(", ")));
            }
        }
    }
    match &s.prompts {
        PromptSource::DreamBench => r.load(
            "subject",
            format!("prompts: DreamBench's 25 {} templates", if s.live { "live" } else { "object" }),
        ),
        PromptSource::File(f) => match super::prompts::read_template_file(f) {
            Ok(t) => r.load("subject", format!("prompts: {} templates from {}", t.len(), f.display())),
            Err(e) => r.problem("subject.prompts", e),
        },
    }
}

type PhotoSize = Result<(u32, u32), String>;

/// The image files of `dir` (PNG/JPEG by extension) with their sizes from the headers.
fn photo_sizes(dir: &Path) -> Result<Vec<(String, PhotoSize)>, String> {
    let files = proxytune_actors::stages::intake::image_files(dir).map_err(|e| e.to_string())?;
    Ok(files
        .iter()
        .map(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let size = image::ImageReader::open(p)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| e.to_string())
                .and_then(|r| r.into_dimensions().map_err(|e| format!("not a readable image: {e}")));
            (name, size)
        })
        .collect())
}

/// Checks the supervisor folder.
fn check_supervisor(spec: &JobSpec, r: &mut CheckReport) {
    let s = &spec.supervisor;
    let dir = &s.path;
    if !dir.join("model_index.json").is_file() {
        r.problem(
            "supervisor.path",
            format!("{} is not a diffusers folder (no model_index.json)", dir.display()),
        );
        return;
    }
    let variant = s.variant.as_deref();
    let bytes = bytes_per_parameter(s.precision);
    // UNet.
    let mut unet_levels = None;
    match UNetConfig::from_json(&dir.join("unet/config.json")) {
        Err(e) => r.problem("supervisor.path", e),
        Ok(cfg) => {
            let sdxl = cfg.addition_embed_type.as_deref() == Some("text_time");
            if sdxl != s.family.two_text_encoders() {
                r.problem(
                    "supervisor.family",
                    format!(
                        "`{}` does not fit {}: its UNet {} SDXL's text_time conditioning",
                        format!("{:?}", s.family).to_lowercase(),
                        dir.display(),
                        if sdxl { "takes" } else { "lacks" }
                    ),
                );
            }
            unet_levels = Some(cfg.block_out_channels.len() as u32);
            let expected = shapes::unet(&cfg);
            match headers(&dir.join("unet"), &["diffusion_pytorch_model"], variant) {
                Err(e) => r.problem("supervisor.path", e),
                Ok((files, header)) => {
                    for p in shapes::compare(&expected, &header, "", true) {
                        r.problem("supervisor.path", format!("unet: {p}"));
                    }
                    let n = shapes::parameters(&expected);
                    r.load(
                        "supervisor",
                        format!(
                            "UNet {} parameters ({} in {}) from {} file(s)",
                            human(n),
                            gib(n * bytes),
                            precision_name(s.precision),
                            files.len()
                        ),
                    );
                }
            }
        }
    }
    // VAE (small: built on the CPU and compared).
    let mut vae_factor = None;
    match VaeConfig::from_json(&dir.join("vae/config.json")) {
        Err(e) => r.problem("supervisor.path", e),
        Ok(cfg) => {
            vae_factor = Some(cfg.scale_factor() as u32);
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            let _vae = AutoencoderKl::new(vs.root(), &cfg);
            let expected = of_store(&vs);
            match headers(&dir.join("vae"), &["diffusion_pytorch_model"], variant) {
                Err(e) => r.problem("supervisor.path", e),
                Ok((_, header)) => {
                    for p in shapes::compare(&expected, &header, "", true) {
                        r.problem("supervisor.path", format!("vae: {p}"));
                    }
                }
            }
            r.load("supervisor", format!("VAE {} parameters", human(shapes::parameters(&expected))));
        }
    }
    // Text encoders and tokenizers.
    let encoders: &[(&str, &str, bool)] = if s.family.two_text_encoders() {
        &[("text_encoder", "tokenizer", false), ("text_encoder_2", "tokenizer_2", true)]
    } else {
        &[("text_encoder", "tokenizer", false)]
    };
    for &(encoder, tokenizer, projection) in encoders {
        let vocab = match read_json::<ClipTextConfig>(&dir.join(encoder).join("config.json")) {
            Err(e) => {
                r.problem("supervisor.path", e);
                None
            }
            Ok(cfg) => {
                match headers(&dir.join(encoder), &["model"], variant) {
                    Err(e) => r.problem("supervisor.path", e),
                    Ok((_, header)) => {
                        let prefix = if header.keys().any(|k| k.starts_with("text_model.")) {
                            "text_model."
                        } else {
                            ""
                        };
                        let expected = shapes::clip_text(&cfg, prefix, projection);
                        for p in shapes::compare(&expected, &header, "", true) {
                            // Some checkpoints carry the `position_ids` buffer, which is no parameter.
                            if !p.contains("position_ids") {
                                r.problem("supervisor.path", format!("{encoder}: {p}"));
                            }
                        }
                        r.load(
                            "supervisor",
                            format!("{encoder} {} parameters", human(shapes::parameters(&expected))),
                        );
                    }
                }
                Some(cfg.vocab_size)
            }
        };
        match ClipTokenizer::from_folder(&dir.join(tokenizer)) {
            Err(e) => r.problem("supervisor.path", format!("{tokenizer}: {e}")),
            Ok(tok) => match tok.encode(&spec.subject.identifier) {
                Err(e) => r.problem(
                    "subject.identifier",
                    format!(
                        "`{}`: the supervisor's {tokenizer} cannot encode it: {e}",
                        spec.subject.identifier
                    ),
                ),
                Ok(ids) => {
                    if let Some(bad) = ids.iter().find(|&&id| vocab.is_some_and(|v| id >= v)) {
                        r.problem(
                            "subject.identifier",
                            format!(
                                "`{}` encodes to token {bad}, beyond {encoder}'s vocabulary",
                                spec.subject.identifier
                            ),
                        );
                    }
                    r.load(
                        "supervisor",
                        format!(
                            "{tokenizer}: `{}` is {} token(s) {ids:?}",
                            spec.subject.identifier,
                            ids.len()
                        ),
                    );
                }
            },
        }
    }
    if let Err(e) = SchedulerConfig::from_json(&dir.join("scheduler/scheduler_config.json")) {
        r.problem("supervisor.path", e);
    } else if s.scheduler == super::spec::SchedulerChoice::Folder {
        if let Err(e) = super::plan::folder_sampler(dir) {
            r.problem("supervisor.scheduler", e);
        }
    }
    // Resolution: the latent must survive the UNet's downsampling.
    let res = s.resolution();
    if let (Some(f), Some(levels)) = (vae_factor, unet_levels) {
        let unit = f * (1 << (levels - 1));
        if res == 0 || !res.is_multiple_of(unit) {
            r.problem(
                "supervisor.resolution",
                format!(
                    "{res} is not a multiple of {unit} (the VAE's factor {f} × the UNet's {levels} levels)"
                ),
            );
        } else {
            r.load("supervisor", format!("{res} px, latents of {0}×{0}", res / f));
        }
    }
    let d = &s.dreambooth;
    if d.full {
        r.problem(
            "supervisor.dreambooth.full",
            "a fully fine-tuned UNet is not exported for sampling yet; use LoRA",
        );
    }
    if d.precision == Precision::Bf16 && d.full {
        r.problem("supervisor.dreambooth.precision", "bf16 training needs LoRA (full = false)");
    }
    if d.precision == Precision::Fp16 {
        r.problem("supervisor.dreambooth.precision", "fp16 training is not supported; use bf16 or fp32");
    }
}

fn check_student(spec: &JobSpec, r: &mut CheckReport) {
    match spec.student.family.model_family() {
        proxytune_models::ar::student::StudentFamily::Chameleon => check_chameleon(spec, r),
        proxytune_models::ar::student::StudentFamily::LlamaGen => check_llamagen(spec, r),
    }
    let s = &spec.student;
    if s.precision == Precision::Fp16 {
        r.problem("student.precision", "fp16 is not supported; use bf16 or fp32");
    }
    if s.sampling.batch == 0 {
        r.problem("student.sampling.batch", "must be at least 1 (images sampled at once)");
    }
    if s.full {
        r.problem("student.full", "a fully fine-tuned student is not exported for evaluation yet; use LoRA");
    }
    if s.full && s.precision == Precision::Bf16 {
        r.problem("student.precision", "bf16 training needs LoRA (full = false)");
    }
}

/// LlamaGen: the GPT's checkpoint against its arguments, the VQ-16 against its config, the T5
/// encoder against its config with its tokenizer, and the sizes that must agree between them.
fn check_llamagen(spec: &JobSpec, r: &mut CheckReport) {
    use proxytune_models::ar::llamagen::LlamaGenConfig;
    use proxytune_models::ar::llamagen_vq::{LlamaGenVq, LlamaGenVqConfig};
    use proxytune_models::tokenizer::hf::CaptionTokenizer;
    use proxytune_models::transformer::t5::T5Config;
    let s = &spec.student;
    if s.activation_checkpointing || s.loss_chunk_tokens > 0 {
        r.problem(
            "student.activation_checkpointing",
            "activation checkpointing and loss chunks are Chameleon's; LlamaGen trains without them",
        );
    }
    let gpt: Option<LlamaGenConfig> = match read_json(&s.path.join("config.json")) {
        Ok(cfg) => Some(cfg),
        Err(e) => {
            r.problem("student.path", format!("LlamaGen's GPT arguments: {e}"));
            None
        }
    };
    if let Some(cfg) = &gpt {
        match headers(&s.path, &["model"], None) {
            Err(e) => r.problem("student.path", e),
            Ok((files, header)) => {
                let expected = shapes::llamagen(cfg);
                for p in shapes::compare(&expected, &header, "", true) {
                    r.problem("student.path", format!("GPT: {p}"));
                }
                let n = shapes::parameters(&expected);
                r.load(
                    "student",
                    format!(
                        "LlamaGen GPT {} parameters ({} in {}) from {} file(s), {} caption positions",
                        human(n),
                        gib(n * bytes_per_parameter(s.precision)),
                        precision_name(s.precision),
                        files.len(),
                        cfg.cls_token_num
                    ),
                );
            }
        }
    }
    // The VQ-16: encoder and decoder in one folder.
    match &s.vq_path {
        None => r.problem("student.vq_path", "missing: LlamaGen's VQ-16 folder"),
        Some(dir) => match LlamaGenVqConfig::from_json(&dir.join("config.json")) {
            Err(e) => r.problem("student.vq_path", e),
            Ok(vq_cfg) => {
                let vs = tch::nn::VarStore::new(tch::Device::Cpu);
                match (LlamaGenVq::new(vs.root(), &vq_cfg), headers(dir, &["model"], None)) {
                    (Err(e), _) => r.problem("student.vq_path", e),
                    (_, Err(e)) => r.problem("student.vq_path", e),
                    (Ok(vq), Ok((_, header))) => {
                        for p in shapes::compare(&of_store(&vs), &header, "", true) {
                            r.problem("student.vq_path", format!("VQ: {p}"));
                        }
                        r.load(
                            "student",
                            format!("VQ-16 {} parameters", human(shapes::parameters(&of_store(&vs)))),
                        );
                        if let Some(cfg) = &gpt {
                            if vq_cfg.codebook_size != cfg.vocab_size {
                                r.problem(
                                    "student.vq_path",
                                    format!(
                                        "the VQ has {} codes, the GPT's vocabulary {}",
                                        vq_cfg.codebook_size, cfg.vocab_size
                                    ),
                                );
                            }
                            let f = vq.downsample_factor() as u32;
                            let grid = cfg.grid_size as u32;
                            if s.resolution != grid * f {
                                r.problem(
                                    "student.resolution",
                                    format!(
                                        "{} px: the GPT generates a {grid}×{grid} grid, {} px at the VQ's factor {f}",
                                        s.resolution,
                                        grid * f
                                    ),
                                );
                            } else {
                                r.load(
                                    "student",
                                    format!("{grid}×{grid} codes, {} image tokens a sample", grid * grid),
                                );
                            }
                        }
                    }
                }
            }
        },
    }
    // The caption encoder and its tokenizer.
    let Some(dir) = &s.text_encoder_path else {
        r.problem("student.text_encoder_path", "missing: the Flan-T5 folder LlamaGen's captions come from");
        return;
    };
    let key = "student.text_encoder_path";
    match T5Config::from_json(&dir.join("config.json")) {
        Err(e) => r.problem(key, e),
        Ok(t5) => {
            match (shapes::t5_encoder(&t5), headers(dir, &["model"], None)) {
                (Err(e), _) => r.problem(key, e),
                (_, Err(e)) => r.problem(key, e),
                (Ok(expected), Ok((files, header))) => {
                    for p in shapes::compare(&expected, &header, "", false) {
                        r.problem(key, format!("T5 encoder: {p}"));
                    }
                    let n = shapes::parameters(&expected);
                    r.load(
                        "student",
                        format!("T5 encoder {} parameters from {} file(s)", human(n), files.len()),
                    );
                }
            }
            if let Some(cfg) = &gpt {
                if t5.d_model != cfg.caption_dim {
                    r.problem(
                        key,
                        format!(
                            "its states are {}-d, the GPT takes {}-d captions",
                            t5.d_model, cfg.caption_dim
                        ),
                    );
                }
            }
        }
    }
    let length = gpt.as_ref().map_or(120, |c| c.cls_token_num as usize);
    match CaptionTokenizer::from_file(&dir.join("tokenizer.json"), length, "<pad>") {
        Err(e) => r.problem(key, e),
        Ok(tok) => {
            let unk =
                HfTokenizer::from_file(&dir.join("tokenizer.json")).ok().and_then(|t| t.token_id("<unk>"));
            match tok.encode(&spec.subject.identifier) {
                Err(e) => r.problem("subject.identifier", format!("the T5 tokenizer cannot encode it: {e}")),
                Ok(c) if c.input_ids.iter().any(|&i| Some(i) == unk) => r.problem(
                    "subject.identifier",
                    format!("`{}`: the T5 tokenizer makes an unknown token of it", spec.subject.identifier),
                ),
                Ok(_) => {}
            }
        }
    }
}

fn check_chameleon(spec: &JobSpec, r: &mut CheckReport) {
    let s = &spec.student;
    let dir = &s.path;
    let cfg = match ChameleonConfig::from_json(&dir.join("config.json")) {
        Ok(cfg) => cfg,
        Err(e) => {
            r.problem("student.path", e);
            return;
        }
    };
    let bytes = bytes_per_parameter(s.precision);
    let decoder = shapes::chameleon_decoder(&cfg);
    // The VQ encoder inside the checkpoint (`model.vqmodel.*`), small enough to build.
    let vq_vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let vq = ChameleonVqVae::new(vq_vs.root(), &cfg.vq_config);
    match headers(dir, &["model"], None) {
        Err(e) => r.problem("student.path", e),
        Ok((files, header)) => {
            for p in shapes::compare(&decoder, &header, "", false) {
                r.problem("student.path", format!("decoder: {p}"));
            }
            if vq.is_ok() {
                for p in shapes::compare(&of_store(&vq_vs), &header, "model.vqmodel.", false) {
                    r.problem("student.path", format!("VQ encoder: {p}"));
                }
            }
            let n = shapes::parameters(&decoder);
            let largest =
                files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).max().unwrap_or(0);
            r.load(
                "student",
                format!(
                    "decoder {} parameters ({} in {}) from {} file(s), largest {}",
                    human(n),
                    gib(n * bytes),
                    precision_name(s.precision),
                    files.len(),
                    gib(largest)
                ),
            );
        }
    }
    if let Err(e) = &vq {
        r.problem("student.path", format!("vq_config: {e}"));
    }
    // The VQ decoder (the image side of the student's samples).
    let vq_dir = spec.vq_dir();
    let key = if s.vq_path.is_some() { "student.vq_path" } else { "student.path" };
    let decoder_file = vq_dir.join("vq_decoder.safetensors");
    if !decoder_file.is_file() {
        r.problem(key, format!("{} is missing (the VQ decoder)", decoder_file.display()));
    } else if vq.is_ok() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        match ChameleonVqDecoder::new(vs.root(), &cfg.vq_config) {
            Err(e) => r.problem(key, e),
            Ok(_) => match shapes::read_header(&decoder_file) {
                Err(e) => r.problem(key, e),
                Ok(header) => {
                    for p in shapes::compare(&of_store(&vs), &header, "", true) {
                        r.problem(key, format!("VQ decoder: {p}"));
                    }
                    r.load(
                        "student",
                        format!("VQ decoder {} parameters", human(shapes::parameters(&of_store(&vs)))),
                    );
                }
            },
        }
    }
    // Text side: the tokenizer encodes the identifier as a known token.
    let mut prompt_tokens = None;
    match HfTokenizer::from_file(&dir.join("tokenizer.json")) {
        Err(e) => r.problem("student.path", e),
        Ok(tok) => match tok.encode(&spec.subject.identifier) {
            Err(e) => {
                r.problem("subject.identifier", format!("the student's tokenizer cannot encode it: {e}"))
            }
            Ok(ids) => {
                let unk = cfg.vocabulary_map.get("<unk>").copied().or_else(|| tok.token_id("<unk>"));
                prompt_tokens = longest_instruction(spec, &tok);
                if ids.is_empty() || ids.iter().any(|&i| Some(i) == unk || i >= cfg.vocab_size) {
                    r.problem(
                        "subject.identifier",
                        format!(
                            "`{}`: the student's tokenizer cannot encode it (it becomes {ids:?}, unknown to its vocabulary)",
                            spec.subject.identifier
                        ),
                    );
                }
            }
        },
    }
    match super::plan::structure_tokens(spec, &cfg) {
        Err(e) => r.problem("student.structure_tokens", e),
        Ok(t) => {
            let all = [t.bos, t.separator, t.begin_image, t.end_image, t.new_line, t.size_base];
            if let Some(bad) = all.iter().find(|&&id| id < 0 || id >= cfg.vocab_size) {
                r.problem(
                    "student.structure_tokens",
                    format!("token {bad} is outside the vocabulary of {}", cfg.vocab_size),
                );
            }
        }
    }
    // Resolution: whole VQ codes, and the sequence fits the positions.
    if let Ok(vq) = &vq {
        let f = vq.downsample_factor() as u32;
        if s.resolution == 0 || !s.resolution.is_multiple_of(f) {
            r.problem(
                "student.resolution",
                format!("{} is not a multiple of the VQ's downsampling factor {f}", s.resolution),
            );
        } else if !s.resolution.is_multiple_of(32) || !32u32.is_multiple_of(f) {
            r.problem(
                "student.resolution",
                format!(
                    "{} px: Lumina-mGPT's size tokens count 32-pixel units of whole VQ codes (factor {f})",
                    s.resolution
                ),
            );
        } else {
            let grid = (s.resolution / f) as i64;
            // Size tokens, the codes with a break after each row, the end of the image.
            let tokens = grid * (grid + 1) + 3;
            let prompt = prompt_tokens.unwrap_or(0);
            if tokens + prompt > cfg.max_position_embeddings {
                r.problem(
                    "student.resolution",
                    format!(
                        "{} px makes {tokens} image tokens ({grid}×{grid} codes and row breaks); with the \
                         longest prompt ({prompt} tokens) that exceeds the model's {} positions",
                        s.resolution, cfg.max_position_embeddings
                    ),
                );
            }
            r.load("student", format!("{grid}×{grid} codes, {tokens} image tokens a sample"));
        }
    }
}

/// Tokens of the longest instruction the student is given (Lumina-mGPT's text-to-image format,
/// with its begin and separator tokens).
fn longest_instruction(spec: &JobSpec, tok: &HfTokenizer) -> Option<i64> {
    let s = &spec.subject;
    let templates = match &s.prompts {
        PromptSource::DreamBench => super::prompts::dreambench_templates(s.live),
        PromptSource::File(f) => super::prompts::read_template_file(f).ok()?,
    };
    let side = spec.student.resolution;
    templates
        .iter()
        .filter_map(|t| {
            let prompt = super::prompts::fill(t, &s.identifier, &s.class_noun);
            tok.encode(&proxytune_models::ar::lumina::t2i_instruction(&prompt, side, side)).ok()
        })
        .map(|ids| ids.len() as i64 + 2)
        .max()
}

fn check_evaluation(spec: &JobSpec, r: &mut CheckReport) {
    let e = &spec.evaluation;
    if let Some(b) = e.baselines.iter().find(|b| !b.full() && spec.student.full) {
        r.problem(
            "evaluation.baselines",
            format!(
                "{} trains LoRA adapters like the Proxy-Tuned student, but this student is fully \
                 fine-tuned (student.full = true)",
                b.name()
            ),
        );
    }
    if e.baselines.iter().any(|b| b.full()) && spec.student.precision == Precision::Bf16 {
        r.problem(
            "evaluation.baselines",
            "direct-full trains every weight, in float32; with student.precision = \"bf16\" only LoRA \
             trains (use fp32, or leave direct-full out)",
        );
    }
    let mut seen = Vec::new();
    for b in &e.baselines {
        if seen.contains(b) {
            r.problem("evaluation.baselines", format!("{} is named twice", b.name()));
        }
        seen.push(*b);
    }
    for (key, dir) in [("evaluation.dino", &e.dino), ("evaluation.clip", &e.clip)] {
        let Some(dir) = dir else { continue };
        for file in ["config.json", "model.safetensors"] {
            if !dir.join(file).is_file() {
                r.problem(key, format!("{} is missing", dir.join(file).display()));
            }
        }
    }
    let feat_i = super::plan::assets_dir().join(proxytune_models::scorers::feat_i::WEIGHTS_FILE);
    if !feat_i.is_file() {
        r.problem(
            "evaluation",
            format!(
                "FEAT-I's weights {} are missing (`tools/dev setup` fetches them; or set PROXYTUNE_ASSETS)",
                feat_i.display()
            ),
        );
    }
    let mut metrics = vec!["FEAT-I"];
    if e.dino.is_some() {
        metrics.push("DINO");
    }
    if e.clip.is_some() {
        metrics.extend(["CLIP-I", "CLIP-T"]);
    }
    if e.clip.is_none() && spec.filter.min_prompt_adherence.is_some() {
        r.problem("filter.min_prompt_adherence", "needs a CLIP folder (evaluation.clip) to score prompts");
    }
    r.load("scorers", metrics.join(", "));
}

fn check_budgets(spec: &JobSpec, r: &mut CheckReport) {
    let d = &spec.supervisor.dreambooth;
    let st = &spec.student;
    for (key, value) in [
        ("supervisor.steps", spec.supervisor.steps as u64),
        ("supervisor.batch", spec.supervisor.batch as u64),
        ("supervisor.dreambooth.steps", d.steps),
        ("supervisor.dreambooth.batch", d.batch as u64),
        ("supervisor.dreambooth.gradient_accumulation", d.gradient_accumulation),
        ("proxies.per_prompt", spec.proxies.per_prompt as u64),
        ("student.steps", st.steps),
        ("student.batch", st.batch as u64),
        ("student.gradient_accumulation", st.gradient_accumulation),
        ("student.rows_to_start", st.rows_to_start as u64),
        ("evaluation.images_per_prompt", spec.evaluation.images_per_prompt as u64),
    ] {
        if value == 0 {
            r.problem(key, "is 0; it must be positive");
        }
    }
    if !d.full && d.lora_rank <= 0 {
        r.problem("supervisor.dreambooth.lora_rank", "must be positive");
    }
    if !st.full && st.lora_rank <= 0 {
        r.problem("student.lora_rank", "must be positive");
    }
    if d.prior_loss_weight > 0.0 && d.class_images == 0 {
        r.problem("supervisor.dreambooth.class_images", "is 0 while prior_loss_weight is positive");
    }
}
