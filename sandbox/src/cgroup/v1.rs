//! cgroup v1: one hierarchy per controller, mounted at `<mount>/<controller>`.
//! The daemon's subtree, and each slot in it, is a directory in each of the
//! five hierarchies a slot uses; devices are limited by `devices.allow`
//! lines, and the freezer stops a slot while it is killed.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    cgroupfs::{self, child_dirs, create_dir_if_missing, read, unavailable_if_denied, Backing},
    hierarchy::{limit, Hierarchy, SlotSettings},
    procs::sigkill_listed,
    CgroupError, CgroupVersion,
};

/// The v1 controllers a slot uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Controller {
    Cpuset,
    Memory,
    Pids,
    Devices,
    Freezer,
}

pub(super) const CONTROLLERS: [Controller; 5] = [
    Controller::Cpuset,
    Controller::Memory,
    Controller::Pids,
    Controller::Devices,
    Controller::Freezer,
];

impl Controller {
    pub(super) fn name(self) -> &'static str {
        match self {
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Devices => "devices",
            Controller::Freezer => "freezer",
        }
    }
}

/// The daemon's subtree `<mount>/<controller>/<subtree>` in each hierarchy.
#[derive(Debug)]
pub(super) struct V1 {
    mount: PathBuf,
    subtree: String,
    backing: Backing,
}

impl V1 {
    /// Creates the subtree `name` in every controller's hierarchy and gives
    /// its cpuset the parent's CPUs and memory nodes.
    pub(super) fn init(mount: &Path, name: &str, backing: Backing) -> Result<V1, CgroupError> {
        let missing: Vec<&str> = CONTROLLERS
            .iter()
            .map(|c| c.name())
            .filter(|c| !mount.join(c).join("cgroup.procs").exists())
            .collect();
        if !missing.is_empty() {
            return Err(CgroupError::Unavailable {
                reason: format!(
                    "{} is neither cgroup v2 (no cgroup.controllers) nor a cgroup v1 mount with cpuset, memory, pids, devices and freezer (missing: {})",
                    mount.display(),
                    missing.join(", ")
                ),
            });
        }
        let v1 = V1 {
            mount: mount.into(),
            subtree: name.into(),
            backing,
        };
        for dir in v1.subtree_dirs() {
            create_dir_if_missing(&dir).map_err(unavailable_if_denied)?;
        }
        // A new v1 cpuset has no CPUs and no memory nodes, and no process can
        // join it until both are set. The parent's are copied, not inherited
        // through cgroup.clone_children=1: with clone_children a slot whose
        // own cpuset.cpus write failed would silently run on every CPU;
        // without it, joining fails.
        let subtree = v1.dir(Controller::Cpuset);
        let parent = mount.join(Controller::Cpuset.name());
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let value = read(&parent.join(file))?;
            backing
                .write(&subtree.join(file), value.trim())
                .map_err(unavailable_if_denied)?;
        }
        Ok(v1)
    }

    /// The subtree `name` as it is, creating nothing: for removing a subtree
    /// left behind by a process that is gone.
    pub(super) fn open(mount: &Path, name: &str, backing: Backing) -> V1 {
        V1 {
            mount: mount.into(),
            subtree: name.into(),
            backing,
        }
    }

    /// The names of the subtrees under `mount`, in any controller.
    pub(super) fn subtree_names(mount: &Path) -> Vec<String> {
        CONTROLLERS
            .iter()
            .flat_map(|c| child_dirs(&mount.join(c.name())))
            .filter_map(|d| d.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect()
    }

    /// The subtree's directory in `controller`'s hierarchy.
    fn dir(&self, controller: Controller) -> PathBuf {
        self.mount.join(controller.name()).join(&self.subtree)
    }

    /// A file of the slot `slot` in `controller`'s hierarchy.
    fn slot_file(&self, controller: Controller, slot: &str, file: &str) -> PathBuf {
        self.dir(controller).join(slot).join(file)
    }
}

