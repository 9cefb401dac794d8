"""The caller's local code, sent as source.

A *local* module is one of the caller's own files that no node can import
from an environment: neither the standard library nor an installed
distribution (the script's directory, a repository on ``sys.path``, an
editable install's source tree). The top-level package (or module) of
every imported local module is zipped, sources only, and the workers put
the zip first on ``sys.path``, so functions and classes from those modules
travel by reference and are imported there as here: a module holding a
lock at module level works. The zip is content-addressed (a node keeps each
version once) and rebuilt only when a file in it changes.

Code defined in ``__main__`` (a script, ``python -c``, a notebook) still
travels by value with cloudpickle, and so does a local module whose file
does not sit at its name under a ``sys.path`` entry (loaded from a path
with importlib, say).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import zipfile
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

from ._errors import InputError

#: The most bytes of source one job may carry (before compression).
MAX_SOURCE_BYTES = 64 << 20
#: Directories never zipped inside a local package.
_SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", "venv", "node_modules", ".mypy_cache"})


class SourceBundle(NamedTuple):
    digest: str
    zip: bytes
    #: Top-level names the zip holds (modules and packages).
    names: Tuple[str, ...]


#: What _root_of found, by module name and file.
_ROOTS: Dict[Tuple[str, str], Optional[Tuple[str, str]]] = {}


def _root_of(name: str, path: str) -> Optional[Tuple[str, str]]:
    """``(sys.path entry, top-level name)`` under which the module ``name``
    lives at ``path``, if its file sits where its name says."""
    key = (name, path)
    if key not in _ROOTS:
        _ROOTS[key] = _find_root(name, path)
    return _ROOTS[key]


def _find_root(name: str, path: str) -> Optional[Tuple[str, str]]:
    parts = name.split(".")
    real = os.path.realpath(path)
    base = os.path.basename(real)
    if base == "__init__.py":
        tail = os.path.join(*parts, "__init__.py")
    else:
        tail = os.path.join(*parts[:-1], parts[-1] + ".py")
    if not real.endswith(os.sep + tail):
        return None
    return real[: -len(tail) - 1], parts[0]


#: What _package_files listed, by (root, top), with the modification
#: times of the directories it walked (a file added or removed changes its
#: directory's): every job checks those, and walks again only on a change.
_LISTED: Dict[Tuple[str, str], Tuple[Tuple[Tuple[str, int], ...], List[Tuple[str, str]]]] = {}


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _package_files(root: str, top: str) -> List[Tuple[str, str]]:
    """``(archive name, file path)`` of the sources of the top-level module
    or package ``top`` under ``root``."""
    listed = _LISTED.get((root, top))
    if listed is not None and all(_mtime(d) == t for d, t in listed[0]):
        return listed[1]
    single = os.path.join(root, top + ".py")
    if os.path.isfile(single):
        # The root's time too: a package of the same name would replace it.
        _LISTED[(root, top)] = (((root, _mtime(root)),), [(top + ".py", single)])
        return [(top + ".py", single)]
    files = []
    walked = []
    package = os.path.join(root, top)
    for directory, dirs, names in os.walk(package):
        walked.append((directory, _mtime(directory)))
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        for n in sorted(names):
            if n.endswith((".py", ".pyi")):
                path = os.path.join(directory, n)
                files.append((os.path.relpath(path, root), path))
    walked.append((root, _mtime(root)))
    _LISTED[(root, top)] = (tuple(walked), files)
    return files


#: The last bundle, with the files and their (size, mtime) it was made of.
_CACHED: Optional[Tuple[Tuple[Tuple[str, int, int], ...], SourceBundle]] = None


def bundle(local_modules: Dict[str, str]) -> Tuple[Optional[SourceBundle], Set[str]]:
    """The zip of the local modules (name to file), and the names of those
    it cannot hold (they travel by value instead)."""
    global _CACHED
    tops: Dict[str, str] = {}
    by_value: Set[str] = set()
    for name, path in local_modules.items():
        found = _root_of(name, path)
        if found is None:
            by_value.add(name)
            continue
        root, top = found
        if tops.setdefault(top, root) != root:
            by_value.add(name)  # the same top-level name in two places
    if not tops:
        return None, by_value
    files: List[Tuple[str, str]] = []
    for top in sorted(tops):
        files.extend(_package_files(tops[top], top))
    state = []
    for arcname, path in files:
        try:
            st = os.stat(path)
        except OSError:
            continue
        state.append((path, st.st_size, st.st_mtime_ns))
    key = tuple(state)
    if _CACHED is not None and _CACHED[0] == key:
        return _CACHED[1], by_value
    total = sum(size for _, size, _ in state)
    if total > MAX_SOURCE_BYTES:
        largest = sorted(state, key=lambda s: -s[1])[:3]
        raise InputError(
            f"the local code this job needs is {total / (1 << 20):.1f} MiB of source, over the limit of "
            f"{MAX_SOURCE_BYTES >> 20} MiB (the largest files: "
            + ", ".join(f"{p} {s / (1 << 20):.1f} MiB" for p, s, _ in largest)
            + "); install large code as a package, or move data out of the source tree"
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, path in files:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            # A fixed timestamp: the same sources give the same zip and id.
            info = zipfile.ZipInfo(arcname.replace(os.sep, "/"), date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    data = buffer.getvalue()
    result = SourceBundle(hashlib.sha256(data).hexdigest(), data, tuple(sorted(tops)))
    _CACHED = (key, result)
    return result, by_value


def install(path: Optional[str], sources_dir_marker: str = "fleetmap-sources") -> None:
    """In a worker: puts the job's source zip first on ``sys.path`` and
    forgets modules imported from another job's, so that a warm worker
    imports this job's version of the caller's code."""
    import importlib

    stale = [p for p in sys.path if sources_dir_marker in p and p != path]
    for p in stale:
        sys.path.remove(p)
    if stale:
        for name, module in list(sys.modules.items()):
            origin = getattr(module, "__file__", None) or ""
            if any(origin.startswith(p + os.sep) for p in stale):
                del sys.modules[name]
    added = path is not None and path != "" and path not in sys.path
    if path is not None and added:
        sys.path.insert(0, path)
    # Only a changed path needs the finders to look again (a warm worker's
    # next job of the same sources changes nothing).
    if stale or added:
        importlib.invalidate_caches()
