//! The `proxytune` binary, run as a user would.

use std::process::Command;

use crate::support::dreambench;

fn proxytune() -> Command {
    Command::new(env!("CARGO_BIN_EXE_proxytune"))
}

#[test]
fn help_lists_what_users_use_and_hides_development_scaffolding() {
    let out = proxytune().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let commands: Vec<&str> = text
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for c in
        ["demo", "run", "daemon", "replay", "bench", "evaluate", "corpus", "pretrain", "grafana", "world"]
    {
        assert!(commands.contains(&c), "{c} is listed: {text}");
    }
    for hidden in ["smoke", "loadgen"] {
        assert!(!commands.contains(&hidden), "{hidden} is development scaffolding: {text}");
    }
    assert!(!text.contains("exists so far") && !text.contains("of what exists"), "{text}");
}

#[test]
fn smoke_job_imports_dreambench_idempotently_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    let out = proxytune()
        .args(["smoke", "--device", "cpu", "--corpus"])
        .arg(&corpus)
        .arg("--dreambench")
        .arg(dreambench())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["subjects"], 30);
    assert_eq!(report["first_import"]["written"], 158, "DreamBench has 158 reference photos");
    assert_eq!(report["first_import"]["skipped"], 0);
    assert_eq!(report["second_import"]["written"], 0);
    assert_eq!(report["second_import"]["skipped"], 158);
    assert_eq!(report["references_version"], 30, "one version per subject, none for the re-import");
    // dog, dog2, dog3, dog5, dog6, dog7, dog8: 5+6+6+5+5+5+5 photos (subjects.tsv).
    assert_eq!(report["dog_references_scanned"], 37);
    assert!(report["tch_loss_last"].as_f64().unwrap() < report["tch_loss_first"].as_f64().unwrap() * 0.5);

    let info = proxytune().args(["corpus", "info"]).arg(&corpus).output().unwrap();
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let tables: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(tables[0]["table"], "references");
    assert_eq!(tables[0]["rows"], 158);
    assert_eq!(tables[2]["exists"], false);
}

#[test]
fn bad_paths_fail_with_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = proxytune().args(["corpus", "info"]).arg(dir.path().join("nowhere")).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nowhere") && err.contains("not a proxytune corpus"), "{err}");

    let out = proxytune()
        .args(["smoke", "--device", "cpu", "--dreambench"])
        .arg(dir.path())
        .arg("--corpus")
        .arg(dir.path().join("c"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("subjects.tsv"), "{err}");
}

#[test]
fn loadgen_drains_on_ctrl_c_and_exits_130() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    let mut child = proxytune()
        .args(["loadgen", "--batch-rows", "16", "--interval-ms", "5", "--work-ms", "2", "--corpus"])
        .arg(&corpus)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let it write a few commits (a barrier every 8 batches commits).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let rt = tokio::runtime::Runtime::new().unwrap();
    loop {
        let rows = rt.block_on(async {
            let Ok(c) = proxytune_actors::corpus::Corpus::open(&corpus) else {
                return 0;
            };
            let Ok(t) = c.table::<proxytune_schemas::Proxy>().await else {
                return 0;
            };
            t.count_rows(None).await.unwrap_or(0)
        });
        if rows >= 256 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "loadgen wrote nothing");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let code = child.wait().unwrap().code();
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert_eq!(code, Some(130), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["outcome"]["type"], "cancelled");
    let produced = report["produced_rows"].as_u64().unwrap();
    assert_eq!(report["written_rows"].as_u64().unwrap(), produced, "every produced row was written");
    assert_eq!(report["undelivered_rows"], 0);
    let stored = rt.block_on(async {
        let c = proxytune_actors::corpus::Corpus::open(&corpus).unwrap();
        c.table::<proxytune_schemas::Proxy>().await.unwrap().count_rows(None).await.unwrap()
    });
    assert_eq!(stored as u64, produced, "the corpus holds exactly the produced rows");
}

