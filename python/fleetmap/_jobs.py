"""Detached jobs: ``remote_parallel_map(..., detach=True)`` returns a
:class:`JobHandle` once all its inputs are in, and the job runs on while
the coordinator keeps its outputs; ``fleetmap.job(ID)`` finds it again from
any process with the same API key."""

from __future__ import annotations

import pickle
import time
from typing import Any, Dict, List, Optional

from . import _fleet, _native
from ._errors import JobCancelled, JobFailed


class JobHandle:
    """A job submitted with ``detach=True``, by its id."""

    def __init__(self, job_id: int, api_key: Optional[str] = None) -> None:
        self.id = job_id
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"fleetmap.job({self.id})"

    def _connection(self) -> "_native.Connection":
        return _fleet.connection(_fleet.fleet_address(self._api_key))

    def status(self) -> "_native.JobInfo":
        """The job as ``fleetmap jobs show`` lists it: its state
        (``"running"``, ``"finished"``, ``"failed"``, ``"cancelled"``),
        inputs done and total, slots, nodes, start and end."""
        for job in self._connection().jobs():
            if job["job"] == self.id:
                return job
        raise JobFailed(
            f"the coordinator lists no job {self.id} of this API key (jobs are listed until 200 more have ended, "
            "and not across a coordinator restart)"
        )

    def cancel(self) -> None:
        """Cancels the job (its calls stop; what it left is listed as
        cancelled)."""
        self._connection().cancel(self.id)

    def wait(self, timeout: Optional[float] = None) -> "_native.JobInfo":
        """Waits until the job has ended (or ``timeout`` seconds have passed:
        ``TimeoutError``) and returns its listing."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.1
        while True:
            status = self.status()
            if status["state"] not in ("running", "waiting"):
                return status
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"job {self.id} is still {status['state']} after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def results(self, return_exceptions: bool = False, timeout: Optional[float] = None) -> List[Any]:
        """The job's outputs in input order, once it has ended (waiting up
        to ``timeout`` seconds). An exception a call raised is raised here
        as ``remote_parallel_map`` would, unless ``return_exceptions``,
        which puts it in the list in its input's place; a job that failed or
        was cancelled raises ``JobFailed`` or ``JobCancelled``."""
        status = self.wait(timeout)
        connection = self._connection()
        chunks: Dict[int, List[Any]] = {}
        first_failure: Optional[BaseException] = None
        first_failed_index = -1
        offset: Optional[int] = 0
        while offset is not None:
            page, offset = connection.results(self.id, offset)
            for first, count, failed, node, payload in page:
                outputs, failures, _seconds = pickle.loads(payload)
                for failure in failures:
                    exc = failure.to_exception(node)
                    outputs[failure.index - first] = exc
                    if first_failure is None or failure.index < first_failed_index:
                        first_failure, first_failed_index = exc, failure.index
                chunks[first] = outputs
        if status["state"] == "cancelled":
            raise JobCancelled(f"job {self.id} was cancelled {status['state_detail'] or ''}".strip())
        if status["state"] == "failed" and first_failure is None:
            raise JobFailed(f"job {self.id} failed: {status['state_detail']}")
        if first_failure is not None and not return_exceptions:
            raise first_failure
        results: List[Any] = []
        for first in sorted(chunks):
            if first != len(results):
                raise JobFailed(
                    f"job {self.id}: the coordinator kept no outputs for inputs {len(results)}..{first - 1}; "
                    "report it to the fleet's operator"
                )
            results.extend(chunks[first])
        total = status["total_inputs"]
        if total is not None and len(results) != total:
            raise JobFailed(f"job {self.id}: {len(results)} outputs kept of {total} inputs")
        return results


def jobs(api_key: Optional[str] = None) -> List["_native.JobInfo"]:
    """The running and recent jobs of this API key (``api_key``, else the
    configured one), as ``fleetmap jobs --json`` lists them."""
    return _fleet.connection(_fleet.fleet_address(api_key)).jobs()


def job(job_id: int, api_key: Optional[str] = None) -> JobHandle:
    """The detached job ``job_id`` of this API key (``api_key``, else the
    configured one), from any process: ``fleetmap.job(7).results()``."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id < 0:
        raise TypeError(f"job ids are whole numbers, got {job_id!r}")
    return JobHandle(job_id, api_key)
