"""Memory stays bounded by configuration, not by the number of inputs: a
generator of a million inputs of 1 KB each (1 GB if it were held at once)
streams through a coordinator and a node daemon while the client, the
coordinator and the daemon each stay within a fixed budget."""

from __future__ import annotations

import os

import pytest

from conftest import run_client

STREAM_JOB = """
from fleetmap import remote_parallel_map

def peak_kib():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1])

def inputs(n):
    for i in range(n):
        yield bytes([i % 256]) * 1000

before = peak_kib()
out = remote_parallel_map(len, inputs({n}), verbose=False)
assert len(out) == {n} and set(out) == {{1000}}, (len(out), set(out))
RESULT = {{"before": before, "after": peak_kib()}}
"""


def peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1])


@pytest.fixture
def cluster(processes):
    coordinator = processes.start_coordinator()
    node = processes.start_node(coordinator, "stream-node", cores=2, extra=["--shared-tmp"])
    return coordinator, node


def test_a_million_input_generator_streams_in_bounded_memory(cluster):
    coordinator, node = cluster
    # A small job first, so every process has reached its working size.
    r = run_client(STREAM_JOB.format(n=10_000), env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"]
    coordinator_before = peak_kib(coordinator.proc.popen.pid)
    node_before = peak_kib(node.popen.pid)

    n = 1_000_000
    r = run_client(STREAM_JOB.format(n=n), env=coordinator.client_env(), timeout=300)
    assert r["returncode"] == 0, r["stderr"]
    client_growth = r["result"]["after"] - r["result"]["before"]
    coordinator_growth = peak_kib(coordinator.proc.popen.pid) - coordinator_before
    node_growth = peak_kib(node.popen.pid) - node_before
    report = (
        f"1,000,000 inputs of 1 KB: peak memory grew by {client_growth / 1024:.1f} MiB in the client "
        f"(its result list included), {coordinator_growth / 1024:.1f} MiB in the coordinator, "
        f"{node_growth / 1024:.1f} MiB in the node daemon"
    )
    print(report)
    # Holding the inputs would take over 1,000 MiB; the result list alone
    # (a million references to one small int) is 8 MiB.
    assert client_growth < 150 * 1024, report
    assert coordinator_growth < 64 * 1024, report
    assert node_growth < 64 * 1024, report
