#!/usr/bin/env python
"""Image benchmark: what ``image=`` costs.

A benchmark, not a test: it reports numbers measured in one run on this
machine, each with a baseline measured in the same run. It needs root (a
worker's root is made with mount namespaces) and Debian's
``docker-registry``. It measures

1. pulling and unpacking an image of about 200 MB (this machine's Python
   and standard library, 140 MB, plus 64 MB of incompressible files) from
   a registry on loopback into an empty node cache, as the time to the
   first result of a one-input job, against extracting the same layers
   with GNU tar (the floor of any unpacker) and against the same job once
   the image is cached;
2. the single-input round trip with warm workers, in the image named by
   digest and by tag (a tag costs one registry request per job, by
   design: a job sees the tag as it is when the job starts), against
   without an image (target: within 10%).

Run::

    sudo .venv/bin/python benches/images.py [--repeat 3] [--json]
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

from oci import LayerBuilder, Registry, python_base_layer  # noqa: E402
from throughput import machine  # noqa: E402


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


FIRST_RESULT = """
import os, sys, time
from fleetmap import remote_parallel_map
t = time.perf_counter()
out = remote_parallel_map(abs, [-1], image=sys.argv[1], verbose=False)
assert out == [1], out
t1 = time.perf_counter() - t
t = time.perf_counter()
remote_parallel_map(abs, [-1], image=sys.argv[1], verbose=False)
print(t1, time.perf_counter() - t)
"""

ROUND_TRIP = """
import statistics, sys, time
from fleetmap import remote_parallel_map
tag, pinned, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def once(**kw):
    t = time.perf_counter()
    remote_parallel_map(abs, [-1], verbose=False, **kw)
    return time.perf_counter() - t
for _ in range(20):
    once(); once(image=pinned); once(image=tag)
plain, by_digest, by_tag = [], [], []
for _ in range(n):
    plain.append(once()); by_digest.append(once(image=pinned)); by_tag.append(once(image=tag))
print(statistics.median(plain), statistics.median(by_digest), statistics.median(by_tag))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benches/images.py needs root: workers enter their image with mount namespaces")
    results: Dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "registry").mkdir()
        registry = Registry(work / "registry")
        try:
            base = python_base_layer()
            extra = LayerBuilder().dir("data/")
            for i in range(64):
                extra.file(f"data/blob-{i:02d}", os.urandom(1 << 20))
            layers = [base, extra.blob()]
            image_bytes = sum(len(b) for b, _ in layers)
            digest = registry.push_image("bench/py", "1", layers)
            image = f"{registry.host}/bench/py:1"
            pinned = f"{registry.host}/bench/py@{digest}"
            env = dict(os.environ, FLEETMAP_INSECURE_REGISTRIES=registry.host)
            env.pop("FLEETMAP_COORDINATOR", None)

            cold: List[float] = []
            cached: List[float] = []
            tar_times: List[float] = []
            for round_ in range(args.repeat):
                cache = work / f"cache-{round_}"
                run_env = dict(env, FLEETMAP_CACHE_DIR=str(cache))
                out = subprocess.run(
                    [sys.executable, "-c", FIRST_RESULT, image], env=run_env, capture_output=True, text=True, check=True
                ).stdout.split()
                cold.append(float(out[0]))
                # A new daemon on the same cache: the image is on disk.
                out = subprocess.run(
                    [sys.executable, "-c", FIRST_RESULT, image], env=run_env, capture_output=True, text=True, check=True
                ).stdout.split()
                cached.append(float(out[0]))
                subprocess.run(["rm", "-rf", str(cache)], check=True)
                target = work / f"tar-{round_}"
                target.mkdir()
                blobs = []
                for n, (blob, _) in enumerate(layers):
                    path = work / f"layer-{n}.tar"
                    path.write_bytes(blob)
                    blobs.append(path)
                t = time.perf_counter()
                for path in blobs:
                    subprocess.run(["tar", "-xf", str(path), "-C", str(target)], check=True)
                tar_times.append(time.perf_counter() - t)
                subprocess.run(["rm", "-rf", str(target), *map(str, blobs)], check=True)
            results["pull"] = {
                "image_mb": round(image_bytes / 1e6, 1),
                "first_result_cold_ms": ms(statistics.median(cold)),
                "first_result_cached_ms": ms(statistics.median(cached)),
                "gnu_tar_extract_ms": ms(statistics.median(tar_times)),
                "cold_mb_per_s": round(image_bytes / 1e6 / statistics.median(cold), 1),
            }
            out = subprocess.run(
                [sys.executable, "-c", ROUND_TRIP, image, pinned, str(args.round_trips)],
                env=dict(env, FLEETMAP_CACHE_DIR=str(work / "cache-rt")),
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            plain, by_digest, by_tag = float(out[0]), float(out[1]), float(out[2])
            results["round_trip"] = {
                "without_image_ms": ms(plain),
                "image_by_digest_ms": ms(by_digest),
                "image_by_tag_ms": ms(by_tag),
                "ratio_by_digest": round(by_digest / plain, 3),
                "ratio_by_tag": round(by_tag / plain, 3),
            }
        finally:
            registry.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    m = results["machine"]
    print(f"machine: {m}")
    p = results["pull"]
    print(
        f"pull + unpack of a {p['image_mb']} MB image, first result: {p['first_result_cold_ms']} ms cold "
        f"({p['cold_mb_per_s']} MB/s), {p['first_result_cached_ms']} ms cached; "
        f"GNU tar extracts the same layers in {p['gnu_tar_extract_ms']} ms"
    )
    r = results["round_trip"]
    print(
        f"single-input round trip, warm: {r['image_by_digest_ms']} ms in an image named by digest "
        f"(ratio {r['ratio_by_digest']}), {r['image_by_tag_ms']} ms by tag, resolved at the registry once per job "
        f"(ratio {r['ratio_by_tag']}), {r['without_image_ms']} ms without an image"
    )


if __name__ == "__main__":
    main()
