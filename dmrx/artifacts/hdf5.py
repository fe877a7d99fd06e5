"""Writing HDF5 files so that a failed write (a full disk) ends in one error and a clean exit.

h5py buffers writes; on a full disk they fail late (at a dataset's release, at flush, at close), and a file
that could not be closed leaves HDF5 in a state its exit handler crashes on. `h5_writer` opens a file for
writing (usually atomic_file's temporary name) and closes it for certain; `close_h5` flushes, and when that
fails points the file's descriptor at /dev/null so that the close can finish.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

from dmrx.artifacts.atomic import ERRNO_IN_MESSAGE, carried_oserror


def _discard_h5(h5) -> None:
    """Point HDF5's file descriptor at /dev/null: the file is being thrown away, and its pending writes
    (which fail on a full disk, and a failed flush keeps HDF5's file open until a crash at exit) then
    succeed, so the close that follows is clean."""
    with contextlib.suppress(Exception):
        fd = h5.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)


_hdf5_broken = False


def hdf5_broken() -> bool:
    """True once an HDF5 file could not be closed after a failed write. HDF5's state is then beyond repair
    and its exit handler would crash the interpreter: the CLI ends such a process with os._exit."""
    return _hdf5_broken


def _failed_h5_write(exc) -> bool:
    return isinstance(exc, (OSError, RuntimeError)) and ERRNO_IN_MESSAGE.search(str(exc)) is not None


def quiet_failed_h5_deallocs() -> None:
    """HDF5 writes buffered in a dataset's cache fail when h5py drops the dataset, where Python can only
    print them (a traceback through sys.excepthook, then "Exception ignored in" through
    sys.unraisablehook). The close that follows reports the same failure as one error naming the file, so
    these reports are dropped; any other goes to the hooks as before."""
    if getattr(sys.unraisablehook, "_dmrx", False):
        return
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable_hook(unraisable) -> None:
        if not (_failed_h5_write(unraisable.exc_value) and "h5py" in repr(unraisable.object)):
            previous_unraisable(unraisable)

    def except_hook(exc_type, exc, tb) -> None:
        frames = traceback.extract_tb(tb)
        if not (_failed_h5_write(exc) and frames and frames[-1].filename.startswith("h5py/")):
            previous_except(exc_type, exc, tb)

    unraisable_hook._dmrx = True
    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


def close_h5(h5, discard: bool = False) -> None:
    """Close an h5py File; discard: the file is being thrown away (a write failed).

    The file is flushed first; when that fails (a full disk) its descriptor is pointed at /dev/null so that
    the close can finish, and the failure is raised as an OSError."""
    global _hdf5_broken
    failure = None
    if not discard:
        try:
            h5.flush()
        except Exception as e:
            failure, discard = e, True
    if discard:
        _discard_h5(h5)
    try:
        h5.close()
    except Exception as e:
        _hdf5_broken = True
        failure = failure or e
    if failure is not None:
        raise carried_oserror(failure) from None


@contextlib.contextmanager
def h5_writer(path: str | os.PathLike) -> Iterator:
    """An h5py File opened for writing at `path` (usually atomic_file's temporary name), closed for certain:
    HDF5 errors while writing and closing come out as OSError, which atomic_file names the output for."""
    import h5py

    quiet_failed_h5_deallocs()
    h5 = h5py.File(path, "w")
    try:
        yield h5
    except BaseException:
        close_h5(h5, discard=True)
        raise
    close_h5(h5)
