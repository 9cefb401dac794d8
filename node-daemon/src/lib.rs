//! fleetmap's node daemon: joins the coordinator, advertises the node's
//! cores, memory and GPUs, and runs slots. A slot is one worker process
//! started through [`fleetmap_sandbox::spawn_worker`]; it loads the job's
//! function once and then runs chunk after chunk of inputs until the job
//! stops, when the worker is killed.
//!
//! The daemon survives anything its peers send: a malformed frame from the
//! coordinator closes that connection and the daemon reconnects; garbage
//! from a worker fails that slot with a message. Only a refused join token
//! stops it, because retrying cannot help.
//!
//! This crate must not depend on pyo3 or `runtime`: the daemon never runs
//! user code in its own process.

mod cache;
mod environments;
pub mod identity;
mod images;
pub mod inventory;
mod metrics;
mod pool;
mod slot;
pub mod uids;

pub use environments::{packages_environment, EnvironmentConfig};
pub use images::ImageConfig;
pub use pool::WarmPolicy;

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use environments::Environments;
use fleetmap_net::{CloseCode, NetError, Session, SessionError};
use fleetmap_protocol::{
    CoordinatorToNode, FailureKind, Gpu, Hello, InputChunk, JobId, JobSpec, NodeIsolation, NodeToCoordinator,
    Resources, Role, SlotId, DEFAULT_MAX_MESSAGE, SOFTWARE_VERSION,
};
use fleetmap_sandbox::cgroup::CgroupTree;
use identity::Identity;
use images::Images;
use inventory::Inventory;
use slot::{default_program, prestart, run_slot, Pool, SlotContext};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

/// How to run a node daemon.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The coordinator's `host:port`.
    pub coordinator: String,
    /// A coordinator in this process (the embedded cluster's): the node
    /// joins it over a local link instead of QUIC to `coordinator`.
    pub local_coordinator: Option<fleetmap_net::LocalDialer>,
    pub ca_pem: Vec<u8>,
    pub token: String,
    pub name: String,
    /// What the node offers. `cores` is capped by the cores the daemon may
    /// use; GPUs come from the driver's inventory or the operator.
    pub resources: Resources,
    /// The Python interpreter for jobs whose caller's interpreter does not
    /// exist on this node.
    pub python: String,
    pub max_message: usize,
    pub isolation: Isolation,
    /// The most processes a slot may have (`pids.max`).
    pub pids_per_slot: u64,
    /// Run workers as this `(uid, gid)`; `None`: as the daemon's user.
    pub run_as: Option<(u32, u32)>,
    /// A uid of its own for every worker (`--slot-uids`), instead of
    /// `run_as`'s one user for all; environments are still built as
    /// `run_as`.
    pub slot_uids: Option<Arc<uids::SlotUids>>,
    /// Give each worker an empty /tmp of its own (where slots are pinned,
    /// which needs root anyway).
    pub private_tmp: bool,
    /// Give each worker PID and cgroup namespaces of its own, a fresh
    /// `/proc`, a read-only `/sys` and its private `/tmp` (else `/`) as its working
    /// directory (where the daemon manages cgroups, which needs root). The
    /// embedded cluster, whose calls are the caller's own, turns it off.
    pub own_namespaces: bool,
    /// How workers stay warm between jobs of the same principal.
    pub warm: WarmPolicy,
    /// Where and how job environments are built.
    pub environments: EnvironmentConfig,
    /// Where images come from (they are cached in the environments' cache
    /// directory).
    pub images: ImageConfig,
    /// Workers get the daemon's whole environment (the embedded cluster,
    /// whose calls are the caller's own); otherwise only an allowlist of it
    /// and `pass_env`.
    pub inherit_environment: bool,
    /// More variables of the daemon's environment that workers get.
    pub pass_env: Vec<String>,
    /// The most bytes of printed lines one job's calls on this node send
    /// to the caller; later lines are dropped and counted.
    pub printed_limit_bytes: u64,
    /// A call that runs `remote_parallel_map` reaches this node's fleet, as
    /// its job's principal, through the job's credential (the coordinator's
    /// address, its CA and the job's key in the call's environment). The
    /// embedded cluster turns it off: there a nested call runs inside the
    /// calling slot.
    pub fleet_access: bool,
    /// Where the node keeps its key and certificate (`node.key`,
    /// `node.pem`); `None` keeps them in memory (the embedded cluster).
    pub identity_dir: Option<std::path::PathBuf>,
    /// Where operators read the node's Prometheus metrics over HTTP
    /// (`/metrics`); `None`: not served.
    pub http: Option<std::net::SocketAddr>,
}

