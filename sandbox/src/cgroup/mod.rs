//! One cgroup per slot: dedicated cores, a memory limit without swap, a
//! process limit and device rules, on cgroup v1 and v2.
//!
//! The node daemon owns one subtree (normally `fleetmap`) and makes one child
//! cgroup per slot in it. A worker joins its slot's cgroup between `fork` and
//! `exec` (see [`SlotCgroup::procs_files`] and `WorkerCommand::cgroup_procs`),
//! so no instruction of user code, Python or CUDA runs outside it.
//!
//! Why cgroupfs by hand and not `cgroups-rs`: cgroups-rs 0.5 mishandles v2
//! (`add_task` fails on ordinary v2 cgroups, `create()` writes controller
//! lines into every ancestor and ignores the errors, device rules and OOM
//! events are v1 only). Writing the files directly is a few dozen lines, is
//! what Slurm does, and gives one code path for both versions: a cgroup is a
//! directory per controller (v1) or one directory (v2), and every setting is
//! a write of one value to one named file, with an error that names it.
//!
//! This file is the public API and what is the same on both versions:
//! validation, the order in which a slot is created, limited, joined,
//! killed and removed, and clean-up on error. What differs is behind the
//! `Hierarchy` trait (`hierarchy.rs`), implemented once per version
//! (`v1.rs`, `v2.rs`); `cgroupfs.rs` reads and writes the files, `procs.rs`
//! lists and signals a cgroup's processes, `devices.rs` says which devices a
//! GPU slot may open and `device_filter.rs` turns that list into v2's BPF
//! program.

use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use self::{
    cgroupfs::{child_dirs, hint, read, Backing},
    devices::device_rules,
    hierarchy::{Hierarchy, SlotSettings},
};

mod cgroupfs;
mod device_filter;
mod devices;
mod hierarchy;
mod procs;
mod v1;
mod v2;

/// Which cgroup hierarchy the machine has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller, at `<mount>/<controller>`.
    V1,
    /// The unified hierarchy mounted at `<mount>` itself.
    V2,
}

/// Why a cgroup operation failed. Every variant names the file or directory
/// and, where the kernel's error is terse, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// The daemon cannot manage cgroups here (not root, a read-only
    /// cgroupfs, a controller missing): it should run its slots unpinned and
    /// say so.
    #[error(
        "cgroups are unavailable: {reason}; slots will run without pinned cores, memory, process or device limits"
    )]
    Unavailable { reason: String },
    #[error("could not write {value:?} to {}: {source} ({hint})", path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("could not read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} holds {content:?}, which is not what the kernel documents: {reason}", path.display())]
    Malformed {
        path: PathBuf,
        content: String,
        reason: String,
    },
    #[error("could not create the cgroup {}: {source} ({hint})", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("could not remove the cgroup {}: {source} ({hint})", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error(
        "processes {pids:?} are still in {} {waited:?} after SIGKILL; they are probably stuck in the kernel (state D in /proc/PID/status): the slot's cgroup cannot be removed until they exit",
        path.display()
    )]
    KillTimeout {
        path: PathBuf,
        pids: Vec<u32>,
        waited: Duration,
    },
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid slot limits for {name:?}: {reason}")]
    InvalidLimits { name: String, reason: &'static str },
    #[error("{0}")]
    Unsupported(String),
    #[error("could not install the GPU device filter on {}: {step} failed: {source}{verifier_log}", path.display())]
    DeviceFilter {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
        /// The kernel verifier's explanation, when it rejected the program.
        verifier_log: String,
    },
}

/// The v2 leaf that earlier versions moved the daemon into. It is no
/// longer made, but one left behind by such a version may still hold a
/// process, so no slot may take the name and leftovers keep it.
const DAEMON_LEAF: &str = "daemon";

/// How long [`SlotCgroup::kill_all`] waits for killed processes to leave.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// The daemon's own subtree, in which each slot gets a child cgroup.
#[derive(Debug)]
pub struct CgroupTree {
    hierarchy: Arc<dyn Hierarchy>,
    /// Where the dynamic majors of `nvidia-uvm` are listed; `/proc/devices`
    /// except in tests.
    proc_devices: PathBuf,
}

