//! Stage 3: fine-tuning the AR student on (prompt, image tokens) examples with the next-token loss
//! on the image sequence (the prompt is context only), as Lumina-mGPT trains: optional z-loss
//! (`z_loss_weight · mean(logsumexp(logits)²)` over predicted positions), condition dropout (the
//! example without its prompt, i.e. the text-free prompt guidance samples against), LoRA or full
//! fine-tuning, AdamW with warm-up, gradient accumulation and clipping, bf16 mixed precision for
//! LoRA, checkpoints with exact resume ([`crate::checkpoint`]).
//!
//! The trainer takes the examples of each optimiser step from its caller (the `ArTrainer` actor owns
//! the stream and its shuffle buffer); every random draw of micro-step `k` comes from `(seed, k)`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::chameleon::{Chameleon, ChameleonConfig};
use super::lumina::LuminaTokens;
use crate::checkpoint;
use crate::diffusion::dreambooth::Precision;
use crate::error::{ModelError, Result};
use crate::lora::{reset_lora, save_lora, LoraConfig, LoraSpec, LoraSwitch};
use crate::optim::{AdamW, AdamWConfig};
use crate::rng::{Draws, Stream};
use crate::weights::{load_safetensors_files, Strictness};

/// A Chameleon student with its variable stores.
#[derive(Debug)]
pub struct ChameleonStudent {
    /// The model.
    pub model: Chameleon,
    /// Base weights (`model.*`, `lm_head.*`).
    pub base: nn::VarStore,
    /// LoRA adapters (empty without LoRA).
    pub adapters: nn::VarStore,
    /// The adapters' config.
    pub lora: Option<LoraConfig>,
    /// The T2I structure tokens.
    pub tokens: LuminaTokens,
}

impl ChameleonStudent {
    /// Loads `config.json` + `model.safetensors` from `dir` (transformers layout), with fresh LoRA
    /// adapters when `lora` is given.
    pub fn load(dir: &Path, device: Device, lora: Option<&LoraConfig>, tokens: LuminaTokens) -> Result<Self> {
        Self::load_in(dir, device, lora, tokens, Kind::Float)
    }

    /// Like [`ChameleonStudent::load`], the frozen base built directly in `kind` (bfloat16 for a
    /// bf16 LoRA run: never materialised in float32); the adapters stay float32.
    pub fn load_in(
        dir: &Path,
        device: Device,
        lora: Option<&LoraConfig>,
        tokens: LuminaTokens,
        kind: Kind,
    ) -> Result<Self> {
        let cfg = ChameleonConfig::from_json(&dir.join("config.json"))?;
        let mut base = nn::VarStore::new(device);
        base.set_kind(kind); // new variables are made in this kind
        let adapters = nn::VarStore::new(device);
        let spec = lora.map(|config| (adapters.root(), config));
        let switch = LoraSwitch::default(); // the student's adapters are always on
                                            // Every base variable comes from the files: built without drawing initial values.
        let model = crate::nn::for_loading(|| {
            let spec = spec.as_ref().map(|(root, config)| LoraSpec { root, config, switch: &switch });
            Chameleon::new(base.root(), &cfg, spec)
        })?;
        let files = crate::shapes::weight_files(dir, &["model"], None)?;
        load_safetensors_files(&mut base, &files, Strictness::Strict)?;
        Ok(ChameleonStudent { model, base, adapters, lora: lora.cloned(), tokens })
    }
}

/// One training example: the instruction's token ids and the image's token grid.
#[derive(Clone, Debug, PartialEq)]
pub struct ArExample {
    /// Text token ids of the instruction (without `<s>` and the separator).
    pub text_ids: Vec<i64>,
    /// Image-token ids (vocabulary ids), row-major.
    pub image_tokens: Vec<i64>,
    /// Grid rows.
    pub rows: i64,
    /// Grid columns.
    pub cols: i64,
}

