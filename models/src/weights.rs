//! Loading and saving a [`tch::nn::VarStore`] as safetensors, with errors that name the file, the
//! tensor key and the shapes. The variable paths of our models are the reference checkpoints' keys,
//! so a diffusers/transformers safetensors file loads by name.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use tch::{nn::VarStore, Tensor};

use crate::error::{ModelError, Result};

/// How strictly [`load_safetensors`] matches the checkpoint against the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strictness {
    /// Every model variable must be present; extra checkpoint tensors are an error.
    Strict,
    /// Every model variable must be present; extra checkpoint tensors are ignored (e.g. a
    /// checkpoint that also holds heads this model does not use).
    AllowUnexpected,
}

/// Reads every tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let tensors = Tensor::read_safetensors(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    Ok(tensors.into_iter().collect())
}

/// The tensor names of a safetensors file, read from its header only.
pub fn safetensors_keys(path: &Path) -> Result<Vec<String>> {
    Ok(crate::shapes::read_header(path)?.into_keys().collect())
}

/// Loads a safetensors checkpoint into `vs` by variable path, checking every shape first; the
/// store is only written once the whole checkpoint has been checked, so a bad file changes nothing.
/// Values are converted to each variable's dtype and device.
pub fn load_safetensors(vs: &mut VarStore, path: &Path, strictness: Strictness) -> Result<()> {
    load_safetensors_files(vs, &[path.to_path_buf()], strictness)
}

/// [`load_safetensors`] over several files (a sharded checkpoint's shards, from
/// [`crate::shapes::weight_files`]): their tensors together must satisfy the model. Everything is
/// checked from the headers before a byte of data is read; then the tensors are read one at a
/// time, each straight from its file offset, converted to its variable's dtype and device and
/// copied in, so host memory holds one tensor beside the model, never a whole file. Tensors the
/// model does not have are never read.
pub fn load_safetensors_files(
    vs: &mut VarStore,
    files: &[std::path::PathBuf],
    strictness: Strictness,
) -> Result<()> {
    let header = crate::shapes::read_headers(files)?;
    let path = files.first().map(|f| f.as_path()).unwrap_or(Path::new(""));
    let variables = vs.variables();
    check_shapes(&variables, |k| header.get(k).map(|e| e.shape.clone()), path, "")?;
    if strictness == Strictness::Strict {
        let extra: BTreeSet<&String> = header.keys().filter(|k| !variables.contains_key(*k)).collect();
        if !extra.is_empty() {
            return Err(ModelError::UnexpectedTensors {
                path: path.to_path_buf(),
                keys: extra.into_iter().take(8).cloned().collect(),
            });
        }
    }
    let mut open: HashMap<std::path::PathBuf, std::fs::File> = HashMap::new();
    tch::no_grad(|| {
        for (name, mut var) in variables {
            let entry = &header[&name];
            let file = match open.entry(entry.file.clone()) {
                std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(
                    std::fs::File::open(&entry.file)
                        .map_err(|source| ModelError::Io { path: entry.file.clone(), source })?,
                ),
            };
            let src = read_tensor(file, &name, entry)?;
            // `copy_` converts the dtype and crosses devices itself: no converted temporary of
            // the whole tensor on either side.
            var.f_copy_(&src)?;
        }
        Ok::<(), ModelError>(())
    })
}

/// One tensor's bytes from its file, as a CPU tensor of its stored dtype.
fn read_tensor(file: &std::fs::File, name: &str, entry: &crate::shapes::HeaderEntry) -> Result<Tensor> {
    use std::os::unix::fs::FileExt;
    let bad = |m: String| ModelError::Io {
        path: entry.file.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("tensor `{name}`: {m}")),
    };
    let kind = match entry.dtype.as_str() {
        "F32" => tch::Kind::Float,
        "F16" => tch::Kind::Half,
        "BF16" => tch::Kind::BFloat16,
        "F64" => tch::Kind::Double,
        "I64" => tch::Kind::Int64,
        "I32" => tch::Kind::Int,
        "I16" => tch::Kind::Int16,
        "I8" => tch::Kind::Int8,
        "U8" => tch::Kind::Uint8,
        "BOOL" => tch::Kind::Bool,
        other => return Err(bad(format!("unsupported dtype {other}"))),
    };
    let (start, end) = entry.data;
    let expected = entry.numel() * entry.element_bytes();
    if end < start || end - start != expected {
        return Err(bad(format!(
            "{} bytes for {:?} of {}",
            end.saturating_sub(start),
            entry.shape,
            entry.dtype
        )));
    }
    // Read straight into the storage of a fresh CPU tensor of the stored dtype: no zeroed buffer,
    // no second copy.
    let tensor = Tensor::f_empty(&entry.shape, (kind, tch::Device::Cpu))?;
    if expected > 0 {
        // SAFETY: `tensor` is a new, contiguous CPU tensor that owns exactly `expected` bytes
        // (numel × element size of its dtype, checked against the header above), nothing else
        // refers to it yet, and the slice does not outlive this block.
        let storage =
            unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut u8, expected as usize) };
        file.read_exact_at(storage, start).map_err(|e| bad(format!("cannot read its bytes: {e}")))?;
    }
    Ok(tensor)
}

/// Checks that every variable has a same-shaped tensor in `tensors` (in sorted order, so the first
/// bad key reported is deterministic); `key_prefix` is how the file spells the names' prefix.
pub(crate) fn check_all_present(
    variables: &HashMap<String, Tensor>,
    tensors: &HashMap<String, Tensor>,
    path: &Path,
    key_prefix: &str,
) -> Result<()> {
    check_shapes(variables, |k| tensors.get(k).map(|t| t.size()), path, key_prefix)
}

