"""``image=``: calls run with an OCI image's file system as their root.

A real registry (Debian's ``docker-registry``) serves on loopback, plain
HTTP, marked insecure for the nodes; the images are built by ``images.py``
from this machine's own Python and pushed with the distribution API. Jobs
run through real daemons (the embedded cluster of a fresh client process,
or ``fleetmap node`` processes), as root: a worker's root is made with
mount namespaces, overlayfs and ``pivot_root``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import sys
import uuid
from pathlib import Path

import pytest

import fleetmap
from fleetmap import remote_parallel_map

from conftest import need_privileges, run_client, wait_for
from oci import LayerBuilder, Registry, python_base_layer
from wheels import build_wheel

HOST_OS_RELEASE = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    if os.geteuid() != 0:
        need_privileges("image= needs root on the node (mount namespaces)")
    if not Path("/usr/bin/docker-registry").exists():
        need_privileges("Debian's docker-registry is not installed (scripts/setup installs it)")
    reg = Registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def base(registry):
    """The base layer (this machine's Python), pushed once as fleet/py:base."""
    layer = python_base_layer()
    registry.push_image("fleet/py", "base", [layer], env=["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=from-image"], workdir="/work")
    return layer


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("node-cache")


def client_env(registry: Registry, cache: Path) -> dict:
    env = dict(os.environ)
    env["FLEETMAP_INSECURE_REGISTRIES"] = registry.host
    env["FLEETMAP_CACHE_DIR"] = str(cache)
    env.pop("FLEETMAP_COORDINATOR", None)
    return env


def run_in_image(registry: Registry, cache: Path, image: str, body: str, inputs: str = "range(8)") -> dict:
    code = f"""
import fleetmap
from fleetmap import remote_parallel_map

def call(x):
{body}

try:
    RESULT = {{"outputs": remote_parallel_map(call, {inputs}, image={image!r}, verbose=False)}}
except fleetmap.ImageError as e:
    RESULT = {{"image_error": str(e)}}
"""
    r = run_client(code, env=client_env(registry, cache), timeout=180)
    assert r["returncode"] == 0, r["stderr"]
    return r["result"]


def images_in(cache: Path) -> dict:
    """Unpacked images in a node's cache, by directory name."""
    root = cache / "images"
    return {d.name: d for d in root.iterdir() if (d / "image.json").exists()} if root.is_dir() else {}


SEES = """
    import os, sys
    return (
        x * x,
        open("/etc/os-release").read(),
        os.environ.get("GREETING"),
        os.getcwd(),
        open("hello.txt").read().strip(),
        sys.executable,
    )
"""


def test_a_job_runs_in_the_image_and_a_second_one_pulls_nothing(registry, base, cache):
    image = f"{registry.host}/fleet/py:base"
    result = run_in_image(registry, cache, image, SEES, "range(20)")
    outputs = result["outputs"]
    assert [o[0] for o in outputs] == [x * x for x in range(20)], "outputs right and in order"
    for _, os_release, greeting, cwd, hello, executable in outputs:
        assert "ID=fleetmap-test-image" in os_release and os_release != HOST_OS_RELEASE
        assert greeting == "from-image", "the image's Env"
        assert cwd == "/work" and hello == "from the image's working directory", "the image's WorkingDir"
        assert executable == "/usr/local/bin/python3", "the image's own interpreter"
    pulled = registry.blob_gets()
    assert pulled >= 2, "the config and the layer came from the registry"
    # A new daemon on the same cache: the image is found on disk.
    again = run_in_image(registry, cache, image, SEES, "range(3)")
    assert [o[0] for o in again["outputs"]] == [0, 1, 4]
    assert registry.blob_gets() == pulled, "the second job pulled no blob"


def marker_image(registry: Registry, base, tag: str, text: str) -> str:
    layer = LayerBuilder().dir("etc/").file("etc/marker", text.encode()).blob(compress=True)
    return registry.push_image("fleet/py", tag, [base, layer], workdir="/work")


def test_a_moved_tag_gives_the_next_job_the_new_image(registry, base, cache):
    image = f"{registry.host}/fleet/py:moving"
    first_digest = marker_image(registry, base, "moving", "first")
    read = "    return open('/etc/marker').read()"
    assert run_in_image(registry, cache, image, read, "[0]")["outputs"] == ["first"]
    second_digest = marker_image(registry, base, "moving", "second")
    assert second_digest != first_digest
    assert run_in_image(registry, cache, image, read, "[0]")["outputs"] == ["second"]
    cached = images_in(cache)
    first = cached[first_digest.replace(":", "-")]
    assert (first / "rootfs/etc/marker").read_text() == "first", "the first image's cache stays intact"
    assert second_digest.replace(":", "-") in cached


def test_whiteouts_hide_the_files_of_lower_layers(registry, base, cache):
    lower = LayerBuilder().dir("data/").file("data/gone", b"x").file("data/kept", b"k").dir("opq/").file("opq/old", b"o").blob()
    upper = (
        LayerBuilder()
        .dir("data/")
        .file("data/.wh.gone", b"")
        .dir("opq/")
        .file("opq/.wh..wh..opq", b"")
        .file("opq/new", b"n")
        .blob(compress=True)
    )
    registry.push_image("fleet/py", "whiteouts", [base, lower, upper])
    body = "    import os\n    return sorted(os.listdir('/data')), sorted(os.listdir('/opq'))"
    outputs = run_in_image(registry, cache, f"{registry.host}/fleet/py:whiteouts", body, "[0]")["outputs"]
    assert outputs == [[["kept"], ["new"]]]


def test_a_layer_escaping_the_root_is_refused_and_writes_nothing_outside(registry, base, cache):
    name = f"fleetmap-escape-{uuid.uuid4().hex}"
    evil = LayerBuilder().file(f"../../../../../tmp/{name}", b"escaped").blob()
    registry.push_image("fleet/py", "dotdot", [base, evil])
    result = run_in_image(registry, cache, f"{registry.host}/fleet/py:dotdot", "    return 1", "[0]")
    assert "leads out of the image's root" in result["image_error"], result
    assert "fleet/py:dotdot" in result["image_error"], "the error names the image"
    assert not Path(f"/tmp/{name}").exists()
    # Through an absolute link: followed as if the image's root were `/`.
    through = LayerBuilder().symlink("evil", "/tmp").file(f"evil/{name}", b"escaped").blob()
    digest = registry.push_image("fleet/py", "symlink", [base, through])
    body = f"    import os\n    return os.path.exists('/tmp/{name}')"
    outputs = run_in_image(registry, cache, f"{registry.host}/fleet/py:symlink", body, "[0]")["outputs"]
    assert outputs == [False], "a slot's /tmp is its own"
    assert not Path(f"/tmp/{name}").exists(), "nothing written outside the image's root"
    unpacked = images_in(cache)[digest.replace(":", "-")] / "rootfs/tmp" / name
    assert unpacked.read_text() == "escaped", "the entry landed inside the image"


def test_a_corrupted_blob_is_refused(registry, base, cache):
    content = uuid.uuid4().hex.encode() * 64
    layer = LayerBuilder().file("corrupt-me", content).blob()
    digest = registry.push_image("fleet/py", "corrupt", [base, layer])
    stored = registry.blob_path("sha256:" + hashlib.sha256(layer[0]).hexdigest())
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    result = run_in_image(registry, cache, f"{registry.host}/fleet/py:corrupt", "    return 1", "[0]")
    assert "image_error" in result, result
    assert "digest" in result["image_error"].lower(), result["image_error"]
    assert digest.replace(":", "-") not in images_in(cache), "nothing of it is cached"
    assert not [p.name for p in (cache / "images").iterdir() if p.name.startswith(".tmp-")], "nor left half-unpacked"


def test_an_image_with_another_python_minor_is_refused_before_any_input_runs(registry, cache):
    layer = (
        LayerBuilder()
        .dir("usr/")
        .dir("usr/bin/")
        .file("usr/bin/python3.9", b"#!/bin/false\n", mode=0o755)
        .symlink("usr/bin/python3", "python3.9")
        .blob()
    )
    registry.push_image("fleet/old-python", "1", [layer])
    result = run_in_image(registry, cache, f"{registry.host}/fleet/old-python:1", "    return 1")
    message = result["image_error"]
    assert "Python 3.9" in message and f"Python {sys.version_info.major}.{sys.version_info.minor}" in message, message


def test_unknown_images_and_unreachable_registries_are_image_errors(registry, cache):
    result = run_in_image(registry, cache, f"{registry.host}/fleet/py:no-such-tag", "    return 1", "[0]")
    assert "no-such-tag" in result["image_error"] and "unknown" in result["image_error"].lower(), result
    # Nothing listens on the discard port.
    result = run_in_image(registry, cache, "127.0.0.1:9/fleet/py:1", "    return 1", "[0]")
    assert "127.0.0.1:9" in result["image_error"], result


def test_a_registry_asking_for_credentials_gets_the_nodes_own(base, cache, tmp_path):
    locked = Registry(tmp_path / "locked", user=("alice", "s3cret"))
    try:
        locked.push_image("lab/py", "1", [base], workdir="/work")
        image = f"{locked.host}/lab/py:1"
        # Without credentials, and with the wrong ones: refused by the registry.
        result = run_in_image(locked, cache, image, "    return 1", "[0]")
        message = result["image_error"]
        assert "lab/py:1" in message and "Not authorized" in message and "--registry-auth" in message, message
        auth = tmp_path / "registry-auth.json"
        for password, works in (("wrong", False), ("s3cret", True)):
            token = base64.b64encode(f"alice:{password}".encode()).decode()
            auth.write_text(json.dumps({"auths": {locked.host: {"auth": token}}}))
            env = client_env(locked, cache)
            env["FLEETMAP_REGISTRY_AUTH"] = str(auth)
            code = f"""
import fleetmap
try:
    RESULT = fleetmap.remote_parallel_map(abs, [-2], image={image!r}, verbose=False)
except fleetmap.ImageError as e:
    RESULT = str(e)
"""
            r = run_client(code, env=env, timeout=180)
            assert r["returncode"] == 0, r["stderr"]
            if works:
                assert r["result"] == [2], r["result"]
            else:
                assert isinstance(r["result"], str) and "lab/py:1" in r["result"], r["result"]
                assert f"the credentials for {locked.host} in {auth} were refused" in r["result"], r["result"]
    finally:
        locked.stop()


ROOTLESS_JOB = """
import os, sys
from fleetmap import remote_parallel_map

def call(x):
    import os
    try:
        open("/etc/os-release", "a").close()
        writable = "yes"
    except OSError:
        writable = "no"
    return x * 2, open("/etc/os-release").read(), os.getuid(), os.getcwd(), writable

print("RESULT", repr(remote_parallel_map(call, [1, 2, 3], image=sys.argv[1], verbose=False)))
"""


def test_a_caller_that_is_not_root_runs_images_in_a_user_namespace(registry, base):
    """The embedded cluster of an unprivileged user (a laptop): each worker
    enters its image in a user namespace of its own."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    system_python = Path(f"/usr/bin/python{version}")
    if not system_python.exists():
        need_privileges(f"no system Python {version} that an unprivileged user can run")
    import pwd
    import subprocess
    import tempfile

    nobody = pwd.getpwnam("nobody")
    home = Path(tempfile.mkdtemp(prefix="fleetmap-rootless-", dir="/tmp"))
    try:
        home.chmod(0o777)
        (home / "job.py").write_text(ROOTLESS_JOB)
        import cloudpickle

        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "FLEETMAP_CACHE_DIR": str(home / "cache"),
            "FLEETMAP_INSECURE_REGISTRIES": registry.host,
            # fleetmap from the source tree, cloudpickle from the test
            # environment: both readable by any user.
            "PYTHONPATH": f"{Path(fleetmap.__file__).parent.parent}:{Path(cloudpickle.__file__).parent.parent}",
        }

        def drop() -> None:
            os.setgid(nobody.pw_gid)
            os.setgroups([])
            os.setuid(nobody.pw_uid)

        proc = subprocess.run(
            [str(system_python), str(home / "job.py"), f"{registry.host}/fleet/py:base"],
            env=env,
            preexec_fn=drop,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr
        line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
        import ast

        outputs = ast.literal_eval(line[len("RESULT ") :])
        assert [o[0] for o in outputs] == [2, 4, 6]
        for _, os_release, uid, cwd, writable in outputs:
            assert "fleetmap-test-image" in os_release and cwd == "/work"
            assert uid == nobody.pw_uid, "the caller's own user inside the image"
            assert writable == "yes", "into the worker's own writable layer"
        unpacked = [p for p in (home / "cache" / "images").iterdir() if (p / "image.json").exists()]
        assert unpacked and all(p.stat().st_uid == nobody.pw_uid for p in unpacked), "unpacked by the caller"
        assert "fleetmap-test-image" not in Path("/etc/os-release").read_text(), "the host's file is untouched"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_image_arguments_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="OCI image reference"):
        remote_parallel_map(abs, [1], image="not an image!")
    with pytest.raises(fleetmap.InputError, match="not a requirement"):
        remote_parallel_map(abs, [1], image="registry.lab/py:1", packages=["six --index-url=http://elsewhere"])


PACKAGES_JOB = """
import json, os, fleetmap
from fleetmap import remote_parallel_map

def call(x):
    import fm_image_extra, fm_image_dep, fm_image_has
    return fm_image_extra.VERSION, fm_image_dep.VERSION, fm_image_has.__file__, open("/etc/os-release").read()

RESULT = remote_parallel_map(call, [0, 1], image=IMAGE, packages=["fm-image-extra==1.0", "fm-image-has==1.0"], verbose=False)
"""


def test_packages_are_installed_for_the_image_except_what_it_has(registry, base, cache, tmp_path):
    wheels = tmp_path / "wheels"
    build_wheel(wheels, "fm-image-extra", "1.0", requires=("fm-image-dep",))
    build_wheel(wheels, "fm-image-dep", "2.0")
    build_wheel(wheels, "fm-image-has", "1.0", source="FROM = 'wheel'\n")
    # The image has fm-image-has 1.0 already, in its interpreter's own
    # site-packages (the base layer leaves that directory out).
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    site = os.path.join(sys.base_prefix, "lib", f"python{version}", "site-packages").lstrip("/")
    layer = LayerBuilder().dir(site + "/").dir(f"{site}/fm_image_has/")
    layer.file(f"{site}/fm_image_has/__init__.py", b"VERSION = '1.0'\nFROM = 'image'\n")
    layer.dir(f"{site}/fm_image_has-1.0.dist-info/")
    layer.file(f"{site}/fm_image_has-1.0.dist-info/METADATA", b"Metadata-Version: 2.1\nName: fm-image-has\nVersion: 1.0\n")
    registry.push_image("fleet/py", "with-has", [base, layer.blob()], workdir="/work")
    env = client_env(registry, cache)
    env.update(UV_FIND_LINKS=str(wheels), UV_NO_INDEX="1")
    image = f"{registry.host}/fleet/py:with-has"
    r = run_client(f"IMAGE = {image!r}\n" + PACKAGES_JOB, env=env, timeout=180)
    assert r["returncode"] == 0, r["stderr"]
    for extra, dep, has_file, os_release in r["result"]:
        assert (extra, dep) == ("1.0", "2.0"), "the job's packages and their dependencies, installed for the image"
        assert has_file == "/" + site + "/fm_image_has/__init__.py", "the image's own copy, not reinstalled"
        assert "fleetmap-test-image" in os_release
    records = [json.loads(p.read_text()) for p in (cache / "envs").glob("*/fleetmap-environment.json")]
    assert [rec["installed"] for rec in records if rec.get("image")] == [["fm-image-extra==1.0"]], records
    assert all(rec.get("image") for rec in records), "nothing was built for the node's own interpreter"
    assert "installing 1 package (fm-image-extra==1.0)" in r["stderr"], r["stderr"]
    missing = run_client(
        f"IMAGE = {image!r}\n"
        "import fleetmap\n"
        "try:\n"
        "    fleetmap.remote_parallel_map(abs, [1], image=IMAGE, packages=['fm-image-missing==9'], verbose=False)\n"
        "    RESULT = 'no error'\n"
        "except fleetmap.EnvironmentSetupError as e:\n"
        "    RESULT = str(e)\n",
        env=env,
        timeout=180,
    )
    assert "fm-image-missing" in missing["result"] and "image" in missing["result"], missing


# --- isolation inside an image, through a `fleetmap node` process -----------

GPU_MINORS = (200, 201)  # never a real GPU's minor


@pytest.fixture
def fake_gpus():
    """Two fake NVIDIA devices in the host's /dev (char 195:200 and
    195:201), removed afterwards."""
    made = []
    for minor in GPU_MINORS:
        path = Path(f"/dev/nvidia{minor}")
        if not path.exists():
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(195, minor))
            made.append(path)
    yield
    for path in made:
        path.unlink()


ISOLATION_JOB = """
import fleetmap
from fleetmap import remote_parallel_map

