"""Several hosts on one machine: a coordinator in the host network namespace
and one node daemon in each of two network namespaces, joined by veth pairs.
The nodes reach the coordinator only through their veth links.

Needs root and iproute2. Under CI=true their absence fails the test; on a
developer machine it skips with the reason."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import signal
import sys
import time
import os
import subprocess
from dataclasses import dataclass
from typing import List

import pytest

from conftest import check_netns_support, free_udp_port, need_privileges, run_client, wait_for


@dataclass
class Link:
    netns: str
    host_if: str
    host_addr: str
    ns_addr: str


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _subnets_in_use() -> List[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show").stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


def _pick_subnets(count: int) -> List[ipaddress.IPv4Network]:
    """``count`` /24s of 10.201.0.0/16 that no interface uses, starting at
    an offset from this process id, so concurrent runs do not collide."""
    used = _subnets_in_use()
    picked: List[ipaddress.IPv4Network] = []
    start = (os.getpid() % 120) * 2 + 1
    for i in range(250):
        net = ipaddress.ip_network(f"10.201.{(start + i) % 250 + 1}.0/24")
        if not any(net.overlaps(u) for u in used):
            picked.append(net)
            if len(picked) == count:
                return picked
    raise AssertionError("no free /24 in 10.201.0.0/16 for the test links")


@contextlib.contextmanager
def namespaces(count: int):
    """``count`` network namespaces, each joined to the host by a veth pair;
    removed afterwards, pass or fail."""
    check_netns_support()
    tag = os.getpid()
    links: List[Link] = []
    created_ns: List[str] = []
    created_if: List[str] = []
    try:
        probe = f"fm-probe-{tag}"
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            need_privileges(f"cannot create a network namespace: {r.stderr.strip()}")
        created_ns.append(probe)
        for i, net in enumerate(_pick_subnets(count), start=1):
            ns, host_if, ns_if = f"fm-ns{i}-{tag}", f"fmh{i}-{tag}", f"fmn{i}-{tag}"
            host_addr, ns_addr = str(net.network_address + 1), str(net.network_address + 2)
            _ip("netns", "add", ns)
            created_ns.append(ns)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            created_if.append(host_if)
            _ip("link", "set", ns_if, "netns", ns)
            _ip("addr", "add", f"{host_addr}/24", "dev", host_if)
            _ip("link", "set", host_if, "up")
            _ip("-n", ns, "addr", "add", f"{ns_addr}/24", "dev", ns_if)
            _ip("-n", ns, "link", "set", ns_if, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            links.append(Link(ns, host_if, host_addr, ns_addr))
        yield links
    finally:
        for host_if in created_if:
            _ip("link", "del", host_if, check=False)
        for ns in created_ns:
            _ip("netns", "del", ns, check=False)
        leftover = _ip("netns", "list", check=False).stdout
        assert f"-{tag}" not in leftover, f"namespaces left behind: {leftover}"


@pytest.fixture
def two_namespaces():
    with namespaces(2) as links:
        yield links


@pytest.fixture
def three_namespaces():
    with namespaces(3) as links:
        yield links


def test_nodes_in_two_network_namespaces_share_a_10000_input_job(two_namespaces, processes):
    links = two_namespaces
    # Each namespace sees only its own veth address and loopback: the
    # coordinator's host-side address is reachable, 127.0.0.1 is not it.
    for link in links:
        addrs = _ip("-n", link.netns, "-4", "-o", "addr", "show").stdout
        assert link.ns_addr in addrs and link.host_addr not in addrs

    port = free_udp_port("0.0.0.0")
    coordinator = processes.start_coordinator(f"0.0.0.0:{port}")
    names = []
    for i, link in enumerate(links, start=1):
        name = f"ns-node-{i}"
        names.append(name)
        processes.start_node(coordinator, name, host=link.host_addr, cores=2, netns=link.netns)
    # The coordinator saw each node arrive from its namespace's address.
    log = coordinator.proc.stderr()
    for name, link in zip(names, links):
        assert f"node {name} joined from {link.ns_addr}:" in log, log

    n = 10_000
    r = run_client(
        f"""
        import os
        from fleetmap import remote_parallel_map
        RESULT = remote_parallel_map(lambda x: (x * 2, os.environ["FLEETMAP_NODE"]), range({n}), verbose=False)
        """,
        env=coordinator.client_env("127.0.0.1"),
        timeout=180,
    )
    assert r["returncode"] == 0, r["stderr"] + "\n" + processes.describe()
    out = r["result"]
    assert len(out) == n
    bad = [(i, o) for i, o in enumerate(out) if o[0] != 2 * i or o[1] not in names]
    assert not bad, f"{len(bad)} wrong outputs, first: {bad[:5]}"
    seen = {o[1] for o in out}
    assert seen == set(names), f"only {seen} ran inputs"
    for proc in processes.procs:
        assert proc.alive(), proc.describe()


FAILING_JOB = """
import json, os, sys, time
from fleetmap import remote_parallel_map

