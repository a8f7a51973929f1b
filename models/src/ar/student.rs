//! One student interface over the AR families: [`StudentFiles`] names a student's folders and
//! loads what each stage needs from them, behind traits the actors use without knowing the family:
//!
//! - the VQ encoder for the tokenize stage ([`StudentFiles::load_vq_encoder`]);
//! - the caption encoder, for a family that conditions on a text encoder's states (LlamaGen: T5),
//!   whose states of each prompt are computed once and stored ([`Captioner`], [`CaptionStates`]);
//! - the trainable model ([`TrainableStudent`]): examples from token rows, optimiser steps,
//!   checkpoints and the adapter or, fully fine-tuned, every weight;
//! - the sampler for the evaluation ([`StudentSampler`]): a prompt and seeds to images.
//!
//! Chameleon / Lumina-mGPT conditions on its own text tokens (the Lumina-mGPT instruction);
//! LlamaGen on Flan-T5 states of the prompt, prepared as its reference does (120 tokens padded
//! after the text by the tokenizer, then moved to the end with the padding in front, the padded
//! positions masked, the caption dropped for the unconditional embedding with the trainer's
//! condition dropout). This module is the one place outside [`super::vq`] that matches on the
//! family.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::chameleon_vq::ChameleonVqDecoder;
use super::generate::{DrawSource, TokenSampling};
use super::llamagen::{left_padded_captions, LlamaGen, LlamaGenConfig};
use super::llamagen_vq::{LlamaGenVq, LlamaGenVqConfig};
use super::lumina::{sample_image_tokens_batch, t2i_instruction, ImageSampling, LuminaTokens};
use super::train::{ArExample, ArStepLosses, ArTrainConfig, ArTrainer, ChameleonStudent, MicroLosses};
use super::vq::VqEncoder;
use crate::error::{ModelError, Result};
use crate::lora::{load_lora, read_config, save_config, save_lora, LoraConfig, LoraSpec, LoraSwitch};
use crate::tokenizer::hf::{CaptionTokenizer, HfTokenizer};
use crate::transformer::t5::T5Encoder;
use crate::weights::{load_safetensors, load_safetensors_files, Strictness};

pub use super::vq::VqFamily as StudentFamily;

/// The key prefix of the students' adapters (PEFT's layout).
const ADAPTER_PREFIX: &str = "base_model.model";

/// The file a LoRA run writes into its output folder (PEFT's name; `lora_config.json` beside it).
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";

/// The file a fully fine-tuned run writes into its output folder: every weight of the model, under
/// the checkpoint's keys.
pub const FULL_WEIGHTS_FILE: &str = "model.safetensors";

/// What a finished run in `dir` left to sample with: its adapter, else its full weights; the
/// adapter's path when neither is there, so loading it names the file a LoRA run writes.
pub fn trained_weights(dir: &Path) -> PathBuf {
    [ADAPTER_FILE, FULL_WEIGHTS_FILE]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .unwrap_or_else(|| dir.join(ADAPTER_FILE))
}

/// A student's folders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentFiles {
    /// The family.
    #[serde(default)]
    pub family: StudentFamily,
    /// The model: Chameleon's checkpoint (`config.json`, `model.safetensors` or shards with the VQ
    /// encoder inside, `tokenizer.json`), or LlamaGen's GPT (`config.json` with the GPT's
    /// arguments, `model.safetensors`).
    pub dir: PathBuf,
    /// The VQ folder: Chameleon's decoder (`vq_decoder.safetensors`; default `dir`), or LlamaGen's
    /// VQ-16 (`config.json`, `model.safetensors`; required).
    #[serde(default)]
    pub vq_dir: Option<PathBuf>,
    /// The caption encoder a LlamaGen student conditions on: a transformers T5 folder with its
    /// `tokenizer.json`.
    #[serde(default)]
    pub text_encoder_dir: Option<PathBuf>,
    /// Chameleon's Lumina-mGPT structure tokens.
    #[serde(default)]
    pub tokens: LuminaTokens,
}

