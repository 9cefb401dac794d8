//! fleetmap's Rust client library: connects to a coordinator with an API
//! key, submits jobs and streams their events (outputs, printed lines,
//! credit, the end) back. Inputs are sent as pickled chunks within the
//! credit the coordinator grants, so a job never floods the coordinator.
//!
//! With the `local` feature, [`local::LocalCluster`] starts a coordinator and
//! one node daemon in this process: the embedded default cluster.
//!
//! This crate knows nothing of Python: payloads are opaque bytes. It must
//! not depend on pyo3, `runtime` or `sandbox`.

#[cfg(feature = "local")]
pub mod local;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use fleetmap_net::{Link, LocalDialer, Receiver, Session, SessionError};
use fleetmap_protocol::{
    ClientToCoordinator, CoordinatorToClient, FailureKind, Hello, InputChunk, JobId, JobSpec, JobStatus, LogLine,
    NodeStatus, OutputChunk, RequestId, Resumable, Role, DEFAULT_MAX_MESSAGE, SOFTWARE_VERSION,
};
use tokio::sync::{mpsc, oneshot};

/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// What went wrong talking to the fleet.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot reach the fleetmap coordinator at {addr}: {reason}. Check FLEETMAP_COORDINATOR and that the coordinator runs")]
    Unreachable { addr: String, reason: String },
    #[error("{0}")]
    Refused(String),
    #[error("TLS: {0}. Check that FLEETMAP_CA names the coordinator's ca.pem")]
    Tls(String),
    #[error("the coordinator rejected the job: {0}")]
    Rejected(String),
    #[error("lost the connection to the coordinator: {0}")]
    Disconnected(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<SessionError> for ClientError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Unreachable { addr, reason } => ClientError::Unreachable { addr, reason },
            SessionError::Tls(t) => ClientError::Tls(t),
            SessionError::Refused(reason) => ClientError::Refused(reason),
            SessionError::Protocol(reason) => ClientError::Protocol(reason),
            other => ClientError::Disconnected(other.to_string()),
        }
    }
}

/// Something that happened to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    Output(OutputChunk),
    Log(LogLine),
    /// The client may send this many more chunks.
    Credit(u32),
    Finished,
    /// The job failed; the kind says which error the caller raises.
    Failed(FailureKind, String),
    /// The connection to the coordinator was lost: a job submitted
    /// resumable waits for its client to submit it again (`resumes`).
    Disconnected(String),
}

type Routes = Arc<Mutex<Routing>>;

#[derive(Default)]
struct Routing {
    jobs: HashMap<JobId, mpsc::UnboundedSender<JobEvent>>,
    submits: HashMap<RequestId, oneshot::Sender<Result<Accepted, ClientError>>>,
    statuses: HashMap<RequestId, oneshot::Sender<FleetStatus>>,
    job_lists: HashMap<RequestId, oneshot::Sender<Vec<JobStatus>>>,
    results: HashMap<RequestId, oneshot::Sender<Result<ResultsPage, ClientError>>>,
    /// Set once the connection is gone, with why.
    closed: Option<String>,
}

struct Accepted {
    job: JobId,
    slots: u32,
    nodes: u32,
    credit: u32,
    events: mpsc::UnboundedReceiver<JobEvent>,
}

/// A page of a detached job's outputs, in the order they finished, and
/// where the next page starts (`None`: none more kept yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultsPage {
    pub outputs: Vec<OutputChunk>,
    pub next: Option<u64>,
}

/// The fleet as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetStatus {
    pub nodes: Vec<NodeStatus>,
    pub jobs: u32,
}

fn hello(api_key: &str) -> Hello {
    Hello {
        role: Role::Client {
            api_key: api_key.into(),
        },
        software_version: SOFTWARE_VERSION.into(),
    }
}

/// A connection to a coordinator; jobs share it.
pub struct Client {
    conn: Link,
    _endpoint: Option<quinn::Endpoint>,
    tx: fleetmap_net::Outbox<ClientToCoordinator>,
    routes: Routes,
    next_request: AtomicU64,
    pub coordinator: String,
    /// The fleetmap version the coordinator runs.
    pub coordinator_version: String,
}

impl Client {
    /// Connects to `addr` (`host:port`), trusting only `ca_pem`, and
    /// authenticates with `api_key`.
    pub async fn connect(addr: &str, ca_pem: &[u8], api_key: &str) -> Result<Client, ClientError> {
        let session = fleetmap_net::dial(addr, ca_pem, &hello(api_key), DEFAULT_MAX_MESSAGE, CONNECT_TIMEOUT).await?;
        Ok(Self::from_session(session, addr))
    }

