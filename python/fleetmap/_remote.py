"""Exceptions crossing from a worker to the caller."""

from __future__ import annotations

import os
import pickle
import traceback
from typing import Optional, Tuple

#: What ``RemoteFailure`` pickles to: its five slots, in order.
_State = Tuple[int, str, str, str, Optional[bytes]]

from ._errors import RemoteError, RemoteTraceback


class RemoteFailure:
    """An exception raised by the function on one input, in picklable form."""

    __slots__ = ("index", "type_name", "message", "traceback", "exception")

    def __init__(self, index: int, type_name: str, message: str, tb: str, exception: Optional[bytes]) -> None:
        self.index = index
        self.type_name = type_name
        self.message = message
        self.traceback = tb
        self.exception = exception

    def __getstate__(self) -> _State:
        return (self.index, self.type_name, self.message, self.traceback, self.exception)

    def __setstate__(self, state: _State) -> None:
        self.index, self.type_name, self.message, self.traceback, self.exception = state

    @classmethod
    def capture(cls, index: int, exc: BaseException, skip_file: str, with_traceback: bool = True) -> "RemoteFailure":
        """Records ``exc`` raised on input ``index``, leaving out frames of
        ``skip_file``; without a traceback for failures fleetmap itself
        reports (a worker killed by its call has no Python traceback)."""
        import cloudpickle

        tb = exc.__traceback__ if with_traceback else None
        while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) == skip_file:
            tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        blob: Optional[bytes]
        try:
            pickled = cloudpickle.dumps(exc)
            pickle.loads(pickled)
            blob = pickled
        except Exception:
            blob = None
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return cls(index, name, str(exc), text, blob)

    def to_exception(self, node: str) -> BaseException:
        """The exception to raise in the caller: the original class where it
        unpickles, else :class:`RemoteError`; with ``input_index``, ``node``
        and ``remote_traceback`` attributes and the remote traceback as cause."""
        exc: Optional[BaseException] = None
        if self.exception is not None:
            try:
                loaded = pickle.loads(self.exception)
                if isinstance(loaded, BaseException):
                    exc = loaded
            except Exception:
                exc = None
        if exc is None:
            exc = RemoteError(self.type_name, self.message)
        header = f"Remote traceback (input {self.index}, node {node}):\n"
        for name, value in (("input_index", self.index), ("node", node), ("remote_traceback", self.traceback)):
            try:
                setattr(exc, name, value)
            except Exception:
                pass
        exc.__cause__ = RemoteTraceback(header + self.traceback)
        if hasattr(exc, "add_note"):
            exc.add_note(f"fleetmap: raised by the function on input {self.index} (node {node})")
        return exc
