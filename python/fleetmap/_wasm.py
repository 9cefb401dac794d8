"""WebAssembly functions: ``fleetmap.wasm(module)`` makes a function that
``remote_parallel_map`` runs with wasmtime inside the slots.

The call convention is a WASI preview 1 command: the input's bytes arrive on
stdin (a ``str`` input as UTF-8), the output is what the module writes to
stdout (``bytes``, or ``str`` with ``text=True``). A non-zero exit or a trap
is an error carrying the module's stderr. Every input gets a fresh instance,
so nothing leaks from one input to the next; the module's memory is capped
by the slot's ``func_ram`` and each call by ``time_limit``. The module sees
no file system and no network, except directories given in ``mounts``,
which it can only read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence, Union

if TYPE_CHECKING:
    from . import _native

#: Default most bytes a call may write to stdout.
DEFAULT_MAX_OUTPUT = 16 << 20


class WasmFunction:
    """A WebAssembly module called like a Python function of one input."""

    def __init__(
        self,
        module: bytes,
        env: Mapping[str, str],
        args: Sequence[str],
        time_limit: Optional[float],
        text: bool,
        mounts: Mapping[str, str],
        max_output: int,
        name: str,
    ) -> None:
        self.module = module
        self.env = dict(env)
        self.args = list(args)
        self.time_limit = time_limit
        self.text = text
        self.mounts = dict(mounts)
        self.max_output = max_output
        self.name = name
        self.digest = hashlib.sha256(module).hexdigest()

    def __repr__(self) -> str:
        return f"fleetmap.wasm({self.name!r}, sha256={self.digest[:12]})"

    def __getstate__(self) -> Dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_native"}

    def __call__(self, input: Union[bytes, bytearray, memoryview, str]) -> Union[bytes, str]:
        if isinstance(input, str):
            data = input.encode("utf-8")
        elif isinstance(input, (bytes, bytearray, memoryview)):
            data = bytes(input)
        else:
            raise TypeError(f"a WebAssembly function takes bytes or str inputs, got {type(input).__name__}")
        output = self._instance().run(data)
        return output.decode("utf-8", errors="replace") if self.text else output

    def _instance(self) -> _native.WasmModule:
        """The module compiled in this process (once; the worker reuses it
        for every input of the job)."""
        native = self.__dict__.get("_native")
        if native is None:
            from . import _native, _worker

            # Inside a slot, the job's func_ram; elsewhere (a local test), 1 GiB.
            limit = int(_worker.setting("memory_limit_bytes", 1 << 30))
            native = _native.WasmModule(
                self.module,
                limit,
                self.time_limit,
                self.args,
                sorted(self.env.items()),
                sorted(self.mounts.items()),
                self.max_output,
            )
            self.__dict__["_native"] = native
        return native


def wasm(
    module: Union[str, "os.PathLike[str]", bytes],
    *,
    env: Optional[Mapping[str, str]] = None,
    args: Optional[Sequence[str]] = None,
    time_limit: Optional[float] = None,
    text: bool = False,
    mounts: Optional[Mapping[str, str]] = None,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> WasmFunction:
    """A WebAssembly function for ``remote_parallel_map``.

    ``module`` is a path to a ``.wasm`` or ``.wat`` file, or the module's
    bytes (binary or WAT text). ``env`` and ``args`` are the WASI
    environment and arguments; ``time_limit`` is the most seconds one call
    may run; ``text=True`` decodes outputs as UTF-8; ``mounts`` maps host
    directories to guest paths, opened read-only; ``max_output`` caps what
    one call may write to stdout. The module is checked here, before
    anything runs: invalid bytes or a module without ``_start`` raise
    :class:`fleetmap.WasmError`.
    """
    if isinstance(module, (bytes, bytearray)):
        data, name = bytes(module), "<bytes>"
    else:
        path = Path(module)
        data, name = path.read_bytes(), path.name
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be a number of seconds above 0, got {time_limit!r}")
    for host in (mounts or {}):
        if not Path(host).is_dir():
            raise ValueError(f"mount {host!r} is not a directory on this machine")
    from . import _native

    _native.validate_wasm(data)
    return WasmFunction(data, env or {}, args or [], time_limit, text, mounts or {}, max_output, name)
