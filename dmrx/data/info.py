"""`dmrx data info`: what a dmrx data file holds, computed in one streaming pass over its example columns.

Memory stays bounded by the chunk size, plus one counter per distinct user (for the exact distinct count)
and one per possible history length (for exact percentiles): never by the number of rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dmrx.data.format import GROUPS
from dmrx.data.reader import DataFile
from dmrx.errors import DmrxError


class _Distinct:
    """Exact count of distinct int64 values seen in chunks: sorted uniques, merged in amortised batches."""

    def __init__(self):
        self._merged = np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0

    def add(self, values: np.ndarray) -> None:
        uniq = np.unique(values)
        self._pending.append(uniq)
        self._pending_size += len(uniq)
        if self._pending_size > max(len(self._merged), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        self._merged = np.unique(np.concatenate([self._merged, *self._pending]))
        self._pending, self._pending_size = [], 0

    def __len__(self) -> int:
        self._merge()
        return len(self._merged)


def _quantile(counts: np.ndarray, percent: int) -> int:
    """The smallest value v with at least percent% of the values <= v, from the histogram `counts`
    (numpy's "inverted_cdf" percentile; integer arithmetic, so no rounding at the boundaries)."""
    cum = np.cumsum(counts)
    return int(np.searchsorted(cum * 100, percent * cum[-1], side="left"))


def _plain(value):
    """Attribute values as JSON-friendly Python objects."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def describe(path: str | os.PathLike, chunk_rows: int = 1 << 18) -> dict:
    """Counts, label rate, mean probability, visible-history lengths, fields by role and size of a data file.

    Reading validates every example column it reads (ids, seq/end in range, labels, probabilities), so a
    damaged file raises DmrxError here as it would in training.
    """
    path = Path(path)
    with DataFile(path) as data:
        f = data.fields
        # every column, checked as scoring and training check it (ids >= 0, finite dense values, ...)
        keys = f.example_keys()
        end_counts = np.zeros(1, np.int64)  # end_counts[k]: examples that see k behaviours
        end_sum = positives = 0
        prob_sum = 0.0
        users = _Distinct()
        for start in range(0, data.n_rows, chunk_rows):
            cols = data.read_columns(start, min(start + chunk_rows, data.n_rows), keys)
            counts = np.bincount(cols["end"])
            if len(counts) > len(end_counts):
                end_counts = np.pad(end_counts, (0, len(counts) - len(end_counts)))
            end_counts[: len(counts)] += counts
            end_sum += int(cols["end"].sum())
            users.add(cols["user"])
            if f.has_label:
                positives += int(np.count_nonzero(cols["label"]))
            if f.has_prob:
                prob_sum += float(cols["prob"].sum(dtype=np.float64))
        for name in f.behaviors:
            for start in range(0, data.n_behaviors, chunk_rows):
                part = data._read(f"behaviors/{name}", slice(start, min(start + chunk_rows, data.n_behaviors)))
                if len(part) and part.min() < 0:
                    row = start + int(np.argmax(part < 0))
                    raise DmrxError(f"{path}: dataset behaviors/{name} row {row}: negative id {part.min()}")
        n = data.n_rows
        history = None
        if n:
            present = np.flatnonzero(end_counts)
            history = {
                "min": int(present[0]),
                "mean": end_sum / n,
                "p50": _quantile(end_counts, 50),
                "p90": _quantile(end_counts, 90),
                "max": int(present[-1]),
                "empty_share": int(end_counts[0]) / n,
            }
        return {
            "file": str(path),
            "file_bytes": path.stat().st_size,
            "schema_version": int(data.attrs["schema_version"]),
            "rows": n,
            "sequences": data.n_sequences,
            "behaviors": data.n_behaviors,
            "users": len(users),
            "label_rate": positives / n if f.has_label and n else None,
            "mean_prob": prob_sum / n if f.has_prob and n else None,
            "history": history,
            "fields": {
                "behaviors": list(f.behaviors),
                **{g: list(getattr(f, g)) for g in GROUPS},
                "label": f.has_label,
                "prob": f.has_prob,
            },
            "attrs": {k: _plain(v) for k, v in data.attrs.items() if k not in ("dmrx_format", "schema_version")},
        }
