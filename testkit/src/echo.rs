//! A node that speaks the real protocol and answers every chunk with its own
//! payload: the fleet emulator's nodes and the integration tests' nodes.

use std::{
    cmp::Ordering as CmpOrdering,
    collections::{BinaryHeap, HashMap},
    future::Future,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use fleetmap_net::SessionError;
use fleetmap_protocol::{CoordinatorToNode, InputChunk, JobId, NodeToCoordinator, OutputChunk, SlotId};
use tokio::time::Instant;

use crate::{node_role, CoordinatorAccess, NodePeer};

/// An echo node: joins with `cores` cores (one slot per core for
/// [`ONE_CORE`](crate::ONE_CORE) calls) and answers every `RunChunk` with a
/// `ChunkDone` that carries the chunk's own payload, at once or after
/// `count * per_input`. Each slot runs its chunks one after another, as a
/// worker would, so a slot given two chunks answers the second one
/// `per_input * count` after the first.
pub struct EchoNode {
    name: String,
    cores: u32,
    per_input: Duration,
    die_after: Option<u64>,
}

/// Counters that any number of echo nodes share with whoever watches them.
#[derive(Default)]
pub struct EchoStats {
    /// Nodes the coordinator has welcomed.
    pub joined: AtomicU32,
    /// Chunks the nodes have taken to run.
    pub chunks: AtomicU64,
    /// Every `StartSlots` any of the nodes got, in the order they got them.
    pub started: Mutex<Vec<SlotsStarted>>,
}

/// A node was told to start slots of a job.
#[derive(Debug, Clone, Copy)]
pub struct SlotsStarted {
    pub job: JobId,
    pub at: Instant,
    pub slots: usize,
}

impl EchoNode {
    /// A node named `name` with `cores` cores that answers at once.
    pub fn new(name: impl Into<String>, cores: u32) -> Self {
        EchoNode {
            name: name.into(),
            cores,
            per_input: Duration::ZERO,
            die_after: None,
        }
    }

    /// Emulates calls that take `per_input` for each input of a chunk.
    pub fn per_input(mut self, per_input: Duration) -> Self {
        self.per_input = per_input;
        self
    }

    /// Takes `chunks` chunks, then closes its connection instead of taking
    /// the next one, as a node that dies mid-job. Chunks taken but not yet
    /// answered die with it.
    pub fn die_after(mut self, chunks: u64) -> Self {
        self.die_after = Some(chunks);
        self
    }

    /// Joins the coordinator at `access`, then answers chunks until `stop`
    /// completes, the coordinator ends the connection or the node dies on
    /// purpose. Returns how many chunks it took.
    pub async fn run(
        self,
        access: CoordinatorAccess,
        stats: Arc<EchoStats>,
        stop: impl Future<Output = ()>,
    ) -> Result<u64, SessionError> {
        let role = node_role(&access.join_token, &self.name, self.cores);
        // A coordinator turns away connections beyond its handshake limits
        // (a whole emulated fleet joins from one address at once); like a
        // real daemon, the node tries again.
        let mut attempts = 0;
        let mut peer = loop {
            match NodePeer::join(&access, role.clone()).await {
                Err(SessionError::Unreachable { .. }) if attempts < 200 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50 + (attempts % 7) * 20)).await;
                }
                other => break other?,
            }
        };
        stats.joined.fetch_add(1, Ordering::Relaxed);

        // When each slot's emulated worker is free again: a slot runs its
        // chunks one after another, the next starting when the last one ends.
        let mut busy_until: HashMap<(JobId, SlotId), Instant> = HashMap::new();
        let mut pending: BinaryHeap<Pending> = BinaryHeap::new();
        let mut seq = 0u64;
        let mut taken = 0u64;
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer, stop);
        let mut armed: Option<Instant> = None;
        let (result, reason) = loop {
            if let Some(head) = pending.peek() {
                if armed != Some(head.due) {
                    timer.as_mut().reset(head.due);
                    armed = Some(head.due);
                }
            }
            tokio::select! {
                biased;
                () = &mut stop => break (Ok(taken), "echo node stopped"),
                () = &mut timer, if !pending.is_empty() => {
                    armed = None;
                    let now = Instant::now();
                    while pending.peek().is_some_and(|p| p.due <= now) {
                        let p = pending.pop().expect("peeked above");
                        let _ = peer.tx.send(NodeToCoordinator::ChunkDone { job: p.job, slot: p.slot, output: p.output });
                    }
                }
                msg = peer.rx.recv() => {
                    let msg = match msg {
                        Ok(Some(msg)) => msg,
                        Ok(None) => break (Ok(taken), "echo node done"),
                        Err(e) => break (Err(e), "echo node done"),
                    };
                    match msg {
                        CoordinatorToNode::StartSlots { job, slots, .. } => {
                            let now = Instant::now();
                            for &slot in &slots {
                                busy_until.insert((job, slot), now);
                            }
                            // A poisoned lock only means a watcher panicked
                            // while reading; the list itself is whole.
                            let mut started = stats.started.lock().unwrap_or_else(|e| e.into_inner());
                            started.push(SlotsStarted { job, at: now, slots: slots.len() });
                        }
                        CoordinatorToNode::RunChunk { job, slot, chunk } => {
                            if Some(taken) == self.die_after {
                                break (Ok(taken), "echo node dies");
                            }
                            taken += 1;
                            stats.chunks.fetch_add(1, Ordering::Relaxed);
                            let count = chunk.count;
                            let output = echo(chunk, &self.name);
                            if self.per_input.is_zero() {
                                let _ = peer.tx.send(NodeToCoordinator::ChunkDone { job, slot, output });
                            } else {
                                let now = Instant::now();
                                let free = busy_until.entry((job, slot)).or_insert(now);
                                let due = (*free).max(now) + self.per_input * count;
                                *free = due;
                                pending.push(Pending { due, seq, job, slot, output });
                                seq += 1;
                            }
                        }
                        CoordinatorToNode::StopJob { job, .. } => {
                            busy_until.retain(|(j, _), _| *j != job);
                            pending.retain(|p| p.job != job);
                        }
                        // Anything else (a slot given back, say) needs no
                        // action: a slot here is only a timestamp.
                        _ => {}
                    }
                }
            }
        };
        peer.leave(reason).await;
        result
    }
}

/// The outcome of `chunk` when every call returns its input: the payload
/// back, nothing failed.
fn echo(chunk: InputChunk, node: &str) -> OutputChunk {
    OutputChunk {
        chunk: chunk.chunk,
        first_input: chunk.first_input,
        count: chunk.count,
        failed: 0,
        node: node.into(),
        payload: chunk.payload,
    }
}

/// A chunk whose emulated calls end at `due`.
struct Pending {
    due: Instant,
    /// Breaks ties between chunks due at once, first taken first.
    seq: u64,
    job: JobId,
    slot: SlotId,
    output: OutputChunk,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    /// Reversed, so that `BinaryHeap` pops the earliest first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}
