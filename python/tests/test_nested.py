"""A call that itself runs ``remote_parallel_map`` on a fleet of separate
processes (a coordinator and two ``fleetmap node`` daemons): its inner
calls run on the fleet's nodes as the outer caller's principal, through a
credential of the outer job that is not the API key and that ends with it."""

from __future__ import annotations

import subprocess

import pytest

from conftest import fleetmap_command, run_client


@pytest.fixture(scope="module")
def fleet(module_processes):
    coordinator = module_processes.start_coordinator("127.0.0.1:0")
    module_processes.start_node(coordinator, "nest-a", cores=2)
    module_processes.start_node(coordinator, "nest-b", cores=2)
    return coordinator


NESTED = """
from fleetmap import remote_parallel_map

def outer(_):
    import os
    from fleetmap import _fleet, remote_parallel_map as inner_map
    names = inner_map(lambda _: os.environ["FLEETMAP_NODE"], range(24), verbose=False)
    connection = _fleet.connection(_fleet.configured_fleet(None))
    principals = sorted({j["principal"] for j in connection.jobs()})
    return names, principals, os.environ["FLEETMAP_API_KEY"], os.environ["FLEETMAP_JOB"]

RESULT = remote_parallel_map(outer, [0], verbose=False)[0]
"""


def test_a_nested_call_runs_on_the_fleet_as_the_outer_principal_until_the_outer_job_ends(fleet):
    made = subprocess.run(
        fleetmap_command() + ["keys", "create", "nester", "--state-dir", str(fleet.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    r = run_client(NESTED, env=fleet.client_env(api_key=key))
    assert r["returncode"] == 0, r["stderr"]
    names, principals, job_key, outer_job = r["result"]
    assert len(names) == 24
    assert set(names) == {"nest-a", "nest-b"}, "the inner calls ran on the fleet's nodes"
    assert principals == ["nester"], "the outer and inner jobs are the caller's"
    assert job_key.startswith("fmjob_") and job_key != key, "the call never sees the API key"
    assert outer_job.isdigit()
    # The outer job has ended: its credential with it.
    late = run_client(
        "RESULT = 0\nimport fleetmap\nfleetmap.remote_parallel_map(abs, [1], verbose=False)",
        env=fleet.client_env(api_key=job_key),
    )
    assert late["returncode"] != 0
    assert "AuthenticationError" in late["stderr"] and "job that has ended" in late["stderr"], late["stderr"]
