//! The processes of a cgroup, the same on v1 and v2: joining it through
//! `cgroup.procs`, listing it, and signalling what is listed.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use super::{
    cgroupfs::{child_dirs, hint},
    CgroupError,
};

/// The `cgroup.procs` file of each of `dirs`, opened for writing.
pub(super) fn open_procs_files(dirs: &[PathBuf]) -> Result<Vec<fs::File>, CgroupError> {
    dirs.iter()
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

/// The processes in `dirs` and in any cgroup below them.
pub(super) fn pids_in(dirs: &[PathBuf]) -> Vec<u32> {
    let mut pids = BTreeSet::new();
    for dir in dirs {
        let mut stack = vec![dir.clone()];
        while let Some(dir) = stack.pop() {
            pids.extend(listed(&dir));
            stack.extend(child_dirs(&dir));
        }
    }
    pids.into_iter().collect()
}

fn listed(dir: &Path) -> Vec<u32> {
    let Ok(content) = fs::read_to_string(dir.join("cgroup.procs")) else {
        return Vec::new();
    };
    content.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Sends SIGKILL to every process listed in `dirs`, until a read lists no
/// process not yet killed (bounded, in case a fork bomb outruns us; the
/// caller waits and retries).
pub(super) fn sigkill_listed(dirs: &[PathBuf]) {
    let mut killed = BTreeSet::new();
    for _ in 0..100 {
        let fresh: Vec<u32> = pids_in(dirs).into_iter().filter(|p| !killed.contains(p)).collect();
        if fresh.is_empty() {
            return;
        }
        for pid in fresh {
            // The kernel lists a process outside the reader's PID namespace
            // as 0, and kill(0) would signal the daemon's own process group:
            // only positive pids are signalled. A pid listed in the slot's
            // cgroup.procs is the slot's (on v1 the slot is frozen, so it
            // cannot have exited and been reused since the read). A process
            // that exited meanwhile gives ESRCH, which is what we want.
            if let Ok(raw) = i32::try_from(pid) {
                if raw > 0 {
                    let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
                }
            }
            killed.insert(pid);
        }
    }
}
