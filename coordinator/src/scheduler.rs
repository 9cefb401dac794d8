//! The scheduler: the coordinator's decisions as a plain state machine.
//!
//! It is fed events (`handle_*`) and drained of the messages it wants sent
//! (`poll_command`). It does no I/O, reads no clock and spawns nothing, so it
//! can be driven deterministically by tests and simulations (`tests.rs`,
//! `sim.rs`).
//!
//! This file holds the state (nodes, jobs, their slots and queued inputs)
//! and the events. The policies the events apply each live in a file of
//! their own:
//! - **Placement: spread** (`placement.rs`). A job's slots go one at a time
//!   to the node that can host the most further calls, so a job spans as many
//!   nodes as it can. A job that no node could ever host is rejected at once.
//! - **Jobs share the fleet fairly** (`fairness.rs`). Free resources go one
//!   slot at a time to the job holding the fewest cores (max-min fairness),
//!   and a job below an equal share of the fleet's cores that finds no free
//!   room gets room from jobs above it, whose slots are drained. Who gives
//!   what is planned by a pure function of the jobs and nodes, then applied.
//! - **Dispatch: pull with a window** (`dispatch.rs`). Each slot holds at
//!   most [`SLOT_DEPTH`] chunks, and a client may have at most a window of
//!   chunks in the coordinator, credited back one per finished chunk.
//! - **Recovery** (`recovery.rs`). The chunks of a lost node run again
//!   elsewhere, a job that no remaining node can host fails, and whatever an
//!   ended job or a given-back slot held goes back to its node.

mod dispatch;
mod fairness;
mod observe;
mod placement;
mod recovery;
mod survival;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::Duration,
};

use fleetmap_protocol::{
    ChunkId, ClientId, CoordinatorToClient, CoordinatorToNode, FailureKind, InputChunk, InputIndex, JobId, JobSpec,
    JobState, JobStatus, LogLine, NodeId, NodeIsolation, NodeProgress, NodeStatus, OutputChunk, RequestId, Resources,
    Resumable, SlotId,
};

use crate::keys::Quota;

use dispatch::PER_SLOT_WINDOW;
pub use dispatch::SLOT_DEPTH;
pub use observe::{Counters, FleetSnapshot};
pub use placement::gib;
use placement::Node;
pub use recovery::MAX_CHUNK_LOSSES;
pub use survival::Grace;

/// The most slots one job may have.
pub const MAX_SLOTS: u32 = 4000;

/// A message the scheduler wants delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ToNode {
        node: NodeId,
        msg: CoordinatorToNode,
    },
    ToClient {
        client: ClientId,
        msg: CoordinatorToClient,
    },
    /// For the store of detached jobs' outputs.
    Store(Store),
}

/// What the shell's store of detached jobs' outputs is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// Start keeping the outputs of a detached job of `principal`.
    Begin { job: JobId, principal: String },
    /// Keep an output; if it cannot be kept, the shell fails the job
    /// (`fail_detached`).
    Keep { job: JobId, output: OutputChunk },
    /// The job's listing is gone: remove what is kept of it.
    Forget { job: JobId },
}

/// A peer broke the protocol; the shell closes its connection with this reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ProtocolViolation(pub String);

#[derive(Debug)]
struct Slot {
    node: NodeId,
    chunks: Vec<ChunkId>,
    /// Given back to the fleet for a job below its fair share: takes no new
    /// chunk and stops once the ones it holds are done.
    draining: bool,
}

