"""``remote_parallel_map`` from a Jupyter notebook, through a real kernel.

The notebook defines its function in a cell (so it lives in the kernel's
``__main__`` and travels by value), runs it on the embedded cluster and
shows the outputs; what the calls print must land in the cell's own output
stream, and the job's status must be one notebook display, updated in place,
rather than lines on stderr.

The kernel runs this test's own interpreter (``sys.executable``), through a
kernel spec written to a temporary directory: whatever ``python3`` kernel the
machine has installed for its user plays no part.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

import pytest

from conftest import IN_CI

KERNEL_NAME = "fleetmap-test-python"

CELLS = [
    "from fleetmap import remote_parallel_map",
    # Defined in the notebook: the workers can import it from nowhere.
    "def square_and_say(x):\n"
    "    print(f'worker says {x}')\n"
    "    return x * x",
    "outputs = remote_parallel_map(square_and_say, range(6))\noutputs",
    # A lambda over a closure, and an exception from the notebook's function.
    "offset = 100\nremote_parallel_map(lambda x: x + offset, [1, 2, 3], verbose=False)",
    "def invert(x):\n"
    "    return 1 / x\n"
    "remote_parallel_map(invert, [1, 0, 2], verbose=False)",
]


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        message = f"the notebook test needs {module} in this environment (./scripts/setup installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _kernel_spec_dir(root: Path) -> Path:
    """A kernel spec that starts ipykernel with this very interpreter."""
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "fleetmap test (this interpreter)",
                "language": "python",
            }
        )
    )
    return root / "kernels"


def _stream_text(outputs: List[dict], name: str) -> str:
    return "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == name)


def test_notebook_runs_its_own_function_and_shows_prints(tmp_path, monkeypatch):
    for module in ("nbformat", "nbclient", "ipykernel"):
        _need(module)
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    # Keep Jupyter's and IPython's files (connection files, profiles) out of
    # the user's home: a fresh or read-only home must not matter.
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    nb.cells[-1].metadata["tags"] = ["raises-exception"]
    path = tmp_path / "fleetmap.ipynb"
    nbformat.write(nb, str(path))

    nb = nbformat.read(str(path), as_version=4)
    specs = KernelSpecManager(kernel_dirs=[str(_kernel_spec_dir(tmp_path))], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    client = NotebookClient(
        nb,
        km=km,
        timeout=120,
        startup_timeout=60,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    nbformat.write(nb, str(path))  # left in tmp_path to look at when this fails
    # The kernel shuts down as a user's does (not killed when this test's
    # objects are collected): its embedded cluster stops with it.
    if km.has_kernel:
        km.shutdown_kernel()

    def describe() -> str:
        return json.dumps([c.get("outputs", []) for c in nb.cells], indent=1)[-6000:]

    # No cell but the last may fail.
    for cell in nb.cells[:-1]:
        errors = [o for o in cell.outputs if o["output_type"] == "error"]
        assert not errors, f"cell {cell.source!r} failed:\n" + "\n".join("\n".join(e["traceback"]) for e in errors)

    # The outputs, in input order, as the cell's result.
    run = nb.cells[2]
    results = [o for o in run.outputs if o["output_type"] == "execute_result"]
    assert len(results) == 1, describe()
    assert results[0]["data"]["text/plain"] == "[0, 1, 4, 9, 16, 25]"

    # What the calls printed, in this cell's stdout stream.
    printed = _stream_text(run.outputs, "stdout").splitlines()
    assert sorted(printed) == sorted(f"worker says {x}" for x in range(6)), describe()

    # The status: one display, updated to the final count, no terminal codes
    # and no status lines on stderr.
    displays = [o for o in run.outputs if o["output_type"] == "display_data"]
    assert len(displays) == 1, describe()
    status = displays[0]["data"]["text/plain"]
    assert status.startswith("fleetmap: 6 inputs on the local cluster, "), status
    assert "fleetmap: 6/6 done, " in status, status
    assert "\x1b" not in status and "\r" not in status, repr(status)
    assert "fleetmap:" not in _stream_text(run.outputs, "stderr"), describe()

    closure = [o for o in nb.cells[3].outputs if o["output_type"] == "execute_result"]
    assert closure and closure[0]["data"]["text/plain"] == "[101, 102, 103]", describe()
    assert not [o for o in nb.cells[3].outputs if o["output_type"] == "display_data"], "verbose=False showed a status"

    # The remote exception arrives as the notebook function's own class.
    errors = [o for o in nb.cells[4].outputs if o["output_type"] == "error"]
    assert len(errors) == 1 and errors[0]["ename"] == "ZeroDivisionError", describe()
    traceback = "\n".join(errors[0]["traceback"])
    assert "input 1" in traceback and "invert" in traceback, traceback

    # The kernel is gone and its embedded cluster with it; where the kernel
    # was stopped without running its exit handlers, the next embedded
    # cluster on the machine removes the cgroups it left.
    import os

    from conftest import run_client, wait_for

    def dead_subtrees() -> List[str]:
        found = set()
        for hierarchy in Path("/sys/fs/cgroup").glob("*/fleetmap-local-*"):
            pid = hierarchy.name.rsplit("-", 1)[1]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                found.add(hierarchy.name)
        return sorted(found)

    def others_alive() -> bool:
        return any(
            h.name.rsplit("-", 1)[1] != str(os.getpid()) and os.path.exists(f"/proc/{h.name.rsplit('-', 1)[1]}")
            for h in Path("/sys/fs/cgroup").glob("*/fleetmap-local-*")
        )

    wait_for(lambda: not others_alive(), 30, "the kernel to exit", describe)
    if dead_subtrees():
        r = run_client("from fleetmap import remote_parallel_map\nRESULT = remote_parallel_map(abs, [-1], verbose=False)")
        assert r["returncode"] == 0 and r["result"] == [1], r["stderr"]
        assert not dead_subtrees(), dead_subtrees()
