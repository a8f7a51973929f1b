//! `class_prior_sampler`: the source of DreamBooth's prior-preservation images. The *untuned*
//! supervisor samples `num_images` images of the bare class prompt (`a dog`), seeds
//! `first_seed, first_seed + 1, …`, and emits them as `class_priors` rows batch by batch, so the
//! [`SupervisorTuner`](crate::stages::supervisor_tuner::SupervisorTuner) trains on the first ones while
//! the rest are being sampled (no blocking pre-step). Rows are keyed by seed and model, so a
//! restarted job writes each image once. It samples from its own copy of the supervisor, or from
//! the tuner's with the adapters off ([`ClassPriorSampler::sharing`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use metrics::Counter;
use proxytune_schemas::{now_us, ClassPriorImage, MetricName, Table};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::runtime::{Context, Metrics, Output, Produced, Source};
use crate::stages::diffusion_sampling::{
    load_supervisor, lock, sample_images, SamplingConfig, SharedSupervisor, SupervisorCopy,
};
use crate::stages::intake::encode_png;

/// Configuration of a [`ClassPriorSampler`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassPriorConfig {
    /// Job id written into every row.
    pub job_id: String,
    /// Class noun (e.g. `dog`).
    pub class_noun: String,
    /// Class prompt (e.g. `a dog`).
    pub class_prompt: String,
    /// The base model folder (diffusers layout).
    pub model_dir: PathBuf,
    /// Weight-file variant of the folder (`fp16`), when not the plain files.
    #[serde(default)]
    pub variant: Option<String>,
    /// Id of the base model, written into every row.
    pub model_id: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Images to sample.
    pub num_images: usize,
    /// Seed of the first image.
    #[serde(default)]
    pub first_seed: u64,
    /// Sampler settings.
    #[serde(default)]
    pub sampling: SamplingConfig,
}

fn default_device() -> String {
    "cpu".into()
}

/// Samples the class prior images.
pub struct ClassPriorSampler {
    config: ClassPriorConfig,
    model: Option<SupervisorCopy>,
    shared: Option<SharedSupervisor>,
    next: usize,
    generated: Counter,
}

impl ClassPriorSampler {
    /// A source; the model is loaded on its own thread when the job starts.
    pub fn new(config: ClassPriorConfig, metrics: &Metrics) -> Self {
        let generated = metrics.counter(MetricName::GeneratedImages, "kind", "class_prior");
        ClassPriorSampler { config, model: None, shared: None, next: 0, generated }
    }

    /// Samples from `shared`, the copy the tuner trains, with its adapters off, instead of
    /// loading a copy of its own.
    pub fn sharing(mut self, shared: SharedSupervisor) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Lets the model go (a shared copy lives on while the tuner holds it).
    fn release(&mut self) {
        self.model = None;
        self.shared = None;
    }
}

impl Source for ClassPriorSampler {
    fn on_start(&mut self, _ctx: &mut Context, _out: &mut Output) -> Result<()> {
        let c = &self.config;
        if c.num_images == 0 {
            self.release();
            return Ok(());
        }
        self.model = Some(match &self.shared {
            Some(shared) => shared.get()?,
            None => Arc::new(Mutex::new(load_supervisor(
                &c.model_dir,
                c.variant.as_deref(),
                &c.device,
                None,
                &c.sampling,
            )?)),
        });
        Ok(())
    }

    fn produce(&mut self, _ctx: &mut Context, out: &mut Output) -> Result<Produced> {
        let c = &self.config;
        let n = c.sampling.batch_images.max(1).min(c.num_images - self.next.min(c.num_images));
        if n == 0 {
            self.release();
            return Ok(Produced::Done);
        }
        let seeds: Vec<u64> = (0..n as u64).map(|i| c.first_seed + self.next as u64 + i).collect();
        let prompts = vec![c.class_prompt.as_str(); n];
        let images = {
            let model = lock(self.model.as_ref().expect("started"))?;
            // The untuned supervisor, also while the tuner's adapters train on this copy.
            model.without_adapters(|sd| sample_images(sd, &prompts, &seeds, &c.sampling))?
        };
        let created_at_us = now_us();
        let rows: Vec<ClassPriorImage> = seeds
            .iter()
            .zip(&images)
            .map(|(&seed, img)| ClassPriorImage {
                job_id: c.job_id.clone(),
                class_noun: c.class_noun.clone(),
                prompt: c.class_prompt.clone(),
                seed,
                model_id: c.model_id.clone(),
                image_png: encode_png(img),
                width: img.width(),
                height: img.height(),
                created_at_us,
            })
            .collect();
        out.emit(ClassPriorImage::to_batch(&rows)?);
        self.generated.increment(n as u64);
        self.next += n;
        if self.next >= c.num_images {
            // Its last image is out: free the model before the tuner's and the generator's peak.
            self.release();
            return Ok(Produced::Done);
        }
        Ok(Produced::More)
    }
}
