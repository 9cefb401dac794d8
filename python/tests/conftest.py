"""Shared helpers for fleetmap's end-to-end tests.

Every test here runs real work: either on the embedded cluster that the
first ``remote_parallel_map`` call of the pytest process starts, or on a
coordinator and node daemons started as separate processes with the
``fleetmap`` command (see :class:`Processes`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

# The embedded cluster is used only when no fleet is configured: make sure a
# developer's own config file or environment does not send the tests to a
# real fleet. This runs before any test imports fleetmap's cluster code.
for _name in ("FLEETMAP_COORDINATOR", "FLEETMAP_API_KEY", "FLEETMAP_CA"):
    os.environ.pop(_name, None)
os.environ["FLEETMAP_CONFIG"] = "/nonexistent/fleetmap-tests/config"

PYTHON = sys.executable
BIN_DIR = Path(sys.executable).parent
FLEETMAP_BIN = str(BIN_DIR / "fleetmap") if (BIN_DIR / "fleetmap").exists() else None
IN_CI = os.environ.get("CI", "").lower() == "true"

#: How long a coordinator or node may take to start or join.
START_TIMEOUT = 20.0


def fleetmap_command() -> List[str]:
    """The ``fleetmap`` command line (the installed script, else ``python -m``)."""
    if FLEETMAP_BIN:
        return [FLEETMAP_BIN]
    return [PYTHON, "-m", "fleetmap.cli"]


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, on_timeout: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


@dataclass
class Proc:
    """A process started by a test, with its output in files."""

    name: str
    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def describe(self) -> str:
        status = "running" if self.alive() else f"exited with {self.popen.returncode}"
        return (
            f"--- {self.name} ({status}) stdout:\n{self.stdout()[-4000:]}\n"
            f"--- {self.name} stderr:\n{self.stderr()[-4000:]}"
        )


@dataclass
class Coordinator:
    proc: Proc
    addr: str
    port: int
    state_dir: Path

    @property
    def ca_path(self) -> Path:
        return self.state_dir / "ca.pem"

    @property
    def token_path(self) -> Path:
        return self.state_dir / "join-token"

    @property
    def api_key(self) -> str:
        return (self.state_dir / "api-key").read_text().strip()

    def client_env(self, host: str = "127.0.0.1", api_key: Optional[str] = None) -> Dict[str, str]:
        """Environment for a client process of this coordinator."""
        env = dict(os.environ)
        env.update(
            FLEETMAP_COORDINATOR=f"{host}:{self.port}",
            FLEETMAP_CA=str(self.ca_path),
            FLEETMAP_API_KEY=api_key if api_key is not None else self.api_key,
        )
        return env

    def joined(self, name: str) -> bool:
        return f"node {name} joined" in self.proc.stderr()


class Processes:
    """Starts subprocesses and kills every one of them (and their process
    groups: workers, ``ip netns exec`` children) at teardown, pass or fail."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: List[Proc] = []

    def start(self, name: str, argv: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None) -> Proc:
        out = self.workdir / f"{name}.stdout"
        err = self.workdir / f"{name}.stderr"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                env=env if env is not None else dict(os.environ),
                cwd=str(cwd or self.workdir),
                start_new_session=True,
            )
        proc = Proc(name, popen, out, err)
        self.procs.append(proc)
        return proc

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.procs)

    def start_coordinator(
        self,
        listen: str = "127.0.0.1:0",
        name: str = "coordinator",
        env: Optional[Dict[str, str]] = None,
        extra: Optional[List[str]] = None,
    ) -> Coordinator:
        """Starts ``fleetmap coordinator`` and waits for its listening line."""
        host, port = listen.rsplit(":", 1)
        if port == "0":
            port = str(free_udp_port(host))
        state = self.workdir / f"{name}-state"
        state.mkdir(exist_ok=True)
        proc = self.start(
            name,
            fleetmap_command() + ["coordinator", "--listen", f"{host}:{port}", "--state-dir", str(state)] + (extra or []),
            env=env,
        )
        wait_for(
            lambda: "listening on" in proc.stdout() or not proc.alive(),
            START_TIMEOUT,
            f"{name} to listen",
            self.describe,
        )
        assert proc.alive(), f"the coordinator exited at start:\n{proc.describe()}"
        line = next(l for l in proc.stdout().splitlines() if "listening on" in l)
        addr = line.split("listening on", 1)[1].split()[0]
        assert addr.endswith(f":{port}"), line
        for f in ("ca.pem", "join-token", "api-key"):
            assert (state / f).is_file(), f"{f} missing from {state}: {os.listdir(state)}"
            assert str(state / f) in proc.stdout(), f"the coordinator did not print the path of {f}"
        return Coordinator(proc, addr, int(port), state)

    def start_node(
        self,
        coordinator: Coordinator,
        name: str,
        host: str = "127.0.0.1",
        cores: Optional[int] = 2,
        netns: Optional[str] = None,
        token_file: Optional[Path] = None,
        wait: bool = True,
        extra: Optional[List[str]] = None,
        root_calls: bool = True,
        env: Optional[Dict[str, str]] = None,
        with_token: bool = True,
    ) -> Proc:
        """Starts ``fleetmap node`` (inside ``netns`` if given) and waits
        until the coordinator logs that it joined. Without ``with_token``
        the node has only the certificate it got when it enrolled."""
        token = ["--token-file", str(token_file or coordinator.token_path)] if with_token else []
        argv = fleetmap_command() + [
            "node",
            "--coordinator",
            f"{host}:{coordinator.port}",
            *token,
            "--ca",
            str(coordinator.ca_path),
            "--name",
            name,
            # Each test node's key and certificate apart from every other's.
            "--state-dir",
            str(self.workdir / "node-identities"),
        ]
        if cores is not None:
            argv += ["--cores", str(cores)]
        if os.geteuid() != 0 or netns is not None:
            # Without root the daemon cannot pin calls and would refuse to
            # start (the tests that need pinning require root themselves);
            # `ip netns exec` mounts a /sys of its own, without the cgroup
            # hierarchy. These nodes test networking, not pinning.
            argv += ["--allow-unisolated"]
        if root_calls and os.geteuid() == 0:
            # Most tests look at what a call can do as the node's root (its
            # cgroup, its devices); test_isolation checks the default.
            argv += ["--allow-root-calls"]
        argv += extra or []
        if netns is not None:
            argv = ["ip", "netns", "exec", netns] + argv
        proc = self.start(f"node-{name}", argv, env=env)
        if wait:
            wait_for(
                lambda: coordinator.joined(name) or not proc.alive(),
                START_TIMEOUT,
                f"node {name} to join",
                self.describe,
            )
            assert proc.alive(), f"node {name} exited:\n{self.describe()}"
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                _signal_group(proc.popen, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # SIGKILL the whole group whatever happened: stray workers too.
            _signal_group(proc.popen, signal.SIGKILL)
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def processes(tmp_path: Path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def module_processes(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("procs"))
    try:
        yield procs
    finally:
        procs.stop_all()


def run_client(
    code: str,
    env: Optional[Dict[str, str]] = None,
    timeout: float = 120,
    cwd: Optional[Path] = None,
    python: Optional[str] = None,
) -> dict:
    """Runs ``code`` in a fresh Python process and returns the JSON object
    it prints on its last stdout line (as ``result``), with ``returncode``,
    ``stdout`` and ``stderr``.

    The code should assign ``RESULT`` (anything JSON can hold)."""
    script = textwrap.dedent(code) + "\nimport json as _j, sys as _s\n_s.stdout.write('\\n' + _j.dumps(RESULT) + '\\n')\n"
    proc = subprocess.run(
        [python or PYTHON, "-c", script],
        env=env if env is not None else dict(os.environ),
        cwd=str(cwd) if cwd else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result = None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        result = json.loads(lines[-1])
    return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "result": result}


def need_privileges(reason: str) -> None:
    """A missing capability: fails under CI=true (where the environment
    promises root and iproute2), skips elsewhere."""
    message = f"{reason} (set up the test machine with root and iproute2)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def check_netns_support() -> None:
    if os.geteuid() != 0:
        need_privileges("network-namespace tests need root")
    if shutil.which("ip") is None:
        need_privileges("network-namespace tests need the `ip` command (iproute2)")
