//! The process's Prometheus exporter: the global recorder and an HTTP `/metrics` listener bound to
//! loopback. Histograms are exported with buckets so Grafana can use `histogram_quantile`
//! (seconds for durations, cosine bins for the Filter's scores).

use metrics_exporter_prometheus::Matcher;
use proxytune_schemas::metrics::{DURATION_BUCKETS_SECONDS, SCORE_BUCKETS};
use proxytune_schemas::MetricName;

/// Installs the global recorder and serves `/metrics` on `127.0.0.1:port` (inside the current
/// tokio runtime).
pub fn install(port: u16) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&DURATION_BUCKETS_SECONDS)?
        .set_buckets_for_metric(Matcher::Full(MetricName::FilterScore.as_str().into()), &SCORE_BUCKETS)?
        .with_http_listener(([127, 0, 0, 1], port))
        .install()
        .map_err(|e| anyhow::anyhow!("cannot serve /metrics on 127.0.0.1:{port}: {e}"))?;
    tracing::info!("Serving metrics on http://127.0.0.1:{port}/metrics");
    Ok(())
}
