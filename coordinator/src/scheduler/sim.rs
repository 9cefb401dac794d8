//! Deterministic simulation of the scheduler.
//!
//! A seeded world drives [`Scheduler`] as the coordinator's shell does, over
//! a simulated network, and checks the scheduler's promises after every step:
//!
//! - **Network.** One queue per connection and direction (scheduler to a
//!   peer, a peer to the scheduler), typed by that direction as the wire is:
//!   a node's queue can only hold a node's messages. A queue is FIFO, as a
//!   QUIC stream is, but which queue moves next is random (weighted by a
//!   per-peer speed), so messages of different nodes and clients interleave
//!   arbitrarily.
//! - **Nodes** (1-6 at the start, 1-8 cores, 0.5-12 GiB) start and stop
//!   slots as told, hold the chunks sent to each slot and answer `ChunkDone`
//!   for the oldest chunk of a random slot at random times.
//! - **Clients** (1-3, each with 1-2 jobs of 1-2 cores, 1-2 GiB, parallelism
//!   `None` or 1-5, 1-60 chunks) submit at random times, send chunks only
//!   within their credit (`JobAccepted` plus `Credit`) and `InputsDone` after
//!   the last one.
//! - **Failures**, at random steps: a node dies (its queued messages are
//!   dropped, but some of what it had already sent arrives after the loss), a
//!   node joins, a client disconnects, a slot's worker fails.
//!
//! Once the failures are spent the world runs until nothing can move, and the
//! outcome is checked: every job has ended, or waits only because no node has
//! room for it.
//!
//! A failure names its seed. Replay one seed with a trace of every message:
//! `FLEETMAP_SIM_SEED=N FLEETMAP_SIM_TRACE=1 cargo test -p fleetmap-coordinator sim:: -- --nocapture`.
//! `FLEETMAP_SIM_SEEDS=N` runs more (or fewer) seeds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use fleetmap_protocol::{CallRequest, ClientToCoordinator, InputIndex, NodeToCoordinator, Resumable, RuntimeSpec};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::*;

const GIB: u64 = 1 << 30;

/// Seeds the invariants test runs by default.
const SEEDS: u64 = 1000;

/// Actions a world may take before it must have come to rest.
const MAX_STEPS: u64 = 200_000;

/// Panics with the seed and step, so that the failure can be replayed.
macro_rules! fail {
    ($world:expr, $($msg:tt)+) => {
        panic!(
            "seed {} (step {}): {}\n  replay: FLEETMAP_SIM_SEED={} FLEETMAP_SIM_TRACE=1 \
             cargo test -p fleetmap-coordinator sim:: -- --nocapture",
            $world.seed,
            $world.stats.steps,
            format!($($msg)+),
            $world.seed
        )
    };
}

macro_rules! check {
    ($world:expr, $cond:expr, $($msg:tt)+) => {
        if !$cond {
            fail!($world, $($msg)+);
        }
    };
}

/// What one seeded world did; also a fingerprint of the run for replays.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Stats {
    pub steps: u64,
    pub jobs: u64,
    pub finished: u64,
    pub failed: u64,
    pub rejected: u64,
    /// Jobs ended by their client's disconnect.
    pub cancelled: u64,
    pub outputs: u64,
    pub nodes_lost: u64,
    pub nodes_joined: u64,
    pub clients_lost: u64,
    pub slot_failures: u64,
    /// Messages of a node delivered after the scheduler was told it was lost.
    pub late_messages: u64,
    /// Slots given back for another job's fair share.
    pub stopped_slots: u64,
    /// FNV-1a over every action and command, to compare replays.
    pub fingerprint: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.jobs += o.jobs;
        self.finished += o.finished;
        self.failed += o.failed;
        self.rejected += o.rejected;
        self.cancelled += o.cancelled;
        self.outputs += o.outputs;
        self.nodes_lost += o.nodes_lost;
        self.nodes_joined += o.nodes_joined;
        self.clients_lost += o.clients_lost;
        self.slot_failures += o.slot_failures;
        self.late_messages += o.late_messages;
        self.stopped_slots += o.stopped_slots;
        self.fingerprint ^= o.fingerprint;
    }

    fn mix(&mut self, values: &[u64]) {
        if self.fingerprint == 0 {
            self.fingerprint = 0xcbf2_9ce4_8422_2325;
        }
        for v in values {
            for byte in v.to_le_bytes() {
                self.fingerprint = (self.fingerprint ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
}

/// Runs one seeded world to rest, checking every invariant on the way.
pub(super) fn run_seed(seed: u64) -> Stats {
    World::new(seed, std::env::var_os("FLEETMAP_SIM_TRACE").is_some()).run()
}

/// The other end of a connection to the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Node(NodeId),
    Client(ClientId),
}

#[derive(Debug, Clone, Copy)]
enum Action {
    /// The head of a peer's queue reaches the scheduler.
    ToScheduler(Peer),
    /// The head of the scheduler's queue to a peer reaches it.
    FromScheduler(Peer),
    /// A node finishes a chunk.
    NodeWork(NodeId),
    /// A client sends its next message.
    ClientSend(ClientId),
}

#[derive(Debug, Clone, Copy)]
enum Event {
    KillNode,
    JoinNode,
    DisconnectClient(ClientId),
    FailSlot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Rejected,
    Finished,
    Failed,
    Cancelled,
}

/// A node daemon as the scheduler's messages shape it.
#[derive(Debug)]
struct SimNode {
    name: String,
    cores: u32,
    memory: u64,
    alive: bool,
    speed: u32,
    /// Started slots per job, with the call they were started for.
    jobs: BTreeMap<JobId, (CallRequest, BTreeSet<SlotId>)>,
    /// Chunks per slot: `RunChunk` received, `ChunkDone` not yet sent.
    held: BTreeMap<(JobId, SlotId), VecDeque<InputChunk>>,
    /// Slots whose worker failed: they hold their chunks and run none.
    failed: BTreeSet<(JobId, SlotId)>,
}

impl SimNode {
    /// Cores and memory of the slots started here and not stopped.
    fn used(&self) -> (u32, u64) {
        self.jobs.values().fold((0, 0), |(c, m), (call, slots)| {
            (
                c + call.cores * slots.len() as u32,
                m + call.memory_bytes * slots.len() as u64,
            )
        })
    }

    fn runnable(&self) -> impl Iterator<Item = (JobId, SlotId)> + '_ {
        self.held
            .iter()
            .filter(|(k, q)| !q.is_empty() && !self.failed.contains(k))
            .map(|(&k, _)| k)
    }
}

/// One job as its client sees it.
#[derive(Debug)]
struct ClientJob {
    spec: JobSpec,
    chunks: u64,
    inputs_per_chunk: u32,
    submit_at: u64,
    submitted: bool,
    job: Option<JobId>,
    credit: u64,
    next: u64,
    done_sent: bool,
    outputs: BTreeSet<ChunkId>,
    outcome: Option<Outcome>,
}

impl ClientJob {
    fn can_send(&self, step: u64) -> bool {
        if self.outcome.is_some() {
            false
        } else if !self.submitted {
            self.submit_at <= step
        } else {
            self.job.is_some() && !self.done_sent && (self.next == self.chunks || self.credit > 0)
        }
    }
}

#[derive(Debug)]
struct SimClient {
    alive: bool,
    speed: u32,
    /// Indexed by the submit's request number.
    jobs: Vec<ClientJob>,
}

/// The chunk a client sends; outputs echo it, so each can be matched.
fn input(client: ClientId, request: usize, chunk: ChunkId, per: u32) -> InputChunk {
    InputChunk {
        chunk,
        first_input: InputIndex(chunk.0 * per as u64),
        count: per,
        payload: vec![client.0 as u8, request as u8, chunk.0 as u8, (chunk.0 >> 8) as u8],
    }
}

/// A message's name, whatever its direction, for failures and the
/// fingerprint.
trait Kind {
    /// The variant's name. Its length goes into the fingerprint, so the
    /// names are those the protocol's single `Message` enum had, and seeds
    /// replay as they did before the protocol was split per direction.
    fn kind(&self) -> &'static str;
}

/// The job a message of the scheduler's is about.
trait AboutJob {
    fn job(&self) -> Option<JobId>;
}

impl Kind for CoordinatorToNode {
    fn kind(&self) -> &'static str {
        match self {
            CoordinatorToNode::StartSlots { .. } => "StartSlots",
            CoordinatorToNode::RunChunk { .. } => "RunChunk",
            CoordinatorToNode::StopJob { .. } => "StopJob",
            CoordinatorToNode::StopSlot { .. } => "StopSlot",
            CoordinatorToNode::Certificate { .. } => "Certificate",
        }
    }
}

