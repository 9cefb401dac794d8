"""The exceptions fleetmap raises. Every one subclasses :class:`FleetmapError`.

This is their only definition. The compiled core, ``fleetmap._native``,
looks the classes up here when it is imported and raises them itself
(``python/src/errors.rs`` says which Rust error becomes which class), so
this module must not import ``fleetmap._native``. They are Python classes
because several have a built-in second base (``OutOfMemory`` is a
``MemoryError``), and because an exception raised in a worker is pickled by
reference to its class here and rebuilt in the caller.
"""

from __future__ import annotations

from typing import Optional, Tuple, Type


class FleetmapError(Exception):
    """Base class of every error fleetmap itself raises."""


class ConfigurationError(FleetmapError):
    """The fleet configuration (environment, config file or arguments) is wrong."""


class UnsupportedOption(FleetmapError, NotImplementedError):
    """An argument of ``remote_parallel_map`` that this version does not support yet."""


class InputError(FleetmapError, ValueError):
    """An input (or the function) cannot be sent to the fleet; ``input_index`` says which."""

    def __init__(self, message: str, input_index: int | None = None) -> None:
        super().__init__(message)
        self.input_index = input_index


class CoordinatorUnreachable(FleetmapError, ConnectionError):
    """The coordinator could not be reached, or the connection to it was lost."""


class AuthenticationError(FleetmapError, PermissionError):
    """The coordinator refused the API key (or the TLS certificate did not verify)."""


class JobRejected(FleetmapError):
    """The coordinator refused the job, e.g. because no node can host one call."""


class JobFailed(FleetmapError):
    """The job stopped without an exception from the function: a worker died, a node was lost."""


class JobCancelled(JobFailed):
    """Someone else stopped the job: another process of the same principal
    (``fleetmap jobs cancel ID``). The message says who."""


class EnvironmentSetupError(FleetmapError):
    """A node could not prepare the job's environment (``packages=`` or the
    caller's replicated one): a requirement that cannot be resolved or
    installed, or no interpreter of the caller's Python version on the node.
    The message carries the installer's own words and the requirement."""


class ImageError(FleetmapError):
    """A node could not run the job in its ``image=``: an unknown image or
    tag, a registry that cannot be reached or refuses the node's
    credentials, a blob that does not match its digest, an image for
    another platform, or one without a Python of the caller's minor
    version. The message names the image and carries the registry's own
    words. Raised before any input runs."""


class OutOfMemory(FleetmapError, MemoryError):
    """A call used more memory than its ``func_ram`` and was killed; the
    message names the input, the limit, the peak use and the node."""


class WorkerCrashed(FleetmapError):
    """A call killed its worker process (a signal, ``os._exit``, a crash in
    native code); the message names the input, the exit status or signal and
    the node."""


class RemoteError(FleetmapError):
    """An exception raised by the function whose class could not be rebuilt here.

    ``type_name`` is the remote class's qualified name.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name


class RemoteTraceback(Exception):
    """Carries the remote traceback text; set as ``__cause__`` of re-raised exceptions."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class WasmError(FleetmapError):
    """A WebAssembly call failed: it trapped, exited non-zero, ran out of
    time or memory, or the module is invalid. ``kind`` says which:
    ``"invalid"``, ``"no_start"`` (not a WASI command), ``"trap"``,
    ``"exit"``, ``"timeout"``, ``"memory"`` or ``"output_too_large"``.
    ``stderr`` holds the tail of what the module wrote to stderr,
    ``exit_code`` its exit status where it exited (else ``None``)."""

    def __init__(self, message: str, kind: str = "trap", stderr: str = "", exit_code: Optional[int] = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.stderr = stderr
        self.exit_code = exit_code

    def __reduce__(self) -> Tuple[Type[WasmError], Tuple[str, str, str, Optional[int]]]:
        # Rebuilt from the same four arguments on the other side of a
        # pickle (a worker's exception travels to the caller).
        return (type(self), (str(self), self.kind, self.stderr, self.exit_code))


class WasmTimeout(WasmError, TimeoutError):
    """A WebAssembly call ran past its ``time_limit``."""


class WasmMemoryLimit(WasmError, MemoryError):
    """A WebAssembly call tried to grow its memory past the slot's ``func_ram``."""


class VersionMismatch(UserWarning):
    """Warned when the client and the fleet run different fleetmap versions."""