/// How slots are isolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// Each slot in its own cgroup under `mount` (dedicated cores, a memory
    /// limit, a process limit, device rules), in the daemon's subtree
    /// `subtree` (by default `fleetmap-NODE`). Where the daemon may not
    /// manage cgroups it refuses to start, unless `allow_unisolated`: then it
    /// runs slots pinned to cores only, saying so.
    Cgroups {
        mount: std::path::PathBuf,
        subtree: Option<String>,
        allow_unisolated: bool,
    },
    /// Slots are only pinned to their cores (CPU affinity).
    None,
}

impl NodeConfig {
    pub fn new(coordinator: String, ca_pem: Vec<u8>, token: String) -> Self {
        Self {
            coordinator,
            local_coordinator: None,
            ca_pem,
            token,
            name: default_name(),
            resources: detect_resources(),
            python: "python3".into(),
            max_message: DEFAULT_MAX_MESSAGE,
            isolation: Isolation::Cgroups {
                mount: "/sys/fs/cgroup".into(),
                subtree: None,
                allow_unisolated: false,
            },
            pids_per_slot: 4096,
            run_as: None,
            slot_uids: None,
            private_tmp: true,
            own_namespaces: true,
            warm: WarmPolicy::default(),
            environments: EnvironmentConfig::new(EnvironmentConfig::default_cache_dir()),
            images: ImageConfig::default(),
            inherit_environment: false,
            pass_env: vec![],
            printed_limit_bytes: slot::DEFAULT_PRINTED_LIMIT,
            fleet_access: true,
            identity_dir: None,
            http: None,
        }
    }

    /// The cgroup subtree this daemon owns: one per node name, so that
    /// several daemons on one machine (tests, the embedded cluster) never
    /// clean up each other's slots.
    pub fn cgroup_subtree(&self) -> Option<String> {
        let Isolation::Cgroups { subtree, .. } = &self.isolation else {
            return None;
        };
        Some(subtree.clone().unwrap_or_else(|| {
            let safe: String = self
                .name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("fleetmap-{safe}")
        }))
    }
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("the coordinator refused this node: {0}")]
    Refused(String),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Session(SessionError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(
        "node {node} cannot pin calls to their cores, memory, processes and GPUs: {reason}. Run the daemon as \
         root or in a delegated cgroup (systemd Delegate=yes); or start it with --allow-unisolated to run calls \
         pinned to cores only, without memory, process or device limits"
    )]
    Unisolated { node: String, reason: String },
    #[error(
        "node {node} cannot start a call's process with the confinement it is configured for: {reason}. Check \
         that the daemon runs as root with mount and PID namespaces allowed (not inside a container that forbids \
         them), that --run-as or --slot-uids name users that exist, and that --python runs; or start it with \
         --allow-unisolated to run calls without namespaces of their own"
    )]
    Unconfined { node: String, reason: String },
    #[error("node {node} cannot start the thread that starts workers ahead of jobs: {source}")]
    Prestarter { node: String, source: std::io::Error },
}

impl From<SessionError> for NodeError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Refused(reason) => NodeError::Refused(reason),
            other => NodeError::Session(other),
        }
    }
}

/// How long joining (connecting, TLS and the handshake) may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);

/// This machine's host name.
pub fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

/// The cores this process may run on (its CPU affinity).
pub fn allowed_cpus() -> Vec<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Cpus_allowed_list:"))?;
            fleetmap_sandbox::cgroup::parse_cpu_list(line.split_once(':')?.1.trim()).ok()
        })
        .filter(|cpus| !cpus.is_empty())
        .unwrap_or_else(|| (0..std::thread::available_parallelism().map_or(1, |n| n.get() as u32)).collect())
}

