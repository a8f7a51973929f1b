//! `proxytune run` through the binary: specs over the tiny reference-layout folders (SD 1.x, SDXL,
//! Chameleon) check clean at resolutions other than the world's and run end to end on DreamBench
//! photos with an identifier other than `sks` and a class noun the world does not have; a spec
//! with five planted mistakes gets all five named by `--check`, and nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use proxytune_actors::corpus::Corpus;
use proxytune_schemas::{ClassPriorImage, Proxy, ReferenceImage, Supervisor, VqTokens};

use crate::support::{dreambench, repo_root};

pub(crate) fn fixture(name: &str) -> PathBuf {
    repo_root().join("models/tests/fixtures").join(name)
}

/// Runs `proxytune run --check` on `spec` (written to `dir/job.toml`); returns (code, stdout).
fn check(dir: &Path, spec: &str) -> (i32, String) {
    let path = dir.join("job.toml");
    std::fs::write(&path, spec).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_proxytune")).args(["run", "--check"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

fn problems(output: &str) -> Vec<&str> {
    output.lines().filter_map(|l| l.strip_prefix("  - ")).collect()
}

fn spec(
    photos: &Path,
    supervisor: (&str, &Path, u32),
    student: (&Path, u32, &str),
    identifier: &str,
) -> String {
    format!(
        r#"
output = "out"
[subject]
name = "backpack"
photos = "{photos}"
class_noun = "rucksack"
identifier = "{identifier}"
[supervisor]
family = "{family}"
path = "{sup}"
resolution = {sup_res}
[student]
family = "chameleon"
path = "{stu}"
resolution = {stu_res}
{extra}
"#,
        photos = photos.display(),
        family = supervisor.0,
        sup = supervisor.1.display(),
        sup_res = supervisor.2,
        stu = student.0.display(),
        stu_res = student.1,
        extra = student.2,
    )
}

/// The tiny Chameleon's vocabulary names no Lumina structure tokens; these are ids inside it.
pub(crate) const TINY_TOKENS: &str = "structure_tokens = { bos = 1, separator = 2, begin_image = 5, end_image = 6, new_line = 7, size_base = 8 }";

#[test]
fn specs_over_the_tiny_reference_folders_check_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let photos = dreambench().join("backpack");
    let student = tiny_student("zwx", tmp.path());
    for (family, folder) in [("sd1", "sd_tiny"), ("sdxl", "sdxl_tiny")] {
        let text = spec(&photos, (family, &fixture(folder), 48), (&student, 64, TINY_TOKENS), "zwx");
        let (code, out) = check(tmp.path(), &text);
        assert_eq!(code, 0, "{family}: {out}");
        assert!(out.contains("no problems found"), "{out}");
        assert!(out.contains("6 photos"), "{out}");
        assert!(out.contains("UNet") && out.contains("parameters"), "{out}");
        assert!(out.contains("32×32 codes"), "the grid follows from the VQ's factor 2: {out}");
        if family == "sdxl" {
            assert!(out.contains("text_encoder_2"), "{out}");
        }
    }
}

