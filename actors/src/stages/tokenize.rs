//! `tokenize`: kept proxies → VQ token rows (`vq_tokens`). Each image is converted to RGB, centre-
//! cropped to a square and resized to the tokenizer's resolution, scaled to `[-1, 1]` and encoded
//! by the student's VQ encoder ([`VqEncoder`]: Chameleon's, loaded alone from the student
//! checkpoint, or LlamaGen's VQ-16). Rows are keyed by (proxy, tokenizer), so written to the
//! corpus they let a replay train without re-encoding.
//!
//! For a student that conditions on a caption encoder's states (LlamaGen: Flan-T5), each prompt's
//! states are computed the first time one of its proxies passes and emitted on port 1
//! ([`CaptionStates`] rows, keyed by prompt and encoder), before the token rows on port 0: the
//! corpus stores them once per prompt and the trainer takes them from there. Prompts the corpus
//! already stores ([`Tokenize::with_stored_captions`]) are never encoded again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arrow_array::RecordBatch;
use proxytune_models::ar::student::{Captioner, StudentFiles};
use proxytune_models::ar::vq::VqEncoder;
use proxytune_models::device::parse_device;
use proxytune_schemas::{now_us, CaptionStates, Proxy, Table, VqTokens};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::runtime::{Context, Operator, Output};
use crate::stages::intake::images_to_square_batch;

/// Configuration of a [`Tokenize`] step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    /// The student: its VQ encoder (Chameleon's inside its checkpoint, or LlamaGen's VQ-16) and
    /// its caption encoder, if it has one.
    pub student: StudentFiles,
    /// Id (and version) of the tokenizer, written into every row.
    pub tokenizer_id: String,
    /// Id (and version) of the caption encoder, written into every caption row (needed when the
    /// student has a caption encoder).
    #[serde(default)]
    pub caption_encoder_id: Option<String>,
    /// Run the caption encoder in bfloat16 (its states are stored in bfloat16 either way).
    #[serde(default)]
    pub caption_bf16: bool,
    /// Image side the tokenizer takes (Chameleon: 512).
    pub resolution: u32,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Tokenize only proxies the Filter kept.
    #[serde(default = "yes")]
    pub only_kept: bool,
}

fn default_device() -> String {
    "cpu".into()
}

fn yes() -> bool {
    true
}

/// The VQ tokenization step.
pub struct Tokenize {
    config: TokenizeConfig,
    vq: Option<VqEncoder>,
    captioner: Option<(Captioner, String)>,
    captioned: HashSet<String>,
    encoded: Arc<AtomicUsize>,
}

impl Tokenize {
    /// A step; the encoders load on its thread when the job starts.
    pub fn new(config: TokenizeConfig) -> Self {
        Tokenize { config, vq: None, captioner: None, captioned: HashSet::new(), encoded: Arc::default() }
    }

    /// Prompts whose caption states the corpus already stores: they are not encoded again (a
    /// resumed job's or a replay's trainer takes them from the corpus).
    pub fn with_stored_captions(mut self, prompts: impl IntoIterator<Item = String>) -> Self {
        self.captioned.extend(prompts);
        self
    }

    /// How many prompts it has run the caption encoder on (shared with whoever built it).
    pub fn captions_encoded(&self) -> Arc<AtomicUsize> {
        self.encoded.clone()
    }

