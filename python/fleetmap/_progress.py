"""The live status line on stderr while a job runs."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """Shows done/total, rate and time left.

    On a terminal it redraws one line in place (at most ten times a second);
    elsewhere (logs, CI) it prints one line when the job starts and one when
    it ends. Lines the calls print are written above the status line, never
    into it.
    """

    def __init__(self, total: Optional[int], enabled: bool, where: str, slots: int, nodes: int) -> None:
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.stream = sys.stderr
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.drawn = False
        if enabled:
            placed = f"{slots} slots on {nodes} node{'s' if nodes != 1 else ''}" if slots else "waiting for slots"
            count = f"{total} inputs" if total is not None else "inputs (streamed)"
            self._write_line(f"fleetmap: {count} on the {where}, {placed}")

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
        self.done = done
        self.tick()

    def tick(self) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if now - self.last_draw < 0.1:
            return
        self.last_draw = now
        self.stream.write("\r\x1b[K" + self._status())
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
        if not self.enabled:
            return
        of = f"/{self.total}" if self.total is not None else ""
        status = self._status() if success else f"fleetmap: stopped after {self.done}{of}"
        self._write_line(status)
