"""``remote_parallel_map``: the call."""

from __future__ import annotations

import contextlib
import functools
import inspect
import collections.abc
import itertools
import math
import operator
import os
import pickle
import re
import secrets
import site
import sys
import sysconfig
import time
import types
import warnings
import weakref
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    FrozenSet,
    Generator,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
)

from . import _environment, _fleet, _native, _sources
from ._errors import (
    CoordinatorUnreachable,
    EnvironmentSetupError,
    ImageError,
    InputError,
    JobCancelled,
    JobFailed,
    JobRejected,
)
from ._inspect import describe_size, describe_unpicklable
from ._progress import Progress

#: Largest pickled chunk of inputs the client aims for; chunks shrink to fit.
_TARGET_CHUNK_BYTES = 1 << 20
#: Seconds of work a chunk aims for once calls have been timed.
_TARGET_CHUNK_SECONDS = 0.05
#: Largest pickled input or function (the protocol's message limit, 1 GiB,
#: less headroom for the envelope).
MAX_PAYLOAD_BYTES = (1 << 30) - (64 << 10)
#: The most a job's first chunk may pickle to and still travel with its
#: submission (the protocol's FIRST_CHUNK_BYTES).
_FIRST_CHUNK_BYTES = 1 << 20

_MAX_CPU, _MAX_RAM, _MAX_GPU, _MAX_SLOTS = 96, 624, 4, 4000

_REFUSED_TYPES = (
    types.GeneratorType,
    types.FrameType,
    types.TracebackType,
    types.CoroutineType,
    types.AsyncGeneratorType,
)
# None of these types can be subclassed, so ``type(item) in`` this set is the
# isinstance test; checking it with set.isdisjoint over map(type, ...) runs in
# C, about 6x faster than a Python loop over the inputs (2 ms against 12 ms
# for 100,000 inputs).
_REFUSED_TYPE_SET = frozenset(_REFUSED_TYPES)


def remote_parallel_map(
    function_: Callable[[Any], Any],
    inputs: Iterable[Any],
    parallelism: int = -1,
    func_cpu: int = 1,
    func_ram: float = 1,
    func_gpu: int = 0,
    verbose: bool = True,
    image: Optional[str] = None,
    packages: Optional[Sequence[str]] = None,
    api_key: Optional[str] = None,
    *,
    return_exceptions: bool = False,
    generator: bool = False,
    require_isolation: Optional[bool] = None,
    grace: float = 60.0,
    detach: bool = False,
) -> Any:
    """Runs ``function_`` on every element of ``inputs`` in parallel on the fleet.

    Returns the outputs in input order. Each call gets ``func_cpu`` dedicated
    cores, ``func_ram`` GiB of memory and ``func_gpu`` whole GPUs; at most
    ``parallelism`` calls run at once (-1: as many as the fleet has free, up
    to 4000). An exception raised by ``function_`` on input *i* is re-raised
    here with its original type, message and remote traceback, and
    ``input_index == i``; the job stops at the first failure. With
    ``return_exceptions=True`` the job runs every input and the exception
    stands in the returned list in place of the output. With
    ``generator=True`` it returns at once an iterator of ``(index, output)``
    pairs in the order the calls complete; leaving the loop early cancels
    the rest of the job. With ``require_isolation=True`` (or
    ``FLEETMAP_REQUIRE_ISOLATION=1``) the calls run only on nodes that pin
    them in cgroups, never on one started with ``--allow-unisolated``.

    A lost connection does not lose the job: when this process sleeps, its
    link drops or the coordinator restarts, the fleet keeps the job for
    ``grace`` seconds (60 by default, capped by the coordinator) and this
    call picks it up again when it can reach the coordinator, running again
    only the inputs it has no outcome for; every output still arrives once
    and in order. ``grace=0`` fails the job with its connection. Ctrl-C
    cancels at once, as does leaving a ``generator=True`` loop early.

    With ``detach=True`` the call returns a :class:`fleetmap.JobHandle` as
    soon as all the inputs are in the fleet, and the job runs on (every
    input, whatever its calls raise) while the coordinator keeps its
    outputs: ``handle.results()``, or ``fleetmap.job(ID).results()`` from
    any process with the same API key, returns them in input order.

    With no fleet configured (``FLEETMAP_COORDINATOR`` or the config file),
    the calls run on an embedded cluster in this process.
    """
    _check_arguments(function_, parallelism, func_cpu, func_ram, func_gpu, image, packages)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= 86400:
        raise ValueError(f"grace must be a number of seconds from 0 to 86400, got {grace!r}")
    if detach and generator:
        raise ValueError("detach=True returns a handle on the job, not its outputs: drop generator=True")
    # Read once for the whole call.
    settings = _fleet.file_settings()
    isolated = _fleet.require_isolation(require_isolation, settings)
    if packages is not None:
        _environment.packages_environment(packages)  # checked before anything runs
    source = _InputSource(inputs)
    if source.empty():
        return iter(()) if generator else []
    scope = _local_modules()
    sources = scope.__enter__()
    try:
        function_blob = _pickle_function(function_)
        first_chunk = _first_chunk(source)
        fleet = _fleet.fleet_address(api_key, settings)
        # An image is the job's environment: the caller's is not replicated.
        environment = None if image is not None and packages is None else _environment.job_environment(packages, fleet.embedded)
        # The job's resume token: only this call can pick the job up again.
        token = secrets.token_hex(16)
        submission = functools.partial(
            _submit,
            fleet,
            function_blob,
            source.total,
            parallelism,
            func_cpu,
            func_ram,
            func_gpu,
            environment,
            sources,
            isolated,
            image,
            name=_function_name(function_),
            # A detached job is not picked up again: it needs no caller.
            resumable=("", 0.0) if detach else (token, float(grace)),
            detached=detach,
        )
        job = submission(first=first_chunk)
    except BaseException:
        scope.__exit__(*sys.exc_info())
        raise
    outer = os.environ.get("FLEETMAP_JOB") if job.slots == 0 and not fleet.embedded else None
    if outer:
        warnings.warn(
            f"this call of job {outer} submitted a job of its own, which got no slot yet: it waits for "
            f"room on the fleet. If every slot is held by calls that wait like this one, none will come; "
            "give the outer call a smaller parallelism= to leave room",
            RuntimeWarning,
            stacklevel=2,
        )
    if detach:
        try:
            return _upload(job, source, first_chunk is not None, fleet, api_key)
        finally:
            scope.__exit__(*sys.exc_info())
    progress = Progress(
        source.total, enabled=verbose, where=fleet.description, slots=job.slots, nodes=job.nodes, job=job.id
    )
    chunks = _chunk_outcomes(
        _Current(job, submission, float(grace)), source, progress, return_exceptions, scope, first_chunk
    )
    if generator:
        return _each_outcome(chunks)
    results: List[Any] = [None] * (source.total or 0)
    # Closing the generator on any way out (Ctrl-C between two chunks
    # included) cancels the job at once rather than when it is collected.
    with contextlib.closing(chunks):
        for first, outputs in chunks:
            if len(results) < first + len(outputs):
                results.extend([None] * (first + len(outputs) - len(results)))
            results[first : first + len(outputs)] = outputs
    return results