    /// The caption rows of the prompts of `proxies` not captioned yet.
    fn new_captions(&mut self, proxies: &[Proxy]) -> Result<Vec<CaptionStates>> {
        let Some((captioner, encoder_id)) = &self.captioner else { return Ok(Vec::new()) };
        let mut prompts: Vec<&str> = Vec::new();
        for p in proxies {
            if !self.captioned.contains(&p.prompt) && !prompts.contains(&p.prompt.as_str()) {
                prompts.push(&p.prompt);
            }
        }
        let created_at_us = now_us();
        let rows: Vec<CaptionStates> = captioner
            .encode(&prompts)?
            .into_iter()
            .zip(&prompts)
            .map(|(states, prompt)| CaptionStates {
                prompt: prompt.to_string(),
                encoder_id: encoder_id.clone(),
                job_id: proxies[0].job_id.clone(),
                tokens: states.tokens as u32,
                dim: states.dim as u32,
                states_bf16: states.to_bf16_bytes(),
                created_at_us,
            })
            .collect();
        self.captioned.extend(rows.iter().map(|r| r.prompt.clone()));
        self.encoded.fetch_add(rows.len(), Ordering::Relaxed);
        Ok(rows)
    }
}

/// The image as a centred square crop (RGB): what the VQ encodes, resized to its resolution.
pub fn square(img: image::DynamicImage) -> image::RgbImage {
    let rgb = img.to_rgb8();
    let side = rgb.width().min(rgb.height());
    let (x, y) = ((rgb.width() - side) / 2, (rgb.height() - side) / 2);
    image::imageops::crop_imm(&rgb, x, y, side, side).to_image()
}

impl Operator for Tokenize {
    fn on_start(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        let device = parse_device(&self.config.device)?;
        let vq = self.config.student.load_vq_encoder(device)?;
        let kind = if self.config.caption_bf16 { tch::Kind::BFloat16 } else { tch::Kind::Float };
        if let Some(captioner) = self.config.student.load_captioner(device, kind)? {
            let id = self.config.caption_encoder_id.clone().ok_or_else(|| Error::BadInput {
                input: "tokenize.caption_encoder_id".into(),
                message: "the student has a caption encoder, whose rows need an id".into(),
            })?;
            self.captioner = Some((captioner, id));
        }
        let f = vq.downsample_factor() as u32;
        if self.config.resolution == 0 || !self.config.resolution.is_multiple_of(f) {
            return Err(Error::BadInput {
                input: "tokenize.resolution".into(),
                message: format!(
                    "{} is not a positive multiple of the tokenizer's factor {f}",
                    self.config.resolution
                ),
            });
        }
        self.vq = Some(vq);
        Ok(())
    }

    fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        _ctx: &mut Context,
        out: &mut Output,
    ) -> Result<()> {
        let proxies: Vec<Proxy> = Proxy::from_batch(&batch)?
            .into_iter()
            .filter(|p| !self.config.only_kept || p.keep == Some(true))
            .collect();
        if proxies.is_empty() {
            return Ok(());
        }
        let images = proxies
            .iter()
            .map(|p| {
                image::load_from_memory(&p.image_png).map(square).map_err(|e| Error::BadInput {
                    input: format!("proxy {}", p.key()),
                    message: format!("not a decodable image: {e}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let captions = self.new_captions(&proxies)?;
        if !captions.is_empty() {
            out.emit_to(1, CaptionStates::to_batch(&captions)?);
        }
        let vq = self.vq.as_ref().expect("started");
        let pixels = images_to_square_batch(&images, self.config.resolution as i64, vq.device())? * 2.0 - 1.0;
        let codes = vq.encode(&pixels)?; // [B, h, w]
        let (h, w) = (codes.size()[1], codes.size()[2]);
        let created_at_us = now_us();
        let rows = proxies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let tokens = Vec::<i64>::try_from(codes.get(i as i64).flatten(0, -1))
                    .map_err(proxytune_models::ModelError::from)?;
                Ok(VqTokens {
                    proxy_key: p.key().to_string(),
                    job_id: p.job_id.clone(),
                    subject: p.subject.clone(),
                    prompt: p.prompt.clone(),
                    tokenizer_id: self.config.tokenizer_id.clone(),
                    grid_height: h as u32,
                    grid_width: w as u32,
                    tokens: tokens.into_iter().map(|t| t as i32).collect(),
                    created_at_us,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.emit(VqTokens::to_batch(&rows)?);
        Ok(())
    }
}
