"""WebAssembly functions through the real coordinator, daemon and workers:
modules built by the tests, from WAT and from C (Debian's clang with
wasi-libc, installed by scripts/setup)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import fleetmap
from fleetmap import remote_parallel_map

from conftest import IN_CI

WASM = Path(__file__).parent / "wasm"


@pytest.fixture(scope="module")
def c_reverser(tmp_path_factory) -> Path:
    clang = shutil.which("clang")
    if clang is None:
        message = "clang is missing: scripts/setup installs clang, lld, wasi-libc and libclang-rt-dev-wasm32"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("wasm") / "reverse.wasm"
    subprocess.run(
        [clang, "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-o", str(out), str(WASM / "reverse.c")],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def test_a_wat_module_reverses_ten_thousand_inputs():
    reverse = fleetmap.wasm(WASM / "reverse.wat", text=True)
    inputs = [f"input-{i}-é" for i in range(10_000)]
    out = remote_parallel_map(reverse, inputs, verbose=False)
    # The module reverses bytes: UTF-8 text comes back with "é" broken.
    assert out == [s.encode()[::-1].decode("utf-8", "replace") for s in inputs]


def test_a_c_module_reverses_bytes(c_reverser):
    reverse = fleetmap.wasm(c_reverser)
    inputs = [bytes(range(i % 256)) for i in range(2_000)]
    assert remote_parallel_map(reverse, inputs, verbose=False) == [b[::-1] for b in inputs]


def test_a_non_zero_exit_carries_the_status_and_stderr(c_reverser):
    reverse = fleetmap.wasm(c_reverser, text=True)
    out = remote_parallel_map(reverse, ["abc", "fail here", "xyz"], verbose=False, return_exceptions=True)
    assert out[0] == "cba" and out[2] == "zyx"
    error = out[1]
    assert isinstance(error, fleetmap.WasmError) and error.input_index == 1
    assert error.exit_code == 3, (error.kind, error.exit_code, str(error))
    assert "refusing input fail here" in error.stderr, error.stderr


def test_a_trap_is_an_error_of_that_input():
    trap = fleetmap.wasm(WASM / "trap.wat")
    out = remote_parallel_map(trap, [b"x"] * 3, verbose=False, return_exceptions=True)
    for index, error in enumerate(out):
        assert isinstance(error, fleetmap.WasmError) and error.kind == "trap", error
        assert error.input_index == index
        assert "unreachable" in str(error), str(error)


def test_an_endless_loop_is_stopped_by_the_time_limit():
    spin = fleetmap.wasm(WASM / "spin.wat", time_limit=0.2)
    with pytest.raises(fleetmap.WasmTimeout) as info:
        remote_parallel_map(spin, [b""], verbose=False)
    assert isinstance(info.value, TimeoutError)
    assert "time limit of 200ms" in str(info.value), str(info.value)


def test_memory_growth_past_func_ram_is_a_memory_error():
    grow = fleetmap.wasm(WASM / "grow.wat")
    with pytest.raises(fleetmap.WasmMemoryLimit) as info:
        remote_parallel_map(grow, [b""], func_ram=1, verbose=False)
    assert isinstance(info.value, MemoryError)


def test_every_input_gets_a_fresh_instance():
    counter = fleetmap.wasm(WASM / "counter.wat", text=True)
    assert set(remote_parallel_map(counter, [b""] * 200, verbose=False)) == {"1"}


def test_bad_modules_are_refused_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"\x00asm\x01\x00\x00\x00garbage")
    with pytest.raises(fleetmap.WasmError) as info:
        fleetmap.wasm(bad)
    assert info.value.kind == "invalid"
    with pytest.raises(fleetmap.WasmError) as info:
        fleetmap.wasm(WASM / "no_start.wat")
    assert info.value.kind == "no_start" and "_start" in str(info.value)


def test_inputs_must_be_bytes_or_text():
    reverse = fleetmap.wasm(WASM / "reverse.wat")
    with pytest.raises(TypeError, match="bytes or str"):
        remote_parallel_map(reverse, [123], verbose=False)
