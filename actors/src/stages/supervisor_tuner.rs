//! `supervisor_tuner`: stage 1 of Proxy-Tuning. DreamBooth-tunes the supervisor (LoRA, or the full
//! UNet) on the subject's reference photos while the class prior images stream in on its input
//! (from a [`ClassPriorSampler`](crate::stages::class_prior_sampler::ClassPriorSampler) or a corpus replay);
//! a step runs as soon as the class images it needs have arrived. When the input ends it trains the
//! remaining steps, exports the adapter (a LoRA in diffusers' layout, `pytorch_lora_weights.safetensors`
//! beside `lora_config.json`, or the full UNet's weights) and emits one `supervisors` row: the
//! "supervisor ready" message that starts the
//! [`ProxyGenerator`](crate::stages::proxy_generator::ProxyGenerator).
//!
//! Its model is its own, or the one copy it shares with the class-prior sampler
//! ([`SupervisorTuner::sharing`]): the two take turns, a training step or a sampler call at a time.
//!
//! Checkpoints go to `<output_dir>/checkpoints/` every `dreambooth.checkpoint_every` steps and when
//! the job is cancelled; a restarted job resumes from the newest one, bit-identically. Validation
//! images go to `<output_dir>/validation/step-<n>/`. A non-finite loss fails the job naming the
//! step; the last good checkpoint stays.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow_array::RecordBatch;
use metrics::Counter;
use proxytune_models::diffusion::dreambooth::{
    latest_checkpoint, DreamBoothConfig, DreamBoothTrainer, LORA_FILE,
};

use proxytune_models::lora::LoraConfig;
use proxytune_models::weights::save_safetensors;
use proxytune_schemas::{now_us, ClassPriorImage, MetricName, Supervisor, Table};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::runtime::metrics::TrainMeters;
use crate::runtime::{Context, Metrics, Operator, Output};
use crate::stages::diffusion_sampling::{lock, SharedSupervisor, SupervisorCopy};
use crate::stages::intake::{encode_png, images_to_square_batch, tensor_to_rgb};

/// Configuration of a [`SupervisorTuner`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorTunerConfig {
    /// Job id.
    pub job_id: String,
    /// Subject name.
    pub subject: String,
    /// Class noun; class prior rows of another class are refused.
    pub class_noun: String,
    /// The base model folder (diffusers layout).
    pub model_dir: PathBuf,
    /// Weight-file variant of the folder (`fp16`), when not the plain files.
    #[serde(default)]
    pub variant: Option<String>,
    /// Id of the base model (recorded in the supervisor row).
    pub model_id: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// LoRA adapters to train; `None` fine-tunes the whole UNet.
    pub lora: Option<LoraConfig>,
    /// The DreamBooth hyper-parameters (prompts, steps, optimiser, checkpoints, validation).
    pub dreambooth: DreamBoothConfig,
    /// Training resolution (references and class images are resized to this square).
    pub resolution: u32,
    /// Where checkpoints, validation images and the exported adapter go.
    pub output_dir: PathBuf,
    /// Encode the training images one per VAE call.
    #[serde(default)]
    pub vae_slicing: bool,
}

fn default_device() -> String {
    "cpu".into()
}

/// What the tuner has done (shared with whoever built it).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SupervisorTunerStats {
    /// Optimiser steps taken (including those restored from a checkpoint).
    pub steps: u64,
    /// Total loss (instance plus weighted prior) of each step of this run.
    pub losses: Vec<f64>,
    /// When each step of this run started (µs since the epoch, UTC).
    pub step_started_us: Vec<i64>,
}

struct Meters {
    train: TrainMeters,
    validation_images: Counter,
}

/// The DreamBooth stage as an actor.
pub struct SupervisorTuner {
    config: SupervisorTunerConfig,
    references: Vec<image::RgbImage>,
    state: Option<(SupervisorCopy, DreamBoothTrainer)>,
    shared: Option<SharedSupervisor>,
    meters: Meters,
    stats: Arc<Mutex<SupervisorTunerStats>>,
}

