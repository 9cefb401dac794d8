"""Type stub of ``fleetmap._native``, the compiled core (``python/src/``).

The module converts types between Python and the Rust crates and holds the
process's tokio runtime. Every blocking call releases the GIL. Failures
raise the ``fleetmap`` exception classes themselves (defined in
``fleetmap/_errors.py``, looked up by the extension when it is imported;
``python/src/errors.rs`` says which Rust error becomes which class).

Keep this file in step with the ``#[pymodule]`` in ``python/src/lib.rs``.
"""

import os
from typing import Any, List, Optional, Sequence, Tuple, TypedDict, Union, final, type_check_only

#: Bytes as the core accepts them: ``bytes`` (read in place) or ``bytearray`` (copied).
_Bytes = Union[bytes, bytearray]

__all__ = [
    "VERSION",
    "init_logging",
    "start_local_cluster",
    "connect",
    "keys_create",
    "keys_list",
    "keys_revoke",
    "nodes_approve",
    "nodes_list",
    "nodes_revoke",
    "worker_main",
    "LocalHandle",
    "Connection",
    "Job",
    "WasmModule",
    "validate_wasm",
]

#: fleetmap's software version (the Rust crates' ``CARGO_PKG_VERSION``).
VERSION: str

def init_logging(level: str) -> None:
    """Turns on logging to stderr at ``level`` (``FLEETMAP_LOG`` overrides it);
    only the first call has an effect."""

def start_local_cluster(
    listen: str, python: str, runtime_packages: Sequence[str] = (), uv: Optional[str] = None
) -> LocalHandle:
    """Starts the embedded cluster (a coordinator and one node daemon, fresh
    credentials) in this process on ``listen`` (``"127.0.0.1:0"`` for any
    port), with ``python`` as the workers' default interpreter. Jobs with
    ``packages=`` get environments with ``runtime_packages`` (fleetmap's
    package directories) on their path, installed with ``uv``.

    Raises :class:`fleetmap.ConfigurationError` for a bad address and
    :class:`fleetmap.FleetmapError` when the cluster cannot start."""

@type_check_only
class KeyInfo(TypedDict):
    """One named API key as :func:`keys_list` reports it (a plain ``dict``)."""

    name: str
    #: Unix seconds.
    created: int
    revoked: Optional[int]
    max_slots: Optional[int]
    max_jobs: Optional[int]

def keys_create(
    state_dir: Union[str, "os.PathLike[str]"], name: str, max_slots: Optional[int] = None, max_jobs: Optional[int] = None
) -> str:
    """Makes an API key for principal ``name`` in the coordinator state
    directory ``state_dir``, with an optional quota, and returns it (only
    its SHA-256 is kept). A running coordinator accepts it at once.

    Raises :class:`fleetmap.ConfigurationError` when ``state_dir`` holds no
    coordinator, the name is malformed, or ``name`` already has a key."""

@type_check_only
class NodeInfo(TypedDict):
    """One node as :func:`nodes_list` reports it (a plain ``dict``); times
    in Unix seconds."""

    name: str
    enrolled: int
    expires: Optional[int]
    revoked: Optional[int]
    #: ``None`` while the node waits for approval.
    approved: Optional[int]
    #: When the join token asked to enroll it again while it held a valid
    #: certificate (``fleetmap nodes approve`` retires that certificate).
    requested: Optional[int]

def nodes_approve(state_dir: Union[str, "os.PathLike[str]"], name: str) -> None:
    """Approves node ``name``, waiting to enroll or revoked: it may enroll
    with the join token (at its next try, within seconds)."""

def nodes_list(state_dir: Union[str, "os.PathLike[str]"]) -> list[NodeInfo]:
    """Every node the coordinator in ``state_dir`` enrolled, revoked ones included."""

def nodes_revoke(state_dir: Union[str, "os.PathLike[str]"], name: str) -> None:
    """Revokes node ``name``: a running coordinator disconnects it within a
    second, and refuses its certificate and its name (the join token cannot
    enroll it again)."""

def keys_list(state_dir: Union[str, "os.PathLike[str]"]) -> list[KeyInfo]:
    """Every key in ``state_dir``, revoked ones included."""

def keys_revoke(state_dir: Union[str, "os.PathLike[str]"], name: str) -> None:
    """Revokes ``name``'s key: the coordinator refuses its next job and
    connection. Raises :class:`fleetmap.ConfigurationError` when ``name``
    has no key in force."""

def connect(addr: str, ca_pem: bytes, api_key: str) -> Connection:
    """Connects to the coordinator at ``addr`` (``host:port``), verifying its
    certificate against ``ca_pem`` and presenting ``api_key``.

    Raises :class:`fleetmap.CoordinatorUnreachable` when the coordinator
    cannot be reached, :class:`fleetmap.AuthenticationError` when it refuses
    the key or its certificate does not verify, and
    :class:`fleetmap.FleetmapError` for a protocol error."""

