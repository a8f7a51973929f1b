//! `proxy_generator`: stage 2 of Proxy-Tuning. On each "supervisor ready" row (`supervisors`
//! schema, from the [`SupervisorTuner`](crate::stages::supervisor_tuner::SupervisorTuner)) it loads the
//! base model with that adapter and samples its [`PromptPlan`]: every prompt `images_per_prompt`
//! times with its own seed.
//! It emits a `proxies` batch as soon as each sampler call's images are encoded (through the
//! runtime's pending-work loop, so the Filter and the AR trainer start on the first batch),
//! round-robin over prompts so that an early stop still covers every prompt.
//!
//! The actor's thread only drives the model (denoising and the VAE decode); PNG encoding and the
//! Arrow batch run on an encoder thread ([`Encoder`]), at most [`ENCODING_DEPTH`] batches behind,
//! so the device samples the next batch while the last one is encoded. Batches go out in the
//! order they were sampled; a drain (end of input, cancel) emits every batch already sampled.
//!
//! Seeds are `first_seed + prompt_index · images_per_prompt + image_index`: a proxy's key
//! (job, subject, prompt, seed, supervisor version) is the same in every run of the plan, so a
//! restarted job rewrites nothing the corpus already holds, and with `stored_seeds` (the seeds the
//! corpus already holds for this job) it does not even sample them again.

use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use metrics::Counter;
use proxytune_models::diffusion::dreambooth::LORA_FILE;
use proxytune_models::diffusion::pipeline::StableDiffusion;
use proxytune_models::weights::{load_safetensors, Strictness};
use proxytune_schemas::{now_us, MetricName, Proxy, Supervisor, Table};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::runtime::{Context, Metrics, Operator, Output};
use crate::stages::diffusion_sampling::{load_supervisor, sample_images, SamplingConfig};
use crate::stages::intake::encode_png;

/// What to sample: the subject alone and in contexts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptPlan {
    /// Prompts of the subject alone (e.g. `a sks dog`, `a photo of sks dog`).
    pub subject_prompts: Vec<String>,
    /// Prompts of the subject in a context (e.g. `a sks dog on the beach`).
    pub context_prompts: Vec<String>,
    /// Images per prompt.
    pub images_per_prompt: u32,
    /// Seed of the first image of the first prompt.
    #[serde(default)]
    pub first_seed: u64,
}

/// One image of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanItem {
    /// Index of the prompt (subject prompts first, then context prompts).
    pub prompt_index: u32,
    /// The prompt.
    pub prompt: String,
    /// The seed.
    pub seed: u64,
}

impl PromptPlan {
    /// A plan from DreamBench-style templates (`{0}` the identifier, `{1}` the class noun), the
    /// bare `a {0} {1}` as the subject prompt.
    pub fn from_templates(
        templates: &[String],
        identifier: &str,
        class_noun: &str,
        images_per_prompt: u32,
    ) -> Self {
        let fill = |t: &str| t.replace("{0}", identifier).replace("{1}", class_noun);
        let subject = fill("a {0} {1}");
        PromptPlan {
            context_prompts: templates.iter().map(|t| fill(t)).filter(|p| *p != subject).collect(),
            subject_prompts: vec![subject],
            images_per_prompt,
            first_seed: 0,
        }
    }

    /// The prompts, subject prompts first.
    pub fn prompts(&self) -> Vec<&str> {
        self.subject_prompts.iter().chain(&self.context_prompts).map(String::as_str).collect()
    }

    /// Every image of the plan, round-robin: image 0 of every prompt, then image 1, …
    pub fn items(&self) -> Vec<PlanItem> {
        let prompts = self.prompts();
        let per = self.images_per_prompt as u64;
        (0..per)
            .flat_map(|i| {
                prompts.iter().enumerate().map(move |(p, prompt)| PlanItem {
                    prompt_index: p as u32,
                    prompt: prompt.to_string(),
                    seed: self.first_seed + p as u64 * per + i,
                })
            })
            .collect()
    }

    fn validate(&self) -> Result<()> {
        if self.prompts().is_empty() || self.images_per_prompt == 0 {
            return Err(Error::BadInput {
                input: "prompt plan".into(),
                message: "needs at least one prompt and images_per_prompt > 0".into(),
            });
        }
        if let Some(p) = self.prompts().into_iter().find(|p| p.trim().is_empty()) {
            return Err(Error::BadInput {
                input: "prompt plan".into(),
                message: format!("empty prompt `{p}`"),
            });
        }
        Ok(())
    }
}

/// Configuration of a [`ProxyGenerator`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyGeneratorConfig {
    /// Job id; supervisor rows of other jobs are refused.
    pub job_id: String,
    /// Subject; supervisor rows of other subjects are refused.
    pub subject: String,
    /// The base model folder (diffusers layout) the adapters apply to.
    pub model_dir: PathBuf,
    /// Weight-file variant of the folder (`fp16`), when not the plain files.
    #[serde(default)]
    pub variant: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// What to sample.
    pub plan: PromptPlan,
    /// How to sample.
    #[serde(default)]
    pub sampling: SamplingConfig,
    /// Seeds of plan items the corpus already holds (a resumed job): they are not sampled again.
    #[serde(default)]
    pub stored_seeds: std::collections::BTreeSet<u64>,
}