def _each_outcome(chunks: Iterator[Tuple[int, List[Any]]]) -> Iterator[Tuple[int, Any]]:
    """``(index, output)`` for every input, as chunks complete."""
    for first, outputs in chunks:
        for offset, output in enumerate(outputs):
            yield first + offset, output


def _installed_dirs() -> List[str]:
    """The directories of the standard library and of installed packages:
    the interpreter's own, and every ``sys.path`` entry that holds installed
    distributions (``.dist-info`` or ``.egg-info``), such as a second
    virtualenv's site-packages added by a ``.pth`` file or ``PYTHONPATH``."""
    dirs = set()
    for scheme_path in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(scheme_path)
        if path:
            dirs.add(path)
    try:
        dirs.update(site.getsitepackages())
    except AttributeError:  # some virtualenv versions lack it
        pass
    user_site = getattr(site, "getusersitepackages", lambda: None)()
    if user_site:
        dirs.add(user_site)
    for entry in sys.path:
        if entry and entry not in dirs and _holds_distributions(entry):
            dirs.add(entry)
    return [os.path.join(os.path.realpath(d), "") for d in dirs]


def _holds_distributions(directory: str) -> bool:
    """Whether ``directory`` holds installed distributions' metadata."""
    try:
        with os.scandir(directory) as entries:
            return any(e.name.endswith((".dist-info", ".egg-info")) for e in entries)
    except OSError:
        return False


#: The installed directories, and the ``sys.path`` they were computed for.
_INSTALLED_DIRS: Optional[List[str]] = None
_INSTALLED_FOR: Tuple[str, ...] = ()
#: Whether each module (by name, and the module object's id, so that a
#: reloaded or replaced module is looked at again) is local: resolving
#: every module's path on every job would cost milliseconds.
_LOCALITY: Dict[str, Tuple[int, bool]] = {}
#: The local modules last found, and the state of ``sys.modules`` they were
#: found in: its length, and its newest entry's name and module.
_LOCAL_FOUND: Tuple[Optional[Tuple[int, Any, Any]], Dict[str, Any]] = (None, {})