/// The resources of one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLimits {
    /// The slot's dedicated cores, written to `cpuset.cpus`. Must not be empty.
    pub cpus: Vec<u32>,
    /// `cpuset.mems` in list syntax; `None` takes the subtree's memory nodes.
    pub mems: Option<String>,
    /// The memory limit, swap included (no swap at all); `u64::MAX` for none.
    pub memory_bytes: u64,
    /// The most processes and threads the slot may hold; `u64::MAX` for none.
    pub pids_max: u64,
    /// `None`: device access is left as inherited (a node without GPUs
    /// configured). `Some`: default-deny, with the standard pseudo-devices
    /// and exactly these GPUs allowed.
    pub gpus: Option<GpuAccess>,
}

/// The NVIDIA GPUs a slot may open, by minor number (`/dev/nvidiaN` is 195:N).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuAccess {
    pub allowed_minors: Vec<u32>,
}

impl CgroupTree {
    /// Detects the hierarchy under `mount` (normally `/sys/fs/cgroup`) and
    /// creates the daemon's subtree `name` in it.
    ///
    /// v2 when `mount/cgroup.controllers` exists (a pure unified hierarchy):
    /// the subtree is `mount/name`; cpuset, memory and pids are enabled in
    /// the root's and the subtree's `cgroup.subtree_control`, and the calling
    /// process moves into the leaf `mount/name/daemon` (the no-internal-process
    /// rule). Otherwise v1, with cpuset, memory, pids, devices and freezer
    /// mounted at `mount/<controller>`: the subtree is `mount/<controller>/name`
    /// in each, and its cpuset gets the parent's CPUs and memory nodes (a new
    /// v1 cpuset starts empty).
    ///
    /// Leftovers of a daemon that died are cleared: every child cgroup of the
    /// subtree except `daemon` has its processes killed and is removed.
    ///
    /// Fails with [`CgroupError::Unavailable`] when the hierarchy is missing
    /// or cannot be written (not root, read-only cgroupfs).
    pub fn init(mount: &Path, name: &str) -> Result<Self, CgroupError> {
        Self::init_with(mount, name, Backing::Kernel, Path::new("/proc/devices"))
    }

    fn init_with(mount: &Path, name: &str, backing: Backing, proc_devices: &Path) -> Result<Self, CgroupError> {
        validate_name(name)?;
        let tree = CgroupTree {
            hierarchy: hierarchy::init(mount, name, backing)?,
            proc_devices: proc_devices.into(),
        };
        for leftover in tree.slot_names() {
            tree.slot_handle(&leftover, 0).remove()?;
        }
        Ok(tree)
    }

    pub fn version(&self) -> CgroupVersion {
        self.hierarchy.version()
    }

