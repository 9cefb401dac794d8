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

use fleetmap_net::{write_frames, FramedReader, NetError};
use fleetmap_protocol::{Hello, Message, NodeId, Role, DEFAULT_MAX_FRAME, SOFTWARE_VERSION};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{
    credentials::{secrets_match, Credentials},
    scheduler::{ClientId, Command, Scheduler},
};

/// How long a new connection has to open its stream and say `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application close codes.
const CLOSE_OK: u32 = 0;
const CLOSE_REFUSED: u32 = 1;
const CLOSE_PROTOCOL: u32 = 2;

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub credentials: Credentials,
    pub max_frame: usize,
}

impl CoordinatorConfig {
    pub fn new(listen: SocketAddr, credentials: Credentials) -> Self {
        Self {
            listen,
            credentials,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// Why a peer's connection ended badly.
#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("no Hello within {0:?}")]
    Timeout(Duration),
}

impl From<quinn::ConnectionError> for PeerError {
    fn from(e: quinn::ConnectionError) -> Self {
        Self::Net(e.into())
    }
}

struct Core {
    scheduler: Scheduler,
    peers: HashMap<u64, mpsc::UnboundedSender<Message>>,
    next_peer: u64,
}

impl Core {
    /// Delivers what the scheduler wants sent. A peer that has gone is
    /// skipped: its loss is an event of its own.
    fn route(&mut self) {
        while let Some(cmd) = self.scheduler.poll_command() {
            let (peer, msg) = match cmd {
                Command::ToNode { node, msg } => (node, msg),
                Command::ToClient { client, msg } => (client, msg),
            };
            if let Some(tx) = self.peers.get(&peer) {
                let _ = tx.send(msg);
            }
        }
    }
}

struct Shared {
    core: Mutex<Core>,
    credentials: Credentials,
    max_frame: usize,
}

impl Shared {
    /// Runs `f` on the scheduler and delivers what it produced.
    fn with<R>(&self, f: impl FnOnce(&mut Scheduler) -> R) -> R {
        // A poisoned lock means a panic in the scheduler, a bug: stopping
        // every connection task by propagating it is the only safe outcome.
        let mut core = self.core.lock().expect("scheduler lock poisoned");
        let r = f(&mut core.scheduler);
        core.route();
        r
    }

    fn register(&self, tx: mpsc::UnboundedSender<Message>) -> u64 {
        let mut core = self.core.lock().expect("scheduler lock poisoned");
        core.next_peer += 1;
        let id = core.next_peer;
        core.peers.insert(id, tx);
        id
    }

    fn unregister(&self, id: u64) {
        let mut core = self.core.lock().expect("scheduler lock poisoned");
        core.peers.remove(&id);
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
        self.endpoint.close(CLOSE_OK.into(), b"coordinator shutting down");
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
            peers: HashMap::new(),
            next_peer: 0,
        }),
        credentials: config.credentials,
        max_frame: config.max_frame,
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
        Ok(()) => conn.close(CLOSE_OK.into(), b""),
        Err(e) => {
            let code = match e {
                PeerError::Refused(_) => CLOSE_REFUSED,
                _ => CLOSE_PROTOCOL,
            };
            warn!("{remote}: {e}");
            let mut reason = e.to_string();
            reason.truncate(1000);
            conn.close(code.into(), reason.as_bytes());
        }
    }
}

async fn serve_peer(conn: &quinn::Connection, shared: &Shared) -> Result<(), PeerError> {
    let (send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| PeerError::Timeout(HANDSHAKE_TIMEOUT))??;
    let mut reader = FramedReader::new(recv, shared.max_frame);
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.recv::<Message>()).await {
        Err(_) => return Err(PeerError::Timeout(HANDSHAKE_TIMEOUT)),
        Ok(r) => r?,
    };
    let hello: Hello = match hello {
        Some(Message::Hello(h)) => h,
        Some(other) => return Err(PeerError::Protocol(format!("expected Hello, got {}", other.kind()))),
        None => return Ok(()),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_frames(send, rx, shared.max_frame));
    if hello.software_version != SOFTWARE_VERSION {
        warn!(
            "{} runs fleetmap {}, this coordinator runs {SOFTWARE_VERSION}",
            conn.remote_address(),
            hello.software_version
        );
    }
    let refusal = match &hello.role {
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
        let _ = tx.send(Message::Refused { reason: reason.clone() });
        drop(tx);
        // Let the refusal reach the peer before the close overtakes it.
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        return Err(PeerError::Refused(reason));
    }
    let peer = shared.register(tx.clone());
    let result = match hello.role {
        Role::Node {
            name,
            resources,
            isolation,
            ..
        } => {
            info!(
                "node {name} joined from {}: {} cores, {} memory, {} GPUs",
                conn.remote_address(),
                resources.cores,
                crate::scheduler::gib(resources.memory_bytes),
                resources.gpus.len()
            );
            let _ = tx.send(Message::Welcome {
                node_id: Some(peer),
                coordinator_version: SOFTWARE_VERSION.into(),
            });
            shared.with(|s| s.handle_node_joined(peer, name.clone(), resources, isolation));
            let r = node_loop(&mut reader, peer, shared).await;
            info!(
                "node {name} left: {}",
                r.as_ref().err().map_or("closed".into(), |e| e.to_string())
            );
            shared.with(|s| s.handle_node_lost(peer));
            r
        }
        Role::Client { .. } => {
            let _ = tx.send(Message::Welcome {
                node_id: None,
                coordinator_version: SOFTWARE_VERSION.into(),
            });
            let r = client_loop(&mut reader, peer, shared).await;
            shared.with(|s| s.handle_client_lost(peer));
            r
        }
    };
    shared.unregister(peer);
    drop(tx);
    writer.abort();
    result
}

async fn node_loop(
    reader: &mut FramedReader<quinn::RecvStream>,
    node: NodeId,
    shared: &Shared,
) -> Result<(), PeerError> {
    while let Some(msg) = reader.recv::<Message>().await? {
        match msg {
            Message::ChunkDone { job, slot, output } => shared.with(|s| s.handle_chunk_done(node, job, slot, output)),
            Message::SlotFailed { job, slot, reason } => shared.with(|s| s.handle_slot_failed(node, job, slot, reason)),
            Message::Log(line) => shared.with(|s| s.handle_log(line)),
            other => return Err(PeerError::Protocol(format!("a node may not send {}", other.kind()))),
        }
    }
    Ok(())
}

async fn client_loop(
    reader: &mut FramedReader<quinn::RecvStream>,
    client: ClientId,
    shared: &Shared,
) -> Result<(), PeerError> {
    while let Some(msg) = reader.recv::<Message>().await? {
        let result = match msg {
            Message::SubmitJob { request, spec } => {
                shared.with(|s| s.handle_submit(client, request, spec));
                Ok(())
            }
            Message::Inputs { job, chunk } => shared.with(|s| s.handle_inputs(client, job, chunk)),
            Message::InputsDone { job, chunks } => shared.with(|s| s.handle_inputs_done(client, job, chunks)),
            Message::CancelJob { job } => {
                shared.with(|s| s.handle_cancel(client, job));
                Ok(())
            }
            Message::StatusRequest { request } => {
                shared.with(|s| s.handle_status(client, request));
                Ok(())
            }
            other => return Err(PeerError::Protocol(format!("a client may not send {}", other.kind()))),
        };
        result.map_err(|v| PeerError::Protocol(v.0))?;
    }
    Ok(())
}
