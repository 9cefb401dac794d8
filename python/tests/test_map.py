"""remote_parallel_map on the embedded local cluster: results, ordering,
the kinds of functions and inputs it takes, and parallelism."""

from __future__ import annotations

import os
import re
import time

import pytest

import fleetmap
from fleetmap import remote_parallel_map

from conftest import run_client


class Point:
    """A class of this test module: the workers cannot import this module
    (pytest puts the tests folder on the caller's sys.path only)."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def moved(self, dx: int) -> "Point":
        return Point(self.x + dx, self.y)


def _module_level_square(x):
    return x * x


def _module_level_uses_helper(x):
    return _module_level_square(x) + 1


def _slow_start_then_fast(x):
    # Input 0 takes a second and the next 99 take 2 ms each; the rest return
    # at once, so later inputs finish before earlier ones whenever a second
    # slot runs during that second, however the inputs are chunked.
    if x == 0:
        time.sleep(1.0)
    elif x < 100:
        time.sleep(0.002)
    return (x, x * 3, time.time())


def test_outputs_come_back_in_input_order_even_when_completion_order_differs():
    n = 2000
    out = remote_parallel_map(_slow_start_then_fast, list(range(n)), verbose=False)
    assert len(out) == n
    assert [o[0] for o in out] == list(range(n))
    assert [o[1] for o in out] == [3 * x for x in range(n)]
    finish = [o[2] for o in out]
    # The run really completed out of order: some later input finished
    # before an earlier one (otherwise this test proves nothing).
    assert any(finish[i] > finish[j] for i in range(100) for j in range(100, n, 50)), (
        "every input finished in input order; the ordering was not exercised"
    )


def test_lambda():
    assert remote_parallel_map(lambda x: x + 1, [1, 2, 3], verbose=False) == [2, 3, 4]


def test_closure_over_locals_and_nested_functions():
    offset = 1000
    table = {i: chr(ord("a") + i) for i in range(26)}

    def helper(x):
        return table[x % 26]

    def f(x):
        return (x + offset, helper(x))

    out = remote_parallel_map(f, list(range(30)), verbose=False)
    assert out == [(x + 1000, chr(ord("a") + x % 26)) for x in range(30)]


def test_function_of_a_module_the_workers_cannot_import():
    # Module-level functions of this test module, calling each other.
    assert remote_parallel_map(_module_level_uses_helper, range(10), verbose=False) == [x * x + 1 for x in range(10)]


def test_instances_of_local_classes_travel_both_ways_and_keep_their_class():
    out = remote_parallel_map(lambda p: p.moved(10), [Point(i, -i) for i in range(5)], verbose=False)
    assert all(type(p) is Point for p in out), [type(p) for p in out]
    assert [(p.x, p.y) for p in out] == [(i + 10, -i) for i in range(5)]


@pytest.mark.parametrize(
    "make_inputs",
    [
        pytest.param(lambda: (5, 6, 7), id="tuple"),
        pytest.param(lambda: range(5, 8), id="range"),
        pytest.param(lambda: (x for x in (5, 6, 7)), id="generator"),
        pytest.param(lambda: iter([5, 6, 7]), id="iterator"),
        pytest.param(lambda: {5: "a", 6: "b", 7: "c"}.keys(), id="dict-keys"),
    ],
)
def test_iterable_inputs(make_inputs):
    assert remote_parallel_map(lambda x: x * 10, make_inputs(), verbose=False) == [50, 60, 70]


def test_varied_input_and_output_types():
    inputs = [None, 1, 2.5, "text", b"\x00\xff", [1, [2]], {"k": (1, 2)}, {1, 2}, 10**40, complex(1, 2)]
    out = remote_parallel_map(lambda v: (type(v).__name__, v), inputs, verbose=False)
    assert out == [(type(v).__name__, v) for v in inputs]


def test_large_input_and_output_values():
    # A few MiB each way: inputs split across chunks, outputs batched back.
    blob = os.urandom(3 << 20)
    out = remote_parallel_map(lambda b: (len(b), b[:16], b[::-1][:16]), [blob] * 4, verbose=False)
    assert out == [(len(blob), blob[:16], blob[::-1][:16])] * 4


def test_single_input():
    assert remote_parallel_map(_module_level_square, [12], verbose=False) == [144]


def test_empty_inputs_return_an_empty_list_without_starting_anything():
    # In a fresh process: nothing may be started or contacted. A configured
    # but unreachable coordinator proves no connection is attempted.
    r = run_client(
        """
        import os, time
        os.environ["FLEETMAP_COORDINATOR"] = "127.0.0.1:9"
        os.environ["FLEETMAP_CA"] = "/nonexistent/ca.pem"
        import fleetmap, fleetmap._fleet as fleet
        t = time.monotonic()
        out = [fleetmap.remote_parallel_map(lambda x: x, inputs) for inputs in ([], (), range(0), iter([]))]
        elapsed = time.monotonic() - t
        del os.environ["FLEETMAP_COORDINATOR"]
        out.append(fleetmap.remote_parallel_map(lambda x: x, []))
        RESULT = {"out": out, "elapsed": elapsed, "local": fleet._local is not None,
                  "connections": len(fleet._connections)}
        """
    )
    assert r["returncode"] == 0, r["stderr"]
    res = r["result"]
    assert res["out"] == [[], [], [], [], []]
    assert res["elapsed"] < 0.5
    assert res["local"] is False, "an empty job started the embedded cluster"
    assert res["connections"] == 0
    assert "fleetmap:" not in r["stderr"], "an empty job printed a status line"


def test_parallelism_1_runs_one_call_at_a_time():
    def timed(x):
        start = time.time()
        time.sleep(0.02)
        return (x, start, time.time(), os.getpid())

    out = remote_parallel_map(timed, list(range(12)), parallelism=1, verbose=False)
    assert [o[0] for o in out] == list(range(12))
    spans = sorted((o[1], o[2]) for o in out)
    for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
        assert s2 >= e1, f"two calls overlapped with parallelism=1: {s1:.4f}-{e1:.4f} and {s2:.4f}-{e2:.4f}"


def test_default_parallelism_uses_several_workers_at_once():
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip(f"the embedded node has {cores} core, so one slot; this needs two")

    def timed(x):
        start = time.time()
        time.sleep(0.1)
        return (start, time.time(), os.getpid())

    out = remote_parallel_map(timed, list(range(8)), verbose=False)
    pids = {o[2] for o in out}
    assert len(pids) >= 2, f"all calls ran in one worker process: {pids}"
    spans = sorted((o[0], o[1]) for o in out)
    assert any(s2 < e1 for (s1, e1), (s2, e2) in zip(spans, spans[1:])), "no two calls overlapped"


def test_worker_environment_names_the_node():
    out = remote_parallel_map(lambda _: os.environ.get("FLEETMAP_NODE"), range(4), verbose=False)
    assert len(set(out)) == 1 and out[0], out


def test_back_to_back_jobs_reuse_the_cluster():
    for i in range(5):
        assert remote_parallel_map(lambda x, i=i: x + i, range(50), verbose=False) == [x + i for x in range(50)]


def test_the_caller_reaches_its_embedded_cluster_in_process_and_quic_still_serves_it():
    from fleetmap import _fleet, _native

    fleet = _fleet.fleet_address(None)
    assert fleet.embedded
    shared = _fleet.connection(fleet)
    assert shared.local, "the caller's own cluster was reached over QUIC through loopback"
    # Other processes (fleetmap up) reach the same coordinator over QUIC.
    quic = _native.connect(fleet.coordinator, fleet.ca_pem, fleet.api_key)
    assert not quic.local
    key = (fleet.coordinator, fleet.api_key)
    big = b"x" * (20 << 20)  # more than a local pipe holds unread
    try:
        for conn in (quic, shared):
            _fleet._connections[key] = conn
            assert remote_parallel_map(lambda b: len(b) + 1, [big, b"", big], verbose=False) == [
                len(big) + 1,
                1,
                len(big) + 1,
            ]
    finally:
        _fleet._connections[key] = shared
        quic.close()


def test_verbose_prints_a_status_line_on_stderr(capsys):
    remote_parallel_map(lambda x: x, range(10), verbose=True)
    captured = capsys.readouterr()
    assert "fleetmap: 10 inputs on the local cluster" in captured.err
    # The job's id, as `fleetmap jobs` lists it.
    assert re.search(r"\(job \d+\)", captured.err), captured.err
    assert "10/10 done" in captured.err
    assert "fleetmap" not in captured.out
    remote_parallel_map(lambda x: x, range(10), verbose=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_local_module_imported_from_another_directory(tmp_path):
    # A user's script next to its own helper module, run from elsewhere:
    # the workers do not have the script's folder on their path.
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "userhelpers.py").write_text(
        "class Acc:\n"
        "    def __init__(self, v):\n        self.v = v\n"
        "def work(x):\n    return Acc(x * 7)\n"
    )
    r = run_client(
        f"""
        import sys
        sys.path.insert(0, {str(proj)!r})
        import userhelpers
        from fleetmap import remote_parallel_map
        out = remote_parallel_map(userhelpers.work, range(6), verbose=False)
        assert all(type(o) is userhelpers.Acc for o in out), [type(o) for o in out]
        RESULT = [o.v for o in out]
        """,
        cwd=tmp_path,
    )
    assert r["returncode"] == 0, r["stderr"]
    assert r["result"] == [x * 7 for x in range(6)]


def test_a_package_grows_a_module_between_jobs_and_the_next_job_has_it(tmp_path):
    # The caller's local package is listed again when a file appears in it,
    # though the modules it had imported are unchanged.
    proj = tmp_path / "proj"
    (proj / "grows").mkdir(parents=True)
    (proj / "grows" / "__init__.py").write_text("def first(x):\n    return x + 1\n")
    r = run_client(
        f"""
        import importlib, sys, time
        sys.path.insert(0, {str(proj)!r})
        import grows
        from fleetmap import remote_parallel_map
        before = remote_parallel_map(grows.first, [1], verbose=False)
        time.sleep(0.01)
        with open({str(proj / "grows" / "later.py")!r}, "w") as f:
            f.write("VALUE = 41\\n")
        def use_later(x):
            importlib.invalidate_caches()
            import grows.later
            return grows.later.VALUE + x
        RESULT = before + remote_parallel_map(use_later, [1], verbose=False)
        """,
        cwd=tmp_path,
    )
    assert r["returncode"] == 0, r["stderr"]
    assert r["result"] == [2, 42]


def test_a_function_sent_again_carries_the_globals_and_defaults_of_now(tmp_path):
    # A script's function travels by value, and its pickle is kept from one
    # job to the next only while nothing it is made of changes: a global
    # rebound, a list it reads grown, defaults replaced and the object behind
    # a bound builtin method changed all show.
    r = run_client(
        """
        from fleetmap import remote_parallel_map
        SCALE = 1000
        SEEN = []
        def scaled(x):
            return x * SCALE
        def counted(x, start=0):
            return x + len(SEEN) + start
        out = [remote_parallel_map(scaled, [1, 2], verbose=False)]
        SCALE = 1001
        out.append(remote_parallel_map(scaled, [1], verbose=False))
        out.append(remote_parallel_map(counted, [0], verbose=False))
        SEEN.append(1)
        out.append(remote_parallel_map(counted, [0], verbose=False))
        counted.__defaults__ = (10,)
        out.append(remote_parallel_map(counted, [0], verbose=False))
        TABLE = {1: "a"}
        lookup = TABLE.get
        def looked_up(x):
            return lookup(x)
        out.append(remote_parallel_map(looked_up, [1], verbose=False))
        TABLE[1] = "b"
        out.append(remote_parallel_map(looked_up, [1], verbose=False))
        RESULT = out
        """,
        cwd=tmp_path,
    )
    assert r["returncode"] == 0, r["stderr"]
    assert r["result"] == [[1000, 2000], [1001], [0], [1], [11], ["a"], ["b"]]


def test_version_is_exposed():
    assert isinstance(fleetmap.__version__, str) and fleetmap.__version__


def _digest_and_echo_tail(blob):
    import hashlib

    return hashlib.sha256(blob).hexdigest(), len(blob)


def _make_blob(n):
    return bytes(range(256)) * (n // 256)


def test_values_larger_than_a_frame_travel_in_pieces():
    # 200 MB in and 96 MB out: far above one frame (4 MiB) and above the
    # 64 MiB that once was the limit for one value.
    import hashlib

    big = bytes(range(256)) * ((200 << 20) // 256)
    out = remote_parallel_map(_digest_and_echo_tail, [big, b"small"], verbose=False)
    assert out == [
        (hashlib.sha256(big).hexdigest(), len(big)),
        (hashlib.sha256(b"small").hexdigest(), 5),
    ]
    blobs = remote_parallel_map(_make_blob, [96 << 20], verbose=False)
    assert len(blobs[0]) == 96 << 20 and blobs[0][:256] == bytes(range(256))


def test_packages_on_a_second_environment_travel_by_reference(tmp_path):
    # A package installed in another environment whose site-packages is on
    # sys.path through PYTHONPATH (as a .pth file or a shared software tree
    # would put it). It holds a lock at module level, as torch and many
    # native libraries do: pickled by value it could not be sent at all.
    site = tmp_path / "other-env" / "site-packages"
    (site / "heavylib").mkdir(parents=True)
    (site / "heavylib" / "__init__.py").write_text(
        "import threading\n_LOCK = threading.Lock()\n\ndef triple(x):\n    with _LOCK:\n        return 3 * x\n"
    )
    (site / "heavylib-1.0.dist-info").mkdir()
    (site / "heavylib-1.0.dist-info" / "METADATA").write_text("Name: heavylib\nVersion: 1.0\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = run_client(
        """
        import cloudpickle, heavylib
        from fleetmap import remote_parallel_map
        from fleetmap._map import _local_modules
        with _local_modules() as sources:
            by_value = sorted(cloudpickle.list_registry_pickle_by_value())
            by_value += list(sources.names) if sources else []
        RESULT = {"outputs": remote_parallel_map(heavylib.triple, [1, 2, 3], verbose=False), "by_value": by_value}
        """,
        env=env,
    )
    assert out["returncode"] == 0, out["stderr"]
    assert out["result"]["outputs"] == [3, 6, 9]
    assert "heavylib" not in out["result"]["by_value"]


def test_chunks_are_sized_from_measured_call_time():
    from fleetmap._map import _TARGET_CHUNK_SECONDS, _chunk_size

    # Before any call is timed: one input, doubling every round of slots.
    assert [_chunk_size(i, 2, 1000, None, None) for i in range(8)] == [1, 1, 2, 2, 4, 4, 8, 8]
    # Long calls go one by one; short calls batch up to the cap.
    assert _chunk_size(40, 2, 1000, 0.1, None) == 1
    assert _chunk_size(40, 2, 1000, _TARGET_CHUNK_SECONDS / 50, None) == 50
    assert _chunk_size(40, 2, 1000, 1e-7, None) == 1000
    # Near the end, no chunk takes more than half a slot's share of what is left.
    assert _chunk_size(40, 2, 1000, 1e-7, 40) == 10
    assert _chunk_size(40, 2, 1000, 1e-7, 1) == 1



def test_what_a_call_reads_from_the_environment_is_what_is_set_at_that_call(monkeypatch):
    # Each call looks these up again (fast, without os.environ.get's
    # KeyError for an unset variable): a change between calls counts.
    from fleetmap import _fleet

    monkeypatch.delenv("FLEETMAP_REQUIRE_ISOLATION", raising=False)
    assert _fleet.getenv("FLEETMAP_REQUIRE_ISOLATION") is None
    assert _fleet.require_isolation(None, {}) is False
    monkeypatch.setenv("FLEETMAP_REQUIRE_ISOLATION", "yes")
    assert _fleet.require_isolation(None, {}) is True
    monkeypatch.setenv("FLEETMAP_REQUIRE_ISOLATION", "off")
    assert _fleet.require_isolation(None, {}) is False
    monkeypatch.setenv("FLEETMAP_CONFIG", "/tmp/fleetmap-tests/confé")
    assert _fleet.getenv("FLEETMAP_CONFIG") == "/tmp/fleetmap-tests/confé"
    assert str(_fleet.config_path()) == "/tmp/fleetmap-tests/confé"