impl StudentFiles {
    /// A Chameleon / Lumina-mGPT student whose checkpoint holds its VQ decoder too.
    pub fn chameleon(dir: &Path, tokens: LuminaTokens) -> Self {
        StudentFiles {
            family: StudentFamily::Chameleon,
            dir: dir.to_path_buf(),
            vq_dir: None,
            text_encoder_dir: None,
            tokens,
        }
    }

    fn missing(&self, what: &str) -> ModelError {
        ModelError::Config {
            what: format!("student {}", self.dir.display()),
            message: format!("a {:?} student needs {what}", self.family),
        }
    }

    /// The folder of the VQ encoder.
    pub fn vq_encoder_dir(&self) -> Result<&Path> {
        match self.family {
            StudentFamily::Chameleon => Ok(&self.dir),
            StudentFamily::LlamaGen => self.vq_dir.as_deref().ok_or_else(|| self.missing("vq_dir (VQ-16)")),
        }
    }

    /// The folder of the VQ decoder.
    pub fn vq_decoder_dir(&self) -> Result<&Path> {
        match self.family {
            StudentFamily::Chameleon => Ok(self.vq_dir.as_deref().unwrap_or(&self.dir)),
            StudentFamily::LlamaGen => self.vq_encoder_dir(),
        }
    }

    /// The tokenize stage's VQ encoder, frozen, on `device`.
    pub fn load_vq_encoder(&self, device: Device) -> Result<VqEncoder> {
        VqEncoder::load(self.family, self.vq_encoder_dir()?, device)
    }

    /// The caption encoder, for a family that conditions on one (`None` for Chameleon), its
    /// weights in `kind`, with captions as long as the GPT's caption positions.
    pub fn load_captioner(&self, device: Device, kind: Kind) -> Result<Option<Captioner>> {
        match self.family {
            StudentFamily::Chameleon => Ok(None),
            StudentFamily::LlamaGen => {
                let dir =
                    self.text_encoder_dir.as_deref().ok_or_else(|| self.missing("text_encoder_dir (T5)"))?;
                let gpt = llamagen_config(&self.dir)?;
                let (vs, encoder) = T5Encoder::load(dir, device, kind)?;
                let width = encoder.config().d_model;
                if width != gpt.caption_dim {
                    return Err(ModelError::Config {
                        what: format!("text encoder {}", dir.display()),
                        message: format!(
                            "its states are {width}-d, the GPT at {} takes {}-d captions",
                            self.dir.display(),
                            gpt.caption_dim
                        ),
                    });
                }
                let tokenizer = CaptionTokenizer::from_file(
                    &dir.join("tokenizer.json"),
                    gpt.cls_token_num as usize,
                    "<pad>",
                )?;
                Ok(Some(Captioner { tokenizer, encoder, _vs: vs, device }))
            }
        }
    }

    /// The model to fine-tune, with fresh adapters when `lora` is given, its frozen base built in
    /// `kind` (the adapters stay float32).
    pub fn load_trainable(
        &self,
        device: Device,
        lora: Option<&LoraConfig>,
        kind: Kind,
    ) -> Result<Box<dyn TrainableStudent>> {
        match self.family {
            StudentFamily::Chameleon => {
                let student = ChameleonStudent::load_in(&self.dir, device, lora, self.tokens.clone(), kind)?;
                let tokenizer = HfTokenizer::from_file(&self.dir.join("tokenizer.json"))?;
                Ok(Box::new(ChameleonTrainable { student, tokenizer }))
            }
            StudentFamily::LlamaGen => Ok(Box::new(LlamaGenStudent::load(&self.dir, device, lora, kind)?)),
        }
    }

