//! The typed rows of every proxytune table and stream, with their schemas and row keys.
//!
//! | table | one row is | key |
//! |---|---|---|
//! | `references` | one reference photo of a subject | job, subject, image index |
//! | `class_priors` | one prior-preservation image of the bare class | job, class, prompt, seed, model |
//! | `supervisors` | one tuned supervisor (adapter) of a subject | job, subject, supervisor id, version |
//! | `proxies` | one supervisor sample of the subject, with its scores and verdict | job, subject, prompt, seed, supervisor version |
//! | `vq_tokens` | the VQ token grid of one proxy under one tokenizer | proxy key, tokenizer |
//! | `captions` | a prompt's caption-encoder states (LlamaGen's T5) | prompt, encoder |
//! | `eval_samples` | one evaluation image of a model on a DreamBench prompt | job, role, model version, subject, prompt, sample |
//!
//! Images travel as PNG bytes (`LargeBinary`) with their width and height; times are
//! microseconds since the epoch (UTC).

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::columns::*;
use crate::error::{Result, SchemaError};
use crate::key::RowKey;
use crate::table::Table;
use crate::KEY_COLUMN;

fn key_field() -> arrow_schema::Field {
    field(KEY_COLUMN, DataType::Utf8, false)
}

fn build(table: &'static str, schema: SchemaRef, columns: Vec<arrow_array::ArrayRef>) -> Result<RecordBatch> {
    RecordBatch::try_new(schema, columns).map_err(|source| SchemaError::Arrow { table, source })
}

fn keys<T: Table>(rows: &[T]) -> Vec<RowKey> {
    rows.iter().map(Table::key).collect()
}

/// One reference photo of the subject, as given by the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceImage {
    /// Job that owns the subject.
    pub job_id: String,
    /// Subject name (e.g. `dog2`).
    pub subject: String,
    /// Class noun (e.g. `dog`).
    pub class_noun: String,
    /// Index of the photo within the subject (0-based).
    pub image_index: u32,
    /// Where the photo came from (file name or upload name).
    pub source: String,
    /// The photo as PNG.
    pub image_png: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// When the row was created (µs since the epoch, UTC).
    pub created_at_us: i64,
}

impl Table for ReferenceImage {
    const NAME: &'static str = "references";

    fn schema() -> SchemaRef {
        static S: OnceLock<SchemaRef> = OnceLock::new();
        S.get_or_init(|| {
            schema(vec![
                key_field(),
                field("job_id", DataType::Utf8, false),
                field("subject", DataType::Utf8, false),
                field("class_noun", DataType::Utf8, false),
                field("image_index", DataType::UInt32, false),
                field("source", DataType::Utf8, false),
                field("image_png", DataType::LargeBinary, false),
                field("width", DataType::UInt32, false),
                field("height", DataType::UInt32, false),
                field("created_at", timestamp_type(), false),
            ])
        })
        .clone()
    }

