"""Every call pinned in its own cgroup: dedicated cores, a memory limit, a
process limit, exactly its GPUs, and clean teardown. Through the real
daemon (`fleetmap node` processes and the embedded cluster) and real Python
workers, as root on cgroup v1 here (CI=true: a missing capability fails).

Two fake NVIDIA devices made with mknod (char 195:0 and 195:1) show that a
slot can open its own GPU and gets EPERM on the other. The open of its own
fails with ENXIO where no driver is behind the node (a machine without a
GPU, like this one) and succeeds where the NVIDIA driver is loaded: either
way the cgroup let it through.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

import fleetmap
from fleetmap import remote_parallel_map

from conftest import fleetmap_command, need_privileges, run_client, wait_for

CGROUP_ROOT = Path("/sys/fs/cgroup")


def require_cgroups() -> None:
    if os.geteuid() != 0:
        need_privileges("slot cgroups need root")
    if not (CGROUP_ROOT / "cgroup.controllers").exists() and not (CGROUP_ROOT / "memory").is_dir():
        need_privileges("no cgroup hierarchy is mounted at /sys/fs/cgroup")


def subtree_dirs(subtree: str) -> List[Path]:
    """The directories of a daemon's cgroup subtree, in every hierarchy."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT / subtree]
    return [d / subtree for d in CGROUP_ROOT.iterdir() if (d / subtree).is_dir()]


def slot_cgroups(subtree: str) -> List[str]:
    """Slot cgroups left in a daemon's subtree (anything but its own leaf)."""
    return sorted(
        f"{d.parent.name}/{child.name}"
        for d in subtree_dirs(subtree)
        for child in d.iterdir()
        if child.is_dir() and child.name != "daemon"
    )


