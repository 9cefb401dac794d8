"""The ``fleetmap`` command: run a coordinator, a node daemon or a local cluster."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Callable, List, NoReturn, Optional, Tuple

from . import _native
from ._errors import FleetmapError


def _default_state_dir() -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    return base / "fleetmap" / "coordinator"


def _stop_on_sigterm() -> None:
    """SIGTERM (systemd, kill) stops the daemon like Ctrl-C: cleanly, with
    every slot torn down."""

    def interrupt(signum: int, frame: Optional[FrameType]) -> NoReturn:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _wait_forever(stop: Callable[[], None]) -> int:
    _stop_on_sigterm()
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop()
        return 0


# The daemons are the fleetmapd program; `fleetmap coordinator` and
# `fleetmap node` hand their arguments to it.
_DAEMONS = ("coordinator", "node")


def _fleetmapd() -> Optional[str]:
    """The ``fleetmapd`` program: beside this interpreter (the wheel installs
    it into the environment's ``bin``), else on ``PATH``."""
    beside = Path(sys.executable).parent / "fleetmapd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("fleetmapd")


def run_daemon(command: str, argv: List[str]) -> int:
    """Replaces this process with ``fleetmapd COMMAND ARGV``. A node run this
    way calls on this interpreter unless told otherwise (``--python``, or a
    config file)."""
    program = _fleetmapd()
    if program is None:
        print(
            f"fleetmap {command}: the fleetmapd program is missing; it ships in the fleetmap wheel "
            "(pip install fleetmap) beside this interpreter",
            file=sys.stderr,
        )
        return 2
    args = [program, command, *argv]
    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    if command == "node" and not given("--config") and not os.path.exists("/etc/fleetmap/node.toml"):
        from ._environment import find_uv, runtime_packages

        uv = find_uv()
        if not given("--uv") and uv:
            args += ["--uv", uv]
        if not given("--python"):
            args += ["--python", sys.executable]
        if not given("--runtime-package"):
            for directory in runtime_packages():
                args += ["--runtime-package", directory]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(program, args)


def cmd_up(args: argparse.Namespace) -> int:
    _native.init_logging("warn")
    cluster = _native.start_local_cluster(args.listen, sys.executable)
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    ca_path = state / "ca.pem"
    ca_path.write_text(cluster.ca_pem)
    print(f"fleetmap local cluster on {cluster.addr}; to use it from other processes:")
    print(f"  export FLEETMAP_COORDINATOR={cluster.addr}")
    print(f"  export FLEETMAP_CA={ca_path}")
    print(f"  export FLEETMAP_API_KEY={cluster.api_key}")
    sys.stdout.flush()
    return _wait_forever(cluster.stop)


def _connect(command: str, api_key: Optional[str]) -> Optional[Tuple[str, _native.Connection]]:
    """The configured fleet's address and a connection to it, or ``None``
    (having said why) when no fleet is configured."""
    from . import _fleet

    fleet = _fleet.configured_fleet(api_key)
    if fleet is None:
        print(
            f"fleetmap {command}: no fleet is configured; set FLEETMAP_COORDINATOR, FLEETMAP_CA and "
            f"FLEETMAP_API_KEY (or write {_fleet.config_path()})",
            file=sys.stderr,
        )
        return None
    return fleet.coordinator, _fleet.connection(fleet)


def cmd_status(args: argparse.Namespace) -> int:
    connected = _connect("status", args.api_key)
    if connected is None:
        return 1
    coordinator, connection = connected
    nodes, jobs = connection.status()
    gib = float(1 << 30)
    print(f"fleet at {coordinator}: {len(nodes)} node(s), {jobs} running job(s)")
    print(f"{'node':<24} {'cores free/all':>14} {'memory free/all GiB':>20} {'GPUs free/all':>14}  isolation")
    for n in nodes:
        print(
            f"{n['name']:<24} {n['free_cores']:>6}/{n['cores']:<7} "
            f"{n['free_memory_bytes'] / gib:>9.1f}/{n['memory_bytes'] / gib:<10.1f} "
            f"{n['free_gpus']:>6}/{len(n['gpus']):<7}  {n['isolation']}"
        )
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    connected = _connect("jobs", args.api_key)
    if connected is None:
        return 1
    coordinator, connection = connected
    import json

    def running(job: int) -> bool:
        return any(j["job"] == job and j["state"] in ("running", "waiting") for j in connection.jobs())

    if args.action in ("cancel", "show", "results") and args.job is None:
        print(f"fleetmap jobs {args.action}: give the job's id (fleetmap jobs lists them)", file=sys.stderr)
        return 2
    if args.action == "results":
        from ._jobs import JobHandle

        # One output per line, in input order: JSON where the value is JSON,
        # else its repr.
        for value in JobHandle(args.job, args.api_key).results(return_exceptions=True):
            try:
                print(json.dumps(value) if args.json else repr(value))
            except (TypeError, ValueError):
                print(json.dumps(repr(value)))
        return 0
    if args.action == "cancel":
        if not running(args.job):
            print(f"fleetmap jobs cancel: no running job {args.job} of yours", file=sys.stderr)
            return 1
        connection.cancel(args.job)
        # The cancel and this listing travel in order on one connection.
        if running(args.job):
            print(f"fleetmap jobs cancel: job {args.job} is still running", file=sys.stderr)
            return 1
        print(f"cancelled job {args.job}")
        return 0
    jobs = connection.jobs()
    if args.action == "show":
        job = next((j for j in jobs if j["job"] == args.job), None)
        if job is None:
            print(f"fleetmap jobs show: no job {args.job} of yours, running or recent", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(job))
        else:
            _show_job(job)
        return 0
    if args.json:
        print(json.dumps(jobs))
        return 0
    live = [j for j in jobs if j["state"] in ("running", "waiting")]
    print(f"{len(live)} running job(s) of yours at {coordinator}, {len(jobs) - len(live)} recent")
    if jobs:
        print(
            f"{'job':>6} {'state':<10} {'owner':<12} {'function':<28} {'inputs done':>16} {'slots':>6} "
            f"{'nodes':>6}  started (UTC)"
        )
    for j in jobs:
        print(
            f"{j['job']:>6} {j['state']:<10} {j['principal'][:12]:<12} {_short(j['name'], 28):<28} "
            f"{_done(j):>16} {j['slots']:>6} {j['nodes']:>6}  {_when(j['started'])}"
        )
    return 0


def _when(t: Optional[int]) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _done(job: "_native.JobInfo") -> str:
    total = "?" if job["total_inputs"] is None else str(job["total_inputs"])
    return f"{job['inputs_done']}/{total}"


def _show_job(j: "_native.JobInfo") -> None:
    """One job in full: the listing's fields, its progress per node and
    its first failures."""
    gib = float(1 << 30)
    state = j["state"] if j["state_detail"] is None else f"{j['state']}: {j['state_detail']}"
    print(f"job {j['job']}: {j['name'] or '(unnamed)'}")
    print(f"  owner       {j['principal']}")
    print(f"  state       {state}")
    print(f"  started     {_when(j['started'])} UTC" + ("" if j["ended"] is None else f", ended {_when(j['ended'])} UTC"))
    print(f"  inputs      {_done(j)} done, {j['inputs_failed']} raised")
    print(f"  per call    {j['cores']} cores, {j['memory_bytes'] / gib:.1f} GiB, {j['gpus']} GPUs")
    print(f"  slots       {j['slots']} on {j['nodes']} node(s)")
    if j["per_node"]:
        print(f"  {'node':<24} {'slots':>6} {'inputs done':>12} {'raised':>8}")
        for n in j["per_node"]:
            print(f"  {n['node']:<24} {n['slots']:>6} {n['inputs_done']:>12} {n['inputs_failed']:>8}")
    for failure in j["failures"]:
        print(f"  failure: {failure}")


def cmd_nodes(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    if args.action == "revoke":
        _native.nodes_revoke(state, args.name)
        print(f"revoked node {args.name}: the coordinator disconnects it and refuses it from now on")
        return 0
    if args.action == "approve":
        _native.nodes_approve(state, args.name)
        print(f"approved node {args.name}: it enrolls at its next try")
        return 0

    print(f"{'node':<24} {'state':<9} {'enrolled (UTC)':<20} {'certificate expires':<20} {'revoked (UTC)':<20}")
    for n in _native.nodes_list(state):
        state_name = (
            "revoked"
            if n["revoked"]
            else "pending"
            if n["approved"] is None
            else "re-enroll"  # the token asked to enroll it again: approve retires its certificate
            if n["requested"] is not None
            else "active"
        )
        print(
            f"{n['name']:<24} {state_name:<9} {_when(n['enrolled']):<20} {_when(n['expires']):<20} "
            f"{_when(n['revoked']):<20}"
        )
    return 0


def _at_least_one(text: str) -> int:
    """A quota: a whole number of at least 1 (0 would refuse every job)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} would refuse every job; give at least 1, or no quota")
    return value


def cmd_keys(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    if args.action == "create":
        key = _native.keys_create(state, args.name, args.max_slots, args.max_jobs)
        print(key)
        print(
            f"(the key of {args.name}: it is shown only now; the coordinator keeps its hash. "
            "Give it to its user as FLEETMAP_API_KEY.)",
            file=sys.stderr,
        )
        return 0
    if args.action == "revoke":
        _native.keys_revoke(state, args.name)
        print(f"revoked the key of {args.name}; its next job is refused")
        return 0
    print(f"{'name':<24} {'created (UTC)':<20} {'revoked (UTC)':<20} {'max slots':>9} {'max jobs':>8}")
    for k in _native.keys_list(state):
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k["created"]))
        revoked = "-" if k["revoked"] is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k["revoked"]))
        slots = "-" if k["max_slots"] is None else str(k["max_slots"])
        jobs = "-" if k["max_jobs"] is None else str(k["max_jobs"])
        print(f"{k['name']:<24} {created:<20} {revoked:<20} {slots:>9} {jobs:>8}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given and given[0] in _DAEMONS:
        return run_daemon(given[0], given[1:])
    parser = argparse.ArgumentParser(prog="fleetmap", description=__doc__)
    parser.add_argument("--version", action="version", version=_native.VERSION)
    sub = parser.add_subparsers(dest="command", required=True)

    # Listed for --help; their arguments go to fleetmapd (run_daemon).
    sub.add_parser("coordinator", help="run a coordinator for a fleet (fleetmapd coordinator --help)", add_help=False)
    sub.add_parser("node", help="run a node daemon that joins a coordinator (fleetmapd node --help)", add_help=False)

    p = sub.add_parser("up", help="run a local cluster (coordinator and node) in the foreground")
    p.add_argument("--listen", default="127.0.0.1:7070", help="address to serve on (default 127.0.0.1:7070)")
    p.add_argument("--state-dir", default=str(_default_state_dir().parent / "local"), help="where to write ca.pem")
    p.set_defaults(run=cmd_up)

    p = sub.add_parser("status", help="show the configured fleet's nodes, free resources and isolation")
    p.add_argument("--api-key", help="the fleet's API key (default: FLEETMAP_API_KEY or the config file)")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser(
        "jobs",
        help="list your running and recent jobs, show one (fleetmap jobs show ID), cancel one, or print a "
        "detached job's outputs (fleetmap jobs results ID)",
    )
    p.add_argument("action", nargs="?", choices=["list", "show", "cancel", "results"], default="list")
    p.add_argument("job", nargs="?", type=int, help="the job to show, cancel or read the results of")
    p.add_argument("--json", action="store_true", help="print as JSON (a list of jobs, or the one job)")
    p.add_argument("--api-key", help="your API key (default: FLEETMAP_API_KEY or the config file)")
    p.set_defaults(run=cmd_jobs)

    p = sub.add_parser("nodes", help="list the enrolled nodes or revoke one (on the coordinator's machine)")
    nodes = p.add_subparsers(dest="action", required=True)
    for action, help_text in [
        ("list", "list the nodes, their certificates and revocations"),
        ("revoke", "revoke NAME: disconnected at once, refused from now on (certificate and join token)"),
        ("approve", "let NAME enroll (waiting under --approve-nodes, or revoked before)"),
    ]:
        n = nodes.add_parser(action, help=help_text)
        if action != "list":
            n.add_argument("name", help="the node's name")
        n.add_argument(
            "--state-dir",
            default=str(_default_state_dir()),
            help="the coordinator's --state-dir (default: the coordinator's default)",
        )
    p.set_defaults(run=cmd_nodes)

    p = sub.add_parser("keys", help="create, list or revoke named API keys (on the coordinator's machine)")
    keys = p.add_subparsers(dest="action", required=True)
    for action, help_text in [
        ("create", "make a key for NAME and print it (once)"),
        ("list", "list the keys, revoked ones included"),
        ("revoke", "revoke NAME's key; its next job is refused"),
    ]:
        k = keys.add_parser(action, help=help_text)
        if action != "list":
            k.add_argument("name", help="who the key is for (letters, digits, - _ . @)")
        if action == "create":
            k.add_argument("--max-slots", type=_at_least_one, help="the most slots NAME's jobs may hold at once")
            k.add_argument("--max-jobs", type=_at_least_one, help="the most jobs NAME may run at once")
        k.add_argument(
            "--state-dir",
            default=str(_default_state_dir()),
            help="the coordinator's --state-dir (default: the coordinator's default)",
        )
    p.set_defaults(run=cmd_keys)

    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except FleetmapError as exc:
        print(f"fleetmap {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
