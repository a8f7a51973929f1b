//! The written-out weight inventories (`shapes::unet`, `clip_text`, `chameleon_decoder`) equal the
//! variables the models themselves create, and match the reference checkpoints' headers, for every
//! tiny fixture and the world's models; planted mistakes are named.

use std::path::{Path, PathBuf};

use proxytune_models::ar::chameleon::{Chameleon, ChameleonConfig};
use proxytune_models::diffusion::unet::{UNet2DConditionModel, UNetConfig};
use proxytune_models::shapes::{self, of_store, read_header, weight_files, Shapes};
use proxytune_models::transformer::clip::{ClipTextConfig, ClipTextModelWithProjection, ClipTextTransformer};
use tch::{nn, Device};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn world(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("world").join(name)
}

fn json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_unet_inventory_is_what_the_unet_makes_and_what_diffusers_saved() {
    for dir in [fixture("unet_sd_tiny"), fixture("unet_sdxl_tiny"), world("supervisor/unet")] {
        let cfg = UNetConfig::from_json(&dir.join("config.json")).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let _unet = UNet2DConditionModel::new(vs.root(), &cfg).unwrap();
        let expected = shapes::unet(&cfg);
        assert_eq!(expected, of_store(&vs), "{}", dir.display());
        let header = read_header(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        assert_eq!(shapes::compare(&expected, &header, "", true), Vec::<String>::new(), "{}", dir.display());
    }
}

#[test]
fn the_clip_text_inventory_is_what_the_tower_makes_and_what_transformers_saved() {
    for (dir, projection) in [
        (fixture("sd_tiny/text_encoder"), false),
        (fixture("sdxl_tiny/text_encoder"), false),
        (fixture("sdxl_tiny/text_encoder_2"), true),
        (world("supervisor/text_encoder"), false),
    ] {
        let cfg: ClipTextConfig = json(&dir.join("config.json"));
        let header = read_header(&dir.join("model.safetensors")).unwrap();
        let prefix = if header.keys().any(|k| k.starts_with("text_model.")) { "text_model." } else { "" };
        let vs = nn::VarStore::new(Device::Cpu);
        let tower = if prefix.is_empty() { vs.root() } else { vs.root() / "text_model" };
        if projection {
            ClipTextModelWithProjection::new(vs.root(), tower, &cfg).unwrap();
        } else {
            ClipTextTransformer::new(tower, &cfg).unwrap();
        }
        let expected = shapes::clip_text(&cfg, prefix, projection);
        assert_eq!(expected, of_store(&vs), "{}", dir.display());
        // Strict but for the `position_ids` buffer some checkpoints carry.
        let problems: Vec<String> = shapes::compare(&expected, &header, "", true)
            .into_iter()
            .filter(|p| !p.contains("position_ids"))
            .collect();
        assert_eq!(problems, Vec::<String>::new(), "{}", dir.display());
    }
}

#[test]
fn the_chameleon_inventory_is_what_the_decoder_makes_and_what_transformers_saved() {
    for dir in [fixture("chameleon_tiny"), world("student")] {
        let cfg = ChameleonConfig::from_json(&dir.join("config.json")).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = Chameleon::new(vs.root(), &cfg, None).unwrap();
        let decoder: Shapes =
            of_store(&vs).into_iter().filter(|(k, _)| !k.starts_with("model.vqmodel.")).collect();
        let expected = shapes::chameleon_decoder(&cfg);
        assert_eq!(expected, decoder, "{}", dir.display());
        let files = weight_files(&dir, &["model"], None).unwrap();
        let header = shapes::read_headers(&files).unwrap();
        assert_eq!(shapes::compare(&expected, &header, "", false), Vec::<String>::new());
    }
}

#[test]
fn a_config_that_disagrees_with_its_weights_is_named_key_by_key() {
    let dir = fixture("chameleon_tiny");
    let mut cfg = ChameleonConfig::from_json(&dir.join("config.json")).unwrap();
    cfg.intermediate_size += 8;
    cfg.num_hidden_layers += 1;
    let header = read_header(&dir.join("model.safetensors")).unwrap();
    let problems = shapes::compare(&shapes::chameleon_decoder(&cfg), &header, "", false);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("13 tensors missing: model.layers.2."), "{problems:?}");
    assert!(
        problems[1].starts_with(
            "6 shape mismatches: model.layers.0.mlp.down_proj.weight: the config makes [32, 72]"
        ),
        "{problems:?}"
    );
}

#[test]
fn sharded_checkpoints_are_read_through_their_index_and_a_missing_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = read_header(&fixture("chameleon_tiny/model.safetensors")).unwrap();
    // Two shards written by tch, split by key, and the index transformers writes beside them.
    let all = tch::Tensor::read_safetensors(fixture("chameleon_tiny/model.safetensors")).unwrap();
    let (a, b): (Vec<_>, Vec<_>) = all.into_iter().partition(|(k, _)| k.starts_with("model.layers.0."));
    tch::Tensor::write_safetensors(&a, tmp.path().join("model-00001-of-00002.safetensors")).unwrap();
    tch::Tensor::write_safetensors(&b, tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let weight_map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|(k, _)| (k.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(b.iter().map(|(k, _)| (k.clone(), "model-00002-of-00002.safetensors".into())))
        .collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let files = weight_files(tmp.path(), &["model"], None).unwrap();
    assert_eq!(files.len(), 2);
    let header = shapes::read_headers(&files).unwrap();
    let shapes_of =
        |h: &shapes::Header| h.iter().map(|(k, e)| (k.clone(), e.shape.clone())).collect::<Shapes>();
    assert_eq!(shapes_of(&header), shapes_of(&src));
    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = weight_files(tmp.path(), &["model"], None).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("missing"), "{err}");
    let err = weight_files(tmp.path(), &["model"], Some("fp16")).unwrap_err().to_string();
    assert!(err.contains("model.fp16.safetensors"), "{err}");
}
