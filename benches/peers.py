#!/usr/bin/env python
"""The peers side by side: fleetmap, ``multiprocessing.Pool``, Ray and Dask.

A benchmark, not a test: it reports what it measured, in one run on this
machine, for the same workloads on every peer that is importable here, with
``N = --slots`` workers each (default: the cores this process may use):

- fleetmap: ``remote_parallel_map(f, inputs, parallelism=N, verbose=False)``;
- Pool: ``multiprocessing.get_context("fork").Pool(N)`` (the fork context, so
  that the functions of this script, which live in ``__main__``, work);
- Ray: ``ray.init(num_cpus=N, include_dashboard=False)``, ``ray.remote`` and
  ``ray.get``;
- Dask: ``LocalCluster(n_workers=N, threads_per_worker=1, processes=True)``
  and ``Client.map`` / ``Client.gather`` (``pure=False``).

A peer whose package is not importable is skipped, and the report says so
("ray: not installed (pip install ray)"). Every pool or cluster is created
once and warmed (one call, then a no-op job and a short busy job) outside
the timings, and all of them stay up for the whole run: each measurement is
taken on every peer in turn, the order rotating from one repetition to the
next, so that drift on a shared machine hits them alike. The workloads:

1. no-op throughput: ``f(x) = x`` over ``--n`` inputs (default 100,000),
   inputs/s, median of ``--repeat`` runs;
2. the synchronous round trip of one input (fleetmap: a one-input job; Pool:
   ``apply``; Ray: ``ray.get(f.remote(x))``; Dask: ``submit(...).result()``),
   median and p90 over ``--roundtrips`` calls, made as a caller's loop makes
   them: in blocks of ``--roundtrip-block`` calls of one peer in a row, the
   peers' order rotating from block to block. Reported beside it, the same
   call made right after another peer's (``--roundtrips`` rounds of one
   call per peer, in an order shuffled with a fixed seed, so that each peer
   follows each other one about as often): it adds what the other peer's
   call left the machine to do (Ray's and Dask's daemons go on working for
   a few milliseconds after a result) and caches that peer's call cooled;
3. time to first result of ``--ttfr-n`` calls of ``--ttfr-ms`` ms (default
   1,000 x 10 ms; fleetmap: ``generator=True``; Pool: ``imap_unordered``;
   Ray: ``ray.wait``; Dask: ``as_completed``), and the whole job's wall time
   (every result is drained: a cancelled job would cost fleetmap its warm
   workers);
4. parallel efficiency of 10 ms calls and of 100 ms calls on all slots
   (default ``100 x N`` and ``10 x N`` calls): ideal time ``n * call / N``
   over the measured wall time. Calls busy-wait (``--call spin``, they hold
   a core as real work would) or sleep (``--call sleep``);
5. the second-job overhead of a function that imports numpy: jobs of N
   inputs running ``import numpy; return numpy.__version__`` one after the
   other on the same pool or cluster, against a no-import job of N inputs;
   reported: the first job's wall time, and the median of ``--numpy-repeat``
   later ones (each run right after a no-import job, whose median is the
   baseline) with its difference from the no-import job. numpy is looked
   up with ``importlib.util.find_spec`` and never imported here, so that
   forked Pool workers do not inherit it; where it is
   not installed the workload is skipped ("numpy not installed: skipped").
   The workers report whether numpy was already imported before job 1 (Ray's
   and Dask's workers may import it themselves at start-up).

Without ``--fleet`` the bench removes ``FLEETMAP_COORDINATOR`` from its own
environment and points ``FLEETMAP_CONFIG`` at a path that is no file before
fleetmap is imported, so fleetmap runs on its embedded local cluster (whose
node has as many slots as this machine has cores: ``--slots`` beyond that
does not give fleetmap more; "workers seen" in the table counts the distinct
worker processes the warm-up job met). With ``--fleet`` the environment is
left alone and ``remote_parallel_map`` uses the fleet configured by
``FLEETMAP_COORDINATOR`` / ``FLEETMAP_CA`` / ``FLEETMAP_API_KEY`` or
``~/.config/fleetmap/config``, when there is one; the other peers stay local.

Output: a table on stdout (one column per measured peer, each value followed
by its ratio to Pool's), a JSON file (``--json-out``, default ``peers.json``
in the current directory) and a PNG chart (``--png``, default ``peers.png``)
drawn with matplotlib when it is importable (otherwise a line says the chart
was skipped). Progress goes to stderr. With the defaults on a 2-core machine
fleetmap and Pool take about a minute; Ray and, more so, Dask pay a
per-task cost that makes the 100,000-input no-op job take seconds to tens
of seconds per repetition (``--peers`` leaves a peer out). Run::

    .venv/bin/python benches/peers.py [--quick] [--slots N] [--peers fleetmap,pool,ray,dask]
        [--fleet] [--json-out peers.json] [--png peers.png] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

# This script's directory is on sys.path when it runs: the machine
# description is throughput.py's, so both reports say the same.
from throughput import machine


# --------------------------------------------------------------------------- the workers' functions
# Module-level, so that every peer can ship them: by reference to the forked
# Pool workers (they have this __main__), by value (cloudpickle) elsewhere.


def noop(x):
    return x


def spin(ms):
    """Holds a core for ``ms`` milliseconds of wall time."""
    end = time.perf_counter() + ms / 1000.0
    while time.perf_counter() < end:
        pass
    return ms


def nap(ms):
    time.sleep(ms / 1000.0)
    return ms


def spin_pid(ms):
    """A short busy call that says which process ran it."""
    end = time.perf_counter() + ms / 1000.0
    while time.perf_counter() < end:
        pass
    return os.getpid()


def import_numpy(_):
    already = "numpy" in sys.modules
    import numpy

    return already, numpy.__version__


# --------------------------------------------------------------------------- machine and timing


def _cores() -> int:
    return int(machine()["nproc"])


def timed(fn: Callable[[], Any]) -> Tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def percentile(values: List[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the peers


class Unavailable(Exception):
    """The peer's package is not importable here."""