/// The cores, memory and NVIDIA GPUs of this machine.
pub fn detect_resources() -> Resources {
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(1 << 30);
    Resources {
        cores: allowed_cpus().len() as u32,
        memory_bytes,
        gpus: inventory::detect_gpus(Path::new("/proc")),
    }
}

/// GPUs named by the operator (`--gpus 0,1`: device minors), for rigs
/// whose driver inventory is not readable.
pub fn gpus_from_minors(minors: &[u32]) -> Vec<Gpu> {
    minors
        .iter()
        .map(|&minor| Gpu {
            minor,
            uuid: String::new(),
            numa_node: None,
        })
        .collect()
}

/// The cgroup of this process, if it runs inside a fleetmap slot (a
/// component of its cgroup path is one of fleetmap's subtrees), as read
/// from `/proc/self/cgroup`.
pub fn enclosing_slot() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .find(|path| path.split('/').any(|part| part.starts_with("fleetmap-")))
        .map(str::to_string)
}

/// Removes the cgroup subtrees under `mount` named `prefix` + a process id
/// whose process is gone (an embedded cluster's, after its process was
/// killed); returns their names.
pub fn remove_stale_subtrees(mount: &Path, prefix: &str) -> Vec<String> {
    CgroupTree::remove_stale(mount, prefix)
}

/// Runs the daemon: sets up its cgroup subtree (or says plainly that calls
/// will not be pinned), joins the coordinator and serves it, reconnecting
/// with backoff whenever the connection is lost. Returns only when the
/// coordinator refuses the node.
pub async fn run(config: NodeConfig) -> Result<(), NodeError> {
    let (_keep, shutdown) = tokio::sync::watch::channel(false);
    run_until(config, shutdown).await
}

