//! What the coordinator serves operators and users over HTTP, on the
//! address given with `CoordinatorConfig::http` only:
//!
//! - `/metrics`: Prometheus metrics (OpenMetrics text), for monitoring;
//! - `/`: the dashboard, a static page (embedded here, no build step) that
//!   reads `/api/state` once a second with the viewer's API key: the fleet
//!   (nodes, their load, memory, GPUs and isolation) and the viewer's jobs
//!   (live progress, per-node progress, failures), with a cancel button for
//!   each of them (`POST /api/jobs/ID/cancel`).
//!
//! The API answers only requests that carry an API key in their
//! `Authorization: Bearer` header (never a cookie, so another site cannot
//! make a browser act for its user), and names only the key's principal's
//! jobs; a job's calls' credential is not accepted.

use std::sync::Arc;

use fleetmap_net::http::{Handler, HttpRequest, HttpResponse};
use fleetmap_protocol::{JobId, JobState, JobStatus, NodeStatus};
use serde_json::{json, Value};

use super::Shared;
use crate::{
    metrics::{render, Enrolled},
    nodes::NodeRegistry,
};

/// The content type of the OpenMetrics text format the metrics are in.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const JSON: &str = "application/json";

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

pub(super) fn handler(shared: Arc<Shared>) -> Handler {
    Arc::new(move |request: HttpRequest| {
        let shared = shared.clone();
        Box::pin(async move { answer(&shared, request).await })
    })
}

async fn answer(shared: &Arc<Shared>, request: HttpRequest) -> HttpResponse {
    let method = request.method.as_str();
    match (method, request.path.as_str()) {
        ("GET", "/metrics") => {
            let snapshot = shared.with(|s| s.snapshot());
            // The registry is a file: read off the runtime's threads.
            let registry = shared.nodes.clone();
            let enrolled = tokio::task::spawn_blocking(move || enrolled(&registry))
                .await
                .unwrap_or_default();
            HttpResponse::new(200, OPENMETRICS, render(&snapshot, enrolled, &shared.metrics))
        }
        ("GET", "/") => HttpResponse::new(200, "text/html; charset=utf-8", INDEX),
        ("GET", "/dashboard.js") => HttpResponse::new(200, "text/javascript; charset=utf-8", SCRIPT),
        ("GET", "/dashboard.css") => HttpResponse::new(200, "text/css; charset=utf-8", STYLE),
        ("GET", "/api/state") => match principal(shared, &request).await {
            Ok(principal) => state(shared, &principal),
            Err(refused) => refused,
        },
        ("POST", path) if path.starts_with("/api/jobs/") && path.ends_with("/cancel") => {
            let principal = match principal(shared, &request).await {
                Ok(principal) => principal,
                Err(refused) => return refused,
            };
            let id = &path["/api/jobs/".len()..path.len() - "/cancel".len()];
            let Ok(job) = id.parse::<u64>() else {
                return HttpResponse::text(400, format!("{id:?} is not a job id"));
            };
            let by = format!("{principal} on the dashboard");
            if shared.with(|s| s.cancel_for(&principal, JobId(job), &by)) {
                HttpResponse::new(200, JSON, json!({ "cancelled": job }).to_string())
            } else {
                HttpResponse::text(404, format!("no running job {job} of {principal}"))
            }
        }
        (_, "/metrics" | "/" | "/api/state") => HttpResponse::text(405, format!("{} answers GET only", request.path)),
        _ => HttpResponse::text(
            404,
            "not found: this address serves /metrics, the dashboard at / and its API at /api/state",
        ),
    }
}

/// The principal of the API key in the request's `Authorization: Bearer`
/// header, or the answer for a request without a valid one.
async fn principal(shared: &Arc<Shared>, request: &HttpRequest) -> Result<String, HttpResponse> {
    let Some(key) = request
        .header("authorization")
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|key| key.trim().to_string())
        .filter(|key| !key.is_empty() && key.len() <= 256)
    else {
        return Err(HttpResponse::text(
            401,
            "give an API key in the Authorization header: Bearer fmkey_...",
        ));
    };
    // The key file is read again when it changed: off the runtime's threads.
    let keys = shared.keys.clone();
    let found = tokio::task::spawn_blocking(move || keys.authenticate(&key).0)
        .await
        .ok()
        .flatten();
    found
        .map(|p| p.name)
        .ok_or_else(|| HttpResponse::text(401, "this API key is unknown or revoked"))
}

/// The fleet and `principal`'s jobs, as the dashboard shows them.
fn state(shared: &Arc<Shared>, principal: &str) -> HttpResponse {
    let (nodes, jobs) = shared.with(|s| (s.node_statuses(), s.jobs_of(principal)));
    let body = json!({
        "principal": principal,
        "nodes": nodes.iter().map(node_json).collect::<Vec<_>>(),
        "jobs": jobs.iter().rev().map(job_json).collect::<Vec<_>>(),
    });
    HttpResponse::new(200, JSON, body.to_string())
}

fn node_json(n: &NodeStatus) -> Value {
    json!({
        "name": n.name,
        "cores": n.resources.cores,
        "free_cores": n.free_cores,
        "memory_bytes": n.resources.memory_bytes,
        "free_memory_bytes": n.free_memory_bytes,
        "gpus": n.resources.gpus.len(),
        "free_gpus": n.free_gpus,
        "isolation": n.isolation,
    })
}

fn job_json(j: &JobStatus) -> Value {
    let (state, detail) = match &j.state {
        JobState::Running => ("running", None),
        JobState::Finished => ("finished", None),
        JobState::Failed(why) => ("failed", Some(why)),
        JobState::Cancelled(why) => ("cancelled", Some(why)),
        JobState::Waiting(why) => ("waiting", Some(why)),
    };
    json!({
        "job": j.job.0,
        "name": j.name,
        "state": state,
        "state_detail": detail,
        "started": j.started,
        "ended": j.ended,
        "slots": j.slots,
        "nodes": j.nodes,
        "inputs_done": j.inputs_done,
        "total_inputs": j.total_inputs,
        "inputs_failed": j.inputs_failed,
        "per_node": j.per_node.iter().map(|p| json!({
            "node": p.node,
            "slots": p.slots,
            "inputs_done": p.inputs_done,
            "inputs_failed": p.inputs_failed,
        })).collect::<Vec<_>>(),
        "failures": j.failures,
    })
}

/// The registry's nodes by state (none where it cannot be read).
fn enrolled(registry: &NodeRegistry) -> Enrolled {
    let mut counts = Enrolled::default();
    for entry in registry.list().unwrap_or_default() {
        if entry.revoked.is_some() {
            counts.revoked += 1;
        } else if entry.approved.is_none() || entry.fingerprint.is_none() {
            counts.pending += 1;
        } else {
            counts.active += 1;
        }
    }
    counts
}
