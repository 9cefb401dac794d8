//! Servers embedded in the Python process: the local cluster that
//! `remote_parallel_map` starts when no fleet is configured, and the
//! coordinator and node daemon that `fleetmap coordinator`/`fleetmap node`
//! run. Each is a handle whose `stop` waits for the shutdown with the GIL
//! released.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use fleetmap_client::local::LocalCluster;
use fleetmap_coordinator::{
    credentials::CredentialPaths, CoordinatorConfig, Credentials, KeyStore, NodeLimit, NodeRegistry, RunningCoordinator,
};
use fleetmap_node_daemon::{EnvironmentConfig, Isolation, NodeConfig, NodeError};
use fleetmap_protocol::EnvironmentSpec;
use pyo3::{prelude::*, types::PyDict};
use tokio::task::JoinHandle;

use crate::{
    errors::{configuration_error, local_cluster_error},
    process::{runtime, seconds},
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

/// A coordinator serving in this process.
#[pyclass(module = "fleetmap._native", frozen)]
pub(crate) struct CoordinatorHandle {
    running: Mutex<Option<RunningCoordinator>>,
    #[pyo3(get)]
    addr: String,
    #[pyo3(get)]
    ca_path: String,
    #[pyo3(get)]
    join_token_path: String,
    #[pyo3(get)]
    api_key_path: String,
}

#[pymethods]
impl CoordinatorHandle {
    fn node_count(&self) -> usize {
        lock(&self.running).as_ref().map_or(0, |c| c.node_count())
    }

    fn stop(&self, py: Python<'_>) {
        let running = lock(&self.running).take();
        if let Some(c) = running {
            py.detach(|| runtime().block_on(c.shutdown()));
        }
    }
}

/// Starts a coordinator on `listen`, keeping its credentials, keys and
/// node registry in `state_dir`; node certificates are valid
/// `node_cert_days`, a node may offer at most the `max_node_*` given, and
/// with `approve_nodes` a new node waits for `fleetmap nodes approve`.
#[pyfunction]
#[pyo3(signature = (listen, state_dir, node_cert_days=30.0, max_node_cores=None, max_node_memory_bytes=None, max_node_gpus=None, approve_nodes=false))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_coordinator(
    py: Python<'_>,
    listen: &str,
    state_dir: PathBuf,
    node_cert_days: f64,
    max_node_cores: Option<u32>,
    max_node_memory_bytes: Option<u64>,
    max_node_gpus: Option<u32>,
    approve_nodes: bool,
) -> PyResult<CoordinatorHandle> {
    let listen = parse_addr(listen)?;
    if !(node_cert_days > 0.0 && node_cert_days <= 3650.0) {
        return Err(configuration_error(format!(
            "node certificates must be valid between a moment and ten years, not {node_cert_days} days"
        )));
    }
    let credentials = Credentials::load_or_create(&state_dir).map_err(configuration_error)?;
    let paths = CredentialPaths::in_dir(&state_dir);
    let keys = KeyStore::open(&state_dir, &credentials.api_key).map_err(configuration_error)?;
    let mut config = CoordinatorConfig::new(listen, credentials);
    config.keys = std::sync::Arc::new(keys);
    config.nodes = std::sync::Arc::new(NodeRegistry::open(&state_dir));
    config.node_cert_validity = std::time::Duration::from_secs_f64(node_cert_days * 86400.0);
    config.node_limit = NodeLimit {
        cores: max_node_cores,
        memory_bytes: max_node_memory_bytes,
        gpus: max_node_gpus,
    };
    config.approve_nodes = approve_nodes;
    let running = py
        .detach(|| runtime().block_on(async { fleetmap_coordinator::serve(config).await }))
        .map_err(|e| configuration_error(format!("cannot listen on {listen}: {e}")))?;
    Ok(CoordinatorHandle {
        addr: running.local_addr.to_string(),
        running: Mutex::new(Some(running)),
        ca_path: paths.ca.display().to_string(),
        join_token_path: paths.join_token.display().to_string(),
        api_key_path: paths.api_key.display().to_string(),
    })
}

/// A node daemon serving in this process.
#[pyclass(module = "fleetmap._native", frozen)]
pub(crate) struct NodeHandle {
    task: Mutex<Option<JoinHandle<Result<(), NodeError>>>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    #[pyo3(get)]
    name: String,
}

#[pymethods]
impl NodeHandle {
    /// Waits up to `timeout` seconds; returns None while the daemon runs,
    /// else why it stopped.
    fn wait(&self, py: Python<'_>, timeout: f64) -> Option<String> {
        let mut guard = lock(&self.task);
        let task = guard.as_mut()?;
        let wait = seconds(timeout);
        let done = py.detach(|| runtime().block_on(async { tokio::time::timeout(wait, task).await.ok() }));
        let result = done?;
        *guard = None;
        Some(match result {
            Ok(Ok(())) => "stopped".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("node daemon task failed: {e}"),
        })
    }

