//! The scheduler: the coordinator's decisions as a plain state machine.
//!
//! It is fed events (`handle_*`) and drained of the messages it wants sent
//! (`poll_command`). It does no I/O, reads no clock and spawns nothing, so it
//! can be driven deterministically by tests and simulations.
//!
//! Policies:
//! - **Placement: spread.** A job's slots go one at a time to the node that
//!   can host the most further calls, so a job spans as many nodes as it can
//!   (more memory bandwidth, and a lost node costs the job the least).
//! - **Jobs share the fleet fairly.** Free resources go one slot at a time
//!   to the job holding the fewest cores (max-min fairness), up to each
//!   job's target. Every running job is entitled to an equal part of the
//!   fleet's cores: a job below that share that finds no free room gets
//!   room from jobs above it, whose slots are drained (they finish the
//!   chunks they hold, take no more, and stop).
//! - **Dispatch: pull with a window.** Each slot holds at most
//!   [`SLOT_DEPTH`] chunks (one running, the next already at the node), and a
//!   chunk is sent to a slot only when it has room. The client may have at
//!   most `window` chunks in the coordinator at once; it gets one credit back
//!   per finished chunk, so the coordinator's memory is bounded by the
//!   window, not by the number of inputs.

use std::collections::{BTreeMap, HashMap, VecDeque};

use fleetmap_protocol::{
    CallRequest, ChunkId, ClientId, CoordinatorToClient, CoordinatorToNode, InputChunk, JobId, JobSpec, LogLine,
    NodeId, NodeStatus, OutputChunk, RequestId, Resources, SlotId,
};

/// Chunks a slot may hold at once: one running and one waiting at the node,
/// so a worker never idles for a round trip between chunks.
pub const SLOT_DEPTH: usize = 2;

/// The most slots one job may have.
pub const MAX_SLOTS: u32 = 4000;

/// Chunks of window each slot adds: a full pipeline in the slot plus one
/// queued at the coordinator, so no slot waits on the client.
const PER_SLOT_WINDOW: u32 = SLOT_DEPTH as u32 + 1;

/// A message the scheduler wants delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ToNode { node: NodeId, msg: CoordinatorToNode },
    ToClient { client: ClientId, msg: CoordinatorToClient },
}

/// A peer broke the protocol; the shell closes its connection with this reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ProtocolViolation(pub String);

#[derive(Debug)]
struct Node {
    name: String,
    isolation: String,
    total: Resources,
    free_cores: u32,
    free_memory: u64,
    free_gpus: u32,
}

impl Node {
    /// How many more calls of this shape the node can host now.
    fn room_for(&self, call: &CallRequest) -> u32 {
        let by_cores = self.free_cores / call.cores.max(1);
        let by_memory = (self.free_memory / call.memory_bytes.max(1)).min(u32::MAX as u64) as u32;
        // A call without GPUs is not limited by them.
        let by_gpus = self.free_gpus.checked_div(call.gpus).unwrap_or(u32::MAX);
        by_cores.min(by_memory).min(by_gpus)
    }

    fn can_ever_host(&self, call: &CallRequest) -> bool {
        self.total.cores >= call.cores
            && self.total.memory_bytes >= call.memory_bytes
            && self.total.gpus.len() as u32 >= call.gpus
    }

    fn take(&mut self, call: &CallRequest) {
        self.free_cores -= call.cores;
        self.free_memory -= call.memory_bytes;
        self.free_gpus -= call.gpus;
    }

    fn give_back(&mut self, call: &CallRequest) {
        self.free_cores += call.cores;
        self.free_memory += call.memory_bytes;
        self.free_gpus += call.gpus;
    }
}

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
    received: u64,
    finished: u64,
    total_chunks: Option<u64>,
}

/// Whether a call fits in `(cores, memory, gpus)` of room.
fn fits(room: (u32, u64, u32), call: &CallRequest) -> bool {
    room.0 >= call.cores && room.1 >= call.memory_bytes && room.2 >= call.gpus
}

impl Job {
    /// Cores held by slots that are not being given back.
    fn held_cores(&self) -> u64 {
        self.active_slots as u64 * self.spec.call.cores as u64
    }

    /// Whether more slots would help: below its target and with inputs left
    /// to run (or still arriving).
    fn wants_slots(&self) -> bool {
        let all_dispatched = self.total_chunks.is_some() && self.queue.is_empty();
        self.active_slots < self.target_slots && !all_dispatched
    }

    /// Grants the client what fits in the window: returns the new credit.
    fn top_up(&mut self) -> u32 {
        let room = self.window.saturating_sub(self.in_system + self.credit_out);
        self.credit_out += room;
        room
    }
}

