"""Warm workers: a worker whose job finished serves the caller's next job
in the same environment, keeping what it imported, with exactly the new
job's cores and memory limit; never after a crash or a cancel."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import fleetmap
from fleetmap import remote_parallel_map

from conftest import need_privileges


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _pid_and_import_time(_):
    import os
    import sys

    # A module imported by the first job stays imported in a warm worker.
    import json

    if not hasattr(json, "_fleetmap_imported_at"):
        json._fleetmap_imported_at = time.monotonic_ns()  # type: ignore[attr-defined]
    return os.getpid(), json._fleetmap_imported_at  # type: ignore[attr-defined]


def _slot_view(_):
    import os

    memory_limit = None
    for line in open("/proc/self/cgroup").read().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            limit_file = f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"
            if os.path.exists(limit_file):
                memory_limit = int(open(limit_file).read())
        elif controllers == "" and os.path.exists(f"/sys/fs/cgroup{path}/memory.max"):
            memory_limit = int(open(f"/sys/fs/cgroup{path}/memory.max").read())
    time.sleep(0.2)  # both slots at once, so each job uses every slot
    return os.getpid(), sorted(os.sched_getaffinity(0)), memory_limit, os.environ.get("OMP_NUM_THREADS")


def _crash_on(x):
    import os

    if x == 3:
        os._exit(9)
    time.sleep(0.05)
    return os.getpid()


def _slow_pid(x):
    import os

    time.sleep(0.05)
    return os.getpid()


def test_the_next_job_runs_in_the_same_warm_workers_with_their_imports():
    first = remote_parallel_map(_pid_and_import_time, range(8), verbose=False)
    second = remote_parallel_map(_pid_and_import_time, range(8), verbose=False)
    first_pids = {pid for pid, _ in first}
    assert {pid for pid, _ in second} <= first_pids, (first, second)
    # Imported once per worker: the second job sees the first job's marks.
    assert {mark for _, mark in second} <= {mark for _, mark in first}


def test_a_warm_worker_gets_exactly_the_new_jobs_cores_and_memory_limit():
    if os.geteuid() != 0 or len(os.sched_getaffinity(0)) < 2:
        need_privileges("a warm worker's cgroup limits need root (slot cgroups) and two cores")
    small = remote_parallel_map(_slot_view, range(2), func_cpu=1, func_ram=1, verbose=False)
    big = remote_parallel_map(_slot_view, range(1), func_cpu=2, func_ram=2, verbose=False)
    assert big[0][0] in {pid for pid, *_ in small}, "the two-core job took a warm worker"
    for _, cpus, limit, threads in small:
        assert len(cpus) == 1 and threads == "1", small
        assert limit == 1 << 30, small
    _, cpus, limit, threads = big[0]
    assert len(cpus) == 2, big
    assert limit == 2 << 30 and threads == "2", big


def _touch(path):
    import os

    open(path, "w").close()
    return os.getpid()


def _refuse_to_load():
    raise RuntimeError("this function cannot be loaded here")


class _Unloadable:
    """A callable whose unpickling fails in the worker."""

    def __reduce__(self):
        return (_refuse_to_load, ())

    def __call__(self, path):
        return _touch(path)


def test_a_function_that_cannot_load_in_a_warm_worker_runs_nothing(tmp_path):
    # The daemon sends a job's inputs right behind its function: a warm
    # worker that fails to load the new function must not run them with
    # the function of its last job.
    pids = remote_parallel_map(_touch, [str(tmp_path / "first")], parallelism=1, verbose=False)
    assert (tmp_path / "first").exists()
    with pytest.raises(fleetmap.FleetmapError) as failed:
        remote_parallel_map(_Unloadable(), [str(tmp_path / "second")], parallelism=1, verbose=False)
    assert "could not be loaded" in str(failed.value) and "cannot be loaded here" in str(failed.value)
    assert not (tmp_path / "second").exists(), "the last job's function ran the new job's input"
    again = remote_parallel_map(_touch, [str(tmp_path / "third")], parallelism=1, verbose=False)
    assert (tmp_path / "third").exists() and again[0] not in pids, "the worker that failed to load was retired"


def _load_slowly_in(marker):
    # Unpickled in a worker: the process whose pid the marker names takes
    # two seconds to load, any other loads at once.
    import os

    if open(marker).read() == str(os.getpid()):
        time.sleep(2)
    return _SlowToLoad(marker)


class _SlowToLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_load_slowly_in, (self.marker,))

    def __call__(self, x):
        import os

        return os.getpid()


def test_a_worker_whose_load_is_unanswered_when_its_job_ends_is_not_kept(tmp_path):
    # A slot that gets no chunk (inputs of unknown length, fewer than the
    # slots) can end with its worker still loading the function: kept, that
    # worker would answer the next job with this job's Ready.
    for round_ in range(3):
        slow = remote_parallel_map(_slow_pid, [0], parallelism=1, verbose=False)[0]
        marker = tmp_path / f"slow-{round_}"
        marker.write_text(str(slow))
        function = _SlowToLoad(str(marker))
        # Both slots are sent the function; the warm worker takes two
        # seconds to load it, the other runs the one input at once.
        remote_parallel_map(function, iter([0]), parallelism=2, verbose=False)
        both = remote_parallel_map(function, [0, 1], parallelism=2, verbose=False)
        assert len(both) == 2


def test_a_warm_worker_killed_while_idle_costs_no_input():
    # The host's OOM killer may pick an idle warm worker: the next job of
    # the same function (which that worker would get without a Load) runs
    # on another worker, and no input is blamed for the death.
    idle = remote_parallel_map(_slow_pid, [0], parallelism=1, verbose=False)[0]
    os.kill(idle, 9)
    again = remote_parallel_map(_slow_pid, [0], parallelism=1, verbose=False, return_exceptions=True)
    assert isinstance(again[0], int) and again[0] != idle, again


def _narrow_own_cores(_):
    import os

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    return os.getpid()


def test_a_call_that_narrows_its_cores_leaves_the_next_job_all_of_its_own():
    if os.geteuid() != 0 or len(os.sched_getaffinity(0)) < 2:
        need_privileges("two-core slots need root (slot cgroups) and two cores")
    narrowed = remote_parallel_map(_narrow_own_cores, [0], func_cpu=2, verbose=False)
    pid, cpus, _, threads = remote_parallel_map(_slot_view, [0], func_cpu=2, verbose=False)[0]
    assert pid == narrowed[0], "the same warm worker"
    assert len(cpus) == 2 and threads == "2", cpus


def test_a_worker_that_crashed_or_was_cancelled_never_serves_again():
    before = set(remote_parallel_map(_slow_pid, range(4), verbose=False))
    out = remote_parallel_map(_crash_on, range(8), verbose=False, return_exceptions=True)
    assert isinstance(out[3], fleetmap.WorkerCrashed), out[3]
    # Cancelled: leaving a streamed job early stops it.
    cancelled = set()
    for _, pid in remote_parallel_map(_slow_pid, range(200), verbose=False, generator=True):
        cancelled.add(pid)
        if len(cancelled) >= 1:
            break
    time.sleep(0.5)
    after = set(remote_parallel_map(_slow_pid, range(8), verbose=False))
    assert not (after & cancelled), (after, cancelled)
    for pid in cancelled:
        assert not Path(f"/proc/{pid}").exists() or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert before  # the first job ran somewhere

