//! Reading and writing cgroupfs: one value per `write`, and errors that name
//! the file and say what to do about the kernel's terse errno.
//!
//! The same calls work on a plain directory laid out like cgroupfs
//! ([`Backing::PlainDirectory`]), which is how the unit tests check the
//! exact values each hierarchy writes.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use super::CgroupError;

/// Whether the paths are a real cgroupfs or, in unit tests, a plain
/// directory laid out like one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backing {
    Kernel,
    /// A plain directory: writes append `value\n` (creating the file, which
    /// the kernel would have created at `mkdir`), so a test can read back
    /// every value written in order; removal is `remove_dir_all`.
    #[cfg_attr(not(test), allow(dead_code))]
    PlainDirectory,
}

impl Backing {
    /// Writes one value to one cgroupfs file, in one `write` call (cgroupfs
    /// takes each write as one command).
    pub(super) fn write(self, path: &Path, value: &str) -> Result<(), CgroupError> {
        let result = match self {
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

    /// Writes only when the kernel has the file (swap accounting compiled in
    /// and enabled, say); a plain test directory gets every file.
    pub(super) fn write_if_present(self, path: &Path, value: &str) -> Result<(), CgroupError> {
        if self == Backing::Kernel && !path.exists() {
            return Ok(());
        }
        self.write(path, value)
    }

    /// Removes an empty cgroup and its empty descendants, deepest first. The
    /// kernel may report EBUSY for a moment after the last process exited
    /// (its exit is still being accounted), so EBUSY is retried briefly.
    pub(super) fn remove_cgroup_dir(self, dir: &Path) -> Result<(), CgroupError> {
        if self == Backing::PlainDirectory {
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
            self.remove_cgroup_dir(&child)?;
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
}

pub(super) fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })
}

/// The value of `key` in a flat keyed file (`key value` lines, as
/// `memory.events` and `memory.oom_control`); `None` if the file or the key
/// is missing.
pub(super) fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
}

/// A file holding one number; `None` if it is missing or holds no number.
pub(super) fn read_number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

pub(super) fn create_dir_if_missing(dir: &Path) -> Result<(), CgroupError> {
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
pub(super) fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect()
}

/// What to do about an error from cgroupfs, by errno.
pub(super) fn hint(error: &io::Error) -> &'static str {
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
pub(super) fn unavailable_if_denied(error: CgroupError) -> CgroupError {
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
