"""The Python side of a slot's worker process.

The node daemon starts ``python -m fleetmap._worker`` with the job's
interpreter; the loop itself runs in Rust (``fleetmap._native.worker_main``)
and calls the helpers below. The worker's settings arrive with the
function, in the daemon's first message (:func:`load_function`), never in
environment variables.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._errors import OutOfMemory, WorkerCrashed
from ._remote import RemoteFailure

_THIS_FILE = os.path.abspath(__file__)

# The worker's end of its channel to the daemon: the sandbox's contract
# (fleetmap_sandbox::WORKER_CHANNEL_FD), the same for every worker.
_CHANNEL_FD = 3

# The settings of the job this worker serves, set by load_function.
_settings: Dict[str, Any] = {}

# Functions this worker has loaded, by the SHA-256 of their pickle, oldest first.
_functions: Dict[bytes, Callable[[Any], Any]] = {}
_MAX_FUNCTIONS = 16


def main() -> None:
    # What loading any job's function needs, imported before the first job
    # arrives: a worker started ahead of jobs should not pay for it on a
    # job's first call (cloudpickle alone takes milliseconds to import).
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        pass  # Each Load then says what is missing.

    from . import _native, _sources  # noqa: F401

    _native.worker_main(_CHANNEL_FD)


def setting(name: str, default: Any) -> Any:
    """One of the daemon's settings for this worker's job, or ``default``
    outside a worker."""
    return _settings.get(name, default)


def load_function(
    blob: bytes, settings: Dict[str, Any]
) -> Tuple[Optional[Callable[[Any], Any]], Optional[str]]:
    """Takes the job's settings and unpickles its function:
    ``(function, None)`` or ``(None, error text)``."""
    _settings.clear()
    _settings.update(settings)
    # The job's GPUs and cores: a warm worker was started for another job,
    # or for none, and CUDA and thread pools read these when they start.
    for name, value in settings.get("environment", ()):
        os.environ[name] = value
    caller = settings.get("caller_python")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if caller and caller != here:
        return None, (
            f"this node's Python is {here} ({sys.executable}) but the caller runs Python {caller}; "
            "functions and values travel with cloudpickle, which needs the same minor version on both ends: "
            f"install Python {caller} on the node and give it to `fleetmap node --python`"
        )
    # The job's local code first on sys.path (and another job's forgotten)
    # before its function, which refers to it, is unpickled.
    from . import _sources

    sources = settings.get("sources")
    _sources.install(sources)
    digest = hashlib.sha256(blob + (sources or "").encode()).digest()
    cached = _functions.get(digest)
    if cached is not None:
        return cached, None
    try:
        import cloudpickle

        function = cloudpickle.loads(blob)
    except BaseException as exc:  # noqa: BLE001 - anything unpickling raises is reported
        return None, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    # A warm worker serves its principal's jobs one after another; the same
    # function again (a loop of remote_parallel_map calls) is unpickled once.
    if len(_functions) >= _MAX_FUNCTIONS:
        _functions.pop(next(iter(_functions)))
    _functions[digest] = function
    return function, None


def run_chunk(
    function: Callable[[Any], Any],
    payload: bytes,
    first_input: int,
    isolation: Optional[Tuple[Callable[[int], None], Dict[int, Tuple[str, str]]]] = None,
) -> Tuple[bytes, int]:
    """Runs the function on every input of a chunk.

    Returns the pickled triple ``(outputs, failures, seconds)`` and the
    number of failures; the output of a failed input is ``None`` and its
    :class:`RemoteFailure` says why, and ``seconds`` is how long the chunk
    took here (the caller sizes its next chunks from it).

    ``isolation`` is set when the chunk runs again after a call killed the
    worker: ``(started, crashed)``, where ``started(i)`` tells the daemon
    that input ``i`` starts, and ``crashed`` maps the inputs that killed a
    worker before to ``(kind, message)``; those fail without running again.
    """
    started_at = time.perf_counter()
    inputs = pickle.loads(payload)
    outputs: List[Any] = []
    failures: List[RemoteFailure] = []
    if isolation is not None:
        started, crashed = isolation
        for offset, item in enumerate(inputs):
            index = first_input + offset
            if index in crashed:
                kind, message = crashed[index]
                error = (OutOfMemory if kind == "oom" else WorkerCrashed)(message)
                failures.append(RemoteFailure.capture(index, error, _THIS_FILE, with_traceback=False))
                outputs.append(None)
                continue
            started(index)
            try:
                outputs.append(function(item))
            except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are outcomes too
                failures.append(RemoteFailure.capture(index, exc, _THIS_FILE))
                outputs.append(None)
        return _pickle_outcomes(outputs, failures, first_input, started_at)
    remaining = iter(inputs)
    while True:
        try:
            # list.extend keeps what map produced before an exception, and
            # map has consumed the failing input: resume after it.
            outputs.extend(map(function, remaining))
            break
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are outcomes too
            failures.append(RemoteFailure.capture(first_input + len(outputs), exc, _THIS_FILE))
            outputs.append(None)
    return _pickle_outcomes(outputs, failures, first_input, started_at)


def _dumps(value: Any) -> bytes:
    """``value`` pickled: by the standard pickler, several times faster,
    where it can (plain data); else by cloudpickle (lambdas, classes defined
    in the caller's ``__main__``), which the standard one refuses rather
    than pickling differently."""
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - anything it refuses, cloudpickle may take
        import cloudpickle

        blob: bytes = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        return blob


def _pickle_outcomes(
    outputs: List[Any], failures: List[RemoteFailure], first_input: int, started_at: float
) -> Tuple[bytes, int]:
    import cloudpickle

    seconds = time.perf_counter() - started_at
    try:
        blob = _dumps((outputs, failures, seconds))
    except Exception:
        # Find the outputs that cannot be pickled and fail just those inputs.
        for i, out in enumerate(outputs):
            try:
                cloudpickle.dumps(out)
            except Exception as exc:
                error: Exception = TypeError(f"the output of input {first_input + i} cannot be pickled: {exc}")
                failures.append(RemoteFailure.capture(first_input + i, error, _THIS_FILE))
                outputs[i] = None
        failures.sort(key=lambda f: f.index)
        blob = cloudpickle.dumps((outputs, failures, seconds), protocol=pickle.HIGHEST_PROTOCOL)
    max_output = int(setting("max_output_bytes", 60 << 20))
    if len(blob) > max_output:
        sizes = [len(pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL)) for o in outputs]
        failures = list(failures)
        for i, size in enumerate(sizes):
            if size > max_output // max(len(outputs), 1):
                error = ValueError(
                    f"the output of input {first_input + i} is {size} bytes, over the limit of "
                    f"{max_output // max(len(outputs), 1)} bytes per output in this chunk; return less data"
                )
                failures.append(RemoteFailure.capture(first_input + i, error, _THIS_FILE))
                outputs[i] = None
        failures.sort(key=lambda f: f.index)
        blob = cloudpickle.dumps((outputs, failures, seconds), protocol=pickle.HIGHEST_PROTOCOL)
    return blob, len(failures)


if __name__ == "__main__":
    # ``python -m fleetmap._worker`` runs this file as ``__main__``; the
    # worker's state lives in the imported ``fleetmap._worker``.
    from fleetmap._worker import main as _main

    _main()