impl AboutJob for CoordinatorToNode {
    fn job(&self) -> Option<JobId> {
        match self {
            CoordinatorToNode::StartSlots { job, .. }
            | CoordinatorToNode::RunChunk { job, .. }
            | CoordinatorToNode::StopJob { job, .. }
            | CoordinatorToNode::StopSlot { job, .. } => Some(*job),
            CoordinatorToNode::Certificate { .. } => None,
        }
    }
}

impl Kind for CoordinatorToClient {
    fn kind(&self) -> &'static str {
        match self {
            CoordinatorToClient::Status { .. } => "Status",
            CoordinatorToClient::JobAccepted { .. } => "JobAccepted",
            CoordinatorToClient::JobRejected { .. } => "JobRejected",
            CoordinatorToClient::Credit { .. } => "Credit",
            CoordinatorToClient::Output { .. } => "Output",
            CoordinatorToClient::Log(_) => "Log",
            CoordinatorToClient::JobFinished { .. } => "JobFinished",
            CoordinatorToClient::JobFailed { .. } => "JobFailed",
            CoordinatorToClient::Jobs { .. } => "Jobs",
            CoordinatorToClient::Results { .. } => "Results",
            CoordinatorToClient::NoResults { .. } => "NoResults",
        }
    }
}

impl AboutJob for CoordinatorToClient {
    fn job(&self) -> Option<JobId> {
        match self {
            CoordinatorToClient::JobAccepted { job, .. }
            | CoordinatorToClient::Credit { job, .. }
            | CoordinatorToClient::Output { job, .. }
            | CoordinatorToClient::JobFinished { job }
            | CoordinatorToClient::JobFailed { job, .. } => Some(*job),
            CoordinatorToClient::Log(line) => Some(line.job),
            CoordinatorToClient::Status { .. }
            | CoordinatorToClient::JobRejected { .. }
            | CoordinatorToClient::Jobs { .. }
            | CoordinatorToClient::Results { .. }
            | CoordinatorToClient::NoResults { .. } => None,
        }
    }
}

impl Kind for NodeToCoordinator {
    fn kind(&self) -> &'static str {
        match self {
            NodeToCoordinator::ChunkDone { .. } => "ChunkDone",
            NodeToCoordinator::SlotFailed { .. } => "SlotFailed",
            NodeToCoordinator::Log(_) => "Log",
        }
    }
}

impl Kind for ClientToCoordinator {
    fn kind(&self) -> &'static str {
        match self {
            ClientToCoordinator::SubmitJob { .. } => "SubmitJob",
            ClientToCoordinator::Inputs { .. } => "Inputs",
            ClientToCoordinator::InputsDone { .. } => "InputsDone",
            ClientToCoordinator::CancelJob { .. } => "CancelJob",
            ClientToCoordinator::StatusRequest { .. } => "StatusRequest",
            ClientToCoordinator::ListJobs { .. } => "ListJobs",
            ClientToCoordinator::FetchResults { .. } => "FetchResults",
        }
    }
}

/// The simulated network: one FIFO queue per connection and direction, each
/// typed by its direction.
#[derive(Debug, Default)]
struct Network {
    node_to_sched: BTreeMap<NodeId, VecDeque<NodeToCoordinator>>,
    client_to_sched: BTreeMap<ClientId, VecDeque<ClientToCoordinator>>,
    sched_to_node: BTreeMap<NodeId, VecDeque<CoordinatorToNode>>,
    sched_to_client: BTreeMap<ClientId, VecDeque<CoordinatorToClient>>,
}

