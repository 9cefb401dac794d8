"""A real OCI registry on loopback and images built from this machine's
files, for the tests and benchmarks of ``image=``.

The registry is Debian's ``docker-registry`` (the CNCF distribution
server), started with a configuration in a temporary directory; images are
pushed with the OCI distribution API (blob uploads, manifest PUT) by the
code below. The base image holds the Python interpreter running the tests,
its shared libraries (found with ``ldd``) and its standard library at the
same paths as here, ``/usr/local/bin/python3`` linking to it, and a marker
``/etc/os-release`` of its own.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

REGISTRY_BINARY = "/usr/bin/docker-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

# Parts of the standard library no call needs: left out to keep the image
# small (the interpreter's tests alone are most of it).
_STDLIB_SKIPPED = {
    "test",
    "site-packages",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "unittest",
}


class Registry:
    """``docker-registry`` serving on a free loopback port, its requests
    logged to ``log``."""

    def __init__(self, workdir: Path, user: Optional[Tuple[str, str]] = None) -> None:
        """``user``: ``(name, password)`` the registry requires (htpasswd,
        bcrypt), for every request, pushes included."""
        self.workdir = workdir
        self.user = user
        workdir.mkdir(parents=True, exist_ok=True)
        self.storage = workdir / "storage"
        self.log = workdir / "registry.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        config = workdir / "config.yml"
        auth = ""
        if user is not None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import crypt

            htpasswd = workdir / "htpasswd"
            htpasswd.write_text(f"{user[0]}:{crypt.crypt(user[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}\n")
            auth = f"auth:\n  htpasswd:\n    realm: fleetmap-tests\n    path: {htpasswd}\n"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n" + auth
        )
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config)], stdout=self._log_file, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                break
            except urllib.error.HTTPError as e:
                if e.code == 401:  # up, and asking for credentials
                    break
                raise
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"docker-registry did not start:\n{self.log.read_text()}")
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log_file.close()

    def blob_gets(self) -> int:
        """How many blob downloads the registry has served."""
        text = self.log.read_text(errors="replace")
        return len(re.findall(r'"GET /v2/[^ ]+/blobs/sha256:[0-9a-f]+ HTTP', text))

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob on disk (to corrupt it)."""
        hexdigest = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    # --- the OCI distribution API, pushing side -----------------------

    def _request(self, method: str, url: str, data: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None):
        headers = dict(headers or {})
        if self.user is not None:
            token = base64.b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        return urllib.request.urlopen(req, timeout=60)

    def push_blob(self, repo: str, blob: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        base = f"http://{self.host}/v2/{repo}/blobs"
        try:
            self._request("HEAD", f"{base}/{digest}").close()
            return digest
        except urllib.error.HTTPError:
            pass
        with self._request("POST", f"{base}/uploads/") as r:
            location = r.headers["Location"]
        if location.startswith("/"):
            location = f"http://{self.host}{location}"
        sep = "&" if "?" in location else "?"
        self._request(
            "PUT", f"{location}{sep}digest={digest}", blob, {"Content-Type": "application/octet-stream"}
        ).close()
        return digest

    def push_image(
        self,
        repo: str,
        tag: str,
        layers: List[Tuple[bytes, str]],
        env: Optional[List[str]] = None,
        workdir: Optional[str] = None,
        architecture: str = "amd64",
    ) -> str:
        """Pushes an image of ``layers`` (``(blob, media type)``, lowest
        first) as ``repo:tag``; returns the manifest's digest."""
        descriptors = []
        diff_ids = []
        for blob, media in layers:
            digest = self.push_blob(repo, blob)
            raw = gzip.decompress(blob) if media == LAYER_GZIP else blob
            diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
            descriptors.append({"mediaType": media, "digest": digest, "size": len(blob)})
        config: Dict[str, object] = {
            "architecture": architecture,
            "os": "linux",
            "config": {"Env": env or ["PATH=/usr/local/bin:/usr/bin:/bin"], "WorkingDir": workdir or ""},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config_blob = json.dumps(config).encode()
        config_digest = self.push_blob(repo, config_blob)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_blob)},
            "layers": descriptors,
        }
        body = json.dumps(manifest).encode()
        self._request(
            "PUT", f"http://{self.host}/v2/{repo}/manifests/{tag}", body, {"Content-Type": OCI_MANIFEST}
        ).close()
        return "sha256:" + hashlib.sha256(body).hexdigest()