    /// The sampler, with the trained weights at `trained`: a PEFT-layout adapter
    /// ([`ADAPTER_FILE`], its `lora_config.json` beside it), or a fully fine-tuned model's weights
    /// (any other file, [`FULL_WEIGHTS_FILE`] from [`TrainableStudent::save_trained`], loaded over
    /// the base strictly). The model's weights are in bfloat16 when `sampling.bf16` (adapters,
    /// caption encoder and VQ decoder stay float32).
    pub fn load_sampler(
        &self,
        device: Device,
        trained: Option<&Path>,
        sampling: StudentSampling,
    ) -> Result<Box<dyn StudentSampler>> {
        let is_adapter = |p: &&Path| p.file_name().is_some_and(|n| n == ADAPTER_FILE);
        let adapter = trained.filter(is_adapter);
        let full = trained.filter(|p| !is_adapter(p));
        let lora = adapter.map(read_config).transpose()?;
        let kind = if sampling.bf16 { Kind::BFloat16 } else { Kind::Float };
        let version = match adapter {
            Some(a) => format!("{}+{}", self.dir.display(), a.display()),
            None => match full {
                Some(f) => f.display().to_string(),
                None => self.dir.display().to_string(),
            },
        };
        match self.family {
            StudentFamily::Chameleon => {
                let mut student =
                    ChameleonStudent::load_in(&self.dir, device, lora.as_ref(), self.tokens.clone(), kind)?;
                if let (Some(a), Some(cfg)) = (adapter, &lora) {
                    load_lora(&mut student.adapters, cfg, ADAPTER_PREFIX, a)?;
                }
                if let Some(f) = full {
                    load_safetensors(&mut student.base, f, Strictness::Strict)?;
                }
                student.base.freeze();
                let mut decoder_vs = nn::VarStore::new(device);
                let decoder = ChameleonVqDecoder::new(decoder_vs.root(), student.model.vq.config())?;
                load_safetensors(
                    &mut decoder_vs,
                    &self.vq_decoder_dir()?.join("vq_decoder.safetensors"),
                    Strictness::Strict,
                )?;
                let tokenizer = HfTokenizer::from_file(&self.dir.join("tokenizer.json"))?;
                Ok(Box::new(ChameleonSampler {
                    student,
                    tokenizer,
                    decoder,
                    _decoder_vs: decoder_vs,
                    sampling,
                    version,
                }))
            }
            StudentFamily::LlamaGen => {
                let mut student = LlamaGenStudent::load(&self.dir, device, lora.as_ref(), kind)?;
                if let (Some(a), Some(cfg)) = (adapter, &lora) {
                    load_lora(&mut student.adapters, cfg, ADAPTER_PREFIX, a)?;
                }
                if let Some(f) = full {
                    load_safetensors(&mut student.base, f, Strictness::Strict)?;
                }
                student.base.freeze();
                let grid = student.model.config().grid_size;
                if sampling.grid != grid {
                    return Err(ModelError::Config {
                        what: format!("student {}", self.dir.display()),
                        message: format!(
                            "sampling a {0}x{0} grid, the GPT's positions make a {grid}x{grid} one",
                            sampling.grid
                        ),
                    });
                }
                let captioner = self
                    .load_captioner(device, Kind::Float)?
                    .ok_or_else(|| self.missing("a caption encoder"))?;
                let mut vq_vs = nn::VarStore::new(device);
                let vq_dir = self.vq_decoder_dir()?;
                let cfg = LlamaGenVqConfig::from_json(&vq_dir.join("config.json"))?;
                let vq = crate::nn::for_loading(|| LlamaGenVq::new(vq_vs.root(), &cfg))?;
                let files = crate::shapes::weight_files(vq_dir, &["model"], None)?;
                load_safetensors_files(&mut vq_vs, &files, Strictness::Strict)?;
                vq_vs.freeze();
                Ok(Box::new(LlamaGenSampler { student, captioner, vq, _vq_vs: vq_vs, sampling, version }))
            }
        }
    }
}

fn llamagen_config(dir: &Path) -> Result<LlamaGenConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Config {
        what: path.display().to_string(),
        message: format!("cannot read LlamaGen's GPT config: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        what: path.display().to_string(),
        message: format!("not a LlamaGen GPT config: {e}"),
    })
}

/// A prompt's caption-encoder states: the `tokens` valid positions (the text and its `</s>`, no
/// padding), `dim` wide, row-major. The values are bfloat16 numbers held as float32, so the
/// stored form ([`CaptionStates::to_bf16_bytes`]) is exact and a replay trains on what the live
/// run trained on.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptionStates {
    /// Valid positions.
    pub tokens: usize,
    /// Width.
    pub dim: usize,
    /// `tokens · dim` values, each a bfloat16 number.
    pub values: Vec<f32>,
}

impl CaptionStates {
    /// The values as little-endian bfloat16 bytes.
    pub fn to_bf16_bytes(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect()
    }