#[test]
fn a_spec_with_five_planted_mistakes_gets_all_five_named() {
    let tmp = tempfile::tempdir().unwrap();
    let world = repo_root().join("models/world");
    let copy = |from: &Path, to: &Path| {
        for entry in walk(from) {
            let dest = to.join(entry.strip_prefix(from).unwrap());
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(&entry, &dest).unwrap();
        }
    };
    let (sup, stu) = (tmp.path().join("supervisor"), tmp.path().join("student"));
    copy(&world.join("supervisor"), &sup);
    copy(&world.join("student"), &stu);
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for f in ["00.png", "01.png"] {
        std::fs::copy(dreambench().join("dog").join(f), photos.join(f)).unwrap();
    }
    // The clean spec first (with two more photos): the world models as a spec check clean.
    let extra = ["03.png", "04.png"];
    for f in extra {
        std::fs::copy(dreambench().join("dog").join(f), photos.join(f)).unwrap();
    }
    let clean = spec(&photos, ("sd1", &sup, 32), (&stu, 32, ""), "sks");
    let (code, out) = check(tmp.path(), &clean);
    assert_eq!((code, problems(&out)), (0, vec![]), "{out}");
    // Zero torch threads is refused by name, and nothing else.
    let zero = spec(&photos, ("sd1", &sup, 32), (&stu, 32, "[devices]\ncpu_threads = 0"), "sks");
    let (code, out) = check(tmp.path(), &zero);
    let want = "devices.cpu_threads: must be at least 1 (leave it out for half the cores)";
    assert_eq!((code, problems(&out)), (1, vec![want]), "{out}");
    // The direct-lora baseline of a fully fine-tuned student is refused by name (beside the full
    // student's own refusal).
    let full = "full = true\n[evaluation]\nbaselines = [\"direct-lora\"]";
    let (code, out) = check(tmp.path(), &spec(&photos, ("sd1", &sup, 32), (&stu, 32, full), "sks"));
    assert_eq!(code, 1, "{out}");
    let found = problems(&out);
    assert!(
        found.iter().any(|p| p.starts_with("evaluation.baselines: direct-lora trains LoRA adapters")),
        "{out}"
    );
    assert!(
        found.iter().all(|p| p.starts_with("evaluation.baselines") || p.starts_with("student.full")),
        "{out}"
    );
    // direct-full trains every weight in float32: refused beside a bf16 student, named twice too.
    let bf16 =
        "precision = \"bf16\"\n[evaluation]\nbaselines = [\"direct-full\", \"direct-lora\", \"direct-full\"]";
    let (code, out) = check(tmp.path(), &spec(&photos, ("sd1", &sup, 32), (&stu, 32, bf16), "sks"));
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        problems(&out),
        [
            "evaluation.baselines: direct-full trains every weight, in float32; with student.precision = \"bf16\" only LoRA trains (use fp32, or leave direct-full out)",
            "evaluation.baselines: direct-full is named twice",
        ],
        "{out}"
    );

    // 1. two photos; 2. a missing weight file; 3. a config whose shapes disagree with the weights;
    // 4. an identifier the student's tokenizer cannot encode; 5. a resolution the VQ grid does not
    // divide.
    for f in extra {
        std::fs::remove_file(photos.join(f)).unwrap();
    }
    std::fs::remove_file(stu.join("vq_decoder.safetensors")).unwrap();
    let unet_config = sup.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&unet_config).unwrap()).unwrap();
    let width = cfg["cross_attention_dim"].as_i64().unwrap();
    cfg["cross_attention_dim"] = (width + 8).into();
    std::fs::write(&unet_config, cfg.to_string()).unwrap();
    let bad = spec(&photos, ("sd1", &sup, 32), (&stu, 30, ""), "zwx");
    let (code, out) = check(tmp.path(), &bad);
    assert_eq!(code, 1, "{out}");
    let found = problems(&out);
    assert_eq!(found.len(), 5, "exactly the five planted: {out}");
    let has = |key: &str, text: &str| found.iter().any(|p| p.starts_with(key) && p.contains(text));
    assert!(has("subject.photos", "holds 2 photo(s); a subject needs 3 to 6"), "{out}");
    assert!(has("student.path", "vq_decoder.safetensors is missing"), "{out}");
    let mismatch = found.iter().find(|p| p.starts_with("supervisor.path: unet: ")).expect("the UNet named");
    assert!(
        mismatch.contains("shape mismatches: ") && mismatch.contains("attn2.to_k.weight: the config makes ["),
        "{out}"
    );
    assert!(mismatch.contains(&format!(", {}], ", width + 8)), "the configured width is named: {out}");
    assert!(has("subject.identifier", "`zwx`: the student's tokenizer cannot encode it"), "{out}");
    assert!(has("student.resolution", "30 is not a multiple of the VQ's downsampling factor 4"), "{out}");
}

#[test]
fn a_spec_with_an_unknown_key_is_refused_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let text = spec(
        &dreambench().join("dog"),
        ("sd1", &fixture("sd_tiny"), 48),
        (&fixture("chameleon_tiny"), 32, "lora_rnak = 4"),
        "sks",
    );
    let (code, out) = check(tmp.path(), &text);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("job.toml") && out.contains("lora_rnak"), "{out}");
}

