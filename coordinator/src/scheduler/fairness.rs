//! Fair share: how the fleet's resources are divided between jobs.
//!
//! - **Growth is max-min fair, between principals first.** Free resources
//!   go one slot at a time to the principal (the owner of an API key)
//!   holding the fewest cores, and to its job holding the fewest (the
//!   oldest among equals) of those that want more slots, up to each job's
//!   target and the principal's slot quota; placement (`placement.rs`)
//!   picks the node.
//! - **Room is reclaimed for a fair share.** Every principal with running
//!   jobs is entitled to an equal part of the fleet's cores, and each of its
//!   jobs to an equal part of that. A job that wants more slots, is
//!   below its share by at least one call and finds no free room gets room
//!   on one node by draining slots of jobs that stay at or above their share
//!   without them. Draining slots finish the chunks they hold, take no more,
//!   and stop; idle ones stop at once, and the growth that follows places
//!   slots in the room they leave.
//!
//! Reclaiming is planned by [`plan_reclaims`], a pure function of the jobs
//! and nodes, and applied by `Scheduler::apply_reclaims`, the only place
//! that drains slots.

use std::collections::{BTreeMap, BTreeSet};

use fleetmap_protocol::{JobId, NodeId, SlotId};

use super::placement::{most_room, Node, Room};
use super::{Job, Scheduler};
use crate::keys::Quota;

impl Job {
    /// Cores held by slots that are not being given back.
    pub(super) fn held_cores(&self) -> u64 {
        self.active_slots as u64 * self.spec.call.cores as u64
    }

    /// Whether more slots would help: below its target and with inputs left
    /// to run (or still arriving).
    pub(super) fn wants_slots(&self) -> bool {
        let all_dispatched = self.total_chunks.is_some() && self.queue.is_empty();
        self.active_slots < self.target_slots && !all_dispatched
    }
}

/// Room to make on one node, for one call of a job below its fair share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reclaim {
    /// The job below its share that the room is for. The growth that follows
    /// places the slot, max-min: another job holding fewer cores would get
    /// the room first.
    pub(super) for_job: JobId,
    pub(super) node: NodeId,
    /// The slots to drain, as (job, slot), in the order they are drained.
    pub(super) drain: Vec<(JobId, SlotId)>,
}

impl Scheduler {
    /// Hands out free resources and, where jobs are below their fair share,
    /// reclaims some from jobs above it.
    pub(super) fn grow_jobs(&mut self) {
        self.grow_pass();
        let reclaims = plan_reclaims(&self.jobs, &self.nodes, &self.quotas);
        if self.apply_reclaims(&reclaims) {
            self.grow_pass();
        }
    }

    /// Gives free resources away one slot at a time, always to the
    /// principal that holds the fewest cores, and of its jobs to the one
    /// that holds the fewest (the oldest among equals): max-min fairness
    /// between principals, then between a principal's jobs. A principal at
    /// its quota's slot limit gets no more.
    fn grow_pass(&mut self) {
        let mut placed: BTreeMap<JobId, BTreeMap<NodeId, Vec<SlotId>>> = BTreeMap::new();
        loop {
            let mut by_principal: BTreeMap<&str, (u64, u32)> = BTreeMap::new();
            for j in self.jobs.values() {
                let e = by_principal.entry(&j.spec.principal).or_default();
                e.0 += j.held_cores();
                e.1 += j.active_slots;
            }
            let mut order: Vec<(u64, u64, JobId)> = self
                .jobs
                .iter()
                .filter(|(_, j)| j.wants_slots())
                .filter(|(_, j)| {
                    let slots = by_principal[j.spec.principal.as_str()].1;
                    self.quota_of(&j.spec.principal).max_slots.is_none_or(|max| slots < max)
                })
                .map(|(&id, j)| (by_principal[j.spec.principal.as_str()].0, j.held_cores(), id))
                .collect();
            order.sort_unstable();
            let Some((node, id)) = order
                .iter()
                .find_map(|&(_, _, id)| self.best_node(id).map(|node| (node, id)))
            else {
                break;
            };
            let slot = self.place_slot(id, node);
            placed.entry(id).or_default().entry(node).or_default().push(slot);
        }
        for (id, per_node) in placed {
            self.start_slots(id, per_node);
        }
    }

    /// Drains the slots the plan names; idle ones stop at once. Returns
    /// whether resources were freed at once.
    fn apply_reclaims(&mut self, reclaims: &[Reclaim]) -> bool {
        let mut freed = false;
        for &(donor, slot) in reclaims.iter().flat_map(|r| &r.drain) {
            let j = self
                .jobs
                .get_mut(&donor)
                .expect("the plan drains slots of jobs in the map");
            let s = j.slots.get_mut(&slot).expect("the plan drains slots the job holds");
            s.draining = true;
            j.active_slots -= 1;
            if s.chunks.is_empty() {
                self.release_slot(donor, slot);
                freed = true;
            }
        }
        freed
    }
}