struct World {
    seed: u64,
    rng: StdRng,
    trace: bool,
    /// Simulated time: actions taken, plus idle time skipped.
    now: u64,
    sched: Scheduler,
    /// Every node ever joined, dead ones included (their late messages).
    nodes: BTreeMap<NodeId, SimNode>,
    next_node: NodeId,
    clients: BTreeMap<ClientId, SimClient>,
    net: Network,
    /// Failures to inject, by time.
    events: VecDeque<(u64, Event)>,
    /// The client of every job the scheduler accepted.
    owner: BTreeMap<JobId, ClientId>,
    /// Jobs the scheduler ended (finished, failed, or cancelled by a
    /// disconnect): nothing more may be sent about them.
    ended: BTreeSet<JobId>,
    stats: Stats,
}

impl World {
    fn new(seed: u64, trace: bool) -> Self {
        let mut w = World {
            seed,
            rng: StdRng::seed_from_u64(seed),
            trace,
            now: 0,
            sched: Scheduler::new(),
            nodes: BTreeMap::new(),
            next_node: NodeId(1),
            clients: BTreeMap::new(),
            net: Network::default(),
            events: VecDeque::new(),
            owner: BTreeMap::new(),
            ended: BTreeSet::new(),
            stats: Stats::default(),
        };
        // Most worlds have one node that can host any call of the jobs below.
        let nodes = w.rng.random_range(1..=6);
        for i in 0..nodes {
            let big = i == 0 && w.rng.random_bool(0.9);
            w.join_node(big);
        }
        let mut total_chunks = 0;
        for c in 0..w.rng.random_range(1..=3u64) {
            let client = ClientId(100 + c);
            let jobs = (0..w.rng.random_range(1..=2))
                .map(|_| {
                    let chunks = w.rng.random_range(1..=60);
                    total_chunks += chunks;
                    let inputs_per_chunk = w.rng.random_range(1..=8);
                    let spec = JobSpec {
                        principal: String::new(),
                        job_key: String::new(),
                        parent: None,
                        call: CallRequest {
                            cores: w.rng.random_range(1..=2),
                            memory_bytes: w.rng.random_range(1..=2) * GIB,
                            gpus: 0,
                            require_isolation: false,
                        },
                        parallelism: w.rng.random_bool(0.5).then(|| w.rng.random_range(1..=5)),
                        total_inputs: w.rng.random_bool(0.5).then_some(chunks * inputs_per_chunk as u64),
                        name: "job".into(),
                        runtime: RuntimeSpec::Python {
                            executable: "python3".into(),
                            version: "3.11".into(),
                            function: vec![7],
                            environment: None,
                            sources: None,
                            image: None,
                        },
                    };
                    ClientJob {
                        spec,
                        chunks,
                        inputs_per_chunk,
                        submit_at: if w.rng.random_bool(0.5) {
                            0
                        } else {
                            w.rng.random_range(0..1000)
                        },
                        submitted: false,
                        job: None,
                        credit: 0,
                        next: 0,
                        done_sent: false,
                        outputs: BTreeSet::new(),
                        outcome: None,
                    }
                })
                .collect();
            let speed = w.rng.random_range(1..=4);
            w.clients.insert(
                client,
                SimClient {
                    alive: true,
                    speed,
                    jobs,
                },
            );
        }
        // Failures fall within the time the jobs roughly take.
        let horizon = total_chunks * 6 + 50;
        let mut events = Vec::new();
        for _ in 0..w.rng.random_range(0..=2) {
            events.push((w.rng.random_range(0..horizon), Event::KillNode));
        }
        for _ in 0..w.rng.random_range(0..=2) {
            events.push((w.rng.random_range(0..horizon), Event::JoinNode));
        }
        let clients: Vec<ClientId> = w.clients.keys().copied().collect();
        for c in clients {
            if w.rng.random_bool(0.15) {
                events.push((w.rng.random_range(0..horizon), Event::DisconnectClient(c)));
            }
        }
        if w.rng.random_bool(0.15) {
            events.push((w.rng.random_range(0..horizon), Event::FailSlot));
        }
        events.sort_by_key(|e| e.0);
        w.events = events.into();
        w
    }

    fn run(mut self) -> Stats {
        loop {
            while self.events.front().is_some_and(|e| e.0 <= self.now) {
                let (_, event) = self.events.pop_front().expect("front checked");
                self.inject(event);
            }
            if self.act() {
                self.now += 1;
                check!(self, self.stats.steps < MAX_STEPS, "no rest after {MAX_STEPS} steps");
                continue;
            }
            // Nothing can move: skip to the next failure or submission, if any.
            let next_submit = self
                .clients
                .values()
                .filter(|c| c.alive)
                .flat_map(|c| &c.jobs)
                .filter(|j| !j.submitted)
                .map(|j| j.submit_at)
                .min();
            let next_event = self.events.front().map(|e| e.0);
            match next_submit.into_iter().chain(next_event).min() {
                Some(t) => self.now = t.max(self.now + 1),
                None => break,
            }
        }
        self.check_at_rest();
        for job in self.clients.values().flat_map(|c| &c.jobs) {
            self.stats.jobs += 1;
            match job.outcome {
                Some(Outcome::Finished) => self.stats.finished += 1,
                Some(Outcome::Failed) => self.stats.failed += 1,
                Some(Outcome::Rejected) => self.stats.rejected += 1,
                Some(Outcome::Cancelled) => self.stats.cancelled += 1,
                None => {}
            }
        }
        self.stats
    }