#[test]
fn evaluate_real_images_runs_the_protocol_on_all_subjects() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = crate::support::repo_root().join("models/tests/fixtures");
    let out = proxytune()
        .args(["evaluate", "real-images", "--device", "cpu", "--dreambench"])
        .arg(dreambench())
        .arg("--out")
        .arg(dir.path())
        .arg("--dino")
        .arg(fixtures.join("vit_tiny"))
        .arg("--clip")
        .arg(fixtures.join("clip_tiny"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("real_images.json")).unwrap()).unwrap();
    for metric in ["FEAT-I", "DINO", "CLIP-I"] {
        let table = &json[metric];
        assert_eq!(table["per_subject"].as_object().unwrap().len(), 30, "{metric}");
        assert!(table["subset_9"].is_number() && table["all"].is_number(), "{metric}");
        assert!(table["failed"].as_object().unwrap().is_empty());
    }
    // FEAT-I has real weights: its row equals the independent reference's same-subject mean at
    // 128 px (tools/parity/feat_i_dreambench.py) within 0.01.
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("feat_i_dreambench.json")).unwrap())
            .unwrap();
    let expected = reference["resolutions"]["128"]["same_mean"].as_f64().unwrap();
    let feat = json["FEAT-I"]["all"].as_f64().unwrap();
    assert!((feat - expected).abs() < 0.01, "FEAT-I real-images row {feat}, reference {expected}");
    assert_eq!(std::fs::read_dir(dir.path().join("grids")).unwrap().count(), 30);
    let md = std::fs::read_to_string(dir.path().join("real_images.md")).unwrap();
    assert!(md.contains("| 9-subject subset |") && md.contains("| dog2 |"));
}

