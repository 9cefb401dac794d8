//! `fleetmap._native`: the Python binding. It converts types between Python
//! and the Rust crates and holds the process's tokio runtime; it makes no
//! decisions of its own. Blocking calls release the GIL.
//!
//! Errors cross as `NativeError(kind, message)`; the pure-Python package
//! turns each kind into its own exception class. WebAssembly modules fail
//! with `WasmError(kind, message, stderr, exit_code)`.

use std::{
    borrow::Cow,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use fleetmap_client::{local::LocalCluster, Client, ClientError, Job, JobEvent};
use fleetmap_coordinator::{credentials::CredentialPaths, CoordinatorConfig, Credentials, RunningCoordinator};
use fleetmap_node_daemon::{Isolation, NodeConfig};
use fleetmap_protocol::{CallRequest, ChunkId, InputChunk, InputIndex, JobSpec, OutputStream, RuntimeSpec};
use fleetmap_runtime::wasm;
use pyo3::{
    create_exception,
    exceptions::{PyException, PyValueError},
    prelude::*,
    types::{PyBytes, PyDict},
};
use tokio::{runtime::Runtime, task::JoinHandle};

create_exception!(
    _native,
    NativeError,
    PyException,
    "An error from fleetmap's native core: args are (kind, message)."
);

create_exception!(
    _native,
    WasmError,
    PyException,
    "A WebAssembly module failed to load or run: args are (kind, message, stderr, exit_code); \
     kind is one of \"invalid\", \"no_start\", \"trap\", \"exit\", \"timeout\", \"memory\", \
     \"output_too_large\"; exit_code is None unless kind is \"exit\"."
);

fn wasm_error(e: wasm::WasmError) -> PyErr {
    WasmError::new_err((e.kind(), e.to_string(), e.stderr().to_string(), e.exit_code()))
}

fn native_error(kind: &str, message: impl std::fmt::Display) -> PyErr {
    NativeError::new_err((kind.to_string(), message.to_string()))
}

fn client_error(e: ClientError) -> PyErr {
    let kind = match &e {
        ClientError::Unreachable { .. } => "unreachable",
        ClientError::Refused(_) => "auth",
        ClientError::Tls(_) => "tls",
        ClientError::Rejected(_) => "rejected",
        ClientError::Disconnected(_) => "disconnected",
        _ => "protocol",
    };
    native_error(kind, e)
}

/// The process's tokio runtime, shared by clients and embedded servers. Its
/// worker threads live as long as the process, which matters: workers are
/// spawned with a parent-death signal tied to the spawning thread.
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fleetmap")
            .enable_all()
            .build()
            // Without a runtime nothing in fleetmap can work; there is no
            // meaningful recovery from failing to create threads at import.
            .expect("cannot start fleetmap's tokio runtime")
    })
}

/// Turns on logging to stderr at `level` (once; later calls do nothing).
#[pyfunction]
fn init_logging(level: &str) {
    let filter = std::env::var("FLEETMAP_LOG").unwrap_or_else(|_| level.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

fn parse_addr(addr: &str) -> PyResult<SocketAddr> {
    addr.parse()
        .map_err(|e| native_error("config", format!("bad listen address {addr:?}: {e}")))
}

/// A coordinator, a node and their credentials running in this process.
#[pyclass]
struct LocalHandle {
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
        let cluster = self.cluster.lock().expect("local cluster lock").take();
        if let Some(c) = cluster {
            py.allow_threads(|| runtime().block_on(c.stop()));
        }
    }
}

/// Starts the embedded cluster on `listen` with `python` as the workers'
/// default interpreter.
#[pyfunction]
fn start_local_cluster(py: Python<'_>, listen: &str, python: String) -> PyResult<LocalHandle> {
    let listen = parse_addr(listen)?;
    let cluster = py
        .allow_threads(|| runtime().block_on(LocalCluster::start(listen, python)))
        .map_err(|e| native_error("local", e))?;
    Ok(LocalHandle {
        addr: cluster.addr.clone(),
        ca_pem: cluster.credentials.ca_pem.clone(),
        api_key: cluster.credentials.api_key.clone(),
        join_token: cluster.credentials.join_token.clone(),
        cluster: Mutex::new(Some(cluster)),
    })
}

/// A coordinator serving in this process.
#[pyclass]
struct CoordinatorHandle {
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
        self.running
            .lock()
            .expect("coordinator lock")
            .as_ref()
            .map_or(0, |c| c.node_count())
    }

    fn stop(&self, py: Python<'_>) {
        let running = self.running.lock().expect("coordinator lock").take();
        if let Some(c) = running {
            py.allow_threads(|| runtime().block_on(c.shutdown()));
        }
    }
}