#[derive(Debug)]
struct Job {
    client: ClientId,
    spec: JobSpec,
    target_slots: u32,
    /// Chunks the client may have in the coordinator at once: 3 per slot
    /// plus 3. It shrinks when slots are lost; credit already granted stays
    /// valid, and completions are not credited back until the client is
    /// inside the window again.
    window: u32,
    /// Credit granted to the client and not yet used.
    credit_out: u32,
    /// Whether the client has been told the job is accepted.
    announced: bool,
    next_slot: SlotId,
    slots: BTreeMap<SlotId, Slot>,
    /// Slots not being given back: `slots` less the draining ones, kept as a
    /// count because placement asks for it once per slot placed.
    active_slots: u32,
    /// One entry per free place in a slot; stale ids (of removed slots) are
    /// skipped when popped.
    ready: VecDeque<SlotId>,
    queue: VecDeque<InputChunk>,
    in_flight: HashMap<ChunkId, (SlotId, InputChunk)>,
    /// Chunks the client has sent and that have not finished.
    in_system: u32,
    /// The bytes of their payloads.
    in_system_bytes: u64,
    /// The client has more waiting than it reads: no credit until it drains.
    backlogged: bool,
    /// Per chunk, the nodes lost while it ran there.
    losses: HashMap<ChunkId, Vec<String>>,
    received: u64,
    finished: u64,
    /// Inputs with an outcome.
    inputs_done: u64,
    total_chunks: Option<u64>,
    /// When it was submitted (Unix seconds).
    started: u64,
    /// Inputs with an outcome, and those whose call raised, per node name.
    per_node: BTreeMap<String, (u64, u64)>,
    /// The first [`MAX_LISTED_FAILURES`] nodes lost under it, as text.
    failures: Vec<String>,
    /// The SHA-256 of its resume token and how long it waits for its
    /// client once that vanishes (`survival.rs`); `None`: it ends with its
    /// connection.
    resume: Option<([u8; 32], Duration)>,
    /// Since when no node can host it, and why (`survival.rs`).
    stranded: Option<(Duration, String)>,
    /// Its outputs go to the shell's store, not to its client, and it runs
    /// on without its client once all its inputs are in.
    detached: bool,
}

impl Job {
    /// A job just submitted: no slots yet, and a target of as many slots as
    /// its parallelism and its number of inputs allow.
    fn new(client: ClientId, spec: JobSpec) -> Job {
        let mut target = spec.parallelism.unwrap_or(MAX_SLOTS).clamp(1, MAX_SLOTS);
        if let Some(total) = spec.total_inputs {
            target = target.min(total.max(1).min(MAX_SLOTS as u64) as u32);
        }
        Job {
            client,
            spec,
            target_slots: target,
            // Room to queue a few chunks while the job waits for slots;
            // every slot placed adds its share (see `Scheduler::open_slots`).
            window: PER_SLOT_WINDOW,
            credit_out: 0,
            announced: false,
            next_slot: SlotId(0),
            slots: BTreeMap::new(),
            active_slots: 0,
            ready: VecDeque::new(),
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            in_system: 0,
            in_system_bytes: 0,
            backlogged: false,
            losses: HashMap::new(),
            received: 0,
            finished: 0,
            inputs_done: 0,
            total_chunks: None,
            started: unix_now(),
            per_node: BTreeMap::new(),
            failures: Vec::new(),
            resume: None,
            stranded: None,
            detached: false,
        }
    }
}

/// The most failures a job's listing keeps.
const MAX_LISTED_FAILURES: usize = 5;

