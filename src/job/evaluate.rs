//! The DreamBench evaluation of a job: a one-subject bench written from the job's references and
//! prompt templates, every model sampled with the same seeds, image metrics against the
//! references and CLIP-T against the prompts. [`SpecEvaluator`] evaluates a spec's models (the
//! untuned student, the DreamBooth supervisor, the Proxy-Tuned student) with FEAT-I and the DINO
//! and CLIP folders the spec names; the world preset adds its exact checks on top
//! (`world_models`).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use proxytune_actors::evaluation::dreambench::{
    evaluate_generator, DreamBench, Generator, GeneratorReport, ProtocolConfig,
};
use proxytune_actors::evaluation::generators::{StudentGenerator, SupervisorGenerator};
use proxytune_models::scorers::ImageEmbedder;

use super::execute::Evaluator;
use super::plan::{ScorerSource, StagePlan, SubjectPlan};
use crate::world_models::ModelScores;

/// Writes a one-subject DreamBench folder: `subjects.tsv`, `prompts.txt` (the templates, for both
/// kinds) and the references as PNGs.
pub(crate) fn write_bench(dir: &Path, subject: &SubjectPlan) -> anyhow::Result<()> {
    let folder = dir.join(&subject.name);
    std::fs::create_dir_all(&folder).with_context(|| folder.display().to_string())?;
    for old in std::fs::read_dir(&folder)? {
        std::fs::remove_file(old?.path())?;
    }
    for (k, img) in subject.references.iter().enumerate() {
        let path = folder.join(format!("{k:02}.png"));
        img.save(&path).with_context(|| path.display().to_string())?;
    }
    std::fs::write(
        dir.join("subjects.tsv"),
        format!(
            "subject\tclass\tlive\tn_images\n{}\t{}\t{}\t{}\n",
            subject.name,
            subject.class_noun,
            subject.live,
            subject.references.len()
        ),
    )?;
    let mut prompts = String::from("# kind<TAB>template; {0} = identifier, {1} = class noun\n");
    for kind in ["object", "live"] {
        for t in &subject.templates {
            prompts.push_str(&format!("{kind}\t{}\n", t.replacen("{}", "{0} {1}", 1)));
        }
    }
    std::fs::write(dir.join("prompts.txt"), prompts)?;
    Ok(())
}

/// What the protocol runs with: the bench and its subject, the encoders, the sampling budget.
pub(crate) struct Protocol<'a> {
    /// A DreamBench folder holding the subject.
    pub bench_dir: &'a Path,
    /// The subject's name in it.
    pub subject: &'a str,
    /// The encoders.
    pub scorers: &'a ScorerSource,
    /// Their device.
    pub device: &'a str,
    /// Identifier, images per prompt, prompts, seeds.
    pub config: ProtocolConfig,
}

/// The protocol for `models`, the same seeds for each, every report turned into scores by `score`.
pub(crate) fn evaluate_models(
    protocol: &Protocol,
    models: Vec<(String, Box<dyn Generator>)>,
    score: &dyn Fn(GeneratorReport, f64) -> ModelScores,
) -> anyhow::Result<Vec<(String, ModelScores)>> {
    let device = proxytune_models::device::parse_device(protocol.device)?;
    let bench = DreamBench::open(protocol.bench_dir)?;
    let entries: Vec<_> = bench.subjects.iter().filter(|s| s.subject == protocol.subject).cloned().collect();
    let (embedders, clip_t) = protocol.scorers.load(device)?;
    let image_metrics: Vec<&dyn ImageEmbedder> =
        embedders.iter().map(|(_, e)| e.as_ref() as &dyn ImageEmbedder).collect();
    let mut out = Vec::new();
    for (label, mut model) in models {
        let t0 = Instant::now();
        let report = evaluate_generator(
            &bench,
            &entries,
            model.as_mut(),
            &image_metrics,
            clip_t.as_deref(),
            &protocol.config,
            device,
        )?;
        let seconds = t0.elapsed().as_secs_f64();
        tracing::info!(model = %label, seconds, "evaluated");
        out.push((label, score(report, seconds)));
    }
    Ok(out)
}

/// Scores of a report on `subject` without the world's exact checks.
pub(crate) fn plain_scores(subject: &str, report: GeneratorReport, seconds: f64) -> ModelScores {
    ModelScores {
        role: report.role.as_str().to_string(),
        version: report.version,
        metrics: report
            .metrics
            .iter()
            .filter_map(|(name, table)| table.per_subject.get(subject).map(|v| (name.clone(), *v)))
            .collect(),
        context_accuracy: None,
        subject_colour_present: None,
        samples: report.samples.len(),
        seconds,
        images: report.samples,
    }
}

/// A spec's evaluation: its own models, FEAT-I and the DINO / CLIP folders it names.
pub(crate) struct SpecEvaluator;

impl SpecEvaluator {
    fn models(plan: &StagePlan) -> anyhow::Result<Vec<(String, Box<dyn Generator>)>> {
        let e = &plan.eval;
        let device = &e.device;
        let student = |adapter: Option<&Path>| -> anyhow::Result<Box<dyn Generator>> {
            Ok(Box::new(StudentGenerator::load_with_vq(
                &e.student_dir,
                &e.vq_dir,
                adapter,
                device,
                e.student_sampling.clone(),
            )?))
        };
        let supervisor_adapter =
            plan.tuner.output_dir.join(proxytune_models::diffusion::dreambooth::LORA_FILE);
        let student_adapter = plan.trainer.output_dir.join("adapter_model.safetensors");
        let student_label = if plan.trainer.lora.is_some() { "LoRA" } else { "full" };
        Ok(vec![
            ("student (untuned)".into(), student(None)?),
            (
                "supervisor (DreamBooth)".into(),
                Box::new(SupervisorGenerator::load(
                    &e.supervisor_dir,
                    e.supervisor_variant.as_deref(),
                    Some(&supervisor_adapter),
                    device,
                    e.supervisor_sampling.clone(),
                )?),
            ),
            (format!("student (Proxy-Tuned {student_label})"), student(Some(&student_adapter))?),
        ])
    }
}

impl Evaluator for SpecEvaluator {
    fn evaluate(&self, plan: &StagePlan) -> anyhow::Result<Vec<(String, ModelScores)>> {
        let bench_dir = plan.out.join("bench");
        write_bench(&bench_dir, &plan.subject)?;
        let protocol = Protocol {
            bench_dir: &bench_dir,
            subject: &plan.subject.name,
            scorers: &plan.scorers,
            device: &plan.eval.device,
            config: ProtocolConfig {
                identifier: plan.subject.identifier.clone(),
                images_per_prompt: plan.eval.images_per_prompt,
                seed_base: 0,
                max_prompts: plan.eval.max_prompts,
            },
        };
        let name = &plan.subject.name;
        evaluate_models(&protocol, Self::models(plan)?, &|report, seconds| {
            plain_scores(name, report, seconds)
        })
    }

    fn note(&self) -> String {
        "FEAT-I is EfficientNet-Lite0's pooled features (an offline stand-in for DINO); DINO and CLIP \
         columns appear when the spec names their folders."
            .into()
    }
}
