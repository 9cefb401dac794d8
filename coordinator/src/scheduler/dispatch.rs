//! Dispatch: chunks of inputs to slots, and credit to clients.
//!
//! **Pull with a window.** Each slot holds at most [`SLOT_DEPTH`] chunks (one
//! running, the next already at the node), and a chunk is sent to a slot
//! only when it has room. The client may have at most `window` chunks in the
//! coordinator at once; it gets one credit back per finished chunk, so the
//! coordinator's memory is bounded by the window, not by the number of
//! inputs. The window grows by [`PER_SLOT_WINDOW`] with every slot placed
//! and shrinks with every slot lost or given back, never below one slot's
//! worth.

use fleetmap_protocol::{CoordinatorToClient, CoordinatorToNode, JobId, SlotId};

use super::{Command, Job, Scheduler};

/// Chunks a slot may hold at once: one running and one waiting at the node,
/// so a worker never idles for a round trip between chunks.
pub const SLOT_DEPTH: usize = 2;

/// Chunks of window each slot adds: a full pipeline in the slot plus one
/// queued at the coordinator, so no slot waits on the client.
pub(super) const PER_SLOT_WINDOW: u32 = SLOT_DEPTH as u32 + 1;

/// Bytes of inputs each slot adds to its job's byte window: room for its
/// share of the chunk window at the size clients aim for (1 MiB), twice
/// over, so that only chunks far larger than usual are held back by it.
pub(super) const BYTES_PER_SLOT: u64 = 2 * PER_SLOT_WINDOW as u64 * (1 << 20);

/// The smallest byte window of a job.
pub(super) const MIN_BYTE_WINDOW: u64 = 64 << 20;

impl Job {
    /// Grants the client what fits in the window: returns the new credit.
    /// Credit counts bytes as well as chunks: none is granted while the
    /// job's inputs in the coordinator hold more than its byte window, nor
    /// while its client has more output waiting than it reads.
    pub(super) fn top_up(&mut self) -> u32 {
        if self.backlogged || self.in_system_bytes >= self.byte_window() {
            return 0;
        }
        let room = self.window.saturating_sub(self.in_system + self.credit_out);
        self.credit_out += room;
        room
    }

    /// The bytes of inputs the job may hold in the coordinator:
    /// [`BYTES_PER_SLOT`] for each slot, and never less than
    /// [`MIN_BYTE_WINDOW`]. A chunk sent within credit is accepted even if
    /// it overshoots; the next credit waits until the job is back inside.
    fn byte_window(&self) -> u64 {
        (u64::from(self.active_slots) * BYTES_PER_SLOT).max(MIN_BYTE_WINDOW)
    }

    /// Takes the window's share of `slots` slots that are gone. Credit
    /// already granted stays valid; completions are not credited back until
    /// the client is inside the window again.
    pub(super) fn shrink_window(&mut self, slots: u32) {
        self.window = self.window.saturating_sub(slots * PER_SLOT_WINDOW).max(PER_SLOT_WINDOW);
    }
}

impl Scheduler {
    /// Opens job `id`'s pipeline to slots just placed: widens its window,
    /// credits the client what now fits (once it knows of the job) and
    /// offers each slot [`SLOT_DEPTH`] places, every new slot getting its
    /// first chunk before any gets its second.
    pub(super) fn open_slots(&mut self, id: JobId, slots: &[SlotId]) {
        let job = self.jobs.get_mut(&id).expect("slots were just placed for this job");
        job.window += slots.len() as u32 * PER_SLOT_WINDOW;
        let added = if job.announced { job.top_up() } else { 0 };
        if added > 0 {
            let msg = CoordinatorToClient::Credit { job: id, chunks: added };
            self.out.push_back(Command::ToClient {
                client: job.client,
                msg,
            });
        }
        for _ in 0..SLOT_DEPTH {
            job.ready.extend(slots.iter().copied());
        }
    }

    pub(super) fn dispatch_all(&mut self) {
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            self.dispatch(id);
        }
    }

    /// Sends job `id`'s queued chunks to its slots with room, in the order
    /// the slots freed up.
    pub(super) fn dispatch(&mut self, id: JobId) {
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
            self.counters.chunks_dispatched += 1;
            self.out.push_back(Command::ToNode {
                node: s.node,
                msg: CoordinatorToNode::RunChunk { job: id, slot, chunk },
            });
        }
    }
}
