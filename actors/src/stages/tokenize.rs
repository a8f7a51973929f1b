//! `tokenize`: kept proxies → VQ token rows (`vq_tokens`). Each image is converted to RGB, centre-
//! cropped to a square and resized to the tokenizer's resolution, scaled to `[-1, 1]` and encoded
//! by the student's VQ encoder ([`VqEncoder`]: Chameleon's, loaded alone from the student
//! checkpoint, or LlamaGen's VQ-16). Rows are keyed by (proxy, tokenizer), so written to the
//! corpus they let a replay train without re-encoding.

use std::path::PathBuf;

use arrow_array::RecordBatch;
use proxytune_models::ar::vq::{VqEncoder, VqFamily};
use proxytune_models::device::parse_device;
use proxytune_schemas::{now_us, Proxy, Table, VqTokens};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::runtime::{Context, Operator, Output};
use crate::stages::intake::images_to_square_batch;

/// Configuration of a [`Tokenize`] step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    /// The folder of the VQ: the Chameleon student checkpoint (`config.json`, `model.safetensors`
    /// or its shards, with `model.vqmodel.*`), or LlamaGen's VQ-16 folder.
    pub student_dir: PathBuf,
    /// The VQ's family.
    #[serde(default)]
    pub family: VqFamily,
    /// Id (and version) of the tokenizer, written into every row.
    pub tokenizer_id: String,
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
}

impl Tokenize {
    /// A step; the encoder loads on its thread when the job starts.
    pub fn new(config: TokenizeConfig) -> Self {
        Tokenize { config, vq: None }
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
        let vq = VqEncoder::load(self.config.family, &self.config.student_dir, device)?;
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