    /// Removes the whole subtree: every slot's processes are killed and its
    /// cgroup removed, then the subtree's own directories. A daemon that
    /// stops cleanly leaves nothing behind.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for name in self.slot_names() {
            self.slot_handle(&name, 0).remove()?;
        }
        for dir in self.hierarchy.subtree_dirs() {
            self.hierarchy.backing().remove_cgroup_dir(&dir)?;
        }
        Ok(())
    }

    /// Removes the subtrees under `mount` named `prefix` + a process id whose
    /// process is gone (an embedded cluster's `fleetmap-local-PID` after its
    /// process was killed), with whatever is left in them. Returns the names
    /// removed. A subtree whose process id is in use again is kept: a live
    /// process may own it.
    pub fn remove_stale(mount: &Path, prefix: &str) -> Vec<String> {
        Self::remove_stale_with(mount, prefix, Backing::Kernel)
    }

    fn remove_stale_with(mount: &Path, prefix: &str, backing: Backing) -> Vec<String> {
        let mut names = hierarchy::subtree_names(mount);
        names.sort();
        names.dedup();
        let mut removed = Vec::new();
        for name in names {
            let Some(pid) = name.strip_prefix(prefix).and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
                continue;
            }
            let tree = CgroupTree {
                hierarchy: hierarchy::open(mount, &name, backing),
                proc_devices: "/proc/devices".into(),
            };
            if tree.remove().is_ok() {
                removed.push(name);
            }
        }
        removed
    }

    /// The CPUs the subtree may use, for the daemon's core inventory.
    pub fn cpus(&self) -> Result<Vec<u32>, CgroupError> {
        read_list(&self.hierarchy.effective_cpus_file())
    }

    /// The memory nodes the subtree may use.
    pub fn mems(&self) -> Result<Vec<u32>, CgroupError> {
        read_list(&self.hierarchy.effective_mems_file())
    }

    /// Creates the slot's cgroup and applies `limits`. On any error nothing
    /// of the slot is left behind.
    pub fn create_slot(&self, name: &str, limits: &SlotLimits) -> Result<SlotCgroup, CgroupError> {
        validate_name(name)?;
        if name == DAEMON_LEAF {
            return Err(CgroupError::InvalidName {
                name: name.into(),
                reason: "`daemon` is the daemon's own cgroup",
            });
        }
        let invalid = |reason| CgroupError::InvalidLimits {
            name: name.into(),
            reason,
        };
        if limits.cpus.is_empty() {
            return Err(invalid("no CPUs: a cpuset without CPUs cannot hold a process"));
        }
        // Read before anything is created, so that a failure leaves nothing.
        let settings = self.settings(limits, true)?;

        let slot = self.slot_handle(name, limits.memory_bytes);
        let backing = self.hierarchy.backing();
        for (i, dir) in slot.dirs.iter().enumerate() {
            // A cgroup that exists already would be shared by two slots:
            // refuse rather than adopt it, and leave it alone (it is not
            // ours to remove); remove only what this call created.
            if let Err(source) = fs::create_dir(dir) {
                for created in &slot.dirs[..i] {
                    let _ = backing.remove_cgroup_dir(created);
                }
                slot.removed.store(true, Ordering::Relaxed);
                return Err(CgroupError::Create {
                    path: dir.clone(),
                    hint: hint(&source),
                    source,
                });
            }
        }
        // On an error here `slot` is dropped, which removes it.
        self.hierarchy.set_limits(name, &settings)?;
        let mut slot = slot;
        slot.applied = Some(limits.clone());
        Ok(slot)
    }

    /// The settings `limits` come to, read before anything is written.
    fn settings(&self, limits: &SlotLimits, with_devices: bool) -> Result<SlotSettings, CgroupError> {
        let mems = match &limits.mems {
            Some(mems) => mems.clone(),
            None => read(&self.hierarchy.effective_mems_file())?.trim().to_string(),
        };
        let devices = match (&limits.gpus, with_devices) {
            (Some(gpus), true) => Some(device_rules(gpus, &read(&self.proc_devices)?)),
            _ => None,
        };
        Ok(SlotSettings {
            cpus: format_cpu_list(&limits.cpus),
            mems,
            memory_bytes: limits.memory_bytes,
            pids_max: limits.pids_max,
            devices,
        })
    }

    /// Gives a warm worker's slot to a new job: its cores, memory limit and
    /// process limit become `limits`' (the kernel moves the worker's threads
    /// to the new cores), and its peak memory starts again. Its device rules
    /// stay: a warm worker serves only jobs with the same GPUs.
    ///
    /// Limits equal to those this handle last wrote are not written again
    /// (the common case: one caller's jobs one after another), and the peak
    /// then runs on from the earlier job; it is only reported with an OOM
    /// kill, where it is the limit, which both jobs share. A fleet node's
    /// calls cannot write a slot's limits (they see `/sys` read-only and do
    /// not run as root); where a call can (the embedded cluster, whose calls
    /// run as the caller), only its own principal's next job, the only job
    /// its worker may serve, could inherit what it wrote.
    pub fn reassign_slot(&self, slot: &mut SlotCgroup, limits: &SlotLimits) -> Result<(), CgroupError> {
        if limits.cpus.is_empty() {
            return Err(CgroupError::InvalidLimits {
                name: slot.name.clone(),
                reason: "no CPUs: a cpuset without CPUs cannot hold a process",
            });
        }
        if slot.applied.as_ref() == Some(limits) {
            return Ok(());
        }
        // Unknown until written again: a failure part-way leaves some of
        // the old limits and some of the new.
        slot.applied = None;
        let settings = self.settings(limits, false)?;
        self.hierarchy.set_limits(&slot.name, &settings)?;
        slot.memory_limit = limits.memory_bytes;
        slot.applied = Some(limits.clone());
        Ok(())
    }

    /// Names of the slot cgroups present now (the daemon's own leaf excluded).
    pub fn slot_names(&self) -> Vec<String> {
        let mut names = BTreeSet::new();
        for dir in self.hierarchy.subtree_dirs() {
            for child in child_dirs(&dir) {
                if let Some(name) = child.file_name().and_then(|n| n.to_str()) {
                    if name != DAEMON_LEAF {
                        names.insert(name.to_string());
                    }
                }
            }
        }
        names.into_iter().collect()
    }

    /// What each slot cgroup present now uses: its memory and its
    /// processes (for metrics).
    pub fn slot_usage(&self) -> Vec<SlotUsage> {
        self.slot_names()
            .into_iter()
            .map(|name| SlotUsage {
                // Read through the hierarchy, never through a `SlotCgroup`
                // handle, whose drop would tear the slot down.
                memory_bytes: self.hierarchy.memory_current(&name),
                pids: procs::pids_in(&self.hierarchy.slot_dirs(&name)),
                name,
            })
            .collect()
    }

    /// A handle on the slot cgroup `name`, whether or not it exists.
    fn slot_handle(&self, name: &str, memory_limit: u64) -> SlotCgroup {
        SlotCgroup {
            hierarchy: Arc::clone(&self.hierarchy),
            name: name.into(),
            dirs: self.hierarchy.slot_dirs(name),
            memory_limit,
            applied: None,
            removed: AtomicBool::new(false),
        }
    }
}