impl SupervisorTuner {
    /// A tuner for the subject's `references` (3–6 photos). The model loads on the actor's
    /// thread when the job starts.
    pub fn new(
        config: SupervisorTunerConfig,
        references: Vec<image::RgbImage>,
        metrics: &Metrics,
    ) -> Result<Self> {
        if references.is_empty() {
            return Err(Error::BadInput {
                input: format!("subject `{}`", config.subject),
                message: "no reference images".into(),
            });
        }
        let meters = Meters {
            train: metrics.trainer("supervisor", &["instance", "prior", "total"]),
            validation_images: metrics.counter(MetricName::GeneratedImages, "kind", "validation"),
        };
        Ok(SupervisorTuner { config, references, state: None, shared: None, meters, stats: Arc::default() })
    }

    /// Trains on `shared`, the copy the class-prior sampler also draws from, instead of loading
    /// a copy of its own.
    pub fn sharing(mut self, shared: SharedSupervisor) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Lets the model go (a shared copy lives on while the sampler holds it).
    fn release(&mut self) {
        self.state = None;
        self.shared = None;
    }

    /// Its steps and losses so far, readable while the job runs.
    pub fn stats(&self) -> Arc<Mutex<SupervisorTunerStats>> {
        self.stats.clone()
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.config.output_dir.join("checkpoints")
    }

    /// Images in `[-1, 1]` at the training resolution.
    fn pixels(resolution: u32, images: &[image::RgbImage], device: tch::Device) -> Result<tch::Tensor> {
        Ok(images_to_square_batch(images, resolution as i64, device)? * 2.0 - 1.0)
    }

    /// Whether the next step's data is there.
    fn ready(&self) -> bool {
        self.state.as_ref().is_some_and(|(_, trainer)| trainer.ready())
    }

    /// One optimiser step, with its metrics, checkpoint and validation when due.
    fn step(&mut self) -> Result<()> {
        let checkpoints = self.checkpoints_dir();
        let validation_dir = self.config.output_dir.join("validation");
        let (model, trainer) = self.state.as_mut().expect("started");
        let model = lock(model)?;
        let (t0, started_us) = (Instant::now(), now_us());
        let losses = trainer.train_step(&model)?;
        {
            let mut stats = self.stats.lock().expect("tuner stats");
            stats.steps = losses.step;
            stats.losses.push(losses.total);
            stats.step_started_us.push(started_us);
        }
        self.meters.train.record(
            &[losses.instance, losses.prior, losses.total],
            losses.learning_rate,
            t0.elapsed().as_secs_f64(),
        );
        let every = trainer.config().checkpoint_every;
        if every > 0 && losses.step % every == 0 {
            trainer.save_checkpoint(&model, &checkpoints)?;
        }
        if trainer.validation_due() {
            let dir = validation_dir.join(format!("step-{:08}", losses.step));
            std::fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
            let images = trainer.validate(&model)?;
            for (i, v) in images.iter().enumerate() {
                let path = dir.join(format!("{i:03}-seed{}.png", v.seed));
                std::fs::write(&path, encode_png(&tensor_to_rgb(&v.image)?))
                    .map_err(|source| Error::Io { path, source })?;
            }
            self.meters.validation_images.increment(images.len() as u64);
        }
        Ok(())
    }

