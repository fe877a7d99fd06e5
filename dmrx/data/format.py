"""The dmrx data format: one HDF5 schema for training, validation, test, calibration and candidate files.

Layout (schema version 1)::

    /                     attrs: dmrx_format="dmrx-data", schema_version=1
    /behaviors/offsets    int64 [S+1]  CSR offsets: sequence s owns behaviour rows offsets[s]:offsets[s+1]
    /behaviors/<field>    int64 [nnz]  raw ids per behaviour, time-ordered within each sequence
                                       (item, cate, brand, btag, ...; any may be absent)
    /examples/seq         int64 [N]    the sequence this example's history comes from
    /examples/end         int64 [N]    how many behaviours of that sequence were visible (0..len(seq))
    /examples/user        int64 [N]    raw user id
    /examples/profile/<f> int64 [N]    user-profile categorical fields
    /examples/target/<f>  int64 [N]    target-item fields (item, cate, brand, ...)
    /examples/context/<f> int64 [N]    context categorical fields
    /examples/dense/<f>   float32 [N]  context continuous fields
    /examples/label       int8 [N]     optional click label (0/1)
    /examples/prob        float32 [N]  optional true click probability (synthetic data)

A history is stored once per sequence and referenced by (seq, end), so it is never copied per example.
Ids are raw int64 ids as users know them (>= 0); a trained model owns the vocabularies that map them to
contiguous indices. A behaviour field and the target field of the same name share one embedding table.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from dmrx.artifacts.atomic import atomic_file
from dmrx.artifacts.hdf5 import close_h5, quiet_failed_h5_deallocs
from dmrx.errors import DmrxError

FORMAT_NAME = "dmrx-data"
SCHEMA_VERSION = 1
GROUPS = ("profile", "target", "context", "dense")  # per-example field groups under /examples
CHUNK_ROWS = 1 << 16
_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}


def _dataset(group: h5py.Group, name: str, dtype) -> h5py.Dataset:
    return group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK_ROWS,), **_COMPRESSION)


def _append(ds: h5py.Dataset, values: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize((n + len(values),))
    ds[n:] = values


def _as_1d(values, where: str, path: Path) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DmrxError(f"{path}: {where} must be one-dimensional, got shape {arr.shape}")
    return arr


def _as_floats(values, where: str, path: Path) -> np.ndarray:
    arr = _as_1d(values, where, path)
    if arr.dtype.kind not in "iubf":
        raise DmrxError(f"{path}: {where} must hold numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise DmrxError(f"{path}: {where} row {int(np.argmax(bad))}: not a finite number")
    return arr


def _as_ids(values, where: str, path: Path) -> np.ndarray:
    arr = _as_1d(values, where, path)
    if arr.size == 0:  # an empty list is float64 to numpy; an empty chunk is still a valid chunk
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iub":
        raise DmrxError(f"{path}: {where} must hold integer ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if len(arr) and arr.min() < 0:
        row = int(np.argmax(arr < 0))
        raise DmrxError(f"{path}: {where} row {row}: negative id {arr[row]}")
    return arr


class Writer:
    """Streams sequences and examples into a dmrx data file; the file appears only on a clean close.

    >>> with Writer("train.h5", behavior_fields=["item", "cate"]) as w:
    ...     first = w.add_sequences(lengths=[3, 2], item=[1, 2, 3, 7, 8], cate=[1, 1, 2, 3, 3])
    ...     w.add_examples(seq=[first, first + 1], end=[2, 1], user=[10, 11], label=[1, 0],
    ...                    target={"item": [3, 8], "cate": [2, 3]})

    Calls may be repeated to append in chunks with bounded memory. Every call of add_examples must give
    the same fields.
    """

    def __init__(self, path: str | os.PathLike, behavior_fields: list[str], attrs: dict | None = None):
        if not behavior_fields:
            raise DmrxError(f"{path}: at least one behaviour field is needed")
        self.path = Path(path)
        self.behavior_fields = list(behavior_fields)
        self.attrs = dict(attrs or {})
        self._atomic = atomic_file(self.path)
        self._lengths: list[np.ndarray] = []  # sequence lengths, kept to validate `end` (8 bytes/sequence)
        self._n_seq = 0
        self._n_behaviors = 0
        self._example_fields: tuple | None = None

    def __enter__(self) -> Writer:
        tmp = self._atomic.__enter__()
        quiet_failed_h5_deallocs()
        self._h5 = h5py.File(tmp, "w")
        beh = self._h5.create_group("behaviors")
        off = _dataset(beh, "offsets", np.int64)
        _append(off, np.zeros(1, np.int64))
        for f in self.behavior_fields:
            _dataset(beh, f, np.int64)
        self._h5.create_group("examples")
        return self

    def __exit__(self, exc_type, exc, tb):
        # The temporary file becomes `path` only if the block and the finishing both succeed; a failure
        # in either (or in closing) discards it, and the original exception propagates.
        try:
            try:
                if exc_type is None:
                    self._finish()
            except BaseException:
                close_h5(self._h5, discard=True)
                raise
            close_h5(self._h5, discard=exc_type is not None)
        except BaseException as e:
            if not self._atomic.__exit__(type(e), e, e.__traceback__):
                raise
            return False
        self._atomic.__exit__(exc_type, exc, tb)
        return False

    def add_sequences(self, lengths, **fields) -> int:
        """Append sequences given their lengths and flat behaviour arrays; return the first new index."""
        lengths = _as_ids(lengths, "sequence lengths", self.path)
        total = int(lengths.sum())
        if set(fields) != set(self.behavior_fields):
            raise DmrxError(
                f"{self.path}: behaviour fields {sorted(fields)} differ from the declared "
                f"{sorted(self.behavior_fields)}"
            )
        arrays = {}
        for name, values in fields.items():  # validate everything before appending anything
            arr = arrays[name] = _as_ids(values, f"behaviors/{name}", self.path)
            if len(arr) != total:
                raise DmrxError(f"{self.path}: behaviors/{name} has {len(arr)} rows, lengths sum to {total}")
        beh = self._h5["behaviors"]
        for name, arr in arrays.items():
            _append(beh[name], arr)
        _append(beh["offsets"], self._n_behaviors + np.cumsum(lengths))
        first = self._n_seq
        self._n_seq += len(lengths)
        self._n_behaviors += total
        self._lengths.append(lengths)
        return first

    def add_examples(
        self, seq, end, user, label=None, prob=None, profile=None, target=None, context=None, dense=None
    ) -> None:
        seq = _as_ids(seq, "examples/seq", self.path)
        n = len(seq)
        cols: dict[str, np.ndarray] = {
            "seq": seq,
            "end": _as_ids(end, "examples/end", self.path),
            "user": _as_ids(user, "examples/user", self.path),
        }
        for group, values in (("profile", profile), ("target", target), ("context", context)):
            for name, v in (values or {}).items():
                cols[f"{group}/{name}"] = _as_ids(v, f"examples/{group}/{name}", self.path)
        for name, v in (dense or {}).items():
            cols[f"dense/{name}"] = _as_floats(v, f"examples/dense/{name}", self.path)
        if label is not None:
            lab = _as_1d(label, "examples/label", self.path)
            if lab.dtype.kind not in "iubf":
                raise DmrxError(f"{self.path}: examples/label must be 0/1 numbers, got dtype {lab.dtype}")
            bad = (lab != 0) & (lab != 1)
            if bad.any():
                row = int(np.argmax(bad))
                raise DmrxError(f"{self.path}: examples/label row {row}: label {lab[row]} is not 0 or 1")
            cols["label"] = lab.astype(np.int8)
        if prob is not None:
            p = cols["prob"] = _as_floats(prob, "examples/prob", self.path)
            bad = (p < 0) | (p > 1)
            if bad.any():
                row = int(np.argmax(bad))
                raise DmrxError(f"{self.path}: examples/prob row {row}: probability {p[row]} is not in [0, 1]")
        for name, arr in cols.items():
            if len(arr) != n:
                raise DmrxError(f"{self.path}: examples/{name} has {len(arr)} rows, examples/seq has {n}")
        if len(self._lengths) != 1:  # consolidate once, not on every call
            self._lengths = [np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)]
        lengths = self._lengths[0]
        if n and seq.max() >= len(lengths):
            row = int(np.argmax(seq >= len(lengths)))
            raise DmrxError(f"{self.path}: examples/seq row {row}: sequence {seq[row]} was not added yet")
        over = cols["end"] > lengths[seq]
        if over.any():
            row = int(np.argmax(over))
            raise DmrxError(
                f"{self.path}: examples/end row {row}: end {cols['end'][row]} is beyond its "
                f"sequence of length {lengths[seq[row]]}"
            )

        ex = self._h5["examples"]
        if self._example_fields is None:
            self._example_fields = tuple(cols)
            for name, arr in cols.items():
                _dataset(ex, name, arr.dtype)
        elif tuple(cols) != self._example_fields:
            raise DmrxError(
                f"{self.path}: example fields {list(cols)} differ from the first call's {list(self._example_fields)}"
            )
        for name, arr in cols.items():
            _append(ex[name], arr)

    def _finish(self) -> None:
        if self._example_fields is None:  # an empty file is valid: it still declares its fields
            for name in ("seq", "end", "user"):
                _dataset(self._h5["examples"], name, np.int64)
        self._h5.attrs["dmrx_format"] = FORMAT_NAME
        self._h5.attrs["schema_version"] = SCHEMA_VERSION
        for k, v in self.attrs.items():
            self._h5.attrs[k] = v


def write_dataset(path, behaviors: dict, lengths, examples: dict, attrs: dict | None = None) -> None:
    """Write a whole file at once: `behaviors` maps field -> flat ids, `lengths` gives each sequence's
    length, and `examples` holds the keyword arguments of Writer.add_examples."""
    with Writer(path, list(behaviors), attrs=attrs) as w:
        w.add_sequences(lengths, **behaviors)
        w.add_examples(**examples)
