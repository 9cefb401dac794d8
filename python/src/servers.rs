//! The local cluster embedded in the Python process, which
//! `remote_parallel_map` starts when no fleet is configured (a fleet's
//! coordinator and node daemons are the `fleetmapd` program). Its handle's
//! `stop` waits for the shutdown with the GIL released.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Mutex, MutexGuard},
};

use fleetmap_client::{local::LocalCluster, Client, ClientError};
use pyo3::prelude::*;

use crate::{
    client::Connection,
    errors::{client_error, configuration_error, local_cluster_error},
    process::runtime,
};

/// Locks a handle's state. A poisoned lock only means that an earlier call
/// panicked while holding it; the state (a server, or its absence once
/// stopped) is still whole, so it is used as it is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn parse_addr(addr: &str) -> PyResult<SocketAddr> {
    addr.parse()
        .map_err(|e| configuration_error(format!("bad listen address {addr:?}: {e}")))
}

/// A coordinator, a node and their credentials running in this process.
#[pyclass(module = "fleetmap._native", frozen)]
pub(crate) struct LocalHandle {
    cluster: Mutex<Option<LocalCluster>>,
    #[pyo3(get)]
    addr: String,
    #[pyo3(get)]
    ca_pem: String,
    #[pyo3(get)]
    api_key: String,
    #[pyo3(get)]
    join_token: String,
}

#[pymethods]
impl LocalHandle {
    /// A connection to this cluster's coordinator with `api_key`, over a
    /// link within this process rather than QUIC through loopback.
    fn connect(&self, py: Python<'_>, api_key: String) -> PyResult<Connection> {
        // The lock is not held while connecting: `stop` takes it with the
        // GIL held.
        let dialer = lock(&self.cluster).as_ref().map(LocalCluster::local_dialer);
        let client = match dialer {
            Some(dialer) => py.detach(|| runtime().block_on(Client::connect_local(&dialer, &self.addr, &api_key))),
            None => Err(ClientError::Disconnected("the local cluster has stopped".into())),
        };
        client.map(Connection::new).map_err(client_error)
    }

    fn stop(&self, py: Python<'_>) {
        let cluster = lock(&self.cluster).take();
        if let Some(c) = cluster {
            py.detach(|| runtime().block_on(c.stop()));
        }
    }
}

/// Starts the embedded cluster on `listen` with `python` as the workers'
/// default interpreter.
#[pyfunction]
#[pyo3(signature = (listen, python, runtime_packages=Vec::new(), uv=None))]
pub(crate) fn start_local_cluster(
    py: Python<'_>,
    listen: &str,
    python: String,
    runtime_packages: Vec<PathBuf>,
    uv: Option<PathBuf>,
) -> PyResult<LocalHandle> {
    let listen = parse_addr(listen)?;
    let cluster = py
        .detach(|| runtime().block_on(LocalCluster::start(listen, python, runtime_packages, uv)))
        .map_err(local_cluster_error)?;
    Ok(LocalHandle {
        addr: cluster.addr.clone(),
        ca_pem: cluster.credentials.ca_pem.clone(),
        api_key: cluster.credentials.api_key.clone(),
        join_token: cluster.credentials.join_token.clone(),
        cluster: Mutex::new(Some(cluster)),
    })
}
