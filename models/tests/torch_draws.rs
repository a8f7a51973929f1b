//! Sampling with libtorch's global generator gives transformers' very tokens. A test binary of its
//! own: any test running beside it in one process (building a model draws initial weights) would
//! move that generator between the seed and the draws.

use std::path::{Path, PathBuf};

use proxytune_models::ar::chameleon::{Chameleon, ChameleonConfig};
use proxytune_models::ar::generate::{generate, Allowed, DrawSource, TokenSampling};
use proxytune_models::weights::{load_safetensors, read_safetensors, Strictness};
use tch::{nn, Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn torch_draws_sample_the_tokens_transformers_samples() {
    let dir = fixture("chameleon_tiny");
    let cfg = ChameleonConfig::from_json(&dir.join("config.json")).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = Chameleon::new(vs.root(), &cfg, None).unwrap();
    load_safetensors(&mut vs, &dir.join("model.safetensors"), Strictness::Strict).unwrap();
    let io = read_safetensors(&dir.join("io.safetensors")).unwrap();
    // Text mode, as transformers' Chameleon generates: image tokens disallowed.
    let image_ids = Tensor::from_slice(&model.image_vocab.image_token_ids());
    let text_only = Tensor::ones([cfg.vocab_size], (Kind::Bool, Device::Cpu)).index_fill(0, &image_ids, 0);
    let sampling = TokenSampling {
        temperature: 0.7,
        top_k: Some(12),
        top_p: Some(0.9),
        draws: DrawSource::Torch,
        ..Default::default()
    };
    let tokens = tch::no_grad(|| {
        generate(&model, &io["prompt"], None, 8, &sampling, 0, |_| Allowed::Mask(text_only.shallow_clone()))
    })
    .unwrap();
    let reference = Vec::<i64>::try_from(io["sampled"].flatten(0, -1)).unwrap();
    eprintln!("seeded sampling, torch draws: {tokens:?}, transformers: {reference:?}");
    assert_eq!(tokens, reference);
}
