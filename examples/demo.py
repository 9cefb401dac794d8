"""The fleetmap demo: 1,000 inputs on the embedded local cluster.

With no fleet configured, remote_parallel_map starts a coordinator and a node
daemon in this process; every call runs in a worker process of a slot.
"""

import os
import time

from fleetmap import remote_parallel_map


def collatz_steps(n: int) -> tuple:
    """How many Collatz steps take n to 1, and which worker process computed it."""
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps, os.getpid()


if __name__ == "__main__":
    inputs = list(range(1, 1001))
    start = time.perf_counter()
    results = remote_parallel_map(collatz_steps, inputs)
    elapsed = time.perf_counter() - start
    for n, (steps, _) in list(zip(inputs, results))[:5]:
        print(f"collatz_steps({n}) = {steps}")
    print("...")
    for n, (steps, _) in list(zip(inputs, results))[-3:]:
        print(f"collatz_steps({n}) = {steps}")
    longest = max(range(len(inputs)), key=lambda i: results[i][0])
    workers = {pid for _, pid in results}
    print(f"{len(results)} results in input order in {elapsed:.2f}s from {len(workers)} worker processes; "
          f"longest: {inputs[longest]} takes {results[longest][0]} steps")