class Peer:
    """One way of running f over inputs on N workers."""

    name = "?"
    install_hint = ""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.version = ""
        self.where = "local"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        pass

    def map(self, fn: Callable[[Any], Any], inputs: List[Any]) -> List[Any]:
        """The outputs, in input order; blocks until all are in."""
        raise NotImplementedError

    def call(self, fn: Callable[[Any], Any], x: Any) -> Any:
        """One input, synchronously."""
        raise NotImplementedError

    def first_result(self, fn: Callable[[Any], Any], inputs: List[Any]) -> Tuple[float, float]:
        """Seconds to the first result (in completion order) and to the last;
        every result is drained."""
        raise NotImplementedError

    @staticmethod
    def _import(module: str, hint: str) -> Any:
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            raise Unavailable(f"not installed ({hint})") from exc


class FleetmapPeer(Peer):
    name = "fleetmap"

    def start(self) -> None:
        fleetmap = self._import("fleetmap", "build it into the venv: maturin develop")
        self.version = fleetmap.__version__
        self._rpm = fleetmap.remote_parallel_map
        try:  # for the report only: which fleet remote_parallel_map will use
            from fleetmap import _fleet

            fleet = _fleet.configured_fleet(None)
            self.where = fleet.description if fleet else "embedded local cluster"
        except Exception as exc:  # noqa: BLE001
            self.where = f"unknown ({exc})"
        self._rpm(noop, [0], parallelism=self.slots, verbose=False)

    def map(self, fn, inputs):
        return self._rpm(fn, inputs, parallelism=self.slots, verbose=False)

    def call(self, fn, x):
        return self._rpm(fn, [x], parallelism=self.slots, verbose=False)[0]

    def first_result(self, fn, inputs):
        t0 = time.perf_counter()
        it = self._rpm(fn, inputs, parallelism=self.slots, verbose=False, generator=True)
        next(it)
        first = time.perf_counter() - t0
        rest = sum(1 for _ in it)
        total = time.perf_counter() - t0
        assert rest == len(inputs) - 1, "fleetmap: the generator lost results"
        return first, total


class PoolPeer(Peer):
    name = "pool"

    def start(self) -> None:
        import multiprocessing

        self.version = f"Python {platform.python_version()}"
        self.where = "fork context"
        self._pool = multiprocessing.get_context("fork").Pool(self.slots)
        self._pool.apply(noop, (0,))

    def stop(self) -> None:
        self._pool.close()
        self._pool.join()

    def map(self, fn, inputs):
        return self._pool.map(fn, inputs)

    def call(self, fn, x):
        return self._pool.apply(fn, (x,))

    def first_result(self, fn, inputs):
        t0 = time.perf_counter()
        it = self._pool.imap_unordered(fn, inputs)
        next(it)
        first = time.perf_counter() - t0
        rest = sum(1 for _ in it)
        total = time.perf_counter() - t0
        assert rest == len(inputs) - 1, "Pool: imap_unordered lost results"
        return first, total


