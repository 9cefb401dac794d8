//! The seam between cgroup v1 and v2: what differs between the two
//! hierarchies, behind one trait, and the one place that picks a version.
//!
//! A slot's life is the same on both: its directories are created, its
//! limits written, its worker joins through `cgroup.procs`, its peak memory
//! and OOM kills are read, its processes are killed and its directories
//! removed. Creating, joining, listing and removing are the same `mkdir`,
//! `write`, `read` and `rmdir` on each of a slot's directories, so they are
//! written once, in `mod.rs` and `procs.rs`, over
//! [`Hierarchy::subtree_dirs`]. What differs is where the directories are
//! (five on v1, one on v2), which files hold which setting, and how the
//! kernel kills a whole cgroup: that is this trait, implemented by `v1.rs`
//! and `v2.rs`.

use std::{fmt, path::Path, path::PathBuf, sync::Arc};

use super::{cgroupfs::Backing, devices::DeviceRule, v1::V1, v2::V2, CgroupError, CgroupVersion};

/// One cgroup hierarchy, with the daemon's subtree in it.
pub(super) trait Hierarchy: fmt::Debug + Send + Sync {
    fn version(&self) -> CgroupVersion;

    /// Whether the paths are cgroupfs or a unit test's plain directory.
    fn backing(&self) -> Backing;

    /// The directories of the daemon's subtree: one per controller on v1,
    /// one on v2. Each slot is a subdirectory of the same name in every one
    /// of them; they are created in this order and removed in it.
    fn subtree_dirs(&self) -> Vec<PathBuf>;

    /// The directories of the slot `slot`, in the order of
    /// [`Hierarchy::subtree_dirs`].
    fn slot_dirs(&self, slot: &str) -> Vec<PathBuf> {
        self.subtree_dirs().into_iter().map(|dir| dir.join(slot)).collect()
    }

    /// The file listing the CPUs the subtree may use.
    fn effective_cpus_file(&self) -> PathBuf;

    /// The file listing the memory nodes the subtree may use.
    fn effective_mems_file(&self) -> PathBuf;

    /// Writes the limits of the slot `slot`: one whose directories were just
    /// created (on an error the caller removes it), or a warm worker's slot
    /// taken by a new job (`devices` is then `None`: the worker keeps the
    /// same devices).
    fn set_limits(&self, slot: &str, settings: &SlotSettings) -> Result<(), CgroupError>;

    /// How many processes the OOM killer has killed in the slot; 0 when the
    /// count cannot be read.
    fn oom_kills(&self, slot: &str) -> u64;

    /// The memory the slot uses now, in bytes.
    fn memory_current(&self, slot: &str) -> Option<u64>;

    /// The most memory the slot has used, in bytes, where the kernel keeps it.
    fn peak_memory(&self, slot: &str) -> Option<u64>;

    /// Kills every process of the slot once, by the hierarchy's own means
    /// where it has one. The caller then waits until the slot is empty,
    /// signalling stragglers.
    fn kill(&self, slot: &str) -> Result<(), CgroupError>;
}

/// A slot's settings as they are written, read and computed before any of
/// its directories is created, so that a failure to read leaves nothing.
#[derive(Debug)]
pub(super) struct SlotSettings {
    /// `cpuset.cpus`, in list syntax.
    pub(super) cpus: String,
    /// `cpuset.mems`, in list syntax.
    pub(super) mems: String,
    /// Memory and swap together; `u64::MAX` for no limit.
    pub(super) memory_bytes: u64,
    /// `u64::MAX` for no limit.
    pub(super) pids_max: u64,
    /// `None`: device access stays as inherited.
    pub(super) devices: Option<Vec<DeviceRule>>,
}

/// A limit as a cgroupfs value: the number, or the file's own spelling of
/// "no limit" for `u64::MAX`.
pub(super) fn limit(n: u64, unlimited: &'static str) -> String {
    match n {
        u64::MAX => unlimited.to_string(),
        n => n.to_string(),
    }
}

/// Detects the hierarchy under `mount` (normally `/sys/fs/cgroup`) and sets
/// up the daemon's subtree `name` in it (see [`super::CgroupTree::init`]).
pub(super) fn init(mount: &Path, name: &str, backing: Backing) -> Result<Arc<dyn Hierarchy>, CgroupError> {
    // A pure unified hierarchy has `cgroup.controllers` at its root; a v1 or
    // hybrid host has a directory per v1 controller there instead.
    if mount.join("cgroup.controllers").exists() {
        Ok(Arc::new(V2::init(mount, name, backing)?))
    } else {
        Ok(Arc::new(V1::init(mount, name, backing)?))
    }
}

/// The subtree `name` under `mount` as it is, creating nothing.
pub(super) fn open(mount: &Path, name: &str, backing: Backing) -> Arc<dyn Hierarchy> {
    if mount.join("cgroup.controllers").exists() {
        Arc::new(V2::existing(mount.join(name), backing))
    } else {
        Arc::new(V1::open(mount, name, backing))
    }
}

/// The names of the subtrees under `mount`.
pub(super) fn subtree_names(mount: &Path) -> Vec<String> {
    if mount.join("cgroup.controllers").exists() {
        V2::subtree_names(mount)
    } else {
        V1::subtree_names(mount)
    }
}
