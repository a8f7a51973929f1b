//! Lumina-mGPT's text-to-image format on a Chameleon model.
//!
//! Prompt: `<s>`, the text `Generate an image of {W}x{H} according to the following prompt:\n{prompt}`,
//! then the turn separator `<reserved08706>`. The image that answers it is serialised as
//! `<racm3:break>`, a height and a width token (`<reserved{8800 + n}>`, `n` in 32-pixel units, i.e.
//! two VQ codes), then the code grid row by row, each row followed by the new-line token
//! `<reserved08799>`, then `<eoss>`, then the separator again. Training predicts the image sequence
//! and the closing separator; the prompt is context only.
//!
//! Generation follows Lumina-mGPT's logits processors: after the two size tokens, classifier-free
//! guidance against the unconditional prompt `<racm3:break> h w` (no text), image tokens only
//! (top-k over them), the new-line token forced at each row end and `<eoss>` after the last row.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::chameleon::Chameleon;
use super::generate::{generate_batch, Allowed, TokenSampling};
use crate::error::{ModelError, Result};

/// The structure-token ids (Lumina-mGPT 7B's by default).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LuminaTokens {
    /// `<s>`.
    pub bos: i64,
    /// `<reserved08706>`: ends each turn (and generation).
    pub separator: i64,
    /// `<racm3:break>`: begins an image.
    pub begin_image: i64,
    /// `<eoss>`: ends an image.
    pub end_image: i64,
    /// `<reserved08799>`: ends each row of codes.
    pub new_line: i64,
    /// `<reserved08800>`: size token for 0 units (size `n` is `size_base + n`).
    pub size_base: i64,
    /// VQ codes per size unit along each side (a 32-pixel unit over a 16× tokenizer: 2).
    pub codes_per_unit: i64,
}

impl Default for LuminaTokens {
    fn default() -> Self {
        LuminaTokens {
            bos: 0,
            separator: 8710,
            begin_image: 8197,
            end_image: 8196,
            new_line: 8803,
            size_base: 8804,
            codes_per_unit: 2,
        }
    }
}

/// The instruction text of a text-to-image prompt of `width × height` pixels.
pub fn t2i_instruction(prompt: &str, width: u32, height: u32) -> String {
    format!("Generate an image of {width}x{height} according to the following prompt:\n{prompt}")
}

impl LuminaTokens {
    /// `<s> text <sep>` from the instruction's text token ids.
    pub fn prompt_ids(&self, text_ids: &[i64]) -> Vec<i64> {
        let mut ids = Vec::with_capacity(text_ids.len() + 2);
        ids.push(self.bos);
        ids.extend_from_slice(text_ids);
        ids.push(self.separator);
        ids
    }

    /// `<racm3:break> h w`: the image header for a code grid of `rows × cols`.
    pub fn image_header(&self, rows: i64, cols: i64) -> Result<[i64; 3]> {
        let u = self.codes_per_unit;
        if rows <= 0 || cols <= 0 || rows % u != 0 || cols % u != 0 {
            return Err(ModelError::Config {
                what: "image grid".into(),
                message: format!("{rows}x{cols} codes is not a positive multiple of {u} per side"),
            });
        }
        Ok([self.begin_image, self.size_base + rows / u, self.size_base + cols / u])
    }

    /// The full image sequence of image-token ids `[rows, cols]` (already mapped to the
    /// vocabulary), followed by the separator.
    pub fn image_sequence(&self, image_tokens: &[i64], rows: i64, cols: i64) -> Result<Vec<i64>> {
        if image_tokens.len() as i64 != rows * cols {
            return Err(ModelError::Config {
                what: "image tokens".into(),
                message: format!("{} tokens for a {rows}x{cols} grid", image_tokens.len()),
            });
        }
        let mut seq = self.image_header(rows, cols)?.to_vec();
        for row in image_tokens.chunks(cols as usize) {
            seq.extend_from_slice(row);
            seq.push(self.new_line);
        }
        seq.push(self.end_image);
        seq.push(self.separator);
        Ok(seq)
    }

    /// The image-token ids of a generated body (`rows` rows of `cols` tokens each followed by a
    /// new-line, then `<eoss>`); anything else is an error naming the position.
    pub fn parse_body(&self, body: &[i64], rows: i64, cols: i64) -> Result<Vec<i64>> {
        let bad = |message: String| ModelError::Config { what: "generated image".into(), message };
        let expected = (rows * (cols + 1) + 1) as usize;
        if body.len() != expected {
            return Err(bad(format!("{} tokens, expected {expected}", body.len())));
        }
        let mut out = Vec::with_capacity((rows * cols) as usize);
        for (r, row) in body[..expected - 1].chunks((cols + 1) as usize).enumerate() {
            if row[cols as usize] != self.new_line {
                return Err(bad(format!("row {r} does not end with the new-line token")));
            }
            out.extend_from_slice(&row[..cols as usize]);
        }
        if body[expected - 1] != self.end_image {
            return Err(bad("no end-of-image token after the last row".into()));
        }
        Ok(out)
    }

