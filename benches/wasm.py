"""WebAssembly calls against Python calls doing the same work, in one run.

Measures, on this machine:
- per call in one process: a fresh wasmtime instance + run of a trivial
  module (the WAT byte reverser from the tests) against the same reversal as
  a Python function;
- through remote_parallel_map on the embedded cluster: 20,000 inputs each.

Run: `.venv/bin/python benches/wasm.py`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import fleetmap
from fleetmap import remote_parallel_map

REVERSER = Path(__file__).resolve().parent.parent / "python" / "tests" / "wasm" / "reverse.wat"


def reverse_py(data: bytes) -> bytes:
    return data[::-1]


def per_call(f, data: bytes, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        f(data)
    return (time.perf_counter() - start) / n


def main() -> int:
    reverse_wasm = fleetmap.wasm(REVERSER)
    data = b"fleetmap-" * 4
    assert reverse_wasm(data) == reverse_py(data)
    n = 20_000
    wasm_us = [per_call(reverse_wasm, data, n) * 1e6 for _ in range(3)]
    py_us = [per_call(reverse_py, data, n) * 1e6 for _ in range(3)]
    inputs = [data] * n
    remote_parallel_map(reverse_py, inputs[:100], verbose=False)  # start the cluster
    timings = {}
    for name, f in (("wasm", reverse_wasm), ("python", reverse_py)):
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            out = remote_parallel_map(f, inputs, verbose=False)
            runs.append(time.perf_counter() - start)
            assert out[0] == data[::-1]
        timings[name] = min(runs)
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"{'per call, in one process':<42} {'wasm':>12} {'python':>12}")
    print(f"{'  best of 3 x 20,000 calls (µs/call)':<42} {min(wasm_us):>12.2f} {min(py_us):>12.2f}")
    print(f"{'  calls/s on one core':<42} {1e6 / min(wasm_us):>12,.0f} {1e6 / min(py_us):>12,.0f}")
    print(f"{'remote_parallel_map, 20,000 inputs (s)':<42} {timings['wasm']:>12.3f} {timings['python']:>12.3f}")
    print(f"{'  inputs/s':<42} {n / timings['wasm']:>12,.0f} {n / timings['python']:>12,.0f}")
    print(f"wasm per call (fresh instance + run, via Python) / Python function: {min(wasm_us) / min(py_us):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
