//! The coordinator's Prometheus metrics, served on the operator's HTTP
//! address (`/metrics`). Gauges and counts come from the scheduler's
//! snapshot at each scrape; what only the shell sees (how long a chunk takes
//! from its dispatch to its answer, payload bytes through the coordinator)
//! is kept here as it happens.

use std::{collections::BTreeMap, sync::Mutex, time::Instant};

use fleetmap_protocol::{ChunkId, JobId, NodeId};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::scheduler::FleetSnapshot;

/// What the shell measures.
pub(crate) struct ShellMetrics {
    /// Seconds from a chunk's `RunChunk` to its `ChunkDone`.
    dispatch_seconds: Histogram,
    /// When each chunk in flight was sent, by node, job and chunk.
    sent: Mutex<BTreeMap<(NodeId, JobId, ChunkId), Instant>>,
    /// Input payload bytes received from clients, output payload bytes
    /// received from nodes (and passed on to clients).
    pub(crate) input_bytes: Counter,
    pub(crate) output_bytes: Counter,
}

impl Default for ShellMetrics {
    fn default() -> Self {
        Self {
            // 0.5 ms to about 16 s.
            dispatch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            sent: Mutex::default(),
            input_bytes: Counter::default(),
            output_bytes: Counter::default(),
        }
    }
}

impl ShellMetrics {
    fn sent(&self) -> std::sync::MutexGuard<'_, BTreeMap<(NodeId, JobId, ChunkId), Instant>> {
        self.sent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn dispatched(&self, node: NodeId, job: JobId, chunk: ChunkId) {
        self.sent().insert((node, job, chunk), Instant::now());
    }

    pub(crate) fn answered(&self, node: NodeId, job: JobId, chunk: ChunkId) {
        if let Some(at) = self.sent().remove(&(node, job, chunk)) {
            self.dispatch_seconds.observe(at.elapsed().as_secs_f64());
        }
    }

    /// Forgets the chunks a node ran for `job` (`None`: for every job):
    /// they will not be answered.
    pub(crate) fn forget(&self, node: NodeId, job: Option<JobId>) {
        let (from, to) = match job {
            Some(job) => ((node, job, ChunkId(0)), (node, job, ChunkId(u64::MAX))),
            None => ((node, JobId(0), ChunkId(0)), (node, JobId(u64::MAX), ChunkId(u64::MAX))),
        };
        let mut sent = self.sent();
        let gone: Vec<_> = sent.range(from..=to).map(|(k, _)| *k).collect();
        for key in gone {
            sent.remove(&key);
        }
    }
}

/// Node registry counts by state, for `fleetmap_enrolled_nodes`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Enrolled {
    pub active: u64,
    pub pending: u64,
    pub revoked: u64,
}

/// The Prometheus text exposition of the coordinator's metrics.
pub(crate) fn render(snapshot: &FleetSnapshot, enrolled: Enrolled, shell: &ShellMetrics) -> String {
    let mut registry = Registry::with_prefix("fleetmap");
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, g);
    };
    let by_state = |registry: &mut Registry, name: &str, help: &str, values: &[(&str, u64)]| {
        let family = Family::<Vec<(String, String)>, Gauge>::default();
        for (state, value) in values {
            family
                .get_or_create(&vec![("state".to_string(), state.to_string())])
                .set(i64::try_from(*value).unwrap_or(i64::MAX));
        }
        registry.register(name, help, family);
    };
    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let c: Counter = Counter::default();
        c.inc_by(value);
        registry.register(name, help, c);
    };
    let s = snapshot;
    by_state(
        &mut registry,
        "nodes",
        "Nodes by state: connected, or in the registry as enrolled, pending approval or revoked",
        &[
            ("connected", s.nodes),
            ("enrolled", enrolled.active),
            ("pending", enrolled.pending),
            ("revoked", enrolled.revoked),
        ],
    );
    by_state(
        &mut registry,
        "cores",
        "Cores of the connected nodes, busy (held by slots) or free",
        &[("busy", s.cores - s.cores_free), ("free", s.cores_free)],
    );
    by_state(
        &mut registry,
        "memory_bytes",
        "Memory of the connected nodes, busy (held by slots) or free",
        &[
            ("busy", s.memory_bytes - s.memory_free_bytes),
            ("free", s.memory_free_bytes),
        ],
    );
    by_state(
        &mut registry,
        "gpus",
        "GPUs of the connected nodes, busy (held by slots) or free",
        &[("busy", s.gpus - s.gpus_free), ("free", s.gpus_free)],
    );
    by_state(
        &mut registry,
        "slots",
        "Slots placed, running chunks or being given back",
        &[("active", s.slots - s.slots_draining), ("draining", s.slots_draining)],
    );
    by_state(
        &mut registry,
        "jobs",
        "Jobs by state: running, waiting for a node that can host them, or waiting for their client",
        &[
            ("running", s.jobs_running),
            ("waiting_for_node", s.jobs_waiting_for_node),
            ("waiting_for_client", s.jobs_waiting_for_client),
        ],
    );
    gauge(
        &mut registry,
        "queued_chunks",
        "Chunks of inputs queued in the coordinator",
        s.chunks_queued,
    );
    gauge(
        &mut registry,
        "chunks_in_flight",
        "Chunks of inputs held by slots",
        s.chunks_in_flight,
    );
    let ended = Family::<Vec<(String, String)>, Counter>::default();
    for (state, value) in [
        ("finished", s.counters.jobs_finished),
        ("failed", s.counters.jobs_failed),
        ("cancelled", s.counters.jobs_cancelled),
    ] {
        ended
            .get_or_create(&vec![("state".to_string(), state.to_string())])
            .inc_by(value);
    }
    registry.register("jobs_ended", "Jobs that ended, by how", ended);
    counter(
        &mut registry,
        "inputs_done",
        "Inputs with an outcome",
        s.counters.inputs_done,
    );
    counter(
        &mut registry,
        "inputs_failed",
        "Inputs whose call raised",
        s.counters.inputs_failed,
    );
    counter(
        &mut registry,
        "chunks_dispatched",
        "Chunks handed to slots",
        s.counters.chunks_dispatched,
    );
    counter(
        &mut registry,
        "nodes_lost",
        "Node connections lost",
        s.counters.nodes_lost,
    );
    let bytes = Family::<Vec<(String, String)>, Counter>::default();
    bytes
        .get_or_create(&vec![("direction".to_string(), "in".to_string())])
        .inc_by(shell.input_bytes.get());
    bytes
        .get_or_create(&vec![("direction".to_string(), "out".to_string())])
        .inc_by(shell.output_bytes.get());
    registry.register(
        "payload_bytes",
        "Payload bytes through the coordinator: inputs from clients (in), outputs to them (out)",
        bytes,
    );
    registry.register(
        "chunk_dispatch_seconds",
        "Seconds from a chunk's dispatch to a slot until its answer",
        shell.dispatch_seconds.clone(),
    );
    let mut out = String::new();
    // Writing to a String does not fail.
    let _ = encode(&mut out, &registry);
    out
}