/// The coordinator's state: nodes, jobs, slots and queued inputs.
#[derive(Debug, Default)]
pub struct Scheduler {
    nodes: BTreeMap<NodeId, Node>,
    jobs: BTreeMap<JobId, Job>,
    next_job: JobId,
    out: VecDeque<Command>,
}

impl Scheduler {
    pub fn new() -> Self {
        Self::default()
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

    pub fn handle_node_joined(&mut self, node: NodeId, name: String, resources: Resources, isolation: String) {
        let n = Node {
            name,
            isolation,
            free_cores: resources.cores,
            free_memory: resources.memory_bytes,
            free_gpus: resources.gpus.len() as u32,
            total: resources,
        };
        self.nodes.insert(node, n);
        self.grow_jobs();
    }

    /// A node's connection ended: its slots are gone and the chunks they held
    /// go back to the front of their job's queue, in order, to run elsewhere.
    pub fn handle_node_lost(&mut self, node: NodeId) {
        let Some(lost) = self.nodes.remove(&node) else {
            return;
        };
        let job_ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in job_ids {
            let job = self.jobs.get_mut(&id).expect("id taken from the map above");
            let gone: Vec<SlotId> = job
                .slots
                .iter()
                .filter(|(_, s)| s.node == node)
                .map(|(&k, _)| k)
                .collect();
            if gone.is_empty() {
                continue;
            }
            let mut requeue = Vec::new();
            job.window = job
                .window
                .saturating_sub(gone.len() as u32 * PER_SLOT_WINDOW)
                .max(PER_SLOT_WINDOW);
            for slot in gone {
                let s = job.slots.remove(&slot).expect("slot id listed above");
                if !s.draining {
                    job.active_slots -= 1;
                }
                for chunk in s.chunks {
                    if let Some((_, c)) = job.in_flight.remove(&chunk) {
                        requeue.push(c);
                    }
                }
            }
            requeue.sort_by_key(|c| c.chunk);
            for c in requeue.into_iter().rev() {
                job.queue.push_front(c);
            }
        }
        // A job without slots that no remaining node can host would wait
        // forever, whether it lost its slots here or was waiting for room.
        let stranded: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.slots.is_empty() && !self.nodes.values().any(|n| n.can_ever_host(&j.spec.call)))
            .map(|(&k, _)| k)
            .collect();
        for id in stranded {
            let reason = format!(
                "node {} was lost and no remaining node can host a call of this job; \
                 its unfinished inputs were not run. Add a node and run the job again",
                lost.name
            );
            self.fail_job(id, reason);
        }
        self.grow_jobs();
        self.dispatch_all();
    }

    /// A client submits a job. It is accepted (and gets the slots that are
    /// free) or rejected at once when no node could ever host one call.
    pub fn handle_submit(&mut self, client: ClientId, request: RequestId, spec: JobSpec) {
        if let Err(reason) = self.check_placeable(&spec.call) {
            self.send_to_client(client, CoordinatorToClient::JobRejected { request, reason });
            return;
        }
        let id = self.next_job;
        self.next_job = JobId(id.0 + 1);
        let mut target = spec.parallelism.unwrap_or(MAX_SLOTS).clamp(1, MAX_SLOTS);
        if let Some(total) = spec.total_inputs {
            target = target.min(total.max(1).min(MAX_SLOTS as u64) as u32);
        }
        self.jobs.insert(
            id,
            Job {
                client,
                spec,
                target_slots: target,
                // Room to queue a few chunks while the job waits for slots;
                // every slot placed adds its share (see `grow_job`).
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
                received: 0,
                finished: 0,
                total_chunks: None,
            },
        );
        self.grow_jobs();
        let job = self.jobs.get_mut(&id).expect("job inserted above");
        job.announced = true;
        let credit = job.top_up();
        let nodes = job
            .slots
            .values()
            .map(|s| s.node)
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u32;
        let msg = CoordinatorToClient::JobAccepted {
            request,
            job: id,
            slots: job.slots.len() as u32,
            nodes,
            credit,
        };
        self.send_to_client(client, msg);
    }

    pub fn handle_inputs(&mut self, client: ClientId, job: JobId, chunk: InputChunk) -> Result<(), ProtocolViolation> {
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

    pub fn handle_cancel(&mut self, client: ClientId, job: JobId) {
        if self.client_of(job) == Some(client) {
            self.stop_job(job);
        }
    }

    pub fn handle_client_lost(&mut self, client: ClientId) {
        let jobs: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.client == client)
            .map(|(&k, _)| k)
            .collect();
        // End them all before any freed slot goes to a waiting job: one
        // of them could otherwise get slots (started on nodes, credit sent
        // to the gone client) just before it is stopped too.
        for job in jobs {
            self.end_job(job);
        }
        self.grow_jobs();
    }

