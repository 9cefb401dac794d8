"""Finding what cannot be pickled, and where it sits.

When pickling the function or an input fails, the bare error ("cannot pickle
'_thread.lock' object") rarely says which of a thousand objects is at fault.
This walks containers, instance attributes and a function's closure,
globals and defaults, as Ray's serializability inspector does, and names the
first object that fails on its own, by its path.
"""

from __future__ import annotations

import types
from typing import Any, Iterator, List, Optional, Tuple

_MAX_DEPTH = 8
_MAX_CHILDREN = 10_000

_HINTS = {
    types.GeneratorType: "pass the values it would produce instead (a list)",
    types.FrameType: "frames cannot leave their process; pass the values you need from it",
    types.TracebackType: "tracebacks cannot leave their process; pass the formatted text instead",
    types.CoroutineType: "await it here and pass the result instead",
    types.AsyncGeneratorType: "pass the values it would produce instead (a list)",
}


def hint(obj: Any) -> str:
    """What to do about an object that cannot be pickled."""
    if type(obj) in _HINTS:
        return _HINTS[type(obj)]
    name = type(obj).__name__
    if "lock" in name.lower() or name in ("socket", "SSLSocket", "Thread", "Connection", "Popen"):
        return "create it inside the function instead of passing or capturing it"
    if hasattr(obj, "read") and hasattr(obj, "close"):
        return "pass the file's path and open it inside the function"
    return "create it inside the function, or pass something it can be built from"


def _children(obj: Any, path: str) -> Iterator[Tuple[str, Any]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{path}[{key!r}]", value
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield f"{path}[{i}]", value
    elif isinstance(obj, (set, frozenset)):
        for value in obj:
            yield f"an element of {path}", value
    elif isinstance(obj, types.FunctionType):
        code = obj.__code__
        for name, cell in zip(code.co_freevars, obj.__closure__ or ()):
            try:
                yield f"{path}'s closure variable {name!r}", cell.cell_contents
            except ValueError:  # an empty cell
                continue
        for name in code.co_names:
            if name in obj.__globals__ and not isinstance(obj.__globals__[name], types.ModuleType):
                yield f"{path}'s global {name!r}", obj.__globals__[name]
        for i, value in enumerate(obj.__defaults__ or ()):
            yield f"{path}'s default argument {i}", value
    elif isinstance(obj, types.MethodType):
        yield f"{path}.__self__", obj.__self__
        yield f"{path}.__func__", obj.__func__
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
        for key, value in vars(obj).items():
            yield f"{path}.{key}", value


def find_unpicklable(obj: Any, path: str, depth: int = 0) -> Optional[Tuple[str, Any, str]]:
    """``(path, object, error)`` of the innermost part of ``obj`` that cannot
    be pickled, or None when ``obj`` pickles."""
    import cloudpickle

    try:
        cloudpickle.dumps(obj)
        return None
    except Exception as exc:  # noqa: BLE001 - any pickling failure is what we look for
        error = f"{type(exc).__name__}: {exc}"
    if depth < _MAX_DEPTH:
        for i, (child_path, child) in enumerate(_children(obj, path)):
            if i >= _MAX_CHILDREN:
                break
            found = find_unpicklable(child, child_path, depth + 1)
            if found is not None:
                return found
    return path, obj, error


def describe_unpicklable(obj: Any, path: str) -> str:
    """A sentence naming what cannot be pickled in ``obj``, where, and what to do."""
    found = find_unpicklable(obj, path)
    if found is None:
        return f"{path} could not be pickled"
    where, culprit, error = found
    return f"{where} is a {type(culprit).__name__}, which cannot be pickled ({error}); {hint(culprit)}"


def largest_parts(obj: Any, path: str, top: int = 3) -> List[Tuple[str, int]]:
    """The ``top`` largest direct parts of ``obj`` (a function's closure
    variables, globals and defaults; a container's items) by pickled size,
    largest first, as ``(path, bytes)``."""
    import cloudpickle

    sizes: List[Tuple[str, int]] = []
    for i, (child_path, child) in enumerate(_children(obj, path)):
        if i >= _MAX_CHILDREN:
            break
        try:
            sizes.append((child_path, len(cloudpickle.dumps(child))))
        except Exception:  # noqa: BLE001 - an unpicklable part is reported elsewhere
            continue
    sizes.sort(key=lambda s: -s[1])
    return sizes[:top]


def describe_size(obj: Any, path: str, size: int, limit: int) -> str:
    """A sentence saying ``obj`` pickles to ``size`` bytes, over ``limit``,
    naming its largest parts and what to do."""
    parts = largest_parts(obj, path)
    named = "; ".join(f"{where}: {_mib(n)}" for where, n in parts)
    biggest = f" Its largest parts: {named}." if named else ""
    return (
        f"{path} pickles to {_mib(size)}, over the limit of {_mib(limit)} per value.{biggest} "
        "Load large data inside the function (from a file or a URL) instead of capturing it"
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