    /// Connects to the coordinator in this process through `dialer`, over
    /// a local link rather than QUIC; `addr` names it in errors.
    pub async fn connect_local(dialer: &LocalDialer, addr: &str, api_key: &str) -> Result<Client, ClientError> {
        let session = fleetmap_net::dial_local(
            dialer,
            addr,
            None,
            &hello(api_key),
            DEFAULT_MAX_MESSAGE,
            CONNECT_TIMEOUT,
        )
        .await?;
        Ok(Self::from_session(session, addr))
    }

    fn from_session(session: Session<ClientToCoordinator, CoordinatorToClient>, addr: &str) -> Client {
        let routes: Routes = Default::default();
        tokio::spawn(read_loop(session.rx, routes.clone()));
        Client {
            conn: session.conn,
            _endpoint: session.endpoint,
            tx: session.tx,
            routes,
            next_request: AtomicU64::new(0),
            coordinator: addr.into(),
            coordinator_version: session.coordinator_version,
        }
    }

    /// Submits a job; it is accepted (possibly with no free slots yet) or
    /// rejected with the coordinator's reason.
    pub async fn submit(&self, spec: JobSpec) -> Result<Job, ClientError> {
        self.submit_with_first(spec, None, false, Resumable::default()).await
    }

    /// Submits a job together with its first chunk of inputs (chunk 0,
    /// from input 0, at most [`fleetmap_protocol::FIRST_CHUNK_BYTES`]), so
    /// that its first call waits for no round trip more; the credit the
    /// job returns is for the chunks after it. `only`: that chunk is all
    /// of the job's inputs (no `inputs_done` follows). `resumable`: whether
    /// the job outlives a lost connection, and which job this submission
    /// picks up again.
    pub async fn submit_with_first(
        &self,
        spec: JobSpec,
        first: Option<InputChunk>,
        only: bool,
        resumable: Resumable,
    ) -> Result<Job, ClientError> {
        let (done, accepted) = oneshot::channel();
        let request = self.register(|routes, request| {
            routes.submits.insert(request, done);
        })?;
        let _ = self.tx.send(ClientToCoordinator::SubmitJob {
            request,
            spec: Box::new(spec),
            first,
            only,
            resumable,
        });
        let accepted = accepted
            .await
            .map_err(|_| ClientError::Disconnected("the connection closed during submission".into()))??;
        Ok(Job {
            id: accepted.job,
            slots: accepted.slots,
            nodes: accepted.nodes,
            initial_credit: accepted.credit,
            tx: self.tx.clone(),
            events: accepted.events,
        })
    }

    /// The fleet's nodes, their free resources and how they isolate slots.
    pub async fn status(&self) -> Result<FleetStatus, ClientError> {
        let (done, status) = oneshot::channel();
        let request = self.register(|routes, request| {
            routes.statuses.insert(request, done);
        })?;
        let _ = self.tx.send(ClientToCoordinator::StatusRequest { request });
        status
            .await
            .map_err(|_| ClientError::Disconnected("the connection closed during a status request".into()))
    }

    /// The running jobs of this client's principal (the owner of its API
    /// key), whichever connection submitted them.
    pub async fn jobs(&self) -> Result<Vec<JobStatus>, ClientError> {
        let (done, jobs) = oneshot::channel();
        let request = self.register(|routes, request| {
            routes.job_lists.insert(request, done);
        })?;
        let _ = self.tx.send(ClientToCoordinator::ListJobs { request });
        jobs.await
            .map_err(|_| ClientError::Disconnected("the connection closed while listing jobs".into()))
    }

    /// A page of the outputs the coordinator keeps for detached job `job`
    /// of this client's principal, from byte `offset` (0, then each page's
    /// `next`).
    pub async fn results(&self, job: JobId, offset: u64) -> Result<ResultsPage, ClientError> {
        let (done, page) = oneshot::channel();
        let request = self.register(|routes, request| {
            routes.results.insert(request, done);
        })?;
        let _ = self.tx.send(ClientToCoordinator::FetchResults { request, job, offset });
        page.await
            .map_err(|_| ClientError::Disconnected("the connection closed while fetching results".into()))?
    }

    /// Cancels a job of this client's principal, submitted on any
    /// connection; a job of another principal is left alone.
    pub fn cancel(&self, job: JobId) {
        let _ = self.tx.send(ClientToCoordinator::CancelJob { job });
    }

    /// Takes a request number and records where its answer goes, unless the
    /// connection is already gone.
    fn register(&self, route: impl FnOnce(&mut Routing, RequestId)) -> Result<RequestId, ClientError> {
        let request = RequestId(self.next_request.fetch_add(1, Ordering::Relaxed));
        let mut routes = self.routes.lock().expect("routing lock poisoned");
        if let Some(reason) = &routes.closed {
            return Err(ClientError::Disconnected(reason.clone()));
        }
        route(&mut routes, request);
        Ok(request)
    }

    /// Whether the connection is a local link to a coordinator in this
    /// process rather than QUIC.
    pub fn is_local(&self) -> bool {
        matches!(self.conn, Link::Local(_))
    }