def probe(x):
    import errno, os, time
    own = int(os.environ["CUDA_VISIBLE_DEVICES"])
    other = 401 - own
    seen = sorted(n for n in os.listdir("/dev") if n.startswith("nvidia"))
    def try_open(path):
        try:
            os.close(os.open(path, os.O_RDWR))
            return "opened"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    # The other GPU made by hand inside the slot: the device rules refuse
    # making it (or, where making is allowed, opening it).
    try:
        os.mknod("/dev/shm/other", 0o666 | 0o020000, os.makedev(195, other))
        other_result = try_open("/dev/shm/other")
    except OSError as e:
        other_result = errno.errorcode.get(e.errno, str(e.errno))
    time.sleep(0.5)
    return {
        "own": own, "seen": seen, "open_own": try_open(f"/dev/nvidia{own}"),
        "open_other": other_result, "cores": sorted(os.sched_getaffinity(0)),
        "os": open("/etc/os-release").read(),
    }

def hog(x):
    blocks = []
    while True:
        blocks.append(bytearray(64 << 20))

gpu = remote_parallel_map(probe, [0, 1], func_gpu=1, image=IMAGE, verbose=False)
try:
    remote_parallel_map(hog, [0], func_ram=0.25, image=IMAGE, verbose=False)
    oom = "no error"