/// AR fine-tuning hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArTrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW.
    pub adam: AdamWConfig,
    /// Linear warm-up steps.
    pub lr_warmup_steps: u64,
    /// Optimiser steps.
    pub max_train_steps: u64,
    /// Examples per micro-step.
    pub batch_size: usize,
    /// Micro-steps per optimiser step.
    pub gradient_accumulation_steps: u64,
    /// Gradient-norm clip.
    pub max_grad_norm: f64,
    /// Weight of the z-loss (Lumina-mGPT uses 1e-5; 0 disables it).
    pub z_loss_weight: f64,
    /// Probability of dropping an example's prompt (so guidance has an unconditional model).
    pub condition_dropout: f64,
    /// Precision (bf16 needs LoRA).
    pub precision: Precision,
    /// Seed of every draw.
    pub seed: u64,
    /// Checkpoints to keep.
    pub checkpoints_to_keep: usize,
    /// Recompute each decoder layer's activations in the backward instead of keeping them
    /// ([`crate::recompute`]): memory for one more forward.
    pub activation_checkpointing: bool,
    /// Positions whose logits the loss materialises at once (0: the whole sequence). The full
    /// vocabulary's float32 logits of a 2,350-token Lumina-mGPT sequence are 0.6 GB an example;
    /// in chunks the loss holds one chunk's.
    pub loss_chunk_tokens: usize,
}

impl Default for ArTrainConfig {
    fn default() -> Self {
        ArTrainConfig {
            learning_rate: 1e-4,
            adam: AdamWConfig { weight_decay: 0.1, ..Default::default() },
            lr_warmup_steps: 0,
            max_train_steps: 1000,
            batch_size: 4,
            gradient_accumulation_steps: 1,
            max_grad_norm: 4.0,
            z_loss_weight: 1e-5,
            condition_dropout: 0.1,
            precision: Precision::F32,
            seed: 0,
            checkpoints_to_keep: 2,
            activation_checkpointing: false,
            loss_chunk_tokens: 0,
        }
    }
}

/// What one micro-step of [`ArTrainer::step_with`] hands back.
#[derive(Debug)]
pub enum MicroLosses {
    /// The cross-entropy and the z-loss on their graph: the trainer runs the backward.
    Graph(Tensor, Tensor),
    /// The values of a micro-step that ran its own backward, of
    /// `(cross_entropy + z_loss_weight · z_loss) / gradient_accumulation_steps`.
    Done {
        /// Next-token cross-entropy.
        cross_entropy: f64,
        /// z-loss (before weighting).
        z_loss: f64,
    },
}

/// Losses of one optimiser step (means over its micro-steps).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArStepLosses {
    /// Step number (1-based).
    pub step: u64,
    /// Next-token cross-entropy over predicted positions.
    pub cross_entropy: f64,
    /// z-loss term (before weighting).
    pub z_loss: f64,
    /// `cross_entropy + z_loss_weight · z_loss`.
    pub total: f64,
    /// Learning rate used.
    pub learning_rate: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// What `state.json` of an AR checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArCheckpointState {
    /// Optimiser steps taken.
    pub step: u64,
    /// RNG position: the next micro-step's counter.
    pub next_micro_step: u64,
    /// Data position, as the caller reports it (e.g. examples consumed, corpus version).
    pub data: serde_json::Value,
    /// Whether LoRA adapters are trained.
    pub lora: bool,
    /// The run's config.
    pub config: ArTrainConfig,
    /// The last step's losses.
    pub last: Option<ArStepLosses>,
}

/// The AR fine-tuning loop.
#[derive(Debug)]
pub struct ArTrainer {
    config: ArTrainConfig,
    optimizer: AdamW,
    lora: bool,
    step: u64,
    last: Option<ArStepLosses>,
}

impl ArTrainer {
    /// A trainer for `student`'s adapters (re-initialised from the seed) or, without LoRA, all its
    /// weights. Under bf16 the frozen base is converted to bfloat16 here.
    pub fn new(student: &mut ChameleonStudent, config: ArTrainConfig) -> Result<Self> {
        let lora = student.lora.is_some();
        Self::for_stores(&mut student.base, &student.adapters, lora, config)
    }

