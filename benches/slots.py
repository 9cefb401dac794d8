"""Slot start-up and per-call overhead, with cgroup pinning on and off.

Starts one coordinator and two node daemons on loopback as separate
processes, one pinning slots in cgroups and one with `--no-cgroups` (CPU
affinity only), and measures through each, in the same run:

- the single-input round trip: a fresh slot (cgroup created, worker
  started and loaded) and one call, so mostly the cost of a slot;
- the no-op throughput of 20,000 inputs (per-call overhead once slots run).

Needs root for the pinned daemon. Run: `.venv/bin/python benches/slots.py`.
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

BIN = str(Path(sys.executable).parent / "fleetmap")

CLIENT = r"""
import json, statistics, sys, time
from fleetmap import remote_parallel_map

def noop(x):
    return x

rounds, n = int(sys.argv[1]), int(sys.argv[2])
remote_parallel_map(noop, [0], verbose=False)  # warm the connection
trips = []
for _ in range(rounds):
    t = time.perf_counter()
    remote_parallel_map(noop, [1], verbose=False)
    trips.append(time.perf_counter() - t)
rates = []
for _ in range(3):
    t = time.perf_counter()
    remote_parallel_map(noop, list(range(n)), verbose=False)
    rates.append(n / (time.perf_counter() - t))
print(json.dumps({"trips": trips, "rates": rates}))
"""


def wait_for(path: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {text!r} in {path}:\n{path.read_text(errors='replace')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleetmap-bench-slots-"))
    procs = []
    results = {}
    try:
        port = 17000 + os.getpid() % 1000
        log = work / "coordinator.log"
        procs.append(
            subprocess.Popen(
                [BIN, "coordinator", "--listen", f"127.0.0.1:{port}", "--state-dir", str(work / "state")],
                stdout=open(log, "w"),
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(log, "listening on")
        state = work / "state"
        env = dict(os.environ)
        env.update(
            FLEETMAP_COORDINATOR=f"127.0.0.1:{port}",
            FLEETMAP_CA=str(state / "ca.pem"),
            FLEETMAP_API_KEY=(state / "api-key").read_text().strip(),
        )
        for name, extra in (("pinned", []), ("unpinned", ["--no-cgroups"])):
            node_log = work / f"{name}.log"
            node = subprocess.Popen(
                [BIN, "node", "--coordinator", f"127.0.0.1:{port}", "--token-file", str(state / "join-token"),
                 "--ca", str(state / "ca.pem"), "--name", f"bench-{name}", "--shared-tmp"] + extra,
                stdout=open(node_log, "w"),
                stderr=subprocess.STDOUT,
            )
            wait_for(log, f"node bench-{name} joined")
            out = subprocess.run(
                [sys.executable, "-c", CLIENT, str(args.rounds), str(args.n)],
                env=env, capture_output=True, text=True, timeout=600,
            )
            if out.returncode != 0:
                raise SystemExit(f"client failed:\n{out.stderr}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            results[name]["isolation"] = next(
                (l.split(": ", 2)[-1] for l in node_log.read_text().splitlines() if "pinned" in l), "?"
            )
            node.terminate()
            node.wait(timeout=15)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=15)

    if args.json:
        print(json.dumps(results))
        return 0
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"{'daemon':<10} {'round trip median':>18} {'p90':>9} {'no-op inputs/s (best of 3)':>28}")
    for name, r in results.items():
        trips = sorted(r["trips"])
        p90 = trips[int(0.9 * (len(trips) - 1))]
        print(f"{name:<10} {statistics.median(trips) * 1e3:>15.1f} ms {p90 * 1e3:>6.1f} ms {max(r['rates']):>28,.0f}")
    pinned, unpinned = results["pinned"], results["unpinned"]
    extra = statistics.median(pinned["trips"]) - statistics.median(unpinned["trips"])
    print(f"cgroup set-up and teardown add {extra * 1e3:.1f} ms per slot (median round trip, pinned - unpinned)")
    print(f"per-call throughput pinned/unpinned: {max(pinned['rates']) / max(unpinned['rates']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