/// One slot's cgroup. Dropping it kills its processes and removes it.
#[derive(Debug)]
pub struct SlotCgroup {
    hierarchy: Arc<dyn Hierarchy>,
    name: String,
    /// One per v1 controller, one on v2.
    dirs: Vec<PathBuf>,
    memory_limit: u64,
    /// The limits this handle last wrote, all of them.
    applied: Option<SlotLimits>,
    removed: AtomicBool,
}

/// What one slot cgroup uses now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotUsage {
    pub name: String,
    /// Memory charged to it now, in bytes, where the kernel says.
    pub memory_bytes: Option<u64>,
    /// Its processes and those of any cgroup below it.
    pub pids: Vec<u32>,
}

impl SlotCgroup {
    /// The `cgroup.procs` files a worker writes `"0"` into between `fork` and
    /// `exec` to join this slot (one per v1 controller, one on v2), opened
    /// here, in the daemon, so that the child only calls `write`.
    pub fn procs_files(&self) -> Result<Vec<fs::File>, CgroupError> {
        procs::open_procs_files(&self.dirs)
    }

    /// How many processes the OOM killer has killed in this slot.
    pub fn oom_kills(&self) -> u64 {
        self.hierarchy.oom_kills(&self.name)
    }

    /// The most memory the slot has used, in bytes; `None` where the kernel
    /// does not keep it (v2 before Linux 5.19 has no `memory.peak`).
    pub fn peak_memory(&self) -> Option<u64> {
        self.hierarchy.peak_memory(&self.name)
    }

    /// The memory the slot's processes use now, in bytes.
    pub fn memory_current(&self) -> Option<u64> {
        self.hierarchy.memory_current(&self.name)
    }

