"""Small pure-Python wheels written by the tests, so that environments are
built from a local folder without an index."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path
from typing import Dict


def build_wheel(folder: Path, name: str, version: str, source: str = "", requires: tuple[str, ...] = ()) -> Path:
    """Writes ``NAME-VERSION-py3-none-any.whl`` into ``folder``: one module
    ``name`` (dashes as underscores) whose ``VERSION`` is ``version``, with
    ``source`` appended, depending on ``requires``."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files: Dict[str, str] = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n{source}",
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: fleetmap-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel
