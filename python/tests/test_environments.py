"""Job environments: ``packages=`` and the caller's environment replicated
onto nodes, built with uv from wheels the tests write into a local folder
(no index: ``UV_NO_INDEX=1``), by real ``fleetmap node`` processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

import fleetmap
from fleetmap import remote_parallel_map

from conftest import IN_CI, run_client
from wheels import build_wheel

UV = os.path.join(os.path.dirname(sys.executable), "uv")

JOB = """
import sys
from fleetmap import remote_parallel_map
def version(x):
    import fmtest_pkg
    return fmtest_pkg.VERSION, sys.executable
RESULT = remote_parallel_map(version, range({n}), packages={packages!r})
"""


def need_uv() -> None:
    if not os.access(UV, os.X_OK):
        message = f"no uv at {UV}: run ./scripts/setup"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    for version in ("1.0", "2.0"):
        build_wheel(folder, "fmtest-pkg", version)
    build_wheel(folder, "fmtest-uses-dep", "1.0", "import fmtest_dep\nDEP = fmtest_dep.VERSION\n", requires=("fmtest-dep",))
    build_wheel(folder, "fmtest-dep", "3.0")
    return folder


def node_env() -> dict:
    # Nothing from an index: every package comes from the test's folder.
    return dict(os.environ, UV_NO_INDEX="1")


@pytest.fixture(scope="module")
def env_cluster(module_processes, wheels, tmp_path_factory):
    need_uv()
    coordinator = module_processes.start_coordinator("127.0.0.1:0", name="env-coordinator")
    cache = tmp_path_factory.mktemp("env-cache")
    node = module_processes.start_node(
        coordinator,
        "env-node",
        cores=2,
        extra=["--cache-dir", str(cache), "--find-links", str(wheels)],
        env=node_env(),
    )
    return coordinator, node, cache


def environments(cache: Path) -> List[str]:
    envs = cache / "envs"
    return sorted(os.listdir(envs)) if envs.is_dir() else []


def test_packages_are_installed_per_version_and_reused(env_cluster):
    coordinator, node, cache = env_cluster
    # The caller does not have the package: only the environment does.
    with pytest.raises(ImportError):
        __import__("fmtest_pkg")

    first = run_client(JOB.format(n=4, packages=["fmtest-pkg==2.0"]), env=coordinator.client_env())
    assert first["returncode"] == 0, first["stderr"] + node.describe()
    assert {v for v, _ in first["result"]} == {"2.0"}
    assert "installing 1 package (fmtest-pkg==2.0)" in first["stderr"], first["stderr"]
    # The calls ran in the environment's interpreter, in the node's cache.
    assert all(exe.startswith(str(cache)) for _, exe in first["result"]), first["result"]

    second = run_client(JOB.format(n=4, packages=["fmtest-pkg==1.0"]), env=coordinator.client_env())
    assert second["returncode"] == 0, second["stderr"] + node.describe()
    assert {v for v, _ in second["result"]} == {"1.0"}
    assert len([e for e in environments(cache) if not e.startswith(".")]) == 2, environments(cache)

    third = run_client(JOB.format(n=4, packages=["fmtest-pkg==2.0"]), env=coordinator.client_env())
    assert third["returncode"] == 0, third["stderr"]
    assert {v for v, _ in third["result"]} == {"2.0"}
    # Nothing was installed again: no progress line, and the node built two
    # environments in all.
    assert "preparing environment" not in third["stderr"], third["stderr"]
    assert node.stderr().count("built environment") == 2, node.stderr()


def test_packages_resolve_their_dependencies(env_cluster):
    coordinator, node, _ = env_cluster
    code = """
    from fleetmap import remote_parallel_map
    def dep(x):
        import fmtest_uses_dep
        return fmtest_uses_dep.DEP
    RESULT = remote_parallel_map(dep, [1], packages=["fmtest-uses-dep"])
    """
    r = run_client(code, env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"] + node.describe()
    assert r["result"] == ["3.0"]


def test_a_requirement_that_cannot_be_installed_fails_the_job_at_once(env_cluster):
    coordinator, _, cache = env_cluster
    before = environments(cache)
    code = """
    import fleetmap
    from fleetmap import remote_parallel_map
    try:
        remote_parallel_map(lambda x: x, range(100), packages=["no-such-package-xyz"], verbose=False)
        RESULT = None
    except fleetmap.EnvironmentSetupError as e:
        RESULT = [type(e).__name__, isinstance(e, fleetmap.FleetmapError), str(e)]
    """
    r = run_client(code, env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"]
    name, is_fleetmap_error, message = r["result"]
    assert name == "EnvironmentSetupError" and is_fleetmap_error
    assert "no-such-package-xyz" in message and "env-node" in message, message
    # uv's own words come with it.
    assert "not found" in message or "No solution" in message, message
    # Nothing half-built stays: no new environment, no build directory.
    assert environments(cache) == before


def test_two_jobs_that_need_the_same_new_environment_share_one_build(env_cluster):
    coordinator, node, _ = env_cluster
    code = """
    import threading
    from fleetmap import remote_parallel_map
    def version(x):
        import fmtest_dep
        return fmtest_dep.VERSION
    out = {}
    def job(i):
        out[i] = remote_parallel_map(version, range(3), packages=["fmtest-dep==3.0"], verbose=False)
    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()
    RESULT = [out[0], out[1]]
    """
    r = run_client(code, env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"] + node.describe()
    assert r["result"] == [["3.0"] * 3, ["3.0"] * 3]
    env_id = _environment_id(["fmtest-dep==3.0"], resolve=True)
    assert node.stderr().count(f"built environment {env_id}") == 1, node.stderr()


def _environment_id(requirements: List[str], resolve: bool) -> str:
    from fleetmap import _scan

    return _scan.environment_id(_scan.python_version(), requirements, resolve)


def _venv(path: Path, *packages: str, wheels: Path) -> Path:
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, str(path)], check=True)
    python = path / "bin" / "python"
    if packages:
        subprocess.run(
            [UV, "pip", "install", "--quiet", "--python", str(python), "--no-index", "--find-links", str(wheels), *packages],
            check=True,
        )
    return python


def test_the_callers_environment_is_replicated_onto_a_node_that_lacks_it(processes, wheels, tmp_path):
    need_uv()
    # The caller: a virtualenv with fmtest-pkg 1.0, and fleetmap (with
    # cloudpickle) reachable through a .pth file, as no distribution.
    caller = _venv(tmp_path / "caller-venv", "fmtest-pkg==1.0", wheels=wheels)
    links = tmp_path / "runtime-links"
    links.mkdir()
    import cloudpickle

    for module in (fleetmap, cloudpickle):
        os.symlink(os.path.dirname(module.__file__), links / module.__name__)
    site = next((tmp_path / "caller-venv" / "lib").glob("python3*/site-packages"))
    (site / "fleetmap_links.pth").write_text(f"{links}\n")
    # The node: another interpreter, without the package.
    node_python = _venv(tmp_path / "node-venv", wheels=wheels)
    coordinator = processes.start_coordinator("127.0.0.1:0")
    cache = tmp_path / "cache"
    node = processes.start_node(
        coordinator,
        "bare-node",
        cores=2,
        extra=[
            "--python", str(node_python),
            "--cache-dir", str(cache),
            "--find-links", str(wheels),
            "--no-caller-python",
        ],
        env=node_env(),
    )
    code = """
    import sys
    from fleetmap import remote_parallel_map
    def version(x):
        import fmtest_pkg
        return fmtest_pkg.VERSION, sys.executable
    RESULT = remote_parallel_map(version, range(3))
    """
    r = run_client(code, env=coordinator.client_env(), python=str(caller))
    assert r["returncode"] == 0, r["stderr"] + node.describe()
    assert {v for v, _ in r["result"]} == {"1.0"}
    assert all(exe.startswith(str(cache)) for _, exe in r["result"]), r["result"]
    # Named as its .dist-info directory names it.
    assert "installing 1 package (fmtest_pkg==1.0)" in r["stderr"], r["stderr"]


def test_a_node_with_the_callers_interpreter_and_packages_builds_nothing(env_cluster):
    coordinator, node, _ = env_cluster
    code = """
    import sys
    from fleetmap import remote_parallel_map
    RESULT = remote_parallel_map(lambda x: sys.executable, range(2), verbose=False)
    """
    built = node.stderr().count("built environment")
    r = run_client(code, env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"]
    assert set(r["result"]) == {os.path.normpath(sys.executable)}
    assert node.stderr().count("built environment") == built


@pytest.mark.parametrize(
    "packages, error",
    [
        ("numpy", TypeError),
        ([""], fleetmap.InputError),
        (["numpy\n-e ."], fleetmap.InputError),
        (["--index-url=http://evil"], fleetmap.InputError),
        (["numpy --index-url http://evil"], fleetmap.InputError),
        (["pkg @ https://evil/${UV_INDEX_URL}"], fleetmap.InputError),
    ],
)
def test_bad_packages_are_refused_before_anything_runs(packages, error):
    with pytest.raises(error):
        remote_parallel_map(lambda x: x, [1], packages=packages)


LOCAL_JOB = """
import os
from fleetmap import remote_parallel_map
import mylib