    /// States from little-endian bfloat16 bytes; `what` names them in an error.
    pub fn from_bf16_bytes(tokens: usize, dim: usize, bytes: &[u8], what: &str) -> Result<Self> {
        if bytes.len() != tokens * dim * 2 {
            return Err(ModelError::Config {
                what: what.into(),
                message: format!("{} bytes of bfloat16 for {tokens} x {dim} states", bytes.len()),
            });
        }
        let values = bytes
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect();
        Ok(CaptionStates { tokens, dim, values })
    }

    /// LlamaGen's captions of `states` for `length` positions: `(features [B, length, D],
    /// mask [B, length])`, the padding in front ([`left_padded_captions`]).
    pub fn left_padded(states: &[&CaptionStates], length: i64, device: Device) -> Result<(Tensor, Tensor)> {
        let dim = states.first().map(|s| s.dim).unwrap_or(0) as i64;
        let b = states.len() as i64;
        let features = Tensor::zeros([b, length, dim], (Kind::Float, Device::Cpu));
        let mask = Tensor::zeros([b, length], (Kind::Int64, Device::Cpu));
        for (i, s) in states.iter().enumerate() {
            let n = s.tokens as i64;
            if s.dim as i64 != dim || n > length || n == 0 {
                return Err(ModelError::Config {
                    what: "caption states".into(),
                    message: format!("{n} x {} states for {length} caption positions of width {dim}", s.dim),
                });
            }
            let i = i as i64;
            features.get(i).narrow(0, 0, n).copy_(&Tensor::from_slice(&s.values).view([n, dim]));
            let _ = mask.get(i).narrow(0, 0, n).fill_(1);
        }
        left_padded_captions(&features.to_device(device), &mask.to_device(device))
    }
}

/// A caption encoder with its tokenizer (LlamaGen's Flan-T5).
pub struct Captioner {
    tokenizer: CaptionTokenizer,
    encoder: T5Encoder,
    _vs: nn::VarStore,
    device: Device,
}

impl std::fmt::Debug for Captioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captioner").field("tokenizer", &self.tokenizer).field("device", &self.device).finish()
    }
}

impl Captioner {
    /// Caption positions.
    pub fn length(&self) -> usize {
        self.tokenizer.max_length()
    }

    /// The states of each prompt (valid positions only), rounded to bfloat16, on the host.
    pub fn encode(&self, prompts: &[&str]) -> Result<Vec<CaptionStates>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, mask) = self.tokenizer.encode_batch(prompts, self.device)?;
        let states = tch::no_grad(|| self.encoder.forward(&ids, Some(&mask)))
            .to_kind(Kind::BFloat16)
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
        let valid: Vec<i64> =
            Vec::try_from(mask.sum_dim_intlist(1, false, Kind::Int64).to_device(Device::Cpu))?;
        let dim = states.size()[2] as usize;
        valid
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let values = Vec::<f32>::try_from(states.get(i as i64).narrow(0, 0, n).flatten(0, -1))?;
                Ok(CaptionStates { tokens: n as usize, dim, values })
            })
            .collect()
    }
}

/// A student being fine-tuned, whatever its family.
pub trait TrainableStudent: Send {
    /// Whether its examples need the prompt's [`CaptionStates`].
    fn needs_captions(&self) -> bool;

    /// The training example of a prompt and its code grid (`rows × cols` codes, row-major),
    /// checked against the model's vocabulary.
    fn example(&self, prompt: &str, codes: &[i32], rows: i64, cols: i64) -> Result<ArExample>;

    /// A trainer for its adapters (re-initialised from the seed) or, without LoRA, every weight.
    fn trainer(&mut self, config: ArTrainConfig) -> Result<ArTrainer>;

    /// One optimiser step over `examples`; `captions[i]` are example `i`'s prompt's states when
    /// [`TrainableStudent::needs_captions`].
    fn train_step(
        &self,
        trainer: &mut ArTrainer,
        examples: &[ArExample],
        captions: &[Option<Arc<CaptionStates>>],
    ) -> Result<ArStepLosses>;

