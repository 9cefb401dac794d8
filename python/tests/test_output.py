"""What the calls print reaches the caller's stdout and stderr."""

from __future__ import annotations

import sys
import time

from fleetmap import remote_parallel_map


def test_prints_reach_the_callers_stdout_and_stderr(capsys):
    def talk(x):
        print(f"out-line {x}")
        print(f"err-line {x}", file=sys.stderr)
        # Give the lines time to travel before the output does.
        time.sleep(0.05)
        return x

    assert remote_parallel_map(talk, range(6), verbose=False) == list(range(6))
    captured = capsys.readouterr()
    out_lines = captured.out.splitlines()
    err_lines = captured.err.splitlines()
    for x in range(6):
        assert out_lines.count(f"out-line {x}") == 1, captured.out
        assert err_lines.count(f"err-line {x}") == 1, captured.err
    assert not any("err-line" in l for l in out_lines), "stderr text arrived on stdout"
    assert not any("out-line" in l for l in err_lines), "stdout text arrived on stderr"


def test_prints_reach_the_file_descriptors_too(capfd):
    # What the driver writes goes through sys.stdout, so a terminal or a
    # redirected fd 1 sees it as well.
    def talk(x):
        print(f"fd-out {x}")
        time.sleep(0.05)
        return x

    remote_parallel_map(talk, range(3), verbose=False)
    captured = capfd.readouterr()
    for x in range(3):
        assert f"fd-out {x}" in captured.out


def test_long_lines_and_unicode_arrive_intact(capsys):
    long = "x" * 20000

    def talk(x):
        print(f"héllo ✓ {x} {long}")
        time.sleep(0.05)
        return x

    remote_parallel_map(talk, range(2), verbose=False)
    out = capsys.readouterr().out
    for x in range(2):
        assert f"héllo ✓ {x} {long}" in out


def test_print_right_before_return_is_not_lost(capsys):
    # The brief's contract: print() output from the calls appears in the
    # caller's terminal. A line printed just before the function returns
    # must not be dropped because the job finished first.
    def talk(x):
        print(f"last-words {x}")
        print(f"last-err {x}", file=sys.stderr)
        return x

    runs, n = 15, 3
    for _ in range(runs):
        remote_parallel_map(talk, range(n), verbose=False)
    captured = capsys.readouterr()
    out_lines, err_lines = captured.out.splitlines(), captured.err.splitlines()
    missing_out = [x for x in range(n) if out_lines.count(f"last-words {x}") != runs]
    missing_err = [x for x in range(n) if err_lines.count(f"last-err {x}") != runs]
    assert not missing_out and not missing_err, (
        f"of {runs} runs of {n} inputs, {runs * n - sum(l.startswith('last-words') for l in out_lines)} "
        f"stdout lines and {runs * n - sum(l.startswith('last-err') for l in err_lines)} stderr lines were lost"
    )