/// Starts a coordinator on `listen`, keeping its credentials in `state_dir`.
#[pyfunction]
fn start_coordinator(py: Python<'_>, listen: &str, state_dir: PathBuf) -> PyResult<CoordinatorHandle> {
    let listen = parse_addr(listen)?;
    let credentials = Credentials::load_or_create(&state_dir).map_err(|e| native_error("config", e))?;
    let paths = CredentialPaths::in_dir(&state_dir);
    let running = py
        .allow_threads(|| {
            runtime().block_on(async { fleetmap_coordinator::serve(CoordinatorConfig::new(listen, credentials)).await })
        })
        .map_err(|e| native_error("config", format!("cannot listen on {listen}: {e}")))?;
    Ok(CoordinatorHandle {
        addr: running.local_addr.to_string(),
        running: Mutex::new(Some(running)),
        ca_path: paths.ca.display().to_string(),
        join_token_path: paths.join_token.display().to_string(),
        api_key_path: paths.api_key.display().to_string(),
    })
}

/// A node daemon serving in this process.
#[pyclass]
struct NodeHandle {
    task: Mutex<Option<JoinHandle<Result<(), fleetmap_node_daemon::NodeError>>>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    #[pyo3(get)]
    name: String,
}

#[pymethods]
impl NodeHandle {
    /// Waits up to `timeout` seconds; returns None while the daemon runs,
    /// else why it stopped.
    fn wait(&self, py: Python<'_>, timeout: f64) -> Option<String> {
        let mut guard = self.task.lock().expect("node lock");
        let task = guard.as_mut()?;
        let done = py.allow_threads(|| {
            runtime().block_on(async { tokio::time::timeout(Duration::from_secs_f64(timeout), task).await.ok() })
        });
        match done {
            None => None,
            Some(result) => {
                *guard = None;
                Some(match result {
                    Ok(Ok(())) => "stopped".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("node daemon task failed: {e}"),
                })
            }
        }
    }

    /// Stops the daemon: every slot is torn down (workers killed, cgroups
    /// removed) before this returns, or after 10 s at most.
    fn stop(&self, py: Python<'_>) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.lock().expect("node lock").take() {
            py.allow_threads(|| {
                runtime().block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
                })
            });
        }
    }
}

/// Starts a node daemon that joins `coordinator`.
#[pyfunction]
#[pyo3(signature = (coordinator, token, ca_pem, name=None, cores=None, memory_bytes=None, python=None, gpus=None, cgroups=true, cgroup_subtree=None, cgroup_mount=None, pids_per_slot=None, run_as=None, private_tmp=true))]
#[allow(clippy::too_many_arguments)]
fn start_node(
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
) -> PyResult<NodeHandle> {
    let mut config = NodeConfig::new(coordinator, ca_pem, token);
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
        }
    } else {
        Isolation::None
    };
    if let Some(pids) = pids_per_slot {
        config.pids_per_slot = pids;
    }
    if let Some(user) = run_as {
        config.run_as = Some(fleetmap_sandbox::lookup_user(&user).map_err(|e| native_error("config", e))?);
    }
    config.private_tmp = private_tmp;
    let name = config.name.clone();
    let (shutdown, stop) = tokio::sync::watch::channel(false);
    let task = runtime().spawn(fleetmap_node_daemon::run_until(config, stop));
    Ok(NodeHandle {
        task: Mutex::new(Some(task)),
        shutdown,
        name,
    })
}

/// A connection to a coordinator.
#[pyclass]
struct Connection {
    client: Arc<Client>,
}

#[pyfunction]
fn connect(py: Python<'_>, addr: String, ca_pem: Vec<u8>, api_key: String) -> PyResult<Connection> {
    let client = py
        .allow_threads(|| runtime().block_on(Client::connect(&addr, &ca_pem, &api_key)))
        .map_err(client_error)?;
    Ok(Connection {
        client: Arc::new(client),
    })
}