def worker_main(fd: int) -> None:
    """Runs a slot's worker loop on the inherited channel ``fd`` until the
    daemon closes it (called by ``fleetmap._worker.main`` in a worker process)."""

@final
class LocalHandle:
    """The embedded cluster running in this process and its credentials."""

    @property
    def addr(self) -> str:
        """The coordinator's ``host:port``."""
    @property
    def ca_pem(self) -> str:
        """The cluster CA's certificate, PEM text."""
    @property
    def api_key(self) -> str:
        """The API key clients present."""
    @property
    def join_token(self) -> str:
        """The token nodes present to join."""
    def connect(self, api_key: str) -> Connection:
        """A connection to this cluster's coordinator over a link within this
        process (no QUIC or TLS through loopback)."""
    def stop(self) -> None:
        """Stops the node and the coordinator (workers included); later calls do nothing."""

@type_check_only
class NodeStatus(TypedDict):
    """One node as :meth:`Connection.status` reports it (a plain ``dict``)."""

    name: str
    cores: int
    memory_bytes: int
    #: The device minors of the node's GPUs.
    gpus: list[int]
    free_cores: int
    free_memory_bytes: int
    free_gpus: int
    #: How slots are isolated, e.g. whether calls are pinned.
    isolation: str

@type_check_only
class NodeProgress(TypedDict):
    """A job's progress on one node."""

    node: str
    slots: int
    inputs_done: int
    inputs_failed: int

class JobInfo(TypedDict):
    """One job as :meth:`Connection.jobs` reports it (a plain ``dict``)."""

    job: int
    principal: str
    #: The function's ``module.qualname``.
    name: str
    #: ``"running"``, ``"finished"``, ``"failed"``, ``"cancelled"`` or
    #: ``"waiting"`` (for its client to come back after a lost connection).
    state: str
    #: Why it failed, or by whom it was cancelled.
    state_detail: Optional[str]
    #: Unix seconds.
    started: int
    ended: Optional[int]
    slots: int
    nodes: int
    inputs_done: int
    total_inputs: Optional[int]
    inputs_failed: int
    cores: int
    memory_bytes: int
    gpus: int
    per_node: List[NodeProgress]
    #: The first nodes lost under it, as text.
    failures: List[str]

@final
class Connection:
    """An authenticated connection to a coordinator, shared by the calls of a process."""

    def submit(
        self,
        function: bytes,
        cores: int,
        memory_bytes: int,
        gpus: int,
        parallelism: Optional[int],
        total_inputs: Optional[int],
        executable: str,
        version: str,
        environment: Optional[Tuple[str, List[str], bool]] = None,
        sources: Optional[Tuple[str, bytes]] = None,
        require_isolation: bool = False,
        image: Optional[str] = None,
        first: Optional[Tuple[int, bytes]] = None,
        only: bool = False,
        name: str = "",
        resume_token: str = "",
        grace_s: float = 0.0,
        resumes: Optional[Tuple[int, int]] = None,
        detached: bool = False,
    ) -> Job:
        """Submits a job of the pickled Python ``function``: each call gets
        ``cores`` cores, ``memory_bytes`` of memory and ``gpus`` GPUs; at most
        ``parallelism`` slots (``None``: as many as are free);
        ``total_inputs`` is ``None`` when the inputs are streamed. Workers run
        ``executable`` (Python ``version``, ``"3.11"``) or, with an
        ``environment`` ``(id, requirements, resolve)``, an environment each
        node builds with those requirements; ``sources`` is ``(sha256,
        zip)`` of the caller's local modules, put first on the workers' path;
        with ``require_isolation`` only nodes that pin calls run them.
        ``first`` is ``(count, payload)`` of the job's first chunk (from
        input 0, at most 1 MiB), sent with the submission so that the first
        call waits for no round trip more (the job's ``credit`` is for the
        chunks after it); ``only``: it holds all the inputs. ``name`` is
        the function's name, for listings. With a ``resume_token`` the job
        outlives a lost connection for ``grace_s`` seconds (the coordinator
        caps it): a submission with the same token and ``resumes`` ``(job
        id, inputs with an outcome)`` picks it up again, under the same id
        where it can, its chunks numbered from 0 again. A ``detached`` job's
        outputs stay with the coordinator (:meth:`results`), and it runs on
        without its client once all its inputs are in.

        Returns once the coordinator has placed the job's slots; raises
        :class:`fleetmap.JobRejected` when no node can host one call, or
        :class:`fleetmap.CoordinatorUnreachable` when the connection is gone."""
    @property
    def coordinator_version(self) -> str:
        """The fleetmap version the coordinator runs (from its ``Welcome``)."""
    def close(self) -> None:
        """Closes the connection; its running jobs are cancelled."""
    def closed(self) -> bool:
        """Whether the connection is gone (closed, timed out or reset)."""
    @property
    def local(self) -> bool:
        """Whether this is a link within this process (to the embedded cluster) rather than QUIC."""
    def results(self, job: int, offset: int) -> Tuple[list[Tuple[int, int, int, str, bytes]], Optional[int]]:
        """A page of detached job ``job``'s outputs from byte ``offset`` (0,
        then each page's next): ``(first_input, count, failed, node,
        payload)`` in the order they finished, and where the next page starts
        (``None``: no more kept yet). Raises :class:`fleetmap.JobRejected`
        when the coordinator keeps none for this key."""
    def status(self) -> Tuple[list[NodeStatus], int]:
        """The fleet's nodes and the number of running jobs; raises like
        :meth:`submit` when the connection is gone."""
    def jobs(self) -> list[JobInfo]:
        """The jobs of this connection's principal (the owner of its API
        key), whichever connection submitted them, running ones and the last
        that ended (the coordinator keeps 200); no other principal's."""
    def cancel(self, job: int) -> None:
        """Cancels job ``job`` if it belongs to this connection's principal;
        the connection that submitted it raises :class:`fleetmap.JobFailed`."""

