//! A Stable Diffusion pipeline over a diffusers model folder: `model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/` (`vocab.json` + `merges.txt`, or `tokenizer.json`) and `scheduler/`. Text-to-image
//! sampling with classifier-free guidance from caller-provided initial noise (deterministic).
//!
//! SD 1.x/2.x: one CLIP text encoder, its last hidden state as context, no attention mask (as the
//! reference pipeline does by default). SDXL (`text_encoder_2/`, `tokenizer_2/`): both encoders'
//! penultimate hidden states concatenated as context, the second encoder's projected pooled output
//! and the size/crop time ids as the UNet's `text_time` conditioning, and zero embeddings for an
//! empty negative prompt when `force_zeros_for_empty_prompt` (diffusers' defaults).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use tch::{nn, Device, Kind, Tensor};

use super::scheduler::{guide, Sampler, SchedulerConfig};
use super::unet::{AddedCond, UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKl, VaeConfig};
use crate::error::{ModelError, Result};
use crate::lora::{LoraConfig, LoraSpec, LoraSwitch};
use crate::recompute::{self, Segment};
use crate::tokenizer::clip::ClipTokenizer;
use crate::transformer::clip::{ClipTextConfig, ClipTextModelWithProjection, ClipTextTransformer};
use crate::weights::{load_safetensors_files, Strictness};

/// Which sampler to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// DDIM, η = 0.
    Ddim,
    /// Euler.
    Euler,
}

/// How [`StableDiffusion::load_with`] loads a folder.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions<'a> {
    /// Fresh LoRA adapters (B = 0) on the UNet layers it targets, in `stores.unet_lora`.
    pub lora: Option<&'a LoraConfig>,
    /// The weight files' variant (`fp16`), when not the plain files.
    pub variant: Option<&'a str>,
    /// The UNet's weight kind (float32 or bfloat16); the text encoders and the VAE stay float32.
    pub unet_kind: Kind,
}

impl Default for LoadOptions<'_> {
    fn default() -> Self {
        LoadOptions { lora: None, variant: None, unet_kind: Kind::Float }
    }
}

/// A loaded Stable Diffusion model.
#[derive(Debug)]
pub struct StableDiffusion {
    /// The denoiser.
    pub unet: UNet2DConditionModel,
    /// The autoencoder.
    pub vae: AutoencoderKl,
    /// The text encoder.
    pub text_encoder: ClipTextTransformer,
    /// The tokenizer.
    pub tokenizer: ClipTokenizer,
    /// The scheduler config.
    pub scheduler: SchedulerConfig,
    /// The text encoder's context length.
    pub max_length: usize,
    /// The padding id of the tokenizer.
    pub pad_id: i64,
    /// Variable stores (kept alive; LoRA and training attach here).
    pub stores: Stores,
    /// SDXL's second text encoder, when the folder has one.
    pub text_encoder_2: Option<SecondTextEncoder>,
    /// Use zero embeddings for an empty negative prompt (SDXL).
    pub force_zeros_for_empty_prompt: bool,
    /// The UNet's LoRA adapters' config, when it has adapters.
    pub lora: Option<LoraConfig>,
    /// Turns the UNet's LoRA adapters on and off (on; see [`StableDiffusion::without_adapters`]).
    pub lora_switch: LoraSwitch,
    /// Pixels per latent cell along each side (`2^(VAE levels - 1)`).
    pub vae_scale_factor: i64,
    /// Latent channels the UNet takes.
    pub latent_channels: i64,
    /// Images per VAE call when decoding or encoding (`None`: the whole batch at once; `Some(1)`
    /// is diffusers' VAE slicing: the peak of one image's activations, whatever the batch).
    pub vae_batch: Option<i64>,
    device: Device,
}

/// Loaded, not yet dropped [`StableDiffusion`]s of this process, and their most at once.
static RESIDENT: AtomicUsize = AtomicUsize::new(0);
static RESIDENT_PEAK: AtomicUsize = AtomicUsize::new(0);

