//! Recovery: what the scheduler does when a node, a slot or a job goes away,
//! so that no input is lost or run twice and no resource stays booked.
//!
//! - A lost node's slots are gone: the chunks they held go back to the front
//!   of their job's queue, in chunk order, to run elsewhere, and the job's
//!   window shrinks with the slots. A result the node sent before it was lost
//!   no longer matches a slot of that node and is dropped
//!   (`Scheduler::handle_chunk_done`).
//! - A job without slots that no remaining node can host waits for a node
//!   to join, and fails naming the lost node once the node grace period is
//!   over (`survival.rs`).
//! - A job that ends (finished, failed, cancelled, or its client gone) has
//!   its workers stopped on every node it ran on and its resources returned
//!   to them. A slot given back for fair share returns its room once the
//!   chunks it holds are done.

use std::collections::BTreeSet;

use fleetmap_protocol::{CoordinatorToClient, CoordinatorToNode, FailureKind, JobId, JobState, NodeId, SlotId};

use super::{Command, Scheduler};

/// Nodes a chunk may be lost with before its job fails.
pub const MAX_CHUNK_LOSSES: usize = 3;

impl Scheduler {
    /// Removes every slot on `node`, which is gone, and puts the chunks they
    /// held back at the front of their job's queue, in chunk order.
    ///
    /// A chunk that was running on [`MAX_CHUNK_LOSSES`] lost nodes fails its
    /// job instead: it may be what takes nodes down (a call that exhausts
    /// the machine, say), and running it again would take down the fleet
    /// one node at a time.
    pub(super) fn requeue_chunks_of_lost_node(&mut self, node: NodeId, name: &str) {
        let mut poisoned = Vec::new();
        for (&id, job) in self.jobs.iter_mut() {
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
            job.shrink_window(gone.len() as u32);
            for slot in gone {
                let s = job.slots.remove(&slot).expect("slot id listed above");
                if !s.draining {
                    job.active_slots -= 1;
                }
                for chunk in s.chunks {
                    if let Some((_, c)) = job.in_flight.remove(&chunk) {
                        let lost_with = job.losses.entry(chunk).or_default();
                        // Distinct nodes: one node that keeps coming back
                        // and dropping counts once.
                        if !lost_with.iter().any(|n| n == name) {
                            lost_with.push(name.to_string());
                            if job.failures.len() < super::MAX_LISTED_FAILURES {
                                let last = c.first_input.0 + u64::from(c.count).saturating_sub(1);
                                job.failures.push(format!(
                                    "node {name} was lost while running inputs {}..={last}; they ran again \
                                     elsewhere",
                                    c.first_input
                                ));
                            }
                        }
                        if lost_with.len() >= MAX_CHUNK_LOSSES {
                            poisoned.push((id, c.first_input.0, c.count, lost_with.join(", ")));
                        }
                        requeue.push(c);
                    }
                }
            }
            requeue.sort_by_key(|c| c.chunk);
            for c in requeue.into_iter().rev() {
                job.queue.push_front(c);
            }
        }
        for (job, first, count, nodes) in poisoned {
            let last = first + u64::from(count).saturating_sub(1);
            let reason = format!(
                "inputs {first}..={last} were running on {MAX_CHUNK_LOSSES} nodes that were lost ({nodes}); \
                 the job is stopped rather than run them on another. Check those inputs (a call that \
                 exhausts its machine, say) and the nodes' logs"
            );
            self.fail_job(job, FailureKind::Job, reason);
        }
    }

    pub(super) fn fail_job(&mut self, id: JobId, kind: FailureKind, reason: String) {
        if let Some(client) = self.client_of(id) {
            self.stop_job(id, JobState::Failed(reason.clone()));
            self.send_to_client(client, CoordinatorToClient::JobFailed { job: id, kind, reason });
        }
    }

    /// Ends a job in `state`: its nodes stop its workers (keeping them warm
    /// if it finished) and its resources go to waiting jobs.
    pub(super) fn stop_job(&mut self, id: JobId, state: JobState) {
        self.end_job(id, state);
        self.grow_jobs();
    }

    /// Ends a job without handing its resources to other jobs yet; its
    /// listing is kept among the recent ones.
    pub(super) fn end_job(&mut self, id: JobId, state: JobState) {
        let finished = state == JobState::Finished;
        self.remember_ended(id, state);
        self.drop_job(id, finished);
    }

    /// Removes a job: its nodes stop its workers (keeping them warm if it
    /// `finished`) and its resources go back to them.
    pub(super) fn drop_job(&mut self, id: JobId, finished: bool) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        // Its calls' credential ends with it.
        self.job_keys.retain(|_, j| *j != id);
        let mut nodes = BTreeSet::new();
        for slot in job.slots.values() {
            if let Some(n) = self.nodes.get_mut(&slot.node) {
                n.free.give_back(&job.spec.call);
            }
            nodes.insert(slot.node);
        }
        for node in nodes {
            self.out.push_back(Command::ToNode {
                node,
                msg: CoordinatorToNode::StopJob { job: id, finished },
            });
        }
    }

    /// Stops a drained slot and gives its resources back to its node.
    pub(super) fn release_slot(&mut self, id: JobId, slot: SlotId) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let Some(s) = job.slots.remove(&slot) else {
            return;
        };
        job.shrink_window(1);
        if let Some(n) = self.nodes.get_mut(&s.node) {
            n.free.give_back(&job.spec.call);
        }
        self.out.push_back(Command::ToNode {
            node: s.node,
            msg: CoordinatorToNode::StopSlot { job: id, slot },
        });
    }
}
