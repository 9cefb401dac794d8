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
//! Where the v2 subtree lives: directly under the mount (`/sys/fs/cgroup/fleetmap`),
//! not next to the cgroup the daemon was started in. That is the simplest
//! choice that works on a host where the daemon runs as root and owns the
//! machine; under systemd with `Delegate=yes` the delegated cgroup would be
//! the better parent, and only [`CgroupTree::init`] would change.

use std::{
    collections::BTreeSet,
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

mod device_filter;

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

/// The v1 controllers a slot uses; on v2 the first three are enabled in the
/// subtree, devices are a BPF program and freezing is built in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    Cpuset,
    Memory,
    Pids,
    Devices,
    Freezer,
}

const V1_CONTROLLERS: [Controller; 5] = [
    Controller::Cpuset,
    Controller::Memory,
    Controller::Pids,
    Controller::Devices,
    Controller::Freezer,
];

/// What the daemon enables for its slots on v2.
const V2_CONTROLLERS: [&str; 3] = ["cpuset", "memory", "pids"];

/// The v2 leaf the daemon moves itself into: a v2 cgroup that hands
/// controllers to its children may hold no processes itself.
const DAEMON_LEAF: &str = "daemon";

/// How long [`SlotCgroup::kill_all`] waits for killed processes to leave.
const KILL_WAIT: Duration = Duration::from_secs(2);

impl Controller {
    fn name(self) -> &'static str {
        match self {
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Devices => "devices",
            Controller::Freezer => "freezer",
        }
    }
}

/// Whether the paths are a real cgroupfs or, in unit tests, a plain
/// directory laid out like one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    Kernel,
    /// A plain directory: writes append `value\n` (creating the file, which
    /// the kernel would have created at `mkdir`), so a test can read back
    /// every value written in order; removal is `remove_dir_all`.
    #[cfg_attr(not(test), allow(dead_code))]
    PlainDirectory,
}

/// One cgroup's directories: one per v1 controller, or the same directory
/// for every controller on v2. Settings go through [`Dirs::of`], so the code
/// that writes them is the same for both versions.
#[derive(Debug, Clone)]
struct Dirs {
    version: CgroupVersion,
    /// Indexed like [`V1_CONTROLLERS`]; on v2 all five are the same path.
    per_controller: [PathBuf; 5],
}

impl Dirs {
    fn v1(mount: &Path, relative: &Path) -> Dirs {
        Dirs {
            version: CgroupVersion::V1,
            per_controller: V1_CONTROLLERS.map(|c| mount.join(c.name()).join(relative)),
        }
    }

    fn v2(dir: PathBuf) -> Dirs {
        Dirs {
            version: CgroupVersion::V2,
            per_controller: [(); 5].map(|()| dir.clone()),
        }
    }

    fn of(&self, controller: Controller) -> &Path {
        // V1_CONTROLLERS lists every variant, so the position exists.
        let i = V1_CONTROLLERS
            .iter()
            .position(|c| *c == controller)
            .expect("every controller is in V1_CONTROLLERS");
        &self.per_controller[i]
    }

    /// The directories to create, populate and remove: five on v1, one on v2.
    fn distinct(&self) -> &[PathBuf] {
        match self.version {
            CgroupVersion::V1 => &self.per_controller,
            CgroupVersion::V2 => &self.per_controller[..1],
        }
    }

    fn child(&self, name: &str) -> Dirs {
        Dirs {
            version: self.version,
            per_controller: self.per_controller.clone().map(|p| p.join(name)),
        }
    }
}

