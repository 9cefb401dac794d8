"""The environment a job's calls need: the caller's own, replicated, or the
``packages=`` list. Nodes build each environment id once and share it."""

from __future__ import annotations

import os
import sys
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

from . import _scan
from ._errors import InputError

#: The most requirements a ``packages=`` list may hold, and the longest one.
MAX_PACKAGES = 2000
MAX_REQUIREMENT_CHARS = 2000


class Environment(NamedTuple):
    """What a node installs for a job: ``requirements`` as pip takes them;
    ``resolve`` says whether their dependencies are resolved (a
    ``packages=`` list) or the list is already a whole environment (a
    replicated one)."""

    id: str
    requirements: List[str]
    resolve: bool


#: The caller's environment, and the state of ``sys.path`` it was read from.
_CACHED: Optional[Tuple[Tuple[Tuple[str, int], ...], Environment]] = None


def _path_state() -> Tuple[Tuple[str, int], ...]:
    """``sys.path`` with each entry's modification time: installing or
    removing a distribution changes its directory's."""
    state = []
    for entry in sys.path:
        try:
            mtime = os.stat(entry or ".").st_mtime_ns
        except OSError:
            mtime = -1
        state.append((entry, mtime))
    return tuple(state)


def caller_environment() -> Environment:
    """The caller's installed distributions as a manifest, scanned once and
    again only when ``sys.path`` or what is installed on it changes."""
    global _CACHED
    state = _path_state()
    if _CACHED is not None and _CACHED[0] == state:
        return _CACHED[1]
    requirements = _scan.manifest(_scan.distributions(sys.path))
    environment = Environment(_scan.environment_id(_scan.python_version(), requirements, False), requirements, False)
    _CACHED = (state, environment)
    return environment


def packages_environment(packages: Any) -> Environment:
    """The environment of a ``packages=`` argument (requirement strings as
    pip takes them), checked."""
    if isinstance(packages, (str, bytes)) or not isinstance(packages, Sequence):
        raise TypeError(
            f"packages must be a list of requirement strings like ['numpy==2.3.1'], got {type(packages).__name__}"
        )
    if len(packages) > MAX_PACKAGES:
        raise ValueError(f"packages holds {len(packages)} requirements, over the limit of {MAX_PACKAGES}")
    requirements: List[str] = []
    for i, item in enumerate(packages):
        if not isinstance(item, str) or not item.strip():
            raise InputError(f"packages[{i}] must be a requirement string like 'numpy==2.3.1', got {item!r}")
        text = item.strip()
        option = text.startswith("-") or any(word.startswith("-") for word in text.split()[1:])
        if (
            len(text) > MAX_REQUIREMENT_CHARS
            or option
            or any(c in text for c in "\n\r\0")
            or text.endswith("\\")
            or "${" in text
        ):
            raise InputError(
                f"packages[{i}] = {item!r} is not a requirement: give one per item, without options, "
                f"line breaks or ${{...}}, at most {MAX_REQUIREMENT_CHARS} characters"
            )
        if text not in requirements:
            requirements.append(text)
    return Environment(_scan.environment_id(_scan.python_version(), requirements, True), requirements, True)


def job_environment(packages: Any, embedded: bool) -> Optional[Environment]:
    """The environment a job asks for: the ``packages=`` list when given;
    else the caller's, except on the embedded cluster, whose calls run in
    the caller's own interpreter."""
    if packages is not None:
        return packages_environment(packages)
    if embedded:
        return None
    return caller_environment()


def runtime_packages() -> List[str]:
    """The package directories of fleetmap's worker runtime (fleetmap with
    its native module, and cloudpickle): a node daemon puts them on the
    path of every environment it builds."""
    import cloudpickle

    import fleetmap

    return [os.path.dirname(os.path.abspath(module.__file__ or "")) for module in (fleetmap, cloudpickle)]


def find_uv() -> Optional[str]:
    """The ``uv`` installer: beside this interpreter (a virtualenv's
    ``bin``), from the ``uv`` package, or on ``PATH``."""
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "uv")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found, unused-ignore]

        found: str = find_uv_bin()
        return found
    except (ImportError, FileNotFoundError):
        pass
    return shutil.which("uv")