    fn key(&self) -> RowKey {
        RowKey::new([
            ("job", self.job_id.clone()),
            ("subject", self.subject.clone()),
            ("image", self.image_index.to_string()),
        ])
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let keys = keys(rows);
        build(
            Self::NAME,
            Self::schema(),
            vec![
                utf8(keys.iter().map(RowKey::as_str)),
                utf8(rows.iter().map(|r| r.job_id.as_str())),
                utf8(rows.iter().map(|r| r.subject.as_str())),
                utf8(rows.iter().map(|r| r.class_noun.as_str())),
                u32s(rows.iter().map(|r| r.image_index)),
                utf8(rows.iter().map(|r| r.source.as_str())),
                large_binary(rows.iter().map(|r| r.image_png.as_slice())),
                u32s(rows.iter().map(|r| r.width)),
                u32s(rows.iter().map(|r| r.height)),
                timestamps(rows.iter().map(|r| r.created_at_us)),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>> {
        let batch = Self::conform(batch)?;
        let c = Columns::new(Self::NAME, &batch);
        let (job, subject, class) = (c.utf8("job_id")?, c.utf8("subject")?, c.utf8("class_noun")?);
        let (index, source, png) = (c.u32("image_index")?, c.utf8("source")?, c.large_binary("image_png")?);
        let (width, height, created) = (c.u32("width")?, c.u32("height")?, c.timestamp("created_at")?);
        Ok((0..batch.num_rows())
            .map(|i| ReferenceImage {
                job_id: job.value(i).to_string(),
                subject: subject.value(i).to_string(),
                class_noun: class.value(i).to_string(),
                image_index: index.value(i),
                source: source.value(i).to_string(),
                image_png: png.value(i).to_vec(),
                width: width.value(i),
                height: height.value(i),
                created_at_us: created.value(i),
            })
            .collect())
    }
}

/// One prior-preservation image: the *untuned* supervisor's sample of the bare class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassPriorImage {
    /// Job that uses the image.
    pub job_id: String,
    /// Class noun (e.g. `dog`).
    pub class_noun: String,
    /// Prompt it was sampled from (e.g. `a dog`).
    pub prompt: String,
    /// Sampling seed.
    pub seed: u64,
    /// Id of the base (untuned) model that sampled it.
    pub model_id: String,
    /// The image as PNG.
    pub image_png: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// When it was generated (µs since the epoch, UTC).
    pub created_at_us: i64,
}

impl Table for ClassPriorImage {
    const NAME: &'static str = "class_priors";

    fn schema() -> SchemaRef {
        static S: OnceLock<SchemaRef> = OnceLock::new();
        S.get_or_init(|| {
            schema(vec![
                key_field(),
                field("job_id", DataType::Utf8, false),
                field("class_noun", DataType::Utf8, false),
                field("prompt", DataType::Utf8, false),
                field("seed", DataType::UInt64, false),
                field("model_id", DataType::Utf8, false),
                field("image_png", DataType::LargeBinary, false),
                field("width", DataType::UInt32, false),
                field("height", DataType::UInt32, false),
                field("created_at", timestamp_type(), false),
            ])
        })
        .clone()
    }

    fn key(&self) -> RowKey {
        RowKey::new([
            ("job", self.job_id.clone()),
            ("class", self.class_noun.clone()),
            ("prompt", self.prompt.clone()),
            ("seed", self.seed.to_string()),
            ("model", self.model_id.clone()),
        ])
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let keys = keys(rows);
        build(
            Self::NAME,
            Self::schema(),
            vec![
                utf8(keys.iter().map(RowKey::as_str)),
                utf8(rows.iter().map(|r| r.job_id.as_str())),
                utf8(rows.iter().map(|r| r.class_noun.as_str())),
                utf8(rows.iter().map(|r| r.prompt.as_str())),
                u64s(rows.iter().map(|r| r.seed)),
                utf8(rows.iter().map(|r| r.model_id.as_str())),
                large_binary(rows.iter().map(|r| r.image_png.as_slice())),
                u32s(rows.iter().map(|r| r.width)),
                u32s(rows.iter().map(|r| r.height)),
                timestamps(rows.iter().map(|r| r.created_at_us)),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>> {
        let batch = Self::conform(batch)?;
        let c = Columns::new(Self::NAME, &batch);
        let (job, class, prompt) = (c.utf8("job_id")?, c.utf8("class_noun")?, c.utf8("prompt")?);
        let (seed, model, png) = (c.u64("seed")?, c.utf8("model_id")?, c.large_binary("image_png")?);
        let (width, height, created) = (c.u32("width")?, c.u32("height")?, c.timestamp("created_at")?);
        Ok((0..batch.num_rows())
            .map(|i| ClassPriorImage {
                job_id: job.value(i).to_string(),
                class_noun: class.value(i).to_string(),
                prompt: prompt.value(i).to_string(),
                seed: seed.value(i),
                model_id: model.value(i).to_string(),
                image_png: png.value(i).to_vec(),
                width: width.value(i),
                height: height.value(i),
                created_at_us: created.value(i),
            })
            .collect())
    }
}

/// One tuned supervisor: the adapter stage 1 produced for a subject. Emitted as the "supervisor
/// ready" message that starts proxy generation, and stored so proxies can name their sampler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Supervisor {
    /// Job that tuned it.
    pub job_id: String,
    /// Subject name.
    pub subject: String,
    /// Class noun.
    pub class_noun: String,
    /// The prompt binding the subject (e.g. `a sks dog`).
    pub instance_prompt: String,
    /// Id of the adapter (e.g. `<job>/<subject>/dreambooth`).
    pub supervisor_id: String,
    /// Its version (the optimiser step it was saved at).
    pub supervisor_version: u64,
    /// The base model it adapts (model folder or id).
    pub base_model: String,
    /// Where the adapter lives (a LoRA file in diffusers' layout, or a UNet checkpoint).
    pub adapter_path: String,
    /// Optimiser steps trained.
    pub train_steps: u64,
    /// The last step's total loss.
    pub final_loss: Option<f32>,
    /// When it was saved (µs since the epoch, UTC).
    pub created_at_us: i64,
}

impl Table for Supervisor {
    const NAME: &'static str = "supervisors";

    fn schema() -> SchemaRef {
        static S: OnceLock<SchemaRef> = OnceLock::new();
        S.get_or_init(|| {
            schema(vec![
                key_field(),
                field("job_id", DataType::Utf8, false),
                field("subject", DataType::Utf8, false),
                field("class_noun", DataType::Utf8, false),
                field("instance_prompt", DataType::Utf8, false),
                field("supervisor_id", DataType::Utf8, false),
                field("supervisor_version", DataType::UInt64, false),
                field("base_model", DataType::Utf8, false),
                field("adapter_path", DataType::Utf8, false),
                field("train_steps", DataType::UInt64, false),
                field("final_loss", DataType::Float32, true),
                field("created_at", timestamp_type(), false),
            ])
        })
        .clone()
    }

    fn key(&self) -> RowKey {
        RowKey::new([
            ("job", self.job_id.clone()),
            ("subject", self.subject.clone()),
            ("supervisor", self.supervisor_id.clone()),
            ("version", self.supervisor_version.to_string()),
        ])
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let keys = keys(rows);
        build(
            Self::NAME,
            Self::schema(),
            vec![
                utf8(keys.iter().map(RowKey::as_str)),
                utf8(rows.iter().map(|r| r.job_id.as_str())),
                utf8(rows.iter().map(|r| r.subject.as_str())),
                utf8(rows.iter().map(|r| r.class_noun.as_str())),
                utf8(rows.iter().map(|r| r.instance_prompt.as_str())),
                utf8(rows.iter().map(|r| r.supervisor_id.as_str())),
                u64s(rows.iter().map(|r| r.supervisor_version)),
                utf8(rows.iter().map(|r| r.base_model.as_str())),
                utf8(rows.iter().map(|r| r.adapter_path.as_str())),
                u64s(rows.iter().map(|r| r.train_steps)),
                opt_f32s(rows.iter().map(|r| r.final_loss)),
                timestamps(rows.iter().map(|r| r.created_at_us)),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>> {
        let batch = Self::conform(batch)?;
        let c = Columns::new(Self::NAME, &batch);
        let (job, subject, class) = (c.utf8("job_id")?, c.utf8("subject")?, c.utf8("class_noun")?);
        let (prompt, id, version) =
            (c.utf8("instance_prompt")?, c.utf8("supervisor_id")?, c.u64("supervisor_version")?);
        let (base, adapter, steps) = (c.utf8("base_model")?, c.utf8("adapter_path")?, c.u64("train_steps")?);
        let (loss, created) = (c.f32("final_loss")?, c.timestamp("created_at")?);
        Ok((0..batch.num_rows())
            .map(|i| Supervisor {
                job_id: job.value(i).to_string(),
                subject: subject.value(i).to_string(),
                class_noun: class.value(i).to_string(),
                instance_prompt: prompt.value(i).to_string(),
                supervisor_id: id.value(i).to_string(),
                supervisor_version: version.value(i),
                base_model: base.value(i).to_string(),
                adapter_path: adapter.value(i).to_string(),
                train_steps: steps.value(i),
                final_loss: opt(loss, i, || loss.value(i)),
                created_at_us: created.value(i),
            })
            .collect())
    }
}

/// Why the Filter rejected a proxy. Stored as its snake_case label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Too far from the subject's reference images.
    LowFidelity,
    /// Too far from its prompt.
    LowPromptAdherence,
    /// Too close to an already-kept proxy.
    NearDuplicate,
    /// The image could not be decoded or has the wrong size.
    InvalidImage,
}

impl RejectReason {
    /// Every reason, in a fixed order (for metrics and reports).
    pub const ALL: [RejectReason; 4] = [
        RejectReason::LowFidelity,
        RejectReason::LowPromptAdherence,
        RejectReason::NearDuplicate,
        RejectReason::InvalidImage,
    ];

    /// The stored label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::LowFidelity => "low_fidelity",
            RejectReason::LowPromptAdherence => "low_prompt_adherence",
            RejectReason::NearDuplicate => "near_duplicate",
            RejectReason::InvalidImage => "invalid_image",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RejectReason {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        RejectReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown reject reason `{s}`"))
    }
}

/// One proxy image: a sample of the tuned supervisor, its scores and the Filter's verdict.
/// Scores and verdict are `None` until the Filter has seen the proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proxy {
    /// Job that generated it.
    pub job_id: String,
    /// Subject name.
    pub subject: String,
    /// Class noun.
    pub class_noun: String,
    /// Prompt it was sampled from (with the identifier token, e.g. `a sks dog on the beach`).
    pub prompt: String,
    /// Index of the prompt in the job's prompt plan.
    pub prompt_index: u32,
    /// Sampling seed.
    pub seed: u64,
    /// Id of the tuned supervisor (adapter) that sampled it.
    pub supervisor_id: String,
    /// Version of that supervisor.
    pub supervisor_version: u64,
    /// The image as PNG.
    pub image_png: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// DINO similarity to the references (mean cosine).
    pub score_dino: Option<f32>,
    /// CLIP-I similarity to the references (mean cosine).
    pub score_clip_i: Option<f32>,
    /// CLIP-T similarity to the prompt (identifier removed).
    pub score_clip_t: Option<f32>,
    /// FEAT-I similarity to the references (an ImageNet CNN's features; never called DINO).
    pub score_feat_i: Option<f32>,
    /// Highest cosine to an already-kept proxy (near-duplicate check).
    pub dup_max_cosine: Option<f32>,
    /// The Filter's verdict; `None` before filtering.
    pub keep: Option<bool>,
    /// Why it was rejected, when `keep == Some(false)`.
    pub reject_reason: Option<RejectReason>,
    /// When it was generated (µs since the epoch, UTC).
    pub generated_at_us: i64,
    /// When the Filter judged it.
    pub filtered_at_us: Option<i64>,
}

impl Table for Proxy {
    const NAME: &'static str = "proxies";

    fn schema() -> SchemaRef {
        static S: OnceLock<SchemaRef> = OnceLock::new();
        S.get_or_init(|| {
            schema(vec![
                key_field(),
                field("job_id", DataType::Utf8, false),
                field("subject", DataType::Utf8, false),
                field("class_noun", DataType::Utf8, false),
                field("prompt", DataType::Utf8, false),
                field("prompt_index", DataType::UInt32, false),
                field("seed", DataType::UInt64, false),
                field("supervisor_id", DataType::Utf8, false),
                field("supervisor_version", DataType::UInt64, false),
                field("image_png", DataType::LargeBinary, false),
                field("width", DataType::UInt32, false),
                field("height", DataType::UInt32, false),
                field("score_dino", DataType::Float32, true),
                field("score_clip_i", DataType::Float32, true),
                field("score_clip_t", DataType::Float32, true),
                field("score_feat_i", DataType::Float32, true),
                field("dup_max_cosine", DataType::Float32, true),
                field("keep", DataType::Boolean, true),
                field("reject_reason", DataType::Utf8, true),
                field("generated_at", timestamp_type(), false),
                field("filtered_at", timestamp_type(), true),
            ])
        })
        .clone()
    }

    fn key(&self) -> RowKey {
        RowKey::new([
            ("job", self.job_id.clone()),
            ("subject", self.subject.clone()),
            ("prompt", self.prompt.clone()),
            ("seed", self.seed.to_string()),
            ("supervisor", format!("{}@{}", self.supervisor_id, self.supervisor_version)),
        ])
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let keys = keys(rows);
        build(
            Self::NAME,
            Self::schema(),
            vec![
                utf8(keys.iter().map(RowKey::as_str)),
                utf8(rows.iter().map(|r| r.job_id.as_str())),
                utf8(rows.iter().map(|r| r.subject.as_str())),
                utf8(rows.iter().map(|r| r.class_noun.as_str())),
                utf8(rows.iter().map(|r| r.prompt.as_str())),
                u32s(rows.iter().map(|r| r.prompt_index)),
                u64s(rows.iter().map(|r| r.seed)),
                utf8(rows.iter().map(|r| r.supervisor_id.as_str())),
                u64s(rows.iter().map(|r| r.supervisor_version)),
                large_binary(rows.iter().map(|r| r.image_png.as_slice())),
                u32s(rows.iter().map(|r| r.width)),
                u32s(rows.iter().map(|r| r.height)),
                opt_f32s(rows.iter().map(|r| r.score_dino)),
                opt_f32s(rows.iter().map(|r| r.score_clip_i)),
                opt_f32s(rows.iter().map(|r| r.score_clip_t)),
                opt_f32s(rows.iter().map(|r| r.score_feat_i)),
                opt_f32s(rows.iter().map(|r| r.dup_max_cosine)),
                opt_bools(rows.iter().map(|r| r.keep)),
                opt_utf8(rows.iter().map(|r| r.reject_reason.map(RejectReason::as_str))),
                timestamps(rows.iter().map(|r| r.generated_at_us)),
                opt_timestamps(rows.iter().map(|r| r.filtered_at_us)),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>> {
        let batch = Self::conform(batch)?;
        let c = Columns::new(Self::NAME, &batch);
        let (job, subject, class) = (c.utf8("job_id")?, c.utf8("subject")?, c.utf8("class_noun")?);
        let (prompt, prompt_index, seed) = (c.utf8("prompt")?, c.u32("prompt_index")?, c.u64("seed")?);
        let (sup_id, sup_version) = (c.utf8("supervisor_id")?, c.u64("supervisor_version")?);
        let (png, width, height) = (c.large_binary("image_png")?, c.u32("width")?, c.u32("height")?);
        let (dino, clip_i, clip_t) = (c.f32("score_dino")?, c.f32("score_clip_i")?, c.f32("score_clip_t")?);
        let (feat_i, dup) = (c.f32("score_feat_i")?, c.f32("dup_max_cosine")?);
        let (keep, reason) = (c.boolean("keep")?, c.utf8("reject_reason")?);
        let (generated, filtered) = (c.timestamp("generated_at")?, c.timestamp("filtered_at")?);
        (0..batch.num_rows())
            .map(|i| {
                let reject_reason = match opt(reason, i, || reason.value(i)) {
                    None => None,
                    Some(label) => Some(label.parse().map_err(|m| c.invalid("reject_reason", i, m))?),
                };
                Ok(Proxy {
                    job_id: job.value(i).to_string(),
                    subject: subject.value(i).to_string(),
                    class_noun: class.value(i).to_string(),
                    prompt: prompt.value(i).to_string(),
                    prompt_index: prompt_index.value(i),
                    seed: seed.value(i),
                    supervisor_id: sup_id.value(i).to_string(),
                    supervisor_version: sup_version.value(i),
                    image_png: png.value(i).to_vec(),
                    width: width.value(i),
                    height: height.value(i),
                    score_dino: opt(dino, i, || dino.value(i)),
                    score_clip_i: opt(clip_i, i, || clip_i.value(i)),
                    score_clip_t: opt(clip_t, i, || clip_t.value(i)),
                    score_feat_i: opt(feat_i, i, || feat_i.value(i)),
                    dup_max_cosine: opt(dup, i, || dup.value(i)),
                    keep: opt(keep, i, || keep.value(i)),
                    reject_reason,
                    generated_at_us: generated.value(i),
                    filtered_at_us: opt(filtered, i, || filtered.value(i)),
                })
            })
            .collect()
    }
}

/// The VQ token grid of one proxy under one tokenizer (cached so a replay does not re-encode).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VqTokens {
    /// Canonical key of the proxy the tokens encode.
    pub proxy_key: String,
    /// Job that produced them.
    pub job_id: String,
    /// Subject of the proxy.
    pub subject: String,
    /// The proxy's prompt (what the student learns to condition on).
    pub prompt: String,
    /// Id (and version) of the VQ tokenizer.
    pub tokenizer_id: String,
    /// Token grid height.
    pub grid_height: u32,
    /// Token grid width.
    pub grid_width: u32,
    /// Codebook indices, row-major, `grid_height * grid_width` of them.
    pub tokens: Vec<i32>,
    /// When they were computed (µs since the epoch, UTC).
    pub created_at_us: i64,
}

impl Table for VqTokens {
    const NAME: &'static str = "vq_tokens";

    fn schema() -> SchemaRef {
        static S: OnceLock<SchemaRef> = OnceLock::new();
        S.get_or_init(|| {
            schema(vec![
                key_field(),
                field("proxy_key", DataType::Utf8, false),
                field("job_id", DataType::Utf8, false),
                field("subject", DataType::Utf8, false),
                field("prompt", DataType::Utf8, false),
                field("tokenizer_id", DataType::Utf8, false),
                field("grid_height", DataType::UInt32, false),
                field("grid_width", DataType::UInt32, false),
                field("tokens", token_list_type(), false),
                field("created_at", timestamp_type(), false),
            ])
        })
        .clone()
    }

    fn key(&self) -> RowKey {
        RowKey::new([("proxy", self.proxy_key.clone()), ("tokenizer", self.tokenizer_id.clone())])
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let keys = keys(rows);
        build(
            Self::NAME,
            Self::schema(),
            vec![
                utf8(keys.iter().map(RowKey::as_str)),
                utf8(rows.iter().map(|r| r.proxy_key.as_str())),
                utf8(rows.iter().map(|r| r.job_id.as_str())),
                utf8(rows.iter().map(|r| r.subject.as_str())),
                utf8(rows.iter().map(|r| r.prompt.as_str())),
                utf8(rows.iter().map(|r| r.tokenizer_id.as_str())),
                u32s(rows.iter().map(|r| r.grid_height)),
                u32s(rows.iter().map(|r| r.grid_width)),
                token_lists(rows.iter().map(|r| r.tokens.as_slice())),
                timestamps(rows.iter().map(|r| r.created_at_us)),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>> {
        let batch = Self::conform(batch)?;
        let c = Columns::new(Self::NAME, &batch);
        let (proxy, job, tokenizer) = (c.utf8("proxy_key")?, c.utf8("job_id")?, c.utf8("tokenizer_id")?);
        let (subject, prompt) = (c.utf8("subject")?, c.utf8("prompt")?);
        let (gh, gw, tokens) = (c.u32("grid_height")?, c.u32("grid_width")?, c.list("tokens")?);
        let created = c.timestamp("created_at")?;
        (0..batch.num_rows())
            .map(|i| {
                let list = tokens.value(i);
                let values = list
                    .as_any()
                    .downcast_ref::<arrow_array::Int32Array>()
                    .ok_or_else(|| c.invalid("tokens", i, "list items are not Int32"))?;
                let (h, w) = (gh.value(i), gw.value(i));
                if values.len() != (h as usize) * (w as usize) {
                    return Err(c.invalid(
                        "tokens",
                        i,
                        format!("{} tokens for a {h}x{w} grid", values.len()),
                    ));
                }
                Ok(VqTokens {
                    proxy_key: proxy.value(i).to_string(),
                    job_id: job.value(i).to_string(),
                    subject: subject.value(i).to_string(),
                    prompt: prompt.value(i).to_string(),
                    tokenizer_id: tokenizer.value(i).to_string(),
                    grid_height: h,
                    grid_width: w,
                    tokens: values.values().to_vec(),
                    created_at_us: created.value(i),
                })
            })
            .collect()
    }
}

/// A prompt's caption-encoder states under one encoder (LlamaGen's Flan-T5), computed once per
/// prompt and stored so a replay does not re-encode: the valid positions only (the text and its
/// end token), little-endian bfloat16, row-major `[tokens, dim]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptionStates {
    /// The prompt.
    pub prompt: String,
    /// Id (and version) of the caption encoder.
    pub encoder_id: String,
    /// Job that computed them.
    pub job_id: String,
    /// Valid positions.
    pub tokens: u32,
    /// Width of a state.
    pub dim: u32,
    /// `tokens · dim` bfloat16 values, little-endian.
    pub states_bf16: Vec<u8>,
    /// When they were computed (µs since the epoch, UTC).
    pub created_at_us: i64,
}

impl Table for CaptionStates {
    const NAME: &'static str = "captions";

    fn schema() -> SchemaRef {
        static S: OnceLock<SchemaRef> = OnceLock::new();
        S.get_or_init(|| {
            schema(vec![
                key_field(),
                field("prompt", DataType::Utf8, false),
                field("encoder_id", DataType::Utf8, false),
                field("job_id", DataType::Utf8, false),
                field("tokens", DataType::UInt32, false),
                field("dim", DataType::UInt32, false),
                field("states_bf16", DataType::LargeBinary, false),
                field("created_at", timestamp_type(), false),
            ])
        })
        .clone()
    }

    fn key(&self) -> RowKey {
        RowKey::new([("prompt", self.prompt.clone()), ("encoder", self.encoder_id.clone())])
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let keys = keys(rows);
        build(
            Self::NAME,
            Self::schema(),
            vec![
                utf8(keys.iter().map(RowKey::as_str)),
                utf8(rows.iter().map(|r| r.prompt.as_str())),
                utf8(rows.iter().map(|r| r.encoder_id.as_str())),
                utf8(rows.iter().map(|r| r.job_id.as_str())),
                u32s(rows.iter().map(|r| r.tokens)),
                u32s(rows.iter().map(|r| r.dim)),
                large_binary(rows.iter().map(|r| r.states_bf16.as_slice())),
                timestamps(rows.iter().map(|r| r.created_at_us)),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>> {
        let batch = Self::conform(batch)?;
        let c = Columns::new(Self::NAME, &batch);
        let (prompt, encoder, job) = (c.utf8("prompt")?, c.utf8("encoder_id")?, c.utf8("job_id")?);
        let (tokens, dim, states) = (c.u32("tokens")?, c.u32("dim")?, c.large_binary("states_bf16")?);
        let created = c.timestamp("created_at")?;
        (0..batch.num_rows())
            .map(|i| {
                let bytes = states.value(i);
                let (n, d) = (tokens.value(i), dim.value(i));
                if bytes.len() != n as usize * d as usize * 2 {
                    return Err(c.invalid(
                        "states_bf16",
                        i,
                        format!("{} bytes for {n} x {d} bfloat16 states", bytes.len()),
                    ));
                }
                Ok(CaptionStates {
                    prompt: prompt.value(i).to_string(),
                    encoder_id: encoder.value(i).to_string(),
                    job_id: job.value(i).to_string(),
                    tokens: n,
                    dim: d,
                    states_bf16: bytes.to_vec(),
                    created_at_us: created.value(i),
                })
            })
            .collect()
    }
}

/// Which model produced an evaluation sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelRole {
    /// The tuned diffusion supervisor.
    Supervisor,
    /// The AR student.
    Student,
}

impl ModelRole {
    /// The stored label.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelRole::Supervisor => "supervisor",
            ModelRole::Student => "student",
        }
    }
}

impl FromStr for ModelRole {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "supervisor" => Ok(ModelRole::Supervisor),
            "student" => Ok(ModelRole::Student),
            other => Err(format!("unknown model role `{other}`")),
        }
    }
}

/// One evaluation image of a model on a DreamBench-style prompt, with its scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSample {
    /// Job being evaluated.
    pub job_id: String,
    /// Supervisor or student.
    pub model_role: ModelRole,
    /// Version (checkpoint id) of that model.
    pub model_version: String,
    /// Subject name.
    pub subject: String,
    /// Index of the prompt in the subject's evaluation list.
    pub prompt_index: u32,
    /// The prompt (with the identifier token).
    pub prompt: String,
    /// Index of the sample for this prompt (0..4 in DreamBench).
    pub sample_index: u32,
    /// Sampling seed (the same for every model).
    pub seed: u64,
    /// The image as PNG.
    pub image_png: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// DINO: mean cosine to the references.
    pub score_dino: Option<f32>,
    /// CLIP-I: mean cosine to the references.
    pub score_clip_i: Option<f32>,
    /// CLIP-T: cosine to the prompt with the identifier removed.
    pub score_clip_t: Option<f32>,
    /// FEAT-I: mean cosine of ImageNet-CNN features to the references.
    pub score_feat_i: Option<f32>,
    /// When it was generated (µs since the epoch, UTC).
    pub created_at_us: i64,
}

impl Table for EvalSample {
    const NAME: &'static str = "eval_samples";

    fn schema() -> SchemaRef {
        static S: OnceLock<SchemaRef> = OnceLock::new();
        S.get_or_init(|| {
            schema(vec![
                key_field(),
                field("job_id", DataType::Utf8, false),
                field("model_role", DataType::Utf8, false),
                field("model_version", DataType::Utf8, false),
                field("subject", DataType::Utf8, false),
                field("prompt_index", DataType::UInt32, false),
                field("prompt", DataType::Utf8, false),
                field("sample_index", DataType::UInt32, false),
                field("seed", DataType::UInt64, false),
                field("image_png", DataType::LargeBinary, false),
                field("width", DataType::UInt32, false),
                field("height", DataType::UInt32, false),
                field("score_dino", DataType::Float32, true),
                field("score_clip_i", DataType::Float32, true),
                field("score_clip_t", DataType::Float32, true),
                field("score_feat_i", DataType::Float32, true),
                field("created_at", timestamp_type(), false),
            ])
        })
        .clone()
    }

    fn key(&self) -> RowKey {
        RowKey::new([
            ("job", self.job_id.clone()),
            ("role", self.model_role.as_str().to_string()),
            ("model", self.model_version.clone()),
            ("subject", self.subject.clone()),
            ("prompt", self.prompt_index.to_string()),
            ("sample", self.sample_index.to_string()),
        ])
    }

    fn to_batch(rows: &[Self]) -> Result<RecordBatch> {
        let keys = keys(rows);
        build(
            Self::NAME,
            Self::schema(),
            vec![
                utf8(keys.iter().map(RowKey::as_str)),
                utf8(rows.iter().map(|r| r.job_id.as_str())),
                utf8(rows.iter().map(|r| r.model_role.as_str())),
                utf8(rows.iter().map(|r| r.model_version.as_str())),
                utf8(rows.iter().map(|r| r.subject.as_str())),
                u32s(rows.iter().map(|r| r.prompt_index)),
                utf8(rows.iter().map(|r| r.prompt.as_str())),
                u32s(rows.iter().map(|r| r.sample_index)),
                u64s(rows.iter().map(|r| r.seed)),
                large_binary(rows.iter().map(|r| r.image_png.as_slice())),
                u32s(rows.iter().map(|r| r.width)),
                u32s(rows.iter().map(|r| r.height)),
                opt_f32s(rows.iter().map(|r| r.score_dino)),
                opt_f32s(rows.iter().map(|r| r.score_clip_i)),
                opt_f32s(rows.iter().map(|r| r.score_clip_t)),
                opt_f32s(rows.iter().map(|r| r.score_feat_i)),
                timestamps(rows.iter().map(|r| r.created_at_us)),
            ],
        )
    }

    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>> {
        let batch = Self::conform(batch)?;
        let c = Columns::new(Self::NAME, &batch);
        let (job, role, version) = (c.utf8("job_id")?, c.utf8("model_role")?, c.utf8("model_version")?);
        let (subject, prompt_index, prompt) = (c.utf8("subject")?, c.u32("prompt_index")?, c.utf8("prompt")?);
        let (sample, seed, png) = (c.u32("sample_index")?, c.u64("seed")?, c.large_binary("image_png")?);
        let (width, height) = (c.u32("width")?, c.u32("height")?);
        let (dino, clip_i, clip_t) = (c.f32("score_dino")?, c.f32("score_clip_i")?, c.f32("score_clip_t")?);
        let (feat_i, created) = (c.f32("score_feat_i")?, c.timestamp("created_at")?);
        (0..batch.num_rows())
            .map(|i| {
                Ok(EvalSample {
                    job_id: job.value(i).to_string(),
                    model_role: role.value(i).parse().map_err(|m| c.invalid("model_role", i, m))?,
                    model_version: version.value(i).to_string(),
                    subject: subject.value(i).to_string(),
                    prompt_index: prompt_index.value(i),
                    prompt: prompt.value(i).to_string(),
                    sample_index: sample.value(i),
                    seed: seed.value(i),
                    image_png: png.value(i).to_vec(),
                    width: width.value(i),
                    height: height.value(i),
                    score_dino: opt(dino, i, || dino.value(i)),
                    score_clip_i: opt(clip_i, i, || clip_i.value(i)),
                    score_clip_t: opt(clip_t, i, || clip_t.value(i)),
                    score_feat_i: opt(feat_i, i, || feat_i.value(i)),
                    created_at_us: created.value(i),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Float64Array, StringArray};

    use super::*;

    fn proxy(seed: u64) -> Proxy {
        Proxy {
            job_id: "job-1".into(),
            subject: "dog2".into(),
            class_noun: "dog".into(),
            prompt: "a sks dog on the beach".into(),
            prompt_index: 3,
            seed,
            supervisor_id: "sup/lora".into(),
            supervisor_version: 2,
            image_png: vec![0x89, b'P', b'N', b'G', seed as u8],
            width: 32,
            height: 32,
            score_dino: Some(0.5),
            score_clip_i: None,
            score_clip_t: Some(0.25),
            score_feat_i: None,
            dup_max_cosine: Some(0.9),
            keep: if seed.is_multiple_of(2) { Some(true) } else { Some(false) },
            reject_reason: if seed.is_multiple_of(2) { None } else { Some(RejectReason::NearDuplicate) },
            generated_at_us: 1_700_000_000_000_000 + seed as i64,
            filtered_at_us: if seed == 0 { None } else { Some(1_700_000_000_000_123) },
        }
    }

    fn round_trip<T: Table + PartialEq + std::fmt::Debug>(rows: Vec<T>) {
        let batch = T::to_batch(&rows).unwrap();
        assert_eq!(batch.schema(), T::schema());
        assert_eq!(batch.num_rows(), rows.len());
        let keys = batch.column_by_name(KEY_COLUMN).unwrap();
        let keys = keys.as_any().downcast_ref::<StringArray>().unwrap();
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(keys.value(i), row.key().as_str());
        }
        assert_eq!(T::from_batch(&batch).unwrap(), rows);
    }

    #[test]
    fn every_table_round_trips() {
        round_trip((0..5).map(proxy).collect());
        round_trip(vec![ReferenceImage {
            job_id: "j".into(),
            subject: "dog2".into(),
            class_noun: "dog".into(),
            image_index: 4,
            source: "04.png".into(),
            image_png: vec![1, 2, 3],
            width: 128,
            height: 128,
            created_at_us: 7,
        }]);
        round_trip(vec![ClassPriorImage {
            job_id: "j".into(),
            class_noun: "dog".into(),
            prompt: "a dog".into(),
            seed: u64::MAX,
            model_id: "base".into(),
            image_png: vec![],
            width: 32,
            height: 32,
            created_at_us: -5,
        }]);
        let supervisor = Supervisor {
            job_id: "j".into(),
            subject: "dog2".into(),
            class_noun: "dog".into(),
            instance_prompt: "a sks dog".into(),
            supervisor_id: "j/dog2/dreambooth".into(),
            supervisor_version: 400,
            base_model: "sd15".into(),
            adapter_path: "/a/pytorch_lora_weights.safetensors".into(),
            train_steps: 400,
            final_loss: Some(0.25),
            created_at_us: 9,
        };
        round_trip(vec![
            supervisor.clone(),
            Supervisor { final_loss: None, supervisor_version: 0, ..supervisor },
        ]);
        round_trip(vec![
            VqTokens {
                proxy_key: proxy(1).key().to_string(),
                job_id: "j".into(),
                subject: "dog2".into(),
                prompt: "a sks dog".into(),
                tokenizer_id: "vq16@1".into(),
                grid_height: 2,
                grid_width: 3,
                tokens: vec![0, 1, 2, 3, 4, 8191],
                created_at_us: 1,
            },
            VqTokens {
                proxy_key: proxy(2).key().to_string(),
                job_id: "j".into(),
                subject: "dog2".into(),
                prompt: "a sks dog".into(),
                tokenizer_id: "vq16@1".into(),
                grid_height: 1,
                grid_width: 1,
                tokens: vec![42],
                created_at_us: 2,
            },
        ]);
        round_trip(vec![EvalSample {
            job_id: "j".into(),
            model_role: ModelRole::Student,
            model_version: "step-100".into(),
            subject: "dog2".into(),
            prompt_index: 24,
            prompt: "a cube shaped sks dog".into(),
            sample_index: 3,
            seed: 99,
            image_png: vec![9; 10],
            width: 32,
            height: 32,
            score_dino: Some(0.1),
            score_clip_i: Some(0.2),
            score_clip_t: Some(0.3),
            score_feat_i: None,
            created_at_us: 3,
        }]);
    }

    #[test]
    fn empty_batches_round_trip() {
        round_trip(Vec::<Proxy>::new());
    }

    #[test]
    fn keys_differ_by_each_key_part() {
        let base = proxy(1);
        let mut other = base.clone();
        other.supervisor_version = 3;
        assert_ne!(base.key(), other.key());
        let mut other = base.clone();
        other.prompt.push('!');
        assert_ne!(base.key(), other.key());
        // Scores and verdicts are not part of the identity.
        let mut other = base.clone();
        other.keep = None;
        other.score_dino = Some(0.0);
        assert_eq!(base.key(), other.key());
    }

    fn replace_column(batch: &RecordBatch, name: &str, array: ArrayRef) -> RecordBatch {
        let schema = batch.schema();
        let mut fields: Vec<arrow_schema::Field> =
            schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut columns = batch.columns().to_vec();
        let i = schema.index_of(name).unwrap();
        fields[i] = arrow_schema::Field::new(name, array.data_type().clone(), true);
        columns[i] = array;
        RecordBatch::try_new(Arc::new(arrow_schema::Schema::new(fields)), columns).unwrap()
    }

    #[test]
    fn wrong_schemas_are_rejected_naming_the_column() {
        let batch = Proxy::to_batch(&[proxy(0), proxy(1)]).unwrap();

        let wrong = replace_column(&batch, "score_dino", Arc::new(Float64Array::from(vec![0.1, 0.2])));
        let err = Proxy::from_batch(&wrong).unwrap_err().to_string();
        assert!(err.contains("`score_dino`") && err.contains("Float64"), "{err}");

        let dropped = batch.project(&[0, 1, 2]).unwrap();
        let err = Proxy::from_batch(&dropped).unwrap_err().to_string();
        assert!(err.contains("column `class_noun` is missing"), "{err}");

        let nulls = replace_column(&batch, "prompt", Arc::new(StringArray::from(vec![Some("a"), None])));
        let err = Proxy::conform(&nulls).unwrap_err().to_string();
        assert!(err.contains("`prompt` has a null at row 1"), "{err}");

        let bad_reason = replace_column(
            &batch,
            "reject_reason",
            Arc::new(StringArray::from(vec![None, Some("too_blue")])),
        );
        let err = Proxy::from_batch(&bad_reason).unwrap_err().to_string();
        assert!(err.contains("`reject_reason` row 1") && err.contains("too_blue"), "{err}");

        // A batch of another table is not a proxy batch.
        let refs = ReferenceImage::to_batch(&[]).unwrap();
        let err = Proxy::conform(&refs).unwrap_err().to_string();
        assert!(err.contains("table `proxies`"), "{err}");
    }

    #[test]
    fn conform_reorders_columns_to_the_table_schema() {
        let batch = Proxy::to_batch(&[proxy(4)]).unwrap();
        let n = batch.num_columns();
        let reversed = batch.project(&(0..n).rev().collect::<Vec<_>>()).unwrap();
        let conformed = Proxy::conform(&reversed).unwrap();
        assert_eq!(conformed.schema(), Proxy::schema());
        assert_eq!(Proxy::from_batch(&conformed).unwrap(), vec![proxy(4)]);
    }

    #[test]
    fn token_count_must_match_the_grid() {
        let mut row = VqTokens {
            proxy_key: "p".into(),
            job_id: "j".into(),
            subject: "dog2".into(),
            prompt: "a sks dog".into(),
            tokenizer_id: "t".into(),
            grid_height: 2,
            grid_width: 2,
            tokens: vec![1, 2, 3],
            created_at_us: 0,
        };
        let err = VqTokens::from_batch(&VqTokens::to_batch(&[row.clone()]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("3 tokens for a 2x2 grid"), "{err}");
        row.tokens.push(4);
        assert!(VqTokens::from_batch(&VqTokens::to_batch(&[row]).unwrap()).is_ok());
    }
}
