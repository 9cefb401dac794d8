#!/usr/bin/env python
"""Environment benchmark: what ``packages=`` and replication cost.

A benchmark, not a test: it reports numbers measured in one run on this
machine, each with a baseline measured in the same run. It measures

1. scanning the caller's environment (the manifest and its id) for a
   virtualenv of 200 installed distributions, against
   ``importlib.metadata.distributions()`` listing the same (target: under
   20 ms);
2. the time to a first result (a one-input job) on the embedded cluster
   with ``packages=`` whose environment the node already has, against the
   same job without ``packages=`` (target: no slower);
3. building a new 10-package environment from a local folder of wheels
   (each round uses new versions, so nothing comes from uv's cache of the
   previous round), against the same job once built.

Run::

    .venv/bin/python benches/environments.py [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python" / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import machine  # noqa: E402
from wheels import build_wheel  # noqa: E402

UV = os.path.join(os.path.dirname(sys.executable), "uv")


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def scan_benchmark(work: Path, repeat: int) -> Dict[str, Any]:
    wheels = work / "scan-wheels"
    names = [f"fmbench-dist-{i:03d}" for i in range(200)]
    for name in names:
        build_wheel(wheels, name, "1.0")
    venv = work / "scan-venv"
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [UV, "pip", "install", "--quiet", "--python", str(python), "--no-index", "--find-links", str(wheels), *names],
        check=True,
    )
    # Each timing in a fresh interpreter of that virtualenv: the first scan
    # of a process is the one a caller pays (later ones hit the cache).
    runtime = Path(__file__).resolve().parent.parent / "python"
    probe = f"""
import sys, time, json
sys.path.append({str(runtime)!r})
from fleetmap import _environment
t = time.perf_counter()
env = _environment.caller_environment()
first = time.perf_counter() - t
t = time.perf_counter()
_environment.caller_environment()
cached = time.perf_counter() - t
t = time.perf_counter()
import importlib.metadata as md
n = sum(1 for _ in md.distributions())
baseline = time.perf_counter() - t
print(json.dumps([first, cached, baseline, len(env.requirements), n]))
"""
    rows = []
    for _ in range(repeat):
        out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out))
    return {
        "distributions": rows[0][3],
        "scan_ms": ms(statistics.median(r[0] for r in rows)),
        "cached_scan_ms": ms(statistics.median(r[1] for r in rows)),
        "importlib_metadata_ms": ms(statistics.median(r[2] for r in rows)),
    }


def first_result_benchmark(wheels: Path, repeat: int) -> Dict[str, Any]:
    from fleetmap import remote_parallel_map

    def f(x: int) -> int:
        return x

    packages = ["fmbench-pkg==1.0"]
    remote_parallel_map(f, [1], verbose=False)
    remote_parallel_map(f, [1], packages=packages, verbose=False)  # built once, excluded
    plain, with_packages = [], []
    for _ in range(repeat * 4):
        t = time.perf_counter()
        remote_parallel_map(f, [1], verbose=False)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        remote_parallel_map(f, [1], packages=packages, verbose=False)
        with_packages.append(time.perf_counter() - t)
    a, b = statistics.median(plain), statistics.median(with_packages)
    return {"without_packages_ms": ms(a), "with_built_packages_ms": ms(b), "ratio": round(b / a, 2)}


def build_benchmark(wheels: Path, repeat: int) -> Dict[str, Any]:
    from fleetmap import remote_parallel_map

    def f(x: int) -> int:
        return x

    builds, reuses = [], []
    for round_ in range(repeat):
        version = f"2.{round_}"
        packages = [f"fmbench-ten-{i}=={version}" for i in range(10)]
        for i in range(10):
            build_wheel(wheels, f"fmbench-ten-{i}", version)
        t = time.perf_counter()
        remote_parallel_map(f, [1], packages=packages, verbose=False)
        builds.append(time.perf_counter() - t)
        t = time.perf_counter()
        remote_parallel_map(f, [1], packages=packages, verbose=False)
        reuses.append(time.perf_counter() - t)
    return {"build_10_packages_ms": ms(statistics.median(builds)), "same_job_once_built_ms": ms(statistics.median(reuses))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetmap-envbench-") as tmp:
        work = Path(tmp)
        wheels = work / "wheels"
        build_wheel(wheels, "fmbench-pkg", "1.0")
        # The embedded cluster's node builds into a cache of its own and
        # installs only from the folder.
        os.environ["FLEETMAP_CACHE_DIR"] = str(work / "cache")
        os.environ["UV_FIND_LINKS"] = str(wheels)
        os.environ["UV_NO_INDEX"] = "1"
        report = {
            "machine": machine(),
            "scan_200_distributions": scan_benchmark(work, args.repeat),
            "first_result": first_result_benchmark(wheels, args.repeat),
            "build": build_benchmark(wheels, args.repeat),
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for section, values in report.items():
            print(f"{section}: {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
