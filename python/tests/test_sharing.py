"""Jobs share the fleet fairly: a short job submitted while a long one holds
every slot gets its share at the long job's next chunk boundary, instead of
waiting for the long job to end."""

from __future__ import annotations

import threading
import time

from fleetmap import remote_parallel_map


def slow(x):
    import time

    time.sleep(0.05)
    return x


def test_a_short_job_is_not_starved_by_a_long_one():
    long_result = {}

    def run_long():
        long_result["out"] = remote_parallel_map(slow, list(range(240)), verbose=False)

    long_job = threading.Thread(target=run_long)
    long_job.start()
    time.sleep(1.0)  # the long job now holds every slot
    assert long_job.is_alive()
    short = remote_parallel_map(slow, list(range(4)), verbose=False)
    assert short == [0, 1, 2, 3]
    # The short job got slots from the long one and finished first.
    assert long_job.is_alive(), "the short job waited for the long one to end"
    long_job.join(timeout=120)
    assert long_result["out"] == list(range(240))
