"""Streaming reader for dmrx data files: validated on open, read in chunks, histories assembled vectorised.

A batch is a dict of numpy arrays keyed like the file's example columns ("user", "target/item",
"profile/age", "dense/price", "label", "prob", ...) plus "hist/<field>" [B, T] histories, right-aligned
(most recent behaviour last, padding 0 on the left), and "hist_len" [B]. Ids are raw unless an encoder is
given, in which case it is applied once per chunk (to the behaviour rows the chunk needs, not per copy).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from dmrx.data.format import FORMAT_NAME, GROUPS, SCHEMA_VERSION
from dmrx.errors import DmrxError

Encoder = Callable[[str, np.ndarray], np.ndarray]  # (batch key, raw ids) -> encoded ids
_MERGE_GAP = 1 << 16  # behaviour rows: gaps smaller than this are read through rather than seeked over


@dataclass(frozen=True)
class Fields:
    """Which fields a data file carries, by role."""

    behaviors: tuple[str, ...]
    profile: tuple[str, ...]
    target: tuple[str, ...]
    context: tuple[str, ...]
    dense: tuple[str, ...]
    has_label: bool
    has_prob: bool

    def example_keys(self) -> list[str]:
        keys = ["seq", "end", "user"]
        for group in GROUPS:
            keys += [f"{group}/{f}" for f in getattr(self, group)]
        return keys + ["label"] * self.has_label + ["prob"] * self.has_prob


class DataFile:
    """An open, validated dmrx data file. Use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise DmrxError(f"{self.path}: no such file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as e:
            kind = "not an HDF5 file" if not h5py.is_hdf5(self.path) else "damaged or truncated HDF5 file"
            raise DmrxError(f"{self.path}: {kind} ({e.__class__.__name__})") from None
        try:
            self._validate()
        except Exception:
            self._h5.close()
            raise

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    # ---- validation -------------------------------------------------------------------------------
    def _err(self, msg: str) -> DmrxError:
        return DmrxError(f"{self.path}: {msg}")

    def _read(self, name: str, sl=slice(None)) -> np.ndarray:
        try:
            return self._h5[name][sl]
        except (OSError, KeyError) as e:
            raise self._err(f"dataset {name}: cannot be read, the file is damaged or truncated "
                            f"({e.__class__.__name__})") from None

    def _check(self, name: str, kinds: str, length: int | None) -> h5py.Dataset:
        if name not in self._h5:
            raise self._err(f"missing dataset {name}")
        ds = self._h5[name]
        if not isinstance(ds, h5py.Dataset):
            raise self._err(f"{name} is a group, expected a dataset")
        if ds.ndim != 1:
            raise self._err(f"dataset {name} must be one-dimensional, has shape {ds.shape}")
        if ds.dtype.kind not in kinds:
            want = {"iu": "integer", "f": "float", "iub": "integer", "iubf": "numeric"}[kinds]
            raise self._err(f"dataset {name} must be {want}, has dtype {ds.dtype}")
        if length is not None and ds.shape[0] != length:
            raise self._err(f"dataset {name} has {ds.shape[0]} rows, expected {length}")
        return ds

    def _validate(self) -> None:
        h5 = self._h5
        if h5.attrs.get("dmrx_format") != FORMAT_NAME:
            raise self._err(f"not a dmrx data file (root attribute dmrx_format is not {FORMAT_NAME!r})")
        version = int(h5.attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            raise self._err(f"schema_version {version} is not supported (this dmrx reads {SCHEMA_VERSION})")
        for group in ("behaviors", "examples"):
            if group not in h5:
                raise self._err(f"missing group /{group}")
        beh_fields = tuple(sorted(k for k in h5["behaviors"] if k != "offsets"))
        if not beh_fields:
            raise self._err("/behaviors holds no behaviour field")
        off = self._check("behaviors/offsets", "iu", None)
        self.offsets = self._read("behaviors/offsets").astype(np.int64)
        if len(self.offsets) == 0 or self.offsets[0] != 0:
            raise self._err("dataset behaviors/offsets must start with 0")
        step = np.diff(self.offsets)
        if (step < 0).any():
            raise self._err(f"dataset behaviors/offsets row {int(np.argmax(step < 0)) + 1}: offsets decrease")
        nnz = int(self.offsets[-1])
        for f in beh_fields:
            self._check(f"behaviors/{f}", "iu", nnz)
        del off
        n = self._check("examples/seq", "iu", None).shape[0]
        self._check("examples/end", "iu", n)
        self._check("examples/user", "iu", n)
        ex = h5["examples"]
        groups = {}
        for group in GROUPS:
            names = tuple(sorted(ex[group])) if group in ex else ()
            for f in names:
                self._check(f"examples/{group}/{f}", "f" if group == "dense" else "iu", n)
            groups[group] = names
        if "label" in ex:
            self._check("examples/label", "iubf", n)
        if "prob" in ex:
            self._check("examples/prob", "f", n)
        self.fields = Fields(behaviors=beh_fields, **groups, has_label="label" in ex, has_prob="prob" in ex)
        self.n_rows = n
        self.n_sequences = len(self.offsets) - 1
        self.n_behaviors = nnz
        self.attrs = dict(h5.attrs)

    # ---- reading ------------------------------------------------------------------------------------
    def read_columns(self, start: int, stop: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """Example columns for rows [start, stop), checked (ids >= 0, seq/end in range, dense finite)."""
        keys = keys or self.fields.example_keys()
        cols = {}
        for k in keys:
            arr = self._read(f"examples/{k}", slice(start, stop))
            name = f"examples/{k}"
            if k.startswith("dense/") or k == "prob":
                bad = ~np.isfinite(arr)
                if bad.any():
                    raise self._err(f"dataset {name} row {start + int(np.argmax(bad))}: not a finite number")
                arr = arr.astype(np.float32, copy=False)
            elif k == "label":
                bad = (arr != 0) & (arr != 1)
                if bad.any():
                    row = int(np.argmax(bad))
                    raise self._err(f"dataset {name} row {start + row}: label {arr[row]} is not 0 or 1")
                arr = arr.astype(np.float32)
            else:
                arr = arr.astype(np.int64, copy=False)
                if len(arr) and arr.min() < 0:
                    row = int(np.argmax(arr < 0))
                    raise self._err(f"dataset {name} row {start + row}: negative value {arr[row]}")
            cols[k] = arr
        if "seq" in cols:
            seq = cols["seq"]
            bad = seq >= self.n_sequences
            if bad.any():
                row = int(np.argmax(bad))
                raise self._err(f"dataset examples/seq row {start + row}: sequence {seq[row]} does not exist "
                                f"({self.n_sequences} sequences)")
            if "end" in cols:
                seq_len = self.offsets[seq + 1] - self.offsets[seq]
                bad = cols["end"] > seq_len
                if bad.any():
                    row = int(np.argmax(bad))
                    raise self._err(f"dataset examples/end row {start + row}: end {cols['end'][row]} is beyond "
                                    f"its sequence of length {seq_len[row]}")
        return cols

    def _read_behaviors(self, lo: np.ndarray, hi: np.ndarray, fields, encoder: Encoder | None):
        """Read the behaviour rows covering every [lo_i, hi_i) as a few contiguous slices.

        Returns (buffers, shift): buffers[field] has a padding 0 at index 0, and global behaviour row g of
        example i sits at buffers[field][g - shift[i]].
        """
        n = len(lo)
        shift = np.zeros(n, np.int64)
        nonempty = hi > lo
        if not nonempty.any():
            return {f: np.zeros(1, np.int64) for f in fields}, shift
        idx = np.flatnonzero(nonempty)
        order = idx[np.argsort(lo[idx], kind="stable")]
        slo, shi = lo[order], np.maximum.accumulate(hi[order])
        new = np.ones(len(order), bool)
        new[1:] = slo[1:] > shi[:-1] + _MERGE_GAP
        cluster = np.cumsum(new) - 1
        c_lo = slo[new]
        c_hi = np.maximum.reduceat(shi, np.flatnonzero(new))
        sizes = c_hi - c_lo
        buf_start = 1 + np.concatenate([[0], np.cumsum(sizes)[:-1]])  # 1: slot 0 is the padding
        shift[order] = c_lo[cluster] - buf_start[cluster]
        buffers = {}
        for f in fields:
            parts = [np.zeros(1, np.int64)]
            for a, b in zip(c_lo.tolist(), c_hi.tolist()):
                part = self._read(f"behaviors/{f}", slice(a, b)).astype(np.int64, copy=False)
                if len(part) and part.min() < 0:
                    raise self._err(f"dataset behaviors/{f} row {a + int(np.argmax(part < 0))}: negative id")
                parts.append(part)
            buf = np.concatenate(parts)
            if encoder is not None:
                buf = encoder(f"hist/{f}", buf)
                buf[0] = 0
            buffers[f] = buf
        return buffers, shift

    def batches(self, batch_size: int = 256, max_len: int = 50, *, shuffle: bool = False, seed: int = 0,
                epoch: int = 0, start_batch: int = 0, shard: tuple[int, int] = (0, 1),
                row_range: tuple[int, int] | None = None, encoder: Encoder | None = None,
                chunk_rows: int = 1 << 18, keys: list[str] | None = None,
                behavior_fields: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield batches in file order, or shuffled (chunk order and rows within a chunk) for an epoch.

        Batches never span chunks, so a batch's index fixes its rows: `start_batch` skips to the batch a
        resumed run stopped at without reading what came before, and `shard=(rank, world)` keeps every
        world-th batch (disjoint across ranks, nothing lost).
        """
        lo_row, hi_row = row_range or (0, self.n_rows)
        chunk_rows = max(batch_size, (chunk_rows // batch_size) * batch_size)
        starts = np.arange(lo_row, hi_row, chunk_rows)
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        if rng is not None:
            starts = rng.permutation(starts)
        fields = list(behavior_fields if behavior_fields is not None else self.fields.behaviors)
        rank, world = shard
        batch_index = 0
        slots = np.arange(max_len)
        for c0 in starts.tolist():
            c1 = min(c0 + chunk_rows, hi_row)
            n_batches = -(-(c1 - c0) // batch_size)
            mine = [b for b in range(batch_index, batch_index + n_batches)
                    if b >= start_batch and b % world == rank]
            batch_index += n_batches
            if not mine:
                if rng is not None:
                    rng.permutation(c1 - c0)  # keep the RNG stream identical to a run that read this chunk
                continue
            cols = self.read_columns(c0, c1, keys)
            perm = rng.permutation(c1 - c0) if rng is not None else None
            seq, end = cols.pop("seq"), cols.pop("end")
            seq_start = self.offsets[seq]
            length = np.minimum(end, max_len)
            hi = seq_start + end
            buffers, shift = self._read_behaviors(hi - length, hi, fields, encoder)
            last = hi - shift  # one past the most recent behaviour, in buffer coordinates
            if encoder is not None:
                cols = {k: (encoder(k, v) if v.dtype == np.int64 else v) for k, v in cols.items()}
            first_batch = batch_index - n_batches
            for b in mine:
                rows = slice((b - first_batch) * batch_size, min((b - first_batch + 1) * batch_size, c1 - c0))
                sel = perm[rows] if perm is not None else rows
                L = length[sel]
                idx = last[sel, None] - max_len + slots
                idx[slots < (max_len - L)[:, None]] = 0
                batch = {k: v[sel] for k, v in cols.items()}
                for f in fields:
                    batch[f"hist/{f}"] = buffers[f][idx]
                batch["hist_len"] = L
                yield batch

    def n_batches(self, batch_size: int, chunk_rows: int = 1 << 18) -> int:
        chunk_rows = max(batch_size, (chunk_rows // batch_size) * batch_size)
        full, rest = divmod(self.n_rows, chunk_rows)
        return full * (chunk_rows // batch_size) + -(-rest // batch_size)


def open_data(path: str | os.PathLike) -> DataFile:
    return DataFile(path)