    /// Writes a checkpoint of `trainer`'s state under `root` ([`ArTrainer::save_checkpoint_of`]).
    fn save_checkpoint(&self, trainer: &ArTrainer, root: &Path, data: serde_json::Value) -> Result<PathBuf>;

    /// Writes what the run trained into `dir`: the adapter ([`ADAPTER_FILE`], PEFT layout) and its
    /// config, or without LoRA every weight of the model ([`FULL_WEIGHTS_FILE`]).
    fn save_trained(&self, dir: &Path) -> Result<()>;
}

fn save_trained_files(
    base: &nn::VarStore,
    adapters: &nn::VarStore,
    lora: Option<&LoraConfig>,
    dir: &Path,
) -> Result<()> {
    match lora {
        Some(lora) => {
            save_lora(adapters, lora, ADAPTER_PREFIX, &dir.join(ADAPTER_FILE))?;
            save_config(lora, dir)
        }
        None => crate::weights::save_safetensors(base, &dir.join(FULL_WEIGHTS_FILE)),
    }
}

struct ChameleonTrainable {
    student: ChameleonStudent,
    tokenizer: HfTokenizer,
}

impl TrainableStudent for ChameleonTrainable {
    fn needs_captions(&self) -> bool {
        false
    }

    fn example(&self, prompt: &str, codes: &[i32], rows: i64, cols: i64) -> Result<ArExample> {
        let f = self.student.model.vq.downsample_factor();
        let instruction = t2i_instruction(prompt, (cols * f) as u32, (rows * f) as u32);
        let codes: Vec<i64> = codes.iter().map(|&c| c as i64).collect();
        let image_tokens = Vec::<i64>::try_from(
            self.student.model.image_vocab.codes_to_tokens(&Tensor::from_slice(&codes)),
        )?;
        Ok(ArExample { text_ids: self.tokenizer.encode(&instruction)?, image_tokens, rows, cols })
    }

    fn trainer(&mut self, config: ArTrainConfig) -> Result<ArTrainer> {
        ArTrainer::new(&mut self.student, config)
    }

    fn train_step(
        &self,
        trainer: &mut ArTrainer,
        examples: &[ArExample],
        _captions: &[Option<Arc<CaptionStates>>],
    ) -> Result<ArStepLosses> {
        trainer.train_step(&self.student, examples)
    }

    fn save_checkpoint(&self, trainer: &ArTrainer, root: &Path, data: serde_json::Value) -> Result<PathBuf> {
        trainer.save_checkpoint(&self.student, root, data)
    }

    fn save_trained(&self, dir: &Path) -> Result<()> {
        save_trained_files(&self.student.base, &self.student.adapters, self.student.lora.as_ref(), dir)
    }
}

/// A LlamaGen GPT with its variable stores.
#[derive(Debug)]
pub struct LlamaGenStudent {
    /// The model.
    pub model: LlamaGen,
    /// Base weights (the reference's state dict keys).
    pub base: nn::VarStore,
    /// LoRA adapters (empty without LoRA).
    pub adapters: nn::VarStore,
    /// The adapters' config.
    pub lora: Option<LoraConfig>,
}

impl LlamaGenStudent {
    /// Loads `config.json` (the GPT's arguments) and `model.safetensors` (or shards) from `dir`,
    /// the base built in `kind`, with fresh adapters when `lora` is given.
    pub fn load(dir: &Path, device: Device, lora: Option<&LoraConfig>, kind: Kind) -> Result<Self> {
        let cfg = llamagen_config(dir)?;
        let mut base = nn::VarStore::new(device);
        base.set_kind(kind);
        let adapters = nn::VarStore::new(device);
        let switch = LoraSwitch::default();
        let root = adapters.root();
        let model = crate::nn::for_loading(|| {
            let spec = lora.map(|config| LoraSpec { root: &root, config, switch: &switch });
            LlamaGen::new(base.root(), &cfg, spec)
        })?;
        if let Some(l) = lora {
            if adapters.variables().is_empty() {
                return Err(ModelError::Config {
                    what: "student.target_modules".into(),
                    message: format!(
                        "{:?} match no layer of LlamaGen's GPT (its linear layers: wqkv, wo, w1, w2, w3)",
                        l.target_modules
                    ),
                });
            }
        }
        let files = crate::shapes::weight_files(dir, &["model"], None)?;
        load_safetensors_files(&mut base, &files, Strictness::Strict)?;
        Ok(LlamaGenStudent { model, base, adapters, lora: lora.cloned() })
    }
}

