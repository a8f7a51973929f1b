//! The proxytune Grafana dashboards as code. `proxytune grafana render` writes them to
//! `grafana/dashboards/*.json` (committed, never edited by hand; a test checks the files equal
//! this source's output and runs every expression against a real Prometheus). The datasource is
//! the dashboard variable `${datasource}`, never a hard-coded UID. Metric names come from
//! `proxytune_schemas::MetricName`, the one place they are defined. Series of the daemon's jobs
//! carry a `job_id` label.

use proxytune_schemas::MetricName as M;
use serde_json::{json, Value};

/// One query of a panel: PromQL and its legend.
pub struct Query {
    /// The PromQL expression.
    pub expr: String,
    /// Legend template (`{{label}}`).
    pub legend: &'static str,
}

/// One panel.
pub struct Panel {
    /// Title.
    pub title: &'static str,
    /// Grafana unit (`short`, `s`, `ops`, `percentunit`, …).
    pub unit: &'static str,
    /// Its queries.
    pub queries: Vec<Query>,
}

/// A row of panels: one stage of the pipeline.
pub struct Row {
    /// Title.
    pub title: &'static str,
    /// Its panels.
    pub panels: Vec<Panel>,
}

fn q(expr: impl Into<String>, legend: &'static str) -> Query {
    Query { expr: expr.into(), legend }
}

fn panel(title: &'static str, unit: &'static str, queries: Vec<Query>) -> Panel {
    Panel { title, unit, queries }
}

/// `rate(<metric>[1m])` summed by `by`.
fn rate_by(m: M, selector: &str, by: &str) -> String {
    format!("sum by ({by}) (rate({}{selector}[1m]))", m.as_str())
}

/// The `quantile` of a histogram over 5 minutes, by `by`.
fn quantile(m: M, quantile: f64, selector: &str, by: &str) -> String {
    format!("histogram_quantile({quantile}, sum by (le, {by}) (rate({}_bucket{selector}[5m])))", m.as_str())
}