pub(crate) fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A copy of the tiny Chameleon whose word-level tokenizer also knows `word` (at the one unused id
/// below the image tokens), so a job can use an identifier other than `sks`, and with rotary
/// positions for 2048 tokens (no weight depends on it), so a 64-pixel image (32×32 codes of its
/// 2× VQ, in Lumina-mGPT's 32-pixel size units) fits.
pub(crate) fn tiny_student(word: &str, dir: &Path) -> PathBuf {
    let out = dir.join("chameleon");
    std::fs::create_dir_all(&out).unwrap();
    for entry in walk(&fixture("chameleon_tiny")) {
        std::fs::copy(&entry, out.join(entry.file_name().unwrap())).unwrap();
    }
    let edit = |file: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let path = out.join(file);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
    };
    edit("tokenizer.json", &|tok| {
        let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
        assert!(!vocab.values().any(|v| v == 63), "id 63 is free in the fixture");
        vocab.insert(word.into(), 63.into());
    });
    edit("config.json", &|cfg| cfg["max_position_embeddings"] = 2048.into());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_over_the_tiny_reference_folders_run_every_stage_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_student("zwx", tmp.path());
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "# three templates\na {} on the beach\na {} in the snow\na red {}\n").unwrap();
    // SD 1.x as a weight variant: every component's weights renamed `*.fp16.safetensors`.
    let variant_dir = tmp.path().join("sd_variant");
    for entry in walk(&fixture("sd_tiny")) {
        let rel = entry.strip_prefix(fixture("sd_tiny")).unwrap();
        let name = rel.to_string_lossy().replace("model.safetensors", "model.fp16.safetensors");
        let dest = variant_dir.join(name);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&entry, dest).unwrap();
    }
    for (family, folder, variant, skip_eval) in
        [("sd1", variant_dir.clone(), Some("fp16"), false), ("sdxl", fixture("sdxl_tiny"), None, true)]
    {
        let variant = variant.map(|v| format!("variant = \"{v}\"")).unwrap_or_default();
        // SDXL samples with its UNet in bfloat16, tunes its adapters over a bfloat16 UNet, and
        // decodes one image per VAE call, and both its trainers recompute activations (the
        // student's loss also in chunks of 8 positions). SD 1.x samples with its UNet in float16.
        let precision = if family == "sdxl" {
            "precision = \"bf16\"\nvae_slicing = true"
        } else {
            "precision = \"fp16\""
        };
        let lean = family == "sdxl";
        // SD 1.x's student trains and samples (in the evaluation) in bfloat16.
        let (tuner_lean, student_lean) = if lean {
            (
                "activation_checkpointing = true\nprecision = \"bf16\"",
                "activation_checkpointing = true\nloss_chunk_tokens = 8",
            )
        } else {
            ("", "precision = \"bf16\"")
        };
        let out = tmp.path().join(family);
        let text = format!(
            r#"
output = "{out}"
[subject]
name = "backpack"
photos = "{photos}"
class_noun = "rucksack"
identifier = "zwx"
prompts = "{prompts}"
[supervisor]
family = "{family}"
path = "{sup}"
{variant}
{precision}
resolution = 48
steps = 3
batch = 2
[supervisor.dreambooth]
steps = 4
class_images = 2
checkpoint_every = 2
{tuner_lean}
[proxies]
per_prompt = 2
[student]
family = "chameleon"
path = "{student}"
resolution = 64
steps = 6
batch = 2
rows_to_start = 2
checkpoint_every = 3
{student_lean}
sampling = {{ top_k = 16 }}
{TINY_TOKENS}
[evaluation]
images_per_prompt = 1
prompts = 2
skip = {skip_eval}
baselines = ["direct-lora"]
[devices]
supervisor = "cpu"
student = "cpu"
scorers = "cpu"
"#,
            out = out.display(),
            photos = dreambench().join("backpack").display(),
            prompts = prompts.display(),
            sup = folder.display(),
            student = student.display(),
        );
        let path = tmp.path().join(format!("{family}.toml"));
        std::fs::write(&path, text).unwrap();
        let run = Command::new(env!("CARGO_BIN_EXE_proxytune")).arg("run").arg(&path).output().unwrap();
        let log = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{family}: {log}");
        // SDXL: the class-prior sampler draws from the bfloat16 copy the tuner trains (adapters
        // off); the tuner frees it before the generator loads, and the evaluation loads one model
        // at a time, so one copy at most. SD 1.x samples with a float16 UNet and tunes a float32
        // one: the sampler's own copy overlaps the tuner's, never a third.
        let (copies, sharing) = match family {
            "sdxl" => (1, "the class-prior sampler and the tuner share one supervisor copy"),
            _ => (2, "loads its own supervisor copy: the sampler's UNet is Half and the tuner's Float"),
        };
        assert!(log.contains(sharing), "{family}: {log}");
        // Every stage is on the CPU: half the cores (at least 1) compute each torch call.
        let cores = std::thread::available_parallelism().unwrap().get();
        let threads =
            format!("proxytune: {} torch threads a call while the pipeline runs", (cores / 2).max(1));
        assert!(log.contains(&threads), "{family}: {log}");
        let most = format!("at most {copies} supervisor copies were loaded at once");
        assert!(log.contains(&most), "{family}: {log}");

        // Every stage wrote rows; the references keep their own size, the proxies have the spec's.
        let corpus = Corpus::open(out.join("corpus")).unwrap();
        let references: Vec<ReferenceImage> =
            corpus.table::<ReferenceImage>().await.unwrap().read_rows(None).await.unwrap();
        assert_eq!(references.len(), 6);
        assert!(references.iter().all(|r| (r.width, r.height) == (128, 128)), "stored at their own size");
        let priors: Vec<ClassPriorImage> =
            corpus.table::<ClassPriorImage>().await.unwrap().read_rows(None).await.unwrap();
        assert_eq!(priors.len(), 2);
        assert!(priors
            .iter()
            .all(|p| p.prompt == "a rucksack" && p.model_id.starts_with(&format!("{family}:"))));
        let supervisors: Vec<Supervisor> =
            corpus.table::<Supervisor>().await.unwrap().read_rows(None).await.unwrap();
        assert_eq!(supervisors.len(), 1);
        let proxies: Vec<Proxy> = corpus.table::<Proxy>().await.unwrap().read_rows(None).await.unwrap();
        assert_eq!(proxies.len(), 4 * 2, "the subject prompt and 3 templates, 2 each");
        assert!(proxies.iter().all(|p| (p.width, p.height) == (48, 48)), "{family}: the spec's resolution");
        assert!(proxies.iter().all(|p| p.prompt.contains("zwx rucksack")), "the identifier and class noun");
        assert!(proxies.iter().all(|p| p.score_feat_i.is_some()), "FEAT-I scores every proxy");
        let vq: Vec<VqTokens> = corpus.table::<VqTokens>().await.unwrap().read_rows(None).await.unwrap();
        assert_eq!(vq.len(), proxies.iter().filter(|p| p.keep == Some(true)).count());
        assert!(vq.iter().all(|r| (r.grid_height, r.grid_width) == (32, 32) && r.tokenizer_id.contains('#')));
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report/report.json")).unwrap()).unwrap();
        assert_eq!(report["stages"]["student"]["steps"], 6);
        assert_eq!(report["identifier"], "zwx");
        assert!(out.join("student/adapter_model.safetensors").is_file());
        // The direct baseline trained on the six photos' token rows alone, for the same steps.
        let direct = &report["baselines"]["direct-lora"];
        let keys = direct["rows_trained_on"].as_array().unwrap();
        assert_eq!(keys.len(), 6, "{direct}");
        assert!(keys.iter().all(|k| k.as_str().unwrap().starts_with("proxy=reference-")), "{direct}");
        assert_eq!(direct["steps"], 6, "{direct}");
        assert!(out.join("student_direct/adapter_model.safetensors").is_file());
        // The report's plots: the timeline with its markers, and both trainers' loss curves (the
        // supervisor's four steps and the student's six, one loss each, in report.json too).
        assert_eq!(report["stages"]["supervisor"]["losses"].as_array().unwrap().len(), 4, "{family}");
        assert_eq!(report["stages"]["student"]["losses"].as_array().unwrap().len(), 6, "{family}");
        let timeline = std::fs::read_to_string(out.join("report/timeline.svg")).unwrap();
        assert!(timeline.contains("proxies committed") && timeline.contains("first student step ("));
        assert!(timeline.contains("supervisor steps (right axis)"), "{family}");
        assert!(timeline.contains("last proxy ("), "{family}");
        let losses = std::fs::read_to_string(out.join("report/losses.svg")).unwrap();
        assert!(losses.contains("supervisor (DreamBooth)") && losses.contains("student: total loss"));
        // The page shows them, and labels each image row with its prompt: the kept proxies' rows
        // by prompt, the samples' rows by prompt with a strip per model.
        let page = std::fs::read_to_string(out.join("report/index.html")).unwrap();
        assert!(page.contains("<img src=\"timeline.svg\"") && page.contains("<img src=\"losses.svg\""));
        let kept_prompts: std::collections::BTreeSet<&str> =
            proxies.iter().filter(|p| p.keep == Some(true)).map(|p| p.prompt.as_str()).collect();
        for (row, prompt) in kept_prompts.iter().enumerate() {
            assert!(page.contains(&format!("<td>{prompt}</td>")), "{family}: no row for {prompt}");
            assert!(out.join(format!("report/rows/kept_{row:03}_0.png")).is_file());
        }
        // The trainers ran as the spec asked: their checkpoints record it.
        for (stage, keys) in [
            ("supervisor", &["activation_checkpointing"][..]),
            ("student", &["activation_checkpointing", "loss_chunk_tokens"][..]),
        ] {
            let states: Vec<PathBuf> =
                walk(&out.join(stage)).into_iter().filter(|p| p.ends_with("state.json")).collect();
            assert!(!states.is_empty(), "{family}: no {stage} checkpoint");
            for state in states {
                let state: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
                for key in keys {
                    let want = match (*key, lean) {
                        ("loss_chunk_tokens", true) => serde_json::json!(8),
                        ("loss_chunk_tokens", false) => serde_json::json!(0),
                        (_, lean) => serde_json::json!(lean),
                    };
                    assert_eq!(state["config"][key], want, "{family} {stage} {key}");
                }
            }
        }
        let models = report["evaluation"]["models"].as_array().unwrap();
        if skip_eval {
            assert!(models.is_empty());
        } else {
            assert_eq!(models.len(), 4, "untuned student, supervisor, tuned student, direct baseline");
            assert_eq!(models[3]["label"], "student (direct LoRA on the references)");
            for m in models {
                assert_eq!(m["scores"]["samples"], 2, "2 prompts x 1 image: {m}");
                assert!(m["scores"]["metrics"]["FEAT-I"].as_f64().is_some_and(|v| v.is_finite()), "{m}");
                assert!(m["scores"]["context_accuracy"].is_null(), "no world checks for a real subject");
            }
            assert!(out.join("report/samples_2.png").is_file());
            // The samples' table: a row for each of the two evaluated prompts (the first two
            // templates), a column for each model.
            let table = &page[page.find("Samples by prompt").unwrap()..];
            let table = &table[..table.find("</table>").unwrap()];
            assert_eq!(table.matches("<tr><td>").count(), 2, "{table}");
            for (row, context) in ["on the beach", "in the snow"].iter().enumerate() {
                let label = format!("zwx rucksack {context}</td>");
                assert!(table.contains(&label), "{family}: no row for {context}: {table}");
                for model in 0..3 {
                    let strip = format!("rows/samples_{row:03}_{model}.png");
                    assert!(out.join("report").join(&strip).is_file() && table.contains(&strip), "{strip}");
                }
            }
        }
    }
}