impl TrainableStudent for LlamaGenStudent {
    fn needs_captions(&self) -> bool {
        true
    }

    fn example(&self, _prompt: &str, codes: &[i32], rows: i64, cols: i64) -> Result<ArExample> {
        let c = self.model.config();
        let (vocab, grid) = (c.vocab_size, c.grid_size);
        if rows != grid || cols != grid {
            return Err(ModelError::Config {
                what: "image codes".into(),
                message: format!("a {rows}x{cols} grid, the GPT generates {grid}x{grid}"),
            });
        }
        if let Some(bad) = codes.iter().find(|&&c| c < 0 || c as i64 >= vocab) {
            return Err(ModelError::Config {
                what: "image codes".into(),
                message: format!("code {bad} outside the GPT's {vocab} codes"),
            });
        }
        Ok(ArExample {
            text_ids: Vec::new(),
            image_tokens: codes.iter().map(|&c| c as i64).collect(),
            rows,
            cols,
        })
    }

    fn trainer(&mut self, config: ArTrainConfig) -> Result<ArTrainer> {
        if config.activation_checkpointing || config.loss_chunk_tokens > 0 {
            return Err(ModelError::Config {
                what: "ar_train".into(),
                message:
                    "activation checkpointing and loss chunks are Chameleon's; LlamaGen trains without them"
                        .into(),
            });
        }
        let lora = self.lora.is_some();
        ArTrainer::for_stores(&mut self.base, &self.adapters, lora, config)
    }

    fn train_step(
        &self,
        trainer: &mut ArTrainer,
        examples: &[ArExample],
        captions: &[Option<Arc<CaptionStates>>],
    ) -> Result<ArStepLosses> {
        if examples.len() != trainer.examples_per_step() || captions.len() != examples.len() {
            return Err(ModelError::Config {
                what: "ar_train step".into(),
                message: format!(
                    "{} examples with {} captions, a step takes {}",
                    examples.len(),
                    captions.len(),
                    trainer.examples_per_step()
                ),
            });
        }
        let states: Vec<&CaptionStates> = captions
            .iter()
            .map(|c| {
                c.as_deref().ok_or_else(|| ModelError::Config {
                    what: "ar_train step".into(),
                    message: "a LlamaGen example without its caption states".into(),
                })
            })
            .collect::<Result<_>>()?;
        let (b, dropout) = (trainer.config().batch_size, trainer.config().condition_dropout);
        let device = self.model.device();
        let length = self.model.config().cls_token_num;
        trainer.step_with(|a, draws| {
            let range = a * b..(a + 1) * b;
            let drop: Vec<bool> = range.clone().map(|_| draws.unit() < dropout).collect();
            let (features, mask) = CaptionStates::left_padded(&states[range.clone()], length, device)?;
            let codes: Vec<i64> =
                examples[range].iter().flat_map(|e| e.image_tokens.iter().copied()).collect();
            let codes = Tensor::from_slice(&codes).view([b as i64, -1]).to_device(device);
            let (ce, z) = self.model.losses(&features, Some(&mask), &drop, &codes)?;
            Ok(MicroLosses::Graph(ce, z))
        })
    }

    fn save_checkpoint(&self, trainer: &ArTrainer, root: &Path, data: serde_json::Value) -> Result<PathBuf> {
        trainer.save_checkpoint_of(&self.adapters, self.lora.as_ref(), root, data)
    }

    fn save_trained(&self, dir: &Path) -> Result<()> {
        save_trained_files(&self.base, &self.adapters, self.lora.as_ref(), dir)
    }
}

/// How a student samples an image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSampling {
    /// Code grid side (rows = columns).
    pub grid: i64,
    /// Guidance, top-k, top-p, temperature.
    #[serde(default)]
    pub image: ImageSampling,
    /// Chameleon's structure tokens.
    #[serde(default)]
    pub tokens: LuminaTokens,
    /// Sample with the model's weights in bfloat16 (its adapters and the VQ decoder stay float32).
    #[serde(default)]
    pub bf16: bool,
    /// Images sampled at once, each with its own seed (twice the rows with guidance).
    #[serde(default = "default_batch")]
    pub batch: usize,
}

