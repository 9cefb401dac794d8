//! The coordinator's async shell: accepts QUIC connections, authenticates
//! each peer from its `Hello`, and moves messages between the connections
//! and the [`Scheduler`]. It makes no decisions of its own.
//!
//! Every connection carries one bidirectional stream of frames, opened by
//! the peer. Anything a peer sends that is not a valid message for its role
//! closes that peer's connection with the reason; the coordinator carries on.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use fleetmap_net::{accept_hello, CloseCode, NetError, Receiver, SessionError};
use fleetmap_protocol::{
    ClientId, ClientToCoordinator, CoordinatorToClient, CoordinatorToNode, NodeId, NodeToCoordinator, Role,
    DEFAULT_MAX_MESSAGE, SOFTWARE_VERSION,
};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{
    credentials::{secrets_match, Credentials},
    scheduler::{Command, Scheduler},
};

/// How long a new connection has to open its stream and say `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub credentials: Credentials,
    pub max_message: usize,
}

impl CoordinatorConfig {
    pub fn new(listen: SocketAddr, credentials: Credentials) -> Self {
        Self {
            listen,
            credentials,
            max_message: DEFAULT_MAX_MESSAGE,
        }
    }
}

struct Core {
    scheduler: Scheduler,
    nodes: HashMap<NodeId, mpsc::UnboundedSender<CoordinatorToNode>>,
    clients: HashMap<ClientId, mpsc::UnboundedSender<CoordinatorToClient>>,
    /// Ids for nodes and clients; the two live in separate, typed maps.
    next_peer: u64,
}

/// Adds a peer's sender under the next id.
fn register<K: Copy + Eq + std::hash::Hash, M>(
    peers: &mut HashMap<K, mpsc::UnboundedSender<M>>,
    next: &mut u64,
    id: fn(u64) -> K,
    tx: mpsc::UnboundedSender<M>,
) -> K {
    *next += 1;
    let key = id(*next);
    peers.insert(key, tx);
    key
}

impl Core {
    /// Delivers what the scheduler wants sent. A peer that has gone is
    /// skipped: its loss is an event of its own.
    fn route(&mut self) {
        while let Some(cmd) = self.scheduler.poll_command() {
            match cmd {
                Command::ToNode { node, msg } => {
                    if let Some(tx) = self.nodes.get(&node) {
                        let _ = tx.send(msg);
                    }
                }
                Command::ToClient { client, msg } => {
                    if let Some(tx) = self.clients.get(&client) {
                        let _ = tx.send(msg);
                    }
                }
            }
        }
    }
}

struct Shared {
    core: Mutex<Core>,
    credentials: Credentials,
    max_message: usize,
}

