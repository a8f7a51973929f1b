//! One job from its [`StagePlan`]: the streaming pipeline into the corpus under `plan.out`, the
//! evaluation of the untuned student, the tuned supervisor and the tuned student with the same
//! seeds, and `report/index.html` with `report.json` and the grids. The demo (the world preset),
//! `proxytune run` and the daemon all run their jobs through here.

use std::time::Instant;

use proxytune_actors::corpus::Corpus;
use proxytune_actors::runtime::{JobOutcome, Metrics};
use proxytune_schemas::{ClassPriorImage, EvalSample, Proxy, Supervisor, Table, VqTokens};

use super::pipeline::{pipeline, set_stage, JobCommand, ProgressHandle};
use super::plan::StagePlan;
use crate::plots::{losses_svg, Timeline};
use crate::report::{
    decode, group_in_order, html, record_scores, save_grid, save_rows, squares, throughput, ReportFiles,
};
use crate::world_models::ModelScores;

/// Rows per fragment of a finished job's compacted tables: a few large files per table (at
/// 1024-px proxies about 1.5 GB each) instead of one per commit.
const FRAGMENT_ROWS: usize = 1024;

/// Evaluates a finished job's models.
pub(crate) trait Evaluator {
    /// The scored models, in the order untuned student, supervisor, tuned student.
    fn evaluate(&self, plan: &StagePlan) -> anyhow::Result<Vec<(String, ModelScores)>>;
    /// What the report says the scores were measured with.
    fn note(&self) -> String;
}