    /// Exports the trained weights and returns the supervisor row.
    fn export(&self) -> Result<Supervisor> {
        let (model, trainer) = self.state.as_ref().expect("started");
        let model = lock(model)?;
        trainer.apply_ema()?;
        let dir = &self.config.output_dir;
        let adapter = match &self.config.lora {
            Some(lora) => {
                let path = dir.join(LORA_FILE);
                proxytune_models::lora::save_lora(&model.stores.unet_lora, lora, "unet", &path)?;
                proxytune_models::lora::save_config(lora, dir)?;
                path
            }
            None => {
                let path = dir.join("unet").join("diffusion_pytorch_model.safetensors");
                save_safetensors(&model.stores.unet, &path)?;
                path
            }
        };
        let c = &self.config;
        Ok(Supervisor {
            job_id: c.job_id.clone(),
            subject: c.subject.clone(),
            class_noun: c.class_noun.clone(),
            instance_prompt: c.dreambooth.instance_prompt.clone(),
            supervisor_id: format!("{}/{}/dreambooth", c.job_id, c.subject),
            supervisor_version: trainer.step_count(),
            base_model: c.model_id.clone(),
            adapter_path: adapter.display().to_string(),
            train_steps: trainer.step_count(),
            final_loss: trainer.last_losses().map(|l| l.total as f32),
            created_at_us: now_us(),
        })
    }
}

impl Operator for SupervisorTuner {
    fn on_start(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        let c = &self.config;
        // The one load of the tuner's model, shared with the sampler or its own.
        let copy = self.shared.clone().unwrap_or_else(|| SharedSupervisor::for_tuner(c)).get()?;
        let mut trainer = {
            let mut model = lock(&copy)?;
            let mut trainer = DreamBoothTrainer::new(&mut model, c.dreambooth.clone())?;
            let device = model.device();
            trainer.set_instance_images(&model, &Self::pixels(c.resolution, &self.references, device)?)?;
            trainer
        };
        if let Some(checkpoint) = latest_checkpoint(&self.checkpoints_dir())? {
            trainer.resume(&checkpoint)?;
            tracing::info!(subject = %c.subject, checkpoint = %checkpoint.display(), step = trainer.step_count(), "supervisor tuning resumes");
        }
        self.stats.lock().expect("tuner stats").steps = trainer.step_count();
        self.state = Some((copy, trainer));
        Ok(())
    }

    fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        _ctx: &mut Context,
        _out: &mut Output,
    ) -> Result<()> {
        let rows = ClassPriorImage::from_batch(&batch)?;
        if let Some(r) = rows.iter().find(|r| r.class_noun != self.config.class_noun) {
            return Err(Error::BadInput {
                input: format!("class prior image (seed {})", r.seed),
                message: format!(
                    "class `{}`, this subject's class is `{}`",
                    r.class_noun, self.config.class_noun
                ),
            });
        }
        let images = rows
            .iter()
            .map(|r| {
                image::load_from_memory(&r.image_png).map(|i| i.to_rgb8()).map_err(|e| Error::BadInput {
                    input: format!("class prior image (seed {})", r.seed),
                    message: format!("not a decodable image: {e}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (model, trainer) = self.state.as_mut().expect("started");
        let model = lock(model)?;
        let pixels = Self::pixels(self.config.resolution, &images, model.device())?;
        trainer.add_class_images(&model, &pixels)?;
        Ok(())
    }

    /// Steps run between inputs, one per call, as soon as their class images are in.
    fn has_pending_work(&self) -> bool {
        self.ready()
    }

    fn do_pending_work(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        self.step()
    }

    fn on_close(&mut self, ctx: &mut Context, out: &mut Output) -> Result<()> {
        self.state.as_mut().expect("started").1.close_class_images();
        while self.ready() && !ctx.stop_requested() {
            self.step()?;
        }
        let checkpoints = self.checkpoints_dir();
        let (model, trainer) = self.state.as_ref().expect("started");
        trainer.save_checkpoint(&*lock(model)?, &checkpoints)?;
        if !trainer.finished() {
            // Cancelled (or the prior stream ended with no class image while prior preservation
            // is on): the checkpoint lets a restarted job continue; no supervisor is ready.
            tracing::warn!(subject = %self.config.subject, step = trainer.step_count(), "supervisor tuning stopped before its last step");
            self.release();
            return Ok(());
        }
        let supervisor = self.export()?;
        // Freed before the generator, which loads the model with this adapter, hears of it.
        self.release();
        out.emit(Supervisor::to_batch(&[supervisor])?);
        Ok(())
    }
}
