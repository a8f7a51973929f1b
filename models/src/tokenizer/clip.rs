//! The CLIP byte-level BPE tokenizer (Radford et al. 2021), as used by `openai/clip-vit-*` and the
//! Stable Diffusion text encoders.
//!
//! Loads either OpenAI's `bpe_simple_vocab_16e6.txt.gz` (merges only; the vocabulary is derived
//! from it the way the original tokenizer does: 256 byte symbols, the same with `</w>`, every
//! merge, then `<|startoftext|>` and `<|endoftext|>`) or a transformers/diffusers tokenizer folder's
//! `vocab.json` + `merges.txt`. Text is lower-cased and its whitespace collapsed before the
//! pre-tokenising regex; the `ftfy`/HTML clean-up of the reference is not applied (it changes
//! nothing on plain ASCII prompts).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;

use crate::error::{ModelError, Result};

const START: &str = "<|startoftext|>";
const END: &str = "<|endoftext|>";
/// Merges the original tokenizer keeps from the file: `49152 - 256 - 2`.
const OPENAI_MERGES: usize = 49152 - 256 - 2;

/// A tokenised prompt, padded to a fixed length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids: start, text, end, then padding.
    pub ids: Vec<i64>,
    /// 1 for real tokens (including start and end), 0 for padding.
    pub attention_mask: Vec<i64>,
}

/// The CLIP tokenizer.
#[derive(Debug)]
pub struct ClipTokenizer {
    encoder: HashMap<String, i64>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: Vec<char>,
    pattern: Regex,
    cache: Mutex<HashMap<String, Vec<i64>>>,
    start_id: i64,
    end_id: i64,
}

/// The reversible byte → printable-character map of GPT-2/CLIP BPE, indexed by byte, and the same
/// characters in the reference's order (printable bytes first), which is the vocabulary's order.
fn bytes_to_unicode() -> (Vec<char>, Vec<char>) {
    let mut bs: Vec<u32> =
        ('!' as u32..='~' as u32).chain('¡' as u32..='¬' as u32).chain('®' as u32..='ÿ' as u32).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec!['\0'; 256];
    let mut ordered = Vec::with_capacity(256);
    for (b, c) in bs.into_iter().zip(cs) {
        let c = char::from_u32(c).expect("valid code point");
        map[b as usize] = c;
        ordered.push(c);
    }
    (map, ordered)
}

fn bad(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Config { what: path.display().to_string(), message: message.into() }
}

impl ClipTokenizer {
    fn build(merges: Vec<(String, String)>, encoder: HashMap<String, i64>, what: &Path) -> Result<Self> {
        let start_id = *encoder.get(START).ok_or_else(|| bad(what, format!("vocabulary lacks {START}")))?;
        let end_id = *encoder.get(END).ok_or_else(|| bad(what, format!("vocabulary lacks {END}")))?;
        let ranks = merges.into_iter().enumerate().map(|(i, pair)| (pair, i)).collect();
        let pattern = Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .expect("the pattern compiles");
        Ok(ClipTokenizer {
            encoder,
            ranks,
            byte_encoder: bytes_to_unicode().0,
            pattern,
            cache: Mutex::new(HashMap::new()),
            start_id,
            end_id,
        })
    }

    /// Loads OpenAI's `bpe_simple_vocab_16e6.txt.gz`.
    pub fn from_openai_bpe(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .map_err(|source| ModelError::Io { path: path.into(), source })?;
        let merges: Vec<(String, String)> = text
            .lines()
            .skip(1)
            .take(OPENAI_MERGES)
            .map(|line| {
                line.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(path, format!("bad merge line `{line}`")))
            })
            .collect::<Result<_>>()?;
        if merges.len() != OPENAI_MERGES {
            return Err(bad(path, format!("{} merges, expected {OPENAI_MERGES}", merges.len())));
        }
        let (_, bytes) = bytes_to_unicode();
        let mut vocab: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
        vocab.extend(bytes.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push(START.into());
        vocab.push(END.into());
        let encoder = vocab.into_iter().enumerate().map(|(i, t)| (t, i as i64)).collect();
        Self::build(merges, encoder, path)
    }