    /// Takes one random action; false when nothing can move.
    fn act(&mut self) -> bool {
        let mut actions: Vec<(Action, u32)> = Vec::new();
        // Nodes before clients, the order of queues keyed by `Peer` before
        // the queues were typed, so that a seed replays as it did then.
        for (&n, q) in &self.net.node_to_sched {
            if !q.is_empty() {
                actions.push((Action::ToScheduler(Peer::Node(n)), self.nodes[&n].speed));
            }
        }
        for (&c, q) in &self.net.client_to_sched {
            if !q.is_empty() {
                actions.push((Action::ToScheduler(Peer::Client(c)), self.clients[&c].speed));
            }
        }
        for (&n, q) in &self.net.sched_to_node {
            if !q.is_empty() {
                actions.push((Action::FromScheduler(Peer::Node(n)), self.nodes[&n].speed));
            }
        }
        for (&c, q) in &self.net.sched_to_client {
            if !q.is_empty() {
                actions.push((Action::FromScheduler(Peer::Client(c)), self.clients[&c].speed));
            }
        }
        for (&id, n) in &self.nodes {
            if n.alive && n.runnable().next().is_some() {
                actions.push((Action::NodeWork(id), n.speed));
            }
        }
        for (&id, c) in &self.clients {
            if c.alive && c.jobs.iter().any(|j| j.can_send(self.now)) {
                actions.push((Action::ClientSend(id), c.speed));
            }
        }
        let total: u32 = actions.iter().map(|a| a.1).sum();
        if total == 0 {
            return false;
        }
        let mut pick = self.rng.random_range(0..total);
        let (action, _) = *actions
            .iter()
            .find(|&&(_, weight)| {
                let hit = pick < weight;
                pick = pick.saturating_sub(weight);
                hit
            })
            .expect("pick is below the total weight");
        self.stats.steps += 1;
        let (kind, id) = match action {
            Action::ToScheduler(Peer::Node(n)) => (0, n.0),
            Action::ToScheduler(Peer::Client(c)) => (1, c.0),
            Action::FromScheduler(Peer::Node(n)) => (2, n.0),
            Action::FromScheduler(Peer::Client(c)) => (3, c.0),
            Action::NodeWork(n) => (4, n.0),
            Action::ClientSend(c) => (5, c.0),
        };
        self.stats.mix(&[kind, id]);
        match action {
            Action::ToScheduler(p) => self.deliver_to_scheduler(p),
            Action::FromScheduler(Peer::Node(n)) => {
                let msg = self
                    .net
                    .sched_to_node
                    .get_mut(&n)
                    .and_then(|q| q.pop_front())
                    .expect("queue checked non-empty");
                if self.trace {
                    eprintln!("{:>6} scheduler -> {:?}: {msg:?}", self.now, Peer::Node(n));
                }
                self.node_receive(n, msg);
            }
            Action::FromScheduler(Peer::Client(c)) => {
                let msg = self
                    .net
                    .sched_to_client
                    .get_mut(&c)
                    .and_then(|q| q.pop_front())
                    .expect("queue checked non-empty");
                if self.trace {
                    eprintln!("{:>6} scheduler -> {:?}: {msg:?}", self.now, Peer::Client(c));
                }
                self.client_receive(c, msg);
            }
            Action::NodeWork(n) => self.node_work(n),
            Action::ClientSend(c) => self.client_send(c),
        }
        true
    }

