"""The job status display in its three places: a terminal, a Jupyter
notebook and logs; and nothing with ``verbose=False``.

These drive :class:`fleetmap._progress.Progress` directly with a fake clock
and fake streams; ``test_notebook.py`` checks the notebook display through a
real kernel, and ``test_map.py`` the log lines of a real job.
"""

from __future__ import annotations

import io
import sys
import types
from typing import Any, List, Tuple

import pytest

from fleetmap import _progress
from fleetmap._progress import Progress, in_jupyter


class Clock:
    """A ``time`` stand-in whose ``monotonic`` the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeLog(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(_progress, "time", c)
    return c


@pytest.fixture
def no_notebook(monkeypatch):
    # Whatever the test process has loaded, these tests are not in a kernel.
    monkeypatch.setattr(_progress, "in_jupyter", lambda: False)


def make(total=5000, enabled=True) -> Progress:
    return Progress(total, enabled=enabled, where="local cluster", slots=2, nodes=1)


HEADER = "fleetmap: 5000 inputs on the local cluster, 2 slots on 1 node"


# --- terminal ---------------------------------------------------------------


def test_terminal_redraws_one_line_in_place(monkeypatch, clock, no_notebook):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    p = make()
    assert p.mode == "terminal"
    assert term.getvalue() == HEADER + "\n"

    clock.now += 1.2
    p.update(1200)
    assert term.getvalue() == HEADER + "\n" + "\r\x1b[Kfleetmap: 1200/5000 done, 1,000/s, 1.2s, 4s left"

    # A second update within a tenth of a second is not drawn...
    before = term.getvalue()
    clock.now += 0.05
    p.update(1300)
    assert term.getvalue() == before
    # ...but the next tick after it is, with the latest count.
    clock.now += 0.06
    p.tick()
    assert term.getvalue().endswith("\r\x1b[Kfleetmap: 1300/5000 done, 992/s, 1.3s, 4s left")
    assert term.getvalue().count("\n") == 1, "the status line must not scroll"


def test_terminal_printed_lines_go_above_the_status_line(monkeypatch, clock, no_notebook):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    p = make()
    clock.now += 1.0
    p.update(10)
    p.print_line("hello from input 3", sys.stderr)
    lines = term.getvalue().split("\n")
    # The status line is wiped before the printed line, which ends up on a
    # line of its own, and the next redraw starts a fresh status line.
    assert lines[1].endswith("10/5000 done, 10/s, 1.0s, 499s left\r\x1b[Khello from input 3")
    assert lines[1].rsplit("\r\x1b[K", 1)[1] == "hello from input 3"
    clock.now += 1.0
    p.tick()
    assert term.getvalue().endswith("hello from input 3\n\r\x1b[Kfleetmap: 10/5000 done, 5/s, 2.0s, 998s left")


def test_terminal_close_leaves_the_totals_on_their_own_line(monkeypatch, clock, no_notebook):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    p = make(total=100)
    clock.now += 0.5
    p.update(50)
    clock.now += 0.5
    p.update(100)
    p.close(success=True)
    assert term.getvalue().endswith("\r\x1b[Kfleetmap: 100/100 done, 100/s, 1.0s\n")


def test_terminal_close_after_a_failure_says_where_it_stopped(monkeypatch, clock, no_notebook):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    p = make(total=100)
    clock.now += 0.5
    p.update(40)
    p.close(success=False)
    assert term.getvalue().endswith("\r\x1b[Kfleetmap: stopped after 40/100\n")


# --- logs (stderr is not a terminal) ----------------------------------------


def test_log_mode_prints_only_a_start_and_an_end_line(monkeypatch, clock, no_notebook):
    log = FakeLog()
    monkeypatch.setattr(sys, "stderr", log)
    p = make()
    assert p.mode == "log" and not p.live
    for done in range(0, 5001, 500):
        clock.now += 1.0
        p.update(done)
        p.tick()
    p.print_line("a printed line", sys.stderr)
    p.close(success=True)
    assert log.getvalue() == f"{HEADER}\na printed line\nfleetmap: 5000/5000 done, 455/s, 11.0s\n"
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_log_mode_streamed_inputs_have_no_total(monkeypatch, clock, no_notebook):
    log = FakeLog()
    monkeypatch.setattr(sys, "stderr", log)
    p = make(total=None)
    clock.now += 2.0
    p.update(30)
    p.close(success=True)
    assert log.getvalue() == (
        "fleetmap: inputs (streamed) on the local cluster, 2 slots on 1 node\nfleetmap: 30 done, 15/s, 2.0s\n"
    )


def test_disabled_shows_nothing_anywhere(monkeypatch, clock):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    shown = install_fake_kernel(monkeypatch)
    p = make(enabled=False)
    clock.now += 1.0
    p.update(10)
    p.tick()
    p.close(success=True)
    p.close(success=False)
    assert term.getvalue() == ""
    assert shown == []


# --- Jupyter ----------------------------------------------------------------


class ZMQInteractiveShell:
    """Stands for ipykernel's shell: only the class name is looked at."""


