//! The world's model folders are what their manifests say (every file's size and SHA-256), and
//! they load in their reference libraries as they are (diffusers' `StableDiffusionPipeline`,
//! transformers' Chameleon, CLIP and ViT) and run, with output shapes that follow the folders' own
//! configs.

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
    // The LlamaGen student's caption encoder is a T5 as transformers reads it: the same ids from
    // the tokenizer (`</s>` appended) and the same states from proxytune's encoder.
    let t5_dir = repo_root().join("models/world/llamagen/t5");
    let tok = proxytune_models::tokenizer::hf::CaptionTokenizer::from_file(
        &t5_dir.join("tokenizer.json"),
        24,
        "<pad>",
    )
    .unwrap();
    let caption = tok.encode("a sks dog on the beach").unwrap();
    let n = caption.attention_mask.iter().sum::<i64>() as usize;
    let ids: Vec<i64> = r["t5"]["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(caption.input_ids[..n], ids[..], "the caption's ids");
    let (_vs, t5) =
        proxytune_models::transformer::t5::T5Encoder::load(&t5_dir, tch::Device::Cpu, tch::Kind::Float)
            .unwrap();
    let ours = t5.forward(&tch::Tensor::from_slice(&ids).view([1, -1]), None);
    let want: Vec<f32> =
        r["t5"]["states"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let err = (ours.flatten(0, -1) - tch::Tensor::from_slice(&want)).abs().max().double_value(&[]);
    eprintln!("world T5 against transformers: max abs error {err:.2e}");
    assert!(err < 1e-5, "the world T5's states differ from transformers' by {err}");
}

/// Every committed file of `models/world` is listed in its folder's `manifest.json` with its size
/// and SHA-256, and matches them; nothing unlisted sits beside it.
#[test]
fn every_world_model_file_matches_its_manifest() {
    use sha2::Digest;
    for part in ["clip", "dino", "supervisor", "student", "llamagen"] {
        let dir = repo_root().join("models/world").join(part);
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
        let listed = manifest["files"].as_object().unwrap();
        let mut present = Vec::new();
        for file in crate::job::walk(&dir) {
            let rel = file.strip_prefix(&dir).unwrap().to_string_lossy().into_owned();
            if rel != "manifest.json" {
                present.push(rel);
            }
        }
        present.sort();
        let mut names: Vec<String> = listed.keys().cloned().collect();
        names.sort();
        assert_eq!(present, names, "{part}: files on disk against the manifest");
        for (name, entry) in listed {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            assert_eq!(entry["bytes"].as_u64(), Some(bytes.len() as u64), "{part}/{name}: size");
            let sha: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(entry["sha256"].as_str(), Some(sha.as_str()), "{part}/{name}: SHA-256");
        }
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `proxytune pretrain verify` re-measures each world model's held-out figures (CLIP and DINO
/// retrieval, VAE and VQ reconstruction, UNet denoising loss, student cross-entropy) and finds the
/// manifests' figures within their tolerances (2/128 for retrieval, 1 % for losses); a manifest
/// that claims more than its model does is named.
#[test]
fn the_world_models_held_out_figures_re_measure_as_their_manifests_say() {
    let verify = |world: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_proxytune"))
            .args(["pretrain", "verify", "--device", "cpu", "--world"])
            .arg(world)
            .output()
            .unwrap()
    };
    let out = verify(&repo_root().join("models/world"));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{table}");
    assert_eq!(table.lines().filter(|l| l.ends_with("| ok |")).count(), 8, "{table}");

    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("world");
    copy_dir(&repo_root().join("models/world"), &copy);
    let path = copy.join("dino/manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    manifest["instance_retrieval_top1_after"] = serde_json::json!(0.9);
    std::fs::write(&path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    let out = verify(&copy);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("dino/manifest.json `instance_retrieval_top1_after`: 0.9 re-measured as 0.68"),
        "{err}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.ends_with("| OUTSIDE |")).count(),
        1
    );
}