/// Like [`run`], and returns once `shutdown` turns true, after every slot
/// has been torn down (workers killed, cgroups removed).
pub async fn run_until(
    mut config: NodeConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let (cgroups, isolation) = match (&config.isolation, config.cgroup_subtree()) {
        (
            Isolation::Cgroups {
                mount,
                allow_unisolated,
                ..
            },
            Some(subtree),
        ) => match CgroupTree::init(mount, &subtree) {
            Ok(tree) => {
                let isolation = format!(
                    "pinned: cgroup {:?} subtree {subtree} (cores, memory, processes, GPU devices)",
                    tree.version()
                );
                info!("node {}: {isolation}", config.name);
                (Some(Arc::new(tree)), isolation)
            }
            Err(e) if !allow_unisolated => {
                return Err(NodeError::Unisolated {
                    node: config.name.clone(),
                    reason: e.to_string(),
                })
            }
            Err(e) => {
                warn!(
                    "node {}: calls will NOT be pinned to memory limits, process limits or GPUs, only to cores: {e}. \
                     Run the daemon as root or in a delegated cgroup (systemd Delegate=yes) to pin them",
                    config.name
                );
                (None, format!("NOT pinned (CPU affinity only): {e}"))
            }
        },
        _ => (None, "NOT pinned (CPU affinity only): cgroups turned off".to_string()),
    };
    let mut cpus = match &cgroups {
        Some(tree) => tree.cpus().unwrap_or_else(|_| allowed_cpus()),
        None => allowed_cpus(),
    };
    cpus.truncate(config.resources.cores as usize);
    // Fail closed: a node joins only if it can start a call's process with
    // every confinement it is configured for.
    let mut isolation = isolation;
    // Namespaces need root (a daemon in a delegated cgroup as another user
    // keeps its calls in its own).
    if !nix::unistd::geteuid().is_root() {
        config.own_namespaces = false;
    }
    let confines = config.own_namespaces || config.private_tmp || config.run_as.is_some() || config.slot_uids.is_some();
    let probed = match &cgroups {
        Some(tree) if confines => slot::probe_confinement(&config, Some(tree), &cpus).await,
        _ => Ok(()),
    };
    if let Err(e) = probed {
        let allowed = matches!(
            config.isolation,
            Isolation::Cgroups {
                allow_unisolated: true,
                ..
            }
        );
        if !allowed {
            return Err(NodeError::Unconfined {
                node: config.name.clone(),
                reason: e,
            });
        }
        warn!(
            "node {}: calls get no namespaces and no private /tmp of their own (--allow-unisolated): {e}",
            config.name
        );
        config.own_namespaces = false;
        config.private_tmp = false;
        isolation += "; NO namespaces or private /tmp";
    } else if config.own_namespaces && cgroups.is_some() {
        isolation += "; PID and cgroup namespaces, read-only /sys";
    }
    // Whose calls these are, as `fleetmap status` shows it.
    let isolation = match (&config.slot_uids, config.run_as) {
        (Some(uids), _) => format!(
            "{isolation}; calls as a uid of their own each ({}-{}), no capabilities",
            uids.range().start(),
            uids.range().end()
        ),
        (None, run_as) => match run_as {
            Some((uid, gid)) => format!("{isolation}; calls as uid {uid}:{gid}, no capabilities"),
            None if nix::unistd::geteuid().is_root() => format!("{isolation}; calls as ROOT (--allow-root-calls)"),
            None => format!("{isolation}; calls as the daemon's user"),
        },
    };
    config.resources.cores = cpus.len() as u32;
    if config.environments.pythons.is_empty() {
        config.environments.pythons.push(config.python.clone());
    }
    let environments = Arc::new(Environments::new(
        config.environments.clone(),
        config.name.clone(),
        config.run_as,
        cgroups.clone(),
        cpus.clone(),
    ));
    if !config.environments.prepare.is_empty() {
        let environments = environments.clone();
        tokio::spawn(async move { environments.prepare_ahead().await });
    }
    let images = Arc::new(Images::new(
        config.images.clone(),
        &config.environments.cache_dir,
        config.name.clone(),
    ));
    let identity = Identity::load_or_create(config.identity_dir.as_deref())?;
    let config = Arc::new(config);
    let pool = Arc::new(Pool::new(config.warm));
    let prestarter =
        slot::Prestarter::start(config.clone(), cgroups.clone(), cpus.clone(), pool.clone()).map_err(|source| {
            NodeError::Prestarter {
                node: config.name.clone(),
                source,
            }
        })?;
    let node = Node {
        identity,
        environments,
        images,
        pool,
        prestarter: Arc::new(prestarter),
        node_cpus: cpus.clone(),
        inventory: Inventory::new(cpus, config.resources.gpus.clone()),
        cgroups,
        isolation,
        metrics: Arc::default(),
        config,
    };
    let http = match node.config.http {
        Some(addr) => Some(serve_metrics(&node, addr).await?),
        None => None,
    };
    // Workers ready before the first job: the interpreter up, the worker
    // loaded, waiting in their own cgroups.
    prestart(&node.config, node.cgroups.as_deref(), &node.node_cpus, &node.pool);
    let mut backoff = Duration::from_millis(100);
    let result = loop {
        if *shutdown.borrow() {
            break Ok(());
        }
        let ended = session(&node, &mut backoff, &mut shutdown).await;
        if *shutdown.borrow() {
            break Ok(());
        }
        match ended {
            Err(NodeError::Refused(reason)) => break Err(NodeError::Refused(reason)),
            Err(e) => warn!(
                "node {}: connection to {} ended: {e}",
                node.config.name, node.config.coordinator
            ),
            Ok(()) => info!("node {}: coordinator closed the connection", node.config.name),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    };
    // However the daemon stops (asked to, between two connections, or
    // refused), every slot was torn down when its session ended; the warm
    // workers and the subtree go too, so it leaves no process and no cgroup.
    node.prestarter.stop().await;
    for warm in node.pool.close() {
        warm.worker.shut_down().await;
    }
    if let Some(tree) = &node.cgroups {
        if let Err(e) = tree.remove() {
            warn!("node {}: could not remove its cgroup subtree: {e}", node.config.name);
        }
    }
    if let Some(http) = http {
        http.abort();
    }
    info!("node {}: stopped; every slot was torn down", node.config.name);
    result
}

/// Serves the node's metrics on `addr` until the returned task is aborted.
async fn serve_metrics(node: &Node, addr: std::net::SocketAddr) -> Result<JoinHandle<()>, NodeError> {
    let (pool, environments, images) = (node.pool.clone(), node.environments.clone(), node.images.clone());
    let scrape = metrics::Scrape {
        node: node.config.name.clone(),
        metrics: node.metrics.clone(),
        cgroups: node.cgroups.clone(),
        warm_workers: Arc::new(move || pool.len()),
        environments_built: Arc::new(move || environments.built()),
        images_pulled: Arc::new(move || images.pulled()),
    };
    let (addr, task) = fleetmap_net::http::serve_http(addr, metrics::handler(Arc::new(scrape)))
        .await
        .map_err(|e| NodeError::Net(NetError::Io(e)))?;
    info!("node {}: metrics on http://{addr}/metrics", node.config.name);
    Ok(task)
}

/// What lives as long as the daemon.
struct Node {
    config: Arc<NodeConfig>,
    /// Its key and certificate.
    identity: Identity,
    inventory: Inventory,
    cgroups: Option<Arc<CgroupTree>>,
    /// How slots are isolated, as `fleetmap status` shows it.
    isolation: String,
    /// Workers whose jobs finished, warm for the next job of their key,
    /// and workers started ahead of any job.
    pool: Arc<Pool>,
    node_cpus: Vec<u32>,
    prestarter: Arc<slot::Prestarter>,
    environments: Arc<Environments>,
    images: Arc<Images>,
    metrics: Arc<metrics::NodeMetrics>,
}

/// The slots of one job on this node.
#[derive(Default)]
struct JobSlots {
    chunks: HashMap<SlotId, mpsc::UnboundedSender<InputChunk>>,
    tasks: HashMap<SlotId, JoinHandle<()>>,
    /// What the job's calls on this node have printed, against its budget.
    printed: Arc<slot::Printed>,
}

impl JobSlots {
    /// Stops every slot and waits until each is torn down (worker killed,
    /// cgroup removed, cores and GPUs back in the inventory), so that the
    /// next job placed here finds them free.
    async fn stop(mut self) {
        let tasks: Vec<_> = self.tasks.drain().map(|(_, t)| t).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Ends a finished job's slots: each slot's chunk channel closes, and
    /// its idle worker goes back to the pool, warm. A slot that does not end
    /// within a few seconds is stopped like a cancelled one.
    async fn finish(mut self) {
        self.chunks.clear();
        let tasks: Vec<_> = self.tasks.drain().map(|(_, t)| t).collect();
        for mut task in tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
    }

    /// Stops one slot (given back for another job's fair share) the same way.
    async fn stop_slot(&mut self, slot: SlotId) {
        self.chunks.remove(&slot);
        if let Some(task) = self.tasks.remove(&slot) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for JobSlots {
    fn drop(&mut self) {
        // Aborting a slot task drops its worker, which kills the worker's
        // process group and removes its cgroup.
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

async fn session(
    node: &Node,
    backoff: &mut Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let config = &node.config;
    // With a certificate the node proves who it is in the TLS handshake;
    // the join token is only for enrolling.
    let client_identity = node.identity.client();
    let token = match client_identity {
        Some(_) => String::new(),
        None => config.token.clone(),
    };
    let hello = Hello {
        role: Role::Node {
            token,
            public_key: node.identity.public_key(),
            name: config.name.clone(),
            resources: config.resources.clone(),
            isolation: NodeIsolation {
                pinned: node.cgroups.is_some(),
                description: cut_to(&node.isolation, fleetmap_protocol::MAX_ISOLATION_DESCRIPTION),
            },
        },
        software_version: SOFTWARE_VERSION.into(),
    };
    // A stop asked for while the coordinator is unreachable does not wait
    // for the join to time out.
    let dial = async {
        match &config.local_coordinator {
            Some(dialer) => {
                fleetmap_net::dial_local(
                    dialer,
                    &config.coordinator,
                    client_identity.as_ref(),
                    &hello,
                    config.max_message,
                    JOIN_TIMEOUT,
                )
                .await
            }
            None => {
                fleetmap_net::dial_as(
                    &config.coordinator,
                    &config.ca_pem,
                    client_identity.as_ref(),
                    &hello,
                    config.max_message,
                    JOIN_TIMEOUT,
                )
                .await
            }
        }
    };
    let dialled = tokio::select! {
        dialled = dial => dialled,
        _ = shutdown.changed() => return Ok(()),
    };
    let session: Session<NodeToCoordinator, CoordinatorToNode> = match dialled {
        Err(SessionError::Tls(reason)) if client_identity.is_some() && !config.token.is_empty() => {
            // Expired, or from a coordinator whose state was reset.
            warn!(
                "node {}: the coordinator's TLS handshake refused this node's certificate ({reason}); \
                 enrolling again with the join token",
                config.name
            );
            node.identity.forget_certificate();
            return Err(NodeError::Session(SessionError::Tls(reason)));
        }
        other => other?,
    };
    if let Some(pem) = &session.node_certificate {
        node.identity.store(pem.clone())?;
        info!("node {}: the coordinator issued this node a certificate", config.name);
    }
    let Session {
        conn,
        tx: up,
        rx: mut reader,
        remote: addr,
        writer,
        endpoint: _endpoint,
        ..
    } = session;
    info!("node {} joined the coordinator at {addr}", config.name);
    *backoff = Duration::from_millis(100);
    let mut jobs: HashMap<JobId, JobSlots> = HashMap::new();
    let result = loop {
        let received = tokio::select! {
            received = reader.recv() => received,
            _ = shutdown.changed() => {
                CloseCode::Done.close(&conn, "node daemon stopping");
                break Ok(());
            }
        };
        let msg = match received {
            Ok(Some(msg)) => msg,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.into()),
        };
        match msg {
            CoordinatorToNode::StartSlots { job, spec, slots } => {
                let spec: Arc<JobSpec> = Arc::from(spec);
                let entry = jobs.entry(job).or_default();
                for slot in slots {
                    let placement = node
                        .inventory
                        .take(spec.call.cores, spec.call.gpus, inventory::cpus_of_numa);
                    let Some(placement) = placement else {
                        // The coordinator places no more than the node
                        // advertised; this is a disagreement, not user error.
                        let reason = format!(
                            "node {} has no free cores or GPUs left for slot {slot} ({} cores, {} GPUs asked)",
                            config.name, spec.call.cores, spec.call.gpus
                        );
                        let kind = FailureKind::Job;
                        let _ = up.send(NodeToCoordinator::SlotFailed {
                            job,
                            slot,
                            kind,
                            reason,
                        });
                        continue;
                    };
                    let (tx, rx) = mpsc::unbounded_channel();
                    entry.chunks.insert(slot, tx);
                    let ctx = SlotContext {
                        job,
                        slot,
                        spec: spec.clone(),
                        config: config.clone(),
                        cgroups: node.cgroups.clone(),
                        placement,
                        up: up.clone(),
                        pool: node.pool.clone(),
                        prestarter: node.prestarter.clone(),
                        environments: node.environments.clone(),
                        program: default_program(&spec, config),
                        lease: None,
                        sources: None,
                        images: node.images.clone(),
                        image: None,
                        printed: entry.printed.clone(),
                        metrics: node.metrics.clone(),
                    };
                    entry.tasks.insert(slot, tokio::spawn(run_slot(ctx, rx)));
                }
            }
            CoordinatorToNode::RunChunk { job, slot, chunk } => {
                if let Some(tx) = jobs.get(&job).and_then(|j| j.chunks.get(&slot)) {
                    let _ = tx.send(chunk);
                }
            }
            CoordinatorToNode::StopJob { job, finished } => {
                if let Some(slots) = jobs.remove(&job) {
                    if finished {
                        slots.finish().await;
                    } else {
                        slots.stop().await;
                    }
                }
            }
            CoordinatorToNode::StopSlot { job, slot } => {
                if let Some(slots) = jobs.get_mut(&job) {
                    slots.stop_slot(slot).await;
                }
            }
            CoordinatorToNode::Certificate { pem } => match node.identity.store(pem) {
                Ok(()) => info!("node {}: stored its renewed certificate", config.name),
                Err(e) => warn!("node {}: could not store its renewed certificate: {e}", config.name),
            },
        }
    };
    // Slots do not outlive the connection: the coordinator re-runs their
    // chunks elsewhere once it notices the node is gone.
    for (_, slots) in jobs.drain() {
        slots.stop().await;
    }
    drop(up);
    writer.abort();
    result
}

/// `text`, cut at a character boundary to at most `limit` bytes.
fn cut_to(text: &str, limit: usize) -> String {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
