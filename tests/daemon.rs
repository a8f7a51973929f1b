//! `proxytune daemon` through the real binary: jobs submitted over HTTP run to completion and
//! give their reports, a running job is paused, resumed and cancelled, bad requests get the right status and a
//! message, a non-loopback bind needs a token and requests must carry it; a job killed (`kill -9`)
//! during tuning, generation and training resumes each time and ends with exactly its planned
//! proxies and a student that continued from its checkpoints.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::metrics::KillOnDrop;
use crate::support::repo_root;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.0 request; returns (status, body).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

fn start(dir: &Path, bind: &str, token: Option<&str>) -> std::process::Child {
    let config = dir.join("daemon.toml");
    let token = token.map(|t| format!("token = \"{t}\"\n")).unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "bind = \"{bind}\"\ndata_dir = \"{}\"\nworld = \"{}\"\nconcurrency = 1\nmax_body_bytes = 4096\ndevice = \"cpu\"\n{token}",
            dir.join("data").display(),
            repo_root().join("models/world").display()
        ),
    )
    .unwrap();
    // The log is appended across restarts (a test reads it; a pipe nobody drains would block).
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("daemon.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_proxytune"))
        .args(["daemon", "--config"])
        .arg(&config)
        .env_remove("PROXYTUNE_TOKEN")
        .env("RUST_LOG", "info,lance=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn wait_up(addr: SocketAddr, token: Option<&str>) {
    let started = Instant::now();
    while request(addr, "GET", "/jobs", "", token).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the daemon never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn job_status(addr: SocketAddr, id: &str) -> serde_json::Value {
    let (status, body) = request(addr, "GET", &format!("/jobs/{id}"), "", None).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()
}

fn job(addr: SocketAddr, id: &str) -> serde_json::Value {
    job_status(addr, id)["job"].clone()
}

fn wait_state(addr: SocketAddr, id: &str, states: &[&str]) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let j = job(addr, id);
        if states.contains(&j["state"].as_str().unwrap()) {
            return j;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "{id} stayed {}", j["state"]);
        std::thread::sleep(Duration::from_millis(250));
    }
}

const SMALL: &str = r#""class_priors": 8, "supervisor_steps": 20, "proxies_per_prompt": 2, "student_steps": 20, "student_min_rows": 4, "eval_images": 1, "eval_prompts": 2"#;

