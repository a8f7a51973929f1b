//! Training checkpoints shared by every trainer: a folder `checkpoint-<step>/` under a run's root
//! holding the trained tensors (`trainable.safetensors`), the optimiser moments
//! (`optimizer.safetensors`), the EMA when there is one (`ema.safetensors`), any files the trainer
//! adds (a LoRA in its interchange layout, say) and `state.json` (the trainer's own state: step,
//! RNG and data position, config). Written to a temporary folder and renamed into place, so a crash
//! never leaves a half checkpoint that looks complete; older ones beyond `keep` are deleted.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tch::Tensor;

use crate::error::{ModelError, Result};
use crate::optim::{AdamW, Ema};
use crate::weights::{read_safetensors, write_safetensors};

const TRAINABLE_FILE: &str = "trainable.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const EMA_FILE: &str = "ema.safetensors";
const STATE_FILE: &str = "state.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.to_path_buf();
    move |source| ModelError::Io { path, source }
}

fn shallow(named: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    named.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect()
}

/// Writes `checkpoint-<step>` under `root`; `extra` adds files to the (temporary) folder first.
pub fn save(
    root: &Path,
    step: u64,
    keep: usize,
    optimizer: &AdamW,
    ema: Option<&Ema>,
    state: &impl Serialize,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let name = format!("checkpoint-{step:08}");
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write_safetensors(shallow(optimizer.params()), &tmp.join(TRAINABLE_FILE))?;
    write_safetensors(optimizer.state(), &tmp.join(OPTIMIZER_FILE))?;
    if let Some(ema) = ema {
        write_safetensors(shallow(ema.shadow()), &tmp.join(EMA_FILE))?;
    }
    extra(&tmp)?;
    let json = serde_json::to_string_pretty(state).expect("checkpoint state serialises");
    std::fs::write(tmp.join(STATE_FILE), json).map_err(io(&tmp.join(STATE_FILE)))?;
    let dest = root.join(&name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
    }
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    let mut all = list(root)?;
    while all.len() > keep.max(1) {
        let (_, old) = all.remove(0);
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(dest)
}

/// Reads a checkpoint's `state.json`.
pub fn read_state<S: DeserializeOwned>(checkpoint: &Path) -> Result<S> {
    let path = checkpoint.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Config { what: path.display().to_string(), message: e.to_string() })
}

/// Refuses to resume when a setting that decides the run's draws or data differs from the
/// checkpoint's: `fields` pairs each setting's name with whether it is the same; the error names
/// the first that is not as `<prefix>.<name>`.
pub fn same_settings(checkpoint: &Path, prefix: &str, fields: &[(&str, bool)]) -> Result<()> {
    match fields.iter().find(|(_, same)| !same) {
        Some((field, _)) => Err(ModelError::Config {
            what: format!("{prefix}.{field}"),
            message: format!("differs from the checkpoint {}", checkpoint.display()),
        }),
        None => Ok(()),
    }
}

/// Restores the trained tensors, the optimiser moments (and step count `steps`) and the EMA
/// (`ema_updates`) of a checkpoint into `optimizer` / `ema`. Shapes and names are checked.
pub fn restore(
    checkpoint: &Path,
    optimizer: &mut AdamW,
    steps: u64,
    ema: Option<(&mut Ema, u64)>,
) -> Result<()> {
    let path = checkpoint.join(TRAINABLE_FILE);
    let mut weights = read_safetensors(&path)?;
    tch::no_grad(|| -> Result<()> {
        for (name, p) in optimizer.params() {
            let t = weights.remove(name).ok_or_else(|| ModelError::MissingTensor {
                path: path.clone(),
                key: name.clone(),
                expected: p.size(),
            })?;
            if t.size() != p.size() {
                return Err(ModelError::ShapeMismatch {
                    path: path.clone(),
                    key: name.clone(),
                    expected: p.size(),
                    found: t.size(),
                });
            }
            p.shallow_clone().f_copy_(&t.to_kind(p.kind()))?;
        }
        Ok(())
    })?;
    optimizer.load_state(&checkpoint.join(OPTIMIZER_FILE), steps)?;
    if let Some((ema, updates)) = ema {
        ema.load_state(&checkpoint.join(EMA_FILE), updates)?;
    }
    Ok(())
}

/// Checkpoint folders under `root`, oldest first, with their steps (complete ones only).
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ModelError::Io { path: root.to_path_buf(), source }),
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join(STATE_FILE).is_file().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list(root)?.pop().map(|(_, p)| p))
}
