//! `proxytune demo` and `proxytune replay` through the real binary, at a reduced budget, on the
//! committed world models: every stage produces rows, the student's first step comes before the
//! last proxy is generated, the corpus version and rows trained on agree with the corpus, every
//! score is present and finite, `/metrics` is served while it runs; then a replay of the stored
//! version with a new threshold. Bad input is refused before any work.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proxytune_actors::corpus::{Corpus, VersionRef};
use proxytune_schemas::{Proxy, Table, VqTokens};

use crate::support::repo_root;

fn proxytune() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_proxytune"));
    c.current_dir(repo_root());
    c
}

/// The body of `GET /metrics`, if the address answers.
fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const BUDGET: [&str; 20] = [
    "--class-priors",
    "8",
    "--supervisor-steps",
    "30",
    "--proxies-per-prompt",
    "6",
    "--student-steps",
    "40",
    "--student-min-rows",
    "4",
    "--eval-images",
    "1",
    "--eval-prompts",
    "4",
    "--min-fidelity",
    "0.0",
    "--device",
    "cpu",
    "--subject",
    "teapot_0",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_every_stage_streams_and_reports_then_a_replay_retrains() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let mut child = proxytune()
        .arg("demo")
        .args(BUDGET)
        .args(["--metrics-port", "0", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The log, line by line as it comes; the demo logs the /metrics address it bound.
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = lines_tx.send(line);
        }
        all
    });
    let addr: std::net::SocketAddr = loop {
        let line =
            lines.recv_timeout(Duration::from_secs(120)).expect("the demo logged its /metrics address");
        if let Some(rest) = line.split("Serving metrics on http://").nth(1) {
            break rest.trim().trim_end_matches("/metrics").parse().unwrap();
        }
    };
    // /metrics answers while the demo runs, with the pipeline's series.
    let started = Instant::now();
    let mut scraped = None;
    while started.elapsed() < Duration::from_secs(120) && child.try_wait().unwrap().is_none() {
        if let Some(body) = scrape(addr).filter(|b| b.contains("proxytune_")) {
            scraped = Some(body);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let scraped = scraped.expect("/metrics answered while the demo ran");
    assert!(scraped.contains("proxytune_"), "{scraped}");

    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(status.success(), "{log}");

    let report = json(&out.join("report/report.json"));
    let stages = &report["stages"];
    assert_eq!(report["outcome"], "Succeeded");
    assert_eq!(stages["class_priors"]["rows"], 8);
    // Enough proxies that generation outlasts the first commit's trip through the Filter, the
    // writer and the tokenizer even on a busy machine (at 3 a prompt, 3.4 s of generation, it
    // once did not: the first token rows came 0.1 s after the last proxy).
    assert_eq!(stages["proxies"]["rows"], 16 * 6, "16 prompts x 6");
    let kept = stages["proxies"]["kept"].as_u64().unwrap();
    assert!(kept >= 4, "{stages}");
    assert_eq!(stages["vq_tokens"]["rows"].as_u64().unwrap(), kept);
    assert_eq!(stages["student"]["steps"], 40);
    // Streaming: the student's first step came before the last proxy was generated.
    let first_step = stages["student"]["first_step_at_us"].as_i64().unwrap();
    let last_proxy = stages["proxies"]["last_generated_at_us"].as_i64().unwrap();
    eprintln!(
        "demo: {kept} of 96 proxies kept; first student step {:.1} s before the last proxy; {} steps before it",
        (last_proxy - first_step) as f64 / 1e6,
        stages["student"]["steps_before_last_proxy"]
    );
    assert!(first_step < last_proxy, "{stages}");
    // The corpus version and rows trained on are the corpus' own.
    let corpus = Corpus::open(out.join("corpus")).unwrap();
    let table = corpus.table::<Proxy>().await.unwrap();
    let version = report["corpus"]["proxies_version"].as_u64().unwrap();
    assert_eq!(table.version(), Some(version));
    let kept_rows = table.count_rows(Some("keep = true")).await.unwrap() as u64;
    assert_eq!(kept_rows, kept);
    assert_eq!(report["corpus"]["rows_trained_on"].as_u64().unwrap(), kept);
    let run = json(&out.join("student/run.json"));
    assert_eq!(run["data"]["row_keys"].as_array().unwrap().len() as u64, kept);
    // Compacted before the report (a commit every 8 proxies and 32 token rows made a fragment
    // each): one fragment a table, its rows in the order the student received them.
    let vq = corpus.table::<VqTokens>().await.unwrap();
    assert_eq!((table.fragment_count(), vq.fragment_count()), (1, 1));
    assert_eq!(report["corpus"]["vq_tokens_version"].as_u64(), vq.version());
    let stored: Vec<String> = vq.read_rows(None).await.unwrap().iter().map(|r| r.key().to_string()).collect();
    assert_eq!(run["data"]["row_keys"], serde_json::json!(stored));
    // The direct baseline trained on the five references' token rows and nothing else, for the
    // Proxy-Tuned student's steps.
    let direct = &report["baselines"]["direct-lora"];
    let keys: Vec<String> = (0..5).map(|i| format!("proxy=reference-{i}/tokenizer=world-vq@1")).collect();
    assert_eq!(direct["rows_trained_on"], serde_json::json!(keys), "{direct}");
    assert_eq!(direct["steps"], report["stages"]["student"]["steps"], "{direct}");
    assert_eq!(json(&out.join("student_direct/run.json"))["data"]["row_keys"], serde_json::json!(keys));
    // The augmented baseline: eight augmented copies of each reference, the same steps.
    let augmented = &report["baselines"]["direct-lora-augmented"];
    let keys: Vec<String> = (0..5)
        .flat_map(|i| (0..8).map(move |j| format!("proxy=reference-{i}-augmented-{j}/tokenizer=world-vq@1")))
        .collect();
    assert_eq!(augmented["rows_trained_on"], serde_json::json!(keys), "{augmented}");
    assert_eq!(augmented["steps"], report["stages"]["student"]["steps"], "{augmented}");
    // The full baseline: every weight trained on the five references, written whole.
    assert_eq!(report["baselines"]["direct-full"]["steps"], report["stages"]["student"]["steps"]);
    assert!(out.join("student_direct_full/model.safetensors").is_file());
    assert!(!out.join("student_direct_full/adapter_model.safetensors").exists());
    // Every model scored, every score finite: untuned, supervisor, Proxy-Tuned, the baselines.
    let models = report["evaluation"]["models"].as_array().unwrap();
    assert_eq!(models.len(), 6);
    assert_eq!(models[3]["label"], "student (direct LoRA on the references)");
    assert_eq!(models[4]["label"], "student (direct LoRA on augmented references)");
    assert_eq!(models[5]["label"], "student (direct full fine-tune on the references)");
    assert!(models[5]["scores"]["version"]
        .as_str()
        .unwrap()
        .ends_with("student_direct_full/model.safetensors"));
    // Sampled with its trained weights, not the base's: its scores are not the untuned student's.
    assert_ne!(models[5]["scores"]["metrics"], models[0]["scores"]["metrics"], "{models:?}");
    for m in models {
        let s = &m["scores"];
        for metric in ["DINO", "CLIP-I", "CLIP-T"] {
            assert!(s["metrics"][metric].as_f64().is_some_and(f64::is_finite), "{m}");
        }
        for check in ["context_accuracy", "subject_colour_present"] {
            assert!(s[check].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)), "{m}");
        }
        assert_eq!(s["samples"], 4);
    }
    // The method's promise, at this budget and with the same seeds: the Proxy-Tuned student draws
    // the subject far more faithfully than the untuned one. Measured on a 2-vCPU AMD EPYC machine
    // (2026-12-02, 6 proxies a prompt): DINO -0.034 -> 0.155, CLIP-I -0.076 -> 0.481; the margins
    // asserted are about half of those, so other CPUs' last-bit differences cannot flip them.
    let metric = |i: usize, name: &str| models[i]["scores"]["metrics"][name].as_f64().unwrap();
    assert!(metric(2, "DINO") - metric(0, "DINO") >= 0.1, "DINO: {models:?}");
    assert!(metric(2, "CLIP-I") - metric(0, "CLIP-I") >= 0.2, "CLIP-I: {models:?}");
    let html = std::fs::read_to_string(out.join("report/index.html")).unwrap();
    assert!(html.contains("student (Proxy-Tuned LoRA)") && html.contains("references.png"));
    for grid in
        ["references.png", "samples_0.png", "samples_1.png", "samples_2.png", "timeline.svg", "losses.svg"]
    {
        assert!(out.join("report").join(grid).is_file(), "{grid}");
    }

    // A replay of that version with a new fidelity threshold: no generation, the report names the
    // version and the rows.
    let replay = dir.path().join("replay");
    let output = proxytune()
        .args([
            "replay",
            "--student-steps",
            "8",
            "--eval-images",
            "1",
            "--eval-prompts",
            "2",
            "--device",
            "cpu",
        ])
        .args(["--version", &version.to_string(), "--min-fidelity", "0.3", "--corpus"])
        .arg(out.join("corpus"))
        .arg("--out")
        .arg(&replay)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let r = json(&replay.join("report.json"));
    assert_eq!(r["proxies_version"].as_u64(), Some(version));
    let table = table.checkout(&VersionRef::Number(version)).await.unwrap();
    let selected = table
        .count_rows(Some(
            "(reject_reason IS NULL OR reject_reason <> 'near_duplicate') AND score_dino >= 0.3",
        ))
        .await
        .unwrap() as u64;
    assert_eq!(r["rows_selected"].as_u64(), Some(selected));
    assert_eq!(r["rows_trained_on"].as_u64(), Some(selected));
    assert_eq!(r["student_steps"], 8);
    assert!(r["evaluation"][0]["scores"]["metrics"]["DINO"].as_f64().is_some_and(f64::is_finite));
    // The corpus is unchanged by the replay.
    assert_eq!(corpus.table::<Proxy>().await.unwrap().version(), Some(version));

    // The ablations as replays of that version: the first 4 and 8 kept proxies, all of them, and
    // every stored proxy with the Filter off; a curve of the three with the kept ones.
    let ablate = dir.path().join("ablate");
    let output = proxytune()
        .args([
            "ablate",
            "--sizes",
            "4,8",
            "--student-steps",
            "4",
            "--eval-images",
            "1",
            "--eval-prompts",
            "1",
        ])
        .args(["--device", "cpu", "--version", &version.to_string(), "--corpus"])
        .arg(out.join("corpus"))
        .arg("--out")
        .arg(&ablate)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let a = json(&ablate.join("report.json"));
    let rows: Vec<u64> = a["data_scaling"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rows_trained_on"].as_u64().unwrap())
        .collect();
    assert_eq!(rows, [4, 8, kept], "{a}");
    assert_eq!(a["kept_proxies"].as_u64(), Some(kept));
    assert_eq!(a["filter"]["on"]["rows_trained_on"].as_u64(), Some(kept), "{a}");
    assert_eq!(a["filter"]["off"]["rows_trained_on"].as_u64(), Some(16 * 6), "every stored proxy: {a}");
    // The first-4 run trained on the first four kept proxies in storage order.
    let first4 = json(&ablate.join("first_4/student/run.json"));
    let kept_keys: Vec<String> = table
        .read_rows_light(Some("keep = true"))
        .await
        .unwrap()
        .iter()
        .take(4)
        .map(|p| {
            let key = [("proxy", p.key().to_string()), ("tokenizer", "world-vq@1".to_string())];
            proxytune_schemas::RowKey::new(key).as_str().to_string()
        })
        .collect();
    let trained: Vec<String> = first4["data"]["row_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(trained, kept_keys);
    for r in a["data_scaling"].as_array().unwrap() {
        assert!(r["metrics"]["DINO"].as_f64().is_some_and(f64::is_finite), "{r}");
    }
    let svg = std::fs::read_to_string(ablate.join("data_scaling.svg")).unwrap();
    assert!(svg.contains("kept proxies trained on") && svg.contains("CLIP-I"));
}

/// The same demo with the world's LlamaGen student: its tokens come from its own VQ, each kept
/// prompt's T5 states are stored once, and the untuned and Proxy-Tuned students and the two direct
/// baselines asked for (`--baselines`) are all sampled through its T5 and GPT; then a replay trains
/// it again from the stored corpus, its caption states read from the corpus, not encoded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_teaches_the_llamagen_student_and_a_replay_retrains_it() {
    use proxytune_schemas::CaptionStates;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let output = proxytune()
        .arg("demo")
        .args(BUDGET)
        .args(["--student", "llamagen", "--baselines", "direct-lora,direct-full", "--no-metrics", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report = json(&out.join("report/report.json"));
    let stages = &report["stages"];
    let kept = stages["proxies"]["kept"].as_u64().unwrap();
    assert_eq!(stages["vq_tokens"]["rows"].as_u64().unwrap(), kept);
    assert_eq!(stages["student"]["steps"], 40);
    let corpus = Corpus::open(out.join("corpus")).unwrap();
    let tokens: Vec<VqTokens> = corpus.table::<VqTokens>().await.unwrap().read_rows(None).await.unwrap();
    assert!(tokens.iter().all(|t| t.tokenizer_id == "world-llamagen-vq@1" && t.tokens.len() == 64));
    let captions: Vec<CaptionStates> =
        corpus.table::<CaptionStates>().await.unwrap().read_rows(None).await.unwrap();
    let prompts: std::collections::BTreeSet<&str> = tokens.iter().map(|t| t.prompt.as_str()).collect();
    let captioned: std::collections::BTreeSet<&str> = captions.iter().map(|c| c.prompt.as_str()).collect();
    assert_eq!((captions.len(), &captioned), (prompts.len(), &prompts), "each kept prompt once");
    assert!(captions.iter().all(|c| c.encoder_id == "world-t5@1" && c.dim == 64));
    let models = report["evaluation"]["models"].as_array().unwrap();
    let labels: Vec<&str> = models.iter().map(|m| m["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels[2..],
        [
            "student (Proxy-Tuned LoRA)",
            "student (direct LoRA on the references)",
            "student (direct full fine-tune on the references)"
        ],
        "the two baselines asked for, no other"
    );
    for m in models {
        for metric in ["DINO", "CLIP-I", "CLIP-T"] {
            assert!(m["scores"]["metrics"][metric].as_f64().is_some_and(f64::is_finite), "{m}");
        }
    }

    let replay = dir.path().join("replay");
    let output = proxytune()
        .args(["replay", "--student", "llamagen", "--student-steps", "8", "--eval-images", "1"])
        .args(["--eval-prompts", "2", "--device", "cpu", "--corpus"])
        .arg(out.join("corpus"))
        .arg("--out")
        .arg(&replay)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let r = json(&replay.join("report.json"));
    assert_eq!(r["student_steps"], 8);
    assert!(r["evaluation"][0]["scores"]["metrics"]["DINO"].as_f64().is_some_and(f64::is_finite));
    // The replay took every prompt's T5 states from the corpus and ran T5 on none.
    assert_eq!(
        (r["captions_reused"].as_u64(), r["captions_encoded"].as_u64()),
        (Some(prompts.len() as u64), Some(0))
    );
}

#[test]
fn the_committed_dashboards_are_what_their_source_renders() {
    let out = proxytune().args(["grafana", "render", "--check"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text =
        std::fs::read_to_string(repo_root().join("grafana/dashboards/proxytune-pipeline.json")).unwrap();
    assert!(text.contains("${datasource}") && !text.contains("\"uid\": \"P"), "datasource by variable");
}

#[test]
fn bad_demo_input_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], out: &Path| {
        let o = proxytune().arg("demo").args(args).args(["--no-metrics", "--out"]).arg(out).output().unwrap();
        assert!(!o.status.success());
        for work in ["supervisor", "student", "report"] {
            assert!(!out.join(work).exists(), "refused before any work, yet {work}/ was written");
        }
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let out = dir.path().join("out");
    let err = run(&["--subject", "unicorn_9"], &out);
    assert!(err.contains("unicorn_9") && err.contains("teapot_0"), "{err}");
    let err = run(&["--student-steps", "0"], &out);
    assert!(err.contains("--student-steps is 0"), "{err}");
    let file = dir.path().join("a_file");
    std::fs::write(&file, b"x").unwrap();
    let err = run(&[], &file);
    assert!(err.contains("a_file"), "{err}");
    // A corpus path that holds something else is left untouched.
    let other = dir.path().join("other");
    std::fs::create_dir_all(other.join("corpus")).unwrap();
    std::fs::write(other.join("corpus/notes.txt"), b"mine").unwrap();
    let err = run(&[], &other);
    assert!(err.contains("not a proxytune corpus"), "{err}");
    assert_eq!(std::fs::read(other.join("corpus/notes.txt")).unwrap(), b"mine");
    assert!(!other.join("report").exists(), "no work started");
    let err = run(&["--world", "/nonexistent/world"], &out);
    assert!(err.contains("tools/dev world"), "{err}");
    // A folder of photos: it must exist and hold 3–6 images of a world class.
    let photos = dir.path().join("photos");
    let err = run(&["--subject", "rex", "--class-noun", "dog", "--photos", photos.to_str().unwrap()], &out);
    assert!(err.contains("photos"), "{err}");
    std::fs::create_dir_all(&photos).unwrap();
    for k in 0..2 {
        image::RgbImage::new(40, 40).save(photos.join(format!("{k}.png"))).unwrap();
    }
    let err = run(&["--subject", "rex", "--class-noun", "dog", "--photos", photos.to_str().unwrap()], &out);
    assert!(err.contains("2 photos") && err.contains("3 to 6"), "{err}");
    image::RgbImage::new(40, 40).save(photos.join("2.png")).unwrap();
    let err = run(&["--subject", "rex", "--class-noun", "cow", "--photos", photos.to_str().unwrap()], &out);
    assert!(err.contains("class_noun `cow`") && err.contains("teapot"), "{err}");
    let err = run(&["--subject", "rex", "--photos", photos.to_str().unwrap()], &out);
    assert!(err.contains("--class-noun"), "{err}");
    let err = run(&["--identifier", "zq"], &out);
    assert!(err.contains("identifier `zq`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_demo_leaves_a_readable_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let mut budget = BUDGET.to_vec();
    let i = budget.iter().position(|a| *a == "--proxies-per-prompt").unwrap();
    budget[i + 1] = "40"; // long enough to be interrupted mid-generation
    let mut child = proxytune()
        .arg("demo")
        .args(budget)
        .args(["--no-metrics", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once proxies are being committed: the first commit of the proxies table is read.
    let started = Instant::now();
    loop {
        assert!(child.try_wait().unwrap().is_none(), "the demo ended before it was interrupted");
        assert!(started.elapsed() < Duration::from_secs(300), "no proxy was committed");
        let committed = match Corpus::open(out.join("corpus")) {
            Ok(corpus) => match corpus.table::<Proxy>().await {
                Ok(table) => table.count_rows(None).await.unwrap_or(0),
                Err(_) => 0,
            },
            Err(_) => 0,
        };
        if committed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("keeps every committed row"), "{stderr}");
    // Every committed proxy is readable, and no more than planned.
    let corpus = Corpus::open(out.join("corpus")).unwrap();
    let proxies: Vec<Proxy> = corpus.table::<Proxy>().await.unwrap().read_rows(None).await.unwrap();
    assert!(!proxies.is_empty() && proxies.len() < 16 * 40, "{}", proxies.len());
    assert!(proxies.iter().all(|p| p.keep.is_some()), "every stored proxy was judged");
}

/// The README's weak-to-strong tables, reproduced by `proxytune demo` at its default budgets (about
/// 7 minutes each on 2 vCPUs), for the Chameleon student and for the LlamaGen one. On the CPU that
/// measured them (`/proc/cpuinfo` model name `AMD EPYC`) every figure equals the README's to the
/// digits it prints. On another CPU libtorch's float32 kernels move the students' rows (the README
/// says by how much), so the tables' reading is checked instead: the tuned student above the
/// untuned one in DINO and CLIP-I and in the subject's colour, and both direct baselines below the
/// Proxy-Tuned student in CLIP-I and, by more than 0.3, in the subject's colour; for Chameleon also
/// above the supervisor in DINO and CLIP-I and below it in CLIP-T.
#[test]
#[ignore = "about 15 minutes; run with `tools/dev cargo test --workspace --test all -- --ignored`"]
fn the_demo_at_default_budgets_reproduces_the_readme_tables() {
    reproduces_the_readme_table("chameleon", "student");
    reproduces_the_readme_table("llamagen", "LlamaGen student");
}

/// One of [`the_demo_at_default_budgets_reproduces_the_readme_tables`]: `proxytune demo --student
/// student` against the README rows labelled `<prefix>, …` (the supervisor's row is shared).
fn reproduces_the_readme_table(student: &str, prefix: &str) {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let row = |label: &str| -> Vec<f64> {
        let line = readme
            .lines()
            .find(|l| l.starts_with(&format!("| {label} |")))
            .unwrap_or_else(|| panic!("the README's table has no `{label}` row"));
        line.split('|').skip(2).filter(|c| !c.trim().is_empty()).map(|c| c.trim().parse().unwrap()).collect()
    };
    let expected = [
        ("student (untuned)", row(&format!("{prefix}, untuned"))),
        ("supervisor (DreamBooth-LoRA)", row("supervisor, DreamBooth-LoRA")),
        ("student (Proxy-Tuned LoRA)", row(&format!("{prefix}, Proxy-Tuned LoRA"))),
        ("student (direct LoRA on the references)", row(&format!("{prefix}, direct LoRA on the references"))),
        (
            "student (direct LoRA on augmented references)",
            row(&format!("{prefix}, direct LoRA on augmented references")),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let run = proxytune()
        .args(["demo", "--no-metrics", "--device", "cpu", "--student", student, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report = json(&out.join("report/report.json"));
    let models = report["evaluation"]["models"].as_array().unwrap();
    let measured: Vec<(String, Vec<f64>)> = models
        .iter()
        .map(|m| {
            let s = &m["scores"];
            let value = |v: &serde_json::Value| v.as_f64().unwrap();
            (
                m["label"].as_str().unwrap().to_string(),
                vec![
                    value(&s["metrics"]["DINO"]),
                    value(&s["metrics"]["CLIP-I"]),
                    value(&s["metrics"]["CLIP-T"]),
                    value(&s["context_accuracy"]),
                    value(&s["subject_colour_present"]),
                ],
            )
        })
        .collect();
    eprintln!("{student} measured: {measured:?}");
    let model_name = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let by_label = |label: &str| &measured.iter().find(|(l, _)| l == label).unwrap().1;
    if model_name == "AMD EPYC" {
        for (label, readme_row) in &expected {
            let ours = by_label(label);
            // Three decimals for the similarity scores, two for the shares, as the table prints them.
            for (k, (o, r)) in ours.iter().zip(readme_row).enumerate() {
                let half_digit = if k < 3 { 0.0005 } else { 0.005 };
                assert!(
                    (o - r).abs() <= half_digit + 1e-9,
                    "{student}: {label}, column {k}: {o} against the README's {r}"
                );
            }
        }
    } else {
        eprintln!("CPU `{model_name}` is not the one that measured the README's table: checking its reading");
    }
    let (untuned, supervisor, tuned) =
        (by_label(expected[0].0), by_label(expected[1].0), by_label(expected[2].0));
    for k in [0, 1, 4] {
        assert!(tuned[k] > untuned[k], "{student}, column {k}: {measured:?}");
    }
    if student == "chameleon" {
        for k in [0, 1] {
            assert!(tuned[k] > supervisor[k], "column {k}: {measured:?}");
        }
        assert!(tuned[2] < supervisor[2], "CLIP-T: {measured:?}");
    }
    // The paper's point: trained on the references directly, with or without augmentation, the
    // student learns the subject less: lower CLIP-I, and the subject's colour far less often. (In
    // DINO the augmented LlamaGen baseline ties the Proxy-Tuned student: 0.426 against 0.427.)
    for direct in [by_label(expected[3].0), by_label(expected[4].0)] {
        assert!(direct[1] < tuned[1], "{student}: direct against Proxy-Tuned, CLIP-I: {measured:?}");
        assert!(direct[4] + 0.3 < tuned[4], "{student}: direct against Proxy-Tuned, colour: {measured:?}");
    }
}
