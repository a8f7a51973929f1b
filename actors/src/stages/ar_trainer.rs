//! `ar_trainer`: stage 3. Fine-tunes the AR student on VQ token rows *as they arrive*: every row
//! joins a buffer; step `k` draws its examples uniformly (seeded by `k`) from the first
//! `min_rows_to_start + k · rows_per_step` rows, waiting until that many have arrived (or the
//! stream ended). So training starts on the first rows, keeps re-visiting earlier ones (epochs over a
//! growing corpus), and its data is a function of the seed and the arrival order alone: a replay of
//! a stored corpus version reproduces a run, and a resumed run continues it exactly.
//!
//! Checkpoints (`<output_dir>/checkpoints/`) are written every `checkpoint_every` steps, on every
//! barrier and at the end, with the keys of the rows received so far; a restarted job resumes from
//! the newest (weights, optimiser state, step) and checks that its input repeats those rows in the
//! same order (the proxy writer's `replay_stored`) before it steps on. At the end the adapter
//! (PEFT layout), or every weight of a fully fine-tuned student, and `run.json` (steps, losses,
//! rows consumed) are written to `output_dir`.
//!
//! The student is any family behind [`TrainableStudent`]. Input 0 carries the token rows; a
//! student that conditions on caption states (LlamaGen) takes them on any further input, one row
//! per prompt ([`CaptionStates`] from the tokenize stage or the corpus), and a step waits until
//! every row it may draw from has its prompt's states, so the draws stay a function of the seed and
//! the row order alone.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow_array::RecordBatch;
use proxytune_models::ar::student::{self, StudentFiles, TrainableStudent};
use proxytune_models::ar::train::{ArExample, ArTrainConfig, ArTrainer};
use proxytune_models::checkpoint;
use proxytune_models::device::parse_device;
use proxytune_models::lora::LoraConfig;
use proxytune_models::rng::{Draws, Stream};
use proxytune_schemas::{CaptionStates, Table, VqTokens};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::runtime::metrics::TrainMeters;
use crate::runtime::{Context, Metrics, Operator, Output, Signal};

/// Configuration of an [`ArTrainerActor`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArTrainerConfig {
    /// The student's folders and family.
    pub student: StudentFiles,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// LoRA adapters to train; `None` fine-tunes every weight.
    pub lora: Option<LoraConfig>,
    /// The optimisation.
    pub train: ArTrainConfig,
    /// Only rows of this VQ tokenizer are accepted.
    pub tokenizer_id: String,
    /// Only caption rows of this encoder are accepted (a student with a caption encoder).
    #[serde(default)]
    pub caption_encoder_id: Option<String>,
    /// Rows needed before the first step.
    pub min_rows_to_start: usize,
    /// How many more rows each further step may draw from.
    pub rows_per_step: usize,
    /// Where checkpoints, the adapter and `run.json` go.
    pub output_dir: PathBuf,
    /// The corpus table version the rows come from, when the job replays a pinned version
    /// (recorded with the rows consumed; a live stream is identified by the row keys alone).
    #[serde(default)]
    pub corpus_version: Option<u64>,
    /// Write a checkpoint every this many steps (0: only on barriers and at the end).
    #[serde(default)]
    pub checkpoint_every: u64,
}

fn default_device() -> String {
    "cpu".into()
}

/// What the trainer has done (shared with whoever built it).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ArTrainerStats {
    /// Optimiser steps taken (including those restored from a checkpoint).
    pub steps: u64,
    /// Rows received.
    pub rows_received: usize,
    /// Rows received when each step of this run started.
    pub rows_at_step: Vec<usize>,
    /// Total loss of each step of this run.
    pub losses: Vec<f64>,
    /// When each step of this run started (µs since the epoch, UTC).
    pub step_started_us: Vec<i64>,
    /// Checkpoints written.
    pub checkpoints: Vec<PathBuf>,
}

/// The AR student's trainer as an actor.
pub struct ArTrainerActor {
    config: ArTrainerConfig,
    state: Option<(Box<dyn TrainableStudent>, ArTrainer)>,
    /// Key, prompt and example of every row received, in order.
    rows: Vec<(String, String, ArExample)>,
    /// Each prompt's caption states (students that condition on them).
    captions: HashMap<String, Arc<student::CaptionStates>>,
    /// Keys of the rows the resumed checkpoint had received, which the input must repeat.
    resumed_keys: Vec<String>,
    input_closed: bool,
    stats: Arc<Mutex<ArTrainerStats>>,
    meters: TrainMeters,
}