    fn inject(&mut self, event: Event) {
        if self.trace {
            eprintln!("{:>6} EVENT {event:?}", self.now);
        }
        match event {
            Event::KillNode => {
                let alive: Vec<NodeId> = self.nodes.iter().filter(|(_, n)| n.alive).map(|(&k, _)| k).collect();
                // Keep a node most of the time; losing the last one is rarer.
                if alive.is_empty() || (alive.len() == 1 && self.rng.random_bool(0.8)) {
                    return;
                }
                let id = alive[self.rng.random_range(0..alive.len())];
                self.kill_node(id);
            }
            Event::JoinNode => {
                self.join_node(false);
                self.stats.nodes_joined += 1;
            }
            Event::DisconnectClient(c) => self.disconnect(c),
            Event::FailSlot => {
                let started: Vec<(NodeId, JobId, SlotId)> = self
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.alive)
                    .flat_map(|(&id, n)| {
                        n.jobs
                            .iter()
                            .flat_map(move |(&job, (_, slots))| slots.iter().map(move |&slot| (id, job, slot)))
                            .filter(|&(_, job, slot)| !n.failed.contains(&(job, slot)))
                    })
                    .collect();
                if started.is_empty() {
                    return;
                }
                let (node, job, slot) = started[self.rng.random_range(0..started.len())];
                self.nodes
                    .get_mut(&node)
                    .expect("alive node")
                    .failed
                    .insert((job, slot));
                let reason = format!("worker of slot {slot} died");
                self.send_from_node(
                    node,
                    NodeToCoordinator::SlotFailed {
                        job,
                        slot,
                        kind: FailureKind::Job,
                        reason,
                    },
                );
                self.stats.slot_failures += 1;
            }
        }
    }

    fn join_node(&mut self, big: bool) {
        let id = self.next_node;
        self.next_node = NodeId(id.0 + 1);
        let (cores, memory) = if big {
            (self.rng.random_range(2..=8), self.rng.random_range(4..=24) * GIB / 2)
        } else {
            (self.rng.random_range(1..=8), self.rng.random_range(1..=24) * GIB / 2)
        };
        let name = format!("n{id}");
        self.nodes.insert(
            id,
            SimNode {
                name: name.clone(),
                cores,
                memory,
                alive: true,
                speed: self.rng.random_range(1..=4),
                jobs: BTreeMap::new(),
                held: BTreeMap::new(),
                failed: BTreeSet::new(),
            },
        );
        let resources = Resources {
            cores,
            memory_bytes: memory,
            gpus: vec![],
        };
        self.sched
            .handle_node_joined(id, name, resources, NodeIsolation::default());
        self.drain();
    }

    /// The node dies: what the scheduler queued for it is gone, and of what
    /// it had sent, a prefix may still arrive after the loss.
    fn kill_node(&mut self, id: NodeId) {
        // Often it had just finished some chunks, whose results are on the wire.
        if self.rng.random_bool(0.5) {
            let finished = self.rng.random_range(0..=self.nodes[&id].runnable().count());
            for _ in 0..finished {
                self.node_work(id);
            }
        }
        let node = self.nodes.get_mut(&id).expect("alive node");
        node.alive = false;
        node.jobs.clear();
        node.held.clear();
        self.net.sched_to_node.remove(&id);
        if let Some(q) = self.net.node_to_sched.get_mut(&id) {
            let keep = if self.rng.random_bool(0.6) {
                self.rng.random_range(0..=q.len())
            } else {
                0
            };
            q.truncate(keep);
        }
        self.stats.nodes_lost += 1;
        self.sched.handle_node_lost(id);
        self.drain();
    }

    fn disconnect(&mut self, c: ClientId) {
        let client = self.clients.get_mut(&c).expect("client of the world");
        if !client.alive {
            return;
        }
        client.alive = false;
        for job in &mut client.jobs {
            job.outcome.get_or_insert(Outcome::Cancelled);
        }
        self.net.client_to_sched.remove(&c);
        self.net.sched_to_client.remove(&c);
        self.stats.clients_lost += 1;
        self.sched.handle_client_lost(c, false);
        self.drain();
        let jobs: Vec<JobId> = self.owner.iter().filter(|(_, &o)| o == c).map(|(&j, _)| j).collect();
        for job in jobs {
            check!(
                self,
                self.sched.client_of(job).is_none(),
                "job {job} still runs after its client {c} disconnected"
            );
            self.ended.insert(job);
        }
    }

    fn send_from_node(&mut self, node: NodeId, msg: NodeToCoordinator) {
        self.net.node_to_sched.entry(node).or_default().push_back(msg);
    }

    fn send_from_client(&mut self, client: ClientId, msg: ClientToCoordinator) {
        self.net.client_to_sched.entry(client).or_default().push_back(msg);
    }

    fn deliver_to_scheduler(&mut self, from: Peer) {
        match from {
            Peer::Node(node) => {
                let msg = self
                    .net
                    .node_to_sched
                    .get_mut(&node)
                    .and_then(|q| q.pop_front())
                    .expect("queue checked non-empty");
                if self.trace {
                    eprintln!("{:>6} {from:?} -> scheduler: {msg:?}", self.now);
                }
                let late = !self.nodes[&node].alive;
                let handled = match msg {
                    NodeToCoordinator::ChunkDone { job, slot, output } => {
                        self.sched.handle_chunk_done(node, job, slot, output)
                    }
                    NodeToCoordinator::SlotFailed {
                        job,
                        slot,
                        kind,
                        reason,
                    } => self.sched.handle_slot_failed(node, job, slot, kind, reason),
                    other => fail!(self, "the simulated node sent {}", other.kind()),
                };
                if let Err(violation) = handled {
                    fail!(self, "an honest node's message was refused as a violation: {violation}");
                }
                let outputs = self.drain();
                if late {
                    self.stats.late_messages += 1;
                    check!(
                        self,
                        outputs == 0,
                        "a result of node {node}, delivered after the node was lost, reached the client"
                    );
                }
            }
            Peer::Client(client) => {
                let msg = self
                    .net
                    .client_to_sched
                    .get_mut(&client)
                    .and_then(|q| q.pop_front())
                    .expect("queue checked non-empty");
                if self.trace {
                    eprintln!("{:>6} {from:?} -> scheduler: {msg:?}", self.now);
                }
                let result = match msg {
                    ClientToCoordinator::SubmitJob {
                        request,
                        spec,
                        first: Some(chunk),
                        only,
                        resumable,
                    } => self
                        .sched
                        .handle_submit_with_first(client, request, *spec, chunk, only, &resumable),
                    ClientToCoordinator::SubmitJob { request, spec, .. } => {
                        self.sched.handle_submit(client, request, *spec);
                        Ok(())
                    }
                    ClientToCoordinator::Inputs { job, chunk } => self.sched.handle_inputs(client, job, chunk),
                    ClientToCoordinator::InputsDone { job, chunks } => {
                        self.sched.handle_inputs_done(client, job, chunks)
                    }
                    other => fail!(self, "the simulated client sent {}", other.kind()),
                };
                if let Err(e) = result {
                    fail!(self, "client {client} kept within its credit but was refused: {e}");
                }
                self.drain();
            }
        }
    }

    /// Routes the scheduler's commands, checking each; returns how many
    /// `Output`s there were. That a node gets only messages for nodes, and
    /// a client only messages for clients, the types of `Command` ensure.
    fn drain(&mut self) -> usize {
        let mut outputs = 0;
        while let Some(cmd) = self.sched.poll_command() {
            if self.trace {
                eprintln!("{:>6}   emit {cmd:?}", self.now);
            }
            if let Command::Store(store) = &cmd {
                // The simulated clients submit no detached job: only a
                // listing leaving the recent ones says so.
                check!(
                    self,
                    matches!(store, Store::Forget { .. }),
                    "{store:?} for a job that is not detached"
                );
                continue;
            }
            let (peer, kind, job) = match &cmd {
                Command::ToNode { node, msg } => (Peer::Node(*node), msg.kind(), msg.job()),
                Command::ToClient { client, msg } => (Peer::Client(*client), msg.kind(), msg.job()),
                Command::Store(_) => unreachable!("handled above"),
            };
            let (code, id) = match peer {
                Peer::Node(n) => (10, n.0),
                Peer::Client(c) => (11, c.0),
            };
            self.stats
                .mix(&[code, id, job.map_or(u64::MAX, |j| j.0), kind.len() as u64]);
            if let Some(job) = job {
                check!(
                    self,
                    !self.ended.contains(&job),
                    "{kind} for job {job} sent to {peer:?} after the job ended"
                );
            }
            match cmd {
                Command::ToNode { node, msg } => {
                    check!(
                        self,
                        self.nodes.get(&node).is_some_and(|n| n.alive),
                        "{kind} sent to node {node}, which is unknown or was lost"
                    );
                    self.net.sched_to_node.entry(node).or_default().push_back(msg);
                }
                Command::ToClient { client, msg } => {
                    check!(
                        self,
                        self.clients.get(&client).is_some_and(|c| c.alive),
                        "{kind} sent to client {client}, which had disconnected"
                    );
                    match &msg {
                        CoordinatorToClient::JobAccepted { job, .. } => {
                            check!(self, !self.owner.contains_key(job), "job id {job} accepted twice");
                            self.owner.insert(*job, client);
                        }
                        CoordinatorToClient::JobRejected { .. } => {}
                        CoordinatorToClient::Credit { job, .. }
                        | CoordinatorToClient::Output { job, .. }
                        | CoordinatorToClient::JobFinished { job }
                        | CoordinatorToClient::JobFailed { job, .. } => {
                            check!(
                                self,
                                self.owner.get(job) == Some(&client),
                                "{kind} for job {job} sent to client {client}, which does not own it"
                            );
                            if matches!(msg, CoordinatorToClient::Output { .. }) {
                                outputs += 1;
                            }
                            if matches!(
                                msg,
                                CoordinatorToClient::JobFinished { .. } | CoordinatorToClient::JobFailed { .. }
                            ) {
                                self.ended.insert(*job);
                            }
                        }
                        CoordinatorToClient::Status { .. }
                        | CoordinatorToClient::Log(_)
                        | CoordinatorToClient::Jobs { .. }
                        | CoordinatorToClient::Results { .. }
                        | CoordinatorToClient::NoResults { .. } => {
                            fail!(self, "{kind} sent to client {client}")
                        }
                    }
                    self.net.sched_to_client.entry(client).or_default().push_back(msg);
                }
                Command::Store(_) => unreachable!("handled above"),
            }
        }
        outputs
    }

    fn node_receive(&mut self, id: NodeId, msg: CoordinatorToNode) {
        let node = self.nodes.get_mut(&id).expect("a node of the world");
        match msg {
            CoordinatorToNode::StartSlots { job, spec, slots } => {
                let (call, started) = node.jobs.entry(job).or_insert_with(|| (spec.call, BTreeSet::new()));
                check!(self, *call == spec.call, "job {job} changed its call on node {id}");
                for slot in slots {
                    check!(
                        self,
                        started.insert(slot),
                        "slot {slot} of job {job} started twice on node {id}"
                    );
                }
                let (cores, memory) = node.used();
                check!(
                    self,
                    cores <= node.cores,
                    "node {id} has {} cores but its started slots need {cores}: {:?}",
                    node.cores,
                    node.jobs
                );
                check!(
                    self,
                    memory <= node.memory,
                    "node {id} has {} bytes but its started slots need {memory}: {:?}",
                    node.memory,
                    node.jobs
                );
            }
            CoordinatorToNode::RunChunk { job, slot, chunk } => {
                check!(
                    self,
                    node.jobs.get(&job).is_some_and(|(_, s)| s.contains(&slot)),
                    "node {id} got chunk {} for slot {slot} of job {job}, which it was not told to start",
                    chunk.chunk
                );
                let held = node.held.entry((job, slot)).or_default();
                held.push_back(chunk);
                check!(
                    self,
                    held.len() <= SLOT_DEPTH,
                    "slot {slot} of job {job} on node {id} holds {} chunks ({:?}), more than {SLOT_DEPTH}",
                    held.len(),
                    held.iter().map(|c| c.chunk).collect::<Vec<_>>()
                );
            }
            CoordinatorToNode::StopSlot { job, slot } => {
                check!(
                    self,
                    node.jobs
                        .get_mut(&job)
                        .is_some_and(|(_, started)| started.remove(&slot)),
                    "node {id} told to stop slot {slot} of job {job}, which it does not run"
                );
                if node.jobs.get(&job).is_some_and(|(_, started)| started.is_empty()) {
                    node.jobs.remove(&job);
                }
                let held = node.held.remove(&(job, slot)).unwrap_or_default();
                check!(
                    self,
                    held.is_empty(),
                    "slot {slot} of job {job} on node {id} was stopped while holding chunks {:?}",
                    held.iter().map(|c| c.chunk).collect::<Vec<_>>()
                );
                self.stats.stopped_slots += 1;
            }
            CoordinatorToNode::Certificate { .. } => fail!(self, "the scheduler sent node {id} a certificate"),
            CoordinatorToNode::StopJob { job, .. } => {
                check!(
                    self,
                    node.jobs.remove(&job).is_some(),
                    "node {id} told to stop job {job}, which has no slots there"
                );
                node.held.retain(|&(j, _), _| j != job);
                node.failed.retain(|&(j, _)| j != job);
            }
        }
    }

    fn node_work(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("a node of the world");
        let runnable: Vec<(JobId, SlotId)> = node.runnable().collect();
        let (job, slot) = runnable[self.rng.random_range(0..runnable.len())];
        let chunk = node
            .held
            .get_mut(&(job, slot))
            .and_then(|q| q.pop_front())
            .expect("runnable slot holds a chunk");
        let output = OutputChunk {
            chunk: chunk.chunk,
            first_input: chunk.first_input,
            count: chunk.count,
            failed: 0,
            node: node.name.clone(),
            payload: chunk.payload,
        };
        self.send_from_node(id, NodeToCoordinator::ChunkDone { job, slot, output });
    }

    fn client_send(&mut self, c: ClientId) {
        let now = self.now;
        let client = self.clients.get_mut(&c).expect("a client of the world");
        let ready: Vec<usize> = (0..client.jobs.len())
            .filter(|&i| client.jobs[i].can_send(now))
            .collect();
        let request = ready[self.rng.random_range(0..ready.len())];
        let j = &mut client.jobs[request];
        let msg = if !j.submitted {
            j.submitted = true;
            // Half the jobs send their first chunk with the submission (and,
            // where it is their only one, say so there too).
            let first = (j.chunks > 0 && self.rng.random_bool(0.5)).then(|| {
                j.next = 1;
                input(c, request, ChunkId(0), j.inputs_per_chunk)
            });
            let only = first.is_some() && j.chunks == 1 && self.rng.random_bool(0.5);
            j.done_sent = only;
            ClientToCoordinator::SubmitJob {
                request: RequestId(request as u64),
                spec: Box::new(j.spec.clone()),
                first,
                only,
                resumable: Resumable::default(),
            }
        } else {
            let job = j.job.expect("sends only for an accepted job");
            if j.next < j.chunks {
                j.credit -= 1;
                j.next += 1;
                ClientToCoordinator::Inputs {
                    job,
                    chunk: input(c, request, ChunkId(j.next - 1), j.inputs_per_chunk),
                }
            } else {
                j.done_sent = true;
                ClientToCoordinator::InputsDone { job, chunks: j.chunks }
            }
        };
        self.send_from_client(c, msg);
    }

    fn client_receive(&mut self, c: ClientId, msg: CoordinatorToClient) {
        let client = self.clients.get_mut(&c).expect("a client of the world");
        let kind = msg.kind();
        match msg {
            CoordinatorToClient::JobAccepted {
                request, job, credit, ..
            } => {
                let Some(j) = client.jobs.get_mut(request.0 as usize) else {
                    fail!(
                        self,
                        "client {c} got JobAccepted for request {request}, which it never sent"
                    );
                };
                check!(
                    self,
                    j.submitted && j.job.is_none() && j.outcome.is_none(),
                    "client {c} got JobAccepted (job {job}) for request {request}, which was already answered"
                );
                j.job = Some(job);
                j.credit += credit as u64;
            }
            CoordinatorToClient::JobRejected { request, .. } => {
                let Some(j) = client.jobs.get_mut(request.0 as usize) else {
                    fail!(
                        self,
                        "client {c} got JobRejected for request {request}, which it never sent"
                    );
                };
                check!(
                    self,
                    j.submitted && j.job.is_none() && j.outcome.is_none(),
                    "client {c} got JobRejected for request {request}, which was already answered"
                );
                j.outcome = Some(Outcome::Rejected);
            }
            CoordinatorToClient::Credit { job, .. }
            | CoordinatorToClient::Output { job, .. }
            | CoordinatorToClient::JobFinished { job }
            | CoordinatorToClient::JobFailed { job, .. } => {
                let Some(request) = client.jobs.iter().position(|j| j.job == Some(job)) else {
                    fail!(self, "client {c} got {kind} for job {job} before it was accepted");
                };
                let j = &mut client.jobs[request];
                check!(
                    self,
                    j.outcome.is_none(),
                    "client {c} got {kind} for job {job} after it ended"
                );
                match msg {
                    CoordinatorToClient::Credit { chunks, .. } => j.credit += chunks as u64,
                    CoordinatorToClient::Output { output, .. } => {
                        let sent = input(c, request, output.chunk, j.inputs_per_chunk);
                        check!(
                            self,
                            output.chunk.0 < j.next
                                && (output.first_input, output.count, &output.payload)
                                    == (sent.first_input, sent.count, &sent.payload),
                            "job {job} got an output that matches no chunk it sent: {output:?}"
                        );
                        check!(
                            self,
                            j.outputs.insert(output.chunk),
                            "the output of chunk {} of job {job} was delivered twice",
                            output.chunk
                        );
                        self.stats.outputs += 1;
                    }
                    CoordinatorToClient::JobFinished { .. } => {
                        check!(
                            self,
                            j.done_sent && j.outputs.len() as u64 == j.chunks,
                            "job {job} finished with {} outputs of {} chunks (InputsDone sent: {})",
                            j.outputs.len(),
                            j.chunks,
                            j.done_sent
                        );
                        j.outcome = Some(Outcome::Finished);
                    }
                    CoordinatorToClient::JobFailed { .. } => j.outcome = Some(Outcome::Failed),
                    _ => unreachable!("matched above"),
                }
            }
            other => fail!(self, "client {c} got {}", other.kind()),
        }
    }

    /// Nothing can move any more and no failure is left to inject: every job
    /// has ended, or waits only because no node has room for one of its calls.
    fn check_at_rest(&mut self) {
        let alive: Vec<&SimNode> = self.nodes.values().filter(|n| n.alive).collect();
        let mut waiting = 0;
        for (&c, client) in self.clients.iter().filter(|(_, c)| c.alive) {
            for (request, j) in client.jobs.iter().enumerate() {
                if j.outcome.is_some() {
                    continue;
                }
                let Some(job) = j.job else {
                    fail!(self, "request {request} of client {c} was never answered");
                };
                waiting += 1;
                let call = j.spec.call;
                check!(
                    self,
                    self.sched.client_of(job) == Some(c),
                    "job {job} never ended, but the scheduler no longer holds it"
                );
                check!(
                    self,
                    self.sched.slots_of(job).is_empty(),
                    "job {job} holds slots {:?} but is stuck with {} of {} chunks sent, {} outputs",
                    self.sched.slots_of(job),
                    j.next,
                    j.chunks,
                    j.outputs.len()
                );
                check!(
                    self,
                    alive
                        .iter()
                        .any(|n| n.cores >= call.cores && n.memory >= call.memory_bytes),
                    "job {job} ({call:?}) waits forever: no live node ({:?}) can ever host one of its calls, \
                     so it should have failed",
                    alive.iter().map(|n| (n.cores, n.memory)).collect::<Vec<_>>()
                );
                for n in &alive {
                    let (cores, memory) = n.used();
                    check!(
                        self,
                        n.cores - cores < call.cores || n.memory - memory < call.memory_bytes,
                        "job {job} ({call:?}) waits although node {} has {} cores and {} bytes free",
                        n.name,
                        n.cores - cores,
                        n.memory - memory
                    );
                }
            }
        }
        check!(
            self,
            self.sched.job_count() == waiting,
            "the scheduler holds {} jobs but {waiting} are waiting",
            self.sched.job_count()
        );
        if waiting > 0 {
            return;
        }
        for n in &alive {
            check!(
                self,
                n.jobs.is_empty() && n.held.is_empty(),
                "node {} still runs slots {:?} with no job left",
                n.name,
                n.jobs
            );
        }
        check!(
            self,
            self.sched.node_count() == alive.len(),
            "the scheduler knows {} nodes, {} are alive",
            self.sched.node_count(),
            alive.len()
        );
        self.sched.handle_status(ClientId(u64::MAX), RequestId(0));
        let Some(Command::ToClient {
            msg: CoordinatorToClient::Status { nodes, .. },
            ..
        }) = self.sched.poll_command()
        else {
            fail!(self, "no status");
        };
        for n in nodes {
            check!(
                self,
                n.free_cores == n.resources.cores && n.free_memory_bytes == n.resources.memory_bytes,
                "with no job left node {} still has resources taken: {n:?}",
                n.name
            );
        }
    }
}

