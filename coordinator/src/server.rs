//! The coordinator's async shell: accepts QUIC connections (and local
//! links from peers in its own process, [`RunningCoordinator::local_dialer`]), authenticates
//! each peer from its `Hello`, and moves messages between the connections
//! and the [`Scheduler`]. It makes no decisions of its own.
//!
//! Every connection carries one bidirectional stream of frames, opened by
//! the peer. Anything a peer sends that is not a valid message for its role
//! closes that peer's connection with the reason; the coordinator carries on.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use fleetmap_net::{
    accept_hello, local_listener, CloseCode, Link, LocalDialer, LocalListener, NetError, Outbox, Receiver, SessionError,
};
use fleetmap_protocol::{
    max_payload, ClientId, ClientToCoordinator, CoordinatorToClient, CoordinatorToNode, JobId, LogLine, NodeId,
    NodeToCoordinator, OutputStream, Resources, Role, WireSize, DEFAULT_MAX_MESSAGE, SOFTWARE_VERSION,
};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

mod operator;

use crate::{
    credentials::{secrets_match, Credentials},
    keys::{KeyStore, Principal, Quota},
    metrics::ShellMetrics,
    nodes::{Issued, NodeCa, NodeIdentityError, NodeRegistry, DEFAULT_NODE_CERT_VALIDITY},
    results::ResultStore,
    scheduler::{Command, Grace, Scheduler, Store},
};

/// How long a new connection has to open its stream and say `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How much a peer may make the coordinator hold for it, and how many peers
/// may be at the door at once.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once, authenticated or not.
    pub max_connections: usize,
    /// Connections still in their handshake (TLS, then `Hello`) at once.
    pub max_handshakes: usize,
    /// Connections in their handshake from one IP address at once.
    pub max_handshakes_per_address: usize,
    /// Handshakes in progress above which a new address must first prove
    /// it receives at its address (a QUIC retry) before it costs anything.
    pub retry_above: usize,
    /// Bytes waiting for a client above which its printed lines are
    /// dropped (and counted, and the count told to it once it reads again).
    pub client_log_backlog: usize,
    /// Bytes waiting for a client above which its jobs get no more credit
    /// until it reads them down to half.
    pub client_slow_backlog: usize,
    /// Bytes waiting for a client above which it is disconnected.
    pub client_max_backlog: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_handshakes: 256,
            max_handshakes_per_address: 16,
            retry_above: 32,
            client_log_backlog: 8 << 20,
            client_slow_backlog: 64 << 20,
            client_max_backlog: 2 << 30,
        }
    }
}

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub credentials: Credentials,
    /// The API keys clients may present; by default only the credentials'
    /// own key, as principal `default`.
    pub keys: Arc<KeyStore>,
    /// The fleet's nodes: their certificates, and which are revoked; by
    /// default kept in memory.
    pub nodes: Arc<NodeRegistry>,
    /// How long a node certificate is valid.
    pub node_cert_validity: Duration,
    /// The most a node may offer: what it advertises beyond is not used.
    pub node_limit: NodeLimit,
    /// A node enrolling with the join token waits until the operator
    /// approves it (`fleetmap nodes approve NAME`).
    pub approve_nodes: bool,
    pub max_message: usize,
    pub limits: Limits,
    /// How long jobs wait for vanished nodes and clients
    /// ([`Grace::FLEET`] by default).
    pub grace: Grace,
    /// Where operators read metrics over HTTP (`/metrics`); `None`: not
    /// served.
    pub http: Option<SocketAddr>,
    /// Where detached jobs' outputs are kept (emptied at start), and the
    /// most one job may keep; `None`: detached jobs are refused.
    pub results: Option<(std::path::PathBuf, u64)>,
}

/// Caps on what one node may advertise (`None`: no cap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeLimit {
    pub cores: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub gpus: Option<u32>,
}

impl NodeLimit {
    /// `resources` within the caps; whether anything was cut.
    fn apply(&self, resources: &mut Resources) -> bool {
        let before = resources.clone();
        if let Some(cores) = self.cores {
            resources.cores = resources.cores.min(cores);
        }
        if let Some(memory) = self.memory_bytes {
            resources.memory_bytes = resources.memory_bytes.min(memory);
        }
        if let Some(gpus) = self.gpus {
            resources.gpus.truncate(gpus as usize);
        }
        *resources != before
    }
}

impl CoordinatorConfig {
    pub fn new(listen: SocketAddr, credentials: Credentials) -> Self {
        Self {
            listen,
            keys: Arc::new(KeyStore::single(&credentials.api_key)),
            nodes: Arc::new(NodeRegistry::in_memory()),
            node_cert_validity: DEFAULT_NODE_CERT_VALIDITY,
            node_limit: NodeLimit::default(),
            approve_nodes: false,
            credentials,
            max_message: DEFAULT_MAX_MESSAGE,
            limits: Limits::default(),
            grace: Grace::FLEET,
            http: None,
            results: None,
        }
    }
}

/// A connected client as the shell sees it.
struct ClientPeer {
    outbox: Outbox<CoordinatorToClient>,
    conn: Link,
    /// Printed lines dropped per job while the client read too slowly.
    dropped: BTreeMap<JobId, u64>,
}

/// A connected node as the shell sees it.
struct NodePeer {
    outbox: Outbox<CoordinatorToNode>,
    conn: Link,
    name: String,
    /// Its public key, certified again when its certificate is renewed.
    public_key: Vec<u8>,
    /// The fingerprint of the certificate it holds now (`None`: the
    /// registry is not consulted, as where the node has none).
    fingerprint: Option<String>,
}

