//! LoRA (Hu et al. 2021): low-rank adapters `W x + (α / r) · B A x` on chosen linear layers, with
//! the adapters in their own variable store (the base stays frozen and bit-identical).
//!
//! Variable names follow PEFT: `<module>.lora_A.weight` (`[r, in]`) and `<module>.lora_B.weight`
//! (`[out, r]`). Files: [`save_lora`] writes `<prefix>.<module>.lora_A.weight` / `lora_B.weight`
//! (the layout diffusers' `load_lora_weights` reads), folding `α / r` into `B` so the file means
//! the same with any reader's default scale; [`load_lora`] reads that layout and diffusers' own
//! `<module>.lora.down.weight` / `lora.up.weight`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Tensor};

use crate::error::Result;
use crate::rng::{name_key, Draws, Stream};
use crate::weights::{check_all_present, copy_into, read_safetensors};

/// Which layers get adapters, and their size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: i64,
    /// Scale numerator `α` (the update is scaled by `α / r`).
    pub alpha: f64,
    /// Module names (last path components, e.g. `to_q`, `to_out.0`).
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// Attention projections of the diffusers UNet: `to_q`, `to_k`, `to_v`, `to_out.0`.
    pub fn attention(rank: i64, alpha: f64) -> Self {
        LoraConfig {
            rank,
            alpha,
            target_modules: ["to_q", "to_k", "to_v", "to_out.0"].map(String::from).to_vec(),
        }
    }

    fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|t| module == t || module.ends_with(&format!(".{t}")))
    }

    fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// Turns every adapter of a model on or off at once (on when made). Off, each adapted layer
/// computes its base alone, exactly as a model built without adapters: what lets the class-prior
/// sampler draw from the *untuned* supervisor on the copy the tuner is training.
#[derive(Clone, Debug)]
pub struct LoraSwitch(Arc<AtomicBool>);

impl Default for LoraSwitch {
    fn default() -> Self {
        LoraSwitch(Arc::new(AtomicBool::new(true)))
    }
}

impl LoraSwitch {
    /// Whether the adapters apply.
    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Turns the adapters on or off.
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::SeqCst);
    }
}

/// Where adapters are created: the root of the adapters' variable store, the config, and the
/// switch they obey.
#[derive(Clone, Copy, Debug)]
pub struct LoraSpec<'a, 'p> {
    /// Root of the adapter variable store.
    pub root: &'a nn::Path<'p>,
    /// The config.
    pub config: &'a LoraConfig,
    /// The model's switch for all its adapters.
    pub switch: &'a LoraSwitch,
}

/// A linear layer with an optional LoRA adapter.
///
/// # Shapes
/// `[.., in] -> [.., out]`.
#[derive(Debug)]
pub struct LoraLinear {
    base: nn::Linear,
    adapter: Option<(Tensor, Tensor, f64, LoraSwitch)>,
}

impl LoraLinear {
    /// A linear layer at `vs` (its base variables), with an adapter when `lora` targets it.
    pub fn new(vs: nn::Path, c_in: i64, c_out: i64, cfg: nn::LinearConfig, lora: Option<LoraSpec>) -> Self {
        let module: Vec<String> = vs.components().map(String::from).collect();
        let base = crate::nn::linear(vs, c_in, c_out, cfg);
        let adapter = lora.filter(|l| l.config.targets(&module.join("."))).map(|l| {
            let p = module.iter().fold(l.root.clone(), |p, c| &p / c.as_str());
            let a = (&p / "lora_A").kaiming_uniform("weight", &[l.config.rank, c_in]);
            let b = (&p / "lora_B").zeros("weight", &[c_out, l.config.rank]);
            (a, b, l.config.scale(), l.switch.clone())
        });
        LoraLinear { base, adapter }
    }
}

impl Module for LoraLinear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let y = self.base.forward(xs);
        match &self.adapter {
            // The adapter computes in its own precision (float32 under bf16 mixed precision).
            Some((a, b, scale, switch)) if switch.is_on() => {
                let kind = y.kind();
                y + (xs.to_kind(a.kind()).matmul(&a.tr()).matmul(&b.tr()) * *scale).to_kind(kind)
            }
            _ => y,
        }
    }
}

/// Saves the adapters of `vs` as `<prefix>.<module>.lora_{A,B}.weight`, with `α / r` folded into B.
pub fn save_lora(vs: &nn::VarStore, config: &LoraConfig, prefix: &str, path: &Path) -> Result<()> {
    let scale = config.scale();
    let named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| {
            let t = if name.ends_with(".lora_B.weight") { &t * scale } else { t.copy() };
            (format!("{prefix}.{name}"), t.detach())
        })
        .collect();
    crate::weights::write_safetensors(named, path)
}

/// The file beside an adapter that holds its [`LoraConfig`] (rank, α, target modules).
pub const CONFIG_FILE: &str = "lora_config.json";

/// Writes `config` as [`CONFIG_FILE`] into `dir`.
pub fn save_config(config: &LoraConfig, dir: &Path) -> Result<()> {
    let path = dir.join(CONFIG_FILE);
    let json = serde_json::to_string_pretty(config).expect("LoRA config serialises");
    std::fs::write(&path, json).map_err(|source| crate::error::ModelError::Io { path, source })
}

/// Reads the [`LoraConfig`] beside the adapter file `adapter`.
pub fn read_config(adapter: &Path) -> Result<LoraConfig> {
    let path = adapter.parent().unwrap_or(Path::new(".")).join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|source| crate::error::ModelError::Io { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|e| crate::error::ModelError::Config {
        what: path.display().to_string(),
        message: format!("not a LoRA config: {e}"),
    })
}

/// Re-initialises every adapter of `vs` as PEFT does (A kaiming-uniform with bound
/// `1/sqrt(fan_in)`, B zero), drawing A from `seed` and the variable's name rather than libtorch's
/// global generator, so a run's starting point depends on its seed alone.
pub fn reset_lora(vs: &nn::VarStore, seed: u64) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for (name, mut t) in vs.variables() {
            if name.ends_with(".lora_B.weight") {
                let _ = t.f_zero_()?;
            } else if name.ends_with(".lora_A.weight") {
                let fan_in = t.size().get(1).copied().unwrap_or(1).max(1);
                let bound = 1.0 / (fan_in as f64).sqrt();
                let values =
                    Draws::new(seed, Stream::LoraInit, name_key(&name)).uniform(&t.size(), -bound, bound);
                t.f_copy_(&values.to_device(t.device()).to_kind(t.kind()))?;
            }
        }
        Ok(())
    })
}

/// Loads adapter weights saved by [`save_lora`], diffusers or PEFT into `vs` (the adapters of a
/// model built with `config`). Every adapter variable must be in the file; shapes are checked.
pub fn load_lora(vs: &mut nn::VarStore, config: &LoraConfig, prefix: &str, path: &Path) -> Result<()> {
    let strip = format!("{prefix}.");
    // Files carry the update as-is (scale 1); our variables are multiplied by α / r.
    let unscale = 1.0 / config.scale();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (key, t) in read_safetensors(path)? {
        let Some(name) = key.strip_prefix(&strip) else { continue };
        let name =
            name.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight");
        let t = if name.ends_with(".lora_B.weight") { t * unscale } else { t };
        tensors.insert(name, t);
    }
    let variables = vs.variables();
    check_all_present(&variables, &tensors, path, &strip)?;
    copy_into(variables, &tensors)
}