class RayPeer(Peer):
    name = "ray"
    install_hint = "pip install ray"

    def start(self) -> None:
        self._ray = ray = self._import("ray", "pip install ray")
        self.version = getattr(ray, "__version__", "")
        ray.init(num_cpus=self.slots, include_dashboard=False)
        self._remote: Dict[Any, Any] = {}
        self.call(noop, 0)

    def stop(self) -> None:
        self._ray.shutdown()

    def _task(self, fn):
        task = self._remote.get(fn)
        if task is None:
            task = self._remote[fn] = self._ray.remote(num_cpus=1)(fn)
        return task

    def map(self, fn, inputs):
        task = self._task(fn)
        return self._ray.get([task.remote(x) for x in inputs])

    def call(self, fn, x):
        return self._ray.get(self._task(fn).remote(x))

    def first_result(self, fn, inputs):
        task = self._task(fn)
        t0 = time.perf_counter()
        refs = [task.remote(x) for x in inputs]
        self._ray.wait(refs, num_returns=1)
        first = time.perf_counter() - t0
        self._ray.get(refs)
        return first, time.perf_counter() - t0


class DaskPeer(Peer):
    name = "dask"
    install_hint = "pip install 'dask[distributed]'"

    def start(self) -> None:
        hint = "pip install 'dask[distributed]'"
        self._import("dask", hint)
        distributed = self._import("dask.distributed", hint)
        self.version = getattr(importlib.import_module("distributed"), "__version__", "")
        import logging

        self._as_completed = distributed.as_completed
        self._cluster = distributed.LocalCluster(
            n_workers=self.slots,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        self._client = distributed.Client(self._cluster)
        self._client.wait_for_workers(self.slots)
        self.call(noop, 0)

    def stop(self) -> None:
        self._client.close()
        self._cluster.close()

    def map(self, fn, inputs):
        return self._client.gather(self._client.map(fn, inputs, pure=False))

    def call(self, fn, x):
        return self._client.submit(fn, x, pure=False).result()

    def first_result(self, fn, inputs):
        t0 = time.perf_counter()
        futures = self._client.map(fn, inputs, pure=False)
        for _ in self._as_completed(futures):
            break
        first = time.perf_counter() - t0
        self._client.gather(futures)
        return first, time.perf_counter() - t0


PEERS = {p.name: p for p in (FleetmapPeer, PoolPeer, RayPeer, DaskPeer)}
LABELS = {"fleetmap": "fleetmap", "pool": "Pool", "ray": "Ray", "dask": "Dask"}


# --------------------------------------------------------------------------- the run


class Run:
    def __init__(self, peers: List[Peer]) -> None:
        self.peers = peers
        self.raw: Dict[str, Dict[str, Any]] = {p.name: {} for p in peers}
        self.summary: Dict[str, Dict[str, float]] = {p.name: {} for p in peers}
        self.errors: Dict[str, Dict[str, str]] = {p.name: {} for p in peers}

    def rotated(self, r: int) -> List[Peer]:
        k = r % len(self.peers) if self.peers else 0
        return self.peers[k:] + self.peers[:k]

    def fail(self, peer: Peer, measure: str, exc: BaseException) -> None:
        self.errors[peer.name][measure] = f"{type(exc).__name__}: {exc}"
        log(f"  {peer.name}: {measure} failed: {type(exc).__name__}: {exc}")


def measure_noop(run: Run, n: int, repeat: int) -> None:
    inputs = list(range(n))
    times: Dict[str, List[float]] = {p.name: [] for p in run.peers}
    for r in range(repeat):
        for p in run.rotated(r):
            if "noop" in run.errors[p.name]:
                continue
            try:
                dt, out = timed(lambda: p.map(noop, inputs))
                if list(out) != inputs:
                    raise AssertionError("wrong outputs")
                times[p.name].append(dt)
            except Exception as exc:  # noqa: BLE001
                run.fail(p, "noop", exc)
    for name, ts in times.items():
        if ts:
            run.raw[name]["noop"] = {"n": n, "times_s": ts}
            run.summary[name]["noop_inputs_per_s"] = n / statistics.median(ts)
            run.summary[name]["noop_best_inputs_per_s"] = n / min(ts)


def _round_trip(run: Run, p: Peer, i: int, times: Dict[str, List[float]]) -> None:
    if "roundtrip" in run.errors[p.name]:
        return
    try:
        dt, out = timed(lambda: p.call(noop, i))
        if out != i:
            raise AssertionError(f"wrong output {out!r} for {i}")
        times[p.name].append(dt)
    except Exception as exc:  # noqa: BLE001
        run.fail(p, "roundtrip", exc)


def measure_roundtrip(run: Run, calls: int, block: int) -> None:
    """A caller's loop of one-input calls: blocks of ``block`` calls of one
    peer, the peers' order rotating; then, apart, one call per peer per
    round in a shuffled order (each call right after another peer's)."""
    times: Dict[str, List[float]] = {p.name: [] for p in run.peers}
    rounds = max(1, math.ceil(calls / block))
    for r in range(rounds):
        for p in run.rotated(r):
            for k in range(block):
                _round_trip(run, p, r * block + k, times)
    after_other: Dict[str, List[float]] = {p.name: [] for p in run.peers}
    shuffle = random.Random(0)
    for i in range(calls):
        order = list(run.peers)
        shuffle.shuffle(order)
        for p in order:
            _round_trip(run, p, i, after_other)
    for name, ts in times.items():
        if ts:
            run.raw[name]["roundtrip"] = {"block": block, "times_s": ts, "after_another_peer_s": after_other[name]}
            run.summary[name]["roundtrip_median_ms"] = statistics.median(ts) * 1e3
            run.summary[name]["roundtrip_p90_ms"] = percentile(ts, 0.9) * 1e3
        if after_other[name]:
            run.summary[name]["roundtrip_interleaved_median_ms"] = statistics.median(after_other[name]) * 1e3


def measure_ttfr(run: Run, work: Callable[[Any], Any], n: int, ms: float, repeat: int) -> None:
    firsts: Dict[str, List[float]] = {p.name: [] for p in run.peers}
    totals: Dict[str, List[float]] = {p.name: [] for p in run.peers}
    inputs = [ms] * n
    for r in range(repeat):
        for p in run.rotated(r):
            if "ttfr" in run.errors[p.name]:
                continue
            try:
                first, total = p.first_result(work, inputs)
                firsts[p.name].append(first)
                totals[p.name].append(total)
            except Exception as exc:  # noqa: BLE001
                run.fail(p, "ttfr", exc)
    for name in firsts:
        if firsts[name]:
            run.raw[name]["ttfr"] = {"n": n, "call_ms": ms, "first_s": firsts[name], "total_s": totals[name]}
            run.summary[name]["ttfr_ms"] = statistics.median(firsts[name]) * 1e3
            run.summary[name]["ttfr_job_s"] = statistics.median(totals[name])


def measure_efficiency(run: Run, work: Callable[[Any], Any], key: str, n: int, ms: float, repeat: int) -> None:
    times: Dict[str, List[float]] = {p.name: [] for p in run.peers}
    inputs = [ms] * n
    for r in range(repeat):
        for p in run.rotated(r):
            if key in run.errors[p.name]:
                continue
            try:
                dt, out = timed(lambda: p.map(work, inputs))
                if len(out) != n:
                    raise AssertionError(f"{len(out)} outputs for {n} inputs")
                times[p.name].append(dt)
            except Exception as exc:  # noqa: BLE001
                run.fail(p, key, exc)
    for p in run.peers:
        ts = times[p.name]
        if ts:
            ideal = n * ms / 1000.0 / p.slots
            run.raw[p.name][key] = {"n": n, "call_ms": ms, "slots": p.slots, "ideal_s": ideal, "times_s": ts}
            run.summary[p.name][key] = ideal / statistics.median(ts)
            run.summary[p.name][key + "_s"] = statistics.median(ts)


def measure_numpy(run: Run, slots: int, repeat: int) -> None:
    """Peer after peer: the first numpy job once (the first import can only
    happen once), then ``repeat`` pairs of a no-import job and a numpy job."""
    for p in run.peers:
        try:
            no_import = [timed(lambda: p.map(noop, list(range(slots))))[0]]
            t1, out1 = timed(lambda: p.map(import_numpy, list(range(slots))))
            later = []
            for _ in range(repeat):
                no_import.append(timed(lambda: p.map(noop, list(range(slots))))[0])
                dt, out2 = timed(lambda: p.map(import_numpy, list(range(slots))))
                later.append(dt)
        except Exception as exc:  # noqa: BLE001
            run.fail(p, "numpy", exc)
            continue
        base = statistics.median(no_import)
        t2 = statistics.median(later)
        run.raw[p.name]["numpy"] = {
            "inputs": slots,
            "no_import_times_s": no_import,
            "job1_s": t1,
            "later_jobs_s": later,
            "numpy_version": out1[0][1] if out1 else None,
            "already_imported_in_job1": sum(1 for a, _ in out1 if a),
            "already_imported_in_job2": sum(1 for a, _ in out2 if a),
        }
        s = run.summary[p.name]
        s["numpy_job1_s"], s["numpy_job2_s"], s["noimport_s"] = t1, t2, base
        s["numpy_job1_extra_ms"] = (t1 - base) * 1e3
        s["numpy_job2_extra_ms"] = (t2 - base) * 1e3
        s["numpy_preimported_job1"] = sum(1 for a, _ in out1 if a)


# --------------------------------------------------------------------------- the report


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}/s"


