//! What the extension sets up once per process: the tokio runtime that its
//! blocking calls drive, and logging to stderr.

use std::{sync::OnceLock, time::Duration};

use pyo3::prelude::*;
use tokio::runtime::Runtime;

/// The process's tokio runtime, shared by clients and embedded servers. Its
/// worker threads live as long as the process, which matters: workers are
/// spawned with a parent-death signal tied to the spawning thread.
pub(crate) fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(runtime_threads())
            .thread_name("fleetmap")
            .enable_all()
            .build()
            // Without a runtime nothing in fleetmap can work; there is no
            // meaningful recovery from failing to create threads at import.
            .expect("cannot start fleetmap's tokio runtime")
    })
}

/// How many threads drive the runtime: `FLEETMAP_RUNTIME_THREADS`, else a
/// quarter of the cores this process may use, from 1 to 4. The client, and
/// the embedded coordinator and node, wait on the network and on workers
/// far more than they compute; on a small machine every thread more only
/// adds hand-offs between threads to each message (measured on 2 cores: one
/// thread gives both a shorter round trip and more inputs per second than
/// two), while the slots' workers need the cores.
fn runtime_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    std::env::var("FLEETMAP_RUNTIME_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| (1..=256).contains(&n))
        .unwrap_or((cores / 4).clamp(1, 4))
}

/// Turns on logging to stderr at `level` (once; later calls do nothing).
#[pyfunction]
pub(crate) fn init_logging(level: &str) {
    let filter = std::env::var("FLEETMAP_LOG").unwrap_or_else(|_| level.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

/// A timeout given in seconds from Python: below zero (or NaN) is zero,
/// infinity is forever.
pub(crate) fn seconds(timeout: f64) -> Duration {
    Duration::try_from_secs_f64(timeout.max(0.0)).unwrap_or(Duration::MAX)
}
