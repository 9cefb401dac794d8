//! Tests of slot cgroups.
//!
//! This machine has only cgroup v1 controllers (the v2 mount at
//! `/sys/fs/cgroup/unified` has none), so the v2 writer is unit-tested
//! against a temporary directory laid out like a v2 hierarchy, asserting the
//! exact values written. What v2 needs no controller for is tested against
//! the kernel on that controller-less v2 mount: the BPF device filter,
//! joining through `cgroup.procs`, `cgroup.kill` and removal. v1 is tested
//! for real: cores, cgroup membership, the process limit, the OOM killer and
//! its counters, device rules, kill and removal, and the clean-up of a
//! crashed daemon's slots.
//!
//! The real tests need root and cgroupfs. What happens when a host lacks
//! them (skipped with a printed reason, or failed under `CI=true`) is
//! decided in one place, `crate::test_host`.

use std::{
    path::{Path, PathBuf},
    process::ExitStatus,
};

use nix::{
    sys::{
        stat::{makedev, mknod, Mode, SFlag},
        statvfs::{statvfs, FsFlags},
    },
    unistd::geteuid,
};
use tempfile::TempDir;
use tokio::io::AsyncReadExt;

use super::{devices::char_device_majors, v1::CONTROLLERS as V1_CONTROLLERS, v2::V2, *};
use crate::{
    spawn_worker,
    test_host::{cannot_run, Missing},
    WorkerCommand,
};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------
// Pure functions.

#[test]
fn cpu_lists_parse_and_format() {
    assert_eq!(parse_cpu_list("0-3,8,10-11\n").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
    assert_eq!(parse_cpu_list("").unwrap(), Vec::<u32>::new());
    assert_eq!(parse_cpu_list("\n").unwrap(), Vec::<u32>::new());
    assert_eq!(parse_cpu_list("5").unwrap(), vec![5]);
    assert!(parse_cpu_list("3-1").unwrap_err().contains("backwards"));
    assert!(parse_cpu_list("a").unwrap_err().contains("\"a\""));
    assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    assert_eq!(format_cpu_list(&[11, 10, 8, 3, 2, 1, 0, 8]), "0-3,8,10-11");
    assert_eq!(format_cpu_list(&[0, 1]), "0-1");
    assert_eq!(format_cpu_list(&[4]), "4");
    assert_eq!(format_cpu_list(&[]), "");
    let cpus = vec![0, 2, 3, 4, 7, 9, 10];
    assert_eq!(parse_cpu_list(&format_cpu_list(&cpus)).unwrap(), cpus);
}

#[test]
fn names_are_single_harmless_path_components() {
    for good in [
        "fleetmap",
        "fleetmap-test-12",
        "job3-slot7",
        "fleetmap-gpu-03.example.com",
    ] {
        validate_name(good).unwrap();
    }
    for bad in [
        "",
        "a/b",
        "..",
        ".hidden",
        "cgroup.procs",
        "memory.max",
        "tasks",
        "-x",
        "é",
    ] {
        assert!(
            matches!(validate_name(bad), Err(CgroupError::InvalidName { .. })),
            "{bad:?} accepted"
        );
    }
}

const PROC_DEVICES: &str = "Character devices:
  1 mem
  4 tty
136 pts
195 nvidia-frontend
508 nvidia-uvm
509 nvidia-uvm-tools

Block devices:
  7 loop
510 nvidia-uvm
";

#[test]
fn uvm_majors_come_from_the_character_section_of_proc_devices() {
    assert_eq!(
        char_device_majors(PROC_DEVICES, &["nvidia-uvm", "nvidia-uvm-tools"]),
        vec![508, 509]
    );
    assert_eq!(char_device_majors("", &["nvidia-uvm"]), Vec::<u32>::new());
}

fn expected_device_rules(gpus: &str, uvm: &str) -> String {
    format!(
        "c 1:3 rwm\nc 1:5 rwm\nc 1:7 rwm\nc 1:8 rwm\nc 1:9 rwm\nc 5:0 rwm\nc 5:2 rwm\nc 136:* rwm\n{gpus}c 195:255 rwm\nc 195:254 rwm\n{uvm}"
    )
}

#[test]
fn device_rules_allow_the_basics_the_gpus_and_the_uvm_majors() {
    let rules = device_rules(
        &GpuAccess {
            allowed_minors: vec![0, 3],
        },
        PROC_DEVICES,
    );
    let text: String = rules.iter().map(|r| format!("{r}\n")).collect();
    assert_eq!(
        text,
        expected_device_rules("c 195:0 rwm\nc 195:3 rwm\n", "c 508:* rwm\nc 509:* rwm\n")
    );
}

// ---------------------------------------------------------------------
// The writer against plain directories laid out like cgroupfs.

/// A new directory under the system's temporary directory (`TMPDIR`),
/// removed on drop.
fn temp_dir(what: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("fleetmap-{what}-"))
        .tempdir()
        .unwrap()
}