/// Plans where to make room for jobs below their fair share, without changing
/// anything: for each such job in id order that finds no free room, the first
/// node on which draining other jobs' slots (in job, then slot order, from
/// each only while it stays at or above its share) makes room for one call.
///
/// Each reclaim planned counts for the ones after it, as applying them in
/// order would: its slots drain, their jobs hold fewer cores, and its idle
/// slots leave free room (so a later job that finds that room waits for the
/// growth instead of draining more).
pub(super) fn plan_reclaims(
    jobs: &BTreeMap<JobId, Job>,
    nodes: &BTreeMap<NodeId, Node>,
    quotas: &BTreeMap<String, Quota>,
) -> Vec<Reclaim> {
    let mut plan = Vec::new();
    if jobs.len() < 2 {
        return plan;
    }
    let fleet_cores: u64 = nodes.values().map(|n| n.total.cores as u64).sum();
    // Each principal is entitled to an equal part of the fleet, and each of
    // its jobs to an equal part of that.
    let mut jobs_of: BTreeMap<&str, u64> = BTreeMap::new();
    let mut slots_of: BTreeMap<&str, u32> = BTreeMap::new();
    for j in jobs.values() {
        *jobs_of.entry(&j.spec.principal).or_default() += 1;
        *slots_of.entry(&j.spec.principal).or_default() += j.active_slots;
    }
    // A principal at its slot quota could not use the room.
    let may_grow = |j: &Job| {
        let max = quotas.get(&j.spec.principal).and_then(|q| q.max_slots);
        max.is_none_or(|max| slots_of[j.spec.principal.as_str()] < max)
    };
    let principals = jobs_of.len() as u64;
    let share_of = |j: &Job| fleet_cores / principals / jobs_of[j.spec.principal.as_str()];
    // The state as the reclaims planned so far leave it.
    let mut held: BTreeMap<JobId, u64> = jobs.iter().map(|(&k, j)| (k, j.held_cores())).collect();
    let mut free: BTreeMap<NodeId, Room> = nodes.iter().map(|(&k, n)| (k, n.free)).collect();
    let mut draining: BTreeSet<(JobId, SlotId)> = BTreeSet::new();
    // Which jobs are below their share is decided before any reclaim: no job
    // below its share can give, so none stops or starts being below it.
    let needy = jobs
        .iter()
        .filter(|(_, j)| j.wants_slots() && may_grow(j) && j.held_cores() + j.spec.call.cores as u64 <= share_of(j));
    for (&id, job) in needy {
        let call = job.spec.call;
        // Only the nodes that may run this job's calls.
        let serves = |node: &NodeId| nodes.get(node).is_some_and(|n| n.serves(&call));
        if most_room(
            free.iter().filter(|(n, _)| serves(n)).map(|(&node, room)| (node, room)),
            &call,
        )
        .is_some()
        {
            continue; // Free room exists: the next grow pass serves it.
        }
        let found = free.iter().filter(|(n, _)| serves(n)).find_map(|(&node, &room)| {
            let mut room = room;
            let mut drain = Vec::new();
            for (&donor, j) in jobs.iter().filter(|(&k, _)| k != id) {
                let cores = j.spec.call.cores as u64;
                let mut donor_held = held[&donor];
                let candidates = j
                    .slots
                    .iter()
                    .filter(|&(&slot, s)| s.node == node && !s.draining && !draining.contains(&(donor, slot)));
                for (&slot, _) in candidates {
                    if room.fits(&call) {
                        break;
                    }
                    if donor_held < share_of(j) + cores {
                        break; // The donor would fall below its share.
                    }
                    donor_held -= cores;
                    room.give_back(&j.spec.call);
                    drain.push((donor, slot));
                }
            }
            (room.fits(&call) && !drain.is_empty()).then_some(Reclaim {
                for_job: id,
                node,
                drain,
            })
        });
        let Some(reclaim) = found else {
            continue;
        };
        for &(donor, slot) in &reclaim.drain {
            let j = &jobs[&donor];
            *held.get_mut(&donor).expect("every job has an entry") -= j.spec.call.cores as u64;
            draining.insert((donor, slot));
            if j.slots[&slot].chunks.is_empty() {
                // An idle slot stops as soon as it is drained.
                free.get_mut(&reclaim.node)
                    .expect("every node has an entry")
                    .give_back(&j.spec.call);
            }
        }
        plan.push(reclaim);
    }
    plan
}
