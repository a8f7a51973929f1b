//! `proxytune bench soak`: the daemon as a service under faults and load, through its binary on
//! loopback, in three runs of the same world jobs (each daemon on a fresh data folder):
//!
//! 1. **reference**: the jobs queued and run without interference; their wall time, and each
//!    job's Filter decisions and adapter bytes;
//! 2. **load**: the same jobs while `--clients` threads poll `GET /jobs/{id}` and `GET /metrics`
//!    (each every `--poll-interval-ms`) for `--poll-seconds`: request latency p50 / p99 / max, errors
//!    (anything but a 200, or no answer), and the jobs' wall time against the reference's;
//! 3. **faults**: the same jobs while the daemon is killed (`SIGKILL`) at `--kills` moments drawn
//!    at random over the first 85 % of the reference's wall time (counted in the jobs' own running
//!    time, restarts excluded), restarted each time; the stage each kill hit, and
//!    whether every job then ended with the reference's decisions and byte-identical adapters, and
//!    exactly its planned proxies.
//!
//! Prints a summary and writes the whole report as JSON (`--out`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde_json::{json, Value};

/// Arguments of `proxytune bench soak`.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// World jobs queued in each run (subjects in the world's order).
    #[arg(long, default_value_t = 5)]
    jobs: usize,
    /// SIGKILLs in the faults run.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Polling clients in the load run.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// How long the clients poll.
    #[arg(long, default_value_t = 60)]
    poll_seconds: u64,
    /// Each client's pause between requests.
    #[arg(long, default_value_t = 100)]
    poll_interval_ms: u64,
    /// Seed of the kill moments.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The world's pretrained models.
    #[arg(long, default_value = "models/world")]
    world: PathBuf,
    /// Scratch folder (a temporary one, removed after, when absent).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The JSON report.
    #[arg(long, default_value = "bench-soak.json")]
    out: PathBuf,
}

const SUBJECTS: [&str; 8] =
    ["teapot_0", "backpack_1", "dog_2", "cat_3", "vase_4", "sneaker_5", "clock_6", "robot_toy_7"];

/// A small world job: every stage runs, with checkpoints, in seconds on a CPU.
fn job_spec(subject: &str) -> String {
    format!(
        r#"{{"subject": "{subject}", "class_priors": 4, "supervisor_steps": 30, "checkpoint_every": 5,
            "proxies_per_prompt": 1, "student_steps": 20, "student_min_rows": 4, "eval_images": 1, "eval_prompts": 2}}"#
    )
}

/// One HTTP/1.0 request on loopback: (status, body); an I/O error or a timeout is an `Err`.
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(response.len());
    let status = String::from_utf8_lossy(&response[..split])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, response.get(split + 4..).unwrap_or_default().to_vec()))
}

fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let (status, body) = request(addr, "GET", path, "")?;
    ensure!(status == 200, "GET {path}: {status} {}", String::from_utf8_lossy(&body));
    Ok(serde_json::from_slice(&body)?)
}

/// A daemon of this binary on a free loopback port, its log appended to `dir/daemon.log`.
struct Daemon {
    child: Child,
    addr: SocketAddr,
}