    /// Stops the daemon: every slot is torn down (workers killed, cgroups
    /// removed) before this returns, or after 10 s at most.
    fn stop(&self, py: Python<'_>) {
        let _ = self.shutdown.send(true);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            py.detach(|| {
                runtime().block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
                })
            });
        }
    }
}

/// Starts a node daemon that joins `coordinator`.
#[pyfunction]
#[pyo3(signature = (coordinator, token, ca_pem, name=None, cores=None, memory_bytes=None, python=None, gpus=None, cgroups=true, cgroup_subtree=None, cgroup_mount=None, pids_per_slot=None, run_as=None, private_tmp=true, environments=None, pass_env=Vec::new(), allow_unisolated=false, identity_dir=None, slot_uids=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_node(
    coordinator: String,
    token: String,
    ca_pem: Vec<u8>,
    name: Option<String>,
    cores: Option<u32>,
    memory_bytes: Option<u64>,
    python: Option<String>,
    gpus: Option<Vec<u32>>,
    cgroups: bool,
    cgroup_subtree: Option<String>,
    cgroup_mount: Option<PathBuf>,
    pids_per_slot: Option<u64>,
    run_as: Option<String>,
    private_tmp: bool,
    environments: Option<Bound<'_, PyDict>>,
    pass_env: Vec<String>,
    allow_unisolated: bool,
    identity_dir: Option<PathBuf>,
    slot_uids: Option<String>,
) -> PyResult<NodeHandle> {
    let mut config = NodeConfig::new(coordinator, ca_pem, token);
    config.identity_dir = identity_dir;
    if let Some(range) = slot_uids {
        config.slot_uids = Some(fleetmap_node_daemon::uids::SlotUids::parse(&range).map_err(configuration_error)?);
    }
    if let Some(name) = name {
        config.name = name;
    }
    if let Some(cores) = cores {
        config.resources.cores = cores;
    }
    if let Some(memory) = memory_bytes {
        config.resources.memory_bytes = memory;
    }
    if let Some(python) = python {
        config.python = python;
    }
    if let Some(minors) = gpus {
        config.resources.gpus = fleetmap_node_daemon::gpus_from_minors(&minors);
    }
    config.isolation = if cgroups {
        Isolation::Cgroups {
            mount: cgroup_mount.unwrap_or_else(|| "/sys/fs/cgroup".into()),
            subtree: cgroup_subtree,
            allow_unisolated,
        }
    } else {
        Isolation::None
    };
    if let Some(pids) = pids_per_slot {
        config.pids_per_slot = pids;
    }
    if let Some(user) = run_as {
        config.run_as = Some(fleetmap_sandbox::lookup_user(&user).map_err(configuration_error)?);
    }
    config.private_tmp = private_tmp;
    config.pass_env = pass_env;
    if let Some(settings) = environments {
        environment_settings(&mut config, &settings)?;
    }
    let name = config.name.clone();
    let (shutdown, stop) = tokio::sync::watch::channel(false);
    let task = runtime().spawn(fleetmap_node_daemon::run_until(config, stop));
    Ok(NodeHandle {
        task: Mutex::new(Some(task)),
        shutdown,
        name,
    })
}

/// Reads `fleetmap node`'s environment settings: `pythons`, `cache_dir`,
/// `uv`, `runtime_packages`, `index_url`, `find_links`, `build_timeout_s`,
/// `max_bytes`, `use_caller_python` and `prepare` (`(id, requirements,
/// python version)` of each environment to build at start), and the image
/// settings `insecure_registries`, `registry_auth` and `image_max_bytes`,
/// each optional.
fn environment_settings(node: &mut NodeConfig, settings: &Bound<'_, PyDict>) -> PyResult<()> {
    let config: &mut EnvironmentConfig = &mut node.environments;
    for (key, value) in settings.iter() {
        let key: String = key.extract()?;
        if value.is_none() {
            continue;
        }
        match key.as_str() {
            "pythons" => config.pythons = value.extract()?,
            "cache_dir" => config.cache_dir = value.extract()?,
            "uv" => config.uv = Some(value.extract()?),
            "runtime_packages" => config.runtime = value.extract()?,
            "index_url" => config.index_url = Some(value.extract()?),
            "find_links" => config.find_links = value.extract()?,
            "build_timeout_s" => config.build_timeout = seconds(value.extract()?),
            "max_bytes" => config.max_bytes = value.extract()?,
            "use_caller_python" => config.use_caller_python = value.extract()?,
            "insecure_registries" => node.images.insecure_registries = value.extract()?,
            "registry_auth" => node.images.auth_file = Some(value.extract()?),
            "image_max_bytes" => node.images.max_bytes = value.extract()?,
            "prepare" => {
                let listed: Vec<(String, Vec<String>, String)> = value.extract()?;
                config.prepare = listed
                    .into_iter()
                    .map(|(id, requirements, python)| {
                        let spec = EnvironmentSpec {
                            id,
                            requirements,
                            resolve: true,
                        };
                        (spec, python)
                    })
                    .collect();
            }
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "unknown environment setting {other:?}"
                )))
            }
        }
    }
    Ok(())
}
