"""The ``fleetmapd`` program as an operator runs it: installed beside the
interpreter by the wheel, configured by TOML files whose keys are its
flags, reloaded with SIGHUP, logging JSON on request, and started by the
systemd units in ``packaging/``, which ``systemd-analyze verify`` accepts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IN_CI, PYTHON, START_TIMEOUT, free_udp_port, run_client, wait_for

import fleetmap

FLEETMAPD = Path(sys.executable).parent / "fleetmapd"
PACKAGING = Path(__file__).resolve().parents[2] / "packaging"


def test_the_wheel_installs_fleetmapd_beside_the_interpreter():
    assert FLEETMAPD.is_file() and os.access(FLEETMAPD, os.X_OK), f"{FLEETMAPD} is missing"
    out = subprocess.run([str(FLEETMAPD), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fleetmapd", fleetmap._native.VERSION]
    # `fleetmap coordinator --help` is fleetmapd's.
    out = subprocess.run(
        [str(Path(sys.executable).parent / "fleetmap"), "coordinator", "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and "--max-node-cores" in out.stdout and "--config" in out.stdout, out


def test_the_shipped_units_pass_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing (scripts/setup installs the systemd package)")
        pytest.skip("systemd-analyze is missing")
    units = sorted(PACKAGING.glob("*.service"))
    assert {u.name for u in units} == {"fleetmap-coordinator.service", "fleetmap-node.service"}
    for unit in units:
        text = unit.read_text()
        assert "ExecStart=/usr/local/bin/fleetmapd " in text, unit
        # Verified against this build of the program in place of the
        # installed one (verify checks that the binary exists and runs).
        (tmp_path / unit.name).write_text(text.replace("/usr/local/bin/fleetmapd", str(FLEETMAPD)))
    out = subprocess.run(
        ["systemd-analyze", "verify", *[str(tmp_path / u.name) for u in units]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Unknown or misspelt keys are only warnings: any output is a failure.
    assert out.returncode == 0 and out.stderr.strip() == "" and out.stdout.strip() == "", out
    node = (PACKAGING / "fleetmap-node.service").read_text()
    assert "Delegate=yes" in node and "LoadCredential=join-token:" in node
    coordinator = (PACKAGING / "fleetmap-coordinator.service").read_text()
    for hardening in ("DynamicUser=yes", "ProtectSystem=strict", "StateDirectory=fleetmap/coordinator", "NoNewPrivileges=yes"):
        assert hardening in coordinator, hardening


def _start(argv, tmp_path, name, env=None):
    out = open(tmp_path / f"{name}.stdout", "wb")
    err = open(tmp_path / f"{name}.stderr", "wb")
    return subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def _read(tmp_path, name, stream):
    return (tmp_path / f"{name}.{stream}").read_text(errors="replace")


def test_config_files_sighup_reload_json_logs_and_a_clean_stop(tmp_path):
    port = free_udp_port()
    state = tmp_path / "state"
    config = tmp_path / "coordinator.toml"
    config.write_text(f'listen = "127.0.0.1:{port}"\nstate-dir = "{state}"\nmax-node-cores = 1\n')
    procs = []
    try:
        coordinator = _start([str(FLEETMAPD), "--log-format", "json", "coordinator", "--config", str(config)], tmp_path, "c")
        procs.append(coordinator)
        wait_for(
            lambda: "listening on" in _read(tmp_path, "c", "stdout") or coordinator.poll() is not None,
            START_TIMEOUT,
            "the coordinator to listen",
            lambda: _read(tmp_path, "c", "stderr"),
        )
        assert coordinator.poll() is None, _read(tmp_path, "c", "stderr")
        assert f"127.0.0.1:{port}" in _read(tmp_path, "c", "stdout")

        def node(name):
            node_config = tmp_path / f"{name}.toml"
            node_config.write_text(
                f'coordinator = "127.0.0.1:{port}"\nca = "{state / "ca.pem"}"\ntoken-file = "{state / "join-token"}"\n'
                f'name = "{name}"\nstate-dir = "{tmp_path / "nodes"}"\ncores = 2\nwarm-prestart = 0\n'
                f'python = ["{PYTHON}"]\n' + ("allow-root-calls = true\n" if os.geteuid() == 0 else "allow-unisolated = true\n")
            )
            p = _start([str(FLEETMAPD), "node", "--config", str(node_config)], tmp_path, name)
            procs.append(p)
            wait_for(
                lambda: f"node {name} joined" in _read(tmp_path, "c", "stderr") or p.poll() is not None,
                START_TIMEOUT,
                f"node {name} to join",
                lambda: _read(tmp_path, name, "stderr"),
            )
            assert p.poll() is None, _read(tmp_path, name, "stderr")
            return p

        def cores_of(name):
            env = dict(os.environ)
            env.update(
                FLEETMAP_COORDINATOR=f"127.0.0.1:{port}",
                FLEETMAP_CA=str(state / "ca.pem"),
                FLEETMAP_API_KEY=(state / "api-key").read_text().strip(),
            )
            r = run_client(
                "from fleetmap import _fleet\nRESULT = {n['name']: n['cores'] for n in _fleet.connection("
                "_fleet.configured_fleet(None)).status()[0]}",
                env=env,
            )
            assert r["returncode"] == 0, r["stderr"]
            return r["result"][name]

        node("first")
        # The file's limit applies: the node offers 2 cores, 1 is used.
        assert cores_of("first") == 1
        config.write_text(f'listen = "127.0.0.1:{port}"\nstate-dir = "{state}"\nmax-node-cores = 2\n')
        coordinator.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "reload" in _read(tmp_path, "c", "stderr"), START_TIMEOUT, "the reload", lambda: _read(tmp_path, "c", "stderr")
        )
        node("second")
        assert cores_of("second") == 2, "the reloaded limit did not apply to a node joining after it"
        assert cores_of("first") == 1, "a joined node keeps what it was admitted with"
        # A bad file on reload keeps the settings in effect and says why.
        config.write_text("max-node-cores = 'many'\n")
        coordinator.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "the settings in effect stay" in _read(tmp_path, "c", "stderr"),
            START_TIMEOUT,
            "the refused reload",
            lambda: _read(tmp_path, "c", "stderr"),
        )
        assert coordinator.poll() is None
        # Every log line is a JSON object with a level and a message.
        lines = [json.loads(line) for line in _read(tmp_path, "c", "stderr").splitlines() if line.strip()]
        assert lines and all("level" in l and "message" in l.get("fields", {}) for l in lines), lines[:3]
        assert any("node first joined" in l["fields"]["message"] for l in lines)

        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=20) == 0
        assert "every slot was torn down" in _read(tmp_path, "first", "stderr")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_a_bad_config_file_is_a_usage_error_naming_the_file_and_key(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('coordinator = "127.0.0.1:1"\ntoken = "fmjoin_secret"\n')
    out = subprocess.run([str(FLEETMAPD), "node", "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out
    assert str(config) in out.stderr and "token" in out.stderr and "unknown field" in out.stderr, out.stderr