/// [`check_all_present`] against any source of shapes by key.
fn check_shapes(
    variables: &HashMap<String, Tensor>,
    shape_of: impl Fn(&str) -> Option<Vec<i64>>,
    path: &Path,
    key_prefix: &str,
) -> Result<()> {
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    for name in names {
        let var = &variables[name];
        let key = || format!("{key_prefix}{name}");
        let Some(found) = shape_of(name) else {
            return Err(ModelError::MissingTensor {
                path: path.to_path_buf(),
                key: key(),
                expected: var.size(),
            });
        };
        if found != var.size() {
            return Err(ModelError::ShapeMismatch {
                path: path.to_path_buf(),
                key: key(),
                expected: var.size(),
                found,
            });
        }
    }
    Ok(())
}

/// Copies each checked tensor into its variable (converted to the variable's dtype and device).
pub(crate) fn copy_into(variables: HashMap<String, Tensor>, tensors: &HashMap<String, Tensor>) -> Result<()> {
    tch::no_grad(|| {
        for (name, mut var) in variables {
            let src = &tensors[&name];
            var.f_copy_(&src.f_to_kind(var.kind())?.f_to_device(var.device())?)?;
        }
        Ok::<(), tch::TchError>(())
    })?;
    Ok(())
}

/// Saves every variable of `vs` to a safetensors file (keys = variable paths).
pub fn save_safetensors(vs: &VarStore, path: &Path) -> Result<()> {
    let named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    write_safetensors(named, path)
}

/// Writes named tensors to `path` (sorted by name; parent folders created).
pub fn write_safetensors(mut named: Vec<(String, Tensor)>, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;
    use crate::nn::{Mlp, MlpConfig};

    fn model(seed: u64) -> (VarStore, Mlp) {
        let vs = VarStore::new(Device::Cpu);
        let mlp =
            Mlp::new(vs.root() / "head", &MlpConfig { in_features: 3, hidden_features: 5, out_features: 2 });
        crate::rng::redraw_initial_values(&vs, seed);
        (vs, mlp)
    }

    #[test]
    fn round_trips_bit_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/model.safetensors");
        let (vs, _) = model(1);
        save_safetensors(&vs, &path).unwrap();
        let (mut other, mlp) = model(2);
        let xs = crate::rng::Draws::new(0, crate::rng::Stream::Train, 0).normal(&[4, 3], Device::Cpu);
        assert!(!vs.variables()["head.fc1.weight"].equal(&other.variables()["head.fc1.weight"]), "two seeds");
        load_safetensors(&mut other, &path, Strictness::Strict).unwrap();
        let a = vs.variables();
        let b = other.variables();
        assert_eq!(a.len(), 4);
        for (name, t) in &a {
            assert!(t.equal(&b[name]), "{name} differs after the round trip");
        }
        assert_eq!(mlp.forward(&xs).size(), vec![4, 2]);
        // The keys are the variable paths.
        let keys: BTreeSet<String> = read_safetensors(&path).unwrap().into_keys().collect();
        let expected: BTreeSet<String> =
            ["head.fc1.bias", "head.fc1.weight", "head.fc2.bias", "head.fc2.weight"].map(String::from).into();
        assert_eq!(keys, expected);
    }

    #[test]
    fn bad_checkpoints_name_the_key_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let wrong = [
            ("head.fc1.weight".to_string(), Tensor::zeros([5, 3], (Kind::Float, Device::Cpu))),
            ("head.fc1.bias".to_string(), Tensor::zeros([5], (Kind::Float, Device::Cpu))),
            ("head.fc2.weight".to_string(), Tensor::zeros([2, 4], (Kind::Float, Device::Cpu))),
            ("head.fc2.bias".to_string(), Tensor::zeros([2], (Kind::Float, Device::Cpu))),
        ];
        Tensor::write_safetensors(&wrong, &path).unwrap();
        let (mut vs, _) = model(3);
        let before: HashMap<String, Tensor> =
            vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
        let err = load_safetensors(&mut vs, &path, Strictness::Strict).unwrap_err().to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("`head.fc2.weight`") && err.contains("[2, 4]"),
            "{err}"
        );
        for (name, t) in vs.variables() {
            assert!(t.equal(&before[&name]), "{name} was modified by a failed load");
        }

        Tensor::write_safetensors(&wrong[..2], &path).unwrap();
        let err = load_safetensors(&mut vs, &path, Strictness::Strict).unwrap_err().to_string();
        assert!(err.contains("missing tensor `head.fc2.bias`"), "{err}");

        let missing = dir.path().join("nope.safetensors");
        let err = load_safetensors(&mut vs, &missing, Strictness::Strict).unwrap_err().to_string();
        assert!(err.contains("nope.safetensors"), "{err}");

        std::fs::write(&path, b"not a safetensors file").unwrap();
        let err = load_safetensors(&mut vs, &path, Strictness::Strict).unwrap_err().to_string();
        assert!(err.contains("bad.safetensors"), "{err}");
    }

    #[test]
    fn strictness_controls_extra_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extra.safetensors");
        let (vs, _) = model(4);
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.push(("lm_head.weight".into(), Tensor::ones([2], (Kind::Float, Device::Cpu))));
        Tensor::write_safetensors(&named, &path).unwrap();
        let (mut other, _) = model(5);
        let err = load_safetensors(&mut other, &path, Strictness::Strict).unwrap_err().to_string();
        assert!(err.contains("lm_head.weight"), "{err}");
        load_safetensors(&mut other, &path, Strictness::AllowUnexpected).unwrap();
    }
}