fn put(path: &Path, content: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

fn contents(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A v2 root: the controllers available, none enabled yet.
fn fake_v2(root_controllers: &str, root_enabled: &str) -> TempDir {
    let root = temp_dir("fake-v2");
    put(&root.path().join("cgroup.controllers"), root_controllers);
    put(&root.path().join("cgroup.subtree_control"), root_enabled);
    put(&root.path().join("cgroup.procs"), "");
    root
}

fn init_plain(mount: &Path, name: &str) -> Result<CgroupTree, CgroupError> {
    let proc_devices = mount.join("proc-devices");
    if !proc_devices.exists() {
        put(&proc_devices, PROC_DEVICES);
    }
    CgroupTree::init_with(mount, name, Backing::PlainDirectory, &proc_devices)
}

fn limits(cpus: Vec<u32>, memory_bytes: u64, pids_max: u64, gpus: Option<Vec<u32>>) -> SlotLimits {
    SlotLimits {
        cpus,
        mems: None,
        memory_bytes,
        pids_max,
        gpus: gpus.map(|allowed_minors| GpuAccess { allowed_minors }),
    }
}

#[test]
fn v2_init_enables_controllers_and_leaves_the_daemon_where_it_is() {
    let root = fake_v2("cpuset cpu io memory hugetlb pids rdma misc\n", "");
    let tree = init_plain(root.path(), "fleetmap").unwrap();
    assert_eq!(tree.version(), CgroupVersion::V2);
    // One write per controller missing at the root, in this order.
    assert_eq!(
        contents(&root.path().join("cgroup.subtree_control")),
        "+cpuset\n+memory\n+pids\n"
    );
    // The subtree holds no process, so it may enable controllers without
    // moving the daemon (an embedded cluster's caller) anywhere.
    let subtree = root.path().join("fleetmap");
    assert!(!subtree.join("daemon").exists());
    assert!(
        !subtree.join("cgroup.procs").exists(),
        "nothing was written to move a process"
    );
    assert_eq!(
        contents(&subtree.join("cgroup.subtree_control")),
        "+cpuset +memory +pids\n"
    );
    assert!(tree.slot_names().is_empty(), "the daemon's leaf is no slot");

    // What the kernel would show in the subtree.
    put(&subtree.join("cpuset.cpus.effective"), "0-3\n");
    put(&subtree.join("cpuset.mems.effective"), "0\n");
    assert_eq!(tree.cpus().unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(tree.mems().unwrap(), vec![0]);
}

#[test]
fn v2_init_leaves_enabled_root_controllers_alone_and_refuses_missing_ones() {
    let root = fake_v2("cpuset memory pids\n", "cpuset memory pids\n");
    init_plain(root.path(), "fleetmap").unwrap();
    assert_eq!(
        contents(&root.path().join("cgroup.subtree_control")),
        "cpuset memory pids\n"
    );

    let root = fake_v2("cpu io memory pids\n", "");
    let err = init_plain(root.path(), "fleetmap").unwrap_err();
    assert!(
        matches!(&err, CgroupError::Unavailable { reason } if reason.contains("cpuset controller is not available")),
        "{err}"
    );
}

#[test]
fn v2_slots_get_exact_limits_and_go_away() {
    let root = fake_v2("cpuset memory pids\n", "");
    let tree = init_plain(root.path(), "fleetmap").unwrap();
    let subtree = root.path().join("fleetmap");
    put(&subtree.join("cpuset.mems.effective"), "0-1\n");

    let slot = tree
        .create_slot("job1-slot0", &limits(vec![1, 0], 256 * MIB, 64, None))
        .unwrap();
    let dir = subtree.join("job1-slot0");
    assert_eq!(contents(&dir.join("cpuset.cpus")), "0-1\n");
    assert_eq!(contents(&dir.join("cpuset.mems")), "0-1\n");
    assert_eq!(contents(&dir.join("memory.max")), "268435456\n");
    assert_eq!(contents(&dir.join("memory.swap.max")), "0\n");
    assert_eq!(contents(&dir.join("memory.oom.group")), "1\n");
    assert_eq!(contents(&dir.join("pids.max")), "64\n");
    assert_eq!(slot.memory_limit(), 256 * MIB);
    assert_eq!(tree.slot_names(), vec!["job1-slot0".to_string()]);

    // v2 files, as the kernel writes them.
    assert_eq!(slot.oom_kills(), 0);
    put(
        &dir.join("memory.events"),
        "low 0\nhigh 0\nmax 17\noom 2\noom_kill 2\noom_group_kill 1\n",
    );
    assert_eq!(slot.oom_kills(), 2);
    assert_eq!(slot.peak_memory(), None, "no memory.peak before Linux 5.19");
    put(&dir.join("memory.peak"), "268304384\n");
    assert_eq!(slot.peak_memory(), Some(268304384));
    put(&dir.join("cgroup.procs"), "");
    assert_eq!(slot.procs_files().unwrap().len(), 1);

    // Explicit memory nodes, and "max" for no limit.
    let other = tree
        .create_slot(
            "job1-slot1",
            &SlotLimits {
                mems: Some("1".into()),
                ..limits(vec![2], u64::MAX, u64::MAX, None)
            },
        )
        .unwrap();
    let other_dir = subtree.join("job1-slot1");
    assert_eq!(contents(&other_dir.join("cpuset.cpus")), "2\n");
    assert_eq!(contents(&other_dir.join("cpuset.mems")), "1\n");
    assert_eq!(contents(&other_dir.join("memory.max")), "max\n");
    assert_eq!(contents(&other_dir.join("pids.max")), "max\n");

    slot.remove().unwrap();
    assert!(!dir.exists());
    drop(other);
    assert!(!other_dir.exists(), "dropping a slot removes it");
    assert!(tree.slot_names().is_empty());
    tree.remove().unwrap();
    assert!(!subtree.exists(), "a clean stop leaves nothing behind");
}

#[test]
fn stale_subtrees_of_processes_that_are_gone_are_removed() {
    let root = fake_v2("cpuset memory pids\n", "");
    let own = format!("fleetmap-local-{}", std::process::id());
    // Process ids above the kernel's pid_max (4194304 at most) never exist.
    let gone = "fleetmap-local-4999999";
    let other = "fleetmap-other-4999999";
    for name in [own.as_str(), gone, other] {
        put(&root.path().join(name).join("job1-slot0/cgroup.procs"), "");
    }
    let removed = CgroupTree::remove_stale_with(root.path(), "fleetmap-local-", Backing::PlainDirectory);
    assert_eq!(removed, vec![gone.to_string()]);
    assert!(!root.path().join(gone).exists());
    assert!(root.path().join(&own).exists(), "a live process's subtree stays");
    assert!(root.path().join(other).exists(), "other prefixes are not touched");
}

#[test]
fn init_removes_leftover_slots_but_not_the_daemon_leaf() {
    let root = fake_v2("cpuset memory pids\n", "");
    let subtree = root.path().join("fleetmap");
    put(&subtree.join("job7-slot3/cgroup.procs"), "");
    put(&subtree.join("job7-slot4/cgroup.procs"), "");
    put(&subtree.join("daemon/cgroup.procs"), "");
    let tree = init_plain(root.path(), "fleetmap").unwrap();
    assert!(tree.slot_names().is_empty());
    assert!(!subtree.join("job7-slot3").exists());
    assert!(subtree.join("daemon").exists());
}

#[test]
fn slot_creation_refuses_bad_input_and_existing_cgroups() {
    let root = fake_v2("cpuset memory pids\n", "");
    let tree = init_plain(root.path(), "fleetmap").unwrap();
    put(&root.path().join("fleetmap/cpuset.mems.effective"), "0\n");
    let ok = limits(vec![0], 64 * MIB, 16, None);
    assert!(matches!(
        tree.create_slot("daemon", &ok),
        Err(CgroupError::InvalidName { .. })
    ));
    assert!(matches!(
        tree.create_slot("../escape", &ok),
        Err(CgroupError::InvalidName { .. })
    ));
    assert!(matches!(
        tree.create_slot("s", &limits(vec![], 64 * MIB, 16, None)),
        Err(CgroupError::InvalidLimits { .. })
    ));
    let first = tree.create_slot("s", &ok).unwrap();
    let err = tree.create_slot("s", &ok).unwrap_err();
    assert!(err.to_string().contains("slot names must be unique"), "{err}");
    // The refused duplicate left the existing slot alone.
    assert_eq!(contents(&root.path().join("fleetmap/s/pids.max")), "16\n");
    drop(first);
}

#[test]
fn v1_writer_sets_every_controller_and_deny_all_device_rules() {
    let root = temp_dir("fake-v1");
    for c in V1_CONTROLLERS {
        put(&root.path().join(c.name()).join("cgroup.procs"), "");
    }
    put(&root.path().join("cpuset/cpuset.cpus"), "0-7\n");
    put(&root.path().join("cpuset/cpuset.mems"), "0-1\n");
    let tree = init_plain(root.path(), "fleetmap").unwrap();
    assert_eq!(tree.version(), CgroupVersion::V1);
    // A new v1 cpuset is empty: the parent's CPUs and nodes are copied.
    assert_eq!(contents(&root.path().join("cpuset/fleetmap/cpuset.cpus")), "0-7\n");
    assert_eq!(contents(&root.path().join("cpuset/fleetmap/cpuset.mems")), "0-1\n");
    for c in V1_CONTROLLERS {
        assert!(root.path().join(c.name()).join("fleetmap").is_dir(), "{}", c.name());
    }
    put(&root.path().join("cpuset/fleetmap/cpuset.effective_mems"), "0-1\n");

    let slot = tree
        .create_slot("job2-slot0", &limits(vec![4, 5], 64 * MIB, 32, Some(vec![1])))
        .unwrap();
    let dir = |c: &str| root.path().join(c).join("fleetmap/job2-slot0");
    assert_eq!(contents(&dir("cpuset").join("cpuset.cpus")), "4-5\n");
    assert_eq!(contents(&dir("cpuset").join("cpuset.mems")), "0-1\n");
    assert_eq!(contents(&dir("memory").join("memory.limit_in_bytes")), "67108864\n");
    // memsw is lifted first, then brought down to the memory limit (a
    // plain directory records every write).
    assert_eq!(
        contents(&dir("memory").join("memory.memsw.limit_in_bytes")),
        "-1\n67108864\n"
    );
    assert_eq!(contents(&dir("pids").join("pids.max")), "32\n");
    assert_eq!(contents(&dir("devices").join("devices.deny")), "a\n");
    assert_eq!(
        contents(&dir("devices").join("devices.allow")),
        expected_device_rules("c 195:1 rwm\n", "c 508:* rwm\nc 509:* rwm\n")
    );
    assert!(dir("freezer").is_dir());
    put(
        &dir("memory").join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    );
    assert_eq!(slot.oom_kills(), 3);
    put(&dir("memory").join("memory.max_usage_in_bytes"), "66998272\n");
    assert_eq!(slot.peak_memory(), Some(66998272));
    assert_eq!(tree.slot_names(), vec!["job2-slot0".to_string()]);
    slot.remove().unwrap();
    for c in V1_CONTROLLERS {
        assert!(!dir(c.name()).exists(), "{}", c.name());
    }
}

#[test]
fn a_mount_that_is_neither_version_is_unavailable() {
    let root = temp_dir("no-cgroups");
    put(&root.path().join("cpuset/cgroup.procs"), "");
    let err = init_plain(root.path(), "fleetmap").unwrap_err();
    assert!(
        matches!(&err, CgroupError::Unavailable { reason } if reason.contains("missing: memory, pids, devices, freezer")),
        "{err}"
    );
}

// ---------------------------------------------------------------------
// The kernel.

const MOUNT: &str = "/sys/fs/cgroup";

#[tokio::test]
async fn v1_a_slot_reassigned_to_a_new_job_takes_its_limits_up_and_down() {
    let Some(t) = RealTree::new("v1_a_slot_reassigned_to_a_new_job_takes_its_limits_up_and_down") else {
        return;
    };
    let mut slot = t
        .tree
        .create_slot("warm", &limits(vec![0], 64 * MIB, 16, None))
        .unwrap();
    let read = |c: &str, f: &str| fs::read_to_string(t.slot_dir(c, "warm").join(f)).unwrap();
    // Up: memsw must never drop below the memory limit on the way.
    let cpus = if t.tree.cpus().unwrap().len() > 1 {
        vec![1]
    } else {
        vec![0]
    };
    t.tree
        .reassign_slot(&mut slot, &limits(cpus.clone(), 256 * MIB, 32, None))
        .unwrap();
    assert_eq!(read("memory", "memory.limit_in_bytes").trim(), (256 * MIB).to_string());
    assert_eq!(read("cpuset", "cpuset.cpus").trim(), format_cpu_list(&cpus));
    assert_eq!(read("pids", "pids.max").trim(), "32");
    assert_eq!(slot.memory_limit(), 256 * MIB);
    // And down again.
    t.tree
        .reassign_slot(&mut slot, &limits(vec![0], 32 * MIB, 16, None))
        .unwrap();
    assert_eq!(read("memory", "memory.limit_in_bytes").trim(), (32 * MIB).to_string());
    if Path::new(MOUNT).join("memory/memory.memsw.limit_in_bytes").exists() {
        assert_eq!(
            read("memory", "memory.memsw.limit_in_bytes").trim(),
            (32 * MIB).to_string()
        );
    }
    assert!(slot.memory_current().is_some());
    // The same limits again (a caller's next job) write nothing: a value
    // changed behind the handle's back stays as it is...
    fs::write(t.slot_dir("pids", "warm").join("pids.max"), "20").unwrap();
    t.tree
        .reassign_slot(&mut slot, &limits(vec![0], 32 * MIB, 16, None))
        .unwrap();
    assert_eq!(read("pids", "pids.max").trim(), "20");
    // ...and other limits write them all.
    t.tree
        .reassign_slot(&mut slot, &limits(vec![0], 48 * MIB, 16, None))
        .unwrap();
    assert_eq!(read("pids", "pids.max").trim(), "16");
    assert_eq!(read("memory", "memory.limit_in_bytes").trim(), (48 * MIB).to_string());
}

#[tokio::test]
async fn v1_remove_and_remove_stale_leave_no_directory_in_any_controller() {
    let Some(t) = RealTree::new("v1_remove_and_remove_stale_leave_no_directory_in_any_controller") else {
        return;
    };
    let slot = t
        .tree
        .create_slot("slot", &limits(vec![0], 64 * MIB, 16, None))
        .unwrap();
    std::mem::forget(slot);
    t.tree.remove().unwrap();
    for controller in ["cpuset", "memory", "pids", "devices", "freezer"] {
        assert!(
            !Path::new(MOUNT).join(controller).join(&t.name).exists(),
            "{controller}"
        );
    }
    // A subtree named for a process that is gone, with a slot in it.
    let stale = format!("fleetmap-test-stale-{}", 4_999_999);
    let tree = CgroupTree::init(Path::new(MOUNT), &stale).unwrap();
    std::mem::forget(tree.create_slot("left", &limits(vec![0], 64 * MIB, 16, None)).unwrap());
    drop(tree);
    let removed = CgroupTree::remove_stale(Path::new(MOUNT), "fleetmap-test-stale-");
    assert_eq!(removed, vec![stale.clone()]);
    for controller in ["cpuset", "memory", "pids", "devices", "freezer"] {
        assert!(!Path::new(MOUNT).join(controller).join(&stale).exists(), "{controller}");
    }
}

/// A real v1 tree for one test, removed (slots and subtree) on drop.
struct RealTree {
    tree: CgroupTree,
    name: String,
}

impl RealTree {
    /// `None`, and the test is to return, where this host cannot make one.
    fn new(test: &str) -> Option<RealTree> {
        let missing = |what: String| {
            cannot_run(test, Missing::Hierarchy(CgroupVersion::V1, what));
            None
        };
        let mount = Path::new(MOUNT);
        if mount.join("cgroup.controllers").exists() {
            // Init would take it for v2 and move the test process itself
            // into the subtree.
            return missing(format!(
                "{MOUNT} is a cgroup v2 mount, with no cgroup v1 controller hierarchies"
            ));
        }
        for controller in V1_CONTROLLERS {
            let dir = mount.join(controller.name());
            if !dir.join("cgroup.procs").exists() {
                return missing(format!(
                    "cgroup v1 {} controller not mounted at {}",
                    controller.name(),
                    dir.display()
                ));
            }
        }
        if !geteuid().is_root() {
            cannot_run(
                test,
                Missing::Capability("not root: creating cgroups needs root".into()),
            );
            return None;
        }
        let name = format!("fleetmap-test-{}-{test}", std::process::id());
        match CgroupTree::init(mount, &name) {
            Ok(tree) => Some(RealTree { tree, name }),
            Err(CgroupError::Unavailable { reason }) => {
                cannot_run(test, Missing::Capability(reason));
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn slot_dir(&self, controller: &str, slot: &str) -> PathBuf {
        Path::new(MOUNT).join(controller).join(&self.name).join(slot)
    }
}

impl Drop for RealTree {
    fn drop(&mut self) {
        let _ = self.tree.remove();
    }
}

/// Runs a shell script as a worker in `slot` and returns how it ended and
/// what it printed. The worker's process group is killed when it is done.
async fn run_in(slot: &SlotCgroup, script: &str) -> (ExitStatus, String, String) {
    let cmd = WorkerCommand {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: vec![],
        cgroup_procs: slot.procs_files().unwrap(),
        cpu_affinity: vec![],
        run_as: None,
        private_tmp: false,
        image: None,
        own_namespaces: false,
    };
    let mut worker = spawn_worker(&cmd).unwrap();
    let (mut out, mut err) = (String::new(), String::new());
    let mut stdout = worker.stdout.take().unwrap();
    let mut stderr = worker.stderr.take().unwrap();
    let (o, e) = tokio::join!(stdout.read_to_string(&mut out), stderr.read_to_string(&mut err));
    o.unwrap();
    e.unwrap();
    let status = worker.child.wait().await.unwrap();
    (status, out, err)
}

/// A shell snippet that starts `sleep 100` in a session of its own and
/// returns once it is there: dropping the worker kills the worker's process
/// group, and a child that has not yet called setsid(2) would die with it.
fn detached_sleep(marker: &Path) -> String {
    let marker = marker.display();
    format!(
        "setsid sh -c ': > {marker}; exec sleep 100' >/dev/null 2>&1 & \
         while [ ! -e {marker} ]; do sleep 0.01; done; echo started"
    )
}

/// Fake `/dev/nvidia0` and `/dev/nvidia1` (195:0, 195:1) in a temporary
/// directory. Where no driver is behind them, an open the cgroup allows
/// fails with ENXIO; on a host with the NVIDIA driver loaded it succeeds.
/// An open the cgroup denies fails earlier, with EPERM.
fn fake_gpus(test: &str) -> Option<TempDir> {
    let dir = temp_dir("fake-dev");
    for minor in [0, 1] {
        let path = dir.path().join(format!("nvidia{minor}"));
        if let Err(e) = mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(195, minor),
        ) {
            let what = format!("mknod {}: {e}", path.display());
            cannot_run(test, Missing::Capability(what));
            return None;
        }
    }
    if statvfs(dir.path()).is_ok_and(|s| s.flags().contains(FsFlags::ST_NODEV)) {
        let what = format!("{} is on a nodev file system (set TMPDIR)", dir.path().display());
        cannot_run(test, Missing::Capability(what));
        return None;
    }
    Some(dir)
}

/// Opens (without reading) each fake GPU, then uses `/dev/null`.
fn device_probe(dev: &Path) -> String {
    let d = dev.display();
    format!(
        "for n in 0 1; do if true <{d}/nvidia$n; then echo nvidia$n-opened; fi; done; \
         echo probe >/dev/null && echo null-ok"
    )
}

/// The slot may open its own GPU, 0, and not the other, 1.
fn assert_device_rules_held(out: &str, err: &str, dev: &Path) {
    let d = dev.display();
    // The cgroup let the open through either way: it succeeded (the
    // driver is loaded on this host) or the kernel found no driver behind
    // 195:0 (ENXIO).
    assert!(
        out.contains("nvidia0-opened") || err.contains(&format!("{d}/nvidia0: No such device or address")),
        "the slot's own GPU is allowed (opened, or ENXIO where no driver is behind it): {out} {err}"
    );
    assert!(
        err.contains(&format!("{d}/nvidia1: Operation not permitted")) && !out.contains("nvidia1-opened"),
        "another GPU is denied: {out} {err}"
    );
    assert!(out.contains("null-ok"), "/dev/null stays usable: {out} {err}");
}

#[tokio::test]
async fn v1_slot_pins_cores_and_devices_and_is_removed_cleanly() {
    let Some(t) = RealTree::new("v1_slot_pins_cores_and_devices_and_is_removed_cleanly") else {
        return;
    };
    let Some(dev) = fake_gpus("v1_slot_pins_cores_and_devices_and_is_removed_cleanly") else {
        return;
    };
    let slot = t
        .tree
        .create_slot("pin", &limits(vec![1], 64 * MIB, 16, Some(vec![0])))
        .unwrap();
    assert!(t.tree.cpus().unwrap().contains(&1));
    let script = format!(
        "grep Cpus_allowed_list /proc/self/status; cat /proc/self/cgroup; {}; \
         {}",
        device_probe(dev.path()),
        detached_sleep(&dev.path().join("detached"))
    );
    let (status, out, err) = run_in(&slot, &script).await;
    assert!(status.success(), "{status:?} {out} {err}");
    assert!(out.contains("Cpus_allowed_list:\t1\n"), "pinned to CPU 1 only: {out}");
    for controller in ["cpuset", "memory", "pids", "devices", "freezer"] {
        assert!(
            out.contains(&format!(":{controller}:/{}/pin\n", t.name)),
            "in the slot's {controller} cgroup: {out}"
        );
    }
    assert_device_rules_held(&out, &err, dev.path());

    // The setsid'd sleep escaped the worker's process group, not its cgroup.
    assert_eq!(slot.pids().len(), 1, "{:?}", slot.pids());
    assert_eq!(slot.members(), slot.pids(), "one controller lists what all five do");
    slot.kill_all().unwrap();
    assert!(slot.pids().is_empty());
    assert!(slot.members().is_empty());
    slot.remove().unwrap();
    for controller in ["cpuset", "memory", "pids", "devices", "freezer"] {
        assert!(!t.slot_dir(controller, "pin").exists(), "{controller}");
    }
    assert!(t.tree.slot_names().is_empty());
}

/// The slot's processes once two reads 100 ms apart agree (for up to 2 s).
fn settled_pids(slot: &SlotCgroup) -> Vec<u32> {
    let mut last = slot.pids();
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = slot.pids();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::test]
async fn v1_pids_limit_stops_a_fork_bomb() {
    let Some(t) = RealTree::new("v1_pids_limit_stops_a_fork_bomb") else {
        return;
    };
    let slot = t
        .tree
        .create_slot("pids", &limits(vec![1], 64 * MIB, 16, None))
        .unwrap();
    let (status, out, err) = run_in(
        &slot,
        "i=0; while [ $i -lt 40 ]; do setsid sleep 5 >/dev/null 2>&1 & i=$((i+1)); done; echo all-started",
    )
    .await;
    // dash reports a failed fork as "Cannot fork" and gives up the script.
    assert!(!out.contains("all-started"), "{status:?} {out} {err}");
    assert!(
        err.contains("Cannot fork") || err.contains("Resource temporarily unavailable"),
        "{err}"
    );
    let events = contents(&t.slot_dir("pids", "pids").join("pids.events"));
    let refused: u64 = events
        .strip_prefix("max ")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "pids.events: {events}");
    // `setsid` forks once more when it leads its process group, so a
    // background one may still add a process after the shell gave up:
    // the slot's list is compared once it holds still.
    let left = settled_pids(&slot);
    assert!(!left.is_empty() && left.len() <= 16, "{left:?}");
    // What metrics read of it: its processes and memory, and reading
    // leaves the slot and its processes alone.
    for _ in 0..2 {
        let usage = t.tree.slot_usage();
        let read = usage.iter().find(|u| u.name == "pids").expect("the slot is listed");
        assert_eq!(read.pids, left);
        assert!(read.memory_bytes.is_some_and(|m| m > 0), "{read:?}");
    }
    assert_eq!(slot.pids(), left);
    slot.remove().unwrap();
    assert!(!t.slot_dir("pids", "pids").exists());
}

#[tokio::test]
async fn v1_memory_limit_oom_kills_and_is_counted() {
    let Some(t) = RealTree::new("v1_memory_limit_oom_kills_and_is_counted") else {
        return;
    };
    let limit = 64 * MIB;
    let slot = t.tree.create_slot("oom", &limits(vec![0], limit, 16, None)).unwrap();
    assert_eq!(slot.oom_kills(), 0);
    // GNU tail keeps a line it has not seen the end of; /dev/zero has no
    // newline, so tail grows until the limit stops it.
    let (_, out, err) = run_in(&slot, "head -c 300M /dev/zero | tail >/dev/null; echo \"tail $?\"").await;
    assert!(out.contains("tail 137"), "tail was SIGKILLed: {out} {err}");
    assert!(slot.oom_kills() >= 1, "oom_kills = {}", slot.oom_kills());
    let peak = slot.peak_memory().expect("v1 keeps memory.max_usage_in_bytes");
    assert!(
        peak >= limit * 9 / 10 && peak <= limit,
        "peak {peak} is near the limit {limit}"
    );
    assert_eq!(slot.memory_limit(), limit);
}

#[tokio::test]
async fn init_kills_and_removes_the_slots_of_a_crashed_daemon() {
    let Some(t) = RealTree::new("init_kills_and_removes_the_slots_of_a_crashed_daemon") else {
        return;
    };
    let slot = t
        .tree
        .create_slot("stale", &limits(vec![0], 64 * MIB, 16, None))
        .unwrap();
    let cmd = WorkerCommand {
        program: "/bin/sleep".into(),
        args: vec!["100".into()],
        env: vec![],
        cgroup_procs: slot.procs_files().unwrap(),
        cpu_affinity: vec![],
        run_as: None,
        private_tmp: false,
        image: None,
        own_namespaces: false,
    };
    let mut worker = spawn_worker(&cmd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !slot.pids().contains(&worker.pid) {
        assert!(Instant::now() < deadline, "the worker never showed up in its slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The daemon dies: nothing removes the slot.
    std::mem::forget(slot);

    let again = CgroupTree::init(Path::new(MOUNT), &t.name).unwrap();
    assert!(again.slot_names().is_empty());
    for controller in ["cpuset", "memory", "pids", "devices", "freezer"] {
        assert!(!t.slot_dir(controller, "stale").exists(), "{controller}");
    }
    let status = tokio::time::timeout(Duration::from_secs(2), worker.child.wait())
        .await
        .expect("the leftover process is gone")
        .unwrap();
    assert!(crate::describe_exit(status).contains("signal 9"), "{status:?}");
}

/// The v2 BPF device filter, `cgroup.kill` and removal, against the kernel:
/// on the controller-less v2 mount here (`/sys/fs/cgroup/unified`), or the
/// v2 root of a pure v2 host. Device programs, `cgroup.procs` and
/// `cgroup.kill` need no controller.
#[tokio::test]
async fn v2_device_filter_kill_and_removal_on_the_kernel() {
    let test = "v2_device_filter_kill_and_removal_on_the_kernel";
    let Some(root) = [Path::new(MOUNT), &Path::new(MOUNT).join("unified")]
        .into_iter()
        .find(|p| p.join("cgroup.controllers").exists())
        .map(Path::to_path_buf)
    else {
        let what = format!("no cgroup v2 mount at {MOUNT} or {MOUNT}/unified");
        return cannot_run(test, Missing::Hierarchy(CgroupVersion::V2, what));
    };
    let name = format!("fleetmap-test-{}-bpf", std::process::id());
    let dir = root.join(&name);
    if let Err(e) = fs::create_dir(&dir) {
        return cannot_run(test, Missing::Capability(format!("mkdir {}: {e}", dir.display())));
    }
    // The mount as it is: no controllers to enable, and the test process
    // stays where it is.
    let hierarchy: Arc<dyn Hierarchy> = Arc::new(V2::existing(root.clone(), Backing::Kernel));
    let slot = SlotCgroup {
        dirs: hierarchy.slot_dirs(&name),
        hierarchy,
        name,
        memory_limit: 0,
        applied: None,
        removed: AtomicBool::new(false),
    };
    let Some(dev) = fake_gpus(test) else { return };
    let rules = device_rules(
        &GpuAccess {
            allowed_minors: vec![0],
        },
        &fs::read_to_string("/proc/devices").unwrap(),
    );
    match device_filter::attach(&dir, &rules) {
        Ok(()) => {}
        Err(CgroupError::DeviceFilter { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
            let what = format!("bpf(2) is not permitted: {source}");
            return cannot_run(test, Missing::Capability(what));
        }
        Err(e) => panic!("{e}"),
    }
    let script = format!(
        "cat /proc/self/cgroup; {}; {}",
        device_probe(dev.path()),
        detached_sleep(&dev.path().join("detached"))
    );
    let (status, out, err) = run_in(&slot, &script).await;
    assert!(status.success(), "{status:?} {out} {err}");
    let relative = dir.strip_prefix(&root).unwrap().display().to_string();
    assert!(out.contains(&format!("0::/{relative}\n")), "{out}");
    assert_device_rules_held(&out, &err, dev.path());

    assert_eq!(slot.pids().len(), 1, "the setsid'd sleep: {:?}", slot.pids());
    assert!(dir.join("cgroup.kill").exists(), "Linux 5.14+");
    slot.remove().unwrap();
    assert!(slot.pids().is_empty());
    assert!(!dir.exists());
}
