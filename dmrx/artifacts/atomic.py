"""Write-then-rename, so that a failed or interrupted command never leaves partial output behind.

Everything dmrx writes goes through here: a file or a directory is built under a temporary name beside its
destination and renamed into place only when complete. Finished files get the permissions any other tool
would give them under the caller's umask (0666 & ~umask, directories 0777 & ~umask): the temporary names
are made private by mkstemp/mkdtemp, and some writers (safetensors) create their files 0600.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_modes(path: Path) -> None:
    """Give a finished file or tree the modes the umask asks for."""
    mask = umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    durable: fsync the file before the rename, for state that a resumed job trusts after a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _publish_modes(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; move it to `path` only if the block succeeds.

    overwrite: replace an existing `path` (moved aside first, removed after the new one is in place);
    otherwise an existing non-empty `path` is never clobbered.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _publish_modes(tmp)
        if path.exists() and overwrite:
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)  # fails if a non-empty `path` appeared meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def jsonable(obj):
    """obj with numpy scalars and arrays as Python values, paths as strings, and NaN/inf as None: strict JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def dumps(obj, indent: int | None = 2) -> str:
    """Strict JSON text (no NaN or Infinity: they become null)."""
    return json.dumps(jsonable(obj), indent=indent, sort_keys=True, allow_nan=False, default=str)


def write_json(path: str | os.PathLike, obj, durable: bool = False) -> None:
    """Write obj as strict JSON, atomically."""
    with atomic_file(path, durable=durable) as tmp:
        tmp.write_text(dumps(obj) + "\n")
