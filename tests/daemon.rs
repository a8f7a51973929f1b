//! `proxytune daemon` through the real binary: jobs submitted over HTTP run to completion and
//! give their reports, a running job is paused, resumed and cancelled, bad requests get the right status and a
//! message, a non-loopback bind needs a token and requests must carry it.

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
    Command::new(env!("CARGO_BIN_EXE_proxytune"))
        .args(["daemon", "--config"])
        .arg(&config)
        .env_remove("PROXYTUNE_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
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

fn job(addr: SocketAddr, id: &str) -> serde_json::Value {
    let (status, body) = request(addr, "GET", &format!("/jobs/{id}"), "", None).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["job"].clone()
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
    let out = start(dir.path(), &format!("0.0.0.0:{port}"), None).wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
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
