"""``fleetmap/_native.pyi`` describes every name the compiled module exports.

The stub is written by hand next to ``python/src/``; this fails when
the two drift apart (a function, class, method or attribute added to or
removed from one side only). ``mypy.stubtest fleetmap._native`` checks the
signatures too, where mypy is installed.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

from fleetmap import _native

STUB = Path(_native.__file__).with_name("_native.pyi")


def _stub_names() -> Dict[str, Set[str]]:
    """Module-level names of the stub, each class with its public members."""
    tree = ast.parse(STUB.read_text())
    names: Dict[str, Set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            names[node.name] = {m for m in members if not m.startswith("_")}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = set()
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = set()
    return names


def test_the_stub_declares_every_exported_name_and_no_other():
    stub = _stub_names()
    exported = set(_native.__all__)
    public_in_stub = {n for n in stub if not n.startswith("_")}
    assert exported - public_in_stub == set(), "exported by _native but missing from _native.pyi"
    typed_dicts = {"NodeStatus", "JobInfo", "NodeProgress", "KeyInfo", "NodeInfo"}
    assert public_in_stub - exported - typed_dicts == set(), "in _native.pyi but not exported by _native"
    # The typed dicts are for type checkers only (the runtime hands out dicts).
    assert "NodeStatus" not in exported


def test_the_stub_declares_every_method_and_attribute_of_each_class():
    stub = _stub_names()
    for name in _native.__all__:
        runtime = getattr(_native, name)
        if not isinstance(runtime, type) or issubclass(runtime, BaseException):
            continue
        members = {m for m in vars(runtime) if not m.startswith("_")}
        assert members == stub[name], (
            f"_native.{name}: only at run time {sorted(members - stub[name])}, "
            f"only in the stub {sorted(stub[name] - members)}"
        )