/// A safetensors file with `shapes` in its header and no data: what `--check` reads of a
/// checkpoint (it never reads past the header).
fn header_only(path: &Path, shapes: &proxytune_models::shapes::Shapes) {
    let mut offset = 0u64;
    let mut header = serde_json::Map::new();
    for (key, shape) in shapes {
        let bytes = shape.iter().product::<i64>() as u64 * 2;
        header.insert(
            key.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let text = serde_json::Value::Object(header).to_string();
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend(text.as_bytes());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, file).unwrap();
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
    v
}

/// `run --check` on the published SDXL and Chameleon-7B configurations, their checkpoints given as
/// headers alone (no weight exists, so none can be loaded): it names the real parameter counts
/// (SDXL's UNet 2.57 B, the Chameleon-7B decoder 7.01 B) and finds nothing wrong, and the same
/// folders with one shard's tensor reshaped get that tensor named.
#[test]
fn run_check_reads_real_size_sdxl_and_chameleon_7b_from_their_headers_alone() {
    use proxytune_models::ar::chameleon::ChameleonConfig;
    use proxytune_models::diffusion::unet::UNetConfig;
    use proxytune_models::diffusion::vae::{AutoencoderKl, VaeConfig};
    use proxytune_models::shapes;
    use proxytune_models::transformer::clip::ClipTextConfig;
    let tmp = tempfile::tempdir().unwrap();
    // SDXL base 1.0's published configuration, over the tiny SDXL folder's tokenizers.
    let sdxl = tmp.path().join("sdxl");
    for entry in walk(&fixture("sdxl_tiny")) {
        let dest = sdxl.join(entry.strip_prefix(fixture("sdxl_tiny")).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        if !entry.to_string_lossy().ends_with(".safetensors") {
            std::fs::copy(&entry, dest).unwrap();
        }
    }
    let unet = edit_json(&sdxl.join("unet/config.json"), |c| {
        c["block_out_channels"] = serde_json::json!([320, 640, 1280]);
        c["attention_head_dim"] = serde_json::json!([5, 10, 20]);
        c["transformer_layers_per_block"] = serde_json::json!([1, 2, 10]);
        c["layers_per_block"] = 2.into();
        c["cross_attention_dim"] = 2048.into();
        c["norm_num_groups"] = 32.into();
        c["addition_time_embed_dim"] = 256.into();
        c["projection_class_embeddings_input_dim"] = 2816.into();
        c["down_block_types"] =
            serde_json::json!(["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]);
        c["up_block_types"] = serde_json::json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]);
    });
    let unet: UNetConfig = serde_json::from_value(unet).unwrap();
    // Sharded, as diffusers saves it.
    let inventory = shapes::unet(&unet);
    // diffusers 0.42.1's UNet2DConditionModel at this config, built on the meta device, counts
    // 2,567,463,684 parameters.
    assert_eq!(shapes::parameters(&inventory), 2_567_463_684);
    let (a, b): (shapes::Shapes, shapes::Shapes) =
        inventory.clone().into_iter().partition(|(k, _)| k.starts_with("down_blocks"));
    header_only(&sdxl.join("unet/diffusion_pytorch_model-00001-of-00002.safetensors"), &a);
    header_only(&sdxl.join("unet/diffusion_pytorch_model-00002-of-00002.safetensors"), &b);
    let weight_map: serde_json::Map<String, serde_json::Value> = inventory
        .keys()
        .map(|k| {
            let shard = if a.contains_key(k) { "00001" } else { "00002" };
            (k.clone(), format!("diffusion_pytorch_model-{shard}-of-00002.safetensors").into())
        })
        .collect();
    std::fs::write(
        sdxl.join("unet/diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({"weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let vae = edit_json(&sdxl.join("vae/config.json"), |c| {
        c["block_out_channels"] = serde_json::json!([128, 256, 512, 512]);
        c["down_block_types"] = serde_json::json!(vec!["DownEncoderBlock2D"; 4]);
        c["up_block_types"] = serde_json::json!(vec!["UpDecoderBlock2D"; 4]);
        c["layers_per_block"] = 2.into();
        c["norm_num_groups"] = 32.into();
    });
    let vae_vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _vae = AutoencoderKl::new(vae_vs.root(), &serde_json::from_value::<VaeConfig>(vae).unwrap());
    header_only(&sdxl.join("vae/diffusion_pytorch_model.safetensors"), &shapes::of_store(&vae_vs));
    drop(vae_vs);
    for (encoder, hidden, inter, layers, heads, projection) in
        [("text_encoder", 768, 3072, 12, 12, false), ("text_encoder_2", 1280, 5120, 32, 20, true)]
    {
        let cfg = edit_json(&sdxl.join(encoder).join("config.json"), |c| {
            c["hidden_size"] = hidden.into();
            c["intermediate_size"] = inter.into();
            c["num_hidden_layers"] = layers.into();
            c["num_attention_heads"] = heads.into();
            c["vocab_size"] = 49408.into();
            c["projection_dim"] = 1280.into();
        });
        let cfg: ClipTextConfig = serde_json::from_value(cfg).unwrap();
        header_only(
            &sdxl.join(encoder).join("model.safetensors"),
            &shapes::clip_text(&cfg, "text_model.", projection),
        );
    }
    // Chameleon-7B's published configuration (its VQ-GAN's too), over the tiny student's tokenizer.
    let student = tiny_student("zwx", tmp.path());
    let cfg = edit_json(&student.join("config.json"), |c| {
        c["hidden_size"] = 4096.into();
        c["intermediate_size"] = 11008.into();
        c["num_hidden_layers"] = 32.into();
        c["num_attention_heads"] = 32.into();
        c["num_key_value_heads"] = 32.into();
        c["vocab_size"] = 65536.into();
        c["max_position_embeddings"] = 4096.into();
        c["vq_config"] = serde_json::json!({
            "embed_dim": 256, "num_embeddings": 8192, "double_latent": false, "latent_channels": 256,
            "resolution": 512, "in_channels": 3, "base_channels": 128, "channel_multiplier": [1, 1, 2, 2, 4],
            "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0, "attn_type": "vanilla",
        });
    });
    let cfg: ChameleonConfig = serde_json::from_value(cfg).unwrap();
    let vq_vs = tch::nn::VarStore::new(tch::Device::Cpu);
    proxytune_models::ar::chameleon_vq::ChameleonVqVae::new(vq_vs.root(), &cfg.vq_config).unwrap();
    let vq: shapes::Shapes =
        shapes::of_store(&vq_vs).into_iter().map(|(k, v)| (format!("model.vqmodel.{k}"), v)).collect();
    let decoder = shapes::chameleon_decoder(&cfg);
    // transformers 5.24's ChameleonForConditionalGeneration at this config, on the meta device:
    // 7,043,090,432 parameters, 29,423,616 of them in `model.vqmodel`.
    assert_eq!(shapes::parameters(&decoder), 7_043_090_432 - 29_423_616);
    assert_eq!(shapes::parameters(&vq), 29_423_616);
    let (first, rest): (shapes::Shapes, shapes::Shapes) = decoder
        .into_iter()
        .partition(|(k, _)| k.starts_with("model.layers.1") || k.starts_with("model.embed"));
    std::fs::remove_file(student.join("model.safetensors")).unwrap();
    header_only(&student.join("model-00001-of-00002.safetensors"), &first);
    header_only(&student.join("model-00002-of-00002.safetensors"), &rest.into_iter().chain(vq).collect());
    let files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let map: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .flat_map(|f| {
            proxytune_models::shapes::read_header(&student.join(f))
                .unwrap()
                .into_keys()
                .map(move |k| (k, serde_json::Value::from(*f)))
        })
        .collect();
    std::fs::write(
        student.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let decoder_vs = tch::nn::VarStore::new(tch::Device::Cpu);
    proxytune_models::ar::chameleon_vq::ChameleonVqDecoder::new(decoder_vs.root(), &cfg.vq_config).unwrap();
    header_only(&student.join("vq_decoder.safetensors"), &shapes::of_store(&decoder_vs));

    let text =
        spec(&dreambench().join("backpack"), ("sdxl", &sdxl, 1024), (&student, 768, TINY_TOKENS), "zwx");
    let (code, out) = check(tmp.path(), &text);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("UNet 2.57 B parameters") && out.contains("from 2 file(s)"), "SDXL's UNet: {out}");
    assert!(out.contains("decoder 7.01 B parameters"), "Chameleon-7B: {out}");
    assert!(out.contains("48×48 codes, 2355 image tokens"), "{out}");
    assert!(out.contains("1024 px, latents of 128×128"), "{out}");

    // One tensor of the second shard reshaped: named, with both shapes.
    let mut broken = shapes::read_header(&student.join(files[1])).unwrap();
    let (key, entry) = broken.iter_mut().find(|(k, _)| k.ends_with("mlp.down_proj.weight")).unwrap();
    let key = key.clone();
    entry.shape = vec![4096, 11000];
    let reshaped: shapes::Shapes = broken.into_iter().map(|(k, e)| (k, e.shape)).collect();
    header_only(&student.join(files[1]), &reshaped);
    let (code, out) = check(tmp.path(), &text);
    assert_eq!(code, 1, "{out}");
    assert!(
        problems(&out)
            .iter()
            .any(|p| p.contains(&format!("{key}: the config makes [4096, 11008]"))
                && p.contains("[4096, 11000]")),
        "{out}"
    );
}

/// `bench pipeline --spec` over a tiny reference-layout job (SD 1.x, Chameleon; paths relative to
/// the spec's folder): the same job runs streaming and stage by stage; the stage-by-stage student
/// starts after the last proxy and the streaming one before it, each run writes into its own
/// folder, and the report carries both runs' figures and the two-device model.
#[test]
fn bench_pipeline_runs_a_tiny_reference_layout_spec_streaming_and_stage_by_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = tmp.path().join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let student = tiny_student("zwx", &jobs);
    let sd = jobs.join("sd");
    for entry in walk(&fixture("sd_tiny")) {
        let dest = sd.join(entry.strip_prefix(fixture("sd_tiny")).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&entry, dest).unwrap();
    }
    assert!(student.starts_with(&jobs));
    let text = format!(
        r#"
output = "unused"
[subject]
name = "backpack"
photos = "{photos}"
class_noun = "rucksack"
identifier = "zwx"
[supervisor]
family = "sd1"
path = "sd"
resolution = 48
steps = 2
batch = 4
[supervisor.dreambooth]
steps = 2
class_images = 2
[proxies]
per_prompt = 2
[student]
family = "chameleon"
path = "chameleon"
resolution = 64
steps = 12
batch = 2
rows_to_start = 2
sampling = {{ top_k = 16 }}
{TINY_TOKENS}
[evaluation]
images_per_prompt = 1
prompts = 1
[devices]
supervisor = "cpu"
student = "cpu"
scorers = "cpu"
"#,
        photos = dreambench().join("backpack").display(),
    );
    std::fs::write(jobs.join("job.toml"), text).unwrap();
    let report = tmp.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_proxytune"))
        .args(["bench", "pipeline", "--spec"])
        .arg(jobs.join("job.toml"))
        .arg("--dir")
        .arg(tmp.path().join("runs"))
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let f = |run: &str, key: &str| r[run][key].as_f64().unwrap_or_else(|| panic!("{run}.{key}: {r}"));
    assert!(f("stage_by_stage", "first_step_s") > f("stage_by_stage", "last_proxy_s"), "{r}");
    assert!(f("streaming", "first_step_s") < f("streaming", "last_proxy_s"), "{r}");
    for run in ["streaming", "stage_by_stage"] {
        assert!(f(run, "generation_busy_s") > 0.0 && f(run, "training_busy_s") > 0.0, "{r}");
        assert!(r[run]["tuned_student"]["FEAT-I"].as_f64().is_some(), "{run}: {r}");
    }
    assert!(r["two_devices"]["ideal_over_sum"].as_f64().is_some_and(|v| (0.5..=1.0).contains(&v)), "{r}");
    // Each run wrote its own corpus and report; the spec's own output folder was never used.
    for run in ["streaming", "staged"] {
        assert!(tmp.path().join("runs").join(run).join("report/report.json").is_file(), "{run}");
    }
    assert!(!jobs.join("unused").exists());
}

/// The LlamaGen student through the binary at tiny reference-layout configs (SD 1.x supervisor;
/// LlamaGen GPT, VQ-16 and Flan-T5-layout encoder; `sks`, because the tiny T5 vocabulary, learnt
/// from the DreamBench prompts, has no `z`): `--check` reads all three, the job streams
/// (the student's first step comes before the last proxy), the corpus stores each kept prompt's
/// T5 states once beside the token rows, the three direct baselines train on the references (and
/// their augmented copies) under the instance prompt's states, and a job killed (SIGKILL) while the student trains resumes from its
/// checkpoint and ends with the adapter, bit for bit, of an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_llamagen_student_job_streams_and_resumes_after_a_kill_as_an_uninterrupted_run() {
    use proxytune_schemas::{CaptionStates, Table};
    let tmp = tempfile::tempdir().unwrap();
    let gpt = tmp.path().join("llamagen_gpt");
    crate::support::llamagen_gpt_tiny(&gpt, 11);
    let prompts = tmp.path().join("prompts.txt");
    let templates =
        ["a {} on the beach", "a {} in the snow", "a red {}", "a {} in the jungle", "a {} on a table"];
    std::fs::write(&prompts, templates.join("\n")).unwrap();
    let steps = 20;
    let spec = |out: &Path| {
        format!(
            r#"
output = "{out}"
[subject]
name = "backpack"
photos = "{photos}"
class_noun = "rucksack"
identifier = "sks"
prompts = "{prompts}"
[supervisor]
family = "sd1"
path = "{sup}"
resolution = 48
steps = 3
batch = 2
[supervisor.dreambooth]
steps = 4
class_images = 2
checkpoint_every = 2
[proxies]
per_prompt = 4
[student]
family = "llamagen"
path = "{gpt}"
vq_path = "{vq}"
text_encoder_path = "{t5}"
resolution = 16
steps = {steps}
batch = 2
rows_to_start = 2
checkpoint_every = 2
sampling = {{ top_k = 16, guidance = 2.0 }}
[evaluation]
images_per_prompt = 1
prompts = 2
baselines = ["direct-lora", "direct-lora-augmented", "direct-full"]
[devices]
supervisor = "cpu"
student = "cpu"
scorers = "cpu"
"#,
            out = out.display(),
            photos = dreambench().join("backpack").display(),
            prompts = prompts.display(),
            sup = fixture("sd_tiny").display(),
            gpt = gpt.display(),
            vq = fixture("llamagen_vq_tiny").display(),
            t5 = fixture("t5_tiny").display(),
        )
    };
    let (interrupted, uninterrupted) = (tmp.path().join("interrupted"), tmp.path().join("uninterrupted"));
    let write = |name: &str, out: &Path| {
        let path = tmp.path().join(name);
        std::fs::write(&path, spec(out)).unwrap();
        path
    };
    let (a, b) = (write("a.toml", &interrupted), write("b.toml", &uninterrupted));

    let (code, out) = check(tmp.path(), &spec(&interrupted));
    assert_eq!(code, 0, "{out}");
    for part in ["LlamaGen GPT", "16 caption positions", "VQ-16", "T5 encoder", "8×8 codes, 64 image tokens"]
    {
        assert!(out.contains(part), "--check names {part}: {out}");
    }
    // A resolution the GPT's grid does not make, and no T5, are named.
    let wrong = spec(&interrupted)
        .replace("resolution = 16", "resolution = 32")
        .replace(&format!("text_encoder_path = \"{}\"\n", fixture("t5_tiny").display()), "");
    let (code, out) = check(tmp.path(), &wrong);
    assert_eq!(code, 1, "{out}");
    let found = problems(&out);
    assert_eq!(found.len(), 2, "{out}");
    assert!(found[0].starts_with("student.resolution: 32 px: the GPT generates a 8×8 grid"), "{out}");
    assert!(found[1].starts_with("student.text_encoder_path: missing"), "{out}");
    // An identifier the T5 vocabulary cannot spell is named too (real Flan-T5 spells `zwx`).
    let (code, out) =
        check(tmp.path(), &spec(&interrupted).replace("identifier = \"sks\"", "identifier = \"zwx\""));
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        problems(&out),
        ["subject.identifier: `zwx`: the T5 tokenizer makes an unknown token of it"],
        "{out}"
    );

    // Killed once the student has checkpointed a few steps, then run again on the same output.
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxytune"))
        .arg("run")
        .arg(&a)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The newest checkpoint's step (older ones are pruned as newer ones land).
    let checkpointed = || -> u64 {
        std::fs::read_dir(interrupted.join("student/checkpoints"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    let started = std::time::Instant::now();
    while checkpointed() < 4 {
        assert!(child.try_wait().unwrap().is_none(), "the job ended before its student checkpointed");
        assert!(started.elapsed() < std::time::Duration::from_secs(300), "no student checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!interrupted.join("report/report.json").exists(), "killed before the job ended");
    let resumed = Command::new(env!("CARGO_BIN_EXE_proxytune")).arg("run").arg(&a).output().unwrap();
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{log}");
    assert!(log.contains("student training resumes"), "{log}");
    // The resumed run took the stored prompts' T5 states from the corpus.
    assert!(log.contains("prompts' caption states are stored already"), "{log}");
    let whole = Command::new(env!("CARGO_BIN_EXE_proxytune")).arg("run").arg(&b).output().unwrap();
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));

    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(interrupted.join("student/run.json")).unwrap())
            .unwrap();
    assert_eq!(run["steps"], steps);
    assert!((run["losses_this_run"].as_array().unwrap().len() as u64) < steps, "it resumed: {run}");
    for adapter in [
        "student/adapter_model.safetensors",
        "student_direct/adapter_model.safetensors",
        "student_direct_augmented/adapter_model.safetensors",
        "student_direct_full/model.safetensors",
    ] {
        let (x, y) = (
            std::fs::read(interrupted.join(adapter)).unwrap(),
            std::fs::read(uninterrupted.join(adapter)).unwrap(),
        );
        assert!(x == y, "{adapter} differs from the uninterrupted run's");
    }

    let corpus = Corpus::open(interrupted.join("corpus")).unwrap();
    let proxies: Vec<Proxy> = corpus.table::<Proxy>().await.unwrap().read_rows(None).await.unwrap();
    assert_eq!(proxies.len(), 6 * 4, "the subject prompt and 5 templates, 4 each, each once");
    let vq: Vec<VqTokens> = corpus.table::<VqTokens>().await.unwrap().read_rows(None).await.unwrap();
    let kept: Vec<&Proxy> = proxies.iter().filter(|p| p.keep == Some(true)).collect();
    assert_eq!(vq.len(), kept.len());
    assert!(vq
        .iter()
        .all(|r| (r.grid_height, r.grid_width) == (8, 8) && r.tokenizer_id.starts_with("llamagen-vq:")));
    // One caption row per kept prompt, under one encoder id.
    let captions: Vec<CaptionStates> =
        corpus.table::<CaptionStates>().await.unwrap().read_rows(None).await.unwrap();
    let kept_prompts: std::collections::BTreeSet<&str> = kept.iter().map(|p| p.prompt.as_str()).collect();
    let captioned: std::collections::BTreeSet<&str> = captions.iter().map(|c| c.prompt.as_str()).collect();
    assert_eq!(captions.len(), captioned.len(), "each prompt once");
    assert_eq!(captioned, kept_prompts);
    assert!(captions.iter().all(|c| c.dim == 32 && c.tokens > 1 && c.encoder_id.starts_with("t5:")));
    // The student trained on every token row, each once, while generation went on.
    let keys: Vec<&str> =
        run["data"]["row_keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    let unique: std::collections::BTreeSet<&str> = keys.iter().copied().collect();
    let stored: std::collections::BTreeSet<String> =
        vq.iter().map(|r| r.key().as_str().to_string()).collect();
    assert_eq!(unique.len(), keys.len());
    assert_eq!(unique.iter().map(|k| k.to_string()).collect::<std::collections::BTreeSet<_>>(), stored);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(uninterrupted.join("report/report.json")).unwrap())
            .unwrap();
    let stages = &report["stages"];
    let first_step = stages["student"]["first_step_at_us"].as_i64().unwrap();
    let last_proxy = stages["proxies"]["last_generated_at_us"].as_i64().unwrap();
    assert!(first_step < last_proxy, "the student started before the last proxy: {stages}");
    let direct = &report["baselines"]["direct-lora"];
    assert_eq!(direct["rows_trained_on"].as_array().unwrap().len(), 6, "{direct}");
    let augmented = &report["baselines"]["direct-lora-augmented"];
    assert_eq!(augmented["rows_trained_on"].as_array().unwrap().len(), 6 * 8, "{augmented}");
    let models = report["evaluation"]["models"].as_array().unwrap();
    assert_eq!(models.len(), 6, "untuned student, supervisor, tuned student, three direct baselines");
    assert_eq!(report["baselines"]["direct-full"]["steps"], steps, "{report}");
    // The full baseline is sampled with its trained weights: its scores are not the untuned GPT's.
    assert_ne!(models[5]["scores"]["metrics"], models[0]["scores"]["metrics"], "{models:?}");
    for m in models {
        assert_eq!(m["scores"]["samples"], 2, "{m}");
        assert!(m["scores"]["metrics"]["FEAT-I"].as_f64().is_some_and(|v| v.is_finite()), "{m}");
    }
}
