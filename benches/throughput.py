#!/usr/bin/env python
"""Throughput benchmark: fleetmap's embedded cluster against ``multiprocessing.Pool``.

A benchmark, not a test: it reports numbers and ratios measured in one run on
this machine (see "Performance targets" in the brief). It measures

1. ``remote_parallel_map(noop, range(N))`` on the embedded local cluster,
   warm (one small warm-up call first, excluded);
2. ``multiprocessing.Pool().map(noop, inputs)`` with default chunking, the
   pool created (and warmed) once outside the timing;
3. ``Pool.map(..., chunksize=1)`` on a smaller N, for scale;
4. the single-input round trip ``remote_parallel_map(noop, [1])``;

and, with ``--breakdown``, where the client's time goes on one N-input job
(pickling chunks, sending, waiting in ``job.events``, unpickling outputs) plus
what it costs to start a fresh worker interpreter.

The fleetmap and Pool repetitions are interleaved so that drift on a shared
machine hits both alike. Run::

    .venv/bin/python benches/throughput.py [--n 100000] [--repeat 5] [--json] [--breakdown]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List


def noop(x):
    return x


# --------------------------------------------------------------------------- machine


def machine() -> Dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 1
    return {
        "nproc": affinity,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------- timing helpers


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def percentile(values: List[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(name: str, n: int, times: List[float]) -> Dict[str, Any]:
    best, median = min(times), statistics.median(times)
    return {
        "name": name,
        "n": n,
        "repeat": len(times),
        "times_s": times,
        "best_s": best,
        "median_s": median,
        "best_inputs_per_s": n / best,
        "median_inputs_per_s": n / median,
    }


# --------------------------------------------------------------------------- breakdown


class _Clock:
    def __init__(self) -> None:
        self.total: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}

    def add(self, key: str, dt: float) -> None:
        self.total[key] = self.total.get(key, 0.0) + dt
        self.calls[key] = self.calls.get(key, 0) + 1


class _TimedJob:
    """Wraps the native job handle to time the client's calls into Rust."""

    def __init__(self, job: Any, clock: _Clock, t0: float, marks: Dict[str, float]) -> None:
        self._job, self._clock, self._t0, self._marks = job, clock, t0, marks

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    def send_chunk(self, *args: Any) -> Any:
        t = time.perf_counter()
        self._marks.setdefault("first_send", t - self._t0)
        r = self._job.send_chunk(*args)
        self._clock.add("send_chunk", time.perf_counter() - t)
        return r

    def inputs_done(self, *args: Any) -> Any:
        t = time.perf_counter()
        self._marks.setdefault("inputs_done", t - self._t0)
        r = self._job.inputs_done(*args)
        self._clock.add("inputs_done", time.perf_counter() - t)
        return r

    def events(self, timeout: float) -> Any:
        t = time.perf_counter()
        r = self._job.events(timeout)
        now = time.perf_counter()
        self._clock.add("events (waiting)", now - t)
        for e in r:
            if e[0] == "output":
                self._marks.setdefault("first_output", now - self._t0)
                self._marks["last_output"] = now - self._t0
                self._clock.calls["output chunks"] = self._clock.calls.get("output chunks", 0) + 1
        return r


