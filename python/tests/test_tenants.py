"""Named API keys on a fleet of separate processes (``fleetmap coordinator``
and ``fleetmap node``, as root the way the README starts them): keys made,
listed and revoked with ``fleetmap keys``; each key's jobs seen and
cancelled only by its own principal; warm workers never shared between
principals; a revoked key refused at once, even on an open connection."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import PYTHON, fleetmap_command, run_client, wait_for


@pytest.fixture(scope="module")
def fleet(module_processes):
    coordinator = module_processes.start_coordinator("127.0.0.1:0")
    module_processes.start_node(coordinator, "tenant-node", cores=2)
    return coordinator


def keys(coordinator, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        fleetmap_command() + ["keys", *args, "--state-dir", str(coordinator.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def make_key(coordinator, name: str) -> str:
    made = keys(coordinator, "create", name)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def jobs(coordinator, key: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        fleetmap_command() + ["jobs", *args],
        env=coordinator.client_env(api_key=key),
        capture_output=True,
        text=True,
        timeout=60,
    )


# Which worker process ran a call: a mark it leaves in its interpreter
# (every worker on a fleet node is PID 2 of a namespace of its own, so its
# pid names none).
WORKER = """
from fleetmap import remote_parallel_map

def worker_mark(_):
    import sys, uuid
    return sys.__dict__.setdefault("_fleetmap_test_worker", uuid.uuid4().hex)

RESULT = remote_parallel_map(worker_mark, [0], verbose=False)[0]
"""


def worker_of_a_call(coordinator, key: str) -> str:
    r = run_client(WORKER, env=coordinator.client_env(api_key=key))
    assert r["returncode"] == 0, r["stderr"]
    return str(r["result"])


def test_keys_are_listed_without_secrets_and_the_original_key_keeps_working(fleet):
    key = make_key(fleet, "lister")
    assert key.startswith("fmkey_")
    listed = keys(fleet, "list")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert names[:1] == ["default"], "the coordinator's own key became the first named key"
    assert "lister" in names
    assert key not in listed.stdout and key not in (fleet.state_dir / "keys.tsv").read_text()
    again = keys(fleet, "create", "lister")
    assert again.returncode == 1 and "already exists" in again.stderr
    worker_of_a_call(fleet, fleet.api_key)


def test_a_principal_sees_and_cancels_only_its_own_jobs(fleet):
    alice, bob = make_key(fleet, "alice"), make_key(fleet, "bob")
    slow = """
import time
from fleetmap import remote_parallel_map
remote_parallel_map(lambda _: time.sleep(60), range(2), verbose=False)
RESULT = "finished"
"""
    client = subprocess.Popen(
        [PYTHON, "-c", slow], env=fleet.client_env(api_key=alice), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: "alice" in jobs(fleet, alice).stdout, 30, "alice's job to be listed")
        listing = jobs(fleet, alice).stdout
        job_id = int(listing.splitlines()[2].split()[0])
        assert "1 running job(s) of yours" in listing
        assert "0 running job(s) of yours" in jobs(fleet, bob).stdout, "bob sees none of alice's jobs"
        listed = json.loads(jobs(fleet, alice, "--json").stdout)
        assert [(j["job"], j["principal"], j["total_inputs"], j["state"]) for j in listed] == [
            (job_id, "alice", 2, "running")
        ]
        assert listed[0]["name"] == "__main__.<lambda>", listed[0]
        # One job in full: its function, and its slots on the fleet's node.
        shown = jobs(fleet, alice, "show", str(job_id))
        assert shown.returncode == 0, shown.stderr
        assert "__main__.<lambda>" in shown.stdout and "state       running" in shown.stdout, shown.stdout
        assert re.search(r"tenant-node\s+2\s+0\s+0", shown.stdout), shown.stdout
        assert jobs(fleet, bob, "show", str(job_id)).returncode == 1, "bob cannot look at it"
        refused = jobs(fleet, bob, "cancel", str(job_id))
        assert refused.returncode == 1 and "no running job" in refused.stderr
        assert client.poll() is None, "alice's job still runs"
        cancelled = jobs(fleet, alice, "cancel", str(job_id))
        assert cancelled.returncode == 0, cancelled.stderr
        _, err = client.communicate(timeout=30)
        assert client.returncode != 0
        assert "fleetmap._errors.JobCancelled" in err and "cancelled by another client of alice" in err, err
        # The ended job stays listed, with who cancelled it.
        ended = json.loads(jobs(fleet, alice, "show", str(job_id), "--json").stdout)
        assert (ended["state"], ended["ended"] is not None) == ("cancelled", True), ended
        assert "another client of alice" in ended["state_detail"], ended
        assert "0 running job(s) of yours" in jobs(fleet, alice).stdout
    finally:
        client.kill()
        client.wait()


def test_a_warm_worker_serves_only_the_principal_whose_code_it_ran(fleet):
    carol, dave = make_key(fleet, "carol"), make_key(fleet, "dave")
    first = worker_of_a_call(fleet, carol)
    assert worker_of_a_call(fleet, dave) != first, "carol's warm worker is not dave's"
    assert worker_of_a_call(fleet, carol) == first, "carol gets her own warm worker back"


def test_a_revoked_key_is_refused_at_once_even_on_an_open_connection(fleet):
    erin = make_key(fleet, "erin")
    code = """
import sys
import fleetmap
from fleetmap import remote_parallel_map
first = remote_parallel_map(abs, [-1], verbose=False)
print("FIRST", flush=True)
sys.stdin.readline()
try:
    remote_parallel_map(abs, [-2], verbose=False)
    RESULT = ["ran"]
except fleetmap.FleetmapError as e:
    RESULT = [type(e).__name__, str(e)]
import json
print(json.dumps(RESULT), flush=True)
"""
    client = subprocess.Popen(
        [PYTHON, "-c", code],
        env=fleet.client_env(api_key=erin),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "FIRST"
        revoked = keys(fleet, "revoke", "erin")
        assert revoked.returncode == 0, revoked.stderr
        client.stdin.write("\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=60)
        kind, reason = json.loads(out.strip().splitlines()[-1])
        assert kind == "JobRejected", (kind, reason, err)
        assert "revoked" in reason and "erin" in reason, reason
    finally:
        client.kill()
        client.wait()
    # A new connection with the key is refused too.
    r = run_client(WORKER, env=fleet.client_env(api_key=erin))
    assert r["returncode"] != 0 and "AuthenticationError" in r["stderr"], r["stderr"]
    listed = keys(fleet, "list").stdout
    erin_line = next(line for line in listed.splitlines() if line.startswith("erin"))
    assert erin_line.split()[3] != "-", "listed as revoked, with when"