def use(x):
    from mylib.util import describe
    return describe(x), os.getcwd()

RESULT = remote_parallel_map(use, range(3), verbose=False)
"""


def _write_local_package(project: Path, version: str) -> None:
    (project / "mylib").mkdir(parents=True, exist_ok=True)
    # A lock at module level: pickled by value, this module could not be sent.
    (project / "mylib" / "__init__.py").write_text("import threading\n_LOCK = threading.Lock()\n")
    (project / "mylib" / "util.py").write_text(
        f"from mylib import _LOCK\n\ndef describe(x):\n    with _LOCK:\n        return '{version}:' + str(x)\n"
    )


def test_local_code_travels_as_source_to_a_node_working_elsewhere(env_cluster, tmp_path):
    coordinator, node, _ = env_cluster
    project = tmp_path / "project"
    _write_local_package(project, "v1")
    first = run_client(LOCAL_JOB, env=coordinator.client_env(), cwd=project)
    assert first["returncode"] == 0, first["stderr"] + node.describe()
    assert [d for d, _ in first["result"]] == ["v1:0", "v1:1", "v1:2"]
    # The node's workers do not run in the caller's directory.
    assert all(cwd != str(project) for _, cwd in first["result"]), first["result"]
    # A new version of the same code: warm workers that imported the first
    # one import this one.
    _write_local_package(project, "v2")
    second = run_client(LOCAL_JOB, env=coordinator.client_env(), cwd=project)
    assert second["returncode"] == 0, second["stderr"] + node.describe()
    assert [d for d, _ in second["result"]] == ["v2:0", "v2:1", "v2:2"]


def test_a_source_bundle_is_content_addressed(tmp_path):
    from fleetmap import _sources

    _write_local_package(tmp_path, "v1")
    modules = {"mylib": str(tmp_path / "mylib" / "__init__.py"), "mylib.util": str(tmp_path / "mylib" / "util.py")}
    one, by_value = _sources.bundle(modules)
    assert one is not None and not by_value and one.names == ("mylib",)
    again, _ = _sources.bundle(modules)
    assert again == one
    _write_local_package(tmp_path, "v2")
    os.utime(tmp_path / "mylib" / "util.py", ns=(1, 1))
    changed, _ = _sources.bundle(modules)
    assert changed is not None and changed.digest != one.digest
    # A module whose file does not sit at its name travels by value.
    _, by_value = _sources.bundle({"renamed": str(tmp_path / "mylib" / "util.py")})
    assert by_value == {"renamed"}


def test_a_daemon_killed_mid_build_leaves_nothing_and_the_next_job_builds_cleanly(processes, wheels, tmp_path):
    import signal
    import socket

    from conftest import wait_for

    need_uv()
    # An index that accepts connections and never answers: the build hangs
    # in the installer until the daemon is killed.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    index = f"http://127.0.0.1:{silent.getsockname()[1]}/simple"
    coordinator = processes.start_coordinator("127.0.0.1:0")
    cache = tmp_path / "cache"
    node = processes.start_node(
        coordinator, "doomed-node", cores=2, extra=["--cache-dir", str(cache), "--index-url", index]
    )
    client = processes.start(
        "client",
        [sys.executable, "-c", JOB.format(n=2, packages=["fmtest-pkg==2.0"])],
        env=coordinator.client_env(),
    )
    envs = cache / "envs"
    wait_for(
        lambda: envs.is_dir() and any(e.startswith(".build-") for e in os.listdir(envs)),
        30,
        "the build to start",
        lambda: node.describe() + client.describe(),
    )

    def installers() -> List[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if entry.name.isdigit() and str(cache).encode() in cmdline and b"install" in cmdline:
                found.append(int(entry.name))
        return found

    wait_for(lambda: installers(), 30, "the installer to start", node.describe)
    if os.geteuid() == 0:
        # The installer runs in a cgroup of the node's own, not the daemon's.
        cgroups = Path(f"/proc/{installers()[0]}/cgroup").read_text()
        assert "/fleetmap-doomed-node/build" in cgroups, cgroups
    os.killpg(node.popen.pid, signal.SIGKILL)
    node.popen.wait(timeout=10)
    silent.close()
    assert [e for e in os.listdir(envs) if not e.startswith(".")] == [], "nothing was renamed into place"
    # The restarted daemon removes the dead one's build, and the next job
    # (now from the folder of wheels) builds the environment whole.
    restarted = processes.start_node(
        coordinator,
        "doomed-node",
        cores=2,
        extra=["--cache-dir", str(cache), "--find-links", str(wheels)],
        env=node_env(),
        wait=False,
    )
    wait_for(
        lambda: coordinator.proc.stderr().count("node doomed-node joined") >= 2,
        30,
        "the restarted node to join",
        restarted.describe,
    )
    assert not any(e.startswith(".build-") for e in os.listdir(envs)), os.listdir(envs)
    r = run_client(JOB.format(n=2, packages=["fmtest-pkg==2.0"]), env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"] + restarted.describe()
    assert {v for v, _ in r["result"]} == {"2.0"}
    assert "built environment" in restarted.stderr()


def test_a_node_prepares_environments_before_any_job(processes, wheels, tmp_path):
    from conftest import wait_for

    need_uv()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# what the lab's jobs use\nfmtest-pkg==1.0\n")
    coordinator = processes.start_coordinator("127.0.0.1:0")
    node = processes.start_node(
        coordinator,
        "ready-node",
        cores=2,
        extra=["--cache-dir", str(tmp_path / "cache"), "--find-links", str(wheels), "--prepare", str(requirements)],
        env=node_env(),
    )
    wait_for(lambda: "prepared at" in node.stderr(), 30, "the environment to be prepared", node.describe)
    r = run_client(JOB.format(n=2, packages=["fmtest-pkg==1.0"]), env=coordinator.client_env())
    assert r["returncode"] == 0, r["stderr"] + node.describe()
    assert {v for v, _ in r["result"]} == {"1.0"}
    assert "preparing environment" not in r["stderr"], r["stderr"]
    assert node.stderr().count("built environment") == 1, node.stderr()


def test_an_environment_on_a_node_with_the_callers_interpreter_adds_only_what_it_lacks(env_cluster, wheels, tmp_path):
    coordinator, node, cache = env_cluster
    # The caller sees one distribution more than its interpreter has on the
    # node: fmtest-pkg 2.0, installed into a directory on its PYTHONPATH.
    extra = tmp_path / "extra-site"
    subprocess.run(
        [UV, "pip", "install", "--quiet", "--target", str(extra), "--no-index", "--find-links", str(wheels), "fmtest-pkg==2.0"],
        check=True,
    )
    env = dict(coordinator.client_env(), PYTHONPATH=str(extra))
    code = """
    import sys
    from fleetmap import remote_parallel_map
    def version(x):
        import fmtest_pkg
        return fmtest_pkg.VERSION, sys.executable
    RESULT = remote_parallel_map(version, range(2))
    """
    r = run_client(code, env=env)
    assert r["returncode"] == 0, r["stderr"] + node.describe()
    assert {v for v, _ in r["result"]} == {"2.0"}
    assert all(exe.startswith(str(cache)) for _, exe in r["result"]), r["result"]
    # Layered on the caller's interpreter: only the missing package was
    # installed, not the dozens the interpreter already has.
    assert "installing 1 package (fmtest_pkg==2.0)" in r["stderr"], r["stderr"]