#[test]
fn jobs_run_over_http_a_running_one_is_paused_resumed_and_cancelled_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let _daemon = KillOnDrop(start(dir.path(), &format!("127.0.0.1:{port}"), None));
    wait_up(addr, None);

    let submit = |body: String| request(addr, "POST", "/jobs", &body, None).unwrap();
    let mut ids = Vec::new();
    for subject in ["teapot_0", "dog_2"] {
        let (status, body) = submit(format!(r#"{{"subject": "{subject}", {SMALL}}}"#));
        assert_eq!(status, 201, "{body}");
        ids.push(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_string(),
        );
    }
    let long = SMALL.replace(r#""proxies_per_prompt": 2"#, r#""proxies_per_prompt": 60"#);
    let (status, body) = submit(format!(r#"{{"subject": "cat_3", {long}}}"#));
    assert_eq!(status, 201, "{body}");
    let third = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_string();

    // Bad requests: status and a message naming what is wrong; nothing is queued.
    let cases = [
        ("POST", "/jobs", "{not json".to_string(), 400, "not a job spec"),
        ("POST", "/jobs", r#"{"class_priors": 8}"#.to_string(), 400, "subject"),
        ("POST", "/jobs", r#"{"subject": "dog_2", "colour": "red"}"#.to_string(), 400, "colour"),
        ("POST", "/jobs", r#"{"subject": "unicorn_9"}"#.to_string(), 400, "unicorn_9"),
        ("POST", "/jobs", r#"{"subject": "dog_2", "student_steps": 0}"#.to_string(), 400, "student-steps"),
        (
            "POST",
            "/jobs",
            format!(r#"{{"subject": "dog_2", "pad": "{}"}}"#, "x".repeat(5000)),
            413,
            "exceeds 4096",
        ),
        ("GET", "/jobs/job-99", String::new(), 404, "job-99"),
        ("POST", "/jobs/job-99/cancel", String::new(), 404, "job-99"),
        ("GET", "/nowhere", String::new(), 404, "nowhere"),
        ("DELETE", "/jobs", String::new(), 405, "not allowed"),
    ];
    for (method, path, body, want, says) in cases {
        let (status, answer) = request(addr, method, path, &body, None).unwrap();
        assert_eq!(status, want, "{method} {path}: {answer}");
        assert!(answer.contains(says), "{method} {path}: {answer}");
    }
    let (status, body) = request(addr, "GET", &format!("/jobs/{third}/report"), "", None).unwrap();
    assert_eq!(status, 409, "no report before the job succeeds: {body}");

    // The first two finish with reports; the third is cancelled while it runs.
    for id in &ids {
        let j = wait_state(addr, id, &["succeeded", "failed"]);
        assert_eq!(j["state"], "succeeded", "{j}");
        let (status, body) = request(addr, "GET", &format!("/jobs/{id}/report"), "", None).unwrap();
        assert_eq!(status, 200);
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(report["evaluation"]["models"].as_array().unwrap().len(), 3);
        assert!(report["stages"]["student"]["steps"].as_u64() == Some(20), "{}", report["stages"]);
    }
    wait_state(addr, &third, &["running"]);
    // Pause holds the pipeline: no proxy is generated while paused; resume lets it go on.
    let proxies_generated = || {
        let (_, text) = request(addr, "GET", "/metrics", "", None).unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "proxytune_generated_images_total{{kind=\"proxy\",job_id=\"{third}\"}} "
                ))
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let started = Instant::now();
    while proxies_generated() < 40.0 {
        assert!(started.elapsed() < Duration::from_secs(300), "the third job never generated proxies");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = request(addr, "POST", &format!("/jobs/{third}/pause"), "", None).unwrap();
    assert_eq!(status, 202, "{body}");
    assert_eq!(job(addr, &third)["state"], "paused");
    std::thread::sleep(Duration::from_secs(2)); // a batch in flight finishes
    let held = proxies_generated();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(proxies_generated(), held, "nothing is generated while paused");
    let (status, body) = request(addr, "POST", &format!("/jobs/{third}/pause"), "", None).unwrap();
    assert_eq!(status, 409, "a paused job cannot be paused again: {body}");
    let (status, body) = request(addr, "POST", &format!("/jobs/{third}/resume"), "", None).unwrap();
    assert_eq!(status, 202, "{body}");
    let started = Instant::now();
    while proxies_generated() <= held {
        assert!(started.elapsed() < Duration::from_secs(120), "resume did not restart generation");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = request(addr, "POST", &format!("/jobs/{third}/cancel"), "", None).unwrap();
    assert_eq!(status, 202, "{body}");
    let j = wait_state(addr, &third, &["cancelled", "succeeded", "failed"]);
    assert_eq!(j["state"], "cancelled", "{j}");
    let (status, _) = request(addr, "POST", &format!("/jobs/{third}/cancel"), "", None).unwrap();
    assert_eq!(status, 409, "an ended job cannot be cancelled again");

    let (status, list) = request(addr, "GET", "/jobs", "", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list).unwrap()["jobs"].as_array().unwrap().len(),
        3
    );
    let (status, page) = request(addr, "GET", "/", "", None).unwrap();
    assert!(status == 200 && page.contains(&ids[0]) && page.contains("cancelled"), "{page}");
    let (status, metrics) = request(addr, "GET", "/metrics", "", None).unwrap();
    assert!(status == 200 && metrics.contains("proxytune_train_steps_total"), "{metrics}");
    for id in &ids {
        let series = format!("proxytune_eval_score{{model=\"student\",metric=\"dino\",job_id=\"{id}\"}}");
        assert!(metrics.contains(&series), "every job's series carry its id: {series}");
    }
}

#[test]
fn a_non_loopback_bind_needs_a_token_and_every_request_carries_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let status = start(dir.path(), &format!("0.0.0.0:{port}"), None).wait().unwrap();
    assert!(!status.success());
    let err = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(err.contains("not loopback") && err.contains("token"), "{err}");

    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let _daemon = KillOnDrop(start(dir.path(), &format!("127.0.0.1:{port}"), Some("s3cret")));
    wait_up(addr, Some("s3cret"));
    let (status, body) = request(addr, "GET", "/jobs", "", None).unwrap();
    assert_eq!(status, 401, "{body}");
    let (status, _) = request(addr, "GET", "/jobs", "", Some("wrong")).unwrap();
    assert_eq!(status, 401);
    let (status, _) = request(addr, "GET", "/jobs", "", Some("s3cret")).unwrap();
    assert_eq!(status, 200);
}

/// The daemon is killed (SIGKILL) while the job tunes its supervisor, while it generates proxies
/// and while its student trains; each restart resumes the job from its checkpoints and corpus.
#[test]
fn a_job_killed_during_tuning_generation_and_training_resumes_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let bind = format!("127.0.0.1:{port}");
    let (planned, steps, every) = (64u64, 150u64, 10u64); // 16 prompts × 4 proxies
    let spec = format!(
        r#"{{"subject": "dog_2", "class_priors": 8, "supervisor_steps": 60, "checkpoint_every": {every},
            "proxies_per_prompt": 4, "student_steps": {steps}, "student_min_rows": 8,
            "eval_images": 1, "eval_prompts": 2}}"#
    );
    let n = |p: &serde_json::Value, k: &str| p[k].as_u64().unwrap_or(0);
    type Point = (&'static str, Box<dyn Fn(&serde_json::Value) -> bool>);
    let points: [Point; 3] = [
        (
            "tuning",
            Box::new(move |p| p["supervisor_ready"] == false && n(p, "supervisor_steps") >= 2 * every),
        ),
        (
            "generation",
            Box::new(move |p| {
                p["supervisor_ready"] == true && (16..planned - 8).contains(&n(p, "proxies_stored"))
            }),
        ),
        (
            "training",
            Box::new(move |p| {
                n(p, "proxies_stored") == planned
                    && (2 * every..steps - every).contains(&n(p, "student_steps"))
            }),
        ),
    ];
    let job_dir = dir.path().join("data/jobs/job-1");
    let mut killed_at_student_step = 0;
    for (i, (stage, reached)) in points.iter().enumerate() {
        let mut daemon = start(dir.path(), &bind, None);
        wait_up(addr, None);
        if i == 0 {
            let (status, body) = request(addr, "POST", "/jobs", &spec, None).unwrap();
            assert_eq!(status, 201, "{body}");
        }
        let started = Instant::now();
        let progress = loop {
            let p = job_status(addr, "job-1")["progress"].clone();
            if reached(&p) {
                break p;
            }
            assert!(started.elapsed() < Duration::from_secs(300), "never reached {stage}: {p}");
            std::thread::sleep(Duration::from_millis(50));
        };
        daemon.kill().unwrap(); // SIGKILL
        daemon.wait().unwrap();
        eprintln!("killed during {stage}: {progress}");
        match *stage {
            "tuning" => assert!(
                job_dir.join("supervisor/checkpoints").read_dir().unwrap().next().is_some(),
                "a supervisor checkpoint exists"
            ),
            "training" => killed_at_student_step = n(&progress, "student_steps"),
            _ => {}
        }
    }
    let _daemon = KillOnDrop(start(dir.path(), &bind, None));
    wait_up(addr, None);
    let j = wait_state(addr, "job-1", &["succeeded", "failed", "cancelled"]);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["attempts"], 4, "started once and restarted three times: {j}");
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(log.contains("supervisor tuning resumes"), "the tuner resumed from its checkpoint");
    assert!(log.contains("student training resumes"), "the trainer resumed from its checkpoint");

    // Exactly one row per planned proxy key.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let proxies: Vec<proxytune_schemas::Proxy> = rt.block_on(async {
        let corpus = proxytune_actors::corpus::Corpus::open(job_dir.join("corpus")).unwrap();
        corpus.table::<proxytune_schemas::Proxy>().await.unwrap().read_rows(None).await.unwrap()
    });
    let seeds: std::collections::BTreeSet<u64> = proxies.iter().map(|p| p.seed).collect();
    assert_eq!(proxies.len() as u64, planned, "no proxy row lost or duplicated");
    assert_eq!(seeds, (1_000_000..1_000_000 + planned).collect(), "the plan's seeds, each once");
    assert!(proxies.iter().all(|p| p.keep.is_some()), "every stored proxy was judged");

    // The student continued from its step: the last run took only the steps after its checkpoint.
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(job_dir.join("student/run.json")).unwrap()).unwrap();
    assert_eq!(run["steps"], steps);
    let this_run = run["losses_this_run"].as_array().unwrap().len() as u64;
    let resumed_at = steps - this_run;
    assert!(
        resumed_at >= killed_at_student_step / every * every && resumed_at >= every,
        "killed at step {killed_at_student_step}, resumed at {resumed_at}"
    );
    assert_eq!(
        run["data"]["row_keys"].as_array().unwrap().len(),
        proxies.iter().filter(|p| p.keep == Some(true)).count(),
        "the student received every kept proxy once"
    );
    // The final checkpoint loads: the report evaluated the student from it.
    assert!(job_dir.join(format!("student/checkpoints/checkpoint-{steps:08}/state.json")).is_file());
    let (status, body) = request(addr, "GET", "/jobs/job-1/report", "", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let student = &report["evaluation"]["models"][2];
    assert!(student["scores"]["metrics"]["DINO"].as_f64().is_some_and(f64::is_finite), "{student}");
}
