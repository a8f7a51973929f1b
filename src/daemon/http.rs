//! The daemon's HTTP/1.1 server (hyper) and its routes. Every answer is JSON except `/` (HTML),
//! `/metrics` (Prometheus text) and a job's files (PNG, HTML, JSON); errors are
//! `{"error": "..."}` with a 4xx/5xx status.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::jobs::{JobSpec, JobState};
use super::{EvaluateRefusal, Shared};
use crate::job::pipeline::JobCommand;
use crate::report::escape;

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        // A browser must not sniff, frame or run anything it gets here but the status page's own
        // inline style and the job's images.
        .header("x-content-type-options", "nosniff")
        .header("x-frame-options", "DENY")
        .header("content-security-policy", "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'")
        .header("referrer-policy", "no-referrer")
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("a valid response")
}

fn json(status: StatusCode, value: serde_json::Value) -> Reply {
    reply(status, "application/json", serde_json::to_vec_pretty(&value).expect("JSON serialises"))
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    json(status, serde_json::json!({ "error": message.to_string() }))
}

/// Accepts connections until the process stops: at most `max_connections` at once (one more is
/// answered 503 and closed), a request's headers within `request_timeout_seconds`; an accept
/// error (out of file descriptors, say) is logged and the server goes on.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> anyhow::Result<i32> {
    let permits = Arc::new(tokio::sync::Semaphore::new(shared.config.max_connections));
    let timeout = std::time::Duration::from_secs(shared.config.request_timeout_seconds);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a connection; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream, shared.config.max_connections));
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(shared, peer.ip(), req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(io, service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(permit);
        });
    }
}

/// Answers a connection over the cap with 503 and closes it.
async fn refuse_busy(mut stream: tokio::net::TcpStream, cap: usize) {
    use tokio::io::AsyncWriteExt;
    let body =
        format!("{{\"error\": \"the daemon serves {cap} connections at once (max_connections); retry\"}}");
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Takes one request from `peer`'s budget: a token bucket refilled at `max_requests_per_second`,
/// holding at most twice that. `Err(seconds)`: empty, retry after that many whole seconds.
fn rate_allows(shared: &Shared, peer: std::net::IpAddr) -> Result<(), u64> {
    let rate = shared.config.max_requests_per_second;
    let now = std::time::Instant::now();
    let mut rates = shared.rates.lock().expect("rates lock");
    if rates.len() > 10_000 {
        // Forget addresses whose bucket has refilled: they are back to a full budget anyway.
        rates.retain(|_, (_, at)| now.duration_since(*at).as_secs_f64() * rate < 2.0 * rate);
    }
    let (tokens, at) = rates.entry(peer).or_insert((2.0 * rate, now));
    *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(2.0 * rate);
    *at = now;
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        Ok(())
    } else {
        Err(((1.0 - *tokens) / rate).ceil().max(1.0) as u64)
    }
}

/// Equal strings, compared in time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorised(shared: &Shared, req: &Request<Incoming>) -> bool {
    let Some(token) = &shared.config.token else { return true };
    let given = req.headers().get("authorization").and_then(|v| v.to_str().ok());
    given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|t| same_secret(t, token))
}

/// Whether `host` (a `Host` header, or an origin's host and port) names this daemon: its bind
/// address, `localhost` or a loopback address on its port, any IP literal on its port when it
/// binds every interface, or one of `allowed_hosts`.
fn known_host(shared: &Shared, host: &str) -> bool {
    let port = shared.addr.port();
    let (name, given_port) = match host.rsplit_once(':') {
        Some((name, p)) if !name.ends_with(':') && p.chars().all(|c| c.is_ascii_digit()) => {
            (name, p.parse().ok())
        }
        _ => (host, None),
    };
    let name = name.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let allowed = shared.config.allowed_hosts.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        a == host.to_ascii_lowercase() || (a == name && given_port.is_none_or(|p| p == port))
    });
    if allowed {
        return true;
    }
    if given_port != Some(port) && !(given_port.is_none() && port == 80) {
        return false;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip == shared.addr.ip() || ip.is_loopback() || shared.addr.ip().is_unspecified(),
        Err(_) => name == "localhost",
    }
}