fn seeds_to_run() -> Vec<u64> {
    if let Some(seed) = std::env::var("FLEETMAP_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let count = std::env::var("FLEETMAP_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS);
    (0..count).collect()
}

#[test]
fn seeded_worlds_deliver_each_output_once_never_overbook_respect_credit_and_come_to_rest() {
    let seeds = seeds_to_run();
    let start = std::time::Instant::now();
    let mut total = Stats::default();
    for &seed in &seeds {
        total.add(&run_seed(seed));
    }
    eprintln!("{} seeds in {:.2?}: {total:?}", seeds.len(), start.elapsed());
    if seeds.len() as u64 >= SEEDS {
        // The worlds must reach every path they claim to check.
        for (what, count) in [
            ("finished jobs", total.finished),
            ("failed jobs", total.failed),
            ("rejected jobs", total.rejected),
            ("cancelled jobs", total.cancelled),
            ("lost nodes", total.nodes_lost),
            ("joined nodes", total.nodes_joined),
            ("late messages of lost nodes", total.late_messages),
            ("slot failures", total.slot_failures),
            ("slots given back for fair share", total.stopped_slots),
        ] {
            assert!(count >= 10, "only {count} {what} in {} seeds: {total:?}", seeds.len());
        }
    }
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [0, 1, 17, 999] {
        let first = run_seed(seed);
        assert!(first.steps > 0, "seed {seed} did nothing");
        assert_eq!(first, run_seed(seed), "seed {seed} ran differently twice");
    }
}