    /// A trainer over any student's stores: the adapters when `lora` (re-initialised from the
    /// seed), else the base.
    pub fn for_stores(
        base: &mut nn::VarStore,
        adapters: &nn::VarStore,
        lora: bool,
        config: ArTrainConfig,
    ) -> Result<Self> {
        let bad = |what: &str, message: &str| ModelError::Config {
            what: format!("ar_train.{what}"),
            message: message.into(),
        };
        if config.batch_size == 0 || config.gradient_accumulation_steps == 0 {
            return Err(bad("batch_size", "batch_size and gradient_accumulation_steps must be at least 1"));
        }
        if !(0.0..1.0).contains(&config.condition_dropout) {
            return Err(bad("condition_dropout", "must be in [0, 1)"));
        }
        if lora {
            base.freeze();
            reset_lora(adapters, config.seed)?;
        }
        if config.precision == Precision::Bf16 {
            if !lora {
                return Err(bad(
                    "precision",
                    "bf16 trains LoRA adapters over a bfloat16 base; full fine-tuning runs in f32",
                ));
            }
            base.bfloat16();
        }
        let trained = if lora { adapters } else { &*base };
        let optimizer = AdamW::new(trained.variables().into_iter().collect(), config.adam);
        Ok(ArTrainer { config, optimizer, lora, step: 0, last: None })
    }

    /// Optimiser steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// True once `max_train_steps` are done.
    pub fn finished(&self) -> bool {
        self.step >= self.config.max_train_steps
    }

    /// Examples one optimiser step consumes.
    pub fn examples_per_step(&self) -> usize {
        self.config.batch_size * self.config.gradient_accumulation_steps as usize
    }

    /// The config.
    pub fn config(&self) -> &ArTrainConfig {
        &self.config
    }

    /// The trained parameters, by name.
    pub fn params(&self) -> &[(String, Tensor)] {
        self.optimizer.params()
    }

    /// The last step's losses.
    pub fn last_losses(&self) -> Option<ArStepLosses> {
        self.last
    }

    /// Input ids and labels `[B, T]` (right-padded; labels −100 on context and padding) of examples.
    pub fn batch(
        student: &ChameleonStudent,
        examples: &[ArExample],
        drop_prompt: &[bool],
    ) -> Result<(Tensor, Tensor)> {
        let t = &student.tokens;
        let mut rows = Vec::with_capacity(examples.len());
        for (e, &drop) in examples.iter().zip(drop_prompt) {
            let image = t.image_sequence(&e.image_tokens, e.rows, e.cols)?;
            student.model.image_vocab.tokens_to_codes(&e.image_tokens)?;
            let prompt = if drop { Vec::new() } else { t.prompt_ids(&e.text_ids) };
            rows.push(t.training_example(&prompt, &image));
        }
        let longest = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let pad = student.model.config().pad_token_id.unwrap_or(0);
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        for (i, l) in rows {
            let extra = longest - i.len();
            ids.extend(i.into_iter().chain(std::iter::repeat_n(pad, extra)));
            labels.extend(l.into_iter().chain(std::iter::repeat_n(-100, extra)));
        }
        let b = examples.len() as i64;
        let device = student.model.device();
        Ok((
            Tensor::from_slice(&ids).view([b, -1]).to_device(device),
            Tensor::from_slice(&labels).view([b, -1]).to_device(device),
        ))
    }

