//! The two models the DreamBench protocol compares, as [`Generator`]s: the supervisor (a diffusers
//! model folder, optionally with a DreamBooth LoRA) and the student (any family: Chameleon /
//! Lumina-mGPT or LlamaGen, optionally with a LoRA adapter). Both draw every
//! image's randomness from its seed alone, so every model gets the same seeds.

use std::path::Path;

use proxytune_models::ar::student::{StudentFiles, StudentSampler};
use proxytune_models::diffusion::pipeline::StableDiffusion;
use proxytune_schemas::ModelRole;
use tch::{Device, Tensor};

use crate::error::Result;
use crate::evaluation::dreambench::Generator;
use crate::stages::diffusion_sampling::{load_supervisor, sample_images, SamplingConfig};
use crate::stages::intake::{images_to_square_batch, SubjectEntry};

/// The supervisor: Stable Diffusion with its subject adapter.
pub struct SupervisorGenerator {
    model: StableDiffusion,
    sampling: SamplingConfig,
    version: String,
}

impl SupervisorGenerator {
    /// Loads `model_dir` (its weight files of `variant` when given) with the LoRA at `adapter` (its
    /// `lora_config.json` beside it).
    pub fn load(
        model_dir: &Path,
        variant: Option<&str>,
        adapter: Option<&Path>,
        device: &str,
        sampling: SamplingConfig,
    ) -> Result<Self> {
        let version = match adapter {
            Some(a) => format!("{}+{}", model_dir.display(), a.display()),
            None => model_dir.display().to_string(),
        };
        Ok(SupervisorGenerator {
            model: load_supervisor(model_dir, variant, device, adapter, &sampling)?,
            sampling,
            version,
        })
    }
}

impl Generator for SupervisorGenerator {
    fn role(&self) -> ModelRole {
        ModelRole::Supervisor
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    fn generate(&mut self, _subject: &SubjectEntry, prompt: &str, seeds: &[u64]) -> Result<Tensor> {
        let prompts = vec![prompt; seeds.len()];
        let images = sample_images(&self.model, &prompts, seeds, &self.sampling)?;
        images_to_square_batch(&images, self.sampling.resolution as i64, Device::Cpu)
    }
}

pub use proxytune_models::ar::student::StudentSampling;

/// The student, whatever its family ([`StudentFiles::load_sampler`]): with its adapter, its text
/// conditioning and its VQ decoder.
pub struct StudentGenerator {
    sampler: Box<dyn StudentSampler>,
}

impl StudentGenerator {
    /// Loads the student of `files` with the PEFT-layout LoRA at `adapter` (its
    /// `lora_config.json` beside it).
    pub fn load(
        files: &StudentFiles,
        adapter: Option<&Path>,
        device: &str,
        sampling: StudentSampling,
    ) -> Result<Self> {
        let device = proxytune_models::device::parse_device(device)?;
        Ok(StudentGenerator { sampler: files.load_sampler(device, adapter, sampling)? })
    }
}

impl Generator for StudentGenerator {
    fn role(&self) -> ModelRole {
        ModelRole::Student
    }

    fn version(&self) -> String {
        self.sampler.version()
    }

    fn generate(&mut self, _subject: &SubjectEntry, prompt: &str, seeds: &[u64]) -> Result<Tensor> {
        Ok(self.sampler.sample(prompt, seeds)?)
    }
}