impl Drop for StableDiffusion {
    fn drop(&mut self) {
        RESIDENT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The variable stores of the three networks (and of the UNet's LoRA adapters, when present).
#[derive(Debug)]
pub struct Stores {
    /// UNet variables.
    pub unet: nn::VarStore,
    /// UNet LoRA adapter variables (empty without LoRA).
    pub unet_lora: nn::VarStore,
    /// VAE variables.
    pub vae: nn::VarStore,
    /// Text encoder variables.
    pub text_encoder: nn::VarStore,
    /// Second text encoder variables (empty without one).
    pub text_encoder_2: nn::VarStore,
}

/// SDXL's second text encoder with its tokenizer.
#[derive(Debug)]
pub struct SecondTextEncoder {
    /// `CLIPTextModelWithProjection`.
    pub model: ClipTextModelWithProjection,
    /// Its tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Its context length.
    pub max_length: usize,
    /// Its padding id.
    pub pad_id: i64,
}

/// Text conditioning of a batch of prompts.
#[derive(Debug)]
pub struct Conditioning {
    /// Cross-attention context `[B, T, D]`.
    pub context: Tensor,
    /// Pooled text embeddings `[B, P]` (SDXL's `text_embeds`), when the UNet takes them.
    pub pooled: Option<Tensor>,
}

impl Conditioning {
    /// Another handle on the same tensors.
    pub fn shallow_clone(&self) -> Conditioning {
        Conditioning {
            context: self.context.shallow_clone(),
            pooled: self.pooled.as_ref().map(Tensor::shallow_clone),
        }
    }

    /// Row `i` repeated `n` times.
    pub fn repeat_row(&self, i: i64, n: i64) -> Conditioning {
        let rep = |t: &Tensor| {
            let row = t.narrow(0, i, 1);
            let mut shape = vec![n];
            shape.extend(&row.size()[1..]);
            row.expand(&shape, false)
        };
        Conditioning { context: rep(&self.context), pooled: self.pooled.as_ref().map(rep) }
    }

    /// Both conditionings stacked along the batch (`self` first).
    pub fn cat(&self, other: &Conditioning) -> Conditioning {
        Conditioning {
            context: Tensor::cat(&[&self.context, &other.context], 0),
            pooled: match (&self.pooled, &other.pooled) {
                (Some(a), Some(b)) => Some(Tensor::cat(&[a, b], 0)),
                _ => None,
            },
        }
    }
}

fn read_text_config(path: &Path) -> Result<ClipTextConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Config { what: path.display().to_string(), message: e.to_string() })
}

/// Whether a transformers text-encoder checkpoint prefixes its tower with `text_model.` (published
/// SD checkpoints do; transformers 5 saves `CLIPTextModel` without it). Loading follows the file.
fn text_model_prefixed(weights: &[PathBuf]) -> Result<bool> {
    for w in weights {
        if crate::weights::safetensors_keys(w)?.iter().any(|k| k.starts_with("text_model.")) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The weight files of a component folder: `diffusion_pytorch_model` or `model`, with the variant
/// (`fp16` reads `*.fp16.safetensors`) when given, single or sharded.
fn weights_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    crate::shapes::weight_files(dir, &["diffusion_pytorch_model", "model"], variant)
}

fn must_exist(path: PathBuf) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(ModelError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "missing from the model folder"),
        })
    }
}