struct Core {
    scheduler: Scheduler,
    nodes: HashMap<NodeId, NodePeer>,
    clients: HashMap<ClientId, ClientPeer>,
    /// Ids for nodes and clients; the two live in separate, typed maps.
    next_peer: u64,
}

impl Core {
    fn next_id(&mut self) -> u64 {
        self.next_peer += 1;
        self.next_peer
    }

    /// Delivers what the scheduler wants sent. A peer that has gone is
    /// skipped: its loss is an event of its own.
    fn route(&mut self, limits: &Limits, metrics: &ShellMetrics, results: Option<&ResultStore>) {
        while let Some(cmd) = self.scheduler.poll_command() {
            match cmd {
                Command::Store(store) => match (store, results) {
                    (Store::Begin { job, principal }, Some(results)) => results.begin(job, &principal),
                    (Store::Keep { job, output }, Some(results)) => {
                        if let Err(reason) = results.append(job, &output) {
                            self.scheduler.fail_detached(job, reason);
                        }
                    }
                    (Store::Forget { job }, Some(results)) => results.forget(job),
                    // No store, no detached job: the shell refuses them.
                    (_, None) => {}
                },
                Command::ToNode { node, msg } => {
                    match &msg {
                        CoordinatorToNode::RunChunk { job, chunk, .. } => metrics.dispatched(node, *job, chunk.chunk),
                        CoordinatorToNode::StopJob { job, .. } => metrics.forget(node, Some(*job)),
                        _ => {}
                    }
                    if let Some(peer) = self.nodes.get(&node) {
                        let _ = peer.outbox.send(msg);
                    }
                }
                Command::ToClient { client, msg } => {
                    if let Some(peer) = self.clients.get_mut(&client) {
                        if peer.deliver(msg, limits) {
                            self.scheduler.handle_client_backlog(client, true);
                        }
                    }
                }
            }
        }
    }
}

impl ClientPeer {
    /// Queues `msg` for the client within its budget; returns whether the
    /// client has just gone over its slow backlog (its jobs' credit stops).
    fn deliver(&mut self, msg: CoordinatorToClient, limits: &Limits) -> bool {
        let queued = self.outbox.queued_bytes();
        match &msg {
            CoordinatorToClient::Log(line) if queued + msg.wire_size() > limits.client_log_backlog => {
                *self.dropped.entry(line.job).or_default() += 1;
                return false;
            }
            // Before any output too: a caller that has every output stops
            // reading without waiting for the end of the job.
            CoordinatorToClient::Log(LogLine { job, .. })
            | CoordinatorToClient::Output { job, .. }
            | CoordinatorToClient::JobFinished { job }
            | CoordinatorToClient::JobFailed { job, .. } => {
                if let Some(n) = self.dropped.remove(job) {
                    let _ = self.outbox.send(CoordinatorToClient::Log(LogLine {
                        job: *job,
                        stream: OutputStream::Stderr,
                        node: "coordinator".into(),
                        text: format!(
                            "[fleetmap] {n} printed lines of this job were dropped: the caller read them more \
                             slowly than the job printed them"
                        ),
                    }));
                }
            }
            _ => {}
        }
        let _ = self.outbox.send(msg);
        let queued = self.outbox.queued_bytes();
        if queued > limits.client_max_backlog {
            CloseCode::Protocol.close(
                &self.conn,
                &format!(
                    "the client left {} MiB unread, over the coordinator's limit of {} MiB per client",
                    queued >> 20,
                    limits.client_max_backlog >> 20
                ),
            );
        }
        queued > limits.client_slow_backlog
    }
}

struct Shared {
    core: Mutex<Core>,
    credentials: Credentials,
    keys: Arc<KeyStore>,
    nodes: Arc<NodeRegistry>,
    node_ca: NodeCa,
    /// What an operator may change while the coordinator runs
    /// (`RunningCoordinator::apply`).
    live: std::sync::RwLock<LiveSettings>,
    max_message: usize,
    limits: Limits,
    doors: Mutex<Doors>,
    metrics: ShellMetrics,
    /// Detached jobs' outputs; `None`: detached jobs are refused.
    results: Option<Arc<ResultStore>>,
}

/// The settings a running coordinator takes on without a restart (a
/// `fleetmapd` reload); the rest (address, state) need one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveSettings {
    pub node_limit: NodeLimit,
    pub approve_nodes: bool,
    /// How long jobs wait for vanished nodes and clients.
    pub grace: Grace,
}

impl Shared {
    /// Runs `f` on the scheduler and delivers what it produced.
    fn with<R>(&self, f: impl FnOnce(&mut Scheduler) -> R) -> R {
        let mut core = self.lock();
        let r = f(&mut core.scheduler);
        core.route(&self.limits, &self.metrics, self.results.as_deref());
        r
    }

