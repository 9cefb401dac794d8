"""What an interpreter has installed, read without importing any of it.

The caller scans its own ``sys.path`` to describe the environment its calls
need (a manifest of requirement strings, hashed into an environment id);
a node daemon runs this same file with another interpreter
(``python -I -c SOURCE``) to learn what that interpreter already has. The
file uses the standard library only, so it runs on any interpreter.

What the manifest holds, per installed distribution (first on ``sys.path``
wins, as for imports):

- an install from an index: ``name==version``;
- a VCS install (PEP 610 ``direct_url.json``): ``name @ git+URL@COMMIT``;
- an install from an http(s) archive URL: ``name @ URL``;
- an editable install: nothing (its source is the caller's own code);
- fleetmap itself, and the packaging tools ``pip``, ``setuptools``,
  ``wheel``, ``uv`` and ``distribute``: nothing (the node brings its own);
- anything under ``/usr/lib/python3``: nothing (the distribution's own
  packages, such as Debian's ``python3-apt``, which no index serves).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from typing import Dict, Iterable, List, Optional, Tuple

#: Distributions the nodes never install from a caller's manifest.
EXCLUDED = frozenset({"fleetmap", "pip", "setuptools", "wheel", "uv", "distribute"})
#: Directories whose distributions belong to the operating system.
SYSTEM_PREFIXES = ("/usr/lib/python3/", "/usr/lib/python3.")

_NORMALIZE = re.compile(r"[-_.]+")


def normalize(name: str) -> str:
    """A project name as PEP 503 compares it."""
    return _NORMALIZE.sub("-", name).lower()


def _metadata_field(path: str, fields: Tuple[str, ...]) -> Dict[str, str]:
    """The first value of each of ``fields`` in an RFC 822 metadata file."""
    found: Dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the headers end at the first blank line
                key, _, value = line.partition(":")
                if key in fields and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    return found


def _name_version(directory: str, entry: str) -> Optional[Tuple[str, str]]:
    """``(name, version)`` of the distribution whose metadata is ``entry``."""
    stem, _, suffix = entry.rpartition(".")
    if suffix == "dist-info":
        name, sep, version = stem.rpartition("-")
        if sep and name and version:
            return name, version
        meta = os.path.join(directory, entry, "METADATA")
    else:  # egg-info: NAME-VERSION-pyX.Y.egg-info, or NAME.egg-info
        parts = stem.split("-")
        if len(parts) >= 2 and parts[1][:1].isdigit():
            return parts[0], parts[1]
        meta = os.path.join(directory, entry)
        if os.path.isdir(meta):
            meta = os.path.join(meta, "PKG-INFO")
    fields = _metadata_field(meta, ("Name", "Version"))
    if "Name" in fields and "Version" in fields:
        return fields["Name"], fields["Version"]
    return None


def _direct_requirement(name: str, version: str, direct_url: str) -> Optional[str]:
    """The requirement for a PEP 610 direct install; ``None`` for an
    editable one (its source is local code)."""
    try:
        with open(direct_url, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return f"{name}=={version}"
    url = info.get("url", "")
    if info.get("dir_info", {}).get("editable"):
        return None
    vcs = info.get("vcs_info")
    if isinstance(vcs, dict) and vcs.get("vcs") and url:
        requirement = f"{name} @ {vcs['vcs']}+{url}@{vcs.get('commit_id') or vcs.get('requested_revision', '')}"
        subdirectory = info.get("subdirectory")
        return requirement + (f"#subdirectory={subdirectory}" if subdirectory else "")
    if "archive_info" in info and url.startswith(("http://", "https://")):
        return f"{name} @ {url}"
    # A local archive or directory: the nodes cannot reach the caller's
    # files, so they look for the same version on their indexes.
    return f"{name}=={version}"


def distributions(path: Iterable[str]) -> Dict[str, Tuple[str, str, Optional[str]]]:
    """Every distribution installed on ``path``, by normalized name:
    ``(name, version, requirement)``, where the requirement is what a node
    installs to have the same (``None``: nothing to install)."""
    found: Dict[str, Tuple[str, str, Optional[str]]] = {}
    for directory in path:
        if not directory or not os.path.isdir(directory):
            continue
        system = os.path.join(os.path.realpath(directory), "").startswith(SYSTEM_PREFIXES)
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries:
            if not entry.endswith((".dist-info", ".egg-info")):
                continue
            parsed = _name_version(directory, entry)
            if parsed is None:
                continue
            name, version = parsed
            key = normalize(name)
            if key in found:
                continue  # shadowed by an earlier entry of the path
            requirement: Optional[str] = f"{name}=={version}"
            if system or key in EXCLUDED:
                requirement = None
            elif entry.endswith(".dist-info"):
                direct_url = os.path.join(directory, entry, "direct_url.json")
                if os.path.exists(direct_url):
                    requirement = _direct_requirement(name, version, direct_url)
            found[key] = (name, version, requirement)
    return found


def manifest(found: Dict[str, Tuple[str, str, Optional[str]]]) -> List[str]:
    """The requirement strings a node installs, sorted by name."""
    return [req for _key, (_n, _v, req) in sorted(found.items()) if req is not None]


def environment_id(python: str, requirements: Iterable[str], resolve: bool) -> str:
    """The id of an environment: a hash of the Python ``major.minor``, how
    its requirements are taken (a whole replicated manifest, or a
    ``packages=`` list whose dependencies are resolved) and the requirements."""
    digest = hashlib.sha256()
    digest.update(f"fleetmap-environment 1\npython {python}\nresolve {int(resolve)}\n".encode())
    for requirement in requirements:
        digest.update(requirement.encode() + b"\n")
    return digest.hexdigest()[:32]


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def describe() -> Dict[str, object]:
    """What a node learns about one of its interpreters."""
    import site
    import sysconfig

    found = distributions(sys.path)
    site_dirs: List[str] = []
    for key in ("purelib", "platlib"):
        d = sysconfig.get_paths().get(key)
        if d and d not in site_dirs and os.path.isdir(d):
            site_dirs.append(d)
    try:
        for d in site.getsitepackages():
            if d not in site_dirs and os.path.isdir(d):
                site_dirs.append(d)
    except AttributeError:
        pass
    python = python_version()
    return {
        "python": python,
        "executable": sys.executable,
        "prefix": sys.prefix,
        "base_executable": getattr(sys, "_base_executable", sys.executable),
        "site_dirs": site_dirs,
        "distributions": {key: version for key, (_n, version, _r) in found.items()},
        "environment_id": environment_id(python, manifest(found), resolve=False),
    }


if __name__ == "__main__":
    json.dump(describe(), sys.stdout)