fn default_device() -> String {
    "cpu".into()
}

/// Sampled batches that may wait for the encoder before the sampler waits for it.
pub const ENCODING_DEPTH: usize = 2;

/// A sampled batch on its way to the encoder: its rows (without their PNGs) and images.
struct Sampled {
    rows: Vec<Proxy>,
    images: Vec<image::RgbImage>,
}

/// PNG encoding off the device thread: sampled batches go in, `proxies` batches come out in the
/// order they went in. The sender keeps at most [`ENCODING_DEPTH`] outstanding (it takes a
/// finished one before sending more), so neither side can block the other for good.
struct Encoder {
    jobs: Option<flume::Sender<Sampled>>,
    done: flume::Receiver<Result<RecordBatch>>,
    outstanding: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Encoder {
    fn start() -> Result<Self> {
        let (jobs, inbox) = flume::unbounded::<Sampled>();
        let (finished, done) = flume::unbounded();
        let thread = std::thread::Builder::new()
            .name("proxy-encoder".into())
            .spawn(move || {
                for Sampled { mut rows, images } in inbox.iter() {
                    for (row, img) in rows.iter_mut().zip(&images) {
                        row.image_png = encode_png(img);
                    }
                    if finished.send(Proxy::to_batch(&rows).map_err(Error::from)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::Operator {
                message: format!("cannot start the proxy encoder thread: {e}"),
            })?;
        Ok(Encoder { jobs: Some(jobs), done, outstanding: 0, thread: Some(thread) })
    }

    fn send(&mut self, sampled: Sampled) -> Result<()> {
        let gone = || Error::Operator { message: "the proxy encoder thread ended".into() };
        self.jobs.as_ref().ok_or_else(gone)?.send(sampled).map_err(|_| gone())?;
        self.outstanding += 1;
        Ok(())
    }

    /// The next encoded batch if it is ready.
    fn try_take(&mut self) -> Option<Result<RecordBatch>> {
        let batch = self.done.try_recv().ok()?;
        self.outstanding -= 1;
        Some(batch)
    }

    /// The next encoded batch, waiting for it; `None` when nothing is outstanding.
    fn take(&mut self) -> Option<Result<RecordBatch>> {
        if self.outstanding == 0 {
            return None;
        }
        self.outstanding -= 1;
        Some(self.done.recv().unwrap_or_else(|_| {
            Err(Error::Operator { message: "the proxy encoder thread ended with batches outstanding".into() })
        }))
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        self.jobs = None; // ends the thread's loop
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The supervisor being sampled and where in the plan it is.
struct Active {
    supervisor: Supervisor,
    model: StableDiffusion,
    items: Vec<PlanItem>,
    next: usize,
}

/// Samples proxies from each tuned supervisor it is told about.
pub struct ProxyGenerator {
    config: ProxyGeneratorConfig,
    queue: Vec<Supervisor>,
    active: Option<Active>,
    encoder: Option<Encoder>,
    generated: Counter,
}

impl ProxyGenerator {
    /// A generator (the plan is checked here).
    pub fn new(config: ProxyGeneratorConfig, metrics: &Metrics) -> Result<Self> {
        config.plan.validate()?;
        let generated = metrics.counter(MetricName::GeneratedImages, "kind", "proxy");
        Ok(ProxyGenerator { config, queue: Vec::new(), active: None, encoder: None, generated })
    }

    /// The base model with the supervisor's adapter: a LoRA file in diffusers' layout, or a full
    /// UNet weights file.
    fn load(&self, supervisor: &Supervisor) -> Result<StableDiffusion> {
        let adapter = Path::new(&supervisor.adapter_path);
        if !adapter.is_file() {
            return Err(Error::BadInput {
                input: format!("supervisor {} v{}", supervisor.supervisor_id, supervisor.supervisor_version),
                message: format!("adapter {} does not exist", adapter.display()),
            });
        }
        if adapter.file_name().is_some_and(|n| n == LORA_FILE) {
            return load_supervisor(
                &self.config.model_dir,
                self.config.variant.as_deref(),
                &self.config.device,
                Some(adapter),
                &self.config.sampling,
            );
        }
        let mut sd = load_supervisor(
            &self.config.model_dir,
            self.config.variant.as_deref(),
            &self.config.device,
            None,
            &self.config.sampling,
        )?;
        load_safetensors(&mut sd.stores.unet, adapter, Strictness::Strict)?;
        Ok(sd)
    }
}

impl Operator for ProxyGenerator {
    fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        _ctx: &mut Context,
        _out: &mut Output,
    ) -> Result<()> {
        for s in Supervisor::from_batch(&batch)? {
            if s.job_id != self.config.job_id || s.subject != self.config.subject {
                return Err(Error::BadInput {
                    input: format!("supervisor {} v{}", s.supervisor_id, s.supervisor_version),
                    message: format!(
                        "is for job `{}` subject `{}`, this generator serves job `{}` subject `{}`",
                        s.job_id, s.subject, self.config.job_id, self.config.subject
                    ),
                });
            }
            self.queue.push(s);
        }
        Ok(())
    }

    fn has_pending_work(&self) -> bool {
        let encoding = self.encoder.as_ref().is_some_and(|e| e.outstanding > 0);
        self.active.is_some() || !self.queue.is_empty() || encoding
    }

    /// Emits the encoded batches that are ready, then samples one batch of the plan (loading the
    /// next supervisor first when needed) and hands it to the encoder; with nothing left to
    /// sample, waits for the next encoded batch.
    fn do_pending_work(&mut self, _ctx: &mut Context, out: &mut Output) -> Result<()> {
        if let Some(encoder) = self.encoder.as_mut() {
            while let Some(batch) = encoder.try_take() {
                out.emit(batch?);
            }
            if self.active.is_none() && self.queue.is_empty() {
                if let Some(batch) = encoder.take() {
                    out.emit(batch?);
                }
                return Ok(());
            }
        }
        if self.active.is_none() {
            let supervisor = self.queue.remove(0);
            let stored = &self.config.stored_seeds;
            let items: Vec<PlanItem> =
                self.config.plan.items().into_iter().filter(|i| !stored.contains(&i.seed)).collect();
            if items.is_empty() {
                tracing::info!("every proxy of the plan is stored already");
                return Ok(());
            }
            let model = self.load(&supervisor)?;
            tracing::info!(supervisor = %supervisor.supervisor_id, version = supervisor.supervisor_version, to_sample = items.len(), "sampling proxies");
            self.active = Some(Active { supervisor, model, items, next: 0 });
        }
        let active = self.active.as_mut().expect("set above");
        let n = self.config.sampling.batch_images.max(1).min(active.items.len() - active.next);
        let items = &active.items[active.next..active.next + n];
        let prompts: Vec<&str> = items.iter().map(|i| i.prompt.as_str()).collect();
        let seeds: Vec<u64> = items.iter().map(|i| i.seed).collect();
        let images = sample_images(&active.model, &prompts, &seeds, &self.config.sampling)?;
        let generated_at_us = now_us();
        let s = &active.supervisor;
        let rows: Vec<Proxy> = items
            .iter()
            .zip(&images)
            .map(|(item, img)| Proxy {
                job_id: s.job_id.clone(),
                subject: s.subject.clone(),
                class_noun: s.class_noun.clone(),
                prompt: item.prompt.clone(),
                prompt_index: item.prompt_index,
                seed: item.seed,
                supervisor_id: s.supervisor_id.clone(),
                supervisor_version: s.supervisor_version,
                image_png: Vec::new(), // the encoder's
                width: img.width(),
                height: img.height(),
                score_dino: None,
                score_clip_i: None,
                score_clip_t: None,
                score_feat_i: None,
                dup_max_cosine: None,
                keep: None,
                reject_reason: None,
                generated_at_us,
                filtered_at_us: None,
            })
            .collect();
        self.generated.increment(n as u64);
        active.next += n;
        if active.next >= active.items.len() {
            self.active = None;
        }
        if self.encoder.is_none() {
            self.encoder = Some(Encoder::start()?);
        }
        let encoder = self.encoder.as_mut().expect("started above");
        if encoder.outstanding >= ENCODING_DEPTH {
            if let Some(batch) = encoder.take() {
                out.emit(batch?);
            }
        }
        encoder.send(Sampled { rows, images })
    }

    /// Every batch already sampled goes out (a drain after a cancel included).
    fn on_close(&mut self, _ctx: &mut Context, out: &mut Output) -> Result<()> {
        if let Some(encoder) = self.encoder.as_mut() {
            while let Some(batch) = encoder.take() {
                out.emit(batch?);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_go_round_robin_with_stable_seeds() {
        let templates = vec!["a {0} {1} on the beach".to_string(), "a {0} {1}".to_string()];
        let mut plan = PromptPlan::from_templates(&templates, "sks", "dog", 2);
        plan.first_seed = 100;
        assert_eq!(plan.prompts(), ["a sks dog", "a sks dog on the beach"]);
        let items = plan.items();
        let got: Vec<(u32, u64)> = items.iter().map(|i| (i.prompt_index, i.seed)).collect();
        assert_eq!(got, [(0, 100), (1, 102), (0, 101), (1, 103)]);
        let empty = PromptPlan { images_per_prompt: 0, ..plan.clone() };
        assert!(empty.validate().unwrap_err().to_string().contains("images_per_prompt"));
    }
}
