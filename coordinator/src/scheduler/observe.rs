//! What the scheduler tells an observer: counts kept as things happen, and
//! a snapshot of the fleet taken when asked (for Prometheus metrics and the
//! dashboard). Reading it changes nothing.

use fleetmap_protocol::JobState;

use super::Scheduler;

/// Counts since the coordinator started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Inputs with an outcome, and those whose call raised.
    pub inputs_done: u64,
    pub inputs_failed: u64,
    /// Chunks handed to slots (again, when a lost node's run elsewhere).
    pub chunks_dispatched: u64,
    /// Jobs that ended, by how.
    pub jobs_finished: u64,
    pub jobs_failed: u64,
    pub jobs_cancelled: u64,
    /// Node connections lost (a node that drops twice counts twice).
    pub nodes_lost: u64,
}

impl Counters {
    pub(super) fn ended(&mut self, state: &JobState) {
        match state {
            JobState::Finished => self.jobs_finished += 1,
            JobState::Failed(_) => self.jobs_failed += 1,
            JobState::Cancelled(_) => self.jobs_cancelled += 1,
            JobState::Running | JobState::Waiting(_) => {}
        }
    }
}

/// The fleet now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetSnapshot {
    pub nodes: u64,
    pub cores: u64,
    pub cores_free: u64,
    pub memory_bytes: u64,
    pub memory_free_bytes: u64,
    pub gpus: u64,
    pub gpus_free: u64,
    /// Slots placed, and those being given back.
    pub slots: u64,
    pub slots_draining: u64,
    /// Running jobs, those waiting for a node that can host them, and those
    /// waiting for their client.
    pub jobs_running: u64,
    pub jobs_waiting_for_node: u64,
    pub jobs_waiting_for_client: u64,
    /// Chunks queued in the coordinator, and held by slots.
    pub chunks_queued: u64,
    pub chunks_in_flight: u64,
    pub counters: Counters,
}

impl Scheduler {
    /// The fleet as it is now.
    pub fn snapshot(&self) -> FleetSnapshot {
        let mut s = FleetSnapshot {
            nodes: self.nodes.len() as u64,
            counters: self.counters,
            ..FleetSnapshot::default()
        };
        for n in self.nodes.values() {
            s.cores += u64::from(n.total.cores);
            s.cores_free += u64::from(n.free.cores);
            s.memory_bytes += n.total.memory_bytes;
            s.memory_free_bytes += n.free.memory;
            s.gpus += n.total.gpus.len() as u64;
            s.gpus_free += u64::from(n.free.gpus);
        }
        for j in self.jobs.values() {
            s.slots += j.slots.len() as u64;
            s.slots_draining += j.slots.values().filter(|slot| slot.draining).count() as u64;
            if j.stranded.is_some() {
                s.jobs_waiting_for_node += 1;
            } else {
                s.jobs_running += 1;
            }
            s.chunks_queued += j.queue.len() as u64;
            s.chunks_in_flight += j.in_flight.len() as u64;
        }
        s.jobs_waiting_for_client = self.orphans.len() as u64;
        s
    }
}