#[test]
fn evaluate_names_bad_inputs_and_still_evaluates_the_rest() {
    let src = dreambench();
    let dir = tempfile::tempdir().unwrap();
    let bench = dir.path().join("bench");
    std::fs::create_dir_all(bench.join("dog2")).unwrap();
    std::fs::create_dir_all(bench.join("teapot")).unwrap();
    for entry in std::fs::read_dir(src.join("dog2")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, bench.join("dog2").join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        bench.join("subjects.tsv"),
        "subject\tclass\tlive\tn_images\ndog2\tdog\ttrue\t6\nteapot\tteapot\tfalse\t5\n",
    )
    .unwrap();
    std::fs::write(bench.join("prompts.txt"), "object\ta {0} {1}\nlive\ta {0} {1}\n").unwrap();
    let run = |out: &std::path::Path| {
        proxytune()
            .args(["evaluate", "real-images", "--device", "cpu", "--dreambench"])
            .arg(&bench)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    // The empty teapot folder is reported by name; dog2 is still evaluated.
    let out = run(&dir.path().join("o1"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("o1/real_images.json")).unwrap())
            .unwrap();
    assert!(json["FEAT-I"]["per_subject"]["dog2"].is_number());
    assert!(json["FEAT-I"]["failed"]["teapot"].as_str().unwrap().contains("teapot"));

    std::fs::write(bench.join("prompts.txt"), "object\ta {0} {1}\nanimal\ta {0} {1}\n").unwrap();
    let out = run(&dir.path().join("o2"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prompts.txt:2") && err.contains("unknown prompt kind `animal`"), "{err}");
}

#[test]
fn evaluate_generators_puts_supervisor_and_student_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = crate::support::repo_root().join("models/tests/fixtures");
    let supervisor_sampling = dir.path().join("supervisor.json");
    std::fs::write(
        &supervisor_sampling,
        r#"{"num_inference_steps": 2, "guidance_scale": 3.0, "sampler": "ddim", "resolution": 16}"#,
    )
    .unwrap();
    let student_sampling = dir.path().join("student.json");
    std::fs::write(
        &student_sampling,
        r#"{"grid": 4, "image": {"guidance_scale": 2.0, "image_top_k": 8},
            "tokens": {"bos": 1, "separator": 2, "begin_image": 3, "end_image": 55, "new_line": 56,
                       "size_base": 57, "codes_per_unit": 2}}"#,
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    let out = proxytune()
        .args(["evaluate", "generators", "--device", "cpu", "--dreambench"])
        .arg(dreambench())
        .arg("--out")
        .arg(&out_dir)
        .arg("--dino")
        .arg(fixtures.join("vit_tiny"))
        .arg("--supervisor")
        .arg(fixtures.join("sd_tiny"))
        .arg("--supervisor-sampling")
        .arg(&supervisor_sampling)
        .arg("--student")
        .arg(fixtures.join("chameleon_tiny"))
        .arg("--student-sampling")
        .arg(&student_sampling)
        .args(["--subjects", "dog2,backpack", "--max-prompts", "2", "--images-per-prompt", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for role in ["supervisor", "student"] {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out_dir.join(format!("{role}.json"))).unwrap())
                .unwrap();
        for metric in ["FEAT-I", "DINO"] {
            assert_eq!(
                json["metrics"][metric]["per_subject"].as_object().unwrap().len(),
                2,
                "{role} {metric}"
            );
        }
        assert_eq!(json["per_prompt"]["dog2"].as_array().unwrap().len(), 2);
        let grid = image::open(out_dir.join(format!("grids/{role}/dog2.png"))).unwrap();
        assert_eq!(grid.height(), 2 * grid.width() / 2, "2 prompts x 2 images of square samples");
    }
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("| metric | subjects | supervisor | student |") && md.contains("| dog2 |"), "{md}");

    // CLIP-T with a tokenizer whose ids the (tiny) text encoder does not have: an error, not a panic.
    let out = proxytune()
        .args(["evaluate", "generators", "--device", "cpu", "--dreambench"])
        .arg(dreambench())
        .arg("--out")
        .arg(&out_dir)
        .arg("--clip")
        .arg(fixtures.join("clip_tiny"))
        .arg("--supervisor")
        .arg(fixtures.join("sd_tiny"))
        .arg("--supervisor-sampling")
        .arg(&supervisor_sampling)
        .args(["--subjects", "dog2", "--max-prompts", "1", "--images-per-prompt", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("outside the text encoder's vocabulary of 100"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A subject that does not exist is named.
    let out = proxytune()
        .args(["evaluate", "generators", "--device", "cpu", "--dreambench"])
        .arg(dreambench())
        .arg("--supervisor")
        .arg(fixtures.join("sd_tiny"))
        .args(["--subjects", "dog2,unicorn"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no subject `unicorn`"));
}

#[test]
fn world_subjects_export_as_a_dreambench_folder_that_evaluate_reads() {
    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("world");
    let out = proxytune().args(["world", "export", "--subjects", "3", "--out"]).arg(&world).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = proxytune()
        .args(["evaluate", "real-images", "--device", "cpu", "--dreambench"])
        .arg(&world)
        .arg("--out")
        .arg(dir.path().join("eval"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("eval/real_images.json")).unwrap())
            .unwrap();
    let per_subject = json["FEAT-I"]["per_subject"].as_object().unwrap();
    let names: Vec<&str> = per_subject.keys().map(String::as_str).collect();
    assert_eq!(names, ["backpack_1", "dog_2", "teapot_0"]);
    assert!(per_subject.values().all(|v| v.as_f64().is_some_and(|v| v > 0.0 && v <= 1.0)));
    let out = proxytune().args(["world", "export", "--subjects", "0", "--out"]).arg(&world).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("1..=8 subjects"));
}

#[test]
fn pretraining_the_world_clip_learns_retrieval_and_gives_a_loadable_scorer() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    let out = proxytune()
        .args(["pretrain", "clip", "--device", "cpu", "--steps", "160", "--batch", "32", "--out"])
        .arg(&clip)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(clip.join("manifest.json")).unwrap()).unwrap();
    let (before, after) = (
        manifest["retrieval_top1_before"].as_f64().unwrap(),
        manifest["retrieval_top1_after"].as_f64().unwrap(),
    );
    eprintln!(
        "world CLIP, 160 steps of 32 pairs: held-out top-1 retrieval {before:.3} -> {after:.3} (chance 0.008)"
    );
    assert!(after > 0.1 && after > 5.0 * before, "{before} -> {after}");
    // The folder is a CLIP checkpoint the evaluation commands load, on the world's subjects.
    let world = dir.path().join("world");
    let out = proxytune().args(["world", "export", "--subjects", "2", "--out"]).arg(&world).output().unwrap();
    assert!(out.status.success());
    let out = proxytune()
        .args(["evaluate", "real-images", "--device", "cpu", "--dreambench"])
        .arg(&world)
        .arg("--out")
        .arg(dir.path().join("eval"))
        .arg("--clip")
        .arg(&clip)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("eval/real_images.json")).unwrap())
            .unwrap();
    assert!(json["CLIP-I"]["all"].as_f64().is_some_and(|v| v.is_finite()));
}

#[test]
fn pretraining_the_world_dino_learns_instances_across_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let dino = dir.path().join("dino");
    let out = proxytune()
        .args(["pretrain", "dino", "--device", "cpu", "--steps", "160", "--batch", "32", "--out"])
        .arg(&dino)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dino.join("manifest.json")).unwrap()).unwrap();
    let before = manifest["instance_retrieval_top1_before"].as_f64().unwrap();
    let after = manifest["instance_retrieval_top1_after"].as_f64().unwrap();
    eprintln!("world DINO, 160 steps of 32 pairs: held-out instance retrieval {before:.3} -> {after:.3} (chance 0.008)");
    assert!(after > 0.06 && after > 3.0 * before, "{before} -> {after}");
    let world = dir.path().join("world");
    let out = proxytune().args(["world", "export", "--subjects", "2", "--out"]).arg(&world).output().unwrap();
    assert!(out.status.success());
    let out = proxytune()
        .args(["evaluate", "real-images", "--device", "cpu", "--dreambench"])
        .arg(&world)
        .arg("--out")
        .arg(dir.path().join("eval"))
        .arg("--dino")
        .arg(&dino)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bench_load_compares_the_streaming_loader_with_whole_file_reads() {
    let out = proxytune()
        .args([
            "bench",
            "load",
            "--hidden",
            "64",
            "--layers",
            "2",
            "--vocab",
            "512",
            "--shards",
            "2",
            "--repeats",
            "1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let runs = summary["runs"].as_array().unwrap();
    let modes: Vec<&str> = runs.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["streaming", "whole-file"], "{text}");
    assert!(
        runs.iter().all(|r| r["peak_kib"].as_u64().unwrap() >= r["built_kib"].as_u64().unwrap()),
        "{text}"
    );
}

/// Runs `proxytune bench ...` as `configure` sets it up, writing its JSON report into `dir`;
/// returns the report and the printed table.
fn bench_report(dir: &std::path::Path, configure: impl FnOnce(&mut Command)) -> (serde_json::Value, String) {
    let report = dir.join("report.json");
    let mut command = proxytune();
    configure(&mut command);
    let out = command.arg("--out").arg(&report).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    (serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap(), text)
}

/// `bench sample` at a small cut (2x2 codes, 2 DDIM steps, batches 1 and 3): both samplers and
/// both references run and every row is measured (the figures themselves are the README's, from a
/// full run).
#[test]
fn bench_sample_measures_both_samplers_against_their_references() {
    let dir = tempfile::tempdir().unwrap();
    let (r, text) = bench_report(dir.path(), |c| {
        c.args(["bench", "sample", "--grid", "2", "--batches", "1,3", "--reference-images", "1"])
            .args(["--steps", "2", "--repeats", "1", "--python"])
            .arg(crate::support::python())
            .arg("--world")
            .arg(crate::support::repo_root().join("models/world"));
    });
    assert_eq!(r["student"]["tokens_per_image"], 7, "2 rows of 2 codes and a break, then the end");
    assert!(r["student"]["reference"]["images_per_s"].as_f64().unwrap() > 0.0);
    for part in ["student", "supervisor"] {
        let rows = r[part]["rows"].as_array().unwrap();
        let batches: Vec<u64> = rows.iter().map(|row| row["batch"].as_u64().unwrap()).collect();
        assert_eq!(batches, [1, 3], "{part}");
        for row in rows {
            assert!(row["images_per_s"].as_f64().unwrap() > 0.0, "{part}: {row}");
            assert!(row["vs_reference"].as_f64().unwrap().is_finite(), "{part}: {row}");
        }
    }
    assert!(text.contains("vs reference") && text.contains("vs diffusers"), "{text}");
}

/// `bench pipeline` at small budgets (6 proxies a prompt, so generation outlasts the first commit's
/// trip to the student on a busy machine): both runs end, the stage-by-stage student takes its first
/// step only after the last proxy while the streaming one starts before it, and every figure of
/// the report is there.
#[test]
fn bench_pipeline_runs_a_job_streaming_and_stage_by_stage() {
    let dir = tempfile::tempdir().unwrap();
    let (r, text) = bench_report(dir.path(), |c| {
        c.args(["bench", "pipeline", "--class-priors", "4", "--supervisor-steps", "6"])
            .args(["--proxies-per-prompt", "6", "--student-steps", "40", "--student-min-rows", "4"])
            .args(["--eval-prompts", "1", "--world"])
            .arg(crate::support::repo_root().join("models/world"));
    });
    let f = |run: &str, key: &str| r[run][key].as_f64().unwrap_or_else(|| panic!("{run}.{key}: {r}"));
    assert!(f("stage_by_stage", "first_step_s") > f("stage_by_stage", "last_proxy_s"), "{r}");
    assert!(f("streaming", "first_step_s") < f("streaming", "last_proxy_s"), "{r}");
    for run in ["streaming", "stage_by_stage"] {
        assert!(
            f(run, "wall_s") > 0.0 && f(run, "generation_busy_s") > 0.0 && f(run, "training_busy_s") > 0.0
        );
        assert!(r[run]["tuned_student"]["DINO"].as_f64().is_some(), "{r}");
    }
    let two = &r["two_devices"];
    let ratio = two["ideal_over_sum"].as_f64().unwrap();
    assert!((0.5..=1.0).contains(&ratio), "{two}");
    assert!(text.contains("stage by stage") && text.contains("two devices"), "{text}");
}

#[test]
fn bench_real_size_runs_every_model_and_measurement_at_the_tiny_scale() {
    let dir = tempfile::tempdir().unwrap();
    let (r, text) = bench_report(dir.path(), |c| {
        c.args(["bench", "real-size", "--scale", "tiny", "--precision", "fp32", "--iters", "1"])
            .args(["--sample-steps", "2", "--sample-batches", "1,2", "--python"])
            .arg(crate::support::python())
            .arg("--dir")
            .arg(dir.path().join("checkpoints"));
    });
    assert!(!text.contains("failed"), "{text}");
    for (model, variants) in [
        ("sd15", &["plain", "checkpointed"][..]),
        ("sdxl", &["plain", "checkpointed"][..]),
        ("chameleon-7b", &["plain", "checkpointed", "chunked", "checkpointed+chunked"][..]),
    ] {
        let m = &r["models"][model];
        let load = &m["load"];
        assert!(load["shards"].as_u64().unwrap() >= 4, "{model}: {load}");
        assert!(
            load["load_s"].as_f64().unwrap() > 0.0 && load["parameters"].as_u64().unwrap() > 0,
            "{model}"
        );
        let train: Vec<&str> =
            m["train"].as_array().unwrap().iter().map(|t| t["variant"].as_str().unwrap()).collect();
        assert_eq!(train, variants, "{model}");
        for t in m["train"].as_array().unwrap() {
            assert!(
                t["step_s"].as_f64().unwrap() > 0.0 && t["peak_above_model_bytes"].as_u64().is_some(),
                "{t}"
            );
        }
        let batches: Vec<u64> =
            m["sample"].as_array().unwrap().iter().map(|s| s["batch"].as_u64().unwrap()).collect();
        assert_eq!(batches, [1, 2], "{model}");
        for s in m["sample"].as_array().unwrap() {
            assert!(s["per_image_s"].as_f64().unwrap() > 0.0, "{s}");
        }
    }
    // The student's folder is a transformers checkpoint: from_pretrained reads it.
    let t = &r["models"]["chameleon-7b"]["load"]["transformers"];
    assert_eq!(t["parameters"], r["models"]["chameleon-7b"]["load"]["parameters"], "{t}");
    assert_eq!(r["models"]["sd15"]["sample"][0]["steps"], 2);
}

#[test]
fn bench_soak_kills_and_loads_the_daemon_and_its_jobs_end_as_their_reference() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("soak.json");
    let out = proxytune()
        .args(["bench", "soak", "--jobs", "1", "--kills", "2", "--clients", "4", "--poll-seconds", "2"])
        .arg("--world")
        .arg(crate::support::repo_root().join("models/world"))
        .arg("--dir")
        .arg(dir.path().join("scratch"))
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["faults"]["kills"], 2, "{r}");
    assert_eq!(r["load"]["errors"], 0, "{r}");
    assert!(r["load"]["requests"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["all_outcomes_identical"], true, "{r}");
    // The same proxies by seed, each decided alike: none lost or doubled by the kills.
    assert!(r["faults"]["jobs"][0]["proxies"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["faults"]["jobs"][0]["decisions_equal"], true, "{r}");
}

/// `bench unet` over two short rounds: diffusers and proxytune time every row in each round, and
/// the report carries each row's medians, ratio and per-round ratios.
#[test]
fn bench_unet_times_both_sides_phase_by_phase_over_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let (r, text) = bench_report(dir.path(), |c| {
        c.args(["bench", "unet", "--iters", "1", "--rounds", "2", "--python"]).arg(crate::support::python());
    });
    let rows = r["rows"].as_array().unwrap();
    let measures: Vec<&str> = rows.iter().map(|row| row["measure"].as_str().unwrap()).collect();
    assert_eq!(
        measures,
        ["sampling step", "train step", "forward", "backward", "train step, gradients returned"]
    );
    for row in rows {
        for key in ["proxytune_s", "diffusers_s", "ratio"] {
            assert!(row[key].as_f64().is_some_and(|v| v > 0.0 && v.is_finite()), "{key}: {row}");
        }
        assert_eq!(row["ratio_each_round"].as_array().unwrap().len(), 2, "{row}");
    }
    assert!(text.contains("ratio each round"), "{text}");
}