    /// The next-token cross-entropy and z-loss of `ids` against `labels` (shifted by one).
    pub fn losses(student: &ChameleonStudent, ids: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = student.model.forward(ids, None, None)?.to_kind(Kind::Float);
        let t = logits.size()[1];
        let logits = logits.narrow(1, 0, t - 1).flatten(0, 1); // [B(T-1), V]
        let targets = labels.narrow(1, 1, t - 1).flatten(0, 1); // [B(T-1)]
        let valid = targets.ne(-100);
        let ce = logits.cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Mean, -100, 0.0);
        let lse = logits.logsumexp([-1], false);
        let z = lse.square().masked_select(&valid).mean(Kind::Float);
        Ok((ce, z))
    }

    /// The losses of [`ArTrainer::losses`] with their backward run here, weighted by `scale`
    /// (`(ce + z_weight · z) · scale`): with `recompute`, each layer is recomputed in the backward
    /// ([`crate::recompute`]); with `chunk > 0` the logits exist `chunk` positions at a time.
    /// Returns the values `(ce, z)`. The gradients equal the plain backward's up to float rounding.
    pub fn backward_losses(
        student: &ChameleonStudent,
        ids: &Tensor,
        labels: &Tensor,
        recompute: bool,
        chunk: usize,
        z_weight: f64,
        scale: f64,
    ) -> Result<(f64, f64)> {
        let model = &student.model;
        let segments = model.segments(ids)?;
        let t = ids.size2()?.1;
        let targets = labels.narrow(1, 1, t - 1); // [B, T-1]
        let n = targets.ne(-100).sum(Kind::Int64).int64_value(&[]) as f64;
        let chunk = if chunk == 0 { t - 1 } else { chunk as i64 };
        crate::recompute::backward(&segments, vec![ids.shallow_clone()], recompute, |ends| {
            let hidden = ends[0].narrow(1, 0, t - 1);
            let (mut ce, mut z) = (0.0, 0.0);
            let mut start = 0;
            while start < t - 1 {
                let len = chunk.min(t - 1 - start);
                let logits = model.head(&hidden.narrow(1, start, len)).to_kind(Kind::Float).flatten(0, 1);
                let wanted = targets.narrow(1, start, len).flatten(0, 1);
                let ce_sum =
                    logits.cross_entropy_loss::<Tensor>(&wanted, None, tch::Reduction::Sum, -100, 0.0);
                let z_sum =
                    logits.logsumexp([-1], false).square().masked_select(&wanted.ne(-100)).sum(Kind::Float);
                ((&ce_sum + &z_sum * z_weight) * (scale / n)).f_backward()?;
                ce += ce_sum.double_value(&[]) / n;
                z += z_sum.double_value(&[]) / n;
                start += len;
            }
            Ok((ce, z))
        })
    }

    /// One optimiser step over `examples` (exactly [`examples_per_step`](Self::examples_per_step)).
    /// A non-finite loss is an error naming the step; the weights stay as they were.
    pub fn train_step(&mut self, student: &ChameleonStudent, examples: &[ArExample]) -> Result<ArStepLosses> {
        if examples.len() != self.examples_per_step() {
            return Err(ModelError::Config {
                what: "ar_train step".into(),
                message: format!("{} examples, a step takes {}", examples.len(), self.examples_per_step()),
            });
        }
        let c = &self.config;
        let (b, dropout) = (c.batch_size, c.condition_dropout);
        let (recompute, loss_chunk) = (c.activation_checkpointing, c.loss_chunk_tokens);
        let (z_weight, scale) = (c.z_loss_weight, 1.0 / c.gradient_accumulation_steps as f64);
        self.step_with(|a, draws| {
            let chunk = &examples[a * b..(a + 1) * b];
            let drop: Vec<bool> = (0..chunk.len()).map(|_| draws.unit() < dropout).collect();
            let (ids, labels) = Self::batch(student, chunk, &drop)?;
            if !recompute && loss_chunk == 0 {
                let (ce, z) = Self::losses(student, &ids, &labels)?;
                return Ok(MicroLosses::Graph(ce, z));
            }
            let (cross_entropy, z_loss) =
                Self::backward_losses(student, &ids, &labels, recompute, loss_chunk, z_weight, scale)?;
            Ok(MicroLosses::Done { cross_entropy, z_loss })
        })
    }

    /// One optimiser step whose micro-step `a` losses come from `micro(a, draws)`, `draws`
    /// seeded by the run's seed and the micro-step number: the model-agnostic part (accumulation,
    /// clipping, warm-up, AdamW, NaN checks).
    pub fn step_with(
        &mut self,
        mut micro: impl FnMut(usize, &mut Draws) -> Result<MicroLosses>,
    ) -> Result<ArStepLosses> {
        let accum = self.config.gradient_accumulation_steps;
        self.optimizer.zero_grad();
        let (mut sum_ce, mut sum_z, mut sum_t) = (0.0, 0.0, 0.0);
        for a in 0..accum {
            let k = self.step * accum + a;
            let mut draws = Draws::new(self.config.seed, Stream::Train, k);
            let (ce, z, value) = match micro(a as usize, &mut draws)? {
                MicroLosses::Graph(ce, z) => {
                    let total = &ce + &z * self.config.z_loss_weight;
                    let value = total.double_value(&[]);
                    if value.is_finite() {
                        (total / accum as f64).backward();
                    }
                    (ce.double_value(&[]), z.double_value(&[]), value)
                }
                MicroLosses::Done { cross_entropy, z_loss } => {
                    (cross_entropy, z_loss, cross_entropy + z_loss * self.config.z_loss_weight)
                }
            };
            if !value.is_finite() {
                self.optimizer.zero_grad();
                return Err(ModelError::NonFiniteLoss { step: self.step + 1, loss: value });
            }
            sum_ce += ce;
            sum_z += z;
            sum_t += value;
        }
        let (lr, grad_norm) = self.optimizer.clipped_step(
            self.config.max_grad_norm,
            self.config.learning_rate,
            self.config.lr_warmup_steps,
        )?;
        self.step += 1;
        let n = accum as f64;
        let losses = ArStepLosses {
            step: self.step,
            cross_entropy: sum_ce / n,
            z_loss: sum_z / n,
            total: sum_t / n,
            learning_rate: lr,
            grad_norm,
        };
        self.last = Some(losses);
        Ok(losses)
    }

    /// Writes `checkpoint-<step>/` under `root` (with the LoRA in PEFT's key layout,
    /// `adapter_model.safetensors`, and its `lora_config.json`, when training adapters); `data` is
    /// the caller's data position.
    pub fn save_checkpoint(
        &self,
        student: &ChameleonStudent,
        root: &Path,
        data: serde_json::Value,
    ) -> Result<PathBuf> {
        self.save_checkpoint_of(&student.adapters, student.lora.as_ref(), root, data)
    }

    /// [`ArTrainer::save_checkpoint`] for any student: its adapters' store and config.
    pub fn save_checkpoint_of(
        &self,
        adapters: &nn::VarStore,
        lora: Option<&LoraConfig>,
        root: &Path,
        data: serde_json::Value,
    ) -> Result<PathBuf> {
        let state = ArCheckpointState {
            step: self.step,
            next_micro_step: self.step * self.config.gradient_accumulation_steps,
            data,
            lora: self.lora,
            config: self.config.clone(),
            last: self.last,
        };
        checkpoint::save(
            root,
            self.step,
            self.config.checkpoints_to_keep,
            &self.optimizer,
            None,
            &state,
            |dir| match lora {
                Some(lora) => {
                    save_lora(adapters, lora, "base_model.model", &dir.join("adapter_model.safetensors"))?;
                    // With its config beside it, the checkpoint's adapter loads on its own.
                    crate::lora::save_config(lora, dir)
                }
                None => Ok(()),
            },
        )
    }

    /// Restores weights, optimiser state and step from a checkpoint and returns its state (the
    /// caller restores its data position from `data`). A different seed, batch size or
    /// accumulation is refused, naming the field.
    pub fn resume(&mut self, checkpoint: &Path) -> Result<ArCheckpointState> {
        let state: ArCheckpointState = checkpoint::read_state(checkpoint)?;
        let (saved, ours) = (&state.config, &self.config);
        let fields = [
            ("seed", saved.seed == ours.seed),
            ("batch_size", saved.batch_size == ours.batch_size),
            (
                "gradient_accumulation_steps",
                saved.gradient_accumulation_steps == ours.gradient_accumulation_steps,
            ),
        ];
        checkpoint::same_settings(checkpoint, "ar_train", &fields)?;
        if state.lora != self.lora {
            return Err(ModelError::Config {
                what: checkpoint.display().to_string(),
                message: "the checkpoint trained a different set of weights (LoRA vs full)".into(),
            });
        }
        checkpoint::restore(checkpoint, &mut self.optimizer, state.step, None)?;
        self.step = state.step;
        self.last = state.last;
        Ok(state)
    }
}