impl Daemon {
    fn start(dir: &Path, world: &Path) -> anyhow::Result<Self> {
        let config = dir.join("daemon.toml");
        std::fs::write(
            &config,
            format!(
                "bind = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nworld = \"{}\"\ndevice = \"cpu\"\nmax_requests_per_second = 100000\n",
                dir.join("data").display(),
                world.display()
            ),
        )?;
        let log_path = dir.join("daemon.log");
        let before = std::fs::metadata(&log_path).map(|m| m.len() as usize).unwrap_or(0);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["daemon", "--config"])
            .arg(&config)
            .env_remove("PROXYTUNE_TOKEN")
            .env("RUST_LOG", "info,lance=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let started = Instant::now();
        loop {
            let text = std::fs::read(&log_path).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(before..).unwrap_or_default()).into_owned();
            if let Some(rest) = text.split("listening on http://").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").parse()?;
                return Ok(Daemon { child, addr });
            }
            if let Some(status) = child.try_wait()? {
                bail!("the daemon exited ({status}) before listening; see {}", log_path.display());
            }
            ensure!(started.elapsed() < Duration::from_secs(120), "the daemon never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

/// Every job's state, by id.
fn states(addr: SocketAddr, ids: &[String]) -> anyhow::Result<Vec<String>> {
    ids.iter()
        .map(|id| {
            Ok(get_json(addr, &format!("/jobs/{id}"))?["job"]["state"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

fn ended(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

/// Queues the jobs on a fresh daemon in `dir`; returns it and their ids.
fn submit(dir: &Path, args: &SoakArgs) -> anyhow::Result<(Daemon, Vec<String>)> {
    std::fs::create_dir_all(dir)?;
    let daemon = Daemon::start(dir, &args.world)?;
    let mut ids = Vec::new();
    for subject in SUBJECTS.iter().cycle().take(args.jobs) {
        let (status, body) = request(daemon.addr, "POST", "/jobs", &job_spec(subject))?;
        ensure!(status == 201, "submitting {subject}: {status} {}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body)?;
        ids.push(v["id"].as_str().context("a job id")?.to_string());
    }
    Ok((daemon, ids))
}

/// Waits until every job has ended; errors when one did not succeed.
fn wait_all(addr: SocketAddr, ids: &[String], limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let s = states(addr, ids)?;
        if s.iter().all(|s| ended(s)) {
            ensure!(s.iter().all(|s| s == "succeeded"), "jobs ended {s:?}");
            return Ok(());
        }
        ensure!(started.elapsed() < limit, "jobs still running after {limit:?}: {s:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a job produced that must not depend on interruptions: the Filter's decisions by seed,
/// the proxies stored, and its adapters' bytes.
#[derive(Debug, PartialEq)]
struct Outcome {
    decisions: Vec<(u64, Option<bool>)>,
    adapters: Vec<Vec<u8>>,
}

fn outcome(dir: &Path, id: &str) -> anyhow::Result<Outcome> {
    let job = dir.join("data/jobs").join(id);
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let mut decisions: Vec<(u64, Option<bool>)> = rt.block_on(async {
        let corpus = proxytune_actors::corpus::Corpus::open(job.join("corpus"))?;
        let rows = corpus.table::<proxytune_schemas::Proxy>().await?.read_rows_light(None).await?;
        anyhow::Ok(rows.iter().map(|p| (p.seed, p.keep)).collect())
    })?;
    decisions.sort();
    let adapters = ["student/adapter_model.safetensors", "supervisor/pytorch_lora_weights.safetensors"]
        .iter()
        .map(|a| std::fs::read(job.join(a)).with_context(|| format!("{id}: {a}")))
        .collect::<anyhow::Result<_>>()?;
    Ok(Outcome { decisions, adapters })
}

/// A quantile of sorted samples.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Runs `proxytune bench soak`.
pub fn run(args: SoakArgs) -> anyhow::Result<()> {
    ensure!(args.jobs >= 1 && args.jobs <= SUBJECTS.len(), "--jobs: 1 to {}", SUBJECTS.len());
    ensure!(
        args.world.join("supervisor").is_dir(),
        "--world {}: not the world's models",
        args.world.display()
    );
    let temporary = std::env::temp_dir().join(format!("proxytune-bench-soak-{}", std::process::id()));
    let root = args.dir.clone().unwrap_or_else(|| temporary.clone());
    let result = soak(&args, &root);
    std::fs::remove_dir_all(&temporary).ok();
    let report = result?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("report: {}", args.out.display());
    Ok(())
}

fn soak(args: &SoakArgs, root: &Path) -> anyhow::Result<Value> {
    let limit = Duration::from_secs(3600);
    // 1. Reference.
    let dir = root.join("reference");
    let started = Instant::now();
    let (daemon, ids) = submit(&dir, args)?;
    wait_all(daemon.addr, &ids, limit)?;
    let reference_s = started.elapsed().as_secs_f64();
    daemon.kill()?;
    let reference: Vec<Outcome> = ids.iter().map(|id| outcome(&dir, id)).collect::<anyhow::Result<_>>()?;
    println!("reference: {} jobs in {reference_s:.1} s", ids.len());

    // 2. Load: clients poll while the same jobs run.
    let dir = root.join("load");
    let started = Instant::now();
    let (daemon, load_ids) = submit(&dir, args)?;
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..args.clients)
        .map(|c| {
            let (stop, latencies, errors) = (stop.clone(), latencies.clone(), errors.clone());
            let (addr, ids, pause) =
                (daemon.addr, load_ids.clone(), Duration::from_millis(args.poll_interval_ms));
            std::thread::spawn(move || {
                let mut k = c;
                while !stop.load(Ordering::Relaxed) {
                    let path = if k % 2 == 0 {
                        format!("/jobs/{}", ids[k / 2 % ids.len()])
                    } else {
                        "/metrics".into()
                    };
                    let t = Instant::now();
                    match request(addr, "GET", &path, "") {
                        Ok((200, _)) => latencies.lock().expect("latencies").push(t.elapsed().as_secs_f64()),
                        Ok((status, body)) => errors.lock().expect("errors").push(format!(
                            "GET {path}: {status} {}",
                            String::from_utf8_lossy(&body).chars().take(120).collect::<String>()
                        )),
                        Err(e) => errors.lock().expect("errors").push(format!("GET {path}: {e}")),
                    }
                    k += 1;
                    std::thread::sleep(pause);
                }
            })
        })
        .collect();
    let poll_until = Instant::now() + Duration::from_secs(args.poll_seconds);
    while Instant::now() < poll_until {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    wait_all(daemon.addr, &load_ids, limit)?;
    let load_s = started.elapsed().as_secs_f64();
    daemon.kill()?;
    let load_outcomes: Vec<Outcome> =
        load_ids.iter().map(|id| outcome(&dir, id)).collect::<anyhow::Result<_>>()?;
    let mut lat = std::mem::take(&mut *latencies.lock().expect("latencies"));
    lat.sort_by(f64::total_cmp);
    let errors = std::mem::take(&mut *errors.lock().expect("errors"));
    let ms = |s: f64| s * 1000.0;
    println!(
        "load: {} clients for {} s: {} requests, {} errors, latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; jobs {load_s:.1} s against {reference_s:.1} s alone ({:.2}x)",
        args.clients,
        args.poll_seconds,
        lat.len() + errors.len(),
        errors.len(),
        ms(quantile(&lat, 0.5)),
        ms(quantile(&lat, 0.99)),
        ms(quantile(&lat, 1.0)),
        load_s / reference_s
    );

    // 3. Faults: kills at moments drawn over the reference's wall time.
    let dir = root.join("faults");
    let mut draws = proxytune_models::rng::Draws::new(args.seed, proxytune_models::rng::Stream::Shuffle, 0);
    // Over the first 85 % of the reference's time, so the last kill still finds work running.
    let mut moments: Vec<f64> = (0..args.kills).map(|_| draws.unit() * 0.85 * reference_s).collect();
    moments.sort_by(f64::total_cmp);
    let started = Instant::now();
    let (mut daemon, fault_ids) = submit(&dir, args)?;
    let mut hits = Vec::new();
    for (i, at) in moments.iter().enumerate() {
        // Each kill at its moment of the jobs' own running time (restarts excluded).
        let run_started = Instant::now();
        let wait = (at - moments.get(i.wrapping_sub(1)).copied().unwrap_or(0.0)).max(0.5);
        let mut done = false;
        while run_started.elapsed().as_secs_f64() < wait {
            if states(daemon.addr, &fault_ids)?.iter().all(|s| ended(s)) {
                done = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if done {
            break;
        }
        let stage = fault_ids
            .iter()
            .find_map(|id| {
                let j = get_json(daemon.addr, &format!("/jobs/{id}")).ok()?;
                (j["job"]["state"] == "running")
                    .then(|| format!("{} {}", id, j["progress"]["stage"].as_str().unwrap_or("?")))
            })
            .unwrap_or_else(|| "between jobs".into());
        daemon.kill()?;
        hits.push(stage);
        daemon = Daemon::start(&dir, &args.world)?;
    }
    wait_all(daemon.addr, &fault_ids, limit)?;
    let faults_s = started.elapsed().as_secs_f64();
    daemon.kill()?;
    let mut same = Vec::new();
    for (id, want) in fault_ids.iter().zip(&reference) {
        let got = outcome(&dir, id)?;
        same.push(json!({
            "job": id,
            "decisions_equal": got.decisions == want.decisions,
            "adapters_identical": got.adapters == want.adapters,
            "proxies": got.decisions.len(),
        }));
    }
    let all_same = same.iter().all(|s| s["decisions_equal"] == true && s["adapters_identical"] == true)
        && load_outcomes.iter().zip(&reference).all(|(a, b)| a == b);
    println!(
        "faults: {} kills ({}), then every job ended with the reference's decisions and byte-identical adapters: {all_same}; {faults_s:.1} s",
        hits.len(),
        hits.join(", ")
    );
    Ok(json!({
        "jobs": args.jobs,
        "reference_seconds": reference_s,
        "load": {
            "clients": args.clients, "poll_seconds": args.poll_seconds, "poll_interval_ms": args.poll_interval_ms,
            "requests": lat.len() + errors.len(), "errors": errors.len(), "error_samples": errors.iter().take(10).collect::<Vec<_>>(),
            "latency_ms": {"p50": ms(quantile(&lat, 0.5)), "p99": ms(quantile(&lat, 0.99)), "max": ms(quantile(&lat, 1.0))},
            "jobs_seconds": load_s, "against_reference": load_s / reference_s,
        },
        "faults": {"kills": hits.len(), "stages": hits, "seconds": faults_s, "jobs": same},
        "all_outcomes_identical": all_same,
    }))
}