    /// Training input and labels for one example: `prompt_ids` are context (label −100), the image
    /// sequence and its closing separator are predicted.
    pub fn training_example(&self, prompt_ids: &[i64], image_sequence: &[i64]) -> (Vec<i64>, Vec<i64>) {
        let ids: Vec<i64> = prompt_ids.iter().chain(image_sequence).copied().collect();
        let labels: Vec<i64> =
            std::iter::repeat_n(-100, prompt_ids.len()).chain(image_sequence.iter().copied()).collect();
        (ids, labels)
    }
}

/// Image sampling settings (Lumina-mGPT's defaults: CFG 4, image top-k 2000, temperature 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageSampling {
    /// Guidance scale against the text-free prompt.
    pub guidance_scale: f64,
    /// Top-k over image tokens.
    pub image_top_k: Option<i64>,
    /// Top-p.
    pub top_p: Option<f64>,
    /// Temperature.
    pub temperature: f64,
}

impl Default for ImageSampling {
    fn default() -> Self {
        ImageSampling { guidance_scale: 4.0, image_top_k: Some(2000), top_p: None, temperature: 1.0 }
    }
}

/// Samples a `rows × cols` grid of image-token ids for `prompt_ids` (from [`LuminaTokens::prompt_ids`]).
/// One seed's [`sample_image_tokens_batch`].
pub fn sample_image_tokens(
    model: &Chameleon,
    tokens: &LuminaTokens,
    prompt_ids: &[i64],
    rows: i64,
    cols: i64,
    sampling: &ImageSampling,
    seed: u64,
) -> Result<Vec<i64>> {
    let mut grids = sample_image_tokens_batch(model, tokens, &[prompt_ids], rows, cols, sampling, &[seed])?;
    Ok(grids.pop().expect("one grid"))
}

/// Samples one `rows × cols` grid per seed, for prompt `i` of `prompts` with `seeds[i]`, in one
/// batch ([`generate_batch`]): the conditional rows (prompt and image header, left-padded to the
/// longest), then with guidance the unconditional ones (the header alone, left-padded alike). Grid
/// `i` is the one `seeds[i]` and prompt `i` give alone (up to the float rounding of a wider batch).
pub fn sample_image_tokens_batch(
    model: &Chameleon,
    tokens: &LuminaTokens,
    prompts: &[&[i64]],
    rows: i64,
    cols: i64,
    sampling: &ImageSampling,
    seeds: &[u64],
) -> Result<Vec<Vec<i64>>> {
    if prompts.len() != seeds.len() || prompts.is_empty() {
        return Err(ModelError::Config {
            what: "image sampling".into(),
            message: format!("{} prompts for {} seeds", prompts.len(), seeds.len()),
        });
    }
    let header = tokens.image_header(rows, cols)?;
    let device = model.device();
    let conds: Vec<Vec<i64>> = prompts.iter().map(|p| p.iter().chain(&header).copied().collect()).collect();
    let guided = sampling.guidance_scale != 1.0;
    let mut sequences = conds.clone();
    if guided {
        sequences.extend(std::iter::repeat_n(header.to_vec(), prompts.len()));
    }
    // Left-padded to the longest; the padding is masked (and moves no position).
    let longest = sequences.iter().map(Vec::len).max().expect("a prompt");
    let padded = sequences.iter().any(|q| q.len() < longest);
    let (mut ids, mut keep) = (Vec::new(), Vec::new());
    for q in &sequences {
        let pad = longest - q.len();
        ids.extend(std::iter::repeat_n(tokens.bos, pad).chain(q.iter().copied()));
        keep.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, q.len())));
    }
    let n = sequences.len() as i64;
    let prompt = Tensor::from_slice(&ids).view([n, -1]).to_device(device);
    let mask = padded.then(|| Tensor::from_slice(&keep).view([n, -1]).to_device(device));
    let image_mask = {
        let ids = Tensor::from_slice(&model.image_vocab.image_token_ids()).to_device(device);
        Tensor::zeros([model.config().vocab_size], (Kind::Bool, device)).index_fill(0, &ids, 1)
    };
    let body_len = (rows * (cols + 1) + 1) as usize;
    let token_sampling = TokenSampling {
        greedy: false,
        temperature: sampling.temperature,
        top_k: sampling.image_top_k,
        top_p: sampling.top_p,
        guidance_scale: sampling.guidance_scale,
        draws: Default::default(),
    };
    let bodies = generate_batch(model, &prompt, mask.as_ref(), body_len, &token_sampling, seeds, |step| {
        let position = step as i64 + 1; // 1-based position in the body
        if position == body_len as i64 {
            Allowed::Force(tokens.end_image)
        } else if position % (cols + 1) == 0 {
            Allowed::Force(tokens.new_line)
        } else {
            Allowed::Mask(image_mask.shallow_clone())
        }
    })?;
    bodies.iter().map(|body| tokens.parse_body(body, rows, cols)).collect()
}