    /// A node reports a finished chunk. Reports for jobs, slots or chunks the
    /// scheduler no longer holds on that node (a stopped job, a slot already
    /// given up) are dropped, so no input ever yields two outcomes.
    pub fn handle_chunk_done(&mut self, node: NodeId, job: JobId, slot: SlotId, output: OutputChunk) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let Some(s) = j.slots.get_mut(&slot) else {
            return;
        };
        if s.node != node {
            return;
        }
        let Some(pos) = s.chunks.iter().position(|&c| c == output.chunk) else {
            return;
        };
        s.chunks.remove(pos);
        let release = s.draining && s.chunks.is_empty();
        if !s.draining {
            j.ready.push_back(slot);
        }
        j.in_flight.remove(&output.chunk);
        j.in_system -= 1;
        j.finished += 1;
        let client = j.client;
        let credit = j.top_up();
        self.send_to_client(client, CoordinatorToClient::Output { job, output });
        if credit > 0 {
            self.send_to_client(client, CoordinatorToClient::Credit { job, chunks: credit });
        }
        self.dispatch(job);
        if release {
            self.release_slot(job, slot);
            self.grow_jobs();
        }
        self.finish_if_done(job);
    }

    /// A slot's worker could not start or died. The job stops at its first
    /// failure, as a local map would.
    pub fn handle_slot_failed(&mut self, node: NodeId, job: JobId, slot: SlotId, reason: String) {
        let owned = self
            .jobs
            .get(&job)
            .and_then(|j| j.slots.get(&slot))
            .is_some_and(|s| s.node == node);
        if owned {
            self.fail_job(job, reason);
        }
    }

    /// A client asks what the fleet looks like.
    pub fn handle_status(&mut self, client: ClientId, request: RequestId) {
        let nodes = self
            .nodes
            .values()
            .map(|n| NodeStatus {
                name: n.name.clone(),
                resources: n.total.clone(),
                free_cores: n.free_cores,
                free_memory_bytes: n.free_memory,
                free_gpus: n.free_gpus,
                isolation: n.isolation.clone(),
            })
            .collect();
        let jobs = self.jobs.len() as u32;
        self.send_to_client(client, CoordinatorToClient::Status { request, nodes, jobs });
    }

    /// A line a call printed goes to the job's client.
    pub fn handle_log(&mut self, line: LogLine) {
        if let Some(client) = self.client_of(line.job) {
            self.send_to_client(client, CoordinatorToClient::Log(line));
        }
    }

    /// The client's running job. Messages about a job that has just failed
    /// or been stopped cross the stop on the wire; they are not a violation
    /// and are dropped.
    fn client_job(&mut self, client: ClientId, job: JobId) -> Option<&mut Job> {
        self.jobs.get_mut(&job).filter(|j| j.client == client)
    }

    fn check_placeable(&self, call: &CallRequest) -> Result<(), String> {
        if call.cores == 0 || call.memory_bytes == 0 {
            return Err("func_cpu and func_ram must be at least 1".into());
        }
        if self.nodes.is_empty() {
            return Err("the fleet has no nodes: start one with `fleetmap node --coordinator HOST:PORT --token TOKEN --ca CA.pem`".into());
        }
        if self.nodes.values().any(|n| n.can_ever_host(call)) {
            return Ok(());
        }
        let largest_by = |f: fn(&Node) -> u64| {
            self.nodes
                .values()
                .max_by_key(|n| f(n))
                .map(|n| (f(n), n.name.clone()))
                .expect("the fleet has at least one node, checked above")
        };
        let (cores, cores_node) = largest_by(|n| n.total.cores as u64);
        let (memory, memory_node) = largest_by(|n| n.total.memory_bytes);
        let (gpus, gpus_node) = largest_by(|n| n.total.gpus.len() as u64);
        let mut short = Vec::new();
        if call.cores as u64 > cores {
            short.push(format!(
                "func_cpu={} but the largest node offers {cores} cores ({cores_node})",
                call.cores
            ));
        }
        if call.memory_bytes > memory {
            short.push(format!(
                "func_ram={} but the largest node offers {} ({memory_node})",
                gib(call.memory_bytes),
                gib(memory)
            ));
        }
        if call.gpus as u64 > gpus {
            short.push(format!(
                "func_gpu={} but the largest node offers {gpus} GPUs ({gpus_node})",
                call.gpus
            ));
        }
        if short.is_empty() {
            short.push(format!(
                "no single node offers func_cpu={}, func_ram={} and func_gpu={} together",
                call.cores,
                gib(call.memory_bytes),
                call.gpus
            ));
        }
        Err(format!(
            "no node can host one call: {}. Lower the request or add a larger node",
            short.join("; ")
        ))
    }

    /// Hands out free resources and, where jobs are below their fair share,
    /// reclaims some from jobs above it.
    fn grow_jobs(&mut self) {
        self.grow_pass();
        if self.rebalance() {
            self.grow_pass();
        }
    }

    /// Gives free resources away one slot at a time, always to the job that
    /// holds the fewest cores (the oldest among equals): max-min fairness
    /// over the jobs that want more slots.
    fn grow_pass(&mut self) {
        let mut placed: BTreeMap<JobId, BTreeMap<NodeId, Vec<SlotId>>> = BTreeMap::new();
        loop {
            let mut order: Vec<(u64, JobId)> = self
                .jobs
                .iter()
                .filter(|(_, j)| j.wants_slots())
                .map(|(&id, j)| (j.held_cores(), id))
                .collect();
            order.sort_unstable();
            let Some((node, id)) = order
                .iter()
                .find_map(|&(_, id)| self.best_node(id).map(|node| (node, id)))
            else {
                break;
            };
            let job = self.jobs.get_mut(&id).expect("id taken from the map");
            self.nodes
                .get_mut(&node)
                .expect("node id taken from the map")
                .take(&job.spec.call);
            let slot = job.next_slot;
            job.next_slot = SlotId(slot.0 + 1);
            let new = Slot {
                node,
                chunks: Vec::new(),
                draining: false,
            };
            job.slots.insert(slot, new);
            job.active_slots += 1;
            placed.entry(id).or_default().entry(node).or_default().push(slot);
        }
        for (id, per_node) in placed {
            self.announce_slots(id, per_node);
        }
    }

    /// The node with the most room for another call of job `id`.
    fn best_node(&self, id: JobId) -> Option<NodeId> {
        let call = self.jobs[&id].spec.call;
        self.nodes
            .iter()
            .map(|(&node, n)| (n.room_for(&call), node))
            .filter(|&(room, _)| room > 0)
            .max_by_key(|&(room, node)| (room, std::cmp::Reverse(node)))
            .map(|(_, node)| node)
    }

    /// Tells the nodes to start new slots, widens the job's window and lets
    /// the slots take their first chunks.
    fn announce_slots(&mut self, id: JobId, per_node: BTreeMap<NodeId, Vec<SlotId>>) {
        let job = self.jobs.get_mut(&id).expect("slots were just placed for this job");
        // Every new slot gets its first chunk before any gets its second.
        let new_slots: Vec<SlotId> = per_node.values().flatten().copied().collect();
        job.window += new_slots.len() as u32 * PER_SLOT_WINDOW;
        let added = if job.announced { job.top_up() } else { 0 };
        if added > 0 {
            let msg = CoordinatorToClient::Credit { job: id, chunks: added };
            self.out.push_back(Command::ToClient {
                client: job.client,
                msg,
            });
        }
        for _ in 0..SLOT_DEPTH {
            job.ready.extend(new_slots.iter().copied());
        }
        for (node, slots) in per_node {
            let msg = CoordinatorToNode::StartSlots {
                job: id,
                spec: job.spec.clone(),
                slots,
            };
            self.out.push_back(Command::ToNode { node, msg });
        }
        self.dispatch(id);
    }

    /// Fair share: every running job is entitled to an equal part of the
    /// fleet's cores. A job that wants more slots, is below its share by at
    /// least one call and finds no free room gets room on one node by
    /// draining slots of jobs that stay at or above their share without
    /// them. Draining slots finish the chunks they hold, then stop; idle
    /// ones stop at once. Returns whether resources were freed at once.
    fn rebalance(&mut self) -> bool {
        if self.jobs.len() < 2 {
            return false;
        }
        let fleet_cores: u64 = self.nodes.values().map(|n| n.total.cores as u64).sum();
        let share = fleet_cores / self.jobs.len() as u64;
        let mut freed = false;
        let needy: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.wants_slots() && j.held_cores() + j.spec.call.cores as u64 <= share)
            .map(|(&id, _)| id)
            .collect();
        for id in needy {
            if self.best_node(id).is_some() {
                continue; // Free room exists: the next grow pass serves it.
            }
            let call = self.jobs[&id].spec.call;
            let mut held: BTreeMap<JobId, u64> = self.jobs.iter().map(|(&k, j)| (k, j.held_cores())).collect();
            let mut plan = None;
            for (&node, n) in &self.nodes {
                let mut room = (n.free_cores, n.free_memory, n.free_gpus);
                let mut chosen = Vec::new();
                for (&donor, j) in self.jobs.iter().filter(|(&k, _)| k != id) {
                    for (&slot, _) in j.slots.iter().filter(|(_, s)| s.node == node && !s.draining) {
                        if fits(room, &call) {
                            break;
                        }
                        let cores = j.spec.call.cores as u64;
                        if held[&donor] < share + cores {
                            break; // The donor would fall below its share.
                        }
                        held.insert(donor, held[&donor] - cores);
                        room.0 += j.spec.call.cores;
                        room.1 += j.spec.call.memory_bytes;
                        room.2 += j.spec.call.gpus;
                        chosen.push((donor, slot));
                    }
                }
                if fits(room, &call) && !chosen.is_empty() {
                    plan = Some(chosen);
                    break;
                }
                held = self.jobs.iter().map(|(&k, j)| (k, j.held_cores())).collect();
            }
            for (donor, slot) in plan.unwrap_or_default() {
                let j = self.jobs.get_mut(&donor).expect("donor taken from the map");
                let s = j.slots.get_mut(&slot).expect("slot taken from the map");
                s.draining = true;
                j.active_slots -= 1;
                if s.chunks.is_empty() {
                    self.release_slot(donor, slot);
                    freed = true;
                }
            }
        }
        freed
    }

    /// Stops a drained slot and gives its resources back to its node.
    fn release_slot(&mut self, id: JobId, slot: SlotId) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let Some(s) = job.slots.remove(&slot) else {
            return;
        };
        job.window = job.window.saturating_sub(PER_SLOT_WINDOW).max(PER_SLOT_WINDOW);
        if let Some(n) = self.nodes.get_mut(&s.node) {
            n.give_back(&job.spec.call);
        }
        self.out.push_back(Command::ToNode {
            node: s.node,
            msg: CoordinatorToNode::StopSlot { job: id, slot },
        });
    }

    fn dispatch_all(&mut self) {
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            self.dispatch(id);
        }
    }

    fn dispatch(&mut self, id: JobId) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        while !job.queue.is_empty() {
            let Some(slot) = job.ready.pop_front() else {
                break;
            };
            let Some(s) = job.slots.get_mut(&slot) else {
                continue; // A slot of a lost node, or one given back.
            };
            if s.chunks.len() >= SLOT_DEPTH || s.draining {
                continue;
            }
            let chunk = job.queue.pop_front().expect("queue checked non-empty");
            s.chunks.push(chunk.chunk);
            job.in_flight.insert(chunk.chunk, (slot, chunk.clone()));
            self.out.push_back(Command::ToNode {
                node: s.node,
                msg: CoordinatorToNode::RunChunk { job: id, slot, chunk },
            });
        }
    }

    fn finish_if_done(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.total_chunks == Some(job.finished) {
            let client = job.client;
            self.stop_job(id);
            self.send_to_client(client, CoordinatorToClient::JobFinished { job: id });
        }
    }

    fn fail_job(&mut self, id: JobId, reason: String) {
        if let Some(client) = self.client_of(id) {
            self.stop_job(id);
            self.send_to_client(client, CoordinatorToClient::JobFailed { job: id, reason });
        }
    }

    /// Ends a job: its nodes stop its workers and its resources go to
    /// waiting jobs.
    fn stop_job(&mut self, id: JobId) {
        self.end_job(id);
        self.grow_jobs();
    }

    /// Ends a job without handing its resources to other jobs yet.
    fn end_job(&mut self, id: JobId) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        let mut nodes = std::collections::BTreeSet::new();
        for slot in job.slots.values() {
            if let Some(n) = self.nodes.get_mut(&slot.node) {
                n.give_back(&job.spec.call);
            }
            nodes.insert(slot.node);
        }
        for node in nodes {
            self.out.push_back(Command::ToNode {
                node,
                msg: CoordinatorToNode::StopJob { job: id },
            });
        }
    }

    fn send_to_client(&mut self, client: ClientId, msg: CoordinatorToClient) {
        self.out.push_back(Command::ToClient { client, msg });
    }
}

/// Formats bytes as GiB for messages ("1 GiB", "23.4 GiB").
pub fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if (g - g.round()).abs() < 0.05 {
        format!("{} GiB", g.round())
    } else {
        format!("{g:.1} GiB")
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod sim;