    /// Whether the connection is gone (closed by either side, timed out or
    /// reset).
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// Closes the connection; running jobs are cancelled by the coordinator.
    pub fn close(&self) {
        fleetmap_net::CloseCode::Done.close(&self.conn, "client closed");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

async fn read_loop(mut rx: Receiver<CoordinatorToClient>, routes: Routes) {
    let reason = loop {
        let msg = match rx.recv().await {
            Ok(Some(msg)) => msg,
            Ok(None) => break "the coordinator closed the connection".to_string(),
            Err(e) => break e.to_string(),
        };
        let mut r = routes.lock().expect("routing lock poisoned");
        let (job, event) = match msg {
            CoordinatorToClient::JobAccepted {
                request,
                job,
                slots,
                nodes,
                credit,
            } => {
                let (tx, events) = mpsc::unbounded_channel();
                r.jobs.insert(job, tx);
                if let Some(done) = r.submits.remove(&request) {
                    let _ = done.send(Ok(Accepted {
                        job,
                        slots,
                        nodes,
                        credit,
                        events,
                    }));
                }
                continue;
            }
            CoordinatorToClient::JobRejected { request, reason } => {
                if let Some(done) = r.submits.remove(&request) {
                    let _ = done.send(Err(ClientError::Rejected(reason)));
                }
                continue;
            }
            CoordinatorToClient::Status { request, nodes, jobs } => {
                if let Some(done) = r.statuses.remove(&request) {
                    let _ = done.send(FleetStatus { nodes, jobs });
                }
                continue;
            }
            CoordinatorToClient::Jobs { request, jobs } => {
                if let Some(done) = r.job_lists.remove(&request) {
                    let _ = done.send(jobs);
                }
                continue;
            }
            CoordinatorToClient::Results { request, outputs, next } => {
                if let Some(done) = r.results.remove(&request) {
                    let _ = done.send(Ok(ResultsPage { outputs, next }));
                }
                continue;
            }
            CoordinatorToClient::NoResults { request, reason } => {
                if let Some(done) = r.results.remove(&request) {
                    let _ = done.send(Err(ClientError::Rejected(reason)));
                }
                continue;
            }
            CoordinatorToClient::Output { job, output } => (job, JobEvent::Output(output)),
            CoordinatorToClient::Log(line) => (line.job, JobEvent::Log(line)),
            CoordinatorToClient::Credit { job, chunks } => (job, JobEvent::Credit(chunks)),
            CoordinatorToClient::JobFinished { job } => (job, JobEvent::Finished),
            CoordinatorToClient::JobFailed { job, kind, reason } => (job, JobEvent::Failed(kind, reason)),
        };
        let last = matches!(event, JobEvent::Finished | JobEvent::Failed(..));
        if let Some(tx) = r.jobs.get(&job) {
            let _ = tx.send(event);
        }
        if last {
            r.jobs.remove(&job);
        }
    };
    let mut r = routes.lock().expect("routing lock poisoned");
    for (_, tx) in r.jobs.drain() {
        let _ = tx.send(JobEvent::Disconnected(format!(
            "lost the connection to the coordinator: {reason}"
        )));
    }
    for (_, done) in r.submits.drain() {
        let _ = done.send(Err(ClientError::Disconnected(reason.clone())));
    }
    // Dropping the senders tells waiting status requests the connection is gone.
    r.statuses.clear();
    r.job_lists.clear();
    r.results.clear();
    r.closed = Some(reason);
}

/// A submitted job.
pub struct Job {
    pub id: JobId,
    /// Slots placed when the job was accepted.
    pub slots: u32,
    pub nodes: u32,
    /// Chunks the client may send before it gets more credit.
    pub initial_credit: u32,
    tx: fleetmap_net::Outbox<ClientToCoordinator>,
    events: mpsc::UnboundedReceiver<JobEvent>,
}

impl Job {
    /// Sends a chunk of inputs; the caller keeps within its credit.
    pub fn send_chunk(&self, chunk: InputChunk) {
        let _ = self.tx.send(ClientToCoordinator::Inputs { job: self.id, chunk });
    }

    /// Says that all `chunks` chunks have been sent.
    pub fn inputs_done(&self, chunks: u64) {
        let _ = self.tx.send(ClientToCoordinator::InputsDone { job: self.id, chunks });
    }

    /// Stops the job: the coordinator kills its workers and frees its slots.
    pub fn cancel(&self) {
        let _ = self.tx.send(ClientToCoordinator::CancelJob { job: self.id });
    }

    /// The next event; `None` once the job's events are exhausted.
    pub async fn next_event(&mut self) -> Option<JobEvent> {
        self.events.recv().await
    }

    /// An event if one is ready now.
    pub fn try_next_event(&mut self) -> Option<JobEvent> {
        self.events.try_recv().ok()
    }
}
