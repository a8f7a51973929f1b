//! The process's Prometheus exporter: the global recorder and an HTTP `/metrics` listener bound to
//! loopback (port 0 picks a free port; the address bound is logged and returned). Histograms are
//! exported with buckets so Grafana can use `histogram_quantile` (seconds for durations, cosine bins
//! for the Filter's scores).

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusHandle};
use proxytune_schemas::metrics::{DURATION_BUCKETS_SECONDS, SCORE_BUCKETS};
use proxytune_schemas::MetricName;

/// Installs the global recorder and serves `/metrics` on `127.0.0.1:port` inside the current tokio
/// runtime; returns the address bound.
pub async fn install(port: u16) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot serve /metrics on 127.0.0.1:{port}"))?;
    let addr = listener.local_addr().context("cannot read the /metrics address")?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&DURATION_BUCKETS_SECONDS)?
        .set_buckets_for_metric(Matcher::Full(MetricName::FilterScore.as_str().into()), &SCORE_BUCKETS)?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    tokio::spawn(serve(listener, handle));
    tracing::info!("Serving metrics on http://{addr}/metrics");
    Ok(addr)
}

/// Answers `GET /metrics` with the recorder's text exposition, anything else with 404.
async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "/metrics: cannot accept a connection");
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, body) = if req.method() == Method::GET && req.uri().path() == "/metrics" {
                    (StatusCode::OK, handle.render())
                } else {
                    (StatusCode::NOT_FOUND, "only GET /metrics is served here\n".to_string())
                };
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "text/plain; version=0.0.4")
                    .body(Full::new(Bytes::from(body)))
                    .expect("static response parts");
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(error = %e, "/metrics connection ended");
            }
        });
    }
}
