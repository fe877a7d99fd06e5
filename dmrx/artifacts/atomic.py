"""Write-then-rename, so that a failed or interrupted command never leaves partial output behind.

Everything dmrx writes goes through here: a file or a directory is built under a temporary name beside its
destination and renamed into place only when complete. Finished files get the permissions any other tool
would give them under the caller's umask (0666 & ~umask, directories 0777 & ~umask): the temporary names
are made private by mkstemp/mkdtemp, and some writers (safetensors) create their files 0600.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dmrx.errors import OutputError

# errnos that mean "this destination cannot be written", not "the input is bad"
WRITE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EFBIG,
        errno.EDQUOT,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ENAMETOOLONG,
        errno.EIO,
    }
)


# how HDF5 (RuntimeError) and safetensors (SafetensorError) carry the errno of a failed write
ERRNO_IN_MESSAGE = re.compile(r"(?:errno = |os error )(\d+)")


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


def write_error(path: str | os.PathLike, e: OSError) -> OutputError:
    """The one-line error for a failed write of `path` (ENOSPC, EFBIG, EACCES, ...)."""
    reason = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
    return OutputError(f"{path}: cannot write ({reason})")


def check_destination(path: str | os.PathLike, kind: str = "file") -> Path:
    """`path` if a file (kind "file") or directory (kind "dir") can be created there; else an OutputError.

    Called before the work that produces the output, so that a path under a regular file, a directory where
    a file belongs (or the reverse) or a read-only directory fails in a second, not after the work.
    """
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise OutputError(f"{path}: is a directory; give a file name")
        if kind == "dir" and not path.is_dir():
            raise OutputError(f"{path}: exists and is a file, not a directory")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write in {parent} (permission denied)")
    return path


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write in the block (disk full, file too large, read-only, ...) into an OutputError
    naming `path`; an OSError about another file (an input) names that file instead."""
    try:
        yield
    except Exception as e:
        if isinstance(e, OSError) and e.errno is None and " written" in str(e):
            # numpy's tofile: "N requested and M written", a short write with no errno
            raise OutputError(f"{path}: cannot write (a short write: {e}; is the disk full?)") from None
        if not isinstance(e, OSError):
            # HDF5 reports some failed writes (flush, resize) as RuntimeError, safetensors as SafetensorError,
            # each with the errno in the message
            if ERRNO_IN_MESSAGE.search(str(e)) is None:
                raise
            e = carried_oserror(e)
        if e.errno not in WRITE_ERRNOS:
            raise
        name = None if e.filename is None else os.fspath(e.filename)
        ours = name is None or Path(name) == Path(path) or os.path.basename(name).startswith(f".{Path(path).name}.")
        raise write_error(path if ours else name, e) from None


def carried_oserror(e: Exception) -> OSError:
    """e as an OSError with the errno it carries (in its message, for HDF5 and safetensors; else EIO)."""
    if isinstance(e, OSError) and e.errno:
        return OSError(e.errno, os.strerror(e.errno))
    code = ERRNO_IN_MESSAGE.search(str(e))
    return OSError(int(code.group(1)) if code else errno.EIO, str(e).splitlines()[0][:200])


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    durable: fsync the file before the rename, for state that a resumed job trusts after a crash.
    A failed write (in the block or here) is an OutputError naming `path`; the temporary file is removed.
    """
    path = check_destination(path, "file")
    with writing(path):
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
    otherwise an existing non-empty `path` is never clobbered (an OutputError).
    A failed write is an OutputError naming `path`; the temporary directory is removed.
    """
    path = check_destination(path, "dir")
    if not overwrite and path.exists() and any(path.iterdir()):
        raise OutputError(f"{path}: exists and is not empty")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            try:
                yield tmp
            except OutputError as e:  # a file inside failed: name where it was going, not the temporary name
                raise OutputError(str(e).replace(str(tmp), str(path))) from None
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