/// The most ended jobs the coordinator keeps for listings.
const MAX_RECENT_JOBS: usize = 200;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How job keys are held: their SHA-256, so the table holds no credential.
fn key_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Slot `slot` of `job` if node `node` runs it; `None` if it is gone (given
/// back, or its node lost); a violation if it belongs to another node or
/// was never placed.
fn owned_slot(j: &mut Job, job: JobId, slot: SlotId, node: NodeId) -> Result<Option<&mut Slot>, ProtocolViolation> {
    let next_slot = j.next_slot;
    match j.slots.get_mut(&slot) {
        Some(s) if s.node == node => Ok(Some(s)),
        Some(_) => Err(ProtocolViolation(format!(
            "job {job}: node spoke for slot {slot}, which runs on another node"
        ))),
        None if slot.0 >= next_slot.0 => Err(ProtocolViolation(format!(
            "job {job}: node spoke for slot {slot}, which was never placed"
        ))),
        None => Ok(None),
    }
}

/// The coordinator's state: nodes, jobs, slots and queued inputs.
#[derive(Debug)]
pub struct Scheduler {
    nodes: BTreeMap<NodeId, Node>,
    jobs: BTreeMap<JobId, Job>,
    next_job: JobId,
    out: VecDeque<Command>,
    /// Clients with more waiting to be sent to them than they read.
    backlogged: BTreeSet<ClientId>,
    /// Each principal's quota, as the shell last told it.
    quotas: BTreeMap<String, Quota>,
    /// Running jobs by the SHA-256 of their `job_key`.
    job_keys: HashMap<String, JobId>,
    /// The last [`MAX_RECENT_JOBS`] jobs that ended, newest last, as
    /// listings show them, with their resume token's hash.
    recent: VecDeque<(JobStatus, Option<[u8; 32]>)>,
    /// Jobs waiting for their vanished client (`survival.rs`).
    orphans: BTreeMap<JobId, survival::Orphan>,
    /// The shell's clock at its last tick.
    now: Duration,
    /// What has happened since the coordinator started (`observe.rs`).
    counters: Counters,
    grace: Grace,
    /// The largest input or output payload a peer may send: the message
    /// limit less room for the message around it, so that a payload
    /// accepted from one peer can always be passed on to the next.
    max_payload: usize,
}

impl Default for Scheduler {
    fn default() -> Self {
        Self::new()
    }
}

impl Scheduler {
    pub fn new() -> Self {
        Self::with_max_payload(fleetmap_protocol::max_payload(fleetmap_protocol::DEFAULT_MAX_MESSAGE))
    }

    pub fn with_max_payload(max_payload: usize) -> Self {
        Self {
            nodes: BTreeMap::new(),
            jobs: BTreeMap::new(),
            next_job: JobId::default(),
            out: VecDeque::new(),
            backlogged: BTreeSet::new(),
            quotas: BTreeMap::new(),
            job_keys: HashMap::new(),
            recent: VecDeque::new(),
            orphans: BTreeMap::new(),
            now: Duration::ZERO,
            counters: Counters::default(),
            grace: Grace::default(),
            max_payload,
        }
    }

    /// The next message to deliver.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    /// The client that submitted `job`, while it runs.
    pub fn client_of(&self, job: JobId) -> Option<ClientId> {
        self.jobs.get(&job).map(|j| j.client)
    }

    /// Slots held by `job`, per node name (for status and tests).
    pub fn slots_of(&self, job: JobId) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        if let Some(j) = self.jobs.get(&job) {
            for slot in j.slots.values() {
                *out.entry(self.nodes[&slot.node].name.clone()).or_default() += 1;
            }
        }
        out
    }

    pub fn handle_node_joined(&mut self, node: NodeId, name: String, resources: Resources, isolation: NodeIsolation) {
        self.nodes.insert(node, Node::new(name, resources, isolation));
        self.grow_jobs();
    }

    /// A node's connection ended: its slots are gone and the chunks they held
    /// go back to the front of their job's queue, in order, to run elsewhere.
    pub fn handle_node_lost(&mut self, node: NodeId) {
        let Some(lost) = self.nodes.remove(&node) else {
            return;
        };
        self.counters.nodes_lost += 1;
        self.requeue_chunks_of_lost_node(node, &lost.name);
        self.strand_jobs(&lost.name);
        self.grow_jobs();
        self.dispatch_all();
    }

    /// Refuses a submission for a reason the shell found (a revoked key).
    pub fn reject(&mut self, client: ClientId, request: RequestId, reason: String) {
        self.send_to_client(client, CoordinatorToClient::JobRejected { request, reason });
    }

    /// What `principal` may hold from now on (the shell reads it from the
    /// key the client authenticated with, before each submission).
    pub fn set_quota(&mut self, principal: &str, quota: Quota) {
        if quota == Quota::default() {
            self.quotas.remove(principal);
        } else {
            self.quotas.insert(principal.to_string(), quota);
        }
    }

    /// The running job whose `job_key` is `key`, and its principal: a
    /// call of that job submitting one of its own. `None` once it ended.
    pub fn job_of_key(&self, key: &str) -> Option<(JobId, String)> {
        let id = *self.job_keys.get(&key_hash(key))?;
        self.jobs.get(&id).map(|j| (id, j.spec.principal.clone()))
    }

    /// A principal's quota, if it has one.
    pub(super) fn quota_of(&self, principal: &str) -> Quota {
        self.quotas.get(principal).copied().unwrap_or_default()
    }

    /// A client submits a job. It is accepted (and gets the slots that are
    /// free) or rejected at once when no node could ever host one call, or
    /// when its principal already runs as many jobs as its quota allows.
    /// A client submits a job.
    pub fn handle_submit(&mut self, client: ClientId, request: RequestId, spec: JobSpec) {
        self.accept_job(client, request, spec, false, &Resumable::default());
    }

    /// A client submits a job that outlives its connection, or picks up
    /// one it submitted so before (`survival.rs`).
    pub fn handle_submit_resumable(
        &mut self,
        client: ClientId,
        request: RequestId,
        spec: JobSpec,
        resumable: &Resumable,
    ) {
        self.accept_job(client, request, spec, false, resumable);
    }

    /// A client submits a job with its first chunk of inputs (which needs
    /// no credit) and, with `only`, no more.
    pub fn handle_submit_with_first(
        &mut self,
        client: ClientId,
        request: RequestId,
        spec: JobSpec,
        first: InputChunk,
        only: bool,
        resumable: &Resumable,
    ) -> Result<(), ProtocolViolation> {
        if first.payload.len() > fleetmap_protocol::FIRST_CHUNK_BYTES
            || first.chunk != ChunkId(0)
            || first.first_input != InputIndex(0)
        {
            return Err(ProtocolViolation(format!(
                "request {request}: the first chunk sent with a job must be chunk 0 from input 0 with at most {} \
                 bytes (chunk {}, input {}, {} bytes)",
                fleetmap_protocol::FIRST_CHUNK_BYTES,
                first.chunk,
                first.first_input,
                first.payload.len()
            )));
        }
        if let Some(id) = self.accept_job(client, request, spec, true, resumable) {
            self.handle_inputs(client, id, first)?;
            if only {
                self.handle_inputs_done(client, id, 1)?;
            }
        }
        Ok(())
    }

    /// Accepts (or rejects) a job and credits its client; `first_chunk`:
    /// one chunk came with it, on the protocol's credit. The job's id, if
    /// accepted.
    fn accept_job(
        &mut self,
        client: ClientId,
        request: RequestId,
        spec: JobSpec,
        first_chunk: bool,
        resumable: &Resumable,
    ) -> Option<JobId> {
        if resumable.token.len() > fleetmap_protocol::MAX_RESUME_TOKEN {
            let reason = format!(
                "the job's resume token is {} bytes, over the limit of {}",
                resumable.token.len(),
                fleetmap_protocol::MAX_RESUME_TOKEN
            );
            self.send_to_client(client, CoordinatorToClient::JobRejected { request, reason });
            return None;
        }
        let resumed = self.resume_id(client, request, &spec.principal, resumable).ok()?;
        if let Some(max) = self.quota_of(&spec.principal).max_jobs {
            let running = self
                .jobs
                .values()
                .filter(|j| j.spec.principal == spec.principal)
                .count()
                + self
                    .orphans
                    .values()
                    .filter(|o| o.status.principal == spec.principal)
                    .count();
            if running >= max as usize {
                let reason = format!(
                    "{} already runs {running} jobs, its quota's limit (max jobs {max}); wait for one to end, \
                     or ask the fleet's operator to raise it (fleetmap keys create --max-jobs)",
                    spec.principal
                );
                self.send_to_client(client, CoordinatorToClient::JobRejected { request, reason });
                return None;
            }
        }
        // A resumed job waits for a node rather than fail, as one whose
        // node was lost does: after a coordinator restart, nodes may come
        // back after their clients.
        let mut stranded = false;
        if let Err(reason) = self.check_placeable(&spec.call) {
            if resumed.is_none() || spec.call.cores == 0 || spec.call.memory_bytes == 0 {
                self.send_to_client(client, CoordinatorToClient::JobRejected { request, reason });
                return None;
            }
            stranded = true;
        }
        let id = match &resumed {
            Some(r) => r.id,
            None => self.next_job,
        };
        self.next_job = JobId(self.next_job.0.max(id.0 + 1));
        let mut spec = spec;
        if spec.name.len() > fleetmap_protocol::MAX_JOB_NAME {
            let mut end = fleetmap_protocol::MAX_JOB_NAME;
            while !spec.name.is_char_boundary(end) {
                end -= 1;
            }
            spec.name.truncate(end);
        }
        if !spec.job_key.is_empty() {
            self.job_keys.insert(key_hash(&spec.job_key), id);
        }
        let mut job = Job::new(client, spec);
        job.backlogged = self.backlogged.contains(&client);
        if !resumable.token.is_empty() {
            let grace = Duration::from_millis(resumable.grace_ms).min(self.grace.max_client);
            job.resume = Some((survival::token_hash(&resumable.token), grace));
        }
        if resumable.detached {
            job.detached = true;
            let principal = job.spec.principal.clone();
            self.out.push_back(Command::Store(Store::Begin { job: id, principal }));
        }
        if let (Some(r), Some((_, done))) = (&resumed, resumable.resumes) {
            job.next_slot = r.next_slot;
            job.inputs_done = done;
            job.started = r.started.unwrap_or(job.started);
        }
        self.jobs.insert(id, job);
        self.grow_jobs();
        let job = self.jobs.get_mut(&id).expect("job inserted above");
        job.announced = true;
        if first_chunk {
            job.credit_out += 1;
        }
        let credit = job.top_up();
        let nodes = job.slots.values().map(|s| s.node).collect::<BTreeSet<_>>().len() as u32;
        let msg = CoordinatorToClient::JobAccepted {
            request,
            job: id,
            slots: job.slots.len() as u32,
            nodes,
            credit,
        };
        self.send_to_client(client, msg);
        if stranded {
            if let Some(job) = self.jobs.get_mut(&id) {
                job.stranded = Some((self.now, "the job was picked up again after an interruption".into()));
            }
            self.handle_tick(self.now);
        }
        Some(id)
    }

    pub fn handle_inputs(&mut self, client: ClientId, job: JobId, chunk: InputChunk) -> Result<(), ProtocolViolation> {
        if chunk.payload.len() > self.max_payload {
            return Err(ProtocolViolation(format!(
                "job {job}: chunk {} is {} bytes, over the limit of {} bytes per chunk of inputs",
                chunk.chunk,
                chunk.payload.len(),
                self.max_payload
            )));
        }
        let Some(j) = self.client_job(client, job) else {
            return Ok(());
        };
        if j.credit_out == 0 {
            return Err(ProtocolViolation(format!(
                "job {job}: client sent chunk {} without credit (window of {} chunks)",
                chunk.chunk, j.window
            )));
        }
        if j.total_chunks.is_some() {
            return Err(ProtocolViolation(format!("job {job}: inputs sent after InputsDone")));
        }
        if chunk.chunk != ChunkId(j.received) {
            return Err(ProtocolViolation(format!(
                "job {job}: chunk {} arrived where chunk {} was due; chunks are numbered from 0 without gaps",
                chunk.chunk, j.received
            )));
        }
        j.credit_out -= 1;
        j.in_system += 1;
        j.in_system_bytes += chunk.payload.len() as u64;
        j.received += 1;
        j.queue.push_back(chunk);
        self.dispatch(job);
        Ok(())
    }

    pub fn handle_inputs_done(&mut self, client: ClientId, job: JobId, chunks: u64) -> Result<(), ProtocolViolation> {
        let Some(j) = self.client_job(client, job) else {
            return Ok(());
        };
        if chunks != j.received {
            return Err(ProtocolViolation(format!(
                "job {job}: client says it sent {chunks} chunks but {} arrived",
                j.received
            )));
        }
        j.total_chunks = Some(chunks);
        self.finish_if_done(job);
        Ok(())
    }

    /// Cancels `job` if it belongs to `principal`, whichever of its
    /// connections asks; the client that submitted it, if another, is told.
    pub fn handle_cancel(&mut self, client: ClientId, principal: &str, job: JobId) {
        let by = format!("another client of {principal} (fleetmap jobs cancel)");
        self.cancel(Some(client), principal, job, &by);
    }

    /// Cancels `job` if it belongs to `principal`, for someone other than
    /// a client connection (the dashboard), named `by` to the job's caller;
    /// whether there was such a job.
    pub fn cancel_for(&mut self, principal: &str, job: JobId, by: &str) -> bool {
        self.cancel(None, principal, job, by)
    }

    fn cancel(&mut self, client: Option<ClientId>, principal: &str, job: JobId, by: &str) -> bool {
        if self.cancel_orphan(job, principal, by) {
            return true;
        }
        let Some(j) = self.jobs.get(&job).filter(|j| j.spec.principal == principal) else {
            return false;
        };
        let owner = j.client;
        let who = if Some(owner) == client { "its caller" } else { by };
        self.stop_job(job, JobState::Cancelled(format!("by {who}")));
        if Some(owner) != client {
            let reason = format!("job {job} was cancelled by {by}");
            self.send_to_client(
                owner,
                CoordinatorToClient::JobFailed {
                    job,
                    kind: FailureKind::Cancelled,
                    reason,
                },
            );
        }
        true
    }

    /// A client asks for its principal's jobs: the running ones and the
    /// last ones that ended. No other principal's job is named in the
    /// answer.
    pub fn handle_list_jobs(&mut self, client: ClientId, principal: &str, request: RequestId) {
        let jobs = self.jobs_of(principal);
        self.send_to_client(client, CoordinatorToClient::Jobs { request, jobs });
    }

    /// `principal`'s jobs: the recent ones that ended, those waiting for
    /// their client and the running ones.
    pub fn jobs_of(&self, principal: &str) -> Vec<JobStatus> {
        let mut jobs: Vec<JobStatus> = self
            .recent
            .iter()
            .map(|(j, _)| j)
            .filter(|j| j.principal == principal)
            .cloned()
            .collect();
        jobs.extend(
            self.orphans
                .values()
                .filter(|o| o.status.principal == principal)
                .map(|o| o.status.clone()),
        );
        jobs.extend(
            self.jobs
                .iter()
                .filter(|(_, j)| j.spec.principal == principal)
                .map(|(&id, _)| self.job_status(id, JobState::Running)),
        );
        jobs
    }

    /// Job `id` as listings show it, in `state`.
    fn job_status(&self, id: JobId, state: JobState) -> JobStatus {
        let j = &self.jobs[&id];
        let mut slots_on: BTreeMap<&str, u32> = BTreeMap::new();
        for s in j.slots.values().filter(|s| !s.draining) {
            if let Some(node) = self.nodes.get(&s.node) {
                *slots_on.entry(node.name.as_str()).or_default() += 1;
            }
        }
        let mut names: BTreeSet<&str> = slots_on.keys().copied().collect();
        names.extend(j.per_node.keys().map(String::as_str));
        let per_node = names
            .into_iter()
            .map(|node| {
                let (done, failed) = j.per_node.get(node).copied().unwrap_or((0, 0));
                NodeProgress {
                    node: node.to_string(),
                    slots: slots_on.get(node).copied().unwrap_or(0),
                    inputs_done: done,
                    inputs_failed: failed,
                }
            })
            .collect();
        let ended = (state != JobState::Running).then(unix_now);
        JobStatus {
            job: id,
            principal: j.spec.principal.clone(),
            name: j.spec.name.clone(),
            state,
            started: j.started,
            ended,
            slots: j.active_slots,
            nodes: j.slots.values().map(|s| s.node).collect::<BTreeSet<_>>().len() as u32,
            inputs_done: j.inputs_done,
            total_inputs: j.spec.total_inputs,
            inputs_failed: j.per_node.values().map(|&(_, failed)| failed).sum(),
            call: j.spec.call,
            per_node,
            failures: j.failures.clone(),
        }
    }

    /// Keeps job `id`'s listing, as it ends in `state`, among the recent
    /// ones.
    fn remember_ended(&mut self, id: JobId, state: JobState) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let token = job.resume.map(|(token, _)| token);
        let status = self.job_status(id, JobState::Running);
        self.remember_status(status, state, token);
    }

    /// The shell found that `client` has more waiting to be sent to it
    /// than its budget (`over`), or that it has read it down again. While
    /// over, its jobs get no credit, so it cannot make the coordinator hold
    /// outputs it does not read.
    pub fn handle_client_backlog(&mut self, client: ClientId, over: bool) {
        let changed = if over {
            self.backlogged.insert(client)
        } else {
            self.backlogged.remove(&client)
        };
        if !changed {
            return;
        }
        let mut credits = Vec::new();
        for (&id, job) in self.jobs.iter_mut().filter(|(_, j)| j.client == client) {
            job.backlogged = over;
            if !over && job.announced {
                credits.push((id, job.top_up()));
            }
        }
        for (job, chunks) in credits.into_iter().filter(|c| c.1 > 0) {
            self.send_to_client(client, CoordinatorToClient::Credit { job, chunks });
        }
    }

    /// A node reports a finished chunk. Reports that cross a stop on the
    /// wire (a job ended, a slot given back, the node already lost) are
    /// dropped, so no input ever yields two outcomes. A report that no
    /// honest node could send (another node's slot, a chunk this slot does
    /// not hold, a payload over the limit) is a violation: the shell
    /// disconnects the node and its chunks run elsewhere. What the client
    /// gets names the chunk's inputs and node from the coordinator's own
    /// record, never from the node's word.
    pub fn handle_chunk_done(
        &mut self,
        node: NodeId,
        job: JobId,
        slot: SlotId,
        mut output: OutputChunk,
    ) -> Result<(), ProtocolViolation> {
        let Some(node_name) = self.nodes.get(&node).map(|n| n.name.clone()) else {
            return Ok(()); // Sent before the node was lost.
        };
        if output.payload.len() > self.max_payload {
            return Err(ProtocolViolation(format!(
                "job {job}: the output of chunk {} is {} bytes, over the limit of {} bytes",
                output.chunk,
                output.payload.len(),
                self.max_payload
            )));
        }
        let Some(j) = self.jobs.get_mut(&job) else {
            return Ok(());
        };
        let inputs = j.in_flight.get(&output.chunk).map(|(_, c)| c.count);
        let Some(s) = owned_slot(j, job, slot, node)? else {
            return Ok(());
        };
        let (Some(pos), Some(inputs)) = (s.chunks.iter().position(|&c| c == output.chunk), inputs) else {
            return Err(ProtocolViolation(format!(
                "job {job}: node reported chunk {} done on slot {slot}, which does not hold it",
                output.chunk
            )));
        };
        // Checked before anything changes: the chunk must still be the
        // slot's when the node is disconnected, so that it runs elsewhere.
        if output.failed > inputs {
            return Err(ProtocolViolation(format!(
                "job {job}: node reported {} failures in chunk {} of {inputs} inputs",
                output.failed, output.chunk
            )));
        }
        s.chunks.remove(pos);
        let release = s.draining && s.chunks.is_empty();
        let draining = s.draining;
        let Some((_, sent)) = j.in_flight.remove(&output.chunk) else {
            unreachable!("chunk {} is held by a slot, so it is in flight", output.chunk);
        };
        output.first_input = sent.first_input;
        output.count = sent.count;
        output.node = node_name;
        if !draining {
            j.ready.push_back(slot);
        }
        j.in_system_bytes -= sent.payload.len() as u64;
        j.inputs_done += u64::from(sent.count);
        self.counters.inputs_done += u64::from(sent.count);
        self.counters.inputs_failed += u64::from(output.failed);
        let on_node = j.per_node.entry(output.node.clone()).or_default();
        on_node.0 += u64::from(sent.count);
        on_node.1 += u64::from(output.failed);
        j.losses.remove(&output.chunk);
        j.in_system -= 1;
        j.finished += 1;
        let client = j.client;
        let credit = j.top_up();
        if j.detached {
            self.out.push_back(Command::Store(Store::Keep { job, output }));
        } else {
            self.send_to_client(client, CoordinatorToClient::Output { job, output });
        }
        if credit > 0 {
            self.send_to_client(client, CoordinatorToClient::Credit { job, chunks: credit });
        }
        self.dispatch(job);
        if release {
            self.release_slot(job, slot);
            self.grow_jobs();
        }
        self.finish_if_done(job);
        Ok(())
    }

    /// A slot's worker could not start or died. The job stops at its first
    /// failure, as a local map would.
    pub fn handle_slot_failed(
        &mut self,
        node: NodeId,
        job: JobId,
        slot: SlotId,
        kind: FailureKind,
        reason: String,
    ) -> Result<(), ProtocolViolation> {
        if !self.nodes.contains_key(&node) {
            return Ok(());
        }
        let Some(j) = self.jobs.get_mut(&job) else {
            return Ok(());
        };
        if owned_slot(j, job, slot, node)?.is_some() {
            self.fail_job(job, kind, reason);
        }
        Ok(())
    }

    /// A client asks what the fleet looks like.
    pub fn handle_status(&mut self, client: ClientId, request: RequestId) {
        let nodes = self.node_statuses();
        let jobs = self.jobs.len() as u32;
        self.send_to_client(client, CoordinatorToClient::Status { request, nodes, jobs });
    }

    /// Each node with its free resources and isolation.
    pub fn node_statuses(&self) -> Vec<NodeStatus> {
        self.nodes
            .values()
            .map(|n| NodeStatus {
                name: n.name.clone(),
                resources: n.total.clone(),
                free_cores: n.free.cores,
                free_memory_bytes: n.free.memory,
                free_gpus: n.free.gpus,
                isolation: n.isolation.description.clone(),
            })
            .collect()
    }

    /// A line a call printed goes to the job's client, if the node runs a
    /// slot of that job (a line that crosses the slot's stop is dropped),
    /// under the node's name as the coordinator knows it.
    pub fn handle_log(&mut self, node: NodeId, mut line: LogLine) {
        let Some(name) = self.nodes.get(&node).map(|n| &n.name) else {
            return;
        };
        let Some(j) = self.jobs.get(&line.job) else {
            return;
        };
        if j.slots.values().any(|s| s.node == node) {
            line.node.clone_from(name);
            let client = j.client;
            self.send_to_client(client, CoordinatorToClient::Log(line));
        }
    }

    /// A detached job's output could not be kept: the job fails with why.
    pub fn fail_detached(&mut self, job: JobId, reason: String) {
        if self.jobs.get(&job).is_some_and(|j| j.detached) {
            self.fail_job(job, FailureKind::Job, reason);
        }
    }

    /// A message for a client from the shell (an answer it made itself).
    pub fn reply(&mut self, client: ClientId, msg: CoordinatorToClient) {
        self.send_to_client(client, msg);
    }

    /// The client's running job. Messages about a job that has just failed
    /// or been stopped cross the stop on the wire; they are not a violation
    /// and are dropped.
    fn client_job(&mut self, client: ClientId, job: JobId) -> Option<&mut Job> {
        self.jobs.get_mut(&job).filter(|j| j.client == client)
    }

    /// Ends a job whose inputs have all been sent and have all finished.
    fn finish_if_done(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.total_chunks == Some(job.finished) {
            let client = job.client;
            self.stop_job(id, JobState::Finished);
            self.send_to_client(client, CoordinatorToClient::JobFinished { job: id });
        }
    }

    fn send_to_client(&mut self, client: ClientId, msg: CoordinatorToClient) {
        self.out.push_back(Command::ToClient { client, msg });
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod sim;
