"""fleetmap: run a Python function over every item of a list, in parallel,
across a fleet of machines, with one call::

    from fleetmap import remote_parallel_map
    outputs = remote_parallel_map(my_function, inputs, func_cpu=1, func_ram=4)

With no fleet configured, the calls run on an embedded local cluster.
"""

from ._errors import (
    AuthenticationError,
    ConfigurationError,
    CoordinatorUnreachable,
    EnvironmentSetupError,
    ImageError,
    FleetmapError,
    InputError,
    JobCancelled,
    JobFailed,
    JobRejected,
    OutOfMemory,
    RemoteError,
    RemoteTraceback,
    UnsupportedOption,
    VersionMismatch,
    WasmError,
    WasmMemoryLimit,
    WasmTimeout,
    WorkerCrashed,
)
from ._native import VERSION as __version__

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._jobs import JobHandle, job, jobs
    from ._map import remote_parallel_map
    from ._wasm import wasm


def __getattr__(name: str) -> object:
    # Worker processes import this package too (for fleetmap._worker); the
    # client side is loaded on first use so that worker start-up stays lean.
    if name == "remote_parallel_map":
        from ._map import remote_parallel_map

        return remote_parallel_map
    if name == "wasm":
        from ._wasm import wasm

        return wasm
    if name in ("job", "jobs", "JobHandle"):
        from . import _jobs

        return getattr(_jobs, name)
    raise AttributeError(f"module 'fleetmap' has no attribute {name!r}")

__all__ = [
    "remote_parallel_map",
    "job",
    "jobs",
    "JobHandle",
    "FleetmapError",
    "ConfigurationError",
    "UnsupportedOption",
    "InputError",
    "CoordinatorUnreachable",
    "AuthenticationError",
    "JobRejected",
    "JobFailed",
    "JobCancelled",
    "EnvironmentSetupError",
    "ImageError",
    "OutOfMemory",
    "WorkerCrashed",
    "VersionMismatch",
    "WasmError",
    "WasmMemoryLimit",
    "WasmTimeout",
    "wasm",
    "RemoteError",
    "RemoteTraceback",
    "__version__",
]
