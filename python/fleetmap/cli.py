"""The ``fleetmap`` command: run a coordinator, a node daemon or a local cluster."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
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


def cmd_coordinator(args: argparse.Namespace) -> int:
    _native.init_logging("info")
    handle = _native.start_coordinator(
        args.listen,
        Path(args.state_dir),
        args.node_cert_days,
        args.max_node_cores,
        int(args.max_node_memory_gib * (1 << 30)) if args.max_node_memory_gib else None,
        args.max_node_gpus,
        args.approve_nodes,
    )
    print(f"fleetmap coordinator listening on {handle.addr} (QUIC, TLS 1.3)")
    print(f"  CA certificate: {handle.ca_path}")
    print(f"  join token:     {handle.join_token_path}")
    print(f"  API key:        {handle.api_key_path}")
    print("start a node:")
    print(f"  fleetmap node --coordinator HOST:{handle.addr.rsplit(':', 1)[1]} "
          f"--token-file {handle.join_token_path} --ca {handle.ca_path}")
    sys.stdout.flush()
    return _wait_forever(handle.stop)


def cmd_node(args: argparse.Namespace) -> int:
    _native.init_logging("info")
    import socket

    identity = Path(args.state_dir) / (args.name or socket.gethostname())
    try:
        token = _join_token(args.token_file)
    except (OSError, ValueError) as exc:
        if not (identity / "node.pem").is_file():
            print(f"fleetmap node: {exc}", file=sys.stderr)
            return 2
        # Enrolled already: the node's certificate is its credential.
        token = ""
    ca_pem = Path(args.ca).read_bytes()
    memory = int(args.memory_gib * (1 << 30)) if args.memory_gib else None
    gpus = None
    if args.gpus is not None:
        try:
            gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
        except ValueError:
            print(f"fleetmap node: --gpus takes device minors like 0,1, got {args.gpus!r}", file=sys.stderr)
            return 2
    from ._environment import find_uv, runtime_packages

    try:
        run_as = _call_user(args.run_as, args.allow_root_calls)
    except LookupError as exc:
        print(f"fleetmap node: {exc}", file=sys.stderr)
        return 2
    if args.slot_uids and (os.geteuid() != 0 or args.allow_root_calls):
        print("fleetmap node: --slot-uids needs a daemon running as root, and not --allow-root-calls", file=sys.stderr)
        return 2
    if args.slot_uids and args.no_cgroups:
        # Without a cgroup per slot, a process a call leaves behind (one
        # that left its process group) could outlive the worker and meet
        # the next call given the same uid.
        print(
            "fleetmap node: --slot-uids needs every slot in a cgroup of its own (which tears down all a call "
            "left running before its uid serves another): drop --no-cgroups",
            file=sys.stderr,
        )
        return 2

    pythons = args.python or [sys.executable]
    try:
        prepare = _environments_to_prepare(args.prepare or [], pythons)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"fleetmap node: --prepare: {exc}", file=sys.stderr)
        return 2
    environments = {
        "pythons": pythons,
        "cache_dir": args.cache_dir,
        "uv": args.uv or find_uv(),
        "runtime_packages": runtime_packages(),
        "index_url": args.index_url,
        "find_links": args.find_links,
        "build_timeout_s": args.environment_timeout,
        "max_bytes": int(args.environment_cache_gib * (1 << 30)) if args.environment_cache_gib else None,
        "use_caller_python": not args.no_caller_python,
        "prepare": prepare,
        "insecure_registries": _insecure_registries(args.insecure_registry),
        "registry_auth": args.registry_auth,
        "image_max_bytes": int(args.image_cache_gib * (1 << 30)) if args.image_cache_gib else None,
    }
    node = _native.start_node(
        args.coordinator,
        token,
        ca_pem,
        args.name,
        args.cores,
        memory,
        pythons[0],
        gpus,
        not args.no_cgroups,
        args.cgroup_subtree,
        args.cgroup_mount,
        args.pids_per_slot,
        run_as,
        not args.shared_tmp,
        environments,
        args.pass_env or [],
        args.allow_unisolated,
        identity,
        args.slot_uids,
    )
    print(f"fleetmap node {node.name} joining {args.coordinator}")
    sys.stdout.flush()
    _stop_on_sigterm()
    try:
        while True:
            why = node.wait(0.5)
            if why is not None:
                print(f"fleetmap node {node.name} stopped: {why}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        node.stop()
        return 0


# The users a root daemon runs calls as when not told: the one fleetmap's
# packaging creates, else the system's unprivileged user.
_CALL_USERS = ("fleetmap", "nobody")


def _call_user(run_as: Optional[str], allow_root_calls: bool) -> Optional[str]:
    """Whom calls run as: ``--run-as``; else, for a daemon running as root,
    an unprivileged user unless ``--allow-root-calls``; else the daemon's
    own user (``None``)."""
    if run_as or allow_root_calls or os.geteuid() != 0:
        return run_as
    import pwd

    for name in _CALL_USERS:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise LookupError(
        "this daemon runs as root and there is no unprivileged user to run calls as (neither 'fleetmap' nor "
        "'nobody'): create one (useradd --system fleetmap), name one with --run-as USER, or run calls as root "
        "with --allow-root-calls"
    )


def _insecure_registries(given: Optional[List[str]]) -> List[str]:
    """``--insecure-registry`` and ``FLEETMAP_INSECURE_REGISTRIES``, together."""
    from_env = os.environ.get("FLEETMAP_INSECURE_REGISTRIES", "")
    return list(given or []) + [r.strip() for r in from_env.split(",") if r.strip()]


def _environments_to_prepare(files: List[str], pythons: List[str]) -> List[Tuple[str, List[str], str]]:
    """``(id, requirements, python version)`` of the environment each
    requirements file describes (as ``packages=`` with the same list gives),
    for each interpreter's Python version."""
    from . import _environment, _scan

    versions = []
    for python in pythons:
        out = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        if out.stdout.strip() not in versions:
            versions.append(out.stdout.strip())
    prepared = []
    for path in files:
        lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines()]
        requirements = _environment.packages_environment([line for line in lines if line]).requirements
        for version in versions:
            prepared.append((_scan.environment_id(version, requirements, True), requirements, version))
    return prepared


