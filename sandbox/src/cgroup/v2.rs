//! cgroup v2: one unified hierarchy mounted at `<mount>`. The daemon's
//! subtree is `<mount>/<name>` with cpuset, memory and pids enabled for its
//! children, each slot one directory in it; devices are limited by a BPF
//! program (`device_filter`), and `cgroup.kill` kills a slot at once. The
//! daemon's own process stays where it was started: the subtree is a child
//! of the root, which may hold processes, and the subtree itself holds
//! none, so the no-internal-process rule holds without moving anyone (an
//! embedded cluster never moves its caller's process).
//!
//! Where the subtree lives: directly under the mount
//! (`/sys/fs/cgroup/fleetmap`), not next to the cgroup the daemon was
//! started in. That is the simplest choice that works on a host where the
//! daemon runs as root and owns the machine; under systemd with
//! `Delegate=yes` the delegated cgroup would be the better parent, and only
//! [`V2::init`] would change.

use std::path::{Path, PathBuf};

use super::{
    cgroupfs::{self, create_dir_if_missing, read, unavailable_if_denied, Backing},
    device_filter,
    hierarchy::{limit, Hierarchy, SlotSettings},
    procs::sigkill_listed,
    CgroupError, CgroupVersion,
};

/// What the daemon enables for its slots; devices are a BPF program and
/// freezing is built in.
const CONTROLLERS: [&str; 3] = ["cpuset", "memory", "pids"];

/// The daemon's subtree in the unified hierarchy.
#[derive(Debug)]
pub(super) struct V2 {
    subtree: PathBuf,
    backing: Backing,
}

impl V2 {
    /// Enables cpuset, memory and pids in the root's and the subtree's
    /// `cgroup.subtree_control`. The subtree holds no process, as a v2
    /// cgroup that hands controllers to its children must not.
    pub(super) fn init(mount: &Path, name: &str, backing: Backing) -> Result<V2, CgroupError> {
        let dir = mount.join(name);
        let available = read(&mount.join("cgroup.controllers"))?;
        let enabled = read(&mount.join("cgroup.subtree_control"))?;
        for controller in CONTROLLERS {
            if enabled.split_whitespace().any(|c| c == controller) {
                continue;
            }
            if !available.split_whitespace().any(|c| c == controller) {
                return Err(CgroupError::Unavailable {
                    reason: format!(
                        "the {controller} controller is not available in cgroup v2 at {} (is it bound to a v1 hierarchy?)",
                        mount.display()
                    ),
                });
            }
            backing
                .write(&mount.join("cgroup.subtree_control"), &format!("+{controller}"))
                .map_err(unavailable_if_denied)?;
        }
        create_dir_if_missing(&dir).map_err(unavailable_if_denied)?;
        let plus: Vec<String> = CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
        backing
            .write(&dir.join("cgroup.subtree_control"), &plus.join(" "))
            .map_err(unavailable_if_denied)?;
        Ok(V2 { subtree: dir, backing })
    }

    /// A subtree at `dir` as it is, creating nothing and enabling nothing:
    /// for removing a subtree left behind by a process that is gone, and for
    /// the kernel tests on a v2 mount whose controllers are bound to v1.
    pub(super) fn existing(dir: PathBuf, backing: Backing) -> V2 {
        V2 { subtree: dir, backing }
    }

    /// The names of the subtrees under `mount`.
    pub(super) fn subtree_names(mount: &Path) -> Vec<String> {
        cgroupfs::child_dirs(mount)
            .iter()
            .filter_map(|d| d.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect()
    }

    fn slot_file(&self, slot: &str, file: &str) -> PathBuf {
        self.subtree.join(slot).join(file)
    }
}

impl Hierarchy for V2 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn backing(&self) -> Backing {
        self.backing
    }

    fn subtree_dirs(&self) -> Vec<PathBuf> {
        vec![self.subtree.clone()]
    }

    fn effective_cpus_file(&self) -> PathBuf {
        self.subtree.join("cpuset.cpus.effective")
    }

    fn effective_mems_file(&self) -> PathBuf {
        self.subtree.join("cpuset.mems.effective")
    }

    fn set_limits(&self, slot: &str, settings: &SlotSettings) -> Result<(), CgroupError> {
        let set = |file, value: &str| self.backing.write(&self.slot_file(slot, file), value);
        set("cpuset.cpus", &settings.cpus)?;
        set("cpuset.mems", &settings.mems)?;
        set("memory.max", &limit(settings.memory_bytes, "max"))?;
        // No swap at all, where the kernel accounts swap.
        self.backing
            .write_if_present(&self.slot_file(slot, "memory.swap.max"), "0")?;
        // The OOM killer takes the whole slot, not one process of it: a
        // worker missing a child is worse than a dead worker.
        set("memory.oom.group", "1")?;
        set("pids.max", &limit(settings.pids_max, "max"))?;
        if let Some(rules) = &settings.devices {
            device_filter::attach(&self.subtree.join(slot), rules)?;
        }
        Ok(())
    }

    fn oom_kills(&self, slot: &str) -> u64 {
        cgroupfs::read_keyed(&self.slot_file(slot, "memory.events"), "oom_kill").unwrap_or(0)
    }

    fn memory_current(&self, slot: &str) -> Option<u64> {
        cgroupfs::read_number(&self.slot_file(slot, "memory.current"))
    }

    /// `None` before Linux 5.19, which has no `memory.peak`.
    fn peak_memory(&self, slot: &str) -> Option<u64> {
        cgroupfs::read_number(&self.slot_file(slot, "memory.peak"))
    }

    /// With `cgroup.kill` (Linux 5.14+) the kernel kills the whole subtree at
    /// once, forks in flight included; before it, each listed pid is sent
    /// SIGKILL.
    fn kill(&self, slot: &str) -> Result<(), CgroupError> {
        let kill = self.slot_file(slot, "cgroup.kill");
        if kill.exists() {
            self.backing.write(&kill, "1")
        } else {
            sigkill_listed(&self.slot_dirs(slot));
            Ok(())
        }
    }
}
