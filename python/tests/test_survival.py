"""Jobs that outlive interruptions, through separate processes (a
``fleetmapd`` coordinator and node started with ``fleetmap coordinator``
and ``fleetmap node``, callers in processes of their own): the caller
stopped with SIGSTOP for 20 s, the only node stopped for 20 s, the
coordinator killed with SIGKILL and started again on the same address and
state; each job finishes with every output right, in order, once. And an
operator's ``fleetmap jobs cancel`` from another process stops a running
job, its calls gone within 2 s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import PYTHON, START_TIMEOUT, fleetmap_command, run_client, wait_for

#: How long each interruption lasts: four times the connections' idle
#: timeout, so every side has seen the connection die.
PAUSE = 20.0

#: The caller: 3,000 calls of about 10 ms on 2 slots (about 15 s of work),
#: checked in full at the end; its stderr carries the progress messages.
CALLER = """
import json, sys, time
from fleetmap import remote_parallel_map

def square(x):
    time.sleep(0.01)
    return x * x

out = remote_parallel_map(square, range(3000), verbose=False)
ok = out == [x * x for x in range(3000)]
print(json.dumps({"ok": ok, "n": len(out)}), flush=True)
"""


def start_caller(processes, coordinator, name="caller", code=CALLER):
    return processes.start(name, [PYTHON, "-c", code], env=coordinator.client_env())


def listed(coordinator):
    out = subprocess.run(
        fleetmap_command() + ["jobs", "--json"], env=coordinator.client_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def running_job(coordinator):
    wait_for(
        lambda: any(j["state"] == "running" and j["inputs_done"] > 0 for j in listed(coordinator)),
        START_TIMEOUT,
        "the job to run",
    )
    return next(j for j in listed(coordinator) if j["state"] == "running")


def finished(caller, processes, timeout=180):
    wait_for(lambda: not caller.alive(), timeout, "the caller to finish", processes.describe)
    assert caller.popen.returncode == 0, caller.describe()
    result = json.loads(caller.stdout().strip().splitlines()[-1])
    assert result == {"ok": True, "n": 3000}, result
    return caller.stderr()


def test_a_caller_stopped_for_20_s_picks_its_job_up_again(processes):
    coordinator = processes.start_coordinator()
    processes.start_node(coordinator, "survivor", cores=2)
    caller = start_caller(processes, coordinator)
    job = running_job(coordinator)
    caller.popen.send_signal(signal.SIGSTOP)
    try:
        # The coordinator stops the job's calls and keeps it for its caller.
        wait_for(
            lambda: [j["state"] for j in listed(coordinator) if j["job"] == job["job"]] == ["waiting"],
            PAUSE,
            "the job to wait for its caller",
            processes.describe,
        )
        waiting = next(j for j in listed(coordinator) if j["job"] == job["job"])
        assert waiting["slots"] == 0 and "caller to come back" in waiting["state_detail"], waiting
        time.sleep(max(0.0, PAUSE - 6))
    finally:
        caller.popen.send_signal(signal.SIGCONT)
    err = finished(caller, processes)
    assert f"job {job['job']} picked up again\n" in err, err
    ended = next(j for j in listed(coordinator) if j["job"] == job["job"])
    assert (ended["state"], ended["inputs_done"], ended["total_inputs"]) == ("finished", 3000, 3000), ended


def test_a_job_whose_only_node_is_stopped_for_20_s_waits_for_it(processes):
    coordinator = processes.start_coordinator()
    node = processes.start_node(coordinator, "sleeper", cores=2)
    caller = start_caller(processes, coordinator)
    running_job(coordinator)
    node.popen.send_signal(signal.SIGSTOP)
    try:
        wait_for(
            lambda: "node sleeper left" in coordinator.proc.stderr(), PAUSE, "the node to be lost", processes.describe
        )
        time.sleep(max(0.0, PAUSE - 6))
        assert caller.alive(), caller.describe()
    finally:
        node.popen.send_signal(signal.SIGCONT)
    err = finished(caller, processes)
    assert "node sleeper was lost and no other node can host this job's calls; waiting up to 60 s" in err, err
    assert coordinator.proc.stderr().count("node sleeper joined") == 2, "it rejoined under its name"


def test_a_coordinator_killed_and_started_again_loses_no_job(processes):
    coordinator = processes.start_coordinator()
    processes.start_node(coordinator, "steady", cores=2)
    caller = start_caller(processes, coordinator)
    job = running_job(coordinator)
    os.kill(coordinator.proc.popen.pid, signal.SIGKILL)
    coordinator.proc.popen.wait(timeout=10)
    time.sleep(2)
    # The same address and state directory: its CA, keys and node registry.
    again = processes.start(
        "coordinator-again",
        fleetmap_command()
        + ["coordinator", "--listen", f"127.0.0.1:{coordinator.port}", "--state-dir", str(coordinator.state_dir)],
    )
    wait_for(lambda: "listening on" in again.stdout(), START_TIMEOUT, "the coordinator to listen again", processes.describe)
    err = finished(caller, processes)
    assert f"job {job['job']} picked up again\n" in err, err
    # The node came back with its certificate, without the join token.
    assert "node steady joined" in again.stderr(), again.stderr()


def test_an_operator_cancel_from_another_process_stops_the_calls_within_2_s(processes):
    coordinator = processes.start_coordinator()
    processes.start_node(coordinator, "cancelled", cores=2)
    code = """