#[pymethods]
impl Connection {
    /// Submits a job of a pickled Python function.
    #[pyo3(signature = (function, cores, memory_bytes, gpus, parallelism, total_inputs, executable, version))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        function: Vec<u8>,
        cores: u32,
        memory_bytes: u64,
        gpus: u32,
        parallelism: Option<u32>,
        total_inputs: Option<u64>,
        executable: String,
        version: String,
    ) -> PyResult<PyJob> {
        let spec = JobSpec {
            call: CallRequest {
                cores,
                memory_bytes,
                gpus,
            },
            parallelism,
            total_inputs,
            runtime: RuntimeSpec::Python {
                executable,
                version,
                function,
            },
        };
        let client = self.client.clone();
        let job = py
            .allow_threads(|| runtime().block_on(client.submit(spec)))
            .map_err(client_error)?;
        Ok(PyJob { job })
    }

    fn close(&self) {
        self.client.close();
    }

    /// The fleetmap version the coordinator runs.
    #[getter]
    fn coordinator_version(&self) -> String {
        self.client.coordinator_version.clone()
    }

    /// The fleet's nodes as dicts: name, cores, memory_bytes, gpus,
    /// free_cores, free_memory_bytes, free_gpus, isolation; and the number
    /// of running jobs.
    fn status<'py>(&self, py: Python<'py>) -> PyResult<(Vec<Bound<'py, PyDict>>, u32)> {
        let client = self.client.clone();
        let status = py
            .allow_threads(|| runtime().block_on(client.status()))
            .map_err(client_error)?;
        let mut nodes = Vec::new();
        for n in status.nodes {
            let d = PyDict::new(py);
            d.set_item("name", n.name)?;
            d.set_item("cores", n.resources.cores)?;
            d.set_item("memory_bytes", n.resources.memory_bytes)?;
            d.set_item("gpus", n.resources.gpus.iter().map(|g| g.minor).collect::<Vec<_>>())?;
            d.set_item("free_cores", n.free_cores)?;
            d.set_item("free_memory_bytes", n.free_memory_bytes)?;
            d.set_item("free_gpus", n.free_gpus)?;
            d.set_item("isolation", n.isolation)?;
            nodes.push(d);
        }
        Ok((nodes, status.jobs))
    }
}

/// A running job.
#[pyclass(name = "Job")]
struct PyJob {
    job: Job,
}

#[pymethods]
impl PyJob {
    #[getter]
    fn id(&self) -> u64 {
        self.job.id.0
    }

    #[getter]
    fn slots(&self) -> u32 {
        self.job.slots
    }

    #[getter]
    fn nodes(&self) -> u32 {
        self.job.nodes
    }

    #[getter]
    fn credit(&self) -> u32 {
        self.job.initial_credit
    }

    fn send_chunk(&self, chunk: u64, first_input: u64, count: u32, payload: Vec<u8>) {
        self.job.send_chunk(InputChunk {
            chunk: ChunkId(chunk),
            first_input: InputIndex(first_input),
            count,
            payload,
        });
    }

    fn inputs_done(&self, chunks: u64) {
        self.job.inputs_done(chunks);
    }

    fn cancel(&self) {
        self.job.cancel();
    }

    /// The events that arrive within `timeout` seconds (at least one unless
    /// the time runs out), as tuples:
    /// `("output", first_input, count, failed, node, payload)`,
    /// `("log", stream, node, text)`, `("credit", n)`, `("finished",)`,
    /// `("failed", reason)`.
    fn events(&mut self, py: Python<'_>, timeout: f64) -> PyResult<Vec<PyObject>> {
        let job = &mut self.job;
        let wait = Duration::from_secs_f64(timeout.max(0.0));
        let first =
            py.allow_threads(|| runtime().block_on(async { tokio::time::timeout(wait, job.next_event()).await }));
        let mut events = Vec::new();
        match first {
            Err(_) => return Ok(events),
            Ok(None) => {
                let reason = "lost the connection to the coordinator";
                events.push(("failed", reason).into_pyobject(py)?.into_any().unbind());
                return Ok(events);
            }
            Ok(Some(e)) => events.push(event_to_py(py, e)?),
        }
        while events.len() < 4096 {
            match self.job.try_next_event() {
                Some(e) => events.push(event_to_py(py, e)?),
                None => break,
            }
        }
        Ok(events)
    }
}