fn default_batch() -> usize {
    16
}

/// A student that turns a prompt and seeds into images, whatever its family.
pub trait StudentSampler: Send {
    /// What it is: the model folder and its adapter.
    fn version(&self) -> String;

    /// One image per seed, `[B, 3, H, W]` in `[0, 1]` on the host; image `i` depends only on the
    /// prompt and `seeds[i]` (up to the float rounding of a wider batch).
    fn sample(&self, prompt: &str, seeds: &[u64]) -> Result<Tensor>;
}

struct ChameleonSampler {
    student: ChameleonStudent,
    tokenizer: HfTokenizer,
    decoder: ChameleonVqDecoder,
    _decoder_vs: nn::VarStore,
    sampling: StudentSampling,
    version: String,
}

impl StudentSampler for ChameleonSampler {
    fn version(&self) -> String {
        self.version.clone()
    }

    fn sample(&self, prompt: &str, seeds: &[u64]) -> Result<Tensor> {
        let s = &self.sampling;
        let side = (s.grid * self.student.model.vq.downsample_factor()) as u32;
        let text = self.tokenizer.encode(&t2i_instruction(prompt, side, side))?;
        let prompt_ids = s.tokens.prompt_ids(&text);
        let mut images = Vec::with_capacity(seeds.len());
        for chunk in seeds.chunks(s.batch.max(1)) {
            let prompts = vec![prompt_ids.as_slice(); chunk.len()];
            let grids = tch::no_grad(|| {
                sample_image_tokens_batch(
                    &self.student.model,
                    &s.tokens,
                    &prompts,
                    s.grid,
                    s.grid,
                    &s.image,
                    chunk,
                )
            })?;
            let mut codes = Vec::with_capacity(grids.len() * (s.grid * s.grid) as usize);
            for tokens in &grids {
                codes.extend(self.student.model.image_vocab.tokens_to_codes(tokens)?);
            }
            let codes = Tensor::from_slice(&codes)
                .view([chunk.len() as i64, s.grid, s.grid])
                .to_device(self.student.model.device());
            let pixels = tch::no_grad(|| self.decoder.decode(&codes))?;
            images.push(((pixels + 1.0) / 2.0).clamp(0.0, 1.0).to_device(Device::Cpu));
        }
        Ok(Tensor::cat(&images, 0))
    }
}

struct LlamaGenSampler {
    student: LlamaGenStudent,
    captioner: Captioner,
    vq: LlamaGenVq,
    _vq_vs: nn::VarStore,
    sampling: StudentSampling,
    version: String,
}

impl StudentSampler for LlamaGenSampler {
    fn version(&self) -> String {
        self.version.clone()
    }

    fn sample(&self, prompt: &str, seeds: &[u64]) -> Result<Tensor> {
        let s = &self.sampling;
        let model = &self.student.model;
        let device = model.device();
        let states = self.captioner.encode(&[prompt])?.pop().expect("one prompt");
        let token_sampling = TokenSampling {
            greedy: false,
            temperature: s.image.temperature,
            top_k: s.image.image_top_k,
            top_p: s.image.top_p,
            guidance_scale: s.image.guidance_scale,
            draws: DrawSource::Counter,
        };
        let mut images = Vec::with_capacity(seeds.len());
        for chunk in seeds.chunks(s.batch.max(1)) {
            let same = vec![&states; chunk.len()];
            let (features, mask) = CaptionStates::left_padded(&same, model.config().cls_token_num, device)?;
            let grids = model.generate_batch(&features, Some(&mask), &token_sampling, chunk)?;
            let codes: Vec<i64> = grids.into_iter().flatten().collect();
            let codes =
                Tensor::from_slice(&codes).view([chunk.len() as i64, s.grid, s.grid]).to_device(device);
            let pixels = tch::no_grad(|| self.vq.decode(&codes))?;
            images.push(((pixels + 1.0) / 2.0).clamp(0.0, 1.0).to_device(Device::Cpu));
        }
        Ok(Tensor::cat(&images, 0))
    }
}
