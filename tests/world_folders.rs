//! The world's model folders load in their reference libraries as they are (diffusers'
//! `StableDiffusionPipeline`, transformers' Chameleon, CLIP and ViT) and run, with output shapes
//! that follow the folders' own configs.

use std::process::Command;

use crate::support::{python, repo_root};

fn config(path: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo_root().join("models/world").join(path)).unwrap())
        .unwrap()
}

#[test]
fn the_world_folders_load_and_run_in_diffusers_and_transformers() {
    let out = Command::new(python())
        .arg(repo_root().join("tools/check_world_models.py"))
        .arg(repo_root().join("models/world"))
        .output()
        .expect("run the project's python");
    assert!(out.status.success(), "reference libraries failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sup = &r["supervisor"];
    assert_eq!(sup["shape"], serde_json::json!([1, 32, 32, 3]));
    assert!(sup["min"].as_f64().unwrap() >= 0.0 && sup["max"].as_f64().unwrap() <= 1.0, "{sup}");
    let positions = config("supervisor/text_encoder/config.json")["max_position_embeddings"].clone();
    assert_eq!(sup["max_length"], positions, "the tokenizer pads to the text tower's length");
    let vocab = config("student/config.json")["vocab_size"].as_i64().unwrap();
    assert_eq!(r["student"]["shape"], serde_json::json!([1, 5, vocab]));
    let projection = config("clip/config.json")["projection_dim"].as_i64().unwrap();
    assert_eq!(r["clip"]["text"], serde_json::json!([2, projection]));
    assert_eq!(r["clip"]["image"], serde_json::json!([1, projection]));
    let dino = config("dino/config.json");
    let (side, patch) = (dino["image_size"].as_i64().unwrap(), dino["patch_size"].as_i64().unwrap());
    let tokens = (side / patch) * (side / patch) + 1;
    assert_eq!(r["dino"]["shape"], serde_json::json!([1, tokens, dino["hidden_size"].as_i64().unwrap()]));
}