impl ArTrainerActor {
    /// A trainer; the returned handle shows its progress.
    pub fn new(config: ArTrainerConfig, metrics: &Metrics) -> Result<(Self, Arc<Mutex<ArTrainerStats>>)> {
        if config.min_rows_to_start == 0 {
            return Err(Error::BadInput {
                input: "ar_trainer.min_rows_to_start".into(),
                message: "must be at least 1".into(),
            });
        }
        let meters = metrics.trainer("student", &["cross_entropy", "z_loss", "total"]);
        let stats = Arc::new(Mutex::new(ArTrainerStats::default()));
        let actor = ArTrainerActor {
            config,
            state: None,
            rows: Vec::new(),
            captions: HashMap::new(),
            resumed_keys: Vec::new(),
            input_closed: false,
            stats: stats.clone(),
            meters,
        };
        Ok((actor, stats))
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.config.output_dir.join("checkpoints")
    }

    /// Rows step `k` may draw from, if they have arrived.
    fn window(&self, k: u64) -> Option<usize> {
        let wanted = self.config.min_rows_to_start + k as usize * self.config.rows_per_step;
        if self.rows.len() >= wanted {
            Some(wanted)
        } else if self.input_closed && !self.rows.is_empty() {
            Some(self.rows.len())
        } else {
            None
        }
    }

    /// The first of the first `n` rows whose prompt has no caption states yet, for a student
    /// that needs them.
    fn uncaptioned(&self, n: usize) -> Option<&str> {
        let (student, _) = self.state.as_ref()?;
        if !student.needs_captions() {
            return None;
        }
        self.rows[..n].iter().map(|(_, p, _)| p.as_str()).find(|p| !self.captions.contains_key(*p))
    }

    fn ready(&self) -> bool {
        match &self.state {
            Some((_, trainer)) => {
                !trainer.finished()
                    && self.window(trainer.step_count()).is_some_and(|n| self.uncaptioned(n).is_none())
            }
            None => false,
        }
    }

    fn step(&mut self) -> Result<()> {
        let k = self.state.as_ref().expect("started").1.step_count();
        let n = self.window(k).expect("ready() checked");
        let (student, trainer) = self.state.as_mut().expect("started");
        let picks = Draws::new(trainer.config().seed, Stream::Shuffle, k)
            .below(n as u64, trainer.examples_per_step());
        let picked: Vec<&(String, String, ArExample)> =
            picks.iter().map(|&i| &self.rows[i as usize]).collect();
        let batch: Vec<ArExample> = picked.iter().map(|r| r.2.clone()).collect();
        let captions: Vec<_> = picked.iter().map(|r| self.captions.get(&r.1).cloned()).collect();
        let (t0, started_us) = (Instant::now(), proxytune_schemas::now_us());
        let losses = student.train_step(trainer, &batch, &captions)?;
        self.meters.record(
            &[losses.cross_entropy, losses.z_loss, losses.total],
            losses.learning_rate,
            t0.elapsed().as_secs_f64(),
        );
        let mut stats = self.stats.lock().expect("trainer stats");
        stats.steps = losses.step;
        stats.rows_at_step.push(self.rows.len());
        stats.losses.push(losses.total);
        stats.step_started_us.push(started_us);
        drop(stats);
        let every = self.config.checkpoint_every;
        if every > 0 && losses.step % every == 0 {
            self.save_checkpoint()?;
        }
        Ok(())
    }

    fn data_position(&self) -> serde_json::Value {
        serde_json::json!({
            "corpus_version": self.config.corpus_version,
            "rows_received": self.rows.len(),
            "row_keys": self.rows.iter().map(|(k, _, _)| k.as_str()).collect::<Vec<_>>(),
        })
    }

    fn save_checkpoint(&self) -> Result<()> {
        let (student, trainer) = self.state.as_ref().expect("started");
        let path = student.save_checkpoint(trainer, &self.checkpoints_dir(), self.data_position())?;
        self.stats.lock().expect("trainer stats").checkpoints.push(path);
        Ok(())
    }
}

impl ArTrainerActor {
    /// Caption rows (any input after the first): each prompt's states, under the configured encoder.
    fn take_captions(&mut self, batch: &RecordBatch) -> Result<()> {
        for row in CaptionStates::from_batch(batch)? {
            let input = || format!("captions row {}", row.key());
            if self.config.caption_encoder_id.as_deref() != Some(row.encoder_id.as_str()) {
                return Err(Error::BadInput {
                    input: input(),
                    message: format!(
                        "encoder `{}`, this student takes {:?}",
                        row.encoder_id, self.config.caption_encoder_id
                    ),
                });
            }
            let states = student::CaptionStates::from_bf16_bytes(
                row.tokens as usize,
                row.dim as usize,
                &row.states_bf16,
                &input(),
            )?;
            self.captions.insert(row.prompt, Arc::new(states));
        }
        Ok(())
    }
}

