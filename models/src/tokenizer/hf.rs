//! Any Hugging Face `tokenizer.json` (BPE, word-level, unigram, …) through the `tokenizers` crate:
//! the AR students' text tokenizers (Chameleon / Lumina-mGPT ship one; ids come back without
//! special tokens, the prompt format adds its own), and [`CaptionTokenizer`]: a caption encoder's
//! fixed-length ids and mask (T5's, as LlamaGen calls it).

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// A `tokenizer.json` tokenizer.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer").field("path", &self.path).finish()
    }
}

impl HfTokenizer {
    /// Loads `path`; a missing or malformed file is an error naming it.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no tokenizer.json here"),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Config { what: path.display().to_string(), message: e.to_string() })?;
        Ok(HfTokenizer { inner, path: path.to_path_buf() })
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, false).map_err(|e| ModelError::Config {
            what: format!("{} (encoding {text:?})", self.path.display()),
            message: e.to_string(),
        })?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }
}

/// Fixed-length captions for a text encoder: the tokenizer's special tokens (T5's `</s>`),
/// truncated to `max_length` (special tokens kept) and padded after the text with `<pad>` to
/// `max_length`, as transformers' tokenizers do with `padding="max_length", truncation=True`.
pub struct CaptionTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    max_length: usize,
}

impl std::fmt::Debug for CaptionTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptionTokenizer")
            .field("path", &self.path)
            .field("max_length", &self.max_length)
            .finish()
    }
}

/// A caption's ids and attention mask (1 for tokens, 0 for padding), each `max_length` long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caption {
    /// Token ids.
    pub input_ids: Vec<i64>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
}

impl CaptionTokenizer {
    /// Loads `path` for captions of `max_length` tokens; its vocabulary must have `pad_token`.
    pub fn from_file(path: &Path, max_length: usize, pad_token: &str) -> Result<Self> {
        let mut inner = HfTokenizer::from_file(path)?.inner;
        let what = || path.display().to_string();
        let pad_id = inner.token_to_id(pad_token).ok_or_else(|| ModelError::Config {
            what: what(),
            message: format!("no padding token `{pad_token}` in the vocabulary"),
        })?;
        inner
            .with_truncation(Some(tokenizers::TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| ModelError::Config { what: what(), message: e.to_string() })?;
        inner.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(max_length),
            pad_id,
            pad_token: pad_token.to_string(),
            ..Default::default()
        }));
        Ok(CaptionTokenizer { inner, path: path.to_path_buf(), max_length })
    }

    /// The caption length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// `text`'s caption.
    pub fn encode(&self, text: &str) -> Result<Caption> {
        let enc = self.inner.encode(text, true).map_err(|e| ModelError::Config {
            what: format!("{} (encoding {text:?})", self.path.display()),
            message: e.to_string(),
        })?;
        let ids = |v: &[u32]| v.iter().map(|&i| i as i64).collect();
        Ok(Caption { input_ids: ids(enc.get_ids()), attention_mask: ids(enc.get_attention_mask()) })
    }

    /// Captions of `texts` as `[N, max_length]` int64 tensors (ids, mask) on `device`.
    pub fn encode_batch(&self, texts: &[&str], device: tch::Device) -> Result<(tch::Tensor, tch::Tensor)> {
        let captions = texts.iter().map(|t| self.encode(t)).collect::<Result<Vec<_>>>()?;
        let stack = |f: fn(&Caption) -> &Vec<i64>| {
            let flat: Vec<i64> = captions.iter().flat_map(|c| f(c).iter().copied()).collect();
            tch::Tensor::from_slice(&flat)
                .view([captions.len() as i64, self.max_length as i64])
                .to_device(device)
        };
        Ok((stack(|c| &c.input_ids), stack(|c| &c.attention_mask)))
    }
}