    fn live(&self) -> LiveSettings {
        *self.live.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Core> {
        // A poisoned lock means a panic in the scheduler, a bug: stopping
        // every connection task by propagating it is the only safe outcome.
        self.core.lock().expect("scheduler lock poisoned")
    }
}

/// Who is at the door: connections open, and those still in their
/// handshake, in total and per address.
#[derive(Default)]
struct Doors {
    open: usize,
    handshaking: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// What a connection holds at the door while it lives; dropping it lets
/// the next one in.
struct Admission {
    shared: Arc<Shared>,
    /// Where a QUIC connection comes from; `None` for a local link.
    address: Option<IpAddr>,
    handshaking: bool,
}

impl Admission {
    /// The handshake is over (authenticated, or about to be closed).
    fn authenticated(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            let mut doors = self.shared.doors();
            doors.leave_handshake(self.address);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut doors = self.shared.doors();
        if self.handshaking {
            doors.leave_handshake(self.address);
        }
        doors.open -= 1;
    }
}

impl Doors {
    fn leave_handshake(&mut self, address: Option<IpAddr>) {
        self.handshaking -= 1;
        let Some(address) = address else {
            return;
        };
        if let Some(n) = self.per_address.get_mut(&address) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&address);
            }
        }
    }
}

/// What to do with a connection attempt.
enum Door {
    /// Counted at the door already, under the same lock as the check: a
    /// burst of attempts cannot all pass before any is counted.
    Admit(Admission),
    Retry,
    Refuse,
}

impl Shared {
    /// How many bytes wait in `client`'s queue.
    fn client_backlog(&self, client: ClientId) -> usize {
        self.lock()
            .clients
            .get(&client)
            .map_or(0, |peer| peer.outbox.queued_bytes())
    }

    fn doors(&self) -> std::sync::MutexGuard<'_, Doors> {
        self.doors.lock().expect("door lock poisoned")
    }

    fn door_for(self: &Arc<Self>, incoming: &quinn::Incoming) -> Door {
        self.door_at(incoming.remote_address().ip(), incoming.remote_address_validated())
    }

    /// The door for a local link: only the limit on open connections
    /// applies.
    fn local_door(self: &Arc<Self>) -> Option<Admission> {
        let mut doors = self.doors();
        if doors.open >= self.limits.max_connections {
            return None;
        }
        doors.open += 1;
        doors.handshaking += 1;
        Some(Admission {
            shared: self.clone(),
            address: None,
            handshaking: true,
        })
    }

    /// The door for a connection from `address`; `validated`: the peer has
    /// shown it receives there.
    fn door_at(self: &Arc<Self>, address: IpAddr, validated: bool) -> Door {
        let mut doors = self.doors();
        let limits = &self.limits;
        let from_address = doors.per_address.get(&address).copied().unwrap_or(0);
        if doors.open >= limits.max_connections
            || doors.handshaking >= limits.max_handshakes
            || from_address >= limits.max_handshakes_per_address
        {
            Door::Refuse
        } else if doors.handshaking >= limits.retry_above && !validated {
            Door::Retry
        } else {
            doors.open += 1;
            doors.handshaking += 1;
            *doors.per_address.entry(address).or_default() += 1;
            Door::Admit(Admission {
                shared: self.clone(),
                address: Some(address),
                handshaking: true,
            })
        }
    }
}