/// Runs `plan` with the global metrics recorder (with `job_id` on every series when given),
/// steered by `commands` (pause, resume, cancel: a cancel drains it), then evaluates with
/// `evaluator` and writes the report. Returns the exit code (0 done, 130 cancelled).
pub(crate) async fn execute(
    plan: &StagePlan,
    evaluator: &dyn Evaluator,
    commands: tokio::sync::watch::Receiver<JobCommand>,
    job_id: Option<&str>,
    progress: &ProgressHandle,
) -> anyhow::Result<i32> {
    let subject = &plan.subject;
    let metrics = match job_id {
        Some(id) => Metrics::global().for_job(id),
        None => Metrics::global(),
    };
    metrics.describe_all();
    let corpus = Corpus::open_or_create(plan.out.join("corpus"))?;
    let report_dir = plan.out.join("report");
    std::fs::create_dir_all(&report_dir)?;
    eprintln!(
        "proxytune: subject {} (a {}), output {}",
        subject.name,
        subject.class_noun,
        plan.out.display()
    );
    if plan.uses_cuda() {
        // Process-wide in libtorch; jobs run one at a time, so each sets it for itself.
        let on = proxytune_models::device::allow_tf32(plan.tf32)?;
        eprintln!("proxytune: TF32 matrix products on CUDA {}", if on { "on" } else { "off" });
    }
    // Process-wide too. The pipeline's stages compute at once; the evaluation runs alone.
    let threads = plan.pipeline_cpu_threads();
    tch::set_num_threads(threads as i32);
    eprintln!("proxytune: {threads} torch threads a call while the pipeline runs");
    let t0 = Instant::now();
    set_stage(progress, "starting");
    let baseline_commands = commands.clone();
    let run = pipeline(plan, &corpus, metrics.clone(), commands, progress).await?;
    if run.outcome == JobOutcome::Cancelled {
        set_stage(progress, "cancelled");
        eprintln!(
            "proxytune: cancelled; the corpus at {} keeps every committed row (`proxytune corpus info`)",
            corpus.root().display()
        );
        return Ok(run.outcome.exit_code());
    }
    if run.outcome != JobOutcome::Succeeded {
        anyhow::bail!(
            "the pipeline ended {:?}{}; the corpus at {} keeps every committed row",
            run.outcome,
            run.error.map(|e| format!(" ({e})")).unwrap_or_default(),
            corpus.root().display()
        );
    }

    // What the corpus holds now: metadata only (images and tokens stay on disk), so the report
    // costs the same at 100k proxies as at 100; the grids read their few images below.
    let proxy_table = corpus.table::<Proxy>().await?;
    let proxies: Vec<Proxy> = proxy_table.read_rows_light(None).await?;
    let priors: Vec<ClassPriorImage> = corpus.table::<ClassPriorImage>().await?.read_rows_light(None).await?;
    let vq_created: Vec<i64> = corpus.table::<VqTokens>().await?.timestamps("created_at").await?;
    let supervisors: Vec<Supervisor> = corpus.table::<Supervisor>().await?.read_rows(None).await?;
    let kept: Vec<&Proxy> = proxies.iter().filter(|p| p.keep == Some(true)).collect();
    let rejected: Vec<&Proxy> = proxies.iter().filter(|p| p.keep == Some(false)).collect();
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for p in &rejected {
        *reasons.entry(p.reject_reason.map(|r| r.as_str().to_string()).unwrap_or_default()).or_default() += 1;
    }
    let first_proxy_us = proxies.iter().map(|p| p.generated_at_us).min().unwrap_or(0);
    let last_proxy_us = proxies.iter().map(|p| p.generated_at_us).max().unwrap_or(0);
    let first_step_us = run.trainer.step_started_us.first().copied();
    let last_step_us = run.trainer.step_started_us.last().copied();
    let steps_before_last_proxy = run.trainer.step_started_us.iter().filter(|&&t| t < last_proxy_us).count();

    // The baselines train after the pipeline, alone, on every core.
    tch::set_num_threads(super::plan::cores() as i32);
    let mut baselines = serde_json::Map::new();
    for &baseline in &plan.eval.baselines {
        set_stage(progress, &format!("training the {} baseline", baseline.name()));
        let t_direct = Instant::now();
        let outcome = super::direct::train(plan, baseline, baseline_commands.clone()).await?;
        if outcome == JobOutcome::Cancelled {
            set_stage(progress, "cancelled");
            return Ok(outcome.exit_code());
        }
        let dir = plan.out.join(baseline.dir());
        let run: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("run.json"))?)?;
        baselines.insert(
            baseline.name().into(),
            serde_json::json!({ "dir": dir.display().to_string(), "steps": run["steps"],
                                "rows_trained_on": run["data"]["row_keys"], "seconds": t_direct.elapsed().as_secs_f64() }),
        );
    }

    set_stage(progress, "evaluating");
    let t_eval = Instant::now();
    let scores = if plan.eval.skip { Vec::new() } else { evaluator.evaluate(plan)? };
    let (_, peak) = proxytune_models::diffusion::pipeline::StableDiffusion::resident();
    eprintln!("proxytune: at most {peak} supervisor copies were loaded at once in this process");
    let eval_seconds = t_eval.elapsed().as_secs_f64();

    set_stage(progress, "reporting");
    // The writers committed every few rows, a fragment each; the finished job's tables are
    // rewritten into fragments of up to FRAGMENT_ROWS rows. The rows and their order are those
    // the student trained on, so the report names the compacted versions (and `tidy` can then
    // remove the small-fragment versions with their files).
    let compacted = corpus.compact(FRAGMENT_ROWS).await?;
    for c in compacted.iter().filter(|c| c.fragments_after < c.fragments_before) {
        eprintln!(
            "proxytune: compacted {}: {} fragments into {} (version {})",
            c.table, c.fragments_before, c.fragments_after, c.version
        );
    }
    let compacted_version = |table: &str| compacted.iter().find(|c| c.table == table).map(|c| c.version);
    let run = super::pipeline::Run {
        proxies_version: compacted_version(Proxy::NAME).or(run.proxies_version),
        vq_version: compacted_version(VqTokens::NAME).or(run.vq_version),
        ..run
    };
    // Grids.
    let references = squares(&subject.references, 128);
    save_grid(&references, references.len(), &report_dir.join("references.png"))?;
    let first = |keep: bool| {
        let table = &proxy_table;
        async move { anyhow::Ok(table.read_rows_limited(Some(&format!("keep = {keep}")), 48).await?) }
    };
    let decoded = |rows: Vec<(String, Vec<Proxy>)>| -> Vec<(String, Vec<Vec<image::RgbImage>>)> {
        rows.into_iter()
            .map(|(label, ps)| (label, vec![ps.iter().filter_map(|p| decode(&p.image_png)).collect()]))
            .collect()
    };
    let kept_rows = decoded(group_in_order(first(true).await?, |p| p.prompt.clone()));
    let rejected_rows = decoded(group_in_order(first(false).await?, |p| {
        p.reject_reason.map(|r| r.as_str().to_string()).unwrap_or_else(|| "no reason recorded".into())
    }));
    // The samples: a row per prompt, a strip per model (its images of that prompt in seed order);
    // and each model's whole grid, one row per prompt, for pages that show one image.
    let mut prompts: Vec<(u32, String)> = scores
        .iter()
        .flat_map(|(_, s)| s.images.iter().map(|e| (e.prompt_index, e.prompt.clone())))
        .collect();
    prompts.sort();
    prompts.dedup_by_key(|(i, _)| *i);
    let mut sample_rows = Vec::new();
    for (index, prompt) in &prompts {
        let strips = scores
            .iter()
            .map(|(_, s)| {
                let mut samples: Vec<&EvalSample> =
                    s.images.iter().filter(|e| e.prompt_index == *index).collect();
                samples.sort_by_key(|e| e.sample_index);
                samples.iter().filter_map(|e| decode(&e.image_png)).collect()
            })
            .collect();
        sample_rows.push((prompt.clone(), strips));
    }
    for (i, (_, s)) in scores.iter().enumerate() {
        let mut samples: Vec<&EvalSample> = s.images.iter().collect();
        samples.sort_by_key(|e| (e.prompt_index, e.sample_index));
        let imgs: Vec<_> = samples.iter().filter_map(|e| decode(&e.image_png)).collect();
        save_grid(&imgs, plan.eval.images_per_prompt, &report_dir.join(format!("samples_{i}.png")))?;
    }
    let timeline = Timeline {
        start_us: run.started_at_us,
        generated_us: proxies.iter().map(|p| p.generated_at_us).collect(),
        kept_us: kept.iter().filter_map(|p| p.filtered_at_us).collect(),
        committed: run.proxy_commits.clone(),
        student_steps_us: run.trainer.step_started_us.clone(),
        supervisor_steps_us: run.tuner.step_started_us.clone(),
    };
    let write_svg = |name: &str, svg: Option<String>| -> anyhow::Result<bool> {
        let Some(svg) = svg else { return Ok(false) };
        std::fs::write(report_dir.join(name), svg)?;
        Ok(true)
    };
    let files = ReportFiles {
        timeline: write_svg("timeline.svg", timeline.svg(960, 420)?)?,
        losses: write_svg(
            "losses.svg",
            losses_svg(
                &[
                    ("supervisor (DreamBooth): total loss", &run.tuner.losses),
                    ("student: total loss", &run.trainer.losses),
                ],
                960,
                320,
            )?,
        )?,
        kept: save_rows(&kept_rows, &report_dir, "kept")?,
        rejected: save_rows(&rejected_rows, &report_dir, "rejected")?,
        samples: save_rows(&sample_rows, &report_dir, "samples")?,
    };

    let seconds = |a: i64, b: i64| (b - a) as f64 / 1e6;
    let generation_seconds = seconds(first_proxy_us, last_proxy_us).max(1e-9);
    let report = serde_json::json!({
        "subject": subject.name, "class": subject.class_noun, "identifier": subject.identifier,
        "models": { "supervisor": plan.tuner.model_id, "student": plan.trainer.tokenizer_id,
                    "supervisor_dir": plan.tuner.model_dir.display().to_string(),
                    "student_dir": plan.trainer.student.dir.display().to_string() },
        "outcome": format!("{:?}", run.outcome),
        "stages": {
            "class_priors": throughput(priors.iter().map(|r| r.created_at_us)),
            "supervisor": {
                "steps": supervisors.first().map(|s| s.train_steps),
                "ready_at_us": supervisors.first().map(|s| s.created_at_us),
                "final_loss": supervisors.first().and_then(|s| s.final_loss),
                "losses": run.tuner.losses,
                "first_step_at_us": run.tuner.step_started_us.first(),
                "steps_per_second": supervisors.first().map(|s| s.train_steps as f64
                    / seconds(priors.iter().map(|r| r.created_at_us).min().unwrap_or(s.created_at_us), s.created_at_us).max(1e-9)),
            },
            "filter": throughput(proxies.iter().filter_map(|p| p.filtered_at_us)),
            "proxies": { "rows": proxies.len(), "kept": kept.len(), "rejected": rejected.len(),
                         "reject_reasons": reasons,
                         "width": proxies.first().map(|p| p.width), "height": proxies.first().map(|p| p.height),
                         "first_generated_at_us": first_proxy_us, "last_generated_at_us": last_proxy_us,
                         "per_second": proxies.len() as f64 / generation_seconds },
            "vq_tokens": throughput(vq_created.iter().copied()),
            "student": { "steps": run.trainer.steps, "rows_received": run.trainer.rows_received,
                         "first_step_at_us": first_step_us, "last_step_at_us": last_step_us,
                         "steps_before_last_proxy": steps_before_last_proxy,
                         "losses": run.trainer.losses,
                         "steps_per_second": run.trainer.step_started_us.len() as f64
                             / seconds(first_step_us.unwrap_or(0), last_step_us.unwrap_or(0)).max(1e-9) },
        },
        "corpus": { "path": corpus.root().display().to_string(), "proxies_version": run.proxies_version,
                    "vq_tokens_version": run.vq_version, "rows_trained_on": run.trainer.rows_received },
        "pipeline_started_at_us": run.started_at_us,
        "pipeline_seconds": run.seconds,
        "busy_seconds": run.busy_seconds,
        "baselines": baselines,
        "evaluation_seconds": eval_seconds,
        "total_seconds": t0.elapsed().as_secs_f64(),
        "evaluation": { "images_per_prompt": plan.eval.images_per_prompt,
                        "prompts": plan.eval.max_prompts.unwrap_or(subject.templates.len()).min(subject.templates.len()),
                        "skipped": plan.eval.skip,
                        "note": evaluator.note(),
                        "models": scores.iter().map(|(label, s)| serde_json::json!({"label": label, "scores": s})).collect::<Vec<_>>() },
    });
    std::fs::write(report_dir.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(report_dir.join("index.html"), html(&report, &scores, &files))?;
    let models = ["student_untuned", "supervisor", "student"]
        .into_iter()
        .chain(plan.eval.baselines.iter().map(|b| b.metric_model()));
    for (model, (_, s)) in models.zip(&scores) {
        record_scores(&metrics, model, s);
    }
    set_stage(progress, "done");
    eprintln!("report: {}", report_dir.join("index.html").display());
    println!("{}", serde_json::to_string_pretty(&report["evaluation"])?);
    Ok(0)
}
