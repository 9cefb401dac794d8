//! Placement: which node a slot goes to, and whether a job fits anywhere.
//!
//! **Spread.** A job's slots go one at a time to the node that can host the
//! most further calls (the lowest node id among equals), so a job spans as
//! many nodes as it can: more memory bandwidth, and a lost node costs the
//! job the least. Which job gets the next slot is fair share's decision
//! (`fairness.rs`); this file only says where it goes, books the node's
//! resources for it and tells the node to start it.
//!
//! A job that no node could ever host, even with the fleet idle, is
//! rejected at submission with what is short and on which node.

use std::collections::BTreeMap;

use fleetmap_protocol::{CallRequest, CoordinatorToNode, JobId, NodeId, NodeIsolation, Resources, SlotId};

use super::{Command, Scheduler, Slot};

/// Resources of a node that are free (or would be, once slots are given
/// back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Room {
    pub(super) cores: u32,
    pub(super) memory: u64,
    pub(super) gpus: u32,
}

impl Room {
    /// All of a node's resources.
    fn all_of(resources: &Resources) -> Room {
        Room {
            cores: resources.cores,
            memory: resources.memory_bytes,
            gpus: resources.gpus.len() as u32,
        }
    }

    /// How many more calls of this shape fit.
    pub(super) fn calls(&self, call: &CallRequest) -> u32 {
        let by_cores = self.cores / call.cores.max(1);
        let by_memory = (self.memory / call.memory_bytes.max(1)).min(u32::MAX as u64) as u32;
        // A call without GPUs is not limited by them.
        let by_gpus = self.gpus.checked_div(call.gpus).unwrap_or(u32::MAX);
        by_cores.min(by_memory).min(by_gpus)
    }

    /// Whether one call of this shape fits.
    pub(super) fn fits(&self, call: &CallRequest) -> bool {
        self.cores >= call.cores && self.memory >= call.memory_bytes && self.gpus >= call.gpus
    }

    pub(super) fn take(&mut self, call: &CallRequest) {
        self.cores -= call.cores;
        self.memory -= call.memory_bytes;
        self.gpus -= call.gpus;
    }

    pub(super) fn give_back(&mut self, call: &CallRequest) {
        self.cores += call.cores;
        self.memory += call.memory_bytes;
        self.gpus += call.gpus;
    }
}

#[derive(Debug)]
pub(super) struct Node {
    pub(super) name: String,
    pub(super) isolation: NodeIsolation,
    pub(super) total: Resources,
    pub(super) free: Room,
}

impl Node {
    pub(super) fn new(name: String, resources: Resources, isolation: NodeIsolation) -> Node {
        Node {
            name,
            isolation,
            free: Room::all_of(&resources),
            total: resources,
        }
    }

    /// Whether the node could host a call of this shape with nothing else
    /// running.
    pub(super) fn can_ever_host(&self, call: &CallRequest) -> bool {
        self.serves(call)
            && self.total.cores >= call.cores
            && self.total.memory_bytes >= call.memory_bytes
            && self.total.gpus.len() as u32 >= call.gpus
    }
}

impl Node {
    /// Whether the node may run calls of this job at all: a job that
    /// requires isolation runs only on nodes that pin their slots.
    pub(super) fn serves(&self, call: &CallRequest) -> bool {
        self.isolation.pinned || !call.require_isolation
    }
}

/// Of nodes with the given free room, the one with room for the most further
/// calls of this shape (the lowest id among equals); `None` when none has
/// room for one.
pub(super) fn most_room<'a>(free: impl Iterator<Item = (NodeId, &'a Room)>, call: &CallRequest) -> Option<NodeId> {
    free.map(|(node, room)| (room.calls(call), node))
        .filter(|&(calls, _)| calls > 0)
        .max_by_key(|&(calls, node)| (calls, std::cmp::Reverse(node)))
        .map(|(_, node)| node)
}

impl Scheduler {
    /// The node with the most room for another call of job `id`.
    pub(super) fn best_node(&self, id: JobId) -> Option<NodeId> {
        let call = self.jobs[&id].spec.call;
        most_room(
            self.nodes
                .iter()
                .filter(|(_, n)| n.serves(&call))
                .map(|(&node, n)| (node, &n.free)),
            &call,
        )
    }

    /// Books room on `node` for one more call of job `id` and adds the slot
    /// (not yet started: see [`Scheduler::start_slots`]).
    pub(super) fn place_slot(&mut self, id: JobId, node: NodeId) -> SlotId {
        let job = self.jobs.get_mut(&id).expect("slots are placed for jobs of the map");
        self.nodes
            .get_mut(&node)
            .expect("slots are placed on nodes of the map")
            .free
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
        slot
    }

    /// Starts the slots just placed for job `id`: the job's pipeline opens
    /// for them (window and credit), the nodes are told to start them, and
    /// they take their first chunks.
    pub(super) fn start_slots(&mut self, id: JobId, per_node: BTreeMap<NodeId, Vec<SlotId>>) {
        let new_slots: Vec<SlotId> = per_node.values().flatten().copied().collect();
        self.open_slots(id, &new_slots);
        let spec = &self.jobs[&id].spec;
        for (node, slots) in per_node {
            let msg = CoordinatorToNode::StartSlots {
                job: id,
                spec: Box::new(spec.clone()),
                slots,
            };
            self.out.push_back(Command::ToNode { node, msg });
        }
        self.dispatch(id);
    }

    /// Refuses a call that no node could ever host, naming what is short
    /// and the largest node of each kind.
    pub(super) fn check_placeable(&self, call: &CallRequest) -> Result<(), String> {
        if call.cores == 0 || call.memory_bytes == 0 {
            return Err("func_cpu and func_ram must be at least 1".into());
        }
        if self.nodes.is_empty() {
            return Err("the fleet has no nodes: start one with `fleetmapd node --coordinator HOST:PORT --token-file FILE --ca CA.pem`".into());
        }
        if self.nodes.values().any(|n| n.can_ever_host(call)) {
            return Ok(());
        }
        if !self.nodes.values().any(|n| n.serves(call)) {
            let nodes: Vec<String> = self
                .nodes
                .values()
                .map(|n| format!("{}: {}", n.name, n.isolation.description))
                .collect();
            return Err(format!(
                "the job requires isolation, and no node pins its calls ({}); start nodes as root or in a \
                 delegated cgroup, without --allow-unisolated, or call without require_isolation",
                nodes.join("; ")
            ));
        }
        let largest_by = |f: fn(&Node) -> u64| {
            self.nodes
                .values()
                .filter(|n| n.serves(call))
                .max_by_key(|n| f(n))
                .map(|n| (f(n), n.name.clone()))
                .expect("at least one node serves the job, checked above")
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
