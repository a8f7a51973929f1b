//! The paper's direct baseline (`direct-lora`): the student's LoRA trained on the subject's
//! reference photos alone, with no supervisor and no proxies, so the report shows whether the
//! proxies were worth generating. The references are tokenized by the job's own VQ encoder and
//! captioned with the instance prompt (`a sks dog`). The trainer, its LoRA, steps, batch and
//! sampling settings are the Proxy-Tuned student's, so the budgets match. Its rows are
//! `reference-<i>`; `student_direct/run.json` records the keys it consumed.

use anyhow::Context as _;
use proxytune_actors::runtime::{
    Context, JobOutcome, Metrics, Output, Pipeline, PipelineConfig, Produced, Source,
};
use proxytune_actors::stages::ar_trainer::ArTrainerActor;
use proxytune_actors::stages::intake::images_to_square_batch;
use proxytune_actors::stages::tokenize::square;
use proxytune_schemas::{now_us, CaptionStates, Table, VqTokens};

use super::pipeline::{steer, JobCommand};
use super::plan::StagePlan;

/// The direct student's folder under the job's output folder.
pub(crate) const DIRECT_DIR: &str = "student_direct";

/// The key of reference `i`'s token row.
pub(crate) fn reference_key(i: usize) -> String {
    format!("reference-{i}")
}

/// The instance prompt's caption states, for a student that conditions on them.
fn instance_caption(plan: &StagePlan) -> anyhow::Result<Option<CaptionStates>> {
    let t = &plan.tokenize;
    let kind = if t.caption_bf16 { tch::Kind::BFloat16 } else { tch::Kind::Float };
    let device = proxytune_models::device::parse_device(&t.device)?;
    let Some(captioner) = t.student.load_captioner(device, kind)? else { return Ok(None) };
    let prompt = plan.tuner.dreambooth.instance_prompt.clone();
    let states = captioner.encode(&[&prompt])?.pop().expect("one prompt");
    Ok(Some(CaptionStates {
        prompt,
        encoder_id: t.caption_encoder_id.clone().context("the caption encoder has no id")?,
        job_id: plan.job_id.clone(),
        tokens: states.tokens as u32,
        dim: states.dim as u32,
        states_bf16: states.to_bf16_bytes(),
        created_at_us: now_us(),
    }))
}

/// The references' token rows, each captioned with the instance prompt.
fn reference_rows(plan: &StagePlan) -> anyhow::Result<Vec<VqTokens>> {
    let t = &plan.tokenize;
    let vq = t.student.load_vq_encoder(proxytune_models::device::parse_device(&t.device)?)?;
    // Cropped as the tokenize actor crops a proxy.
    let squares: Vec<image::RgbImage> =
        plan.subject.references.iter().map(|r| square(image::DynamicImage::ImageRgb8(r.clone()))).collect();
    let pixels = images_to_square_batch(&squares, t.resolution as i64, vq.device())? * 2.0 - 1.0;
    let codes = vq.encode(&pixels)?; // [N, h, w]
    let (h, w) = (codes.size()[1], codes.size()[2]);
    let created_at_us = now_us();
    (0..squares.len())
        .map(|i| {
            let tokens = Vec::<i64>::try_from(codes.get(i as i64).flatten(0, -1))?;
            Ok(VqTokens {
                proxy_key: reference_key(i),
                job_id: plan.job_id.clone(),
                subject: plan.subject.name.clone(),
                prompt: plan.tuner.dreambooth.instance_prompt.clone(),
                tokenizer_id: t.tokenizer_id.clone(),
                grid_height: h as u32,
                grid_width: w as u32,
                tokens: tokens.into_iter().map(|c| c as i32).collect(),
                created_at_us,
            })
        })
        .collect()
}

/// Emits one prebuilt batch.
struct Once(Option<arrow_array::RecordBatch>);

impl Source for Once {
    fn produce(&mut self, _: &mut Context, out: &mut Output) -> proxytune_actors::Result<Produced> {
        match self.0.take() {
            Some(batch) => {
                out.emit(batch);
                Ok(Produced::More)
            }
            None => Ok(Produced::Done),
        }
    }
}

/// Trains the direct student under `plan.out/student_direct` (resuming from its newest checkpoint
/// when a rerun finds one), steered by `commands`. Returns how its pipeline ended.
pub(crate) async fn train(
    plan: &StagePlan,
    commands: tokio::sync::watch::Receiver<JobCommand>,
) -> anyhow::Result<JobOutcome> {
    let (rows, caption) = {
        let plan = plan.clone();
        tokio::task::spawn_blocking(move || anyhow::Ok((reference_rows(&plan)?, instance_caption(&plan)?)))
            .await??
    };
    let mut config = plan.trainer.clone();
    config.output_dir = plan.out.join(DIRECT_DIR);
    config.min_rows_to_start = rows.len();
    config.corpus_version = None;
    // Its own metrics would overwrite the Proxy-Tuned student's `proxytune_train_*` series.
    let (trainer, _stats) = ArTrainerActor::new(config, &Metrics::noop())?;
    let mut p = Pipeline::new(PipelineConfig::default(), Metrics::noop());
    let source = p.source("references", Once(Some(VqTokens::to_batch(&rows)?)));
    let trainer = p.operator("ar_trainer", trainer);
    p.connect(source, trainer);
    if let Some(caption) = caption {
        let captions = p.source("captions", Once(Some(CaptionStates::to_batch(&[caption])?)));
        p.connect(captions, trainer);
    }
    let running = p.start(&tokio::runtime::Handle::current())?;
    let report = steer(running, commands, || {}).await;
    if let Some(error) = report.tasks.iter().find_map(|t| t.error.clone()) {
        anyhow::bail!("the direct baseline's student failed: {error}");
    }
    Ok(report.outcome)
}
