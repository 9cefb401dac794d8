"""The live status of a job while it runs: on a terminal, in Jupyter, in logs."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, Optional, TextIO

#: Seconds between two redraws of a live status (terminal or notebook).
_REDRAW_INTERVAL = {"terminal": 0.1, "jupyter": 0.25}


def in_jupyter() -> bool:
    """Whether this process is an IPython kernel (Jupyter, VS Code, Colab).

    IPython is consulted only when it is already loaded: a plain script must
    not pay for importing it, and a kernel has always imported it.
    """
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    if get_ipython is None:
        return False
    try:
        shell = get_ipython()
    except Exception:  # noqa: BLE001 - a broken shell is no notebook to draw in
        return False
    # Compared by name so that ipykernel need not be imported; subclasses
    # (Colab's shell, say) count too. A terminal IPython is a
    # TerminalInteractiveShell and gets the terminal's status line.
    return shell is not None and any(cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__)


class _NotebookDisplay:
    """One text output of the running cell, updated in place."""

    def __init__(self, text: str) -> None:
        from IPython.display import display  # loaded: in_jupyter() said so

        self.handle: Any = display(self._bundle(text), raw=True, display_id=True)

    @staticmethod
    def _bundle(text: str) -> Dict[str, str]:
        return {"text/plain": text}

    def update(self, text: str) -> None:
        if self.handle is None:
            return
        try:
            self.handle.update(self._bundle(text), raw=True)
        except Exception:  # noqa: BLE001 - a status display must never fail the job
            self.handle = None


class Progress:
    """Shows done/total, rate and time left while a job runs.

    Where it shows them depends on where the caller runs:

    - on a terminal (stderr is a TTY), one line on stderr redrawn in place
      at most ten times a second; lines the calls print are written above
      it, never into it;
    - in a Jupyter notebook, one output of the cell updated in place (plain
      text, no terminal codes): the job's first line and its status below;
    - elsewhere (logs, CI), one line on stderr when the job starts and one
      when it ends.

    Nothing at all when ``enabled`` is false.
    """

    def __init__(
        self, total: Optional[int], enabled: bool, where: str, slots: int, nodes: int, job: Optional[int] = None
    ) -> None:
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.stream: TextIO = sys.stderr
        self.drawn = False
        self.notebook: Optional[_NotebookDisplay] = None
        self.mode = self._choose_mode() if enabled else "off"
        if not enabled:
            return
        placed = f"{slots} slots on {nodes} node{'s' if nodes != 1 else ''}" if slots else "waiting for slots"
        count = f"{total} inputs" if total is not None else "inputs (streamed)"
        # The job's id, as `fleetmap jobs` lists it.
        named = "" if job is None else f" (job {job})"
        self.header = f"fleetmap: {count} on the {where}, {placed}{named}"
        if self.mode == "jupyter":
            try:
                self.notebook = _NotebookDisplay(self.header)
                return
            except Exception:  # noqa: BLE001 - no display after all: fall back to lines on stderr
                self.mode = "log"
        self._write_line(self.header)

    @property
    def live(self) -> bool:
        """Whether the status is redrawn while the job runs."""
        return self.mode in ("terminal", "jupyter")

    def _choose_mode(self) -> str:
        if in_jupyter():
            return "jupyter"
        isatty: Optional[Callable[[], bool]] = getattr(self.stream, "isatty", None)
        try:
            return "terminal" if isatty is not None and isatty() else "log"
        except ValueError:  # a closed stream
            return "log"

    def _write_line(self, text: str) -> None:
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False

    def _status(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            return f"fleetmap: {self.done} done, {rate:,.0f}/s, {elapsed:.1f}s"
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = f", {left:.0f}s left" if rate > 0 and self.done < self.total else ""
        return f"fleetmap: {self.done}/{self.total} done, {rate:,.0f}/s, {elapsed:.1f}s{eta}"

    def update(self, done: int) -> None:
        """Records that ``done`` inputs have their outputs, and redraws."""
        self.done = done
        self.tick()

    def tick(self) -> None:
        """Redraws the live status if the last redraw is old enough."""
        if not self.live:
            return
        now = time.monotonic()
        if now - self.last_draw < _REDRAW_INTERVAL[self.mode]:
            return
        self.last_draw = now
        self._draw(self._status())

    def _draw(self, status: str) -> None:
        if self.notebook is not None:
            self.notebook.update(f"{self.header}\n{status}")
            return
        self.stream.write("\r\x1b[K" + status)
        self.stream.flush()
        self.drawn = True

    def print_line(self, text: str, stream: TextIO) -> None:
        """Writes a line a call printed, keeping the status line intact."""
        if self.drawn and stream in (sys.stderr, sys.stdout):
            self._clear()
            self.stream.flush()
        stream.write(text + "\n")
        stream.flush()

    def close(self, success: bool) -> None:
        """Shows the final status: the totals, or where the job stopped."""
        if not self.enabled:
            return
        of = f"/{self.total}" if self.total is not None else ""
        status = self._status() if success else f"fleetmap: stopped after {self.done}{of}"
        if self.notebook is not None:
            self.notebook.update(f"{self.header}\n{status}")
            return
        self._write_line(status)