def fmt_ms(v: float) -> str:
    return f"{v:,.2f} ms" if v < 100 else f"{v:,.0f} ms"


def fmt_s(v: float) -> str:
    return f"{v:.3f} s"


def fmt_s_as_ms(v: float) -> str:
    return fmt_ms(v * 1e3)


def fmt_eff(v: float) -> str:
    return f"{100 * v:.1f}%"


def fmt_int(v: float) -> str:
    return f"{v:.0f}"


def rows_for(settings: Dict[str, Any]) -> List[Tuple[str, str, Callable[[float], str], bool]]:
    """(summary key, label, formatter, whether a ratio to Pool means something)."""
    s = settings
    rows: List[Tuple[str, str, Callable[[float], str], bool]] = [
        ("startup_s", "start-up (create + first call)", fmt_s, False),
        ("workers_seen", "workers seen in the warm-up job", fmt_int, False),
        ("noop_inputs_per_s", f"no-op throughput, {s['n']:,} inputs (median)", fmt_rate, True),
        ("roundtrip_median_ms", "1-input round trip, median", fmt_ms, True),
        ("roundtrip_p90_ms", "1-input round trip, p90", fmt_ms, True),
        ("roundtrip_interleaved_median_ms", "  right after another peer's call, median", fmt_ms, True),
        ("ttfr_ms", f"first result of {s['ttfr_n']:,} x {s['ttfr_ms']:g} ms", fmt_ms, True),
        ("ttfr_job_s", f"  that whole job (ideal {s['ttfr_n'] * s['ttfr_ms'] / 1000 / s['slots']:.2f} s)", fmt_s, True),
        ("eff10", f"efficiency, {s['calls_10ms']:,} x 10 ms calls", fmt_eff, True),
        ("eff100", f"efficiency, {s['calls_100ms']:,} x 100 ms calls", fmt_eff, True),
    ]
    if s.get("numpy_measured"):
        rows += [
            ("noimport_s", f"no-import job, {s['slots']} inputs (median)", fmt_s_as_ms, False),
            ("numpy_job1_s", f"numpy job 1, {s['slots']} inputs", fmt_s_as_ms, False),
            ("numpy_job2_s", f"numpy jobs 2.., {s['slots']} inputs (median)", fmt_s_as_ms, False),
            ("numpy_job1_extra_ms", "  job 1 minus no-import", fmt_ms, False),
            ("numpy_job2_extra_ms", "  jobs 2.. minus no-import", fmt_ms, False),
            ("numpy_preimported_job1", "  job 1 calls that found numpy imported", fmt_int, False),
        ]
    return rows