/// A coordinator serving in the background of the current tokio runtime.
pub struct RunningCoordinator {
    pub local_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    accept: JoinHandle<()>,
    /// Opens local links to this coordinator, for peers in its process.
    local: LocalDialer,
    local_accept: JoinHandle<()>,
    /// The local links open, closed at shutdown as the endpoint closes
    /// its connections.
    local_links: Arc<Mutex<Vec<Link>>>,
    /// The ticker that releases backlogged clients and sweeps revoked nodes.
    ticker: JoinHandle<()>,
    /// The operators' HTTP address and its server, where served.
    pub http_addr: Option<SocketAddr>,
    http: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl RunningCoordinator {
    pub fn node_count(&self) -> usize {
        self.shared.with(|s| s.node_count())
    }

    pub fn job_count(&self) -> usize {
        self.shared.with(|s| s.job_count())
    }

    /// The registry of the fleet's nodes (revoking one there disconnects
    /// it within a second).
    pub fn node_registry(&self) -> Arc<NodeRegistry> {
        self.shared.nodes.clone()
    }

    /// Takes on `settings` from now on: nodes that join later are held for
    /// approval and capped by them (nodes already joined keep what they
    /// were admitted with); jobs that wait for a node or their client wait
    /// as long as the new grace periods say, counted from when they began
    /// to wait.
    pub fn apply(&self, settings: LiveSettings) {
        *self
            .shared
            .live
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = settings;
        self.shared.with(|s| s.set_grace(settings.grace));
    }

    /// Opens local links to this coordinator: a client or node in this
    /// process that dials through it skips QUIC and TLS (see
    /// [`fleetmap_net::link`]) and is otherwise served as any other peer.
    pub fn local_dialer(&self) -> LocalDialer {
        self.local.clone()
    }

    /// Waits until at least `n` nodes have joined, up to `timeout`.
    pub async fn wait_for_nodes(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.node_count() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// Closes every connection and stops accepting.
    pub async fn shutdown(mut self) {
        self.endpoint
            .close(CloseCode::Done.code(), b"coordinator shutting down");
        self.accept.abort();
        self.local_accept.abort();
        // Its listener is gone once the task is: no local link is taken
        // after this.
        let _ = (&mut self.local_accept).await;
        for link in std::mem::take(&mut *lock_links(&self.local_links)) {
            CloseCode::Done.close(&link, "coordinator shutting down");
        }
        self.ticker.abort();
        if let Some(http) = &self.http {
            http.abort();
        }
        // Give peers a moment to see the close; a dead peer never answers.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Binds the coordinator's endpoint and serves until shut down.
pub async fn serve(config: CoordinatorConfig) -> Result<RunningCoordinator, NetError> {
    let creds = &config.credentials;
    let endpoint = fleetmap_net::server_endpoint_verifying(
        config.listen,
        creds.cert_pem.as_bytes(),
        creds.key_pem.as_bytes(),
        Some(creds.node_ca_pem.as_bytes()),
    )?;
    let node_ca = NodeCa::new(creds, config.node_cert_validity)
        .map_err(|e| NetError::Tls(format!("the node CA in the credentials: {e}")))?;
    let local_addr = endpoint.local_addr()?;
    // Peers in this process: their certificates checked as TLS checks them.
    let (local, listener) = local_listener(Some(creds.node_ca_pem.as_bytes()))?;
    let results = match config.results {
        Some((dir, max_bytes)) => Some(Arc::new(ResultStore::open(dir, max_bytes)?)),
        None => None,
    };
    let shared = Arc::new(Shared {
        core: Mutex::new(Core {
            scheduler: {
                let mut scheduler = Scheduler::with_max_payload(max_payload(config.max_message));
                scheduler.set_grace(config.grace);
                scheduler
            },
            nodes: HashMap::new(),
            clients: HashMap::new(),
            next_peer: 0,
        }),
        credentials: config.credentials,
        keys: config.keys,
        nodes: config.nodes,
        node_ca,
        live: std::sync::RwLock::new(LiveSettings {
            node_limit: config.node_limit,
            approve_nodes: config.approve_nodes,
            grace: config.grace,
        }),
        max_message: config.max_message,
        limits: config.limits,
        doors: Mutex::new(Doors::default()),
        metrics: ShellMetrics::default(),
        results,
    });
    let (http_addr, http) = match config.http {
        Some(addr) => {
            let (addr, task) = fleetmap_net::http::serve_http(addr, operator::handler(shared.clone())).await?;
            info!("coordinator: metrics on http://{addr}/metrics, the dashboard on http://{addr}/");
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
    let local_links = Arc::new(Mutex::new(Vec::new()));
    let local_accept = tokio::spawn(local_accept_loop(listener, shared.clone(), local_links.clone()));
    let ticker = tokio::spawn(release_backlogged_clients(shared.clone()));
    info!("coordinator listening on {local_addr}");
    Ok(RunningCoordinator {
        local_addr,
        endpoint,
        accept,
        local,
        local_accept,
        local_links,
        ticker,
        http_addr,
        http,
        shared,
    })
}

/// How often clients held back for reading slowly are looked at again.
const BACKLOG_CHECK: Duration = Duration::from_millis(20);

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        match shared.door_for(&incoming) {
            // Nothing about the peer is logged: it has proved nothing yet.
            Door::Refuse => incoming.refuse(),
            Door::Retry => {
                let _ = incoming.retry();
            }
            Door::Admit(admission) => {
                tokio::spawn(serve_connection(incoming, shared.clone(), admission));
            }
        }
    }
}

fn lock_links(links: &Mutex<Vec<Link>>) -> std::sync::MutexGuard<'_, Vec<Link>> {
    links.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves the local links peers in this process dial: counted at the door
/// with QUIC connections (though not against any address's handshakes: no
/// stranger dials them), with the same handshake and the same limits.
async fn local_accept_loop(mut listener: LocalListener, shared: Arc<Shared>, links: Arc<Mutex<Vec<Link>>>) {
    while let Some(link) = listener.accept().await {
        match shared.local_door() {
            Some(admission) => {
                {
                    let mut links = lock_links(&links);
                    links.retain(|l| !l.is_closed());
                    links.push(link.clone());
                }
                tokio::spawn(serve_link(link, shared.clone(), admission));
            }
            // Busy, not refused: the peer tries again, as it does when a
            // QUIC connection is turned away at the door.
            None => CloseCode::Done.close(
                &link,
                &format!(
                    "the coordinator has {} connections open, its limit; try again later",
                    shared.limits.max_connections
                ),
            ),
        }
    }
}

/// Gives credit back to clients that have read their backlog down to half
/// of the slow limit.
async fn release_backlogged_clients(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(BACKLOG_CHECK);
    let mut ticks = 0u64;
    let started = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        ticks += 1;
        if ticks.is_multiple_of(REVOCATION_CHECK_TICKS) {
            // Deadlines: jobs waiting for a vanished client or node.
            shared.with(|s| s.handle_tick(started.elapsed()));
            // The registry is a file: read and written off the runtime's
            // threads.
            let shared = shared.clone();
            let _ = tokio::task::spawn_blocking(move || check_node_certificates(&shared)).await;
        }
        let half = shared.limits.client_slow_backlog / 2;
        let mut core = shared.lock();
        let drained: Vec<ClientId> = core
            .clients
            .iter()
            .filter(|(_, peer)| peer.outbox.queued_bytes() <= half)
            .map(|(&id, _)| id)
            .collect();
        for client in drained {
            core.scheduler.handle_client_backlog(client, false);
        }
        core.route(&shared.limits, &shared.metrics, shared.results.as_deref());
    }
}

/// Every this many backlog checks (half a second), connected nodes are
/// checked against the registry: a node revoked meanwhile is disconnected,
/// and one whose certificate has entered the last third of its life gets a
/// new one.
const REVOCATION_CHECK_TICKS: u64 = 25;

fn check_node_certificates(shared: &Shared) {
    let entries = match shared.nodes.list() {
        Ok(entries) => entries,
        Err(e) => {
            warn!("nodes: {e}");
            return;
        }
    };
    let now = crate::statefile::now();
    let mut due = Vec::new();
    {
        let core = shared.lock();
        for (&id, peer) in &core.nodes {
            let Some(entry) = entries.iter().find(|e| e.name == peer.name) else {
                continue;
            };
            if entry.revoked.is_some() {
                CloseCode::Refused.close(
                    &peer.conn,
                    &format!("node {} was revoked (fleetmap nodes revoke)", peer.name),
                );
            } else if peer.fingerprint.is_some()
                && entry.fingerprint == peer.fingerprint
                && now >= renew_after(shared, entry.expires)
            {
                // One renewal per name per sweep, whatever connections
                // (a dead one not yet timed out) still carry it.
                if !due.iter().any(|(_, name, _, _)| name == &peer.name) {
                    due.push((id, peer.name.clone(), peer.public_key.clone(), peer.fingerprint.clone()));
                }
            }
        }
    }
    // A node that stays connected for weeks is renewed where it is, so
    // that it never has to fall back on the join token (which it may no
    // longer have). The registry is written without the core's lock.
    for (id, name, public_key, held) in due {
        let issued = match shared.node_ca.certify(&name, &public_key) {
            Ok(issued) => issued,
            Err(e) => {
                warn!("node {name}: could not renew its certificate: {e}");
                continue;
            }
        };
        match shared.nodes.record(&name, &issued, held.as_deref()) {
            Ok(true) => {}
            // Renewed meanwhile (at a handshake), revoked or approved anew.
            Ok(false) => continue,
            Err(e) => {
                warn!("node {name}: could not record its renewed certificate: {e}");
                continue;
            }
        }
        info!(
            "node {name}: renewed its certificate on its open connection, valid until {} (Unix time), SHA-256 {}",
            issued.expires, issued.fingerprint
        );
        let mut core = shared.lock();
        if let Some(peer) = core.nodes.get_mut(&id) {
            peer.fingerprint = Some(issued.fingerprint);
            let _ = peer.outbox.send(CoordinatorToNode::Certificate { pem: issued.pem });
        }
    }
}

/// When a certificate that expires at `expires` is renewed: in the last
/// third of its life.
fn renew_after(shared: &Shared, expires: Option<u64>) -> u64 {
    expires
        .unwrap_or(0)
        .saturating_sub(shared.node_ca.validity().as_secs() / 3)
}

/// Why a node is not admitted.
enum NotAdmitted {
    Refused(String),
    /// Waiting for the operator's approval.
    Pending(String),
}

impl From<String> for NotAdmitted {
    fn from(reason: String) -> Self {
        NotAdmitted::Refused(reason)
    }
}

/// What the coordinator makes of a node's credentials: the certificate to
/// issue it (on enrollment or renewal), or why it is not admitted.
fn admit_node(
    shared: &Shared,
    conn: &Link,
    name: &str,
    token: &str,
    public_key: &[u8],
) -> Result<Option<Issued>, NotAdmitted> {
    let registry_error = |e: NodeIdentityError| format!("the coordinator cannot read its node registry: {e}");
    let entry = shared.nodes.entry(name).map_err(registry_error)?;
    if entry.as_ref().is_some_and(|e| e.revoked.is_some()) {
        return Err(format!(
            "node {name:?} was revoked (fleetmap nodes revoke); it may not join, with its certificate or the join \
             token, unless the operator approves it again (fleetmap nodes approve)"
        )
        .into());
    }
    let issue = |held: Option<&str>| {
        let issued = shared.node_ca.certify(name, public_key).map_err(|e| e.to_string())?;
        // A renewal raced by another (a second connection of the node, the
        // open-connection sweep) is not handed out: the node keeps the
        // certificate it has, which the registry still accepts.
        let recorded = shared.nodes.record(name, &issued, held).map_err(registry_error)?;
        Ok(recorded.then_some(issued))
    };
    match conn.peer_certificate() {
        Some(der) => {
            // Signed by the node CA and within its validity (the TLS
            // handshake checked both); the registry says whose it is: its
            // current one, or the one it renewed if the renewal never
            // reached it (then it is renewed again).
            let fingerprint = crate::nodes::fingerprint(&der);
            let presented = Some(fingerprint.as_str());
            if entry.as_ref().is_some_and(|e| e.previous.as_deref() == presented) {
                info!("node {name:?} presented the certificate it renewed: renewing it again");
                return issue(presented);
            }
            let current = entry.filter(|e| e.fingerprint.as_deref() == presented);
            let Some(current) = current else {
                return Err(NotAdmitted::Refused(format!(
                    "the certificate node {name:?} presented is not its current one (superseded, or issued \
                     for another node); remove the node's certificate (node.pem in its --state-dir) to \
                     enroll again with the join token"
                )));
            };
            if current.previous.is_some() {
                shared.nodes.confirm(name).map_err(registry_error)?;
            }
            if crate::statefile::now() >= renew_after(shared, current.expires) {
                issue(presented)
            } else {
                Ok(None)
            }
        }
        None if !secrets_match(token, &shared.credentials.join_token) => Err(NotAdmitted::Refused(format!(
            "node {name:?} presented neither a certificate of this fleet nor the join token it accepts; \
             use the token from the coordinator's join-token file"
        ))),
        // The token does not take over a name that holds a valid
        // certificate: enrolling it anew (a new machine, a lost
        // --state-dir) is the operator's decision.
        None if entry
            .as_ref()
            .is_some_and(|e| e.fingerprint.is_some() && e.expires.is_some_and(|t| t > crate::statefile::now())) =>
        {
            shared.nodes.request(name).map_err(registry_error)?;
            Err(NotAdmitted::Pending(format!(
                "node {name:?} holds a valid certificate of this fleet, and the join token asks to enroll it \
                 again (a new machine, or a lost --state-dir): run `fleetmap nodes approve {name}` on the \
                 coordinator's machine to retire the old certificate and let it enroll; the node keeps trying"
            )))
        }
        None if shared.live().approve_nodes && entry.is_none_or(|e| e.approved.is_none()) => {
            shared.nodes.request(name).map_err(registry_error)?;
            Err(NotAdmitted::Pending(format!(
                "node {name:?} waits for the operator's approval: run `fleetmap nodes approve {name}` on the \
                 coordinator's machine; the node keeps trying"
            )))
        }
        None => issue(None),
    }
}

/// [`admit_node`] on the blocking pool: the registry is a file (read, and
/// written on enrollment and renewal), kept off the runtime's threads.
async fn admit_node_off_thread(
    shared: &Arc<Shared>,
    conn: &Link,
    name: &str,
    token: &str,
    public_key: &[u8],
) -> Result<Option<Issued>, NotAdmitted> {
    let (shared, conn) = (shared.clone(), conn.clone());
    let (name, token, public_key) = (name.to_string(), token.to_string(), public_key.to_vec());
    tokio::task::spawn_blocking(move || admit_node(&shared, &conn, &name, &token, &public_key))
        .await
        .unwrap_or_else(|e| Err(NotAdmitted::Refused(format!("the coordinator could not check it: {e}"))))
}

async fn serve_connection(incoming: quinn::Incoming, shared: Arc<Shared>, admission: Admission) {
    let remote = incoming.remote_address();
    match incoming.await {
        Ok(conn) => serve_link(Link::Quic(conn), shared, admission).await,
        Err(e) => debug!("{remote}: handshake failed: {e}"),
    }
}

/// Serves one peer's connection to its end.
async fn serve_link(conn: Link, shared: Arc<Shared>, mut admission: Admission) {
    /// Closes the connection however serving it ends (a panic, an abort),
    /// so that its peer never waits on a connection nothing serves; the
    /// first close stands, so an explicit one below is what the peer sees.
    struct CloseWhenDone(Link);
    impl Drop for CloseWhenDone {
        fn drop(&mut self) {
            CloseCode::Done.close(&self.0, "");
        }
    }
    let _closer = CloseWhenDone(conn.clone());
    let remote = conn.peer();
    match serve_peer(&conn, &shared, &mut admission).await {
        Ok(()) => CloseCode::Done.close(&conn, ""),
        // The refusal was sent and the connection closed with it.
        Err(SessionError::Refused(reason)) => warn!("{remote}: refused: {reason}"),
        Err(e) => {
            warn!("{remote}: {e}");
            CloseCode::Protocol.close(&conn, &e.to_string());
        }
    }
}

/// The connection window a peer gets once it has authenticated; before,
/// it may send no more than [`fleetmap_net::HANDSHAKE_RECEIVE_WINDOW`].
const RECEIVE_WINDOW: u32 = 64 << 20;

async fn serve_peer(conn: &Link, shared: &Arc<Shared>, admission: &mut Admission) -> Result<(), SessionError> {
    let Some(handshake) = accept_hello(conn, HANDSHAKE_TIMEOUT).await? else {
        return Ok(());
    };
    let mut principal = None;
    let mut certificate: Option<Issued> = None;
    let refusal = match handshake.hello.check() {
        Err(reason) => Some(format!("bad Hello: {reason}")),
        Ok(()) => match &handshake.hello.role {
            // The name is the peer's word: it is bounded by `check`, and
            // logged only quoted.
            Role::Node {
                token,
                name,
                public_key,
                ..
            } => match admit_node_off_thread(shared, conn, name, token, public_key).await {
                Ok(issued) => {
                    certificate = issued;
                    None
                }
                Err(NotAdmitted::Refused(reason)) => Some(reason),
                Err(NotAdmitted::Pending(reason)) => {
                    admission.authenticated();
                    info!("{reason}");
                    handshake.hold(&reason).await;
                    return Err(SessionError::Pending(reason));
                }
            },
            Role::Client { api_key } => {
                principal = shared.caller(api_key);
                principal.is_none().then(|| {
                    "the coordinator does not accept this API key (unknown or revoked, or the credential \
                     of a job that has ended); set FLEETMAP_API_KEY (or api_key=) to a key from \
                     `fleetmap keys create NAME` or the coordinator's api-key file"
                        .to_string()
                })
            }
        },
    };
    admission.authenticated();
    if let Some(reason) = refusal {
        handshake.refuse(&reason).await;
        return Err(SessionError::Refused(reason));
    }
    conn.set_receive_window(RECEIVE_WINDOW);
    // Only an authenticated peer's version string is logged (and cut short).
    let version = &handshake.hello.software_version;
    if version != SOFTWARE_VERSION {
        let version: String = version.chars().take(40).collect();
        warn!(
            "{} runs fleetmap {version:?}, this coordinator runs {SOFTWARE_VERSION}",
            handshake.remote
        );
    }
    let remote = handshake.remote.clone();
    match handshake.hello.role.clone() {
        Role::Node {
            name,
            mut resources,
            isolation,
            public_key,
            ..
        } => {
            if let Some(issued) = &certificate {
                info!(
                    "node {name}: issued a certificate valid until {} (Unix time), SHA-256 {}",
                    issued.expires, issued.fingerprint
                );
            }
            if shared.live().node_limit.apply(&mut resources) {
                info!("node {name}: offers more than the per-node limit; using {resources:?}");
            }
            // The certificate the node holds from now on: the one just
            // issued, or the one it connected with.
            let fingerprint = match &certificate {
                Some(issued) => Some(issued.fingerprint.clone()),
                None => conn.peer_certificate().map(|der| crate::nodes::fingerprint(&der)),
            };
            let pem = certificate.map(|c| c.pem);
            let (tx, mut rx, writer) = handshake.welcome(SOFTWARE_VERSION, pem, shared.max_message).await?;
            let node = {
                let core = &mut *shared.lock();
                // The same node connecting again (restarted, thawed, its
                // link back) replaces its older connection at once: that
                // one's slots are gone with it, and its chunks run again.
                let older: Vec<NodeId> = core
                    .nodes
                    .iter()
                    .filter(|(_, peer)| peer.name == name)
                    .map(|(&id, _)| id)
                    .collect();
                for id in older {
                    if let Some(peer) = core.nodes.remove(&id) {
                        CloseCode::Done.close(&peer.conn, "replaced by a newer connection of the same node");
                    }
                    info!("node {name}: a newer connection replaces its older one");
                    core.scheduler.handle_node_lost(id);
                }
                let node = NodeId(core.next_id());
                let peer = NodePeer {
                    outbox: tx,
                    conn: conn.clone(),
                    name: name.clone(),
                    public_key,
                    fingerprint,
                };
                core.nodes.insert(node, peer);
                node
            };
            info!(
                "node {name} joined from {remote}: {} cores, {} memory, {} GPUs",
                resources.cores,
                crate::scheduler::gib(resources.memory_bytes),
                resources.gpus.len()
            );
            shared.with(|s| s.handle_node_joined(node, name.clone(), resources, isolation));
            let r = node_loop(&mut rx, node, shared).await;
            info!(
                "node {name} left: {}",
                r.as_ref().err().map_or("closed".into(), |e| e.to_string())
            );
            shared.with(|s| s.handle_node_lost(node));
            shared.lock().nodes.remove(&node);
            shared.metrics.forget(node, None);
            writer.abort();
            r
        }
        Role::Client { api_key } => {
            let principal = principal.expect("an admitted client has a principal");
            match principal.parent {
                Some(job) => info!(
                    "client of {} connected from {remote} for a call of job {job}",
                    principal.name
                ),
                None => info!("client of {} connected from {remote}", principal.name),
            }
            let (tx, mut rx, writer) = handshake.welcome(SOFTWARE_VERSION, None, shared.max_message).await?;
            let client = {
                let core = &mut *shared.lock();
                let client = ClientId(core.next_id());
                let peer = ClientPeer {
                    outbox: tx,
                    conn: conn.clone(),
                    dropped: BTreeMap::new(),
                };
                core.clients.insert(client, peer);
                client
            };
            let r = client_loop(&mut rx, client, &api_key, &principal.name, shared).await;
            // Timed out or reset, not closed: the client may come back for
            // its resumable jobs.
            let abrupt = matches!(r, Err(SessionError::Unreachable { .. }));
            shared.with(|s| s.handle_client_lost(client, abrupt));
            shared.lock().clients.remove(&client);
            writer.abort();
            r
        }
    }
}

async fn node_loop(rx: &mut Receiver<NodeToCoordinator>, node: NodeId, shared: &Shared) -> Result<(), SessionError> {
    while let Some(msg) = rx.recv().await? {
        let result = match msg {
            NodeToCoordinator::ChunkDone { job, slot, output } => {
                shared.metrics.answered(node, job, output.chunk);
                shared.metrics.output_bytes.inc_by(output.payload.len() as u64);
                shared.with(|s| s.handle_chunk_done(node, job, slot, output))
            }
            NodeToCoordinator::SlotFailed {
                job,
                slot,
                kind,
                reason,
            } => shared.with(|s| s.handle_slot_failed(node, job, slot, kind, reason)),
            NodeToCoordinator::Log(line) => {
                shared.with(|s| s.handle_log(node, line));
                Ok(())
            }
        };
        // A node that speaks for what it does not hold is disconnected; its
        // chunks run elsewhere (`handle_node_lost`).
        result.map_err(|v| SessionError::Protocol(v.0))?;
    }
    Ok(())
}

async fn client_loop(
    rx: &mut Receiver<ClientToCoordinator>,
    client: ClientId,
    api_key: &str,
    principal: &str,
    shared: &Shared,
) -> Result<(), SessionError> {
    while let Some(msg) = rx.recv().await? {
        let result = match msg {
            ClientToCoordinator::SubmitJob {
                request,
                mut spec,
                first,
                only,
                resumable,
            } => {
                // The key is checked again for every job: one revoked
                // (or a job's credential whose job ended) since the
                // connection opened takes no more.
                match shared.caller(api_key) {
                    Some(now) => {
                        // The coordinator's record, never the client's word.
                        spec.principal = now.name;
                        spec.parent = now.parent;
                        spec.job_key = new_job_key();
                        shared.with(|s| {
                            if let Some(quota) = now.quota {
                                s.set_quota(&spec.principal, quota);
                            }
                            if resumable.detached && shared.results.is_none() {
                                let reason = "this coordinator keeps no outputs, so it runs no detached job (an \
                                              embedded cluster, or a coordinator without a state directory): run \
                                              the job attached"
                                    .to_string();
                                s.reject(client, request, reason);
                                return Ok(());
                            }
                            if let Some(chunk) = &first {
                                shared.metrics.input_bytes.inc_by(chunk.payload.len() as u64);
                            }
                            match first {
                                Some(chunk) => {
                                    s.handle_submit_with_first(client, request, *spec, chunk, only, &resumable)
                                }
                                None if only => Err(crate::scheduler::ProtocolViolation(format!(
                                    "request {request}: a job said to have only its first chunk came without it"
                                ))),
                                None => {
                                    s.handle_submit_resumable(client, request, *spec, &resumable);
                                    Ok(())
                                }
                            }
                        })
                    }
                    None => {
                        let reason = format!(
                            "the API key of {principal} was revoked (or removed) since this connection opened; \
                             ask the fleet's operator for a new one"
                        );
                        shared.with(|s| s.reject(client, request, reason));
                        Ok(())
                    }
                }
            }
            ClientToCoordinator::Inputs { job, chunk } => {
                shared.metrics.input_bytes.inc_by(chunk.payload.len() as u64);
                shared.with(|s| s.handle_inputs(client, job, chunk))
            }
            ClientToCoordinator::InputsDone { job, chunks } => {
                shared.with(|s| s.handle_inputs_done(client, job, chunks))
            }
            ClientToCoordinator::CancelJob { job } => {
                // A key revoked (or a job credential ended) since the
                // connection opened cancels nothing.
                if shared.caller(api_key).is_some() {
                    shared.with(|s| s.handle_cancel(client, principal, job));
                }
                Ok(())
            }
            // A client that keeps asking while it leaves half its hard
            // limit unread is disconnected: its replies would only grow
            // its queue.
            ClientToCoordinator::StatusRequest { .. }
            | ClientToCoordinator::ListJobs { .. }
            | ClientToCoordinator::FetchResults { .. }
                if shared.client_backlog(client) > shared.limits.client_max_backlog / 2 =>
            {
                Err(crate::scheduler::ProtocolViolation(format!(
                    "the client asked for more while leaving over {} MiB unread",
                    shared.limits.client_max_backlog >> 21
                )))
            }
            ClientToCoordinator::StatusRequest { request } => {
                shared.with(|s| s.handle_status(client, request));
                Ok(())
            }
            ClientToCoordinator::FetchResults { request, job, offset } => {
                let msg = match (&shared.results, shared.caller(api_key)) {
                    (Some(results), Some(_)) => {
                        // A file: read off the runtime's threads.
                        let (results, who) = (results.clone(), principal.to_string());
                        match tokio::task::spawn_blocking(move || results.read(job, &who, offset)).await {
                            Ok(Ok((outputs, next))) => CoordinatorToClient::Results { request, outputs, next },
                            Ok(Err(reason)) => CoordinatorToClient::NoResults { request, reason },
                            Err(e) => CoordinatorToClient::NoResults {
                                request,
                                reason: format!("reading the outputs failed: {e}"),
                            },
                        }
                    }
                    (None, _) => CoordinatorToClient::NoResults {
                        request,
                        reason: "this coordinator keeps no outputs (it has no state directory)".into(),
                    },
                    (_, None) => CoordinatorToClient::NoResults {
                        request,
                        reason: format!("the API key of {principal} was revoked since this connection opened"),
                    },
                };
                shared.with(|s| s.reply(client, msg));
                Ok(())
            }
            ClientToCoordinator::ListJobs { request } => {
                let allowed = if shared.caller(api_key).is_some() {
                    principal
                } else {
                    ""
                };
                shared.with(|s| s.handle_list_jobs(client, allowed, request));
                Ok(())
            }
        };
        result.map_err(|v| SessionError::Protocol(v.0))?;
    }
    Ok(())
}

/// Who a client is: its principal, and the job whose call it is, if it
/// authenticated with a job's credential.
struct Caller {
    name: String,
    /// The principal's quota as its key says; `None` for a job's
    /// credential, whose principal's quota stands as last set.
    quota: Option<Quota>,
    parent: Option<JobId>,
}

/// The prefix of the credential a job's calls get for jobs of their own.
const JOB_KEY_PREFIX: &str = "fmjob_";

/// A fresh credential for a job's calls (from the OS's randomness).
fn new_job_key() -> String {
    let mut bytes = [0u8; 24];
    // No randomness means no safe credential: refuse to go on.
    getrandom::fill(&mut bytes).expect("the operating system's randomness");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{JOB_KEY_PREFIX}{hex}")
}

impl Shared {
    /// Who `api_key` belongs to now: a named key (the key file is read
    /// again if it changed; one that cannot be read is logged and the keys
    /// last read stand), or the credential of a job still running.
    fn caller(&self, api_key: &str) -> Option<Caller> {
        if api_key.starts_with(JOB_KEY_PREFIX) {
            let (job, name) = self.with(|s| s.job_of_key(api_key))?;
            return Some(Caller {
                name,
                quota: None,
                parent: Some(job),
            });
        }
        let (principal, error) = self.keys.authenticate(api_key);
        if let Some(e) = error {
            warn!("API keys: {e}; the keys read before stand");
        }
        principal.map(|p: Principal| Caller {
            name: p.name,
            quota: Some(p.quota),
            parent: None,
        })
    }
}