class ColabShell(ZMQInteractiveShell):
    pass


class TerminalInteractiveShell:
    pass


class FakeHandle:
    def __init__(self, shown: List[Tuple[str, Any]]) -> None:
        self.shown = shown

    def update(self, obj: Any, **kwargs: Any) -> None:
        self.shown.append(("update", (obj, kwargs)))


def install_fake_kernel(monkeypatch, shell: Any = None) -> List[Tuple[str, Any]]:
    """Puts fake ``IPython`` and ``IPython.display`` modules in
    ``sys.modules``, as a kernel would have them loaded; returns the list of
    what is displayed."""
    shown: List[Tuple[str, Any]] = []
    ipython = types.ModuleType("IPython")
    the_shell = shell if shell is not None else ZMQInteractiveShell()
    ipython.get_ipython = lambda: the_shell  # type: ignore[attr-defined]
    display_mod = types.ModuleType("IPython.display")

    def display(obj: Any, **kwargs: Any) -> FakeHandle:
        shown.append(("display", (obj, kwargs)))
        return FakeHandle(shown)

    display_mod.display = display  # type: ignore[attr-defined]
    ipython.display = display_mod  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display_mod)
    return shown


def test_jupyter_updates_one_display_in_place(monkeypatch, clock):
    err = FakeLog()
    monkeypatch.setattr(sys, "stderr", err)
    shown = install_fake_kernel(monkeypatch)
    p = make()
    assert p.mode == "jupyter" and p.live
    assert shown == [("display", ({"text/plain": HEADER}, {"raw": True, "display_id": True}))]

    clock.now += 1.2
    p.update(1200)
    clock.now += 0.1  # within the notebook's redraw interval: not sent
    p.update(1300)
    clock.now += 0.2
    p.tick()
    p.print_line("printed by input 7", sys.stdout)
    p.close(success=True)

    texts = [obj["text/plain"] for kind, (obj, kwargs) in shown if kind == "update"]
    assert all(kind == "display" for kind, _ in shown[:1]) and all(kind == "update" for kind, _ in shown[1:])
    assert all(kwargs == {"raw": True} for kind, (obj, kwargs) in shown[1:])
    assert texts == [
        f"{HEADER}\nfleetmap: 1200/5000 done, 1,000/s, 1.2s, 4s left",
        f"{HEADER}\nfleetmap: 1300/5000 done, 867/s, 1.5s, 4s left",
        f"{HEADER}\nfleetmap: 1300/5000 done, 867/s, 1.5s, 4s left",
    ]
    assert not any("\x1b" in t or "\r" in t for t in texts)
    assert err.getvalue() == "", "the notebook display must replace the lines on stderr"


def test_jupyter_close_after_a_failure_says_where_it_stopped(monkeypatch, clock):
    monkeypatch.setattr(sys, "stderr", FakeLog())
    shown = install_fake_kernel(monkeypatch)
    p = make(total=100)
    clock.now += 1.0
    p.update(40)
    p.close(success=False)
    assert shown[-1] == ("update", ({"text/plain": f"{p.header}\nfleetmap: stopped after 40/100"}, {"raw": True}))


def test_jupyter_without_a_working_display_falls_back_to_lines(monkeypatch, clock):
    err = FakeLog()
    monkeypatch.setattr(sys, "stderr", err)
    install_fake_kernel(monkeypatch)

    def broken_display(obj: Any, **kwargs: Any) -> None:
        raise RuntimeError("no frontend")

    monkeypatch.setattr(sys.modules["IPython.display"], "display", broken_display)
    p = make(total=10)
    clock.now += 1.0
    p.update(10)
    p.close(success=True)
    assert p.mode == "log"
    assert err.getvalue().splitlines() == [
        "fleetmap: 10 inputs on the local cluster, 2 slots on 1 node",
        "fleetmap: 10/10 done, 10/s, 1.0s",
    ]


def test_jupyter_is_detected_from_a_loaded_kernel_only(monkeypatch):
    # No IPython loaded: not a notebook, and IPython is not imported to find out.
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    monkeypatch.delitem(sys.modules, "IPython.display", raising=False)
    assert in_jupyter() is False
    assert "IPython" not in sys.modules

    install_fake_kernel(monkeypatch, ZMQInteractiveShell())
    assert in_jupyter() is True
    install_fake_kernel(monkeypatch, ColabShell())
    assert in_jupyter() is True
    # A terminal IPython gets the terminal's status line, not a display.
    install_fake_kernel(monkeypatch, TerminalInteractiveShell())
    assert in_jupyter() is False
    # IPython imported by a plain script: get_ipython() is None.
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    assert in_jupyter() is False