impl Shared {
    /// Runs `f` on the scheduler and delivers what it produced.
    fn with<R>(&self, f: impl FnOnce(&mut Scheduler) -> R) -> R {
        let mut core = self.lock();
        let r = f(&mut core.scheduler);
        core.route();
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Core> {
        // A poisoned lock means a panic in the scheduler, a bug: stopping
        // every connection task by propagating it is the only safe outcome.
        self.core.lock().expect("scheduler lock poisoned")
    }
}

/// A coordinator serving in the background of the current tokio runtime.
pub struct RunningCoordinator {
    pub local_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    accept: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl RunningCoordinator {
    pub fn node_count(&self) -> usize {
        self.shared.with(|s| s.node_count())
    }

    pub fn job_count(&self) -> usize {
        self.shared.with(|s| s.job_count())
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
    pub async fn shutdown(self) {
        self.endpoint
            .close(CloseCode::Done.code(), b"coordinator shutting down");
        self.accept.abort();
        // Give peers a moment to see the close; a dead peer never answers.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Binds the coordinator's endpoint and serves until shut down.
pub async fn serve(config: CoordinatorConfig) -> Result<RunningCoordinator, NetError> {
    let creds = &config.credentials;
    let endpoint = fleetmap_net::server_endpoint(config.listen, creds.cert_pem.as_bytes(), creds.key_pem.as_bytes())?;
    let local_addr = endpoint.local_addr()?;
    let shared = Arc::new(Shared {
        core: Mutex::new(Core {
            scheduler: Scheduler::new(),
            nodes: HashMap::new(),
            clients: HashMap::new(),
            next_peer: 0,
        }),
        credentials: config.credentials,
        max_message: config.max_message,
    });
    let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
    info!("coordinator listening on {local_addr}");
    Ok(RunningCoordinator {
        local_addr,
        endpoint,
        accept,
        shared,
    })
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(serve_connection(incoming, shared.clone()));
    }
}

async fn serve_connection(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            debug!("{remote}: handshake failed: {e}");
            return;
        }
    };
    match serve_peer(&conn, &shared).await {
        Ok(()) => CloseCode::Done.close(&conn, ""),
        // The refusal was sent and the connection closed with it.
        Err(SessionError::Refused(reason)) => warn!("{remote}: refused: {reason}"),
        Err(e) => {
            warn!("{remote}: {e}");
            CloseCode::Protocol.close(&conn, &e.to_string());
        }
    }
}

async fn serve_peer(conn: &quinn::Connection, shared: &Shared) -> Result<(), SessionError> {
    let Some(handshake) = accept_hello(conn, HANDSHAKE_TIMEOUT).await? else {
        return Ok(());
    };
    let refusal = match &handshake.hello.role {
        Role::Node { token, name, .. } if !secrets_match(token, &shared.credentials.join_token) => Some(format!(
            "node {name:?} presented a join token the coordinator does not accept; \
             use the token from the coordinator's join-token file"
        )),
        Role::Client { api_key } if !secrets_match(api_key, &shared.credentials.api_key) => Some(
            "the coordinator does not accept this API key; set FLEETMAP_API_KEY (or api_key=) \
             to the key in the coordinator's api-key file"
                .to_string(),
        ),
        _ => None,
    };
    if let Some(reason) = refusal {
        handshake.refuse(&reason).await;
        return Err(SessionError::Refused(reason));
    }
    // Only an authenticated peer's version string is logged (and cut short).
    let version = &handshake.hello.software_version;
    if version != SOFTWARE_VERSION {
        let version: String = version.chars().take(40).collect();
        warn!(
            "{} runs fleetmap {version:?}, this coordinator runs {SOFTWARE_VERSION}",
            handshake.remote
        );
    }
    let remote = handshake.remote;
    match handshake.hello.role.clone() {
        Role::Node {
            name,
            resources,
            isolation,
            ..
        } => {
            let (tx, mut rx, writer) = handshake.welcome(SOFTWARE_VERSION, shared.max_message).await?;
            let node = {
                let core = &mut *shared.lock();
                register(&mut core.nodes, &mut core.next_peer, NodeId, tx)
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
            writer.abort();
            r
        }
        Role::Client { api_key } => {
            let principal = principal_of(&api_key);
            let (tx, mut rx, writer) = handshake.welcome(SOFTWARE_VERSION, shared.max_message).await?;
            let client = {
                let core = &mut *shared.lock();
                register(&mut core.clients, &mut core.next_peer, ClientId, tx)
            };
            let r = client_loop(&mut rx, client, &principal, shared).await;
            shared.with(|s| s.handle_client_lost(client));
            shared.lock().clients.remove(&client);
            writer.abort();
            r
        }
    }
}

async fn node_loop(rx: &mut Receiver<NodeToCoordinator>, node: NodeId, shared: &Shared) -> Result<(), SessionError> {
    while let Some(msg) = rx.recv().await? {
        match msg {
            NodeToCoordinator::ChunkDone { job, slot, output } => {
                shared.with(|s| s.handle_chunk_done(node, job, slot, output))
            }
            NodeToCoordinator::SlotFailed {
                job,
                slot,
                kind,
                reason,
            } => shared.with(|s| s.handle_slot_failed(node, job, slot, kind, reason)),
            NodeToCoordinator::Log(line) => shared.with(|s| s.handle_log(line)),
        }
    }
    Ok(())
}

/// Who a client is, from the key it authenticated with: a name that never
/// reveals the key (a warm worker serves only its principal's jobs).
fn principal_of(api_key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(api_key.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("key-{hex}")
}

async fn client_loop(
    rx: &mut Receiver<ClientToCoordinator>,
    client: ClientId,
    principal: &str,
    shared: &Shared,
) -> Result<(), SessionError> {
    while let Some(msg) = rx.recv().await? {
        let result = match msg {
            ClientToCoordinator::SubmitJob { request, mut spec } => {
                // The coordinator's record, never the client's word.
                spec.principal = principal.to_string();
                shared.with(|s| s.handle_submit(client, request, *spec));
                Ok(())
            }
            ClientToCoordinator::Inputs { job, chunk } => shared.with(|s| s.handle_inputs(client, job, chunk)),
            ClientToCoordinator::InputsDone { job, chunks } => {
                shared.with(|s| s.handle_inputs_done(client, job, chunks))
            }
            ClientToCoordinator::CancelJob { job } => {
                shared.with(|s| s.handle_cancel(client, job));
                Ok(())
            }
            ClientToCoordinator::StatusRequest { request } => {
                shared.with(|s| s.handle_status(client, request));
                Ok(())
            }
        };
        result.map_err(|v| SessionError::Protocol(v.0))?;
    }
    Ok(())
}