    /// Loads a transformers/diffusers tokenizer folder's `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab_json: &Path, merges_txt: &Path) -> Result<Self> {
        let read =
            |p: &Path| std::fs::read_to_string(p).map_err(|source| ModelError::Io { path: p.into(), source });
        let encoder: HashMap<String, i64> =
            serde_json::from_str(&read(vocab_json)?).map_err(|e| bad(vocab_json, e.to_string()))?;
        let merges = read(merges_txt)?
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|line| {
                line.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(merges_txt, format!("bad merge line `{line}`")))
            })
            .collect::<Result<_>>()?;
        Self::build(merges, encoder, vocab_json)
    }

    /// Loads a `tokenizer.json` (the tokenizers-library format transformers 5 saves): its BPE
    /// model's `vocab` and `merges` (pairs or `"a b"` strings).
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(path, e.to_string()))?;
        let model = &json["model"];
        if model["type"] != "BPE" {
            return Err(bad(path, format!("model type {} is not BPE", model["type"])));
        }
        let encoder: HashMap<String, i64> =
            serde_json::from_value(model["vocab"].clone()).map_err(|e| bad(path, format!("vocab: {e}")))?;
        let merges = model["merges"]
            .as_array()
            .ok_or_else(|| bad(path, "no merges"))?
            .iter()
            .map(|m| {
                match m {
                    serde_json::Value::String(s) => {
                        s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string()))
                    }
                    serde_json::Value::Array(pair) => match (pair.first(), pair.get(1)) {
                        (Some(serde_json::Value::String(a)), Some(serde_json::Value::String(b))) => {
                            Some((a.clone(), b.clone()))
                        }
                        _ => None,
                    },
                    _ => None,
                }
                .ok_or_else(|| bad(path, format!("bad merge {m}")))
            })
            .collect::<Result<_>>()?;
        Self::build(merges, encoder, path)
    }

    /// Loads a tokenizer folder: `vocab.json` + `merges.txt` when present, else `tokenizer.json`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_merges(&vocab, &merges);
        }
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        Err(ModelError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no vocab.json + merges.txt or tokenizer.json",
            ),
        })
    }

    /// A small CLIP BPE vocabulary that spells each of `words` as one token (when no other merge
    /// gets in the way) and anything else byte by byte: the 256 byte symbols, the same with
    /// `</w>`, one merge per prefix of each word (`d o`, `do g</w>`), then the two special tokens,
    /// in the reference's order. Returns `vocab.json` and `merges.txt` contents, the folder format
    /// transformers' `CLIPTokenizer` loads.
    pub fn word_vocabulary(words: &[&str]) -> (String, String) {
        let (map, bytes) = bytes_to_unicode();
        let mut vocab: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
        vocab.extend(bytes.iter().map(|c| format!("{c}</w>")));
        let mut merges: Vec<(String, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for word in words {
            let pieces: Vec<String> =
                word.to_lowercase().bytes().map(|b| map[b as usize].to_string()).collect();
            let Some((first, rest)) = pieces.split_first() else { continue };
            let mut acc = first.clone();
            for (i, piece) in rest.iter().enumerate() {
                let piece = if i + 1 == rest.len() { format!("{piece}</w>") } else { piece.clone() };
                let merged = format!("{acc}{piece}");
                if seen.insert((acc.clone(), piece.clone())) {
                    merges.push((acc.clone(), piece));
                    vocab.push(merged.clone());
                }
                acc = merged;
            }
        }
        vocab.push(START.into());
        vocab.push(END.into());
        let mut ids = std::collections::BTreeMap::new();
        for (i, token) in vocab.into_iter().enumerate() {
            ids.entry(token).or_insert(i as i64);
        }
        let vocab_json = serde_json::to_string(&ids).expect("a map of strings serialises");
        let mut merges_txt = String::from("#version: 0.2\n");
        for (a, b) in merges {
            merges_txt.push_str(&format!("{a} {b}\n"));
        }
        (vocab_json, merges_txt)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// Id of a whole token (e.g. a special token), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.encoder.get(token).copied()
    }

    /// Id of `<|startoftext|>`.
    pub fn start_id(&self) -> i64 {
        self.start_id
    }

    /// Id of `<|endoftext|>`.
    pub fn end_id(&self) -> i64 {
        self.end_id
    }

    fn bpe(&self, token: &str) -> Result<Vec<i64>> {
        if let Some(ids) = self.cache.lock().expect("cache lock").get(token) {
            return Ok(ids.clone());
        }
        let chars: Vec<String> = token.bytes().map(|b| self.byte_encoder[b as usize].to_string()).collect();
        let mut word: Vec<String> = chars;
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let best = word
                .windows(2)
                .filter_map(|w| {
                    self.ranks.get(&(w[0].clone(), w[1].clone())).map(|r| (*r, w[0].clone(), w[1].clone()))
                })
                .min();
            let Some((_, a, b)) = best else { break };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == a && word[i + 1] == b {
                    merged.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
            if word.len() == 1 {
                break;
            }
        }
        let ids = word
            .iter()
            .map(|piece| {
                self.encoder.get(piece).copied().ok_or_else(|| ModelError::Config {
                    what: "tokenizer".into(),
                    message: format!("BPE piece `{piece}` is not in the vocabulary"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.cache.lock().expect("cache lock").insert(token.to_string(), ids.clone());
        Ok(ids)
    }

    /// Token ids of `text`, without start/end tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let cleaned = text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&cleaned) {
            match m.as_str() {
                START => ids.push(self.start_id),
                END => ids.push(self.end_id),
                token => ids.extend(self.bpe(token)?),
            }
        }
        Ok(ids)
    }

    /// `<|startoftext|> text <|endoftext|>`, truncated to `max_len` (keeping the end token) and
    /// padded with `pad_id` (SD 1.x pads with the end token, SD 2.x and SDXL's second encoder with 0).
    pub fn encode_padded(&self, text: &str, max_len: usize, pad_id: i64) -> Result<Encoded> {
        let mut ids = vec![self.start_id];
        ids.extend(self.encode(text)?);
        ids.truncate(max_len.saturating_sub(1));
        ids.push(self.end_id);
        let real = ids.len();
        ids.resize(max_len, pad_id);
        let mut attention_mask = vec![1; real];
        attention_mask.resize(max_len, 0);
        Ok(Encoded { ids, attention_mask })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_word_vocabulary_spells_its_words_as_single_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let (vocab, merges) = ClipTokenizer::word_vocabulary(&["dog", "do", "sks", "beach", "on", "the"]);
        std::fs::write(dir.path().join("vocab.json"), vocab).unwrap();
        std::fs::write(dir.path().join("merges.txt"), merges).unwrap();
        let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
        let ids = tok.encode("a sks dog on the beach").unwrap();
        assert_eq!(ids.len(), 6, "`a` is a byte symbol, the rest one token each: {ids:?}");
        assert_eq!(ids[0], tok.token_id("a</w>").unwrap());
        assert_eq!(ids[2], tok.token_id("dog</w>").unwrap());
        // Unknown words fall back to pieces, never fail.
        assert!(tok.encode("a zebra").unwrap().len() > 2);
        assert_eq!(tok.vocab_size() as i64, tok.end_id() + 1);
    }

    #[test]
    fn loads_a_vocab_and_merges_folder() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = dir.path().join("vocab.json");
        let merges = dir.path().join("merges.txt");
        std::fs::write(
            &vocab,
            r#"{"a": 0, "b": 1, "b</w>": 2, "ab</w>": 3, "a</w>": 4, "<|startoftext|>": 5, "<|endoftext|>": 6}"#,
        )
        .unwrap();
        std::fs::write(&merges, "#version: 0.2\na b</w>\n").unwrap();
        let tok = ClipTokenizer::from_vocab_merges(&vocab, &merges).unwrap();
        assert_eq!(tok.encode("AB  a").unwrap(), vec![3, 4]);
        assert_eq!(tok.encode_padded("ab", 4, 0).unwrap().ids, vec![5, 3, 6, 0]);
        let err = tok.encode("c").unwrap_err().to_string();
        assert!(err.contains("not in the vocabulary"), "{err}");
        std::fs::write(&vocab, r#"{"a": 0}"#).unwrap();
        let err = ClipTokenizer::from_vocab_merges(&vocab, &merges).unwrap_err().to_string();
        assert!(err.contains("vocab.json") && err.contains("<|startoftext|>"), "{err}");
    }
}
