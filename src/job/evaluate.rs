//! The DreamBench evaluation of a job: a one-subject bench written from the job's references and
//! prompt templates, every model sampled with the same seeds, image metrics against the
//! references and CLIP-T against the prompts. [`SpecEvaluator`] evaluates a spec's models (the
//! untuned student, the DreamBooth supervisor, the Proxy-Tuned student) with FEAT-I and the DINO
//! and CLIP folders the spec names; the world preset adds its exact checks on top
//! (`world_models`).

use std::collections::BTreeMap;
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

/// Whether `prompt` edits a property of the subject (a word other than the article before the
/// identifier: `a red sks dog`, `a cube shaped sks dog`) or recontextualises it (the subject first:
/// `a sks dog on the beach`, `a sks dog wearing a red hat`). DreamBench's 25 prompts of an object
/// are 20 of the one and 5 of the other; a live subject's, 20 and 5.
pub(crate) fn prompt_kind(prompt: &str, identifier: &str) -> &'static str {
    let words: Vec<&str> = prompt.split_whitespace().collect();
    match words.iter().position(|w| *w == identifier) {
        Some(i) if i > 1 || (i == 1 && !matches!(words[0], "a" | "an" | "A" | "An")) => "property_edit",
        _ => "recontextualisation",
    }
}

/// The image metrics' means over each [`prompt_kind`]'s samples (metrics a sample lacks are left
/// out of its kind's means).
pub(crate) fn split_by_prompt_kind(
    samples: &[proxytune_schemas::EvalSample],
    identifier: &str,
) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut sums: BTreeMap<String, BTreeMap<String, (f64, usize)>> = BTreeMap::new();
    for s in samples {
        let kind = sums.entry(prompt_kind(&s.prompt, identifier).to_string()).or_default();
        let values = [
            ("DINO", s.score_dino),
            ("CLIP-I", s.score_clip_i),
            ("CLIP-T", s.score_clip_t),
            ("FEAT-I", s.score_feat_i),
        ];
        for (name, value) in values {
            if let Some(v) = value {
                let e = kind.entry(name.to_string()).or_default();
                e.0 += v as f64;
                e.1 += 1;
            }
        }
    }
    sums.into_iter()
        .map(|(kind, m)| (kind, m.into_iter().map(|(name, (sum, n))| (name, sum / n as f64)).collect()))
        .collect()
}

/// Scores of a report on `subject` without the world's exact checks.
pub(crate) fn plain_scores(
    subject: &str,
    identifier: &str,
    report: GeneratorReport,
    seconds: f64,
) -> ModelScores {
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
        by_prompt_kind: split_by_prompt_kind(&report.samples, identifier),
        samples: report.samples.len(),
        seconds,
        images: report.samples,
    }
}

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
        let trained = proxytune_models::ar::student::trained_weights;
        let student_adapter = trained(&plan.trainer.output_dir);
        let student_label = if plan.trainer.lora.is_some() { "LoRA" } else { "full" };
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
        for b in &e.baselines {
            models.push((b.label().into(), student(Some(trained(&plan.out.join(b.dir()))))));
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
        evaluate_models(&protocol, Self::models(plan), &|report, seconds| {
            plain_scores(name, &plan.subject.identifier, report, seconds)
        })
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

    #[test]
    fn dreambench_prompts_split_into_20_placements_and_5_property_edits() {
        for live in [false, true] {
            let prompts: Vec<String> = super::super::prompts::dreambench_templates(live)
                .iter()
                .map(|t| super::super::prompts::fill(t, "zwx", "dog"))
                .collect();
            let edits: Vec<&String> =
                prompts.iter().filter(|p| prompt_kind(p, "zwx") == "property_edit").collect();
            assert_eq!(edits.len(), 5, "live {live}: {edits:?}");
            assert!(edits.iter().any(|p| p.as_str() == "a cube shaped zwx dog"), "{edits:?}");
        }
        assert_eq!(prompt_kind("a zwx dog wearing a red hat", "zwx"), "recontextualisation");
        assert_eq!(prompt_kind("A shiny zwx dog", "zwx"), "property_edit");
    }

    #[test]
    fn each_kind_averages_its_own_samples_and_a_missing_metric_is_left_out() {
        let sample = |prompt: &str, dino: f32, clip_t: Option<f32>| proxytune_schemas::EvalSample {
            job_id: "j".into(),
            model_role: proxytune_schemas::ModelRole::Student,
            model_version: "v".into(),
            subject: "s".into(),
            prompt_index: 0,
            prompt: prompt.into(),
            sample_index: 0,
            seed: 0,
            image_png: Vec::new(),
            width: 1,
            height: 1,
            score_dino: Some(dino),
            score_clip_i: None,
            score_clip_t: clip_t,
            score_feat_i: None,
            created_at_us: 0,
        };
        let samples = [
            sample("a sks dog on the beach", 0.5, Some(0.25)),
            sample("a sks dog in the snow", 0.25, None),
            sample("a red sks dog", 0.75, Some(0.125)),
        ];
        let split = split_by_prompt_kind(&samples, "sks");
        assert_eq!(split["recontextualisation"]["DINO"], 0.375);
        assert_eq!(split["recontextualisation"]["CLIP-T"], 0.25);
        assert_eq!(split["property_edit"]["DINO"], 0.75);
        assert!(!split["property_edit"].contains_key("CLIP-I"));
    }
}