def _is_local_module(name: str, module: Any) -> bool:
    """Whether ``module`` is one of the caller's own files: neither the
    standard library, nor an installed package (anything in a directory of
    installed distributions, wherever it is on ``sys.path``), nor fleetmap
    itself. The
    nodes cannot import such a module (another machine, another working
    directory, pytest's test modules), so what it defines travels by value."""
    if not isinstance(module, types.ModuleType) or name in ("__main__", "__mp_main__"):
        return False
    if name.partition(".")[0] in ("fleetmap", "cloudpickle"):
        # The worker runtime, which every node brings, wherever it lives here.
        return False
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return False
    real = os.path.realpath(path)
    return not any(real.startswith(d) for d in _INSTALLED_DIRS or ())


class _local_modules:
    """The caller's local modules: zipped as source for the workers (their
    functions and classes then travel by reference), and, for those the zip
    cannot hold, pickled by value while the job is sent (between
    ``__enter__``, which returns the zip, and ``__exit__``).

    A class rather than a generator: every call enters it, and a loop of
    short calls pays for each line here."""

    __slots__ = ("registered",)

    def __init__(self) -> None:
        self.registered: List[types.ModuleType] = []

    def __enter__(self) -> Optional[_sources.SourceBundle]:
        local = _local_modules_now()
        if not local:
            return None
        bundle, by_value = _sources.bundle({name: module.__file__ for name, module in local.items()})
        if by_value:
            import cloudpickle

            for name in by_value:
                module = local[name]
                try:
                    cloudpickle.register_pickle_by_value(module)
                except Exception:  # noqa: BLE001 - a module cloudpickle cannot register stays by reference
                    continue
                self.registered.append(module)
        return bundle

    def __exit__(self, *exc: Any) -> None:
        if self.registered:
            import cloudpickle

            for module in self.registered:
                try:
                    cloudpickle.unregister_pickle_by_value(module)
                except Exception:  # noqa: BLE001
                    pass
            self.registered = []


def _local_modules_now() -> Dict[str, Any]:
    """The caller's local modules now, by name, less those the caller
    registered with cloudpickle to go by value itself."""
    global _INSTALLED_DIRS, _INSTALLED_FOR, _LOCAL_FOUND
    # Scanned once per process, and again only when sys.path changes.
    if _INSTALLED_DIRS is None or _INSTALLED_FOR != tuple(sys.path):
        _INSTALLED_FOR = tuple(sys.path)
        _INSTALLED_DIRS = _installed_dirs()
        _LOCALITY.clear()
        _LOCAL_FOUND = (None, {})
    # The modules are looked through again only when one was imported or
    # removed since (a loop of jobs imports nothing): the count and the
    # newest entry say so without a look at every module.
    modules = sys.modules
    newest = next(reversed(modules.items()), None)
    state = _LOCAL_FOUND[0]
    if state is None or state[0] != len(modules) or state[1] != (newest and newest[0]) or state[2] is not (
        newest and newest[1]
    ):
        found: Dict[str, Any] = {}
        for name, module in list(modules.items()):
            known = _LOCALITY.get(name)
            if known is not None and known[0] == id(module):
                is_local = known[1]
            else:
                is_local = _is_local_module(name, module)
                _LOCALITY[name] = (id(module), is_local)
            if is_local and module.__name__ == name:
                found[name] = module
        _LOCAL_FOUND = ((len(modules), newest and newest[0], newest and newest[1]), found)
    found = _LOCAL_FOUND[1]
    if not found:
        return found
    import cloudpickle

    already = cloudpickle.list_registry_pickle_by_value()
    return {name: module for name, module in found.items() if name not in already}


# Functions whose signature takes one positional argument, with what the
# answer was read from: a loop of calls of one function checks it once.
_ONE_ARGUMENT: "weakref.WeakKeyDictionary[Any, Tuple[Any, ...]]" = weakref.WeakKeyDictionary()


def _check_signature(function_: Any) -> None:
    """Raises TypeError unless ``function_(input)`` is a valid call."""
    key = (
        getattr(function_, "__code__", None),
        getattr(function_, "__defaults__", None),
        getattr(function_, "__kwdefaults__", None),
        getattr(function_, "__signature__", None),
    )
    try:
        known = _ONE_ARGUMENT.get(function_) if key[0] is not None else None
    except TypeError:
        known = None  # Not weakly referenceable or not hashable: checked each time.
    if known is not None and all(map(operator.is_, known, key)):
        return
    try:
        signature = inspect.signature(function_)
    except (TypeError, ValueError):
        return  # Builtins without a signature: nothing to check.
    try:
        signature.bind(None)
    except TypeError as exc:
        name = getattr(function_, "__qualname__", repr(function_))
        raise TypeError(
            f"function_ {name}{signature} cannot be called with one positional argument ({exc}); "
            "remote_parallel_map calls function_(input) for each input"
        ) from None
    if key[0] is not None:
        try:
            _ONE_ARGUMENT[function_] = key
        except TypeError:
            pass