def breakdown_once(n: int) -> Dict[str, Any]:
    """Times the client-side phases of one warm n-input job.

    Monkeypatches fleetmap._map's internals for the one call and restores them.
    """
    import types

    from fleetmap import _map, remote_parallel_map

    clock, marks = _Clock(), {}
    orig_submit, orig_pickle_chunk, orig_pickle = _map._submit, _map._pickle_chunk, _map.pickle
    orig_pickle_function = _map._pickle_function
    t0 = time.perf_counter()

    def submit(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        job = orig_submit(*a, **k)
        clock.add("submit (job accepted)", time.perf_counter() - t)
        marks["submitted"] = time.perf_counter() - t0
        marks["slots"] = job.slots
        marks["credit"] = job.credit
        return _TimedJob(job, clock, t0, marks)

    def pickle_chunk(*a: Any, **k: Any) -> bytes:
        t = time.perf_counter()
        r = orig_pickle_chunk(*a, **k)
        clock.add("pickle input chunks", time.perf_counter() - t)
        marks["input_bytes"] = marks.get("input_bytes", 0) + len(r)
        return r

    def pickle_function(*a: Any, **k: Any) -> bytes:
        t = time.perf_counter()
        # Everything before this: argument checks and the scan of the inputs.
        marks["checks_done"] = t - t0
        r = orig_pickle_function(*a, **k)
        clock.add("pickle function", time.perf_counter() - t)
        return r

    def loads(payload: bytes) -> Any:
        t = time.perf_counter()
        r = orig_pickle.loads(payload)
        clock.add("unpickle output chunks", time.perf_counter() - t)
        marks["output_bytes"] = marks.get("output_bytes", 0) + len(payload)
        return r

    shim = types.SimpleNamespace(**{k: getattr(orig_pickle, k) for k in dir(orig_pickle) if not k.startswith("__")})
    shim.loads = loads
    _map._submit, _map._pickle_chunk, _map.pickle = submit, pickle_chunk, shim
    _map._pickle_function = pickle_function
    try:
        inputs = list(range(n))
        t0 = time.perf_counter()
        remote_parallel_map(noop, inputs, verbose=False)
        total = time.perf_counter() - t0
    finally:
        _map._submit, _map._pickle_chunk, _map.pickle = orig_submit, orig_pickle_chunk, orig_pickle
        _map._pickle_function = orig_pickle_function
    accounted = sum(clock.total.values())  # the phases below, timed around each call
    phases = {k: {"s": v, "calls": clock.calls.get(k, 0)} for k, v in clock.total.items()}
    phases["other client Python (loop, result slicing)"] = {"s": total - accounted, "calls": 0}

    return {
        "total_s": total,
        "phases": phases,
        "marks_s": {k: v for k, v in marks.items() if isinstance(v, float)},
        "slots": marks.get("slots"),
        "initial_credit": marks.get("credit"),
        "output_chunks": clock.calls.get("output chunks", 0),
        "input_bytes": marks.get("input_bytes", 0),
        "output_bytes": marks.get("output_bytes", 0),
    }


def breakdown(n: int, runs: int) -> Dict[str, Any]:
    """The median of each client-side phase over ``runs`` warm n-input jobs,
    and what a fresh worker interpreter costs."""
    each = [breakdown_once(n) for _ in range(max(1, runs))]
    med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    phases = {
        k: {"s": med([e["phases"].get(k, {"s": 0.0})["s"] for e in each]),
            "calls": each[0]["phases"].get(k, {"calls": 0})["calls"]}
        for k in each[0]["phases"]
    }
    marks = {k: med([e["marks_s"][k] for e in each if k in e["marks_s"]]) for k in each[0]["marks_s"]}
    # What a fresh worker process costs: the interpreter plus the imports the
    # worker needs before it can load the function.
    spawn = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "import fleetmap._worker, fleetmap._native, cloudpickle"],
            check=True,
        )
        spawn.append(time.perf_counter() - t)
    first = each[0]
    return {
        "n": n,
        "runs": len(each),
        "total_s": med([e["total_s"] for e in each]),
        "phases": phases,
        "marks_s": marks,
        "slots": first["slots"],
        "initial_credit": first["initial_credit"],
        "output_chunks": first["output_chunks"],
        "input_bytes": first["input_bytes"],
        "output_bytes": first["output_bytes"],
        "fresh_worker_interpreter_s": {"median": statistics.median(spawn), "best": min(spawn)},
    }