# --- layers -----------------------------------------------------------------


class LayerBuilder:
    """A tar layer, entry by entry, with names written as given (a test can
    build what a hostile registry would serve)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.GNU_FORMAT)

    def file(self, name: str, content: bytes, mode: int = 0o644) -> "LayerBuilder":
        info = tarfile.TarInfo(name)
        info.size = len(content)
        info.mode = mode
        info.mtime = int(time.time())
        self.tar.addfile(info, io.BytesIO(content))
        return self

    def dir(self, name: str, mode: int = 0o755) -> "LayerBuilder":
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = mode
        self.tar.addfile(info)
        return self

    def symlink(self, name: str, target: str) -> "LayerBuilder":
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        info.mode = 0o777
        self.tar.addfile(info)
        return self

    def host_path(self, path: str, arcname: Optional[str] = None) -> "LayerBuilder":
        """A file, link or directory of this machine, at its own path (or
        ``arcname``), directories recursively, ``__pycache__`` included."""
        self.tar.add(path, arcname=(arcname or path).lstrip("/"), recursive=False)
        p = Path(path)
        if p.is_dir() and not p.is_symlink():
            for child in sorted(p.iterdir()):
                if child.name in _STDLIB_SKIPPED and p.name.startswith("python3"):
                    continue
                self.host_path(str(child), None if arcname is None else f"{arcname}/{child.name}")
        return self

    def blob(self, compress: bool = False) -> Tuple[bytes, str]:
        self.tar.close()
        raw = self.buf.getvalue()
        if compress:
            return gzip.compress(raw, compresslevel=1, mtime=0), LAYER_GZIP
        return raw, LAYER_TAR


def _shared_libraries(binaries: Iterable[str]) -> List[str]:
    """Every shared library ``ldd`` names for ``binaries``, and the loader."""
    found = set()
    for binary in binaries:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"(/\S+)", line.split("=>")[-1])
            if m and os.path.exists(m.group(1)):
                found.add(m.group(1))
    return sorted(found)


def _with_parents(paths: Iterable[str]) -> List[str]:
    """``paths`` and every directory above them, parents first; symbolic
    links along the way (``/lib64``, ``/lib`` on merged-/usr systems) are
    kept as links, with what they point to."""
    out: List[str] = []
    seen = set()

    def add(path: str) -> None:
        if path in seen or path == "/":
            return
        parent = os.path.dirname(path)
        add(parent)
        seen.add(path)
        out.append(path)
        if os.path.islink(path):
            target = os.path.join(parent, os.readlink(path))
            add(os.path.normpath(target))

    for p in paths:
        add(p)
    return out


def python_base_layer(python: str = sys.executable, marker: str = "fleetmap-test-image") -> Tuple[bytes, str]:
    """A layer holding ``python`` (resolved), its standard library and
    shared libraries at their own paths, ``/usr/local/bin/python3`` linking
    to it, and ``/etc/os-release`` saying ``ID=<marker>``."""
    info = json.loads(
        subprocess.check_output(
            [
                python,
                "-c",
                "import json, os, sys, sysconfig; print(json.dumps({'exe': os.path.realpath(sys.executable), "
                "'stdlib': sysconfig.get_paths()['stdlib'], 'dynload': os.path.join(sysconfig.get_paths()['stdlib'], 'lib-dynload')}))",
            ]
        )
    )
    exe = info["exe"]
    dynload = Path(info["dynload"])
    modules = [str(p) for p in dynload.glob("*.so")] if dynload.is_dir() else []
    native = [str(p) for p in Path(__file__).resolve().parents[1].joinpath("fleetmap").glob("_native*.so")]
    libraries = _shared_libraries([exe] + modules + native)
    layer = LayerBuilder()
    for path in _with_parents([exe] + libraries + [os.path.dirname(info["stdlib"])]):
        if path == info["stdlib"] or os.path.isdir(path) and not os.path.islink(path):
            layer.tar.add(path, arcname=path.lstrip("/"), recursive=False)
        else:
            layer.host_path(path)
    layer.host_path(info["stdlib"])
    layer.dir("usr/").dir("usr/local/").dir("usr/local/bin/").dir("etc/").dir("work/")
    layer.symlink("usr/local/bin/python3", exe)
    layer.file("etc/os-release", f"ID={marker}\nNAME=\"fleetmap test image\"\n".encode())
    layer.file("work/hello.txt", b"from the image's working directory\n")
    return layer.blob()