def _check_arguments(
    function_: Any, parallelism: Any, func_cpu: Any, func_ram: Any, func_gpu: Any, image: Any, packages: Any
) -> None:
    # Typed Any: these are the caller's arguments as given, checked here.
    if image is not None:
        _check_image(image)
    if not callable(function_):
        raise TypeError(f"function_ must be callable, got {type(function_).__name__}")
    _check_signature(function_)
    if parallelism != -1:
        _check_whole("parallelism", parallelism, 1, _MAX_SLOTS)
    _check_whole("func_cpu", func_cpu, 1, _MAX_CPU)
    _check_whole("func_gpu", func_gpu, 0, _MAX_GPU)
    if isinstance(func_ram, bool) or not isinstance(func_ram, (int, float)) or not 0 < func_ram <= _MAX_RAM:
        raise ValueError(f"func_ram must be a number of GiB above 0 and at most {_MAX_RAM}, got {func_ram!r}")


def _check_whole(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")


# What an image reference may hold: [REGISTRY/]REPOSITORY[:TAG][@sha256:HEX].
_IMAGE_REFERENCE = re.compile(
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(@sha256:[0-9a-f]{64})?$"
)


def _check_image(image: Any) -> None:
    if not isinstance(image, str) or len(image) > 512 or not _IMAGE_REFERENCE.match(image):
        raise ValueError(
            f"image must be an OCI image reference such as 'registry.lab:5000/team/py311:2026.11' "
            f"or '...@sha256:DIGEST', got {image!r}"
        )


# What a function's pickle may be made of for it to be kept from one job to
# the next: values that never change while they are the same object.
# These scalars are also what the standard pickler writes exactly as
# cloudpickle does (see _pickle_chunk).
_IMMUTABLE = frozenset({int, float, complex, str, bytes, bool, type(None)})
# Functions pickled before, with what their pickle was made of (see
# _pickle_inputs_of); a loop of jobs of one function pickles it once.
_PICKLED: "weakref.WeakKeyDictionary[Any, Tuple[Tuple[Any, ...], FrozenSet[str], bytes]]" = weakref.WeakKeyDictionary()
_NAMES_USED: "weakref.WeakKeyDictionary[types.CodeType, Tuple[str, ...]]" = weakref.WeakKeyDictionary()
_MISSING = object()


def _names_used(code: types.CodeType) -> Tuple[str, ...]:
    """Every name ``code`` and the code nested in it look up (a superset
    of the globals they read)."""
    names = _NAMES_USED.get(code)
    if names is None:
        found = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                found.update(_names_used(const))
        names = tuple(sorted(found))
        _NAMES_USED[code] = names
    return names


def _unchanging(value: Any, by_value: FrozenSet[str]) -> bool:
    """Whether ``value`` pickles the same for as long as it is the same
    object: an immutable scalar, a builtin function or class, or a module
    that is imported (pickled by reference, not by value)."""
    # Exact types: a subclass (an enum of the caller's, say) may pickle
    # with its class, by value.
    if value is _MISSING or type(value) in _IMMUTABLE:
        return True
    if type(value) is types.BuiltinFunctionType:
        # `len`, `math.sqrt`; not a method bound to an object (`table.get`,
        # `random.random`), which pickles with that object's state now.
        owner = getattr(value, "__self__", None)
        return owner is None or isinstance(owner, types.ModuleType)
    if type(value) is type:
        return value.__module__ == "builtins"
    if isinstance(value, types.ModuleType):
        name = value.__name__
        return sys.modules.get(name) is value and name not in by_value
    return False


def _pickle_inputs_of(function_: Any, by_value: FrozenSet[str]) -> Optional[Tuple[Any, ...]]:
    """Everything a plain function's pickle is made of (its code, names,
    defaults, annotations, the globals it reads and the contents of its
    closure), when all of it is unchanging: then the same objects give the
    same pickle. ``None`` when the pickle could change with none of them
    replaced (it reads a list, another function of the caller's, has
    attributes set): such a function is pickled every time."""
    if type(function_) is not types.FunctionType or function_.__dict__:
        return None
    parts: List[Any] = [
        function_.__code__,
        function_.__name__,
        function_.__qualname__,
        function_.__module__,
        function_.__doc__,
    ]
    globals_ = function_.__globals__
    for name in _names_used(function_.__code__):
        parts.append(globals_.get(name, _MISSING))
    parts.extend(function_.__defaults__ or ())
    for name, value in sorted((function_.__kwdefaults__ or {}).items()):
        parts.extend((name, value))
    for name, value in function_.__annotations__.items():
        parts.extend((name, value))
    for cell in function_.__closure__ or ():
        try:
            parts.append(cell.cell_contents)
        except ValueError:  # an empty cell
            parts.append(_MISSING)
    for part in itertools.islice(parts, 5, None):
        if type(part) not in _IMMUTABLE and not _unchanging(part, by_value):
            return None
    return tuple(parts)


def _pickle_function(function_: Callable[[Any], Any]) -> bytes:
    import cloudpickle

    by_value = frozenset(cloudpickle.list_registry_pickle_by_value())
    inputs = _pickle_inputs_of(function_, by_value)
    if inputs is not None:
        known = _PICKLED.get(function_)
        if (
            known is not None
            and known[1] == by_value
            and len(known[0]) == len(inputs)
            and all(map(operator.is_, known[0], inputs))
        ):
            return known[2]
    blob = _pickle_function_now(function_)
    if inputs is not None:
        _PICKLED[function_] = (inputs, by_value, blob)
    return blob


def _pickle_function_now(function_: Callable[[Any], Any]) -> bytes:
    import cloudpickle

    try:
        blob: bytes = cloudpickle.dumps(function_, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise InputError(
            f"function_ {getattr(function_, '__qualname__', function_)!r} cannot be sent: "
            + describe_unpicklable(function_, "function_")
        ) from exc
    if len(blob) > MAX_PAYLOAD_BYTES:
        name = getattr(function_, "__qualname__", repr(function_))
        raise InputError(
            f"function_ {name!r} is too large to send: "
            + describe_size(function_, "function_", len(blob), MAX_PAYLOAD_BYTES)
        )
    return blob


#: The caller's ``major.minor``: workers must run the same.
_PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def _submit(
    fleet: _fleet.FleetAddress,
    function_blob: bytes,
    n: Optional[int],
    parallelism: int,
    func_cpu: int,
    func_ram: float,
    func_gpu: int,
    environment: Optional[_environment.Environment] = None,
    sources: Optional[_sources.SourceBundle] = None,
    require_isolation: bool = False,
    image: Optional[str] = None,
    first: Optional[Tuple[int, bytes]] = None,
    name: str = "",
    resumable: Tuple[str, float] = ("", 0.0),
    resumes: Optional[Tuple[int, int]] = None,
    detached: bool = False,
) -> _native.Job:
    args = (
        function_blob,
        func_cpu,
        int(func_ram * (1 << 30)),
        func_gpu,
        None if parallelism == -1 else parallelism,
        n,
        sys.executable,
        _PYTHON_VERSION,
        None if environment is None else (environment.id, environment.requirements, environment.resolve),
        None if sources is None else (sources.digest, sources.zip),
        require_isolation,
        image,
        first,
        first is not None and n == 1,
        name,
        resumable[0],
        resumable[1],
        resumes,
        detached,
    )
    for attempt in range(2):
        conn = _fleet.connection(fleet, fresh=attempt > 0)
        try:
            return conn.submit(*args)
        except CoordinatorUnreachable:
            if attempt > 0:
                raise
            # The shared connection may have died since the last call.
            _fleet.forget(fleet)
    raise AssertionError("unreachable: the loop returns or raises")


def _refuse_unsendable(items: Sequence[Any], first: int) -> None:
    # A C-level pre-scan: the five refused types cannot be subclassed, so
    # their exact type decides, and the per-item loop runs only on a hit.
    if _REFUSED_TYPE_SET.isdisjoint(map(type, items)):
        return
    for i, item in enumerate(items):
        if isinstance(item, _REFUSED_TYPES):
            raise InputError(
                f"input {first + i} is a {type(item).__name__}, which cannot be sent to another process; "
                "pass the values it would produce instead",
                input_index=first + i,
            )


class _InputSource:
    """Hands out the inputs chunk by chunk.

    A sequence is indexed (and checked whole before anything runs); any
    other iterable, a generator of a million items say, is consumed lazily,
    one chunk at a time within the coordinator's credit, so the client holds
    only the chunks in flight, never the whole input.
    """

    def __init__(self, inputs: Iterable[Any]) -> None:
        self.next_index = 0
        self.pending: List[Any] = []
        if type(inputs) is list or type(inputs) is tuple or isinstance(inputs, collections.abc.Sequence):
            self.items: Optional[Sequence[Any]] = inputs
        elif isinstance(inputs, collections.abc.Sized):
            self.items = list(inputs)
        else:
            self.items = None
            self.iterator = iter(inputs)
        self.total: Optional[int] = len(self.items) if self.items is not None else None
        if self.items is not None:
            _refuse_unsendable(self.items, 0)

    def empty(self) -> bool:
        if self.items is not None:
            return len(self.items) == 0
        self.pending = list(itertools.islice(self.iterator, 1))
        return not self.pending

    def exhausted(self) -> bool:
        if self.items is not None:
            return self.next_index >= len(self.items)
        if not self.pending:
            self.pending = list(itertools.islice(self.iterator, 1))
        return not self.pending

    def take(self, count: int) -> List[Any]:
        """The next ``count`` inputs (fewer at the end), not yet consumed."""
        if self.items is not None:
            return list(self.items[self.next_index : self.next_index + count])
        if len(self.pending) < count:
            more = list(itertools.islice(self.iterator, count - len(self.pending)))
            _refuse_unsendable(more, self.next_index + len(self.pending))
            self.pending.extend(more)
        return self.pending[:count]

    def consume(self, count: int) -> None:
        self.next_index += count
        if self.items is None:
            del self.pending[:count]


def _function_name(function_: Callable[..., Any]) -> str:
    """What listings call a job of ``function_``: ``module.qualname``."""
    qualname = getattr(function_, "__qualname__", None) or type(function_).__qualname__
    module = getattr(function_, "__module__", None)
    return f"{module}.{qualname}" if module else str(qualname)


def _first_chunk(source: _InputSource) -> Optional[Tuple[int, bytes]]:
    """The job's first chunk, its first input alone, pickled to go with
    the submission (taken from ``source``), unless it is too large to."""
    chunk = source.take(1)
    payload = _pickle_chunk(chunk, 0)
    if len(payload) > _FIRST_CHUNK_BYTES:
        return None
    source.consume(len(chunk))
    return len(chunk), payload


def _pickle_chunk(chunk: List[Any], first: int) -> bytes:
    # A few plain values (a single input, say) skip cloudpickle's set-up;
    # checking a long chunk would cost more than it saves.
    if len(chunk) <= 8 and _IMMUTABLE.issuperset(map(type, chunk)):
        return pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
    import cloudpickle

    try:
        blob: bytes = cloudpickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
        return blob
    except Exception:
        for i, item in enumerate(chunk):
            try:
                cloudpickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                index = first + i
                raise InputError(
                    f"input {index} cannot be sent: " + describe_unpicklable(item, f"inputs[{index}]"),
                    input_index=index,
                ) from exc
        raise


def _next_chunk(
    source: _InputSource, chunk_id: int, slots: int, cap: int, per_input: Optional[float]
) -> Tuple[int, List[Any], bytes, int]:
    """The next chunk of inputs, pickled: its first input's index, the
    inputs, the payload, and the chunk size cap from now on (large inputs
    shrink it). The inputs stay in ``source`` until consumed."""
    first = source.next_index
    left = None if source.total is None else source.total - first
    chunk = source.take(_chunk_size(chunk_id, slots, cap, per_input, left))
    payload = _pickle_chunk(chunk, first)
    while len(payload) > _TARGET_CHUNK_BYTES and len(chunk) > 1:
        # Inputs are large: shrink this chunk and the ones after it.
        chunk = chunk[: max(1, len(chunk) * _TARGET_CHUNK_BYTES // len(payload))]
        cap = len(chunk)
        payload = _pickle_chunk(chunk, first)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InputError(
            f"input {first} pickles to {len(payload)} bytes, over the limit of "
            f"{MAX_PAYLOAD_BYTES} bytes per input; pass a path or a URL to the data instead",
            input_index=first,
        )
    return first, chunk, payload, cap


def _upload(
    job: _native.Job, source: _InputSource, first_sent: bool, fleet: _fleet.FleetAddress, api_key: Optional[str]
) -> Any:
    """Sends a detached job all its inputs, within its credit, and returns
    its handle once the coordinator has them all (its outputs stay there)."""
    from ._jobs import JobHandle

    credit = job.credit
    slots = max(job.slots, 1)
    cap = max(1, math.ceil(source.total / (slots * 4))) if source.total is not None else 4096
    chunk_id = 1 if first_sent else 0
    while not source.exhausted():
        while credit > 0 and not source.exhausted():
            try:
                first, chunk, payload, cap = _next_chunk(source, chunk_id, slots, cap, None)
            except InputError:
                job.cancel()
                raise
            job.send_chunk(chunk_id, first, len(chunk), payload)
            source.consume(len(chunk))
            chunk_id += 1
            credit -= 1
        if source.exhausted():
            break
        for event in job.events(0.1):
            if event[0] == "credit":
                credit += event[1]
            elif event[0] in ("failed", "disconnected"):
                error = JobCancelled if event[0] == "failed" and event[2] == "cancelled" else JobFailed
                raise error(f"job {job.id} stopped while its inputs were sent: {event[1]}")
    if not (first_sent and source.total == 1):
        job.inputs_done(chunk_id)
    # The connection that submitted the job is the shared one: a request
    # on it is answered only after everything sent before it was taken in,
    # so the process may exit once it is (a close drops what is unsent).
    connection = _fleet.connection(fleet)
    if not any(j["job"] == job.id for j in connection.jobs()):
        raise JobFailed(f"job {job.id} ended before all its inputs were in; fleetmap.job({job.id}).status() says how")
    return JobHandle(job.id, api_key)


class _Current:
    """The job a call drives: its incarnation now (a new one after each
    lost connection), and how to submit it again."""

    def __init__(self, job: _native.Job, submission: Callable[..., _native.Job], grace: float) -> None:
        self.job = job
        self.submission = submission
        self.grace = grace

    def resume(self, done: int, reason: str, progress: Progress) -> None:
        """Picks the job up again after its connection was lost: submits it
        again with its resume token, with backoff, until the coordinator
        answers or ``grace`` seconds have passed."""
        job_id = self.job.id
        if self.grace <= 0:
            raise JobFailed(f"job {job_id}: {reason}")
        progress.print_line(
            f"fleetmap: job {job_id}: {reason}; reconnecting for up to {self.grace:.0f} s", sys.stderr
        )
        deadline = time.monotonic() + self.grace
        delay = 0.1
        while True:
            try:
                self.job = self.submission(resumes=(job_id, done))
                break
            except CoordinatorUnreachable as exc:
                if time.monotonic() + delay > deadline:
                    raise JobFailed(
                        f"job {job_id}: {reason}, and the coordinator could not be reached again within "
                        f"{self.grace:.0f} s ({exc}); its unfinished inputs were not run"
                    ) from None
            except JobRejected as exc:
                error = JobCancelled if "was cancelled" in str(exc) else JobFailed
                raise error(f"job {job_id}: {reason}, and it could not be picked up again: {exc}") from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        renamed = "" if self.job.id == job_id else f" as job {self.job.id}"
        progress.print_line(f"fleetmap: job {job_id} picked up again{renamed}", sys.stderr)


def _chunk_outcomes(
    current: _Current,
    source: _InputSource,
    progress: Progress,
    return_exceptions: bool,
    scope: ContextManager[Any],
    first_chunk: Optional[Tuple[int, bytes]],
) -> Generator[Tuple[int, List[Any]], None, None]:
    """Feeds the job its inputs within credit and yields ``(first index,
    outputs)`` per finished chunk. Whatever ends it early (a failure,
    Ctrl-C, the caller leaving a streaming loop) cancels the job.
    ``first_chunk``: chunk 0 (input 0 alone), if it went with the
    submission."""
    finished = False
    try:
        yield from _run(current, source, progress, return_exceptions, first_chunk)
        finished = True
    finally:
        if not finished:
            # Stop every remote call of the job.
            current.job.cancel()
        progress.close(success=finished)
        scope.__exit__(None, None, None)


def _check_outcomes(
    outstanding: Dict[int, int], first: int, count: int, outputs: Any, failures: Any, node: str
) -> None:
    """Checks that an answer is the one expected for a chunk still
    outstanding: its inputs, as many outputs as inputs, failures among them.
    Takes the chunk off ``outstanding``; anything else fails the job."""
    expected = outstanding.get(first)
    if (
        expected != count
        or not isinstance(outputs, list)
        or len(outputs) != count
        or any(not first <= f.index < first + count for f in failures)
    ):
        raise JobFailed(
            f"node {node} answered for inputs {first}..{first + count - 1} with outcomes that do not "
            "match a chunk this job is waiting for; no output was taken from it. Report the node to "
            "the fleet's operator"
        )
    del outstanding[first]


def _chunk_size(chunk_id: int, slots: int, cap: int, per_input: Optional[float], left: Optional[int]) -> int:
    """How many inputs the next chunk takes: one at first, doubling with
    every round of slots, up to ``cap``; once calls are timed
    (``per_input`` seconds each), about ``_TARGET_CHUNK_SECONDS`` of work;
    and, with ``left`` inputs to go, no more than half a slot's share of
    them, so that the job ends on every slot at about the same time."""
    size = min(cap, 1 << min(chunk_id // slots, 30))
    if per_input is not None:
        size = min(size, max(1, int(_TARGET_CHUNK_SECONDS / max(per_input, 1e-9))))
    if left is not None:
        size = min(size, max(1, math.ceil(left / (2 * slots))))
    return size


def _run(
    current: _Current,
    source: _InputSource,
    progress: Progress,
    return_exceptions: bool,
    first_chunk: Optional[Tuple[int, bytes]],
) -> Generator[Tuple[int, List[Any]], None, None]:
    job = current.job
    total = source.total
    slots = max(job.slots, 1)
    # Chunks grow to as many as four per slot (multiprocessing's heuristic,
    # so that slots finishing early find more work), or to 4,096 inputs when
    # the length is unknown, and shrink where inputs are large. They start
    # at one input and double with every round of slots, so the first
    # results come after one call, not after a whole chunk.
    cap = max(1, math.ceil(total / (slots * 4))) if total is not None else 4096
    # Once chunks have come back, their measured time per input sizes the
    # next ones: about _TARGET_CHUNK_SECONDS of work each, so that short
    # calls batch and long calls spread one by one over the slots. Near the
    # end, no chunk takes more than its share of what is left, so no slot
    # finishes long after the others.
    per_input: Optional[float] = None
    credit = job.credit
    chunk_id = done = 0
    inputs_done = False
    # Chunks sent and not yet answered, by first input: each answer must
    # match one exactly, so every input gets exactly one outcome. Their
    # payloads are kept (within the job's credit) to be sent again if the
    # connection is lost before they are answered.
    outstanding: Dict[int, int] = {}
    held: Dict[int, bytes] = {}
    # Chunks to send again, first, after the job was picked up again.
    resend: List[int] = []
    if first_chunk is not None:
        outstanding[0] = first_chunk[0]
        held[0] = first_chunk[1]
        chunk_id = 1
        # A job of one input said so with its submission.
        inputs_done = total == 1
    while True:
        while credit > 0 and resend:
            first = resend.pop(0)
            job.send_chunk(chunk_id, first, outstanding[first], held[first])
            chunk_id += 1
            credit -= 1
        while credit > 0 and not resend and not source.exhausted():
            first, chunk, payload, cap = _next_chunk(source, chunk_id, slots, cap, per_input)
            job.send_chunk(chunk_id, first, len(chunk), payload)
            outstanding[first] = len(chunk)
            held[first] = payload
            source.consume(len(chunk))
            chunk_id += 1
            credit -= 1
        if source.exhausted() and not resend and not inputs_done:
            job.inputs_done(chunk_id)
            inputs_done = True
        for event in job.events(0.1):
            kind = event[0]
            if kind == "output":
                _, first, count, failed, node, payload = event
                outputs, failures, seconds = pickle.loads(payload)
                _check_outcomes(outstanding, first, count, outputs, failures, node)
                del held[first]
                sample = seconds / max(count, 1)
                per_input = sample if per_input is None else 0.7 * per_input + 0.3 * sample
                if failed and not return_exceptions:
                    raise min(failures, key=lambda f: f.index).to_exception(node)
                for failure in failures:
                    outputs[failure.index - first] = failure.to_exception(node)
                done += count
                progress.update(done)
                yield first, outputs
                if inputs_done and not outstanding and not resend:
                    # Every input has its outcome: the job is over here,
                    # and its end on the fleet is not waited for (the
                    # coordinator ended it when it passed this output on).
                    return
            elif kind == "credit":
                credit += event[1]
            elif kind == "log":
                _, stream, _node, text = event
                progress.print_line(text, sys.stderr if stream == "stderr" else sys.stdout)
            elif kind == "finished":
                if outstanding:
                    missing = min(outstanding)
                    raise JobFailed(
                        f"the fleet ended the job without outcomes for inputs {missing}.."
                        f"{missing + outstanding[missing] - 1} ({len(outstanding)} chunks in all); "
                        "this is a fleet bug: run the job again and report it"
                    )
                return
            elif kind == "disconnected":
                # A new incarnation of the job, numbering its chunks from 0,
                # gets every chunk without an answer again, then the rest.
                current.resume(done, event[1], progress)
                job = current.job
                credit = job.credit
                chunk_id = 0
                resend = sorted(outstanding)
                inputs_done = False
                break
            elif kind == "failed":
                error = {"environment": EnvironmentSetupError, "image": ImageError, "cancelled": JobCancelled}.get(
                    event[2], JobFailed
                )
                raise error(event[1])
        progress.tick()