except fleetmap.OutOfMemory as e:
    oom = str(e)
RESULT = {"gpu": gpu, "oom": oom}
"""


def test_calls_in_an_image_keep_their_cores_memory_limit_and_gpus(registry, base, processes, tmp_path, fake_gpus):
    cache = tmp_path / "cache"
    coordinator = processes.start_coordinator()
    node = processes.start_node(
        coordinator,
        "image-node",
        cores=2,
        extra=["--gpus", ",".join(map(str, GPU_MINORS)), "--insecure-registry", registry.host, "--cache-dir", str(cache)],
    )
    image = f"{registry.host}/fleet/py:base"
    env = coordinator.client_env()
    r = run_client(f"IMAGE = {image!r}\n" + ISOLATION_JOB, env=env, timeout=180)
    assert r["returncode"] == 0, r["stderr"] + node.describe()
    gpu = r["result"]["gpu"]
    assert {g["own"] for g in gpu} == set(GPU_MINORS), "the two calls ran on different GPUs"
    assert all(len(g["cores"]) == 1 for g in gpu) and gpu[0]["cores"] != gpu[1]["cores"], "one core each"
    for g in gpu:
        assert "fleetmap-test-image" in g["os"]
        assert g["seen"] == [f"nvidia{g['own']}"], "only its own GPU is in the image's /dev"
        assert g["open_own"] in ("ENXIO", "opened"), g
        assert g["open_other"] == "EPERM", g
    assert "func_ram" in r["result"]["oom"], r["result"]["oom"]
    # Nothing is left on the host: no mount of the image, no worker once
    # the daemon stops.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(cache) not in mounts
    processes.stop_all()
    wait_for(lambda: not _workers_of("image-node"), 10, "the node's workers to exit")


def _workers_of(node: str) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"FLEETMAP_NODE={node}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(entry.name)
            except OSError:
                pass
    return found
