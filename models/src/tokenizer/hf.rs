//! Any Hugging Face `tokenizer.json` (BPE, word-level, unigram, …) through the `tokenizers` crate:
//! the AR students' text tokenizers (Chameleon / Lumina-mGPT ship one). Ids come back without
//! special tokens; the prompt format adds its own.

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