impl StableDiffusion {
    /// Loads a diffusers model folder onto `device`. A missing file or a bad config is an error
    /// naming it.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        Self::load_with_lora(dir, device, None)
    }

    /// Like [`StableDiffusion::load`], with fresh LoRA adapters (B = 0) on the UNet layers that
    /// `lora` targets, in `stores.unet_lora`.
    pub fn load_with_lora(dir: &Path, device: Device, lora: Option<&LoraConfig>) -> Result<Self> {
        Self::load_with(dir, device, &LoadOptions { lora, ..Default::default() })
    }

    /// Loads a diffusers model folder onto `device` as `options` say: fresh LoRA adapters, the
    /// weight files of a variant (`fp16`: `diffusion_pytorch_model.fp16.safetensors`, …; sharded
    /// components load through their index), and the UNet built directly in its kind (bfloat16
    /// halves its memory and is never materialised in float32).
    pub fn load_with(dir: &Path, device: Device, options: &LoadOptions) -> Result<Self> {
        let (lora, variant) = (options.lora, options.variant);
        must_exist(dir.join("model_index.json"))?;
        let unet_cfg = UNetConfig::from_json(&must_exist(dir.join("unet/config.json"))?)?;
        let vae_cfg = VaeConfig::from_json(&must_exist(dir.join("vae/config.json"))?)?;
        let text_path = must_exist(dir.join("text_encoder/config.json"))?;
        let scheduler =
            SchedulerConfig::from_json(&must_exist(dir.join("scheduler/scheduler_config.json"))?)?;
        let tokenizer = ClipTokenizer::from_folder(&must_exist(dir.join("tokenizer"))?)?;
        let pad_id = tokenizer_pad_id(&dir.join("tokenizer"), &tokenizer);

        let mut unet_vs = nn::VarStore::new(device);
        unet_vs.set_kind(options.unet_kind); // new variables are made in this kind
        let unet_lora = nn::VarStore::new(device);
        let lora_switch = LoraSwitch::default();
        let spec = lora.map(|config| (unet_lora.root(), config));
        // Every component's variables come from its files: built without drawing initial values.
        let unet = crate::nn::for_loading(|| {
            UNet2DConditionModel::with_lora(
                unet_vs.root(),
                &unet_cfg,
                spec.as_ref().map(|(root, config)| LoraSpec { root, config, switch: &lora_switch }),
            )
        })?;
        load_safetensors_files(
            &mut unet_vs,
            &weights_files(&dir.join("unet"), variant)?,
            Strictness::Strict,
        )?;
        let mut vae_vs = nn::VarStore::new(device);
        let vae = crate::nn::for_loading(|| AutoencoderKl::new(vae_vs.root(), &vae_cfg));
        load_safetensors_files(&mut vae_vs, &weights_files(&dir.join("vae"), variant)?, Strictness::Strict)?;
        let text_cfg = read_text_config(&text_path)?;
        let mut text_vs = nn::VarStore::new(device);
        let text_weights = weights_files(&dir.join("text_encoder"), variant)?;
        let root =
            if text_model_prefixed(&text_weights)? { text_vs.root() / "text_model" } else { text_vs.root() };
        let text_encoder = crate::nn::for_loading(|| ClipTextTransformer::new(root, &text_cfg))?;
        // The checkpoint may hold the `position_ids` buffer; it is not a parameter here.
        load_safetensors_files(&mut text_vs, &text_weights, Strictness::AllowUnexpected)?;

        let mut text2_vs = nn::VarStore::new(device);
        let text_encoder_2 = if dir.join("text_encoder_2").is_dir() {
            let cfg = read_text_config(&must_exist(dir.join("text_encoder_2/config.json"))?)?;
            let weights = weights_files(&dir.join("text_encoder_2"), variant)?;
            let tower =
                if text_model_prefixed(&weights)? { text2_vs.root() / "text_model" } else { text2_vs.root() };
            let model =
                crate::nn::for_loading(|| ClipTextModelWithProjection::new(text2_vs.root(), tower, &cfg))?;
            load_safetensors_files(&mut text2_vs, &weights, Strictness::AllowUnexpected)?;
            let tokenizer = ClipTokenizer::from_folder(&must_exist(dir.join("tokenizer_2"))?)?;
            let pad_id = tokenizer_pad_id(&dir.join("tokenizer_2"), &tokenizer);
            Some(SecondTextEncoder {
                model,
                tokenizer,
                max_length: cfg.max_position_embeddings as usize,
                pad_id,
            })
        } else {
            None
        };
        if unet_cfg.addition_embed_type.as_deref() == Some("text_time") && text_encoder_2.is_none() {
            return Err(ModelError::Config {
                what: dir.join("model_index.json").display().to_string(),
                message: "the UNet takes text_time conditioning but the folder has no text_encoder_2".into(),
            });
        }
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("model_index.json"))
                .map_err(|source| ModelError::Io { path: dir.join("model_index.json"), source })?,
        )
        .map_err(|e| ModelError::Config {
            what: dir.join("model_index.json").display().to_string(),
            message: e.to_string(),
        })?;
        let force_zeros_for_empty_prompt =
            index.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(false);
        let now = RESIDENT.fetch_add(1, Ordering::SeqCst) + 1;
        RESIDENT_PEAK.fetch_max(now, Ordering::SeqCst);
        Ok(StableDiffusion {
            unet,
            vae,
            text_encoder,
            tokenizer,
            scheduler,
            max_length: text_cfg.max_position_embeddings as usize,
            pad_id,
            stores: Stores {
                unet: unet_vs,
                unet_lora,
                vae: vae_vs,
                text_encoder: text_vs,
                text_encoder_2: text2_vs,
            },
            text_encoder_2,
            force_zeros_for_empty_prompt,
            lora: lora.cloned(),
            lora_switch,
            vae_scale_factor: vae_cfg.scale_factor(),
            latent_channels: unet_cfg.in_channels,
            vae_batch: None,
            device,
        })
    }

    /// Models of this process loaded and not yet dropped: `(now, the most at any moment)`. A
    /// job's stages load their own copies; these figures show how many were resident together.
    pub fn resident() -> (usize, usize) {
        (RESIDENT.load(Ordering::SeqCst), RESIDENT_PEAK.load(Ordering::SeqCst))
    }

    /// Runs `f` with the UNet's LoRA adapters off: the base model, exactly as loaded without
    /// adapters, whatever the adapters have been trained to. They are on again when `f` returns
    /// (or unwinds). Callers sharing the model across threads hold it exclusively meanwhile.
    pub fn without_adapters<R>(&self, f: impl FnOnce(&Self) -> R) -> R {
        struct On<'a>(&'a LoraSwitch, bool);
        impl Drop for On<'_> {
            fn drop(&mut self) {
                self.0.set(self.1);
            }
        }
        let _restore = On(&self.lora_switch, self.lora_switch.is_on());
        self.lora_switch.set(false);
        f(self)
    }

    /// The device the model lives on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The shape of one image's initial latent noise at `height × width` pixels.
    pub fn latent_shape(&self, height: i64, width: i64) -> Result<[i64; 4]> {
        let f = self.vae_scale_factor;
        if height <= 0 || width <= 0 || height % f != 0 || width % f != 0 {
            return Err(ModelError::Config {
                what: "image size".into(),
                message: format!("{height}x{width} is not a positive multiple of the VAE factor {f}"),
            });
        }
        Ok([1, self.latent_channels, height / f, width / f])
    }

    /// The element type of the UNet's weights (bfloat16 after mixed-precision set-up).
    pub fn unet_kind(&self) -> tch::Kind {
        self.unet.kind()
    }

    /// Text conditioning for prompts (each padded to its encoder's context length).
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Conditioning> {
        let ids = |tokenizer: &ClipTokenizer, max_length: usize, pad_id: i64| -> Result<Tensor> {
            let mut ids = Vec::new();
            for p in prompts {
                ids.extend(tokenizer.encode_padded(p, max_length, pad_id)?.ids);
            }
            Ok(Tensor::from_slice(&ids).view([prompts.len() as i64, -1]).to_device(self.device))
        };
        let first = self.text_encoder.forward(&ids(&self.tokenizer, self.max_length, self.pad_id)?, None);
        let Some(second) = &self.text_encoder_2 else {
            return Ok(Conditioning { context: first.last_hidden_state, pooled: None });
        };
        let (out, pooled) =
            second.model.forward(&ids(&second.tokenizer, second.max_length, second.pad_id)?, None);
        let penultimate = |h: &[Tensor]| h[h.len().saturating_sub(2)].shallow_clone();
        let context = Tensor::cat(&[penultimate(&first.hidden_states), penultimate(&out.hidden_states)], -1);
        Ok(Conditioning { context, pooled: Some(pooled) })
    }

    /// The unconditional branch for `negative` prompts: zeros for all-empty negatives when the
    /// model asks for it (SDXL), else their encoding.
    pub fn encode_negative(&self, negative: &[&str]) -> Result<Conditioning> {
        let cond = self.encode_prompts(negative)?;
        if self.force_zeros_for_empty_prompt && negative.iter().all(|n| n.is_empty()) {
            return Ok(Conditioning {
                context: cond.context.zeros_like(),
                pooled: cond.pooled.as_ref().map(Tensor::zeros_like),
            });
        }
        Ok(cond)
    }

    /// The UNet's prediction for latents `x` at `timesteps` under `cond`, in the UNet's precision
    /// (returned as float32). SDXL's time ids are the image's own size, uncropped.
    pub fn predict(&self, x: &Tensor, timesteps: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let (segments, input) = self.predict_segments(x, timesteps, cond)?;
        Ok(recompute::forward(&segments, vec![input])?[0].to_kind(Kind::Float))
    }

    /// [`StableDiffusion::predict`] as the UNet's [`Segment`]s and their input (`x` in the UNet's
    /// kind), for training through [`recompute::backward`]; the last state's first tensor is the
    /// prediction in the UNet's kind.
    pub fn predict_segments(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        cond: &Conditioning,
    ) -> Result<(Vec<Segment<'_>>, Tensor)> {
        let kind = self.unet_kind();
        let (b, h, w) =
            (x.size()[0], x.size()[2] * self.vae_scale_factor, x.size()[3] * self.vae_scale_factor);
        let pooled = cond.pooled.as_ref().map(|p| p.to_kind(kind));
        let time_ids = pooled.as_ref().map(|_| {
            Tensor::from_slice(&[h as f32, w as f32, 0.0, 0.0, h as f32, w as f32])
                .to_device(x.device())
                .to_kind(kind)
                .unsqueeze(0)
                .expand([b, 6], false)
        });
        let added = match (&pooled, &time_ids) {
            (Some(text_embeds), Some(time_ids)) => Some(AddedCond { text_embeds, time_ids }),
            _ => None,
        };
        let segments = self.unet.segments(timesteps, &cond.context.to_kind(kind), added)?;
        Ok((segments, x.to_kind(kind)))
    }

    /// Samples images `[B, 3, H, W]` in `[0, 1]` from `noise` (`[B, 4, h, w]` standard normal),
    /// with classifier-free guidance against `negative` prompts.
    pub fn sample(
        &self,
        prompts: &[&str],
        negative: &[&str],
        noise: &Tensor,
        steps: i64,
        guidance: f64,
        sampler: SamplerKind,
    ) -> Result<Tensor> {
        let latents = self.sample_latents(prompts, negative, noise, steps, guidance, sampler)?;
        Ok(self.decode(&latents))
    }

    /// Decodes scaled latents (the sampler's output) to images `[B, 3, H, W]` in `[0, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let image = self.vae_slices(latents, |z| vec![self.vae.decode(&(z / self.vae.scaling_factor))]);
            (&image[0] / 2.0 + 0.5).clamp(0.0, 1.0)
        })
    }

    /// The VAE's latent mean and log-variance of `pixels [B, 3, H, W]` in `[-1, 1]` (no graph).
    pub fn encode_pixels(&self, pixels: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let mut parts = self.vae_slices(&pixels.to_device(self.device), |x| {
                let (mean, logvar) = self.vae.encode(x);
                vec![mean, logvar]
            });
            let logvar = parts.pop().expect("two outputs");
            (parts.pop().expect("two outputs"), logvar)
        })
    }

    /// `f` over the batch in slices of [`StableDiffusion::vae_batch`] images, its outputs
    /// concatenated along the batch.
    fn vae_slices(&self, xs: &Tensor, f: impl Fn(&Tensor) -> Vec<Tensor>) -> Vec<Tensor> {
        let n = xs.size()[0];
        match self.vae_batch {
            Some(k) if k > 0 && k < n => {
                let slices: Vec<Vec<Tensor>> =
                    (0..n).step_by(k as usize).map(|i| f(&xs.narrow(0, i, k.min(n - i)))).collect();
                (0..slices[0].len())
                    .map(|j| Tensor::cat(&slices.iter().map(|s| &s[j]).collect::<Vec<_>>(), 0))
                    .collect()
            }
            _ => f(xs),
        }
    }

    /// The denoising loop of [`StableDiffusion::sample`]: final latents `[B, 4, h, w]`, before
    /// decoding (scaled by the VAE's scaling factor, as the UNet sees them).
    pub fn sample_latents(
        &self,
        prompts: &[&str],
        negative: &[&str],
        noise: &Tensor,
        steps: i64,
        guidance: f64,
        sampler: SamplerKind,
    ) -> Result<Tensor> {
        if prompts.len() != negative.len() || noise.size()[0] != prompts.len() as i64 {
            return Err(ModelError::Config {
                what: "sample".into(),
                message: format!(
                    "{} prompts, {} negatives, {} noise tensors",
                    prompts.len(),
                    negative.len(),
                    noise.size()[0]
                ),
            });
        }
        let sampler = match sampler {
            SamplerKind::Ddim => Sampler::ddim(&self.scheduler, steps)?,
            SamplerKind::Euler => Sampler::euler(&self.scheduler, steps)?,
        };
        tch::no_grad(|| {
            // Unconditional first, as diffusers stacks them.
            let cond = self.encode_negative(negative)?.cat(&self.encode_prompts(prompts)?);
            let b = prompts.len() as i64;
            let mut latents = noise.to_device(self.device) * sampler.init_noise_sigma();
            for (i, t) in sampler.timesteps().into_iter().enumerate() {
                let x_in = sampler.scale_model_input(&latents, i);
                let x2 = Tensor::cat(&[&x_in, &x_in], 0);
                let ts = Tensor::full([2 * b], t, (Kind::Float, self.device));
                let out = self.predict(&x2, &ts, &cond)?;
                let parts = out.chunk(2, 0);
                latents = sampler.step(&guide(&parts[0], &parts[1], guidance), i, &latents);
            }
            Ok(latents)
        })
    }
}

/// The tokenizer's padding id from `special_tokens_map.json` / `tokenizer_config.json` when
/// present (`<|endoftext|>` in SD 1.x, `!` in SD 2.x), else the end-of-text id.
fn tokenizer_pad_id(dir: &Path, tokenizer: &ClipTokenizer) -> i64 {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    };
    let pad = read("special_tokens_map.json")
        .and_then(|v| v.get("pad_token").cloned())
        .or_else(|| read("tokenizer_config.json").and_then(|v| v.get("pad_token").cloned()));
    let token = match pad {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    };
    token.and_then(|t| tokenizer.token_id(&t)).unwrap_or(tokenizer.end_id())
}