def worker_processes(node_matches, children_only: bool = False) -> List[int]:
    """PIDs of worker processes whose FLEETMAP_NODE satisfies `node_matches`
    (only this process's children with `children_only`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if children_only and ppid != os.getpid():
            continue
        nodes = [v[len(b"FLEETMAP_NODE=") :].decode() for v in environ if v.startswith(b"FLEETMAP_NODE=")]
        if any(node_matches(n) for n in nodes):
            pids.append(int(entry.name))
    return pids


def processes_of_node(name: str) -> List[int]:
    """PIDs of worker processes started for node `name`."""
    return worker_processes(lambda node: node == name)


def embedded_subtree() -> str:
    return f"fleetmap-local-{os.getpid()}"


# --- through the embedded cluster (this process's own daemon) -------------


def affinity_window(x):
    import os
    import time

    start = time.time()
    time.sleep(0.2)
    cgroup = open("/proc/self/cgroup").read()
    return sorted(os.sched_getaffinity(0)), start, time.time(), cgroup


def test_each_call_runs_on_exactly_its_own_cores_in_its_own_cgroup():
    require_cgroups()
    out = remote_parallel_map(affinity_window, list(range(6)), verbose=False)
    cores = os.cpu_count()
    for cpus, _, _, cgroup in out:
        assert len(cpus) == 1, f"a func_cpu=1 call may use exactly one core, got {cpus}"
        assert embedded_subtree() in cgroup, f"the call runs outside the daemon's subtree:\n{cgroup}"
    # Calls that ran at the same time never shared a core.
    for i, (ci, si, ei, _) in enumerate(out):
        for cj, sj, ej, _ in out[i + 1 :]:
            if si < ej and sj < ei:
                assert ci != cj, f"two overlapping calls shared core {ci}"
    if cores and cores >= 2:
        assert len({tuple(o[0]) for o in out}) >= 2, "with two cores both were used"


def allocate(x):
    if x == 3:
        block = b"x" * (2 << 30)  # 2 GiB, written, so it is really resident
        return len(block)
    return x * 10


def test_a_call_over_its_memory_limit_fails_with_a_memory_error_naming_it():
    require_cgroups()
    with pytest.raises(MemoryError) as info:
        remote_parallel_map(allocate, list(range(8)), func_ram=1, verbose=False)
    exc = info.value
    assert isinstance(exc, fleetmap.OutOfMemory)
    assert exc.input_index == 3
    message = str(exc)
    assert "input 3" in message and "func_ram=1 GiB" in message and "peak" in message, message
    assert exc.node in message


def test_other_outputs_are_correct_when_the_job_collects_every_outcome():
    require_cgroups()
    out = remote_parallel_map(allocate, list(range(8)), func_ram=1, verbose=False, return_exceptions=True)
    assert isinstance(out[3], fleetmap.OutOfMemory), out[3]
    assert [o for i, o in enumerate(out) if i != 3] == [x * 10 for x in range(8) if x != 3]


def exit_hard(x):
    import os

    if x == 5:
        os._exit(7)
    return x


def test_a_call_that_kills_its_worker_is_reported_and_the_slot_rebuilt():
    out = remote_parallel_map(exit_hard, list(range(12)), verbose=False, return_exceptions=True)
    assert isinstance(out[5], fleetmap.WorkerCrashed), out[5]
    assert "input 5" in str(out[5]) and "status 7" in str(out[5]), str(out[5])
    assert [o for i, o in enumerate(out) if i != 5] == [x for x in range(12) if x != 5]
    # The rebuilt slots serve the next job.
    assert remote_parallel_map(exit_hard, [1, 2], verbose=False) == [1, 2]


def _pid_and_abs(x):
    import os

    return os.getpid(), abs(x)


def test_200_jobs_leave_no_cgroup_and_no_worker_beyond_the_warm_pool():
    require_cgroups()
    pids = set()
    for i in range(200):
        out = remote_parallel_map(_pid_and_abs, [-i, i], verbose=False)
        assert [o[1] for o in out] == [i, i]
        pids.update(pid for pid, _ in out)
    slots = len(os.sched_getaffinity(0))
    # One caller, one environment: the same warm workers serve every job
    # (retired only after 10,000 jobs or an hour by default). A slot may
    # still start a fresh worker where an earlier test's call left its
    # worker unfit for reuse, so allow three per slot. Without reuse it
    # would be 200 per slot.
    assert len(pids) <= 3 * slots, f"200 jobs ran in {len(pids)} workers on {slots} slots"
    # The node ends the last job's slots just after the caller has its
    # results: wait for that. Each warm worker keeps one cgroup; nothing
    # else is left.
    def cgroups_and_workers():
        names = {c.split("/", 1)[1] for c in slot_cgroups(embedded_subtree())}
        return names, processes_of_node_prefix("-local")

    wait_for(
        lambda: len(cgroups_and_workers()[0]) == len(cgroups_and_workers()[1]),
        5,
        "one cgroup per warm worker",
        lambda: str(cgroups_and_workers()),
    )
    names, workers = cgroups_and_workers()
    # The warm workers of the last job, and as many started ahead of the
    # next one (one per slot), each in its own cgroup.
    assert len(workers) <= 2 * slots, (workers, pids)
    assert len(set(workers) & pids) <= slots, (workers, pids)


def processes_of_node_prefix(suffix: str) -> List[int]:
    """PIDs of this process's workers whose node name ends with `suffix`
    (the embedded cluster's)."""
    return worker_processes(lambda node: node.endswith(suffix), children_only=True)


# --- through separate `fleetmap node` processes ---------------------------


@pytest.fixture
def gpu_devices(tmp_path):
    """Two fake NVIDIA devices, /dev-style char nodes 195:0 and 195:1."""
    require_cgroups()
    devices = tmp_path / "dev"
    devices.mkdir()
    for minor in (0, 1):
        os.mknod(devices / f"nvidia{minor}", 0o666 | stat.S_IFCHR, os.makedev(195, minor))
    return devices


GPU_JOB = """
import errno, os
from fleetmap import remote_parallel_map

def probe(devices):
    import errno, os, time
    result = {{"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "nvidia": os.environ.get("NVIDIA_VISIBLE_DEVICES")}}
    for minor in (0, 1):
        try:
            os.close(os.open(f"{{devices}}/nvidia{{minor}}", os.O_RDWR))
            result[minor] = "opened"
        except OSError as e:
            result[minor] = errno.errorcode.get(e.errno, str(e.errno))
    time.sleep(0.3)
    return result

RESULT = remote_parallel_map(probe, [{devices!r}] * 2, func_gpu=1, verbose=False)
"""


def test_a_gpu_call_opens_only_its_own_gpu(processes, gpu_devices):
    coordinator = processes.start_coordinator()
    node = processes.start_node(coordinator, "gpu-node", cores=2, extra=["--gpus", "0,1", "--shared-tmp"])
    r = run_client(GPU_JOB.format(devices=str(gpu_devices)), env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"] + node.describe()
    seen = set()
    for result in r["result"]:
        own = int(result["visible"])
        other = 1 - own
        assert result["nvidia"] == result["visible"]
        # The cgroup let the open of its own GPU through: to a node with no
        # driver behind it (ENXIO) or, on a host with the NVIDIA driver
        # loaded, to the driver (opened). Only EPERM would be the cgroup.
        assert result[str(own)] in ("ENXIO", "opened"), result
        assert result[str(other)] == "EPERM", result
        seen.add(own)
    assert seen == {0, 1}, "the two calls ran at once on different GPUs"


FORK_BOMB = """
from fleetmap import remote_parallel_map

def bomb(x):
    import os, time
    children = 0
    while True:
        try:
            pid = os.fork()
        except OSError as e:
            raise RuntimeError(f"fork failed after {children} children: {e}")
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children += 1

try:
    remote_parallel_map(bomb, [1], verbose=False)
    RESULT = "no error"
except RuntimeError as e:
    RESULT = str(e)
"""


def test_a_fork_bomb_stops_at_the_process_limit(processes):
    require_cgroups()
    coordinator = processes.start_coordinator()
    node = processes.start_node(coordinator, "pids-node", cores=1, extra=["--pids-per-slot", "40"])
    r = run_client(FORK_BOMB, env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"] + node.describe()
    message = r["result"]
    assert message.startswith("fork failed after"), message
    children = int(message.split()[3])
    assert children < 40, message
    # The failed job's worker and its children are killed; what is left is
    # the one worker the 1-core node keeps started ahead of the next job.
    wait_for(lambda: len(processes_of_node("pids-node")) <= 1, 5, "the bomb's processes to be killed", lambda: str(processes_of_node("pids-node")))
    wait_for(
        lambda: len({c.split("/", 1)[1] for c in slot_cgroups("fleetmap-pids-node")}) <= 1,
        5,
        "the slot cgroup to go",
        lambda: str(slot_cgroups("fleetmap-pids-node")),
    )


SLEEPER = """
from fleetmap import remote_parallel_map
import time
remote_parallel_map(lambda x: time.sleep(60), [1, 2], verbose=False)
"""


def test_a_killed_daemon_leaves_nothing_after_its_restart(processes):
    require_cgroups()
    coordinator = processes.start_coordinator()
    node = processes.start_node(coordinator, "crashy-node", cores=2)
    client = processes.start("client", [os.sys.executable, "-c", SLEEPER], env=coordinator.client_env())
    wait_for(lambda: len(processes_of_node("crashy-node")) >= 2, 20, "the job's workers to start", lambda: client.describe() + node.describe())
    left = set(slot_cgroups("fleetmap-crashy-node"))
    assert left, "the running slots have cgroups"
    os.kill(node.popen.pid, signal.SIGKILL)
    node.popen.wait(timeout=10)
    # Workers die with their daemon (parent-death signal).
    wait_for(lambda: not processes_of_node("crashy-node"), 5, "workers to die with the daemon", lambda: str(processes_of_node("crashy-node")))
    restarted = processes.start_node(coordinator, "crashy-node", cores=2, wait=False)
    # The restarted daemon removes every cgroup the killed one left (it then
    # makes new ones for the workers it starts ahead of jobs).
    wait_for(lambda: not left & set(slot_cgroups("fleetmap-crashy-node")), 20, "leftover cgroups to be removed", lambda: restarted.describe() + str(slot_cgroups("fleetmap-crashy-node")))
    assert restarted.alive(), restarted.describe()


def test_calls_on_a_fleet_node_see_none_of_the_daemons_secrets(processes):
    coordinator = processes.start_coordinator()
    token = coordinator.token_path.read_text().strip()
    env = dict(os.environ, FLEETMAP_JOIN_TOKEN=token, LAB_SECRET="s3cret", LAB_VISIBLE="yes")
    node = processes.start_node(coordinator, "tidy-node", cores=1, extra=["--pass-env", "LAB_VISIBLE"], env=env)
    r = run_client(
        """
        import os
        from fleetmap import remote_parallel_map
        RESULT = remote_parallel_map(lambda x: dict(os.environ), [0], verbose=False)[0]
        """,
        env=coordinator.client_env(),
    )
    assert r["returncode"] == 0, r["stderr"] + node.describe()
    seen = r["result"]
    assert "FLEETMAP_JOIN_TOKEN" not in seen and token not in seen.values(), sorted(seen)
    assert "LAB_SECRET" not in seen, sorted(seen)
    assert seen.get("LAB_VISIBLE") == "yes", sorted(seen)
    assert seen.get("FLEETMAP_NODE") == "tidy-node" and "PATH" in seen, sorted(seen)


def test_a_daemon_stopped_or_refused_between_connections_leaves_no_cgroup(processes, tmp_path):
    require_cgroups()
    coordinator = processes.start_coordinator()
    node = processes.start_node(coordinator, "orphan-node", cores=1)
    assert any(d.is_dir() for d in subtree_dirs("fleetmap-orphan-node"))
    # The coordinator goes first: the daemon waits to reconnect, and is
    # stopped while it waits.
    os.killpg(coordinator.proc.popen.pid, signal.SIGTERM)
    coordinator.proc.popen.wait(timeout=10)
    wait_for(lambda: "connection" in node.stderr() and "ended" in node.stderr() or "closed the connection" in node.stderr(), 20, "the daemon to lose its coordinator", node.describe)
    os.killpg(node.popen.pid, signal.SIGTERM)
    node.popen.wait(timeout=20)
    assert not any(d.exists() for d in subtree_dirs("fleetmap-orphan-node")), node.describe()
    # A daemon whose token is refused leaves nothing either.
    coordinator = processes.start_coordinator(name="second-coordinator")
    bad = tmp_path / "bad-token"
    bad.write_text("fmjoin_not-the-token\n")
    bad.chmod(0o600)
    refused = processes.start_node(coordinator, "refused-node", cores=1, token_file=bad, wait=False)
    refused.popen.wait(timeout=30)
    assert refused.popen.returncode == 1, refused.describe()
    assert not any(d.exists() for d in subtree_dirs("fleetmap-refused-node")), refused.describe()


def test_a_call_on_a_node_without_gpus_opens_no_block_device(processes, tmp_path):
    require_cgroups()
    # A block device node (7:0, the first loop device) where the call can
    # reach it: the cgroup denies the open (EPERM) before any driver could
    # answer it.
    device = tmp_path / "blockdev"
    os.mknod(device, 0o666 | stat.S_IFBLK, os.makedev(7, 0))
    coordinator = processes.start_coordinator()
    node = processes.start_node(coordinator, "plain-node", cores=1, extra=["--shared-tmp"])
    r = run_client(
        f"""
        import errno
        from fleetmap import remote_parallel_map
        def probe(path):
            try:
                open(path, "rb").close()
                return "opened"
            except OSError as e:
                return errno.errorcode[e.errno]
        RESULT = remote_parallel_map(probe, [{str(device)!r}, "/dev/null", "/dev/urandom"], verbose=False)
        """,
        env=coordinator.client_env(),
    )
    assert r["returncode"] == 0, r["stderr"] + node.describe()
    assert r["result"] == ["EPERM", "opened", "opened"], r["result"]


def test_a_daemon_that_cannot_use_cgroups_refuses_to_start_unless_allowed(processes, tmp_path):
    coordinator = processes.start_coordinator()
    nowhere = ["--cgroup-mount", str(tmp_path / "no-cgroups-here")]
    # By default a daemon that cannot pin calls does not join.
    refused = processes.start_node(coordinator, "refused-node", cores=1, extra=nowhere, wait=False)
    refused.popen.wait(timeout=30)
    assert refused.popen.returncode != 0 and "cannot pin calls" in refused.stderr(), refused.describe()
    assert "--allow-unisolated" in refused.stderr(), refused.describe()
    assert not coordinator.joined("refused-node")
    # With the named flag it runs calls pinned to cores only, and says so.
    node = processes.start_node(coordinator, "unpinned-node", cores=1, extra=nowhere + ["--allow-unisolated"])
    assert "NOT be pinned" in node.stderr(), node.describe()
    r = run_client("from fleetmap import remote_parallel_map\nimport os\nRESULT = remote_parallel_map(lambda x: sorted(os.sched_getaffinity(0)), [1], verbose=False)", env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"]
    assert len(r["result"][0]) == 1, "cores are still pinned by CPU affinity"
    # A caller that requires isolation never lands there.
    strict = dict(coordinator.client_env(), FLEETMAP_REQUIRE_ISOLATION="1")
    r = run_client(
        """
        import fleetmap
        try:
            fleetmap.remote_parallel_map(abs, [1], verbose=False)
            RESULT = None
        except fleetmap.JobRejected as e:
            RESULT = str(e)
        """,
        env=strict,
    )
    assert r["returncode"] == 0, r["stderr"]
    assert "requires isolation" in r["result"] and "unpinned-node" in r["result"], r["result"]
    status = subprocess.run(
        fleetmap_command() + ["status"], env=coordinator.client_env(), capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    line = next(l for l in status.stdout.splitlines() if l.startswith("unpinned-node"))
    assert "NOT pinned" in line, status.stdout


def test_status_shows_a_pinned_node(processes):
    require_cgroups()
    coordinator = processes.start_coordinator()
    processes.start_node(coordinator, "pinned-node", cores=1)
    status = subprocess.run(
        fleetmap_command() + ["status"], env=coordinator.client_env(), capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    line = next(l for l in status.stdout.splitlines() if l.startswith("pinned-node"))
    assert "pinned: cgroup" in line and "1/1" in line, status.stdout
    # Its workers get an empty /tmp of their own and cannot gain privileges.
    probe = (
        "from fleetmap import remote_parallel_map\n"
        "def f(x):\n"
        "    import os\n"
        "    open('/tmp/written-by-a-call', 'w').close()\n"
        "    status = open('/proc/self/status').read()\n"
        "    return sorted(os.listdir('/tmp')), 'NoNewPrivs:\\t1' in status\n"
        "RESULT = remote_parallel_map(f, [1], verbose=False)\n"
    )
    r = run_client(probe, env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"]
    listing, no_new_privs = r["result"][0]
    assert no_new_privs
    if os.path.abspath(sys.executable).startswith("/tmp/"):
        # The interpreter itself lives under /tmp (a checkout there): the
        # daemon shares /tmp rather than hide the interpreter.
        assert Path("/tmp/written-by-a-call").exists()
        Path("/tmp/written-by-a-call").unlink()
    else:
        assert listing == ["written-by-a-call"], listing
        assert not Path("/tmp/written-by-a-call").exists()


def _local_subtrees() -> List[str]:
    """Every ``fleetmap-local-*`` cgroup subtree, in any controller."""
    found = set()
    roots = [CGROUP_ROOT] + [p for p in CGROUP_ROOT.iterdir() if p.is_dir()]
    for root in roots:
        try:
            for entry in root.iterdir():
                if entry.is_dir() and entry.name.startswith("fleetmap-local-"):
                    found.add(f"{root.name}/{entry.name}")
        except OSError:
            continue
    return sorted(found)


def test_embedded_clusters_leave_no_cgroup_subtree_behind():
    require_cgroups()
    before = set(_local_subtrees())
    code = """
        from fleetmap import remote_parallel_map
        RESULT = remote_parallel_map(abs, [-1, -2], verbose=False)
    """
    for i in range(100):
        out = run_client(code)
        assert out["returncode"] == 0 and out["result"] == [1, 2], (i, out["stderr"])
    left = set(_local_subtrees()) - before
    assert not left, f"left behind after 100 embedded clusters: {sorted(left)}"


def test_a_killed_embedded_cluster_is_cleaned_up_by_the_next_one():
    require_cgroups()
    killed = subprocess.Popen(
        [sys.executable, "-c", "from fleetmap import remote_parallel_map\n"
         "import time\nremote_parallel_map(abs, [-1], verbose=False)\nprint('ready', flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert killed.stdout is not None and killed.stdout.readline().strip() == "ready"
        mine = f"fleetmap-local-{killed.pid}"
        assert any(s.endswith("/" + mine) for s in _local_subtrees()), _local_subtrees()
    finally:
        killed.kill()
        killed.wait()
    assert any(s.endswith("/" + mine) for s in _local_subtrees()), "SIGKILL left it, as expected"
    out = run_client("from fleetmap import remote_parallel_map\nRESULT = remote_parallel_map(abs, [-3], verbose=False)")
    assert out["returncode"] == 0 and out["result"] == [3], out["stderr"]
    assert not any(s.endswith("/" + mine) for s in _local_subtrees()), _local_subtrees()


def _nested_outer(x):
    from fleetmap import remote_parallel_map as inner_map

    def where(_):
        with open("/proc/self/cgroup") as f:
            return f.read()

    here = where(None)
    inner = inner_map(where, [0, 1], verbose=False)
    return here, inner


def _stray_workers() -> List[str]:
    """Worker processes that are frozen (state D) or orphaned (parent 1)."""
    stray = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, ppid = fields[0], int(fields[1])
        if "fleetmap._worker" in cmdline and state != "Z" and (state == "D" or ppid == 1):
            stray.append(f"{entry.name} state {state} parent {ppid}: {cmdline}")
    return stray


def test_nested_calls_run_inside_the_outer_slot_and_leave_nothing_behind():
    require_cgroups()
    before_subtrees = set(_local_subtrees())
    before_stray = set(_stray_workers())
    code = """
        import sys
        sys.path.insert(0, %r)
        from test_isolation import _nested_outer
        from fleetmap import remote_parallel_map
        RESULT = remote_parallel_map(_nested_outer, [1, 2], verbose=False)
    """ % str(Path(__file__).parent)
    for _ in range(5):
        out = run_client(code)
        assert out["returncode"] == 0, out["stderr"]
        for outer_cgroups, inner in out["result"]:
            outer_slot = [l for l in outer_cgroups.splitlines() if "fleetmap-local-" in l]
            assert outer_slot, outer_cgroups
            for inner_cgroups in inner:
                # The inner calls run in the outer call's own slot cgroup.
                assert set(outer_slot) <= set(inner_cgroups.splitlines()), (outer_slot, inner_cgroups)
    time.sleep(0.5)
    assert set(_stray_workers()) - before_stray == set()
    assert set(_local_subtrees()) - before_subtrees == set()


UNPRIVILEGED_PROBE = """
import os
from fleetmap import remote_parallel_map

def probe(arg):
    import errno
    import os
    import stat
    secrets, daemon_pid = arg
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    attempts = {}
    def attempt(name, path):
        try:
            with open(path, "w") as f:
                f.write(str(os.getpid()))
            attempts[name] = "written"
        except OSError as e:
            attempts[name] = errno.errorcode[e.errno]
    attempt("etc", "/etc/fleetmap-written-by-a-call")
    # Its own cgroup's process list: joining another cgroup, or leaving
    # its own, is the daemon's business.
    for line in open("/proc/self/cgroup"):
        hierarchy, controllers, path = line.strip().split(":", 2)
        if controllers in ("memory", ""):
            base = "/sys/fs/cgroup/memory" if controllers == "memory" else "/sys/fs/cgroup"
            attempt("cgroup", base + path + "/cgroup.procs")
            # And the root of the hierarchy: outside every slot.
            attempt("root cgroup", base + "/cgroup.procs")
            break
    # Its parent, and the daemon that started it.
    for name, pid in (("signal parent", os.getppid()), ("signal daemon", daemon_pid)):
        try:
            os.kill(pid, 0)
            attempts[name] = "allowed"
        except OSError as e:
            attempts[name] = errno.errorcode[e.errno]
    # The cgroup tree and the rest of /sys are read-only.
    try:
        os.mkdir("/sys/fs/cgroup/fleetmap-made-by-a-call")
        attempts["mkdir cgroup"] = "made"
    except OSError as e:
        attempts["mkdir cgroup"] = errno.errorcode[e.errno]
    # Every block device of the machine.
    blocks = {}
    for name in os.listdir("/dev"):
        path = "/dev/" + name
        try:
            if stat.S_ISBLK(os.stat(path).st_mode):
                with open(path, "rb"):
                    blocks[name] = "opened"
        except OSError as e:
            blocks[name] = type(e).__name__
    # The fleet's secrets, wherever a call could read them.
    leaks = [k for k, v in os.environ.items() if any(s in v for s in secrets)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as f:
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            leaks += [f"/proc/{pid}/{what}" for s in secrets if s in text]
    return {
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "cgroups": sorted({line.strip().split(":", 2)[2] for line in open("/proc/self/cgroup")}),
        "uid": os.getuid(),
        "caps": {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "no_new_privs": status["NoNewPrivs"].strip(),
        "attempts": attempts,
        "blocks": blocks,
        "leaks": leaks,
    }

SECRETS = [open(p).read().strip() for p in os.environ["PROBE_SECRET_FILES"].split(":")]
DAEMON = int(os.environ["PROBE_DAEMON_PID"])
RESULT = remote_parallel_map(probe, [(SECRETS, DAEMON)], packages=[], verbose=False)[0]
"""


def test_a_root_daemon_runs_calls_unprivileged_by_default(processes, tmp_path):
    """Started as root with neither --run-as nor --allow-root-calls, a node
    runs calls as an unprivileged user (fleetmap's own, else nobody) with
    no capability at all, and `fleetmap status` says so."""
    require_cgroups()
    import pwd

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    system_python = Path(f"/usr/bin/python{version}")
    if not system_python.exists():
        need_privileges(f"no system Python {version} that an unprivileged user can run")
    user = next(u for u in (_user("fleetmap"), _user("nobody")) if u is not None)
    import cloudpickle

    # An interpreter and packages any user can read: this test's own may
    # live in a directory only root can enter.
    path = f"{Path(fleetmap.__file__).parent.parent}:{Path(cloudpickle.__file__).parent.parent}"
    import tempfile

    # A cache the unprivileged user can reach (the test's tmp_path is root's),
    # outside /tmp: a node whose cache lives under /tmp shares the host's.
    cache = Path(tempfile.mkdtemp(prefix="fleetmap-unprivileged-", dir="/var/tmp"))
    cache.chmod(0o755)
    try:
        _run_unprivileged_probe(processes, cache, system_python, path, user)
    finally:
        processes.stop_all()
        shutil.rmtree(cache, ignore_errors=True)


def _run_unprivileged_probe(processes, cache: Path, system_python: Path, path: str, user) -> None:
    coordinator = processes.start_coordinator()
    node = processes.start_node(
        coordinator,
        "default-user",
        cores=1,
        root_calls=False,
        extra=["--python", str(system_python), "--cache-dir", str(cache)],
    )
    env = dict(
        coordinator.client_env(),
        PYTHONPATH=path,
        PROBE_SECRET_FILES=f"{coordinator.token_path}:{coordinator.state_dir / 'api-key'}",
        PROBE_DAEMON_PID=str(node.popen.pid),
    )
    # packages=[]: an environment of nothing but the node's interpreter and
    # fleetmap's runtime, built (as the unprivileged user) on the node.
    r = run_client(UNPRIVILEGED_PROBE, env=env, python=str(system_python))
    assert r["returncode"] == 0, r["stderr"] + node.describe()
    result = r["result"]
    assert result["uid"] == user.pw_uid, (result, user)
    assert all(int(v, 16) == 0 for v in result["caps"].values()), result["caps"]
    assert result["no_new_privs"] == "1"
    # PID and cgroup namespaces of its own: it is PID 2 (its namespace's
    # init, root's, is its parent), it cannot even name the daemon, and its
    # cgroup is its "/", in a read-only tree.
    assert result["pid"] == 2, result
    assert result["cgroups"] == ["/"], result
    assert result["cwd"] == "/tmp", result
    assert result["attempts"]["etc"] == "EACCES", result
    assert result["attempts"].get("cgroup") == "EROFS", result
    assert result["attempts"].get("root cgroup") == "EROFS", result
    assert result["attempts"]["mkdir cgroup"] == "EROFS", result
    assert result["attempts"]["signal parent"] == "EPERM", result
    assert result["attempts"]["signal daemon"] == "ESRCH", result
    assert result["blocks"], "this machine has block devices to try"
    assert set(result["blocks"].values()) == {"PermissionError"}, result["blocks"]
    assert not Path("/sys/fs/cgroup/fleetmap-made-by-a-call").exists()
    assert result["leaks"] == [], "the join token and API key appear nowhere a call can read"
    assert not Path("/etc/fleetmap-written-by-a-call").exists()
    status = subprocess.run(
        fleetmap_command() + ["status"], env=coordinator.client_env(), capture_output=True, text=True, timeout=60
    )
    line = next(l for l in status.stdout.splitlines() if l.startswith("default-user"))
    assert f"calls as uid {user.pw_uid}:{user.pw_gid}, no capabilities" in line, status.stdout
    assert "PID and cgroup namespaces, read-only /sys" in line, status.stdout


def _user(name: str):
    import pwd

    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


SLOT_UIDS_PROBE = """
import os
from fleetmap import remote_parallel_map

def probe(x):
    import os, time
    # Each call leaves its uid where the other can read it (/tmp and
    # /dev/shm are the call's own), then tries to signal every process it
    # can name.
    board = os.environ["PROBE_BOARD"]
    with open(f"{board}/{os.getuid()}", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(1.5)  # both calls alive at once
    others = sorted(int(name) for name in os.listdir(board) if int(name) != os.getuid())
    signalable = []
    for pid in range(1, 4096):
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            signalable.append(pid)
        except OSError:
            pass
    visible = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return os.getuid(), others, os.getpid(), signalable, visible, os.listdir("/dev/shm")

RESULT = remote_parallel_map(probe, [0, 1], packages=[], verbose=False)
"""


def test_with_slot_uids_each_worker_runs_as_a_uid_of_its_own_that_others_cannot_signal(processes, tmp_path):
    require_cgroups()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    system_python = Path(f"/usr/bin/python{version}")
    if not system_python.exists():
        need_privileges(f"no system Python {version} that any user can run")
    import cloudpickle
    import tempfile

    path = f"{Path(fleetmap.__file__).parent.parent}:{Path(cloudpickle.__file__).parent.parent}"
    # Outside /tmp: a job whose interpreter lives under /tmp keeps the host's.
    cache = Path(tempfile.mkdtemp(prefix="fleetmap-slot-uids-", dir="/var/tmp"))
    cache.chmod(0o755)
    board = Path(tempfile.mkdtemp(prefix="fleetmap-slot-uids-", dir="/var/tmp"))
    board.chmod(0o1777)
    (Path("/dev/shm") / "fleetmap-host-only").write_text("x")
    uids = "3100000-3100099"
    try:
        coordinator = processes.start_coordinator()
        node = processes.start_node(
            coordinator,
            "slot-uids",
            cores=2,
            root_calls=False,
            extra=["--python", str(system_python), "--cache-dir", str(cache), "--slot-uids", uids,
                   "--pass-env", "PROBE_BOARD"],
            env=dict(os.environ, PROBE_BOARD=str(board)),
        )
        r = run_client(SLOT_UIDS_PROBE, env=dict(coordinator.client_env(), PYTHONPATH=path),
                       python=str(system_python))
        assert r["returncode"] == 0, r["stderr"] + node.describe()
        (uid_a, others_a, pid_a, kills_a, seen_a, shm_a), (uid_b, others_b, pid_b, kills_b, seen_b, shm_b) = r[
            "result"
        ]
        assert uid_a != uid_b and all(3100000 <= u <= 3100099 for u in (uid_a, uid_b)), r["result"]
        assert others_a == [uid_b] and others_b == [uid_a], r["result"]
        # Each in a PID namespace of its own, as a uid of its own: there is
        # no process it may signal but itself, and /proc shows no other
        # (not the other call's, not the daemon's, not its own init, root's).
        assert pid_a == pid_b == 2, r["result"]
        assert kills_a == kills_b == [], "neither can signal anything"
        assert seen_a == seen_b == [2], "nor see anything but itself in /proc"
        assert "fleetmap-host-only" not in shm_a + shm_b, "/dev/shm is the call's own"
        status = subprocess.run(
            fleetmap_command() + ["status"], env=coordinator.client_env(), capture_output=True, text=True, timeout=60
        )
        assert "calls as a uid of their own each (3100000-3100099)" in status.stdout, status.stdout
    finally:
        processes.stop_all()
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(board, ignore_errors=True)
        (Path("/dev/shm") / "fleetmap-host-only").unlink(missing_ok=True)
