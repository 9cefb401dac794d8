"""Failures: exceptions raised by the function, bad arguments, bad inputs,
dead workers, requests no node can host."""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time

import pytest

import fleetmap
from fleetmap import remote_parallel_map


class PicklableCustomError(Exception):
    """A custom exception of this test module that pickles fine."""


class UnpicklableError(Exception):
    """A custom exception that refuses to be pickled."""

    def __reduce__(self):
        raise TypeError("UnpicklableError refuses to be pickled")


class NotUnpicklableError(Exception):
    """Pickles, but cannot be rebuilt: ``__init__`` needs two arguments and
    ``args`` holds one (the classic unpicklable exception)."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def fails_on_seven(x):
    if x == 7:
        raise ValueError(f"bad input {x}")
    return x


def test_function_exception_keeps_type_message_traceback_and_index():
    with pytest.raises(ValueError) as info:
        remote_parallel_map(fails_on_seven, list(range(20)), verbose=False)
    exc = info.value
    assert type(exc) is ValueError
    assert str(exc) == "bad input 7"
    assert exc.input_index == 7
    assert isinstance(exc.node, str) and exc.node
    assert "fails_on_seven" in exc.remote_traceback
    cause = exc.__cause__
    assert isinstance(cause, fleetmap.RemoteTraceback)
    text = str(cause)
    assert "fails_on_seven" in text, text
    assert "ValueError: bad input 7" in text
    assert "input 7" in text and exc.node in text
    # The worker's own frames are left out of what the user sees.
    assert "_worker.py" not in text
    # The cluster stays usable after a failed job.
    assert remote_parallel_map(lambda x: x + 1, range(5), verbose=False) == [1, 2, 3, 4, 5]


def test_custom_exception_class_of_the_caller_comes_back_as_itself():
    def f(x):
        if x == 3:
            raise PicklableCustomError("custom 3")
        return x

    with pytest.raises(PicklableCustomError) as info:
        remote_parallel_map(f, range(6), verbose=False)
    assert type(info.value) is PicklableCustomError
    assert str(info.value) == "custom 3"
    assert info.value.input_index == 3


def test_exception_that_cannot_be_pickled_arrives_as_remote_error():
    def f(x):
        if x == 2:
            raise UnpicklableError("cannot travel")
        return x

    with pytest.raises(fleetmap.RemoteError) as info:
        remote_parallel_map(f, range(5), verbose=False)
    exc = info.value
    assert isinstance(exc, fleetmap.FleetmapError)
    assert exc.type_name.endswith("UnpicklableError"), exc.type_name
    assert "cannot travel" in str(exc)
    assert exc.input_index == 2
    assert "UnpicklableError" in str(exc.__cause__)
    assert " in f\n" in str(exc.__cause__)


def test_exception_that_cannot_be_unpickled_arrives_as_remote_error():
    def f(x):
        raise NotUnpicklableError("left", "right")

    with pytest.raises(fleetmap.RemoteError) as info:
        remote_parallel_map(f, [0], verbose=False)
    assert info.value.type_name.endswith("NotUnpicklableError")
    assert "left/right" in str(info.value)
    assert info.value.input_index == 0


def test_builtin_exceptions_of_other_kinds():
    def f(x):
        return {"a": 1}[x]

    with pytest.raises(KeyError) as info:
        remote_parallel_map(f, ["a", "a", "zz"], verbose=False)
    assert info.value.input_index == 2
    assert "zz" in str(info.value)


def test_system_exit_in_the_function_is_an_outcome_not_a_crash():
    with pytest.raises(SystemExit) as info:
        remote_parallel_map(lambda x: exit(4) if x == 1 else x, range(3), verbose=False)
    assert info.value.code == 4
    assert info.value.input_index == 1


def test_worker_that_dies_fails_the_job_naming_input_and_node():
    def crash(x):
        if x == 3:
            os._exit(3)
        return x

    with pytest.raises(fleetmap.WorkerCrashed) as info:
        remote_parallel_map(crash, range(6), verbose=False)
    message = str(info.value)
    assert info.value.input_index == 3
    assert "input 3" in message, message
    assert "status 3" in message, message
    assert f"node {info.value.node}" in message
    assert remote_parallel_map(lambda x: x, range(3), verbose=False) == [0, 1, 2]


def test_output_that_cannot_be_pickled_fails_that_input():
    def f(x):
        return threading.Lock() if x == 4 else x

    with pytest.raises(TypeError) as info:
        remote_parallel_map(f, range(8), verbose=False)
    assert info.value.input_index == 4
    assert "output of input 4" in str(info.value)


# --- arguments ---------------------------------------------------------------


def test_bad_image_arguments_are_refused_even_for_empty_inputs():
    with pytest.raises(ValueError, match="image reference"):
        remote_parallel_map(lambda x: x, [], image="Python 3.11")
    with pytest.raises(fleetmap.InputError):
        remote_parallel_map(lambda x: x, [], image="python:3.11", packages=["--index-url=http://evil"])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"func_cpu": 0}, "func_cpu"),
        ({"func_cpu": 97}, "func_cpu"),
        ({"func_cpu": 1.5}, "func_cpu"),
        ({"func_cpu": True}, "func_cpu"),
        ({"func_cpu": "2"}, "func_cpu"),
        ({"func_ram": 0}, "func_ram"),
        ({"func_ram": -1}, "func_ram"),
        ({"func_ram": 625}, "func_ram"),
        ({"func_ram": "4"}, "func_ram"),
        ({"func_gpu": -1}, "func_gpu"),
        ({"func_gpu": 5}, "func_gpu"),
        ({"parallelism": 0}, "parallelism"),
        ({"parallelism": -2}, "parallelism"),
        ({"parallelism": 4001}, "parallelism"),
        ({"parallelism": 2.0}, "parallelism"),
    ],
)
def test_bad_resource_arguments_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        remote_parallel_map(lambda x: x, [1], verbose=False, **kwargs)


def test_function_must_be_callable():
    with pytest.raises(TypeError, match="callable"):
        remote_parallel_map(42, [1], verbose=False)


def test_more_cores_than_any_node_is_rejected_by_the_coordinator():
    with pytest.raises(fleetmap.JobRejected) as info:
        remote_parallel_map(lambda x: x, [1, 2], func_cpu=64, verbose=False)
    message = str(info.value)
    assert "func_cpu=64" in message, message
    assert "largest node" in message, message


def test_gpus_on_a_fleet_without_gpus_are_rejected():
    with pytest.raises(fleetmap.JobRejected, match="func_gpu=1"):
        remote_parallel_map(lambda x: x, [1], func_gpu=1, verbose=False)


def test_more_memory_than_any_node_is_rejected():
    with pytest.raises(fleetmap.JobRejected, match="func_ram=600"):
        remote_parallel_map(lambda x: x, [1], func_ram=600, verbose=False)


# --- inputs ------------------------------------------------------------------


def test_generator_object_as_an_input_is_refused_naming_its_index():
    def gen():
        yield 1

    with pytest.raises(fleetmap.InputError) as info:
        remote_parallel_map(lambda x: x, [1, 2, 3, gen(), 5], verbose=False)
    assert info.value.input_index == 3
    assert "input 3" in str(info.value)
    assert "generator" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_frames_and_tracebacks_are_refused():
    import sys

    try:
        raise RuntimeError("x")
    except RuntimeError:
        tb = sys.exc_info()[2]
    with pytest.raises(fleetmap.InputError) as info:
        remote_parallel_map(lambda x: x, [0, tb], verbose=False)
    assert info.value.input_index == 1
    with pytest.raises(fleetmap.InputError) as info:
        remote_parallel_map(lambda x: x, [sys._getframe()], verbose=False)
    assert info.value.input_index == 0


def test_unpicklable_input_is_refused_naming_its_index():
    inputs = list(range(10))
    inputs[6] = threading.Lock()
    started = time.monotonic()
    with pytest.raises(fleetmap.InputError) as info:
        remote_parallel_map(lambda x: x, inputs, verbose=False)
    assert info.value.input_index == 6
    assert "input 6" in str(info.value)
    assert "lock" in str(info.value).lower()
    assert time.monotonic() - started < 10
    assert remote_parallel_map(lambda x: x, range(3), verbose=False) == [0, 1, 2]


def test_unpicklable_function_is_refused():
    lock = threading.Lock()
    with pytest.raises(fleetmap.InputError, match="function_"):
        remote_parallel_map(lambda x: (lock, x), [1], verbose=False)


def test_error_classes_form_one_hierarchy():
    for cls in (
        fleetmap.ConfigurationError,
        fleetmap.UnsupportedOption,
        fleetmap.InputError,
        fleetmap.CoordinatorUnreachable,
        fleetmap.AuthenticationError,
        fleetmap.JobRejected,
        fleetmap.JobFailed,
        fleetmap.RemoteError,
    ):
        assert issubclass(cls, fleetmap.FleetmapError)
    assert issubclass(fleetmap.JobCancelled, fleetmap.JobFailed)


def test_a_function_too_large_to_send_names_what_it_captures(monkeypatch):
    import fleetmap._map

    # The real limit is 1 GiB; a smaller one keeps the test quick and
    # exercises the same check.
    monkeypatch.setattr(fleetmap._map, "MAX_PAYLOAD_BYTES", 1 << 20)
    table = bytes(3 << 20)
    small = list(range(10))

    def lookup(i):
        return table[i] + small[0]

    with pytest.raises(fleetmap.InputError) as info:
        remote_parallel_map(lookup, [1, 2], verbose=False)
    message = str(info.value)
    assert "'test_a_function_too_large_to_send_names_what_it_captures.<locals>.lookup'" in message, message
    assert "closure variable 'table': 3.0 MiB" in message, message
    assert message.index("'table'") < message.index("'small'"), "largest first"
    assert "over the limit of 1.0 MiB" in message, message


def test_the_native_core_raises_fleetmap_classes_that_pickle(tmp_path):
    from fleetmap import _native

    with pytest.raises(fleetmap.ConfigurationError, match="bad listen address") as config:
        _native.start_local_cluster("no address", sys.executable)
    with pytest.raises(fleetmap.WasmError) as wasm:
        _native.validate_wasm(b"not a module")
    assert wasm.value.kind == "invalid" and wasm.value.exit_code is None
    for exc in (config.value, wasm.value):
        # Raised as the class itself, not translated from another exception.
        assert exc.__context__ is None and exc.__cause__ is None
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and str(again) == str(exc)
    assert again.kind == "invalid"


def test_an_answer_that_matches_no_outstanding_chunk_fails_the_job_and_is_not_taken():
    from fleetmap._map import _check_outcomes
    from fleetmap._remote import RemoteFailure

    def failure(index: int) -> RemoteFailure:
        return RemoteFailure.capture(index, ValueError("x"), __file__, with_traceback=False)

    outstanding = {0: 2, 2: 3}
    bad = [
        (5, 1, [None], []),  # no chunk starts at input 5
        (0, 3, [None] * 3, []),  # a chunk of 2 answered as 3
        (0, 2, [None], []),  # fewer outputs than inputs
        (0, 2, (None, None), []),  # not a list
        (0, 2, [None, None], [failure(2)]),  # a failure outside the chunk
    ]
    for first, count, outputs, failures in bad:
        with pytest.raises(fleetmap.JobFailed, match="node n-1 answered for inputs"):
            _check_outcomes(outstanding, first, count, outputs, failures, "n-1")
    assert outstanding == {0: 2, 2: 3}, "nothing was taken"
    _check_outcomes(outstanding, 2, 3, [None] * 3, [failure(4)], "n-1")
    assert outstanding == {0: 2}
    with pytest.raises(fleetmap.JobFailed):
        _check_outcomes(outstanding, 2, 3, [None] * 3, [], "n-1")  # the same chunk twice