#[test]
#[should_panic(expected = "was delivered twice")]
fn the_simulation_catches_a_duplicated_output() {
    // Run a world without failures until a client has an output, then hand
    // it the same output again.
    let has_output = |w: &World| w.clients.values().any(|c| c.jobs.iter().any(|j| !j.outputs.is_empty()));
    let mut w = (0..100)
        .find_map(|seed| {
            let mut w = World::new(seed, false);
            w.events.clear();
            w.clients
                .values_mut()
                .flat_map(|c| &mut c.jobs)
                .for_each(|j| j.submit_at = 0);
            while !has_output(&w) && w.act() {}
            has_output(&w).then_some(w)
        })
        .expect("some world of the first 100 seeds produces an output");
    let (c, request, j) = w
        .clients
        .iter()
        .flat_map(|(&c, client)| client.jobs.iter().enumerate().map(move |(r, j)| (c, r, j)))
        .find(|(_, _, j)| !j.outputs.is_empty())
        .expect("an output");
    let (job, chunk) = (j.job.expect("accepted"), *j.outputs.first().expect("an output"));
    let sent = input(c, request, chunk, j.inputs_per_chunk);
    let output = OutputChunk {
        chunk,
        first_input: sent.first_input,
        count: sent.count,
        failed: 0,
        node: "n1".into(),
        payload: sent.payload,
    };
    w.client_receive(c, CoordinatorToClient::Output { job, output });
}