/// The checks every request passes before its route: the `Host` it names is this daemon's (DNS
/// rebinding), and a state-changing request is JSON from no other origin (a web page can send
/// neither `Content-Type: application/json` nor a foreign `Origin` without the browser asking
/// first, and the daemon never says yes).
fn guard(shared: &Shared, req: &Request<Incoming>) -> Option<Reply> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let host = header("host").or_else(|| req.uri().authority().map(|a| a.as_str()));
    match host {
        None => return Some(error(StatusCode::BAD_REQUEST, "a request must name its Host")),
        Some(host) if !known_host(shared, host) => {
            return Some(error(
                StatusCode::FORBIDDEN,
                format!(
                    "Host `{host}` is not this daemon's ({}, localhost or `allowed_hosts` in its config)",
                    shared.addr
                ),
            ))
        }
        Some(_) => {}
    }
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    if let Some(origin) = header("origin") {
        let host = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
        if !host.is_some_and(|h| known_host(shared, h)) {
            return Some(error(
                StatusCode::FORBIDDEN,
                format!("requests from origin `{origin}` are refused"),
            ));
        }
    }
    if let Some(site) = header("sec-fetch-site").filter(|s| !matches!(*s, "same-origin" | "none")) {
        return Some(error(StatusCode::FORBIDDEN, format!("a {site} request is refused (Sec-Fetch-Site)")));
    }
    let json_body = header("content-type").is_some_and(|c| {
        c.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json_body {
        return Some(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a state-changing request must be sent as `Content-Type: application/json`",
        ));
    }
    None
}

async fn handle(shared: Arc<Shared>, peer: std::net::IpAddr, req: Request<Incoming>) -> Reply {
    if let Err(wait) = rate_allows(&shared, peer) {
        let mut refused = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "more than {} requests a second from {peer} (max_requests_per_second); retry in {wait} s",
                shared.config.max_requests_per_second
            ),
        );
        refused.headers_mut().insert("retry-after", hyper::header::HeaderValue::from(wait));
        return refused;
    }
    if let Some(refused) = guard(&shared, &req) {
        return refused;
    }
    if !authorised(&shared, &req) {
        return error(StatusCode::UNAUTHORIZED, "a bearer token is required (Authorization: Bearer <token>)");
    }
    let path: Vec<String> = req.uri().path().split('/').filter(|s| !s.is_empty()).map(String::from).collect();
    let segments: Vec<&str> = path.iter().map(String::as_str).collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, []) => reply(StatusCode::OK, "text/html; charset=utf-8", status_page(&shared)),
        (Method::GET, ["metrics"]) => {
            reply(StatusCode::OK, "text/plain; version=0.0.4", shared.metrics.render())
        }
        (Method::GET, ["jobs"]) => {
            let records: Vec<super::jobs::Job> = shared.store().list().into_iter().cloned().collect();
            let jobs: Vec<serde_json::Value> = records.iter().map(|j| job_view(&shared, j)).collect();
            json(StatusCode::OK, serde_json::json!({ "jobs": jobs }))
        }
        (Method::POST, ["jobs"]) => submit(&shared, req).await,
        (Method::GET, ["jobs", id]) => match job_record(&shared, id) {
            Some(job) => {
                let report = shared.store().dir(id).join(job.spec.report_path());
                let summary = std::fs::read_to_string(report)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .map(|r| serde_json::json!({ "stages": r["stages"], "corpus": r["corpus"], "evaluation": r["evaluation"] }));
                let progress = shared.progress(id);
                let latest = shared.latest_evaluation(id);
                json(
                    StatusCode::OK,
                    serde_json::json!({ "job": job_view(&shared, &job), "progress": progress, "report": summary, "latest_evaluation": latest }),
                )
            }
            None => error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
        },
        (Method::POST, ["jobs", id, verb]) if JobCommand::from_verb(verb).is_some() => {
            let command = JobCommand::from_verb(verb).expect("checked by the guard");
            let applied = serde_json::json!({ "job": id, "command": verb });
            outcome(id, shared.command(id, command), StatusCode::ACCEPTED, applied)
        }
        (Method::DELETE, ["jobs", id]) => {
            // Deleting removes a job's files: off the async workers.
            let (owner, owned_id) = (shared.clone(), id.to_string());
            let deleted = tokio::task::spawn_blocking(move || owner.delete(&owned_id))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("the deletion's thread panicked: {e}")));
            outcome(id, deleted, StatusCode::OK, serde_json::json!({ "job": id, "deleted": true }))
        }
        (Method::POST, ["jobs", id, "evaluate"]) => match shared.evaluate_now(id) {
            Ok(n) => json(
                StatusCode::ACCEPTED,
                serde_json::json!({ "job": id, "evaluation": n, "result": format!("/jobs/{id}/files/evaluations/{n:03}/evaluation.json") }),
            ),
            Err(EvaluateRefusal::NoJob) => error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
            Err(EvaluateRefusal::NotNow(why)) => error(StatusCode::CONFLICT, why),
        },
        (Method::GET, ["jobs", id, "files", rest @ ..]) => file(&shared, id, rest),
        (Method::GET, ["jobs", id, "report"]) => {
            let Some(job) = shared.store().get(id).cloned() else {
                return error(StatusCode::NOT_FOUND, format!("no job `{id}`"));
            };
            if job.state != JobState::Succeeded {
                return error(
                    StatusCode::CONFLICT,
                    format!("job `{id}` is {:?}; its report comes when it succeeds", job.state),
                );
            }
            let path = shared.store().dir(id).join(job.spec.report_path());
            match std::fs::read(path) {
                Ok(bytes) => reply(StatusCode::OK, "application/json", bytes),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("report of `{id}`: {e}")),
            }
        }
        (method, route) => match allowed_methods(route) {
            Some(allow) => {
                let mut refused =
                    error(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not served here; {allow} is"));
                refused.headers_mut().insert("allow", hyper::header::HeaderValue::from_static(allow));
                refused
            }
            None => error(StatusCode::NOT_FOUND, format!("no route {}", req.uri().path())),
        },
    }
}