def work(x):
    time.sleep(0.001)
    return (x * 2, os.environ["FLEETMAP_NODE"])

out = remote_parallel_map(work, range({n}), verbose=False)
with open({result!r}, "w") as f:
    json.dump(out, f)
"""


def _left_at(log: str, name: str) -> float:
    """When the coordinator logged that node `name` left (epoch seconds)."""
    for line in log.splitlines():
        if f"node {name} left" in line:
            stamp = line.split()[0]
            # Strip ANSI colour codes around the timestamp, if any.
            stamp = stamp.replace("\x1b[2m", "").replace("\x1b[0m", "")
            return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    raise AssertionError(f"the coordinator never logged that {name} left:\n{log[-3000:]}")


def test_a_job_survives_a_killed_node_and_a_cut_link(three_namespaces, processes, tmp_path):
    """During a 20,000-input job one daemon is killed with SIGKILL and
    another loses its link; the job still returns every output, correct,
    in order, exactly once, from the nodes that ran them."""
    links = three_namespaces
    port = free_udp_port("0.0.0.0")
    coordinator = processes.start_coordinator(f"0.0.0.0:{port}")
    names = [f"fail-node-{i}" for i in range(1, 4)]
    nodes = [
        processes.start_node(coordinator, name, host=link.host_addr, cores=2, netns=link.netns)
        for name, link in zip(names, links)
    ]
    n = 20_000
    result = tmp_path / "result.json"
    client = processes.start("client", [sys.executable, "-c", FAILING_JOB.format(n=n, result=str(result))],
                             env=coordinator.client_env("127.0.0.1"))
    # Let every node get work, then fail two of them.
    time.sleep(1.5)
    assert client.alive(), client.describe()
    killed_at = time.time()
    os.killpg(nodes[0].popen.pid, signal.SIGKILL)
    cut_at = time.time()
    _ip("link", "set", links[1].host_if, "down")

    wait_for(lambda: not client.alive(), 120, "the job to finish", processes.describe)
    assert client.popen.returncode == 0, client.describe() + processes.describe()
    out = json.loads(result.read_text())
    assert len(out) == n
    bad = [(i, o) for i, o in enumerate(out) if o[0] != 2 * i]
    assert not bad, f"{len(bad)} wrong outputs, first: {bad[:5]}"
    assert {o[1] for o in out} <= set(names)
    assert names[2] in {o[1] for o in out}

    log = coordinator.proc.stderr()
    killed_detected = _left_at(log, names[0]) - killed_at
    cut_detected = _left_at(log, names[1]) - cut_at
    report = f"node loss noticed after: SIGKILL {killed_detected:.2f} s, cut link {cut_detected:.2f} s"
    print(report)
    (tmp_path / "detection.txt").write_text(report)
    # A killed process closes nothing, a cut link says nothing: both are
    # noticed by the QUIC idle timeout (5 s with 1 s keep-alives).
    assert killed_detected < 8 and cut_detected < 8, report