impl Hierarchy for V1 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn backing(&self) -> Backing {
        self.backing
    }

    fn subtree_dirs(&self) -> Vec<PathBuf> {
        CONTROLLERS.iter().map(|&c| self.dir(c)).collect()
    }

    fn effective_cpus_file(&self) -> PathBuf {
        self.dir(Controller::Cpuset).join("cpuset.effective_cpus")
    }

    fn effective_mems_file(&self) -> PathBuf {
        self.dir(Controller::Cpuset).join("cpuset.effective_mems")
    }

    fn set_limits(&self, slot: &str, settings: &SlotSettings) -> Result<(), CgroupError> {
        let set = |controller, file, value: &str| self.backing.write(&self.slot_file(controller, slot, file), value);
        set(Controller::Cpuset, "cpuset.cpus", &settings.cpus)?;
        set(Controller::Cpuset, "cpuset.mems", &settings.mems)?;
        // memsw (memory + swap) must stay >= the memory limit at every
        // write: lift memsw, set the memory limit, then bring memsw down to
        // it (equal values mean no swap at all). The same order serves a new
        // slot and a warm worker's slot given a higher or a lower limit.
        let memory = limit(settings.memory_bytes, "-1");
        let memsw = self.slot_file(Controller::Memory, slot, "memory.memsw.limit_in_bytes");
        self.backing.write_if_present(&memsw, "-1")?;
        set(Controller::Memory, "memory.limit_in_bytes", &memory)?;
        self.backing.write_if_present(&memsw, &memory)?;
        // The peak belongs to the job that runs now.
        self.backing.write_if_present(
            &self.slot_file(Controller::Memory, slot, "memory.max_usage_in_bytes"),
            "0",
        )?;
        set(Controller::Pids, "pids.max", &limit(settings.pids_max, "max"))?;
        if let Some(rules) = &settings.devices {
            // Deny everything, then allow the list. A v1 devices cgroup
            // starts as a copy of its parent's, here "a *:* rwm" (allow all);
            // in that allow-all mode the kernel keeps deny exceptions, but
            // writing "a" to devices.deny switches to deny-all mode, where
            // each allow line is an exception. The other way round
            // (allow-all plus a deny of 195:* and allows for single minors)
            // cannot work: an allow exception cannot punch a hole in a
            // wildcard deny.
            set(Controller::Devices, "devices.deny", "a")?;
            for rule in rules {
                set(Controller::Devices, "devices.allow", &rule.to_string())?;
            }
        }
        Ok(())
    }

    fn oom_kills(&self, slot: &str) -> u64 {
        cgroupfs::read_keyed(
            &self.slot_file(Controller::Memory, slot, "memory.oom_control"),
            "oom_kill",
        )
        .unwrap_or(0)
    }

    fn memory_current(&self, slot: &str) -> Option<u64> {
        cgroupfs::read_number(&self.slot_file(Controller::Memory, slot, "memory.usage_in_bytes"))
    }

    fn peak_memory(&self, slot: &str) -> Option<u64> {
        cgroupfs::read_number(&self.slot_file(Controller::Memory, slot, "memory.max_usage_in_bytes"))
    }

    /// Freezes the slot, so that nothing can fork or exit (and have its pid
    /// reused) between reading `cgroup.procs` and the kill; kills the
    /// frozen processes, then thaws them so that they can act on the signal
    /// and exit.
    fn kill(&self, slot: &str) -> Result<(), CgroupError> {
        let state = self.slot_file(Controller::Freezer, slot, "freezer.state");
        let frozen = state.exists() && self.backing.write(&state, "FROZEN").is_ok();
        if frozen {
            // FREEZING until every task has stopped; a task in
            // uninterruptible sleep can hold it there, so wait only a little
            // and kill anyway.
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline
                && fs::read_to_string(&state)
                    .map(|s| s.trim() != "FROZEN")
                    .unwrap_or(false)
            {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        sigkill_listed(&self.slot_dirs(slot));
        // Thaw the slot and every cgroup below it: a process frozen by a
        // nested freezer whose owner died mid-teardown (an embedded cluster
        // inside a call, killed with it) would otherwise stay frozen, in
        // state D with its SIGKILL pending, for good.
        let mut below = child_dirs(&self.dir(Controller::Freezer).join(slot));
        while let Some(dir) = below.pop() {
            below.extend(child_dirs(&dir));
            let _ = self.backing.write(&dir.join("freezer.state"), "THAWED");
        }
        if frozen {
            self.backing.write(&state, "THAWED")?;
        }
        Ok(())
    }
}
