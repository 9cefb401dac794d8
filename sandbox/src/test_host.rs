//! What the real-kernel tests need from their host, and the one way a test
//! that cannot run here says so.
//!
//! Outside CI a test that cannot run prints `SKIPPED <test>: <why>` to
//! stderr and passes, so that `cargo test` works on any developer machine.
//! Under `CI=true` a test that cannot run must not pass quietly; which ones
//! fail there follows one rule:
//!
//! * A test that needs hierarchy X runs on hosts that have X; a host without
//!   X runs the other version's tests. What must never happen is a host
//!   *with* the needed hierarchy passing a test that did not run: so under
//!   `CI=true` a missing capability (root, a controller of that hierarchy,
//!   a file system that allows device nodes, permission for `bpf(2)`)
//!   always fails the test.
//! * A missing v1 hierarchy fails under `CI=true` too. CI runs on cgroup v1
//!   hosts (the project's machines are v1), and the v1 tests are the only
//!   ones that check cores, memory and process limits, the OOM killer and
//!   the clean-up of a crashed daemon against the kernel: a CI host that has
//!   lost v1 must say so, not go green without them. (Moving CI to a v2 host
//!   needs v2 kernel counterparts of those tests first.)
//! * A missing v2 hierarchy only skips, even under `CI=true`: a v1 host may
//!   have no v2 mount at all, and there the v2 kernel tests cannot run (the
//!   v2 writer is still checked against plain directories). Where a v2
//!   mount exists, a pure v2 host or the controller-less `unified` mount of a
//!   v1 host like CI's, they run, and whatever else they lack fails CI.

use std::fmt;

use crate::cgroup::CgroupVersion;

/// What a real-kernel test found missing on this host.
#[derive(Debug)]
pub(crate) enum Missing {
    /// The host has no usable hierarchy of this version; the text says
    /// what was looked for where.
    Hierarchy(CgroupVersion, String),
    /// The host has the hierarchy the test is for but lacks something else
    /// the test needs.
    Capability(String),
}

impl Missing {
    /// Whether this makes a test fail under `CI=true` (see the module docs).
    fn fails_ci(&self) -> bool {
        match self {
            Missing::Capability(_) | Missing::Hierarchy(CgroupVersion::V1, _) => true,
            Missing::Hierarchy(CgroupVersion::V2, _) => false,
        }
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Hierarchy(version, what) => {
                let version = match version {
                    CgroupVersion::V1 => "v1",
                    CgroupVersion::V2 => "v2",
                };
                write!(f, "{what}; this test needs a cgroup {version} host")
            }
            Missing::Capability(what) => f.write_str(what),
        }
    }
}

/// Says that `test` cannot run here because of `missing`: fails the test
/// under `CI=true` where the rule above says so, and otherwise prints that
/// it was skipped. The caller returns right after.
pub(crate) fn cannot_run(test: &str, missing: Missing) {
    if std::env::var("CI").as_deref() == Ok("true") && missing.fails_ci() {
        panic!("{test} cannot run here, and CI=true requires it to: {missing}");
    }
    eprintln!("SKIPPED {test}: {missing}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_v2_hierarchy_may_skip_in_ci() {
        assert!(Missing::Capability("not root".into()).fails_ci());
        assert!(Missing::Hierarchy(CgroupVersion::V1, "no v1".into()).fails_ci());
        assert!(!Missing::Hierarchy(CgroupVersion::V2, "no v2".into()).fails_ci());
        assert_eq!(
            Missing::Hierarchy(
                CgroupVersion::V1,
                "cgroup v1 memory controller not mounted at /sys/fs/cgroup/memory".into()
            )
            .to_string(),
            "cgroup v1 memory controller not mounted at /sys/fs/cgroup/memory; this test needs a cgroup v1 host"
        );
    }
}
