//! What the coordinator serves operators over HTTP, on the address given
//! with `CoordinatorConfig::http` only: Prometheus metrics at `/metrics`.

use std::sync::Arc;

use fleetmap_net::http::{Handler, HttpRequest, HttpResponse};

use super::Shared;
use crate::{
    metrics::{render, Enrolled},
    nodes::NodeRegistry,
};

/// The content type of the OpenMetrics text format the metrics are in.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(super) fn handler(shared: Arc<Shared>) -> Handler {
    Arc::new(move |request: HttpRequest| {
        let shared = shared.clone();
        Box::pin(async move { answer(&shared, request).await })
    })
}

async fn answer(shared: &Arc<Shared>, request: HttpRequest) -> HttpResponse {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/metrics") => {
            let snapshot = shared.with(|s| s.snapshot());
            // The registry is a file: read off the runtime's threads.
            let registry = shared.nodes.clone();
            let enrolled = tokio::task::spawn_blocking(move || enrolled(&registry))
                .await
                .unwrap_or_default();
            HttpResponse::new(200, OPENMETRICS, render(&snapshot, enrolled, &shared.metrics))
        }
        (_, "/metrics") => HttpResponse::text(405, "/metrics answers GET only"),
        _ => HttpResponse::text(404, "not found: this address serves /metrics"),
    }
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