fn resources(cores: u32, memory_gib: u64) -> Resources {
    Resources {
        cores,
        memory_bytes: memory_gib * GIB,
        gpus: vec![],
    }
}

/// A job of 2-core calls that takes every slot it can get.
fn two_core_job() -> JobSpec {
    JobSpec {
        principal: String::new(),
        job_key: String::new(),
        parent: None,
        call: CallRequest {
            cores: 2,
            memory_bytes: GIB,
            gpus: 0,
            require_isolation: false,
        },
        parallelism: None,
        total_inputs: None,
        name: "job".into(),
        runtime: RuntimeSpec::Python {
            executable: "python3".into(),
            version: "3.11".into(),
            function: vec![7],
            environment: None,
            sources: None,
            image: None,
        },
    }
}

/// Found by seed 35: the client's first job was stopped and its slots went
/// to the client's second, waiting job (StartSlots on the node, Credit to the
/// gone client) just before that job was stopped too.
#[test]
fn a_disconnected_clients_waiting_job_gets_no_slots_before_it_is_stopped() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(2, 8), NodeIsolation::default());
    s.handle_submit(ClientId(7), RequestId(0), two_core_job());
    s.handle_submit(ClientId(7), RequestId(1), two_core_job());
    let (first, second) = (JobId(0), JobId(1));
    assert_eq!(s.slots_of(first).len(), 1);
    assert!(s.slots_of(second).is_empty(), "the second job waits for room");
    std::iter::from_fn(|| s.poll_command()).for_each(drop);

    s.handle_client_lost(ClientId(7), false);
    let cmds: Vec<Command> = std::iter::from_fn(|| s.poll_command()).collect();
    assert_eq!(
        cmds,
        [Command::ToNode {
            node: NodeId(1),
            msg: CoordinatorToNode::StopJob {
                job: first,
                finished: false
            }
        }]
    );
    assert_eq!(s.job_count(), 0);
}

/// Found by seed 448: a job waiting for room (no slots) was not failed when
/// the last node that could host it was lost, so its client waited forever.
#[test]
fn a_waiting_job_fails_when_the_last_node_that_could_host_it_is_lost() {
    let spec = two_core_job();
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "big".into(), resources(2, 8), NodeIsolation::default());
    s.handle_node_joined(NodeId(2), "small".into(), resources(1, 8), NodeIsolation::default());
    s.handle_submit(ClientId(7), RequestId(0), spec.clone());
    s.handle_submit(ClientId(8), RequestId(0), spec);
    let accepted: Vec<(ClientId, u32)> = std::iter::from_fn(|| s.poll_command())
        .filter_map(|c| match c {
            Command::ToClient {
                client,
                msg: CoordinatorToClient::JobAccepted { slots, .. },
            } => Some((client, slots)),
            _ => None,
        })
        .collect();
    assert_eq!(
        accepted,
        [(ClientId(7), 1), (ClientId(8), 0)],
        "the second job waits for the big node"
    );

    s.handle_node_lost(NodeId(1));
    let failed: Vec<ClientId> = std::iter::from_fn(|| s.poll_command())
        .filter_map(|c| match c {
            Command::ToClient {
                client,
                msg: CoordinatorToClient::JobFailed { .. },
            } => Some(client),
            _ => None,
        })
        .collect();
    assert_eq!(
        failed,
        [ClientId(7), ClientId(8)],
        "both jobs fail: no node left can host a call"
    );
    assert_eq!(s.job_count(), 0);
}