#: What :meth:`Job.events` returns, one tuple per event. The first item says
#: which:
#:
#: - ``("output", first_input, count, failed, node, payload)``: the pickled
#:   ``(outputs, failures)`` of ``count`` inputs from ``first_input``;
#:   ``failed`` is true when the function raised on one of them;
#: - ``("log", stream, node, text)``: a line a call printed, ``stream`` is
#:   ``"stdout"`` or ``"stderr"``;
#: - ``("credit", n)``: ``n`` more chunks may be sent;
#: - ``("finished",)``: every input has its output;
#: - ``("failed", reason, kind)``: the job stopped; ``kind`` is
#:   ``"environment"`` when a node could not prepare the job's environment,
#:   ``"image"`` for its image, ``"cancelled"`` when it was cancelled, else
#:   ``"job"``;
#: - ``("disconnected", reason)``: the connection to the coordinator was
#:   lost; a job submitted with a resume token waits for its client to
#:   submit it again (:meth:`Connection.submit` with ``resumes``).
#:
#: Typed as plain tuples so that callers may index and unpack them after
#: testing the first item. (A name for the stub only: it does not exist at
#: run time.)
_JobEvent = Tuple[Any, ...]

@final
class Job:
    """A running job. Cancelled when its connection closes."""

    @property
    def id(self) -> int:
        """The job's number at the coordinator."""
    @property
    def slots(self) -> int:
        """Slots placed when the job was accepted."""
    @property
    def nodes(self) -> int:
        """Nodes those slots are on."""
    @property
    def credit(self) -> int:
        """Chunks the client may send before it gets more credit."""
    def send_chunk(self, chunk: int, first_input: int, count: int, payload: bytes) -> None:
        """Sends chunk number ``chunk``: ``count`` inputs from ``first_input``,
        pickled as one list in ``payload``. The caller keeps within its credit."""
    def inputs_done(self, chunks: int) -> None:
        """Says that ``chunks`` chunks were sent in all and no more will come."""
    def cancel(self) -> None:
        """Cancels the job: its remote calls are stopped."""
    def events(self, timeout: float) -> list[_JobEvent]:
        """The events that arrive within ``timeout`` seconds: at least one
        unless the time runs out, at most 4096 (see ``_JobEvent`` above)."""

def validate_wasm(module: _Bytes) -> None:
    """Checks that ``module`` (binary or WAT text) compiles to a WASI command
    module; raises :class:`fleetmap.WasmError` (``kind`` ``"invalid"`` or
    ``"no_start"``) if not."""

@final
class WasmModule:
    """A WASI command module compiled in this process (once per module
    bytes), run once per input in a fresh instance: stdin in, stdout out."""

    def __new__(
        cls,
        module: _Bytes,
        memory_limit_bytes: int,
        time_limit_s: Optional[float],
        args: Sequence[str],
        env: Sequence[Tuple[str, str]],
        mounts: Sequence[Tuple[str, str]],
        max_output_bytes: int,
    ) -> WasmModule:
        """Compiles ``module`` (binary or WAT text) with the GIL released.

        Every run gets at most ``memory_limit_bytes`` of linear memory and
        ``time_limit_s`` seconds (``None``: no limit; otherwise above 0, else
        ``ValueError``), the WASI ``args`` and ``env``, the ``mounts`` as
        ``(host directory, guest path)`` pairs, and may write at most
        ``max_output_bytes`` to stdout. Raises :class:`fleetmap.WasmError`
        when the module does not compile."""
    def run(self, stdin: _Bytes) -> bytes:
        """Runs the module in a fresh instance on ``stdin`` and returns its
        stdout (GIL released).

        Raises :class:`fleetmap.WasmTimeout` past the time limit,
        :class:`fleetmap.WasmMemoryLimit` when a memory growth is refused,
        and :class:`fleetmap.WasmError` for a trap, a non-zero exit or too
        much output; its ``kind``, ``stderr`` and ``exit_code`` say more."""
    def run_with_stderr(self, stdin: _Bytes) -> Tuple[bytes, str]:
        """Like :meth:`run`, returning ``(stdout, stderr)``."""