/// The answer to a command on job `id`: `status` with `applied`, 409 with why it does not apply
/// now, 404, or 500 when the daemon failed.
fn outcome(
    id: &str,
    result: anyhow::Result<super::CommandOutcome>,
    status: StatusCode,
    applied: serde_json::Value,
) -> Reply {
    match result {
        Ok(super::CommandOutcome::Applied) => json(status, applied),
        Ok(super::CommandOutcome::Refused(why)) => error(StatusCode::CONFLICT, why),
        Ok(super::CommandOutcome::NoJob) => error(StatusCode::NOT_FOUND, format!("no job `{id}`")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// The methods a route serves (for a 405's `Allow`), or `None` for no route.
fn allowed_methods(route: &[&str]) -> Option<&'static str> {
    match route {
        [] | ["metrics"] | ["jobs", _, "report"] | ["jobs", _, "files", _, ..] => Some("GET"),
        ["jobs", _] => Some("GET, DELETE"),
        ["jobs"] => Some("GET, POST"),
        ["jobs", _, verb] if *verb == "evaluate" || JobCommand::from_verb(verb).is_some() => Some("POST"),
        _ => None,
    }
}

/// A copy of job `id`'s record (the store's lock is released at once).
fn job_record(shared: &Shared, id: &str) -> Option<super::jobs::Job> {
    let store = shared.store();
    store.get(id).cloned()
}

/// The state a client sees: a paused job reads `pausing` until its pipeline has parked (the batch
/// in flight has finished and nothing more is generated until it resumes).
fn reported_state(shared: &Shared, job: &super::jobs::Job) -> &'static str {
    match job.state {
        JobState::Paused if shared.progress(&job.id).is_some_and(|p| !p.parked) => "pausing",
        state => state.as_str(),
    }
}

/// A job's record as the API shows it, with its [`reported_state`].
fn job_view(shared: &Shared, job: &super::jobs::Job) -> serde_json::Value {
    let mut view = serde_json::to_value(job).expect("job serialises");
    view["state"] = reported_state(shared, job).into();
    view
}

async fn submit(shared: &Arc<Shared>, req: Request<Incoming>) -> Reply {
    let limit = shared.config.max_body_bytes;
    let seconds = shared.config.request_timeout_seconds;
    let read = Limited::new(req.into_body(), limit).collect();
    let body = match tokio::time::timeout(std::time::Duration::from_secs(seconds), read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => return error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body exceeds {limit} bytes")),
        Err(_) => {
            return error(StatusCode::REQUEST_TIMEOUT, format!("the body did not arrive within {seconds} s"))
        }
    };
    let spec = match JobSpec::parse(&body) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a job spec: {e:#}")),
    };
    match shared.submit(spec).await {
        Ok(job) => json(StatusCode::CREATED, serde_json::to_value(job).expect("job serialises")),
        // The daemon's own failure to store it, not the request's fault.
        Err(e) if e.downcast_ref::<super::Busy>().is_some() => {
            error(StatusCode::TOO_MANY_REQUESTS, format!("{e:#}"))
        }
        Err(e) if e.downcast_ref::<super::jobs::StorageFailure>().is_some() => {
            tracing::error!(error = %format!("{e:#}"), "a submission could not be stored");
            error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
        }
        Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    }
}

/// A file of job `id` (report pages, grids, JSON), by a relative path of plain names.
fn file(shared: &Shared, id: &str, rest: &[&str]) -> Reply {
    if job_record(shared, id).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no job `{id}`"));
    }
    let plain = |s: &&str| {
        !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    if rest.is_empty() || !rest.iter().all(plain) {
        return error(StatusCode::BAD_REQUEST, "a file path is plain names: letters, digits, `_`, `-`, `.`");
    }
    let path = rest.join("/");
    let content_type = match path.rsplit('.').next() {
        Some("png") => "image/png",
        Some("html") => "text/html; charset=utf-8",
        Some("json") => "application/json",
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("`{path}`: only .png, .html and .json files are served"),
            )
        }
    };
    let file = shared.store().dir(id).join(&path);
    match std::fs::read(file) {
        Ok(bytes) => reply(StatusCode::OK, content_type, bytes),
        Err(_) => error(StatusCode::NOT_FOUND, format!("job `{id}` has no file `{path}`")),
    }
}

