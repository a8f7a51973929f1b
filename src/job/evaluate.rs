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

/// A model of an evaluation, loaded when its turn comes.
pub(crate) type ModelLoader<'a> = Box<dyn FnOnce() -> anyhow::Result<Box<dyn Generator>> + 'a>;

/// Runs `f` on each model in turn, each loaded just before and dropped just after, so one model's
/// weights are resident at a time (a supervisor and two students at SDXL and 7B sizes would not
/// fit one GPU together).
pub(crate) fn one_at_a_time<T>(
    models: Vec<(String, ModelLoader<'_>)>,
    mut f: impl FnMut(&str, &mut dyn Generator) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<(String, T)>> {
    let mut out = Vec::with_capacity(models.len());
    for (label, load) in models {
        let mut model = load().with_context(|| format!("loading {label}"))?;
        let value = f(&label, model.as_mut())?;
        drop(model);
        out.push((label, value));
    }
    Ok(out)
}

/// The protocol for `models` (loaded one at a time), the same seeds for each, every report turned
/// into scores by `score`.
pub(crate) fn evaluate_models(
    protocol: &Protocol,
    models: Vec<(String, ModelLoader<'_>)>,
    score: &dyn Fn(GeneratorReport, f64) -> ModelScores,
) -> anyhow::Result<Vec<(String, ModelScores)>> {
    let device = proxytune_models::device::parse_device(protocol.device)?;
    let bench = DreamBench::open(protocol.bench_dir)?;
    let entries: Vec<_> = bench.subjects.iter().filter(|s| s.subject == protocol.subject).cloned().collect();
    let (embedders, clip_t) = protocol.scorers.load(device)?;
    let image_metrics: Vec<&dyn ImageEmbedder> =
        embedders.iter().map(|(_, e)| e.as_ref() as &dyn ImageEmbedder).collect();
    one_at_a_time(models, |label, model| {
        let t0 = Instant::now();
        let report = evaluate_generator(
            &bench,
            &entries,
            model,
            &image_metrics,
            clip_t.as_deref(),
            &protocol.config,
            device,
        )?;
        let seconds = t0.elapsed().as_secs_f64();
        tracing::info!(model = %label, seconds, "evaluated");
        Ok(score(report, seconds))
    })
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

/// The report's label of the `direct-lora` baseline's student.
pub(crate) const DIRECT_LORA_LABEL: &str = "student (direct LoRA on the references)";

/// A spec's evaluation: its own models (the baselines' after the Proxy-Tuned student), FEAT-I and
/// the DINO / CLIP folders it names.
pub(crate) struct SpecEvaluator;

impl SpecEvaluator {
    fn models(plan: &StagePlan) -> Vec<(String, ModelLoader<'_>)> {
        let e = &plan.eval;
        let device = &e.device;
        let student = move |adapter: Option<std::path::PathBuf>| -> ModelLoader<'_> {
            Box::new(move || {
                Ok(Box::new(StudentGenerator::load(
                    &e.student,
                    adapter.as_deref(),
                    device,
                    e.student_sampling.clone(),
                )?) as Box<dyn Generator>)
            })
        };
        let supervisor_adapter =
            plan.tuner.output_dir.join(proxytune_models::diffusion::dreambooth::LORA_FILE);
        let student_adapter = plan.trainer.output_dir.join("adapter_model.safetensors");
        let student_label = if plan.trainer.lora.is_some() { "LoRA" } else { "full" };
        let direct_adapter = plan.out.join(super::direct::DIRECT_DIR).join("adapter_model.safetensors");
        let mut models: Vec<(String, ModelLoader<'_>)> = vec![
            ("student (untuned)".into(), student(None)),
            (
                "supervisor (DreamBooth)".into(),
                Box::new(move || {
                    Ok(Box::new(SupervisorGenerator::load(
                        &e.supervisor_dir,
                        e.supervisor_variant.as_deref(),
                        Some(&supervisor_adapter),
                        device,
                        e.supervisor_sampling.clone(),
                    )?) as Box<dyn Generator>)
                }),
            ),
            (format!("student (Proxy-Tuned {student_label})"), student(Some(student_adapter))),
        ];
        if e.baselines.contains(&super::spec::Baseline::DirectLora) {
            models.push((DIRECT_LORA_LABEL.into(), student(Some(direct_adapter))));
        }
        models
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
        evaluate_models(&protocol, Self::models(plan), &|report, seconds| plain_scores(name, report, seconds))
    }

    fn note(&self) -> String {
        "FEAT-I is EfficientNet-Lite0's pooled features (an offline stand-in for DINO); DINO and CLIP \
         columns appear when the spec names their folders."
            .into()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use proxytune_actors::stages::intake::SubjectEntry;
    use proxytune_schemas::ModelRole;

    use super::*;

    /// A generator that counts how many of its kind are alive.
    struct Counted(Rc<Cell<usize>>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.set(self.0.get() - 1);
        }
    }

    impl Generator for Counted {
        fn role(&self) -> ModelRole {
            ModelRole::Student
        }
        fn version(&self) -> String {
            "counted".into()
        }
        fn generate(
            &mut self,
            _: &SubjectEntry,
            _: &str,
            _: &[u64],
        ) -> proxytune_actors::Result<tch::Tensor> {
            unreachable!("not sampled here")
        }
    }

    #[test]
    fn the_evaluation_holds_one_model_at_a_time() {
        let alive = Rc::new(Cell::new(0));
        let loader = |alive: Rc<Cell<usize>>| -> ModelLoader<'static> {
            Box::new(move || {
                alive.set(alive.get() + 1);
                Ok(Box::new(Counted(alive)) as Box<dyn Generator>)
            })
        };
        let models = (0..3).map(|i| (format!("m{i}"), loader(alive.clone()))).collect();
        let seen = one_at_a_time(models, |label, _model| Ok((label.to_string(), alive.get()))).unwrap();
        let labels: Vec<&str> = seen.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["m0", "m1", "m2"]);
        assert!(seen.iter().all(|(_, (_, alive))| *alive == 1), "{seen:?}");
        assert_eq!(alive.get(), 0);
        // A model that fails to load is named.
        let failing: Vec<(String, ModelLoader)> =
            vec![("the supervisor".into(), Box::new(|| Err(anyhow::anyhow!("no weights"))))];
        let err = one_at_a_time(failing, |_, _| Ok(())).unwrap_err();
        assert!(format!("{err:#}").contains("loading the supervisor: no weights"), "{err:#}");
    }
}
