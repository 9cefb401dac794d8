"""A coordinator and a node daemon as separate processes on loopback, used
by client processes through FLEETMAP_* settings: the deployment users run."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time

import pytest

import fleetmap
from fleetmap import remote_parallel_map

from conftest import fleetmap_command, free_udp_port, run_client, wait_for

JOB = """
import os
from fleetmap import remote_parallel_map
out = remote_parallel_map(lambda x: (x * 2, os.environ["FLEETMAP_NODE"]), range({n}), verbose=False)
RESULT = out
"""


@pytest.fixture(scope="module")
def cluster(module_processes):
    coordinator = module_processes.start_coordinator("127.0.0.1:0")
    module_processes.start_node(coordinator, "loop-node-1", cores=2)
    return coordinator


def check_job(coordinator, n=500, env=None):
    r = run_client(JOB.format(n=n), env=env or coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"] + "\n" + coordinator.proc.describe()
    out = r["result"]
    assert [o[0] for o in out] == [2 * x for x in range(n)]
    assert {o[1] for o in out} == {"loop-node-1"}
    return r


def test_coordinator_writes_its_credentials(cluster):
    assert cluster.ca_path.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert len(cluster.token_path.read_text().strip()) >= 16
    assert len(cluster.api_key) >= 16
    # The secrets are readable by their owner only.
    for path in (cluster.token_path, cluster.state_dir / "api-key"):
        assert os.stat(path).st_mode & 0o077 == 0, oct(os.stat(path).st_mode)


def test_job_from_a_client_process(cluster):
    r = check_job(cluster, n=1000)
    assert "Traceback" not in r["stderr"], r["stderr"]


def test_client_via_config_file(cluster, tmp_path):
    config = tmp_path / "config"
    config.write_text(
        "[fleet]\n"
        f"coordinator = 127.0.0.1:{cluster.port}\n"
        f"api_key = {cluster.api_key}\n"
        f"ca = {cluster.ca_path}\n"
    )
    env = dict(os.environ, FLEETMAP_CONFIG=str(config))
    for name in ("FLEETMAP_COORDINATOR", "FLEETMAP_API_KEY", "FLEETMAP_CA"):
        env.pop(name, None)
    check_job(cluster, n=50, env=env)


def test_api_key_argument_overrides_the_environment(cluster):
    env = cluster.client_env(api_key="fmkey_wrong")
    r = run_client(
        f"""
        from fleetmap import remote_parallel_map
        RESULT = remote_parallel_map(lambda x: -x, range(5), verbose=False, api_key={cluster.api_key!r})
        """,
        env=env,
    )
    assert r["returncode"] == 0, r["stderr"]
    assert r["result"] == [0, -1, -2, -3, -4]


def test_wrong_api_key_raises_authentication_error(cluster):
    r = run_client(
        """
        import fleetmap
        try:
            fleetmap.remote_parallel_map(lambda x: x, range(5), verbose=False)
            RESULT = {"raised": None}
        except Exception as exc:
            RESULT = {"raised": type(exc).__name__, "message": str(exc),
                      "auth": isinstance(exc, fleetmap.AuthenticationError)}
        """,
        env=cluster.client_env(api_key="fmkey_not-the-right-key"),
        timeout=60,
    )
    assert r["returncode"] == 0, r["stderr"]
    res = r["result"]
    assert res["raised"] == "AuthenticationError", res
    assert res["auth"] is True
    assert "API key" in res["message"], res["message"]
    # And the coordinator is still serving good clients.
    check_job(cluster, n=20)


def test_missing_ca_is_a_configuration_error(cluster, monkeypatch):
    monkeypatch.setenv("FLEETMAP_COORDINATOR", f"127.0.0.1:{cluster.port}")
    monkeypatch.setenv("FLEETMAP_API_KEY", cluster.api_key)
    monkeypatch.delenv("FLEETMAP_CA", raising=False)
    with pytest.raises(fleetmap.ConfigurationError, match="FLEETMAP_CA"):
        remote_parallel_map(lambda x: x, [1], verbose=False)
    monkeypatch.setenv("FLEETMAP_CA", str(cluster.state_dir / "no-such-ca.pem"))
    with pytest.raises(fleetmap.ConfigurationError, match="no-such-ca.pem"):
        remote_parallel_map(lambda x: x, [1], verbose=False)


def test_another_coordinators_ca_fails_authentication(cluster, processes):
    # The CA of another coordinator does not verify this coordinator's
    # certificate: the client refuses to talk, it does not fall back.
    other = processes.start_coordinator("127.0.0.1:0", name="other-coordinator")
    env = cluster.client_env()
    env["FLEETMAP_CA"] = str(other.ca_path)
    r = run_client(
        """
        import fleetmap
        try:
            fleetmap.remote_parallel_map(lambda x: x, [1], verbose=False)
            RESULT = None
        except fleetmap.FleetmapError as exc:
            RESULT = [type(exc).__name__, str(exc)]
        """,
        env=env,
        timeout=60,
    )
    assert r["returncode"] == 0, r["stderr"]
    assert r["result"] is not None, "the client accepted a coordinator its CA did not sign"
    assert r["result"][0] == "AuthenticationError", r["result"]


def test_node_with_a_wrong_token_exits_with_a_clear_message(cluster, tmp_path):
    bad = tmp_path / "bad-token"
    bad.write_text("fmjoin_this-is-not-the-token\n")
    bad.chmod(0o600)
    proc = subprocess.run(
        fleetmap_command()
        + [
            "node",
            "--coordinator",
            f"127.0.0.1:{cluster.port}",
            "--token-file",
            str(bad),
            "--ca",
            str(cluster.ca_path),
            "--name",
            "intruder",
            # This test's interpreter may live where only root can run it.
            "--allow-root-calls",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "refused" in proc.stderr, proc.stderr
    assert "join token" in proc.stderr, proc.stderr
    assert not cluster.joined("intruder")
    # The coordinator logged the refusal and still serves jobs on its node only.
    assert "intruder" in cluster.proc.stderr()
    check_job(cluster, n=100)


def test_a_join_token_readable_by_others_or_on_the_command_line_is_refused(cluster, tmp_path):
    shared = tmp_path / "join-token"
    shared.write_text(cluster.token_path.read_text())
    shared.chmod(0o644)
    base = fleetmap_command() + ["node", "--coordinator", f"127.0.0.1:{cluster.port}", "--ca", str(cluster.ca_path)]
    proc = subprocess.run(base + ["--token-file", str(shared), "--name", "leaky"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "chmod 600" in proc.stderr, proc.stderr
    # The command line is readable by every process on the node: no flag takes the token.
    token = cluster.token_path.read_text().strip()
    proc = subprocess.run(base + ["--token", token, "--name", "argv"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unexpected argument '--token'" in proc.stderr, proc.stderr
    assert not cluster.joined("leaky") and not cluster.joined("argv")


def test_node_without_a_token_is_a_usage_error(cluster):
    env = dict(os.environ)
    env.pop("FLEETMAP_JOIN_TOKEN", None)
    proc = subprocess.run(
        fleetmap_command()
        + ["node", "--coordinator", f"127.0.0.1:{cluster.port}", "--ca", str(cluster.ca_path), "--name", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 2
    assert "join token" in proc.stderr


def test_udp_garbage_does_not_hurt_the_coordinator(cluster):
    rng = random.Random(1234)
    target = ("127.0.0.1", cluster.port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        datagrams = []
        for _ in range(300):
            datagrams.append(rng.randbytes(rng.randint(1, 1400)))
        for _ in range(200):
            # Shaped like QUIC long-header Initial packets (version 1), with
            # random connection ids, lengths and payload, padded to 1200 bytes.
            dcid = rng.randbytes(rng.randint(0, 20))
            scid = rng.randbytes(rng.randint(0, 20))
            head = bytes([0xC0 | rng.randint(0, 3)]) + b"\x00\x00\x00\x01"
            head += bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
            datagrams.append(head + rng.randbytes(1200 - len(head)))
        for _ in range(50):
            # Short-header packets and version-negotiation triggers.
            datagrams.append(bytes([0x40 | rng.randint(0, 63)]) + rng.randbytes(rng.randint(20, 1200)))
            datagrams.append(b"\xc0" + rng.randbytes(4) + b"\x08" + rng.randbytes(8) + b"\x00" + rng.randbytes(1180))
        datagrams += [b"", b"\x00", b"\xff" * 1500]
        for d in datagrams:
            s.sendto(d, target)
    time.sleep(0.5)
    assert cluster.proc.alive(), cluster.proc.describe()
    assert "panicked" not in cluster.proc.stderr()
    check_job(cluster, n=300)
    assert cluster.proc.alive()


def test_unreachable_coordinator_raises_coordinator_unreachable(monkeypatch, tmp_path, cluster):
    # A port where nothing answers: the client gives up with a clear error.
    monkeypatch.setenv("FLEETMAP_COORDINATOR", f"127.0.0.1:{free_udp_port()}")
    monkeypatch.setenv("FLEETMAP_CA", str(cluster.ca_path))
    monkeypatch.setenv("FLEETMAP_API_KEY", "fmkey_x")
    started = time.monotonic()
    with pytest.raises(fleetmap.CoordinatorUnreachable, match="FLEETMAP_COORDINATOR"):
        remote_parallel_map(lambda x: x, [1], verbose=False)
    assert time.monotonic() - started < 30


def test_fleetmap_up_serves_other_processes(processes, tmp_path):
    port = free_udp_port()
    state = tmp_path / "up-state"
    proc = processes.start("up", fleetmap_command() + ["up", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state)])
    wait_for(lambda: "FLEETMAP_API_KEY=" in proc.stdout() or not proc.alive(), 20, "fleetmap up", processes.describe)
    assert proc.alive(), proc.describe()
    exports = dict(
        line.split("export ", 1)[1].split("=", 1) for line in proc.stdout().splitlines() if "export " in line
    )
    assert exports["FLEETMAP_COORDINATOR"] == f"127.0.0.1:{port}"
    assert os.path.isfile(exports["FLEETMAP_CA"])
    env = dict(os.environ, **exports)
    r = run_client("from fleetmap import remote_parallel_map\nRESULT = remote_parallel_map(abs, range(-5, 5), verbose=False)", env=env)
    assert r["returncode"] == 0, r["stderr"]
    assert r["result"] == [abs(x) for x in range(-5, 5)]


def test_a_node_rejoins_with_its_certificate_alone_and_a_revoked_node_stops(processes):
    coordinator = processes.start_coordinator("127.0.0.1:0")
    first = processes.start_node(coordinator, "cert-node", cores=1)
    identity = processes.workdir / "node-identities" / "cert-node"
    assert (identity / "node.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert os.stat(identity / "node.key").st_mode & 0o077 == 0, "the node's key is its owner's only"
    first.popen.terminate()
    first.popen.wait(timeout=10)

    # No token this time: the certificate it enrolled with is its credential.
    env = {k: v for k, v in os.environ.items() if k != "FLEETMAP_JOIN_TOKEN"}
    second = processes.start_node(coordinator, "cert-node", cores=1, env=env, with_token=False, wait=False)
    wait_for(
        lambda: coordinator.proc.stderr().count("node cert-node joined") == 2 or not second.alive(),
        30,
        "the node to join again with its certificate",
        second.describe,
    )
    assert second.alive(), second.describe()
    check_job_on(coordinator, "cert-node")
    listed = subprocess.run(
        fleetmap_command() + ["nodes", "list", "--state-dir", str(coordinator.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and "cert-node" in listed.stdout, listed.stderr

    revoked = subprocess.run(
        fleetmap_command() + ["nodes", "revoke", "cert-node", "--state-dir", str(coordinator.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoked.returncode == 0, revoked.stderr
    # Disconnected at once; refused on its way back in; the daemon stops and says why.
    second.popen.wait(timeout=30)
    assert second.popen.returncode != 0
    assert "revoked" in second.stderr(), second.describe()


def check_job_on(coordinator, node: str) -> None:
    r = run_client(JOB.format(n=20), env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"]
    assert {o[1] for o in r["result"]} == {node}


def test_a_new_node_waits_for_approval_then_joins(processes):
    coordinator = processes.start_coordinator("127.0.0.1:0", extra=["--approve-nodes"])
    node = processes.start_node(coordinator, "newcomer", cores=1, wait=False)
    wait_for(
        lambda: "waits for the operator's approval" in coordinator.proc.stderr() or not node.alive(),
        30,
        "the node to ask for approval",
        node.describe,
    )
    assert node.alive() and not coordinator.joined("newcomer"), node.describe()
    nodes = fleetmap_command() + ["nodes"]
    state = ["--state-dir", str(coordinator.state_dir)]
    listed = subprocess.run(nodes + ["list"] + state, capture_output=True, text=True, timeout=60)
    assert any(l.split()[:2] == ["newcomer", "pending"] for l in listed.stdout.splitlines()), listed.stdout
    approved = subprocess.run(nodes + ["approve", "newcomer"] + state, capture_output=True, text=True, timeout=60)
    assert approved.returncode == 0, approved.stderr
    # The daemon kept trying; it joins without being restarted.
    wait_for(lambda: coordinator.joined("newcomer"), 30, "the approved node to join", node.describe)
    check_job_on(coordinator, "newcomer")