    /// The memory limit in force, in bytes.
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit
    }

    /// The processes in the slot and in any cgroup below it, in every
    /// controller: what a kill must reach.
    pub fn pids(&self) -> Vec<u32> {
        procs::pids_in(&self.dirs)
    }

    /// The processes in the slot and below it as its first controller
    /// lists them: one listing where [`SlotCgroup::pids`] reads one per
    /// controller (five on v1). A process is in every controller's cgroup
    /// of its slot unless something that may write the cgroup files moved
    /// it, which a call on a fleet node cannot (its `/sys` is read-only and
    /// it holds no capability); the node's checks between jobs use this,
    /// and a kill uses `pids`.
    pub fn members(&self) -> Vec<u32> {
        procs::pids_in(&self.dirs[..self.dirs.len().min(1)])
    }

    /// Kills every process in the slot and waits (up to 2 s) until none is left.
    ///
    /// v2 with `cgroup.kill` (Linux 5.14+): the kernel kills the whole
    /// subtree at once, forks in flight included. Otherwise each pid is sent
    /// SIGKILL until the slot is empty. v1: the slot is frozen first, so that
    /// nothing can fork or exit (and have its pid reused) between reading
    /// `cgroup.procs` and the kill; the frozen processes are killed, then
    /// thawed so that they can act on the signal and exit.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.hierarchy.kill(&self.name)?;
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let left = self.pids();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::KillTimeout {
                    path: self.dirs[0].clone(),
                    pids: left,
                    waited: KILL_WAIT,
                });
            }
            // Without cgroup.kill or a freezer, processes forked after the
            // last read are still to be killed.
            procs::sigkill_listed(&self.dirs);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills every process and removes the slot's cgroup directories.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.kill_all()?;
        for dir in &self.dirs {
            self.hierarchy.backing().remove_cgroup_dir(dir)?;
        }
        self.removed.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for SlotCgroup {
    fn drop(&mut self) {
        if !self.removed.load(Ordering::Relaxed) {
            let _ = self.remove();
        }
    }
}

fn read_list(path: &Path) -> Result<Vec<u32>, CgroupError> {
    let content = read(path)?;
    parse_cpu_list(&content).map_err(|reason| CgroupError::Malformed {
        path: path.into(),
        content,
        reason,
    })
}

/// Parses the kernel's list syntax (`0-3,8,10-11`; empty means none).
pub fn parse_cpu_list(list: &str) -> Result<Vec<u32>, String> {
    let mut cpus = BTreeSet::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let number = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| format!("{s:?} is not a CPU number"))
        };
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (number(first)?, number(last)?);
                if first > last {
                    return Err(format!("the range {part:?} runs backwards"));
                }
                cpus.extend(first..=last);
            }
            None => {
                cpus.insert(number(part)?);
            }
        }
    }
    Ok(cpus.into_iter().collect())
}

/// Formats CPUs in the kernel's list syntax, runs collapsed (`0-3,8`).
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let sorted: BTreeSet<u32> = cpus.iter().copied().collect();
    let mut parts = Vec::new();
    let mut iter = sorted.into_iter().peekable();
    while let Some(first) = iter.next() {
        let mut last = first;
        while iter.peek() == Some(&(last + 1)) {
            last += 1;
            iter.next();
        }
        parts.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
    }
    parts.join(",")
}

/// A cgroup name must be one plain path component that cannot be mistaken
/// for an interface file.
fn validate_name(name: &str) -> Result<(), CgroupError> {
    let invalid = |reason| {
        Err(CgroupError::InvalidName {
            name: name.into(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 200 {
        return invalid("must be 1 to 200 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return invalid("only ASCII letters, digits, `-`, `_` and `.` are allowed");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return invalid("must start with a letter or a digit");
    }
    // Interface files are `<controller>.<file>` (`cgroup.procs`,
    // `memory.max`) or, on v1, a few names without a dot.
    const INTERFACE_PREFIXES: [&str; 16] = [
        "cgroup",
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "pids",
        "devices",
        "freezer",
        "io",
        "blkio",
        "hugetlb",
        "rdma",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
    ];
    let looks_like_interface_file = match name.split_once('.') {
        Some((prefix, _)) => INTERFACE_PREFIXES.contains(&prefix),
        None => matches!(name, "tasks" | "notify_on_release" | "release_agent"),
    };
    if looks_like_interface_file {
        return invalid("looks like a cgroupfs interface file");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
