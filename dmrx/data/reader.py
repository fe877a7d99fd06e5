"""Streaming reader for dmrx data files: validated on open, read in chunks, histories assembled vectorised.

A batch is a dict of numpy arrays keyed like the file's example columns ("user", "target/item",
"profile/age", "dense/price", "label", "prob", ...) plus "hist/<field>" [B, T] histories, right-aligned
(most recent behaviour last, padding 0 on the left), and "hist_len" [B]. Ids are raw unless an encoder is
given, in which case it is applied once per chunk (to the behaviour rows the chunk needs, not per copy).

HistoryReader assembles the same histories for given (seq, end) pairs instead of a file's example rows (a
user's latest history in retrieval); both are built by DataFile._histories.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from dmrx.data.format import FORMAT_NAME, GROUPS, SCHEMA_VERSION
from dmrx.errors import DmrxError

Encoder = Callable[[str, np.ndarray], np.ndarray]  # (batch key, raw ids) -> encoded ids
_MERGE_GAP = 1 << 16  # behaviour rows: gaps of up to this many rows are read through rather than seeked over


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
        self._datasets: dict[str, h5py.Dataset] = {}
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as e:
            kind = "not an HDF5 file" if not h5py.is_hdf5(self.path) else "damaged or truncated HDF5 file"
            raise DmrxError(f"{self.path}: {kind} ({e.__class__.__name__})") from None
        try:
            self._validate()
        except DmrxError:
            self._h5.close()
            raise
        except (OSError, KeyError) as e:  # HDF5 metadata that cannot be read
            self._h5.close()
            raise self._err(f"damaged HDF5 file, its structure cannot be read ({e.__class__.__name__}: {e})") from None
        except BaseException:
            self._h5.close()
            raise

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._datasets.clear()
        self._h5.close()

    # ---- validation -------------------------------------------------------------------------------
    def _err(self, msg: str) -> DmrxError:
        return DmrxError(f"{self.path}: {msg}")

    def _read(self, name: str, sl=slice(None)) -> np.ndarray:
        try:
            ds = self._datasets.get(name)
            if ds is None:  # kept open: HDF5's chunk cache lives only as long as the dataset handle
                ds = self._datasets[name] = self._h5[name]
            return ds[sl]
        except (OSError, KeyError) as e:
            raise self._err(
                f"dataset {name}: cannot be read, the file is damaged or truncated ({e.__class__.__name__})"
            ) from None

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
        fmt = h5.attrs.get("dmrx_format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode(errors="replace")
        if not isinstance(fmt, str) or fmt != FORMAT_NAME:
            raise self._err(f"not a dmrx data file (root attribute dmrx_format is not {FORMAT_NAME!r})")
        version = h5.attrs.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
            raise self._err(f"root attribute schema_version is {version!r}, expected an integer")
        if version != SCHEMA_VERSION:
            raise self._err(f"schema_version {version} is not supported (this dmrx reads {SCHEMA_VERSION})")
        for group in ("behaviors", "examples"):
            if not isinstance(h5.get(group), h5py.Group):
                raise self._err(f"missing group /{group}")
        beh_fields = tuple(sorted(k for k in h5["behaviors"] if k != "offsets"))
        if not beh_fields:
            raise self._err("/behaviors holds no behaviour field")
        self._check("behaviors/offsets", "iu", None)
        self.offsets = self._read("behaviors/offsets").astype(np.int64)
        if len(self.offsets) == 0 or self.offsets[0] != 0:
            raise self._err("dataset behaviors/offsets must start with 0")
        step = np.diff(self.offsets)
        if (step < 0).any():
            raise self._err(f"dataset behaviors/offsets row {int(np.argmax(step < 0)) + 1}: offsets decrease")
        nnz = int(self.offsets[-1])
        for f in beh_fields:
            self._check(f"behaviors/{f}", "iu", nnz)
        n = self._check("examples/seq", "iu", None).shape[0]
        self._check("examples/end", "iu", n)
        self._check("examples/user", "iu", n)
        ex = h5["examples"]
        groups = {}
        for group in GROUPS:
            if group in ex and not isinstance(ex[group], h5py.Group):
                raise self._err(f"examples/{group} is a dataset, expected a group of fields")
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

    def require_labels(self, purpose: str, both_classes: bool = True, chunk_rows: int = 1 << 20) -> None:
        """Refuse a file that cannot serve `purpose` ("training", "validation", "evaluation"): no labels,
        no rows, or (both_classes) one class only: a click model learns nothing from it, and AUC is undefined
        on it."""
        if not self.fields.has_label:
            raise self._err(f"examples/label is missing; {purpose} needs labels")
        if self.n_rows == 0:
            raise self._err(f"no examples (0 rows); {purpose} needs labelled rows")
        if not both_classes:
            return
        positives = 0
        for start in range(0, self.n_rows, chunk_rows):
            positives += int(self.read_columns(start, min(start + chunk_rows, self.n_rows), ["label"])["label"].sum())
        if positives in (0, self.n_rows):
            raise self._err(
                f"dataset examples/label is {int(positives > 0)} in all {self.n_rows:,} rows; for {purpose} a file "
                "needs both clicks (1) and non-clicks (0): on one class AUC is undefined"
            )

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
                raise self._err(
                    f"dataset examples/seq row {start + row}: sequence {seq[row]} does not exist "
                    f"({self.n_sequences} sequences)"
                )
            if "end" in cols:
                seq_len = self.offsets[seq + 1] - self.offsets[seq]
                bad = cols["end"] > seq_len
                if bad.any():
                    row = int(np.argmax(bad))
                    raise self._err(
                        f"dataset examples/end row {start + row}: end {cols['end'][row]} is "
                        f"beyond its sequence of length {seq_len[row]}"
                    )
        return cols

    def _histories(
        self, seq: np.ndarray, end: np.ndarray, max_len: int, fields, encoder: Encoder | None, full: bool = False
    ):
        """What a chunk's examples see: a zero-padded behaviour buffer and, per example, a window start.

        buffer[start[i] : start[i] + max_len, j] is example i's right-aligned history of fields[j], so a
        batch is one row gather and needs no masking. The buffer holds the behaviour rows the examples see
        (the last max_len of each history, or with `full` all of its visible rows; read as a few contiguous
        slices, see _merged_slices), opened by max_len zero rows (the window of an empty history), with
        max_len zero rows also put before the first row of every history shorter than max_len. With
        `full`, example i's visible history is buffer[start[i] + max_len - end[i] : start[i] + max_len]:
        padding only ever precedes a sequence's first row, so it never splits a history. Fields are
        interleaved (one gather fetches them all from the same cache lines) and stored as int32 when the
        ids fit: batch assembly is bound by random memory access, and this halves the bytes it touches.
        Returns (buffer [rows, len(fields)], start, length).
        """
        length = np.minimum(end, max_len)
        hi = self.offsets[seq] + end  # one past the most recent visible behaviour, in file rows
        lo = self.offsets[seq] if full else hi - length
        start = np.zeros(len(seq), np.int64)  # empty histories keep the opening zeros as their window
        seen = np.flatnonzero(length > 0)
        if not len(seen):
            return np.zeros((max_len, len(fields)), np.int32), start, length
        slices, raw = _merged_slices(lo[seen], hi[seen])  # raw: where each history starts in the slices read

        # Padding: max_len zero rows before raw row 0 and before each short history's first row.
        pad = np.zeros(int(sum(b - a for a, b in slices)), np.int64)
        pad[0] = max_len
        pad[raw[length[seen] < max_len]] = max_len
        dest = np.cumsum(pad)
        dest += np.arange(len(dest))  # padded row of every raw row
        last = raw + (hi - lo)[seen] - 1  # raw row of each example's most recent behaviour
        start[seen] = dest[last] + 1 - max_len

        columns = []
        for f in fields:
            parts = []
            for a, b in slices:
                part = self._read(f"behaviors/{f}", slice(a, b)).astype(np.int64, copy=False)
                if part.min() < 0:
                    raise self._err(
                        f"dataset behaviors/{f} row {a + int(np.argmax(part < 0))}: negative id {part.min()}"
                    )
                parts.append(encoder(f"hist/{f}", part) if encoder is not None else part)
            columns.append(np.concatenate(parts))
        i32 = np.iinfo(np.int32)
        fits = all(i32.min <= c.min() and c.max() <= i32.max for c in columns)
        buffer = np.zeros((int(dest[-1]) + 1, len(fields)), np.int32 if fits else np.int64)
        for j, column in enumerate(columns):
            buffer[dest, j] = column
        return buffer, start, length

    def batches(
        self,
        batch_size: int = 256,
        max_len: int = 50,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        shard: tuple[int, int] = (0, 1),
        row_range: tuple[int, int] | None = None,
        encoder: Encoder | None = None,
        chunk_rows: int = 1 << 18,
        keys: list[str] | None = None,
        behavior_fields: list[str] | None = None,
        distinct_histories: bool = False,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield batches in file order, or shuffled (chunk order and rows within a chunk) for an epoch.

        Batches never span chunks, so a batch's index fixes its rows: `start_batch` skips to the batch a
        resumed run stopped at without reading what came before, and `shard=(rank, world)` keeps every
        world-th batch (disjoint across ranks, nothing lost). `keys` picks example columns ("seq" and
        "end" are always read; they are not part of the batch) and `behavior_fields` the histories.
        Arrays of a batch may be views into the chunk it came from: copy before writing into them.

        With `distinct_histories`, a batch holds each distinct history once, as inference wants it:
        "hist/<field>" and "hist_len" have one row per distinct (seq, end) of the batch, and "user_row" [B]
        says which of them each example sees.
        """
        rank, world = shard
        if batch_size < 1 or max_len < 1 or not 0 <= rank < world:
            raise ValueError(
                f"need batch_size >= 1, max_len >= 1 and 0 <= rank < world, got {batch_size}, "
                f"{max_len} and shard {shard}"
            )
        fields = list(behavior_fields if behavior_fields is not None else self.fields.behaviors)
        unknown = sorted(set(fields) - set(self.fields.behaviors))
        unknown += sorted(set(keys or ()) - set(self.fields.example_keys()))
        if unknown:
            raise self._err(f"no such field or column: {', '.join(unknown)}")
        if keys is not None:
            keys = ["seq", "end"] + [k for k in keys if k not in ("seq", "end")]
        lo_row, hi_row = row_range or (0, self.n_rows)
        chunk_rows = max(batch_size, (chunk_rows // batch_size) * batch_size)
        starts = np.arange(lo_row, hi_row, chunk_rows)
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        if rng is not None:
            starts = rng.permutation(starts)
        batch_index = 0
        for c0 in starts.tolist():
            c1 = min(c0 + chunk_rows, hi_row)
            n_batches = -(-(c1 - c0) // batch_size)
            first_batch = batch_index
            batch_index += n_batches
            mine = [b - first_batch for b in range(max(first_batch, start_batch), batch_index) if b % world == rank]
            perm = rng.permutation(c1 - c0) if rng is not None else None  # drawn even for skipped chunks
            if not mine:
                continue
            cols = self.read_columns(c0, c1, keys)
            seq, end = cols.pop("seq"), cols.pop("end")
            buffer, start, length = self._histories(seq, end, max_len, fields, encoder)
            if distinct_histories:
                cols["seq"], cols["end"] = seq, end
            if encoder is not None:
                cols = {k: (encoder(k, v) if v.dtype == np.int64 else v) for k, v in cols.items()}
            if perm is not None:  # one gather per column and chunk; batches are then slices
                cols = {k: v[perm] for k, v in cols.items()}
                start, length = start[perm], length[perm]
            cols["hist_len"] = length
            windows = sliding_window_view(buffer, max_len, axis=0)  # [rows, fields, max_len], no copy
            for b in mine:
                rows = slice(b * batch_size, min((b + 1) * batch_size, c1 - c0))
                batch = {k: v[rows] for k, v in cols.items()}
                hist = start[rows]
                if distinct_histories:
                    first, batch["user_row"] = group_rows(batch.pop("seq"), batch.pop("end"))
                    batch["hist_len"], hist = batch["hist_len"][first], hist[first]
                batch.update(_gather(windows, hist, fields))
                yield batch

    def n_batches(self, batch_size: int, chunk_rows: int = 1 << 18) -> int:
        chunk_rows = max(batch_size, (chunk_rows // batch_size) * batch_size)
        full, rest = divmod(self.n_rows, chunk_rows)
        return full * (chunk_rows // batch_size) + -(-rest // batch_size)


def _merged_slices(lo: np.ndarray, hi: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray]:
    """How to read the non-empty row ranges [lo_i, hi_i): as a few contiguous (first, stop) slices, and the
    position of each range's first row once the slices are concatenated.

    Ranges that overlap, or lie at most _MERGE_GAP rows apart, share one slice: reading through a small gap
    costs less than one more read.
    """
    order = np.argsort(lo, kind="stable")
    slo, shi = lo[order], np.maximum.accumulate(hi[order])
    new = np.ones(len(order), bool)
    new[1:] = slo[1:] > shi[:-1] + _MERGE_GAP
    first = np.flatnonzero(new)
    c_lo, c_hi = slo[first], np.maximum.reduceat(shi, first)
    c_raw = np.concatenate([[0], np.cumsum(c_hi - c_lo)[:-1]])  # slice k starts at c_raw[k] once concatenated
    cluster = np.cumsum(new) - 1
    raw = np.empty(len(lo), np.int64)
    raw[order] = c_raw[cluster] + slo - c_lo[cluster]
    return list(zip(c_lo.tolist(), c_hi.tolist(), strict=True)), raw


def group_rows(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of the aligned key columns (or of one [B, k] array): (first row of each group [U],
    group of each row [B])."""
    if len(keys) == 2 and len(keys[0]):
        a, b = keys
        top = int(b.max()) + 1
        if int(a.max()) < (1 << 62) // max(top, 1):
            keys = (a * top + b,)
    if len(keys) == 1 and keys[0].ndim == 1:
        _, first, inverse = np.unique(keys[0], return_index=True, return_inverse=True)
    else:
        rows = keys[0] if len(keys) == 1 else np.column_stack(keys)
        _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    return first.astype(np.int64), inverse.reshape(-1).astype(np.int64)


def _gather(windows: np.ndarray, start: np.ndarray, fields: list[str]) -> dict[str, np.ndarray]:
    """ "hist/<field>" [B, T] int64 from the windows of a _histories buffer, starting at rows `start`."""
    hist = windows[start]  # [B, fields, T]
    return {f"hist/{f}": hist[:, j].astype(np.int64) for j, f in enumerate(fields)}


class HistoryReader:
    """Histories by (seq, end) from one data file, for callers that hold (seq, end) pairs rather than rows:
    the [B, T] windows a user encoder reads and, with a seen_field, each history's visible ids of that field.

    The windows are exactly those DataFile.batches assembles for examples with the same (seq, end); both
    are built by DataFile._histories.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fields: list[str],
        max_len: int,
        encoder: Encoder | None = None,
        seen_field: str | None = None,
    ):
        self.data = DataFile(path)
        missing = [
            f for f in [*fields, *[seen_field] * (seen_field is not None)] if f not in self.data.fields.behaviors
        ]
        if missing:
            self.data.close()
            raise DmrxError(
                f"{path}: lacks behaviors/{', behaviors/'.join(dict.fromkeys(missing))}, which the "
                "model was trained with"
            )
        self.fields, self.max_len, self.encoder, self.seen_field = list(fields), int(max_len), encoder, seen_field

    def close(self) -> None:
        self.data.close()

    def __enter__(self) -> HistoryReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, seq: np.ndarray, end: np.ndarray) -> tuple[dict[str, np.ndarray], list[np.ndarray] | None]:
        """The batch a user encoder reads ("hist/<field>" [B, T] right-aligned, "hist_len" [B]) and, with a
        seen_field, each history's visible ids of that field (encoded when the reader has an encoder)."""
        d, T = self.data, self.max_len
        seq, end = np.asarray(seq, np.int64), np.asarray(end, np.int64)
        if len(seq) and (seq.min() < 0 or seq.max() >= d.n_sequences):
            raise DmrxError(f"{d.path}: sequence index out of range")
        if len(seq) and ((end < 0).any() or (end > d.offsets[seq + 1] - d.offsets[seq]).any()):
            raise DmrxError(f"{d.path}: a history end lies outside its sequence")
        # The seen field is read whole (all visible rows) once; its window comes from the same buffer.
        windowed = [f for f in self.fields if f != self.seen_field]
        batch: dict[str, np.ndarray] = {}
        if windowed:
            buffer, start, _ = d._histories(seq, end, T, windowed, self.encoder)
            batch.update(_gather(sliding_window_view(buffer, T, axis=0), start, windowed))
        seen = None
        if self.seen_field is not None:
            buffer, start, _ = d._histories(seq, end, T, [self.seen_field], self.encoder, full=True)
            if self.seen_field in self.fields:
                batch.update(_gather(sliding_window_view(buffer, T, axis=0), start, [self.seen_field]))
            column = buffer[:, 0].astype(np.int64)
            seen = [column[s + T - n : s + T] for s, n in zip(start.tolist(), end.tolist(), strict=True)]
        batch = {f"hist/{f}": batch[f"hist/{f}"] for f in self.fields}
        batch["hist_len"] = np.minimum(end, T)
        return batch, seen
