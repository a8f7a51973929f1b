//! Shared helpers of the integration tests.

use std::path::PathBuf;

use proxytune_schemas::{Proxy, RejectReason};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The DreamBench copy vendored in the repository.
pub fn dreambench() -> PathBuf {
    let path = repo_root().join("actors/dreambench");
    assert!(path.join("subjects.tsv").is_file(), "{} is missing", path.display());
    path
}

/// A small real PNG (a gradient keyed by `seed`).
pub fn png(seed: u64, side: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x * 7 + seed as u32) as u8, (y * 5) as u8, (seed * 31) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A proxy row of job `job` with a distinct `seed`.
pub fn proxy(job: &str, subject: &str, seed: u64) -> Proxy {
    Proxy {
        job_id: job.into(),
        subject: subject.into(),
        class_noun: "dog".into(),
        prompt: format!("a sks dog in context {}", seed % 5),
        prompt_index: (seed % 5) as u32,
        seed,
        supervisor_id: "toy-sd/lora".into(),
        supervisor_version: 1,
        image_png: png(seed, 16),
        width: 16,
        height: 16,
        score_dino: Some(seed as f32 / 100.0),
        score_clip_i: None,
        score_clip_t: Some(0.3),
        score_feat_i: None,
        dup_max_cosine: None,
        keep: Some(!seed.is_multiple_of(3)),
        reject_reason: seed.is_multiple_of(3).then_some(RejectReason::LowFidelity),
        generated_at_us: 1_000 + seed as i64,
        filtered_at_us: Some(2_000 + seed as i64),
    }
}

/// Proxies with seeds in `seeds`.
pub fn proxies(job: &str, seeds: std::ops::Range<u64>) -> Vec<Proxy> {
    seeds.map(|s| proxy(job, "dog2", s)).collect()
}

/// The python of the project's virtualenv (set by `tools/dev`).
pub fn python() -> PathBuf {
    let p = std::env::var_os("PROXYTUNE_PYTHON")
        .expect("PROXYTUNE_PYTHON is not set: run the tests through `make test` (tools/dev test)");
    PathBuf::from(p)
}

/// A tiny LlamaGen T2I GPT in the loader's layout (`config.json` with the GPT's arguments,
/// `model.safetensors` with the reference's keys), drawn from `seed`: 16 caption positions of the
/// tiny T5 fixture's 32-d states, an 8×8 grid of the tiny VQ-16 fixture's 32 codes (16 px at its
/// factor 2). LlamaGen's reference code is on no package registry, so its GPT is not a Python
/// fixture; its keys and shapes are checked against the reference's elsewhere (parity tests).
pub fn llamagen_gpt_tiny(dir: &std::path::Path, seed: i64) {
    use proxytune_models::ar::llamagen::{LlamaGen, LlamaGenConfig};
    let cfg = LlamaGenConfig {
        dim: 32,
        n_layer: 2,
        n_head: 2,
        n_kv_head: None,
        multiple_of: 16,
        ffn_dim_multiplier: None,
        rope_base: 10000.0,
        norm_eps: 1e-5,
        vocab_size: 32,
        cls_token_num: 16,
        caption_dim: 32,
        grid_size: 8,
        class_dropout_prob: 0.1,
        init: Default::default(),
    };
    std::fs::create_dir_all(dir).unwrap();
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _model = LlamaGen::new(vs.root(), &cfg, None).unwrap();
    // The reference zeroes the output layer; a drawn one makes the untuned GPT's samples vary.
    tch::no_grad(|| {
        let mut w = vs.variables()["output.weight"].shallow_clone();
        w.copy_(&(tch::Tensor::randn_like(&w) * 0.02));
    });
    proxytune_models::weights::save_safetensors(&vs, &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}