/// The rows of the pipeline dashboard, one per stage.
pub fn pipeline_rows() -> Vec<Row> {
    vec![
        Row {
            title: "Supervisor: DreamBooth and sampling",
            panels: vec![
                panel(
                    "Images generated per second",
                    "ops",
                    vec![q(rate_by(M::GeneratedImages, "", "kind"), "{{kind}}")],
                ),
                panel(
                    "Supervisor loss",
                    "short",
                    vec![q(format!("{}{{model=\"supervisor\"}}", M::TrainLoss.as_str()), "{{term}}")],
                ),
                panel(
                    "Supervisor learning rate",
                    "short",
                    vec![q(format!("{}{{model=\"supervisor\"}}", M::TrainLearningRate.as_str()), "lr")],
                ),
                panel(
                    "Supervisor step time (p50, p95)",
                    "s",
                    vec![
                        q(quantile(M::TrainStepDuration, 0.5, "{model=\"supervisor\"}", "model"), "p50"),
                        q(quantile(M::TrainStepDuration, 0.95, "{model=\"supervisor\"}", "model"), "p95"),
                    ],
                ),
            ],
        },
        Row {
            title: "Filter",
            panels: vec![
                panel(
                    "Accepted and rejected per second",
                    "ops",
                    vec![
                        q(format!("sum(rate({}[1m]))", M::FilterAcceptedRows.as_str()), "accepted"),
                        q(rate_by(M::FilterRejectedRows, "", "reason"), "rejected: {{reason}}"),
                    ],
                ),
                panel(
                    "Rejected so far, by reason",
                    "short",
                    vec![q(format!("sum by (reason) ({})", M::FilterRejectedRows.as_str()), "{{reason}}")],
                ),
                panel(
                    "Median score, by metric",
                    "short",
                    vec![q(quantile(M::FilterScore, 0.5, "", "metric"), "{{metric}}")],
                ),
            ],
        },
        Row {
            title: "Corpus (Lance)",
            panels: vec![
                panel(
                    "Rows written per second",
                    "ops",
                    vec![q(rate_by(M::CorpusWrittenRows, "", "table"), "{{table}}")],
                ),
                panel(
                    "Rows skipped (already stored) per second",
                    "ops",
                    vec![q(rate_by(M::CorpusSkippedRows, "", "table"), "{{table}}")],
                ),
                panel(
                    "Table version",
                    "short",
                    vec![q(format!("max by (table) ({})", M::CorpusVersion.as_str()), "{{table}}")],
                ),
                panel(
                    "Fragments",
                    "short",
                    vec![q(format!("max by (table) ({})", M::CorpusFragments.as_str()), "{{table}}")],
                ),
            ],
        },
        Row {
            title: "Student: AR training",
            panels: vec![
                panel(
                    "Student loss, by term",
                    "short",
                    vec![q(format!("{}{{model=\"student\"}}", M::TrainLoss.as_str()), "{{term}}")],
                ),
                panel(
                    "Student learning rate",
                    "short",
                    vec![q(format!("{}{{model=\"student\"}}", M::TrainLearningRate.as_str()), "lr")],
                ),
                panel(
                    "Optimiser steps per second",
                    "ops",
                    vec![q(rate_by(M::TrainSteps, "", "model"), "{{model}}")],
                ),
                panel(
                    "Student step time (p50, p95)",
                    "s",
                    vec![
                        q(quantile(M::TrainStepDuration, 0.5, "{model=\"student\"}", "model"), "p50"),
                        q(quantile(M::TrainStepDuration, 0.95, "{model=\"student\"}", "model"), "p95"),
                    ],
                ),
            ],
        },
        Row {
            title: "Actors and edges",
            panels: vec![
                panel(
                    "Rows received per second, by actor",
                    "ops",
                    vec![q(rate_by(M::ActorReceivedRows, "", "actor"), "{{actor}}")],
                ),
                panel(
                    "Batch time p95, by actor",
                    "s",
                    vec![q(quantile(M::ActorBatchDuration, 0.95, "", "actor"), "{{actor}}")],
                ),
                panel(
                    "Queue depth, by edge (fraction of capacity)",
                    "percentunit",
                    vec![q(
                        format!(
                            "max by (edge) ({}) / max by (edge) ({})",
                            M::ChannelQueuedRows.as_str(),
                            M::ChannelCapacityRows.as_str()
                        ),
                        "{{edge}}",
                    )],
                ),
                panel(
                    "Time blocked on a full edge, seconds per second",
                    "percentunit",
                    vec![q(
                        format!("sum by (edge) (rate({}_sum[1m]))", M::ChannelBlockedDuration.as_str()),
                        "{{edge}}",
                    )],
                ),
                panel(
                    "Errors and undelivered rows per second",
                    "ops",
                    vec![
                        q(format!("sum(rate({}[1m])) or vector(0)", M::ActorErrors.as_str()), "errors"),
                        q(
                            format!("sum(rate({}[1m])) or vector(0)", M::ChannelUndeliveredRows.as_str()),
                            "undelivered",
                        ),
                    ],
                ),
            ],
        },
        Row {
            title: "Evaluation (DreamBench protocol)",
            panels: vec![panel(
                "Latest scores, by job, model and metric",
                "short",
                vec![q(
                    format!("max by (job_id, model, metric) ({})", M::EvalScore.as_str()),
                    "{{job_id}} {{model}} {{metric}}",
                )],
            )],
        },
    ]
}

/// The Grafana dashboard JSON of `rows` (schema 39; panels on a 24-column grid, 4 per row).
pub fn render(uid: &str, title: &str, rows: &[Row]) -> Value {
    let mut panels = Vec::new();
    let mut id = 1;
    let mut y = 0;
    for row in rows {
        panels.push(json!({
            "type": "row", "id": id, "title": row.title, "collapsed": false,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []
        }));
        id += 1;
        y += 1;
        let width = 24 / row.panels.len().clamp(1, 4) as i64;
        for (i, p) in row.panels.iter().enumerate() {
            let targets: Vec<Value> = p
                .queries
                .iter()
                .enumerate()
                .map(|(k, qu)| {
                    json!({
                        "refId": ((b'A' + k as u8) as char).to_string(),
                        "datasource": {"type": "prometheus", "uid": "${datasource}"},
                        "expr": qu.expr, "legendFormat": qu.legend, "range": true
                    })
                })
                .collect();
            panels.push(json!({
                "type": "timeseries", "id": id, "title": p.title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": width, "x": (i as i64 % 4) * width, "y": y + (i as i64 / 4) * 8},
                "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": true}},
                "targets": targets
            }));
            id += 1;
        }
        y += 8 * row.panels.len().div_ceil(4) as i64;
    }
    json!({
        "uid": uid, "title": title, "schemaVersion": 39, "version": 1, "editable": true,
        "tags": ["proxytune"], "timezone": "utc", "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{
            "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "options": []
        }]},
        "annotations": {"list": []},
        "panels": panels
    })
}

/// Every dashboard: file name and JSON.
pub fn all() -> Vec<(&'static str, Value)> {
    vec![("proxytune-pipeline.json", render("proxytune-pipeline", "proxytune: pipeline", &pipeline_rows()))]
}
