//! Metrics: every actor and edge emits its metrics into a fresh registry; `/metrics` serves them
//! over HTTP; a real Prometheus scrapes them and answers a PromQL query.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusBuilder;
use proxytune_actors::corpus::writer::{LanceWriter, LanceWriterConfig};
use proxytune_actors::corpus::Corpus;
use proxytune_actors::runtime::synthetic::PassThrough;
use proxytune_actors::runtime::{JobOutcome, Metrics, Pipeline};
use proxytune_schemas::metrics::DURATION_BUCKETS_SECONDS;
use proxytune_schemas::{MetricName, Proxy};

use crate::runtime::{config, synthetic};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A plain HTTP/1.0 GET on loopback; returns the body.
pub fn http_get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!("{path_and_query}: {head}")));
    }
    Ok(body.to_string())
}

/// Value of the sample `name{labels}` in a Prometheus text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

async fn run_pipeline(metrics: Metrics, dir: &std::path::Path) -> u64 {
    let corpus = Corpus::open_or_create(dir).unwrap();
    let (source, produced) = synthetic(32, Some(20), 0);
    let (writer, _) = LanceWriter::<Proxy>::new(corpus, LanceWriterConfig::default(), &metrics);
    let mut p = Pipeline::new(config(128), metrics);
    let src = p.source("gen", source);
    let mid = p.operator("mid", PassThrough::default());
    let sink = p.async_operator("lance_writer", writer);
    p.connect(src, mid).connect(mid, sink);
    let report = p.start(&tokio::runtime::Handle::current()).unwrap().wait().await;
    assert_eq!(report.outcome, JobOutcome::Succeeded);
    produced.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_actor_and_edge_emits_its_metrics_into_a_fresh_registry() {
    let recorder = PrometheusBuilder::new().set_buckets(&DURATION_BUCKETS_SECONDS).unwrap().build_recorder();
    let handle = recorder.handle();
    let dir = tempfile::tempdir().unwrap();
    let rows = run_pipeline(Metrics::with_recorder(Arc::new(recorder)), dir.path()).await;
    assert_eq!(rows, 640);
    let text = handle.render();

    for actor in ["gen", "mid", "lance_writer"] {
        for name in [MetricName::ActorReceivedRows, MetricName::ActorSentRows, MetricName::ActorBatches] {
            let series = format!("{}{{actor=\"{actor}\"}}", name.as_str());
            assert!(sample(&text, &series).is_some(), "missing {series}\n{text}");
        }
        let hist = format!("{}_count{{actor=\"{actor}\"}}", MetricName::ActorBatchDuration.as_str());
        assert!(sample(&text, &hist).unwrap() > 0.0, "missing {hist}");
    }
    assert_eq!(sample(&text, "proxytune_actor_sent_rows_total{actor=\"gen\"}"), Some(640.0));
    assert_eq!(sample(&text, "proxytune_actor_received_rows_total{actor=\"mid\"}"), Some(640.0));
    assert_eq!(sample(&text, "proxytune_actor_received_rows_total{actor=\"lance_writer\"}"), Some(640.0));
    for edge in ["gen->mid", "mid->lance_writer"] {
        assert_eq!(
            sample(&text, &format!("proxytune_channel_capacity_rows{{edge=\"{edge}\"}}")),
            Some(128.0)
        );
        assert_eq!(sample(&text, &format!("proxytune_channel_queued_rows{{edge=\"{edge}\"}}")), Some(0.0));
    }
    assert_eq!(sample(&text, "proxytune_corpus_written_rows_total{table=\"proxies\"}"), Some(640.0));
    assert!(sample(&text, "proxytune_corpus_version{table=\"proxies\"}").unwrap() >= 1.0);
    assert!(text.contains("# HELP proxytune_actor_received_rows_total"), "help texts are registered");
    assert!(text.contains("proxytune_actor_batch_duration_seconds_bucket"), "durations are histograms");
}

pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real Prometheus (Debian's, installed by `tools/dev setup`) on a free loopback port, its data
/// under `dir`, scraping `127.0.0.1:<target_port>/metrics` every second; killed when the guard drops.
pub fn prometheus(dir: &std::path::Path, target_port: u16) -> (KillOnDrop, SocketAddr) {
    let prom_port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: proxytune\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        ),
    )
    .unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus is installed by tools/dev setup");
    (KillOnDrop(child), ([127, 0, 0, 1], prom_port).into())
}

/// Percent-encodes a query parameter.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs every expression of the committed Grafana dashboards against the Prometheus at `prom`
/// and asserts each returns data. It first waits until the evaluation gauge has been scraped;
/// `alive` says whether the scraped target still runs (a gone target's series go stale).
pub fn assert_dashboards_answer(prom: SocketAddr, alive: impl Fn() -> bool) {
    let query = |expr: &str| -> serde_json::Value {
        let body = http_get(prom, &format!("/api/v1/query?query={}", url_encode(expr)))
            .unwrap_or_else(|e| panic!("{expr}: {e}"));
        serde_json::from_str(&body).unwrap()
    };
    let started = Instant::now();
    while query("proxytune_eval_score")["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
        assert!(alive(), "the target ended before Prometheus saw its scores");
        assert!(started.elapsed() < Duration::from_secs(120), "the scores never reached Prometheus");
        std::thread::sleep(Duration::from_millis(250));
    }
    let path = crate::support::repo_root().join("grafana/dashboards/proxytune-pipeline.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 20, "{exprs:?}");
    for expr in &exprs {
        let answer = query(expr);
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        assert!(!answer["data"]["result"].as_array().unwrap().is_empty(), "`{expr}` returned no data");
    }
    eprintln!("all {} dashboard expressions returned data", exprs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_pipeline() {
    // Our /metrics endpoint, on loopback, with a recorder of this test's own.
    let port = free_port();
    let (recorder, exporter) = PrometheusBuilder::new()
        .set_buckets(&DURATION_BUCKETS_SECONDS)
        .unwrap()
        .with_http_listener(([127, 0, 0, 1], port))
        .build()
        .unwrap();
    tokio::spawn(exporter);
    let dir = tempfile::tempdir().unwrap();
    run_pipeline(Metrics::with_recorder(Arc::new(recorder)), &dir.path().join("corpus")).await;
    let ours: SocketAddr = ([127, 0, 0, 1], port).into();
    let text = tokio::task::spawn_blocking(move || http_get(ours, "/metrics")).await.unwrap().unwrap();
    assert_eq!(sample(&text, "proxytune_actor_received_rows_total{actor=\"lance_writer\"}"), Some(640.0));

    // A real Prometheus, loopback only, scraping every second.
    let (_guard, prom) = prometheus(dir.path(), port);
    let query = "/api/v1/query?query=proxytune_actor_received_rows_total%7Bactor%3D%22lance_writer%22%7D";
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        let body = tokio::task::spawn_blocking(move || http_get(prom, query)).await.unwrap();
        if let Ok(body) = body {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            if let Some(v) = json["data"]["result"][0]["value"][1].as_str() {
                break v.parse::<f64>().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "Prometheus never returned the row counter");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(value, 640.0);
}