impl Operator for ArTrainerActor {
    fn on_start(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        let c = &self.config;
        let device = parse_device(&c.device)?;
        // A bf16 run's frozen base is built in bfloat16, never in float32.
        let kind = c.train.precision.kind();
        let mut student = c.student.load_trainable(device, c.lora.as_ref(), kind)?;
        if student.needs_captions() && c.caption_encoder_id.is_none() {
            return Err(Error::BadInput {
                input: "ar_trainer.caption_encoder_id".into(),
                message: "the student conditions on caption states, whose encoder must be named".into(),
            });
        }
        let mut trainer = student.trainer(c.train.clone())?;
        if let Some(ckpt) = checkpoint::latest(&self.checkpoints_dir())? {
            let state = trainer.resume(&ckpt)?;
            self.resumed_keys = state.data["row_keys"]
                .as_array()
                .map(|keys| keys.iter().filter_map(|k| k.as_str().map(String::from)).collect())
                .unwrap_or_default();
            tracing::info!(checkpoint = %ckpt.display(), step = state.step, rows = self.resumed_keys.len(), "student training resumes");
        }
        self.stats.lock().expect("trainer stats").steps = trainer.step_count();
        self.state = Some((student, trainer));
        Ok(())
    }

    fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        _ctx: &mut Context,
        _out: &mut Output,
    ) -> Result<()> {
        if input > 0 {
            return self.take_captions(&batch);
        }
        let (student, _) = self.state.as_ref().expect("started");
        for row in VqTokens::from_batch(&batch)? {
            if row.tokenizer_id != self.config.tokenizer_id {
                return Err(Error::BadInput {
                    input: format!("vq_tokens row {}", row.proxy_key),
                    message: format!(
                        "tokenizer `{}`, this student takes `{}`",
                        row.tokenizer_id, self.config.tokenizer_id
                    ),
                });
            }
            let (rows, cols) = (row.grid_height as i64, row.grid_width as i64);
            let key = row.key().to_string();
            let example = student.example(&row.prompt, &row.tokens, rows, cols).map_err(|e| {
                Error::BadInput { input: format!("vq_tokens row {key}"), message: e.to_string() }
            })?;
            if let Some(expected) = self.resumed_keys.get(self.rows.len()) {
                if *expected != key {
                    return Err(Error::BadInput {
                        input: format!("vq_tokens row {key}"),
                        message: format!(
                            "row {} of the resumed run, where the checkpoint had {expected}: the input does not repeat the checkpoint's data",
                            self.rows.len()
                        ),
                    });
                }
            }
            self.rows.push((key, row.prompt, example));
        }
        self.stats.lock().expect("trainer stats").rows_received = self.rows.len();
        Ok(())
    }

    fn has_pending_work(&self) -> bool {
        self.ready()
    }

    fn do_pending_work(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        self.step()
    }

    fn on_signal(&mut self, signal: Signal, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        match signal {
            Signal::Barrier { .. } => self.save_checkpoint(),
            _ => Ok(()),
        }
    }

    fn on_close(&mut self, ctx: &mut Context, _out: &mut Output) -> Result<()> {
        if self.rows.len() < self.resumed_keys.len() && !ctx.stop_requested() {
            return Err(Error::BadInput {
                input: format!("the resumed run's input ({} rows)", self.rows.len()),
                message: format!(
                    "ended before repeating the {} rows the checkpoint had received",
                    self.resumed_keys.len()
                ),
            });
        }
        self.input_closed = true;
        while self.ready() && !ctx.stop_requested() {
            self.step()?;
        }
        if let Some(prompt) = self.uncaptioned(self.rows.len()) {
            if !ctx.stop_requested() {
                return Err(Error::BadInput {
                    input: format!("the student's input ({} rows)", self.rows.len()),
                    message: format!("ended without the caption states of the prompt {prompt:?}"),
                });
            }
        }
        self.save_checkpoint()?;
        let (student, trainer) = self.state.as_ref().expect("started");
        student.save_trained(&self.config.output_dir)?;
        let stats = self.stats.lock().expect("trainer stats").clone();
        let run = serde_json::json!({
            "steps": trainer.step_count(),
            "finished": trainer.finished(),
            "last": trainer.last_losses(),
            "data": self.data_position(),
            "losses_this_run": stats.losses,
            "step_started_us_this_run": stats.step_started_us,
        });
        let path = self.config.output_dir.join("run.json");
        std::fs::write(&path, serde_json::to_string_pretty(&run).expect("run serialises"))
            .map_err(|source| Error::Io { path, source })?;
        Ok(())
    }
}