fn event_to_py(py: Python<'_>, event: JobEvent) -> PyResult<PyObject> {
    let obj = match event {
        JobEvent::Output(o) => (
            "output",
            o.first_input.0,
            o.count,
            o.failed,
            o.node,
            PyBytes::new(py, &o.payload),
        )
            .into_pyobject(py)?
            .into_any(),
        JobEvent::Log(line) => {
            let stream = match line.stream {
                OutputStream::Stdout => "stdout",
                OutputStream::Stderr => "stderr",
            };
            ("log", stream, line.node, line.text).into_pyobject(py)?.into_any()
        }
        JobEvent::Credit(n) => ("credit", n).into_pyobject(py)?.into_any(),
        JobEvent::Finished => ("finished",).into_pyobject(py)?.into_any(),
        JobEvent::Failed(reason) => ("failed", reason).into_pyobject(py)?.into_any(),
    };
    Ok(obj.unbind())
}

/// Runs the worker loop on the inherited channel `fd` (called by
/// `fleetmap._worker.main` in a slot's worker process).
#[pyfunction]
fn worker_main(py: Python<'_>, fd: i32) -> PyResult<()> {
    fleetmap_runtime::python::worker_main(py, fd)
}

/// A WASI command module compiled in this process (once per module bytes),
/// run once per input in a fresh instance: stdin in, stdout out.
#[pyclass(name = "WasmModule", frozen)]
struct PyWasmModule {
    module: wasm::WasmModule,
}

#[pymethods]
impl PyWasmModule {
    /// Compiles `module` (binary or WAT text) with the GIL released.
    #[new]
    #[pyo3(signature = (module, memory_limit_bytes, time_limit_s, args, env, mounts, max_output_bytes))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        module: Cow<'_, [u8]>,
        memory_limit_bytes: u64,
        time_limit_s: Option<f64>,
        args: Vec<String>,
        env: Vec<(String, String)>,
        mounts: Vec<(String, String)>,
        max_output_bytes: usize,
    ) -> PyResult<Self> {
        let time_limit = time_limit_s
            .map(|s| {
                Duration::try_from_secs_f64(s)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        PyValueError::new_err(format!("time_limit_s must be a positive number of seconds, not {s}"))
                    })
            })
            .transpose()?;
        let config = wasm::WasmConfig {
            memory_limit_bytes,
            time_limit,
            args,
            env,
            mounts: mounts
                .into_iter()
                .map(|(host, guest)| (PathBuf::from(host), guest))
                .collect(),
            max_output: max_output_bytes,
            ..wasm::WasmConfig::default()
        };
        let module = py
            .allow_threads(|| wasm::WasmModule::new(&module, config))
            .map_err(wasm_error)?;
        Ok(Self { module })
    }

    /// Runs the module on `stdin` and returns its stdout (GIL released).
    fn run(&self, py: Python<'_>, stdin: Cow<'_, [u8]>) -> PyResult<Py<PyBytes>> {
        let out = py.allow_threads(|| self.module.run(&stdin)).map_err(wasm_error)?;
        Ok(PyBytes::new(py, &out).unbind())
    }

    /// Like `run`, returning `(stdout, stderr)`.
    fn run_with_stderr(&self, py: Python<'_>, stdin: Cow<'_, [u8]>) -> PyResult<(Py<PyBytes>, String)> {
        let out = py
            .allow_threads(|| self.module.run_with_stderr(&stdin))
            .map_err(wasm_error)?;
        Ok((PyBytes::new(py, &out.stdout).unbind(), out.stderr))
    }
}

/// Checks that `module` compiles to a WASI command module; raises
/// `WasmError` ("invalid" or "no_start") if not.
#[pyfunction]
fn validate_wasm(py: Python<'_>, module: Cow<'_, [u8]>) -> PyResult<()> {
    py.allow_threads(|| wasm::validate(&module)).map_err(wasm_error)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add("WasmError", m.py().get_type::<WasmError>())?;
    m.add("VERSION", fleetmap_protocol::SOFTWARE_VERSION)?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    m.add_function(wrap_pyfunction!(start_local_cluster, m)?)?;
    m.add_function(wrap_pyfunction!(start_coordinator, m)?)?;
    m.add_function(wrap_pyfunction!(start_node, m)?)?;
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_function(wrap_pyfunction!(worker_main, m)?)?;
    m.add_function(wrap_pyfunction!(validate_wasm, m)?)?;
    m.add_class::<LocalHandle>()?;
    m.add_class::<CoordinatorHandle>()?;
    m.add_class::<NodeHandle>()?;
    m.add_class::<Connection>()?;
    m.add_class::<PyJob>()?;
    m.add_class::<PyWasmModule>()?;
    Ok(())
}