import subprocess
from fleetmap import remote_parallel_map
remote_parallel_map(lambda _: subprocess.run(["sleep", "61.5"]), range(2), verbose=False)
"""
    caller = start_caller(processes, coordinator, code=code)

    def sleeping():
        found = []
        for pid in os.listdir("/proc"):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x0061.5\x00":
                    found.append(pid)
            except OSError:
                pass
        return found

    wait_for(lambda: len(sleeping()) == 2, START_TIMEOUT, "both calls to run", processes.describe)
    job = next(j for j in listed(coordinator) if j["state"] == "running")
    out = subprocess.run(
        fleetmap_command() + ["jobs", "cancel", str(job["job"])],
        env=coordinator.client_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    cancelled = time.monotonic()
    wait_for(lambda: not sleeping(), 2.0, "the calls to be gone", processes.describe)
    assert time.monotonic() - cancelled <= 2.0
    wait_for(lambda: not caller.alive(), 30, "the caller to stop")
    assert "JobCancelled" in caller.stderr() and "cancelled by another client" in caller.stderr(), caller.stderr()


def test_a_detached_job_runs_on_and_its_results_are_fetched_from_another_process(processes):
    coordinator = processes.start_coordinator()
    processes.start_node(coordinator, "keeper", cores=2)
    submit = """
import time
from fleetmap import remote_parallel_map

def square(x):
    time.sleep(0.002)
    if x == 77:
        raise ValueError("seventy-seven")
    return x * x

handle = remote_parallel_map(square, range(800), detach=True)
print(handle.id, flush=True)
"""
    submitter = processes.start("submitter", [PYTHON, "-c", submit], env=coordinator.client_env())
    wait_for(lambda: not submitter.alive(), 60, "the submitting process to exit", processes.describe)
    assert submitter.popen.returncode == 0, submitter.describe()
    job = int(submitter.stdout().split()[-1])
    fetch = f"""
import json
import fleetmap
handle = fleetmap.job({job})
try:
    handle.results(timeout=120)
    raised = None
except ValueError as exc:
    raised = [str(exc), exc.input_index]
out = handle.results(return_exceptions=True)
print(json.dumps({{"raised": raised, "n": len(out),
    "right": all(o == i * i for i, o in enumerate(out) if i != 77),
    "at_77": type(out[77]).__name__}}))
"""
    reader = processes.start("reader", [PYTHON, "-c", fetch], env=coordinator.client_env())
    wait_for(lambda: not reader.alive(), 150, "the results to be fetched", processes.describe)
    assert reader.popen.returncode == 0, reader.describe()
    got = json.loads(reader.stdout().strip().splitlines()[-1])
    assert got == {"raised": ["seventy-seven", 77], "n": 800, "right": True, "at_77": "ValueError"}, got
    # The same from the command line, one output per line in input order.
    out = subprocess.run(
        fleetmap_command() + ["jobs", "results", str(job), "--json"],
        env=coordinator.client_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 800 and lines[3] == "9" and "seventy-seven" in lines[77], lines[:5]
    # Listed as any job, finished with every input; the same for scripts.
    listed_job = next(j for j in listed(coordinator) if j["job"] == job)
    assert listed_job["state"] == "finished" and listed_job["inputs_done"] == 800, listed_job
    r = run_client(
        f"import fleetmap\nRESULT = [j['state'] for j in fleetmap.jobs() if j['job'] == {job}]",
        env=coordinator.client_env(),
    )
    assert r["result"] == ["finished"], r


def test_the_embedded_cluster_refuses_detached_jobs_with_what_to_do():
    r = run_client(
        """
import fleetmap
try:
    fleetmap.remote_parallel_map(abs, [1, 2], detach=True)
    RESULT = None
except fleetmap.JobRejected as exc:
    RESULT = str(exc)
"""
    )
    assert r["returncode"] == 0, r["stderr"]
    assert r["result"] and "keeps no outputs" in r["result"] and "attached" in r["result"], r["result"]
