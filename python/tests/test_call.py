"""The call, finished: mistakes caught before anything runs, streaming
results, Ctrl-C, and connection-level checks."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

import fleetmap
from fleetmap import remote_parallel_map

from conftest import wait_for


def test_streaming_yields_every_index_once_as_calls_complete():
    def f(x):
        import time

        time.sleep(0.02 * (x % 3))
        return x * 3

    seen = {}
    for index, output in remote_parallel_map(f, range(30), generator=True, verbose=False):
        assert index not in seen
        seen[index] = output
    assert seen == {i: i * 3 for i in range(30)}


def test_streaming_from_a_generator_input():
    pairs = remote_parallel_map(lambda x: -x, (i for i in range(50)), generator=True, verbose=False)
    assert sorted(pairs) == [(i, -i) for i in range(50)]


def test_leaving_a_streaming_loop_early_cancels_the_job(tmp_path):
    seen = str(tmp_path)

    def slow(x):
        import os
        import time

        open(os.path.join(seen, str(os.getpid())), "w").close()
        time.sleep(0.05)
        return x

    stream = remote_parallel_map(slow, range(400), generator=True, verbose=False)
    for index, _ in stream:
        break
    stream.close()

    # Every worker that ran the job is killed once the job is cancelled (the
    # node's other workers, started ahead of jobs, ran none of its code).
    def job_workers_alive():
        return [int(p.name) for p in tmp_path.iterdir() if int(p.name) in _embedded_workers()]

    wait_for(lambda: not job_workers_alive(), 5, "the job's workers to stop", lambda: str(job_workers_alive()))


def _embedded_workers():
    from test_isolation import processes_of_node_prefix

    return processes_of_node_prefix("-local")


def test_a_function_that_cannot_take_one_argument_is_refused_before_submission():
    with pytest.raises(TypeError, match="cannot be called with one positional argument"):
        remote_parallel_map(lambda a, b: a, [1, 2], verbose=False)
    # Defaults and *args are fine.
    assert remote_parallel_map(lambda a, b=2: a * b, [1], verbose=False) == [2]
    assert remote_parallel_map(lambda *args: args[0], [5], verbose=False) == [5]


def test_an_unpicklable_capture_is_named_with_where_it_sits():
    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            return x

    with pytest.raises(fleetmap.InputError) as info:
        remote_parallel_map(uses_lock, [1], verbose=False)
    message = str(info.value)
    assert "closure variable 'lock'" in message and "lock" in message, message
    assert "create it inside the function" in message, message


def test_a_generator_nested_in_an_input_is_refused_naming_its_path():
    nested = {"values": [1, (i for i in range(3))]}
    with pytest.raises(fleetmap.InputError) as info:
        remote_parallel_map(lambda x: x, [0, nested], verbose=False)
    assert info.value.input_index == 1
    assert "inputs[1]['values'][1] is a generator" in str(info.value), str(info.value)


def test_a_node_with_another_python_minor_version_says_so(monkeypatch):
    import fleetmap._map as map_module

    monkeypatch.setattr(map_module, "_PYTHON_VERSION", "3.99")
    with pytest.raises(fleetmap.JobFailed) as info:
        remote_parallel_map(abs, [1], verbose=False)
    message = str(info.value)
    assert "the caller runs Python 3.99" in message and "same minor version" in message, message


CTRL_C_JOB = """
import os, sys, time
from fleetmap import remote_parallel_map

def slow(x, marks=sys.argv[1]):
    import os, subprocess, time
    # A process of its own the host can find by its command line (a call
    # on a fleet node is PID 2 of its own namespace: its pid names nothing
    # outside).
    subprocess.Popen(["sleep", f"300.{x + 1}"])
    open(os.path.join(marks, str(x + 1)), "w").close()
    time.sleep(30)
    return x

print("submitting", flush=True)
remote_parallel_map(slow, range(8), verbose=False)
"""


def test_ctrl_c_in_the_caller_kills_every_remote_process_of_the_job(processes, tmp_path):
    coordinator = processes.start_coordinator()
    # A shared /tmp, so that the calls can say which workers run them (the
    # node also keeps workers started ahead of jobs, which must not count).
    processes.start_node(coordinator, "ctrl-c-node", cores=2, extra=["--shared-tmp"])
    marks = tmp_path / "marks"
    marks.mkdir()
    client = processes.start("client", [sys.executable, "-c", CTRL_C_JOB, str(marks)], env=coordinator.client_env())
    wait_for(lambda: len(os.listdir(marks)) >= 2, 30, "the job's calls to start", client.describe)
    # Each call's sleep, and its parent: the call's worker.
    sleeps = [p for p in _pids() if _cmdline(p) in ([b"sleep", f"300.{m}".encode()] for m in os.listdir(marks))]
    assert len(sleeps) >= 2, [_cmdline(p) for p in _pids()]
    workers = sleeps + [_ppid(p) for p in sleeps]
    client.popen.send_signal(signal.SIGINT)
    client.popen.wait(timeout=10)
    assert client.popen.returncode != 0
    assert "KeyboardInterrupt" in client.stderr(), client.describe()

    def alive() -> list:
        return [p for p in workers if os.path.exists(f"/proc/{p}") and not _is_zombie(p)]

    wait_for(lambda: not alive(), 5, "the job's workers to be killed", lambda: str(alive()))


def _pids() -> list:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> list:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:-1]
    except OSError:
        return []


def _ppid(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def _is_zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