# --------------------------------------------------------------------------- main


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="inputs per job (default 100000)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions (default 5)")
    ap.add_argument("--chunksize1-n", type=int, default=20_000, help="inputs for Pool.map(chunksize=1); 0 skips it")
    ap.add_argument("--roundtrips", type=int, default=50, help="single-input round trips (default 50)")
    ap.add_argument("--breakdown", action="store_true", help="also time the client-side phases of --repeat more jobs (medians)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args(argv)
    n, repeat = args.n, max(1, args.repeat)

    info = machine()
    print(
        f"machine: nproc={info['nproc']} (os.cpu_count={info['cpu_count']}), cpu={info['cpu_model']!r}, "
        f"Python {info['python']} ({info['python_executable']})",
        flush=True,
    )
    inputs = list(range(n))
    results: Dict[str, Any] = {"machine": info, "n": n, "repeat": repeat}

    # The pool is created first, while this process has no extra threads
    # (fork start method on Linux), and warmed once.
    pool = multiprocessing.Pool()
    pool_size = pool._processes  # noqa: SLF001 - for the report only
    pool.map(noop, range(1000))

    from fleetmap import remote_parallel_map

    t_first = timed(lambda: remote_parallel_map(noop, list(range(8)), verbose=False))
    results["fleetmap_first_call_s"] = t_first
    print(f"fleetmap first call (starts the embedded cluster, 8 inputs): {t_first * 1e3:.1f} ms", flush=True)

    fm_times: List[float] = []
    pool_times: List[float] = []
    for _ in range(repeat):
        out: List[Any] = []
        fm_times.append(timed(lambda: out.append(remote_parallel_map(noop, inputs, verbose=False))))
        assert out[0] == inputs, "fleetmap returned wrong outputs"
        out.clear()
        pool_times.append(timed(lambda: out.append(pool.map(noop, inputs))))
        assert out[0] == inputs, "Pool.map returned wrong outputs"
    rows = [
        summarize("fleetmap remote_parallel_map", n, fm_times),
        summarize(f"Pool({pool_size}).map default chunks", n, pool_times),
    ]

    if args.chunksize1_n > 0:
        n1 = min(args.chunksize1_n, n) if n else args.chunksize1_n
        small = list(range(n1))
        c1 = [timed(lambda: pool.map(noop, small, chunksize=1)) for _ in range(min(repeat, 3))]
        rows.append(summarize(f"Pool({pool_size}).map chunksize=1", n1, c1))
    pool.close()
    pool.join()

    rt: List[float] = []
    for _ in range(max(1, args.roundtrips)):
        rt.append(timed(lambda: remote_parallel_map(noop, [1], verbose=False)))
    results["roundtrip_ms"] = {
        "n": len(rt),
        "median": statistics.median(rt) * 1e3,
        "p90": percentile(rt, 0.9) * 1e3,
        "best": min(rt) * 1e3,
        "worst": max(rt) * 1e3,
    }

    base = rows[1]["median_inputs_per_s"]
    for r in rows:
        r["ratio_vs_pool_map_median"] = r["median_inputs_per_s"] / base
        r["ratio_vs_pool_map_best"] = r["best_inputs_per_s"] / rows[1]["best_inputs_per_s"]
    results["rows"] = rows

    print()
    header = f"{'what':40} {'inputs':>8} {'best s':>9} {'median s':>9} {'best /s':>12} {'median /s':>12} {'vs Pool.map':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name']:40} {r['n']:>8} {r['best_s']:>9.4f} {r['median_s']:>9.4f} "
            f"{r['best_inputs_per_s']:>12,.0f} {r['median_inputs_per_s']:>12,.0f} "
            f"{r['ratio_vs_pool_map_median']:>10.3f}x"
        )
    ratio = rows[0]["ratio_vs_pool_map_median"]
    print(f"\nfleetmap / Pool.map (median): {ratio:.3f}  (target >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'})")
    r = results["roundtrip_ms"]
    print(
        f"single-input round trip over {r['n']} calls: median {r['median']:.2f} ms, p90 {r['p90']:.2f} ms, "
        f"best {r['best']:.2f} ms, worst {r['worst']:.2f} ms  (target < 1 ms: "
        f"{'met' if r['median'] < 1 else 'NOT met'})"
    )

    if args.breakdown:
        b = breakdown(n, repeat)
        results["breakdown"] = b
        print(f"\nclient-side breakdown of a warm {n}-input job (median of {b['runs']} jobs per row): total {b['total_s'] * 1e3:.1f} ms, "
              f"{b['slots']} slots, initial credit {b['initial_credit']}, {b['output_chunks']} output chunks, "
              f"{b['input_bytes']:,} input bytes, {b['output_bytes']:,} output bytes")
        for k, v in sorted(b["phases"].items(), key=lambda kv: -kv[1]["s"]):
            calls = f"{v['calls']} calls" if v["calls"] else ""
            print(f"  {k:44} {v['s'] * 1e3:9.2f} ms  {100 * v['s'] / b['total_s']:5.1f}%  {calls}")
        print("  milestones from the call's start: " + ", ".join(
            f"{k} {v * 1e3:.1f} ms" for k, v in b["marks_s"].items()))
        w = b["fresh_worker_interpreter_s"]
        print(f"  a fresh worker interpreter (python -c 'import fleetmap._worker, cloudpickle'): "
              f"median {w['median'] * 1e3:.1f} ms, best {w['best'] * 1e3:.1f} ms")

    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