/// The daemon's own subtree, in which each slot gets a child cgroup.
#[derive(Debug)]
pub struct CgroupTree {
    dirs: Dirs,
    backing: Backing,
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
        let version = detect_version(mount)?;
        let tree = match version {
            CgroupVersion::V1 => {
                let dirs = Dirs::v1(mount, Path::new(name));
                for dir in dirs.distinct() {
                    create_dir_if_missing(dir).map_err(unavailable_if_denied)?;
                }
                // A new v1 cpuset has no CPUs and no memory nodes, and no
                // process can join it until both are set. The parent's are
                // copied, not inherited through cgroup.clone_children=1: with
                // clone_children a slot whose own cpuset.cpus write failed
                // would silently run on every CPU; without it, joining fails.
                let subtree = dirs.of(Controller::Cpuset);
                let parent = mount.join(Controller::Cpuset.name());
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    let value = read(&parent.join(file))?;
                    write(backing, &subtree.join(file), value.trim()).map_err(unavailable_if_denied)?;
                }
                CgroupTree {
                    dirs,
                    backing,
                    proc_devices: proc_devices.into(),
                }
            }
            CgroupVersion::V2 => {
                let dir = mount.join(name);
                let available = read(&mount.join("cgroup.controllers"))?;
                let enabled = read(&mount.join("cgroup.subtree_control"))?;
                for controller in V2_CONTROLLERS {
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
                    write(
                        backing,
                        &mount.join("cgroup.subtree_control"),
                        &format!("+{controller}"),
                    )
                    .map_err(unavailable_if_denied)?;
                }
                create_dir_if_missing(&dir).map_err(unavailable_if_denied)?;
                let leaf = dir.join(DAEMON_LEAF);
                create_dir_if_missing(&leaf).map_err(unavailable_if_denied)?;
                write(backing, &leaf.join("cgroup.procs"), &std::process::id().to_string())
                    .map_err(unavailable_if_denied)?;
                let plus: Vec<String> = V2_CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
                write(backing, &dir.join("cgroup.subtree_control"), &plus.join(" ")).map_err(unavailable_if_denied)?;
                CgroupTree {
                    dirs: Dirs::v2(dir),
                    backing,
                    proc_devices: proc_devices.into(),
                }
            }
        };
        for leftover in tree.slot_names() {
            tree.slot_handle(&leftover, 0).remove()?;
        }
        Ok(tree)
    }

    pub fn version(&self) -> CgroupVersion {
        self.dirs.version
    }

    /// The CPUs the subtree may use, for the daemon's core inventory.
    pub fn cpus(&self) -> Result<Vec<u32>, CgroupError> {
        self.read_list(match self.version() {
            CgroupVersion::V1 => "cpuset.effective_cpus",
            CgroupVersion::V2 => "cpuset.cpus.effective",
        })
    }

    /// The memory nodes the subtree may use.
    pub fn mems(&self) -> Result<Vec<u32>, CgroupError> {
        self.read_list(self.mems_file())
    }

    fn mems_file(&self) -> &'static str {
        match self.version() {
            CgroupVersion::V1 => "cpuset.effective_mems",
            CgroupVersion::V2 => "cpuset.mems.effective",
        }
    }

    fn read_list(&self, file: &str) -> Result<Vec<u32>, CgroupError> {
        let path = self.dirs.of(Controller::Cpuset).join(file);
        let content = read(&path)?;
        parse_cpu_list(&content).map_err(|reason| CgroupError::Malformed { path, content, reason })
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
        let mems = match &limits.mems {
            Some(mems) => mems.clone(),
            None => read(&self.dirs.of(Controller::Cpuset).join(self.mems_file()))?
                .trim()
                .to_string(),
        };
        let device_rules = match &limits.gpus {
            Some(gpus) => {
                let proc_devices = read(&self.proc_devices)?;
                Some(device_rules(gpus, &proc_devices))
            }
            None => None,
        };

        let slot = self.slot_handle(name, limits.memory_bytes);
        let dirs = slot.dirs.distinct();
        for (i, dir) in dirs.iter().enumerate() {
            // A cgroup that exists already would be shared by two slots:
            // refuse rather than adopt it, and leave it alone (it is not
            // ours to remove); remove only what this call created.
            if let Err(source) = fs::create_dir(dir) {
                for created in &dirs[..i] {
                    let _ = remove_cgroup_dir(self.backing, created);
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
        slot.apply(&limits.cpus, &mems, limits, device_rules.as_deref())?;
        Ok(slot)
    }

    /// Names of the slot cgroups present now (the daemon's own leaf excluded).
    pub fn slot_names(&self) -> Vec<String> {
        let mut names = BTreeSet::new();
        for dir in self.dirs.distinct() {
            for child in child_dirs(dir) {
                if let Some(name) = child.file_name().and_then(|n| n.to_str()) {
                    if name != DAEMON_LEAF {
                        names.insert(name.to_string());
                    }
                }
            }
        }
        names.into_iter().collect()
    }

    /// A handle on the slot cgroup `name`, whether or not it exists.
    fn slot_handle(&self, name: &str, memory_limit: u64) -> SlotCgroup {
        SlotCgroup {
            dirs: self.dirs.child(name),
            backing: self.backing,
            memory_limit,
            removed: AtomicBool::new(false),
        }
    }
}

/// One slot's cgroup. Dropping it kills its processes and removes it.
#[derive(Debug)]
pub struct SlotCgroup {
    dirs: Dirs,
    backing: Backing,
    memory_limit: u64,
    removed: AtomicBool,
}

impl SlotCgroup {
    fn apply(
        &self,
        cpus: &[u32],
        mems: &str,
        limits: &SlotLimits,
        device_rules: Option<&[DeviceRule]>,
    ) -> Result<(), CgroupError> {
        let set = |controller: Controller, file: &str, value: &str| {
            write(self.backing, &self.dirs.of(controller).join(file), value)
        };
        // Only when the kernel has the file (swap accounting compiled in and
        // enabled); a plain test directory gets every file.
        let set_if_present = |controller: Controller, file: &str, value: &str| {
            let path = self.dirs.of(controller).join(file);
            if self.backing == Backing::Kernel && !path.exists() {
                return Ok(());
            }
            write(self.backing, &path, value)
        };
        let unlimited = |n: u64, none: &'static str| match n {
            u64::MAX => none.to_string(),
            n => n.to_string(),
        };
        set(Controller::Cpuset, "cpuset.cpus", &format_cpu_list(cpus))?;
        set(Controller::Cpuset, "cpuset.mems", mems)?;
        let memory = unlimited(limits.memory_bytes, "max");
        let pids = unlimited(limits.pids_max, "max");
        match self.dirs.version {
            CgroupVersion::V1 => {
                let memory = unlimited(limits.memory_bytes, "-1");
                // memsw (memory + swap) must stay >= the memory limit, so the
                // memory limit goes first; equal values mean no swap at all.
                set(Controller::Memory, "memory.limit_in_bytes", &memory)?;
                set_if_present(Controller::Memory, "memory.memsw.limit_in_bytes", &memory)?;
                set(Controller::Pids, "pids.max", &pids)?;
                if let Some(rules) = device_rules {
                    // Deny everything, then allow the list. A v1 devices
                    // cgroup starts as a copy of its parent's, here "a *:*
                    // rwm" (allow all); in that allow-all mode the kernel
                    // keeps deny exceptions, but writing "a" to devices.deny
                    // switches to deny-all mode, where each allow line is an
                    // exception. The other way round (allow-all plus a deny
                    // of 195:* and allows for single minors) cannot work: an
                    // allow exception cannot punch a hole in a wildcard deny.
                    set(Controller::Devices, "devices.deny", "a")?;
                    for rule in rules {
                        set(Controller::Devices, "devices.allow", &rule.to_string())?;
                    }
                }
            }
            CgroupVersion::V2 => {
                set(Controller::Memory, "memory.max", &memory)?;
                set_if_present(Controller::Memory, "memory.swap.max", "0")?;
                // The OOM killer takes the whole slot, not one process of it:
                // a worker missing a child is worse than a dead worker.
                set(Controller::Memory, "memory.oom.group", "1")?;
                set(Controller::Pids, "pids.max", &pids)?;
                if let Some(rules) = device_rules {
                    device_filter::attach(self.dirs.of(Controller::Devices), rules)?;
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a worker writes `"0"` into between `fork` and
    /// `exec` to join this slot (one per v1 controller, one on v2), opened
    /// here, in the daemon, so that the child only calls `write`.
    pub fn procs_files(&self) -> Result<Vec<fs::File>, CgroupError> {
        self.dirs
            .distinct()
            .iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(|source| CgroupError::Write {
                        path,
                        value: "0 (from the worker)".into(),
                        hint: hint(&source),
                        source,
                    })
            })
            .collect()
    }

    /// How many processes the OOM killer has killed in this slot.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.dirs.version {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        };
        let Ok(content) = fs::read_to_string(self.dirs.of(Controller::Memory).join(file)) else {
            return 0;
        };
        content
            .lines()
            .find_map(|line| line.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The most memory the slot has used, in bytes; `None` where the kernel
    /// does not keep it (v2 before Linux 5.19 has no `memory.peak`).
    pub fn peak_memory(&self) -> Option<u64> {
        let file = match self.dirs.version {
            CgroupVersion::V1 => "memory.max_usage_in_bytes",
            CgroupVersion::V2 => "memory.peak",
        };
        fs::read_to_string(self.dirs.of(Controller::Memory).join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The memory limit given at creation, in bytes.
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit
    }

    /// The processes in the slot and in any cgroup below it.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = BTreeSet::new();
        for dir in self.dirs.distinct() {
            let mut stack = vec![dir.clone()];
            while let Some(dir) = stack.pop() {
                if let Ok(content) = fs::read_to_string(dir.join("cgroup.procs")) {
                    pids.extend(content.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
                }
                stack.extend(child_dirs(&dir));
            }
        }
        pids.into_iter().collect()
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
        match self.dirs.version {
            CgroupVersion::V2 => {
                let kill = self.dirs.of(Controller::Memory).join("cgroup.kill");
                if kill.exists() {
                    write(self.backing, &kill, "1")?;
                } else {
                    self.sigkill_listed();
                }
            }
            CgroupVersion::V1 => {
                let state = self.dirs.of(Controller::Freezer).join("freezer.state");
                let frozen = state.exists() && write(self.backing, &state, "FROZEN").is_ok();
                if frozen {
                    // FREEZING until every task has stopped; a task in
                    // uninterruptible sleep can hold it there, so wait only
                    // a little and kill anyway.
                    let deadline = Instant::now() + Duration::from_millis(500);
                    while Instant::now() < deadline
                        && fs::read_to_string(&state)
                            .map(|s| s.trim() != "FROZEN")
                            .unwrap_or(false)
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                self.sigkill_listed();
                if frozen {
                    write(self.backing, &state, "THAWED")?;
                }
            }
        }
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let left = self.pids();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::KillTimeout {
                    path: self.dirs.distinct()[0].clone(),
                    pids: left,
                    waited: KILL_WAIT,
                });
            }
            // Without cgroup.kill or a freezer, processes forked after the
            // last read are still to be killed.
            self.sigkill_listed();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends SIGKILL to every process listed, until a read lists no process
    /// not yet killed (bounded, in case a fork bomb outruns us; the caller
    /// waits and retries).
    fn sigkill_listed(&self) {
        let mut killed = BTreeSet::new();
        for _ in 0..100 {
            let fresh: Vec<u32> = self.pids().into_iter().filter(|p| !killed.contains(p)).collect();
            if fresh.is_empty() {
                return;
            }
            for pid in fresh {
                if let Ok(pid_t) = libc::pid_t::try_from(pid) {
                    // SAFETY: kill(2) takes plain integers and touches no
                    // memory. The pid was just listed in this slot's
                    // cgroup.procs; on v1 the slot is frozen, so it cannot
                    // have exited and been reused since.
                    unsafe {
                        libc::kill(pid_t, libc::SIGKILL);
                    }
                }
                killed.insert(pid);
            }
        }
    }

    /// Kills every process and removes the slot's cgroup directories.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.kill_all()?;
        for dir in self.dirs.distinct() {
            remove_cgroup_dir(self.backing, dir)?;
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

/// A device a slot may use, with read, write and mknod access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeviceRule {
    /// Character devices only: the slot needs no block device.
    major: u32,
    /// `None`: every minor.
    minor: Option<u32>,
}

impl std::fmt::Display for DeviceRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.minor {
            Some(minor) => write!(f, "c {}:{minor} rwm", self.major),
            None => write!(f, "c {}:* rwm", self.major),
        }
    }
}

/// Major of `/dev/nvidia*`, `/dev/nvidiactl` and `/dev/nvidia-modeset`.
const NVIDIA_MAJOR: u32 = 195;

/// What a slot with GPUs may open: the pseudo-devices every program expects
/// (null, zero, full, random, urandom, tty, ptmx, the pty slaves), its own
/// GPUs, the control devices every CUDA process opens, and the unified
/// memory devices, whose major is assigned when the driver loads.
fn device_rules(gpus: &GpuAccess, proc_devices: &str) -> Vec<DeviceRule> {
    let dev = |major, minor| DeviceRule {
        major,
        minor: Some(minor),
    };
    let mut rules = vec![
        dev(1, 3),
        dev(1, 5),
        dev(1, 7),
        dev(1, 8),
        dev(1, 9),
        dev(5, 0),
        dev(5, 2),
        DeviceRule {
            major: 136,
            minor: None,
        },
    ];
    rules.extend(gpus.allowed_minors.iter().map(|&minor| dev(NVIDIA_MAJOR, minor)));
    rules.push(dev(NVIDIA_MAJOR, 255));
    rules.push(dev(NVIDIA_MAJOR, 254));
    // If the driver is loaded only after the slot was set up, these majors
    // are missing and CUDA's unified memory fails in this slot: load it at
    // boot (nvidia-persistenced or nvidia-modprobe -u).
    rules.extend(
        char_device_majors(proc_devices, &["nvidia-uvm", "nvidia-uvm-tools"])
            .into_iter()
            .map(|major| DeviceRule { major, minor: None }),
    );
    rules
}

/// The majors of the named character devices in `/proc/devices`.
fn char_device_majors(proc_devices: &str, names: &[&str]) -> Vec<u32> {
    let mut in_char = false;
    let mut majors = Vec::new();
    for line in proc_devices.lines() {
        match line.trim() {
            "Character devices:" => in_char = true,
            "Block devices:" => in_char = false,
            entry if in_char => {
                let mut parts = entry.split_whitespace();
                if let (Some(major), Some(name)) = (parts.next(), parts.next()) {
                    if names.contains(&name) {
                        if let Ok(major) = major.parse() {
                            majors.push(major);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    majors
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

fn detect_version(mount: &Path) -> Result<CgroupVersion, CgroupError> {
    if mount.join("cgroup.controllers").exists() {
        return Ok(CgroupVersion::V2);
    }
    let missing: Vec<&str> = V1_CONTROLLERS
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
    Ok(CgroupVersion::V1)
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

/// What to do about an error from cgroupfs, by errno.
fn hint(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => {
            "run the node daemon as root, or delegate this cgroup subtree to its user"
        }
        Some(libc::EROFS) => "cgroupfs is mounted read-only here (a container without cgroup delegation?)",
        Some(libc::ENOENT) => {
            "the file or controller does not exist here: on v2 check the parent's cgroup.subtree_control, on v1 that the controller's hierarchy is mounted"
        }
        Some(libc::EEXIST) => "a cgroup of that name exists already; slot names must be unique",
        Some(libc::EINVAL) => {
            "the kernel refused the value: a CPU or memory node outside the parent's, a limit below current use, or a malformed value"
        }
        Some(libc::ENOSPC) => "the cpuset has no CPUs or no memory nodes, so no process can join it",
        Some(libc::EBUSY) => {
            "the cgroup still holds processes or child cgroups (or, on v2, holds processes while enabling controllers for its children)"
        }
        _ => "unexpected error from cgroupfs",
    }
}

/// Permission and read-only errors during setup mean "no cgroups here",
/// which the daemon survives by running slots unpinned.
fn unavailable_if_denied(error: CgroupError) -> CgroupError {
    let denied = match &error {
        CgroupError::Write { source, .. } | CgroupError::Create { source, .. } => {
            matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM | libc::EROFS))
        }
        _ => false,
    };
    if denied {
        CgroupError::Unavailable {
            reason: error.to_string(),
        }
    } else {
        error
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })
}

/// Writes one value to one cgroupfs file, in one `write` call (cgroupfs
/// takes each write as one command).
fn write(backing: Backing, path: &Path, value: &str) -> Result<(), CgroupError> {
    let result = match backing {
        Backing::Kernel => fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(value.as_bytes())),
        Backing::PlainDirectory => fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .and_then(|mut f| f.write_all(format!("{value}\n").as_bytes())),
    };
    result.map_err(|source| CgroupError::Write {
        path: path.into(),
        value: value.into(),
        hint: hint(&source),
        source,
    })
}

fn create_dir_if_missing(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: dir.into(),
            hint: hint(&source),
            source,
        }),
    }
}

/// The child cgroups of `dir` (its subdirectories); none if it is gone.
fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect()
}

/// Removes an empty cgroup and its empty descendants, deepest first. The
/// kernel may report EBUSY for a moment after the last process exited (its
/// exit is still being accounted), so EBUSY is retried briefly.
fn remove_cgroup_dir(backing: Backing, dir: &Path) -> Result<(), CgroupError> {
    if backing == Backing::PlainDirectory {
        return match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CgroupError::Remove {
                path: dir.into(),
                hint: hint(&e),
                source: e,
            }),
            _ => Ok(()),
        };
    }
    for child in child_dirs(dir) {
        remove_cgroup_dir(backing, &child)?;
    }
    let mut attempts = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.into(),
                    hint: hint(&source),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