def print_table(run: Run, settings: Dict[str, Any]) -> None:
    names = [p.name for p in run.peers]
    pool = run.summary.get("pool", {})
    width = 44
    col = 24
    header = f"{'measure':{width}}" + "".join(f"{LABELS[n]:>{col}}" for n in names)
    print(header)
    print("-" * len(header))
    for key, label, fmt, ratio in rows_for(settings):
        cells = []
        for n in names:
            v = run.summary[n].get(key)
            if v is None:
                cells.append("error" if run.errors[n] else "-")
                continue
            text = fmt(v)
            if ratio and n != "pool" and pool.get(key):
                text += f" ({v / pool[key]:.2f}x)"
            cells.append(text)
        print(f"{label:{width}}" + "".join(f"{c:>{col}}" for c in cells))
    if "pool" in names:
        print("\n(x.xx) = the peer's value over Pool's: for /s and efficiency higher is better, for times lower is better.")


def draw_chart(path: str, run: Run, settings: Dict[str, Any]) -> Optional[str]:
    """Draws the chart; returns why not when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        if exc.name == "matplotlib":
            return "matplotlib is not installed (pip install matplotlib)"
        return f"matplotlib cannot be imported: {exc}"
    names = [p.name for p in run.peers]
    labels = [LABELS[n] for n in names]
    colors = {"fleetmap": "#1f77b4", "pool": "#7f7f7f", "ray": "#ff7f0e", "dask": "#2ca02c"}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    s = settings

    def bars(ax, title, series, unit, fmt, ylim=None, scale=1.0):
        """series: [(legend or None, key)], grouped per peer; values times scale."""
        k = len(series)
        w = 0.8 / k
        for j, (legend, key) in enumerate(series):
            xs, ys, cs = [], [], []
            for i, n in enumerate(names):
                v = run.summary[n].get(key)
                if v is None:
                    continue
                xs.append(i - 0.4 + w * (j + 0.5))
                ys.append(v * scale)
                cs.append(colors.get(n, "#333333"))
            hatch = [None, "//", "..", "xx"][j % 4]
            rects = ax.bar(xs, ys, w, color=cs, hatch=hatch, edgecolor="white", label=legend)
            for rect, v in zip(rects, ys):
                ax.annotate(fmt(v), (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(labels)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        if ylim:
            ax.set_ylim(*ylim)
        else:
            ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
        if any(legend for legend, _ in series):
            ax.legend(fontsize=8)

    bars(axes[0][0], f"no-op throughput, {s['n']:,} inputs (median)", [(None, "noop_inputs_per_s")],
         "inputs/s", lambda v: f"{v / 1e3:,.0f}k")
    bars(axes[0][1], "1-input round trip", [("median", "roundtrip_median_ms"), ("p90", "roundtrip_p90_ms"),
                                             ("after another peer", "roundtrip_interleaved_median_ms")],
         "ms", lambda v: f"{v:.1f}")
    bars(axes[0][2], f"time to first result, {s['ttfr_n']:,} x {s['ttfr_ms']:g} ms (median)", [(None, "ttfr_ms")],
         "ms", lambda v: f"{v:.1f}")
    bars(axes[1][0], f"parallel efficiency on {s['slots']} slots",
         [(f"{s['calls_10ms']} x 10 ms", "eff10"), (f"{s['calls_100ms']} x 100 ms", "eff100")],
         "ideal / measured", lambda v: f"{100 * v:.0f}%", ylim=(0, 1.15))
    if s.get("numpy_measured"):
        bars(axes[1][1], f"jobs of {s['slots']} inputs", [("no import", "noimport_s"), ("numpy job 1", "numpy_job1_s"),
                                                          ("numpy jobs 2..", "numpy_job2_s")],
             "ms", lambda v: f"{v:.1f}", scale=1e3)
    else:
        axes[1][1].axis("off")
        axes[1][1].text(0.5, 0.5, "numpy not installed: skipped", ha="center", va="center")
    bars(axes[1][2], "start-up (create + first call)", [(None, "startup_s")], "s", lambda v: f"{v:.2f}")
    m = settings["machine"]
    skipped = "; ".join(f"{n}: {why}" for n, why in settings["skipped"].items())
    fig.suptitle(f"fleetmap and its peers, {s['slots']} slots, {s['call']} calls - {m['cpu_model']}, "
                 f"{m['nproc']} cores, Python {m['python']}" + (f"\nskipped: {skipped}" if skipped else ""),
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- main


QUICK = {"n": 10_000, "repeat": 2, "roundtrips": 10, "roundtrip_block": 5, "ttfr_n": 100, "ttfr_repeat": 1,
         "eff_repeat": 1, "numpy_repeat": 1}
FULL = {"n": 100_000, "repeat": 5, "roundtrips": 200, "roundtrip_block": 10, "ttfr_n": 1000, "ttfr_repeat": 3,
        "eff_repeat": 3, "numpy_repeat": 5}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=_cores(), help="workers per peer (default: this machine's cores)")
    ap.add_argument("--peers", default="fleetmap,pool,ray,dask", help="which peers, comma-separated (default: all four)")
    ap.add_argument("--fleet", action="store_true",
                    help="fleetmap uses the configured fleet (environment or config file) instead of the embedded cluster")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 10,000 no-op inputs, 10 round trips, 100 calls to first result, fewer efficiency calls")
    ap.add_argument("--n", type=int, help="no-op inputs (default 100000; --quick 10000)")
    ap.add_argument("--repeat", type=int, help="no-op repetitions (default 5; --quick 2)")
    ap.add_argument("--roundtrips", type=int,
                    help="single-input round trips per peer, in a loop and right after another peer (default 200; --quick 10)")
    ap.add_argument("--roundtrip-block", type=int, help="calls of one peer in a row in the loop (default 10; --quick 5)")
    ap.add_argument("--ttfr-n", type=int, help="calls in the time-to-first-result job (default 1000; --quick 100)")
    ap.add_argument("--ttfr-ms", type=float, default=10.0, help="milliseconds per call in that job (default 10)")
    ap.add_argument("--ttfr-repeat", type=int, help="repetitions of that job (default 3; --quick 1)")
    ap.add_argument("--calls-10ms", type=int, help="10 ms calls for the efficiency (default 100 x slots; --quick 20 x slots)")
    ap.add_argument("--calls-100ms", type=int, help="100 ms calls for the efficiency (default 10 x slots; --quick 4 x slots)")
    ap.add_argument("--eff-repeat", type=int, help="repetitions of each efficiency job (default 3; --quick 1)")
    ap.add_argument("--numpy-repeat", type=int, help="numpy jobs after the first, each after a no-import job (default 5; --quick 1)")
    ap.add_argument("--call", choices=("spin", "sleep"), default="spin",
                    help="how a timed call spends its milliseconds: busy-wait (default) or sleep")
    ap.add_argument("--json-out", default="peers.json", help="where to write the JSON results ('' for nowhere; default peers.json)")
    ap.add_argument("--png", default="peers.png", help="where to draw the chart ('' for nowhere; default peers.png)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args(argv)

    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    slots = max(1, args.slots)
    if args.calls_10ms is None:
        args.calls_10ms = (20 if args.quick else 100) * slots
    if args.calls_100ms is None:
        args.calls_100ms = (4 if args.quick else 10) * slots
    wanted = [w.strip().lower() for w in args.peers.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in PEERS]
    if unknown:
        ap.error(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
    # Pool first: it forks, and must do so before the others start threads.
    order = [n for n in ("pool", "fleetmap", "ray", "dask") if n in wanted]

    if not args.fleet:
        # Before fleetmap is imported: no configured fleet, so the embedded cluster.
        os.environ.pop("FLEETMAP_COORDINATOR", None)
        os.environ["FLEETMAP_CONFIG"] = os.devnull  # exists, but is no file: no config

    info = machine()
    log(f"machine: nproc={info['nproc']} (os.cpu_count={info['cpu_count']}), cpu={info['cpu_model']!r}, "
        f"Python {info['python']} ({info['python_executable']}); {slots} slots per peer")
    work = spin if args.call == "spin" else nap

    peers: List[Peer] = []
    skipped: Dict[str, str] = {}
    peer_info: Dict[str, Dict[str, Any]] = {}
    startup: Dict[str, float] = {}
    for name in order:
        peer = PEERS[name](slots)
        try:
            dt, _ = timed(peer.start)
        except Unavailable as exc:
            skipped[name] = str(exc)
            log(f"{name}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001
            skipped[name] = f"failed to start: {type(exc).__name__}: {exc}"
            log(f"{name}: {skipped[name]}")
            continue
        startup[name] = dt
        peers.append(peer)
        log(f"{name}: started in {dt:.2f} s ({peer.version}; {peer.where})")
    # Report in the usual order, fleetmap first.
    peers.sort(key=lambda p: list(PEERS).index(p.name))
    run = Run(peers)

    for p in peers:
        run.summary[p.name]["startup_s"] = startup[p.name]
        try:  # warm: a no-op job, then a short busy job that shows how many workers take part
            p.map(noop, list(range(1000)))
            pids = p.map(spin_pid, [20] * (4 * slots))
            run.summary[p.name]["workers_seen"] = len(set(pids))
        except Exception as exc:  # noqa: BLE001
            run.fail(p, "warm-up", exc)
        peer_info[p.name] = {"version": p.version, "where": p.where, "slots": p.slots}

    numpy_installed = importlib.util.find_spec("numpy") is not None
    settings = {
        "machine": info,
        "slots": slots,
        "n": args.n,
        "repeat": args.repeat,
        "roundtrips": args.roundtrips,
        "roundtrip_block": args.roundtrip_block,
        "numpy_repeat": args.numpy_repeat,
        "ttfr_n": args.ttfr_n,
        "ttfr_ms": args.ttfr_ms,
        "ttfr_repeat": args.ttfr_repeat,
        "calls_10ms": args.calls_10ms,
        "calls_100ms": args.calls_100ms,
        "eff_repeat": args.eff_repeat,
        "call": args.call,
        "quick": args.quick,
        "fleet": args.fleet,
        "skipped": skipped,
        "numpy_measured": bool(peers) and numpy_installed,
    }

    t_run = time.perf_counter()
    if peers:
        log(f"no-op throughput: {args.n:,} inputs x {args.repeat} ...")
        measure_noop(run, args.n, max(1, args.repeat))
        log(f"single-input round trips: {args.roundtrips} ...")
        measure_roundtrip(run, max(1, args.roundtrips), max(1, args.roundtrip_block))
        log(f"time to first result: {args.ttfr_n:,} x {args.ttfr_ms:g} ms x {args.ttfr_repeat} ...")
        measure_ttfr(run, work, args.ttfr_n, args.ttfr_ms, max(1, args.ttfr_repeat))
        log(f"efficiency: {args.calls_10ms:,} x 10 ms and {args.calls_100ms:,} x 100 ms, x {args.eff_repeat} ...")
        measure_efficiency(run, work, "eff10", args.calls_10ms, 10.0, max(1, args.eff_repeat))
        measure_efficiency(run, work, "eff100", args.calls_100ms, 100.0, max(1, args.eff_repeat))
        if numpy_installed:
            log(f"second-job overhead of importing numpy: jobs of {slots} inputs ...")
            measure_numpy(run, slots, max(1, args.numpy_repeat))
    elapsed = time.perf_counter() - t_run

    for p in peers:
        try:
            p.stop()
        except Exception as exc:  # noqa: BLE001
            log(f"{p.name}: stopping failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ report
    print(f"machine: nproc={info['nproc']}, cpu={info['cpu_model']!r}, Python {info['python']}; "
          f"{slots} slots per peer; calls {args.call}{'; --quick' if args.quick else ''}")
    for p in peers:
        print(f"{p.name}: {p.version} ({p.where})")
    for name, why in skipped.items():
        print(f"{name}: {why}")
    if not numpy_installed:
        print("numpy not installed: skipped the second-job import overhead")
    print()
    if peers:
        print_table(run, settings)
    for name, errs in run.errors.items():
        for measure, err in errs.items():
            print(f"{name}: {measure} failed: {err}")
    print(f"\nmeasured in {elapsed:.1f} s")

    results = {
        "benchmark": "peers",
        "settings": settings,
        "peers": peer_info,
        "skipped": skipped,
        "numpy": "measured" if settings["numpy_measured"] else ("not installed: skipped" if not numpy_installed else "no peer"),
        "summary": run.summary,
        "raw": run.raw,
        "errors": run.errors,
        "ratios_to_pool": {
            n: {k: v / run.summary["pool"][k] for k, v in s.items()
                if k in run.summary.get("pool", {}) and run.summary["pool"][k] and n != "pool"}
            for n, s in run.summary.items()
        } if "pool" in run.summary else {},
        "measured_s": elapsed,
    }
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"JSON: {args.json_out}")
    if args.png:
        if not peers:
            print("chart skipped: no peer was measured")
        else:
            not_drawn = draw_chart(args.png, run, settings)
            print(f"chart skipped: {not_drawn}" if not_drawn else f"chart: {args.png}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