fn status_page(shared: &Shared) -> String {
    let jobs: Vec<super::jobs::Job> = shared.store().list().into_iter().cloned().collect();
    let rows: String = jobs
        .iter()
        .map(|j| {
            let dir = shared.store().dir(&j.id);
            let progress = shared.progress(&j.id);
            let stage = progress.as_ref().map(|p| p.stage.clone()).unwrap_or_default();
            let counts = progress
                .map(|p| {
                    format!(
                        "supervisor {}/{}, proxies {}/{}, student {}/{}",
                        p.supervisor_steps,
                        p.supervisor_steps_planned,
                        p.proxies_stored,
                        p.proxies_planned,
                        p.student_steps,
                        p.student_steps_planned
                    )
                })
                .unwrap_or_default();
            // The latest samples: the newest evaluation's, else the report's student samples.
            let samples = super::evaluation_numbers(&dir.join("evaluations"))
                .iter()
                .rev()
                .map(|n| format!("evaluations/{n:03}/samples.png"))
                .chain(["report/samples_2.png".to_string()])
                .find(|f| dir.join(f).is_file());
            let samples = samples
                .map(|f| format!("<img src=\"/jobs/{id}/files/{f}\" height=\"48\">", id = j.id))
                .unwrap_or_default();
            let report = if dir.join("report/index.html").is_file() {
                format!(" <a href=\"/jobs/{}/files/report/index.html\">report</a>", j.id)
            } else {
                String::new()
            };
            format!(
                "<tr><td><a href=\"/jobs/{id}\">{id}</a>{report}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{samples}</td><td>{}</td></tr>\n",
                escape(&j.spec.label()),
                reported_state(shared, j),
                escape(&stage),
                counts,
                escape(j.error.as_deref().unwrap_or("")),
                id = j.id
            )
        })
        .collect();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\"><title>proxytune daemon</title>\
         <style>body{{font-family:sans-serif}}td,th{{padding:2px 8px}}img{{image-rendering:pixelated}}</style></head><body>\
         <h1>proxytune daemon</h1><table border=\"1\"><tr><th>job</th><th>subject</th><th>state</th><th>stage</th><th>progress</th><th>latest samples</th><th>error</th></tr>\n{rows}</table>\
         <p><a href=\"/metrics\">/metrics</a> · <a href=\"/jobs\">/jobs</a></p></body></html>"
    )
}