def _join_token(token_file: Optional[str]) -> str:
    """The join token: from ``token_file`` (readable by its owner only),
    else from systemd's credentials (``LoadCredential=join-token:...``),
    else from ``FLEETMAP_JOIN_TOKEN``; never from the command line, which
    every process on the node can read."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if token_file is None and credentials and os.path.isfile(os.path.join(credentials, "join-token")):
        token_file = os.path.join(credentials, "join-token")
    if token_file is not None:
        mode = os.stat(token_file).st_mode
        if mode & 0o077:
            raise ValueError(
                f"the join token file {token_file} is readable by others (mode {mode & 0o777:o}); "
                f"make it readable by its owner only: chmod 600 {token_file}"
            )
        token = Path(token_file).read_text().strip()
    else:
        token = os.environ.get("FLEETMAP_JOIN_TOKEN", "").strip()
    if not token:
        raise ValueError(
            "give the join token with --token-file FILE (mode 600), a systemd credential named join-token, "
            "or FLEETMAP_JOIN_TOKEN"
        )
    return token


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
        return any(j["job"] == job and j["state"] == "running" for j in connection.jobs())

    if args.action in ("cancel", "show") and args.job is None:
        print(f"fleetmap jobs {args.action}: give the job's id (fleetmap jobs lists them)", file=sys.stderr)
        return 2
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
    live = [j for j in jobs if j["state"] == "running"]
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
    parser = argparse.ArgumentParser(prog="fleetmap", description=__doc__)
    parser.add_argument("--version", action="version", version=_native.VERSION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("coordinator", help="run a coordinator for a fleet")
    p.add_argument("--listen", default="0.0.0.0:7070", help="UDP address to serve QUIC on (default 0.0.0.0:7070)")
    p.add_argument("--state-dir", default=str(_default_state_dir()), help="where the CA, join token and API key live")
    p.add_argument(
        "--node-cert-days", type=float, default=30.0, help="how long node certificates are valid (default 30 days)"
    )
    p.add_argument("--max-node-cores", type=int, help="the most cores one node may offer (more are not used)")
    p.add_argument("--max-node-memory-gib", type=float, help="the most memory one node may offer, in GiB")
    p.add_argument("--max-node-gpus", type=int, help="the most GPUs one node may offer")
    p.add_argument(
        "--approve-nodes",
        action="store_true",
        help="hold each new node until `fleetmap nodes approve NAME` (it keeps trying meanwhile)",
    )
    p.set_defaults(run=cmd_coordinator)

    # No abbreviations: `--token SECRET` must not pass for `--token-file`.
    p = sub.add_parser("node", help="run a node daemon that joins a coordinator", allow_abbrev=False)
    p.add_argument("--coordinator", required=True, help="the coordinator's HOST:PORT")
    p.add_argument(
        "--token-file",
        help="a file holding the join token, readable by its owner only (default: the systemd credential "
        "join-token, or FLEETMAP_JOIN_TOKEN; never on the command line, where every process can read it)",
    )
    p.add_argument("--ca", required=True, help="the coordinator's ca.pem")
    p.add_argument("--name", help="the node's name (default: the host name)")
    p.add_argument(
        "--state-dir",
        default=str(_default_state_dir().parent / "node"),
        help="where the node keeps its key and certificate, in a folder per node name",
    )
    p.add_argument("--cores", type=int, help="cores to offer (default: all)")
    p.add_argument("--memory-gib", type=float, help="memory to offer in GiB (default: all)")
    p.add_argument(
        "--python",
        action="append",
        help="an interpreter job environments are built on, one per Python version callers use "
        "(repeatable; default: the one running this command)",
    )
    p.add_argument("--cache-dir", help="where environments are built (default: /var/cache/fleetmap as root)")
    p.add_argument("--uv", help="the uv binary that installs environments (default: beside --python or on PATH)")
    p.add_argument("--index-url", help="the package index environments install from (default: uv's settings)")
    p.add_argument("--find-links", action="append", help="a folder or page of wheels to install from (repeatable)")
    p.add_argument("--environment-timeout", type=float, help="the longest one environment build may take, in s (default: 900)")
    p.add_argument("--environment-cache-gib", type=float, help="evict unused environments above this size (default: 50)")
    p.add_argument(
        "--prepare",
        action="append",
        metavar="REQUIREMENTS",
        help="build the environment of this requirements file (one requirement per line) at start, as jobs "
        "with the same packages= list need it (repeatable)",
    )
    p.add_argument(
        "--insecure-registry",
        action="append",
        metavar="HOST:PORT",
        help="a registry images are pulled from over plain HTTP, not HTTPS (repeatable; also "
        "FLEETMAP_INSECURE_REGISTRIES=HOST:PORT,...)",
    )
    p.add_argument(
        "--registry-auth",
        metavar="FILE",
        help="registry credentials in Docker's config.json format (default: anonymous pulls); "
        "callers never send credentials",
    )
    p.add_argument("--image-cache-gib", type=float, help="evict unused images above this size, refuse larger ones (default: 100)")
    p.add_argument(
        "--no-caller-python",
        action="store_true",
        help="always build environments, even where the caller's interpreter exists here with the same packages",
    )
    p.add_argument("--gpus", help="NVIDIA device minors to offer, e.g. 0,1 (default: the driver's inventory)")
    p.add_argument(
        "--allow-unisolated",
        action="store_true",
        help="where cgroups cannot be managed, run calls pinned to cores only (default: refuse to start)",
    )
    p.add_argument("--no-cgroups", action="store_true", help="do not put slots in cgroups (only pin their cores)")
    p.add_argument("--cgroup-subtree", help="the cgroup subtree this daemon owns (default: fleetmap-NAME)")
    p.add_argument("--cgroup-mount", help="where the cgroup hierarchy is mounted (default: /sys/fs/cgroup)")
    p.add_argument("--pids-per-slot", type=int, help="the most processes one slot may have (default: 4096)")
    p.add_argument(
        "--run-as",
        help="run calls (and environment builds) as this user, name or UID:GID (default for a daemon running as root: "
        "the user 'fleetmap' if it exists, else 'nobody'; otherwise the daemon's user)",
    )
    p.add_argument(
        "--allow-root-calls",
        action="store_true",
        help="let a daemon running as root run calls as root, with every capability (default: an unprivileged "
        "user with none)",
    )
    p.add_argument(
        "--slot-uids",
        metavar="FIRST-LAST",
        help="run each worker as a uid of its own from this unused range (e.g. 2000000-2065535), so that calls of "
        "different slots and tenants cannot signal or read each other (environments are still built as --run-as)",
    )
    p.add_argument(
        "--pass-env",
        action="append",
        metavar="NAME",
        help="an environment variable of the daemon's that calls may read (repeatable; they get PATH, HOME, "
        "locale, LD_LIBRARY_PATH and CUDA_HOME, never the rest, such as the join token)",
    )
    p.add_argument("--shared-tmp", action="store_true", help="let workers share the node's /tmp (default: a private one)")
    p.set_defaults(run=cmd_node)

    p = sub.add_parser("up", help="run a local cluster (coordinator and node) in the foreground")
    p.add_argument("--listen", default="127.0.0.1:7070", help="address to serve on (default 127.0.0.1:7070)")
    p.add_argument("--state-dir", default=str(_default_state_dir().parent / "local"), help="where to write ca.pem")
    p.set_defaults(run=cmd_up)

    p = sub.add_parser("status", help="show the configured fleet's nodes, free resources and isolation")
    p.add_argument("--api-key", help="the fleet's API key (default: FLEETMAP_API_KEY or the config file)")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser(
        "jobs", help="list your running and recent jobs, show one (fleetmap jobs show ID), or cancel one"
    )
    p.add_argument("action", nargs="?", choices=["list", "show", "cancel"], default="list")
    p.add_argument("job", nargs="?", type=int, help="the job to show or cancel")
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
