"""Prometheus metrics served by a coordinator and a node daemon on their
opt-in HTTP addresses, scraped during and after a real job and read with
prometheus_client's OpenMetrics parser: the job and slot gauges move, and
the counts match the job."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from typing import Dict, Tuple

from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conftest import PYTHON, START_TIMEOUT, wait_for

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def slot_memory(samples: Samples) -> Dict[str, float]:
    return {dict(labels)["slot"]: v for (name, labels), v in samples.items() if name == "fleetmap_node_slot_memory_bytes"}


def test_metrics_follow_a_job_on_the_coordinator_and_the_node(processes):
    coordinator_port, node_port = free_tcp_port(), free_tcp_port()
    coordinator = processes.start_coordinator(extra=["--http-listen", f"127.0.0.1:{coordinator_port}"])
    assert f"metrics:        http://127.0.0.1:{coordinator_port}/metrics" in coordinator.proc.stdout()
    processes.start_node(
        coordinator, "measured", cores=2, extra=["--http-listen", f"127.0.0.1:{node_port}", "--warm-prestart", "0"]
    )
    before = scrape(coordinator_port)
    assert value(before, "fleetmap_nodes", state="connected") == 1
    assert value(before, "fleetmap_cores", state="free") == 2
    assert value(before, "fleetmap_jobs", state="running") == 0
    assert value(before, "fleetmap_slots", state="active") == 0
    assert value(scrape(node_port), "fleetmap_node_inputs_total") == 0

    # 40 calls of 0.25 s on 2 slots: about 5 s of scrapes.
    code = """
import time
from fleetmap import remote_parallel_map
out = remote_parallel_map(lambda x: (time.sleep(0.25), bytearray(8 << 20), x)[2], range(40), verbose=False)
assert out == list(range(40)), out
"""
    caller = processes.start("caller", [PYTHON, "-c", code], env=coordinator.client_env())
    wait_for(
        lambda: value(scrape(coordinator_port), "fleetmap_jobs", state="running") == 1,
        START_TIMEOUT,
        "the job to show in the metrics",
        processes.describe,
    )
    during = scrape(coordinator_port)
    assert value(during, "fleetmap_slots", state="active") == 2
    assert value(during, "fleetmap_cores", state="busy") == 2 and value(during, "fleetmap_cores", state="free") == 0
    # The node's slot cgroups hold the calls' memory (8 MiB each, and the
    # interpreter's).
    wait_for(
        lambda: sum(1 for v in slot_memory(scrape(node_port)).values() if v > 8 << 20) >= 1,
        START_TIMEOUT,
        "a slot cgroup's memory to show",
        processes.describe,
    )
    wait_for(lambda: not caller.alive(), 60, "the job to finish", processes.describe)
    assert caller.popen.returncode == 0, caller.describe()

    after = scrape(coordinator_port)
    assert value(after, "fleetmap_jobs", state="running") == 0
    assert value(after, "fleetmap_slots", state="active") == 0
    assert value(after, "fleetmap_jobs_ended_total", state="finished") == 1
    assert value(after, "fleetmap_inputs_done_total") == 40
    assert value(after, "fleetmap_chunk_dispatch_seconds_count") == value(after, "fleetmap_chunks_dispatched_total") > 0
    assert value(after, "fleetmap_payload_bytes_total", direction="in") > 0
    node = scrape(node_port)
    assert value(node, "fleetmap_node_inputs_total") == 40
    assert value(node, "fleetmap_node_call_seconds_count") == 40
    # Each call slept 0.25 s: the mean call time says so.
    mean = value(node, "fleetmap_node_call_seconds_sum") / 40
    assert 0.2 < mean < 2.0, mean
    assert value(node, "fleetmap_node_info", node="measured") == 1

    # Nothing else is served, and /metrics only to GET.
    for path, method, status in (("/nothing-here", "GET", 404), ("/metrics", "POST", 405)):
        try:
            urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{coordinator_port}{path}", method=method), timeout=10
            )
            raise AssertionError(f"{method} {path} was served")
        except urllib.error.HTTPError as exc:
            assert exc.code == status, (path, exc.code)
