"""Vocabularies: raw int64 ids as users know them -> contiguous indices (0 = padding / unknown)."""

from __future__ import annotations

import numpy as np

_DENSE_LIMIT = 1 << 24  # raw ids below this encode through a lookup table instead of a binary search


class Vocab:
    """Sorted raw ids; raw id ids[i] encodes to i + 1, anything else to 0. Encoding is vectorised."""

    def __init__(self, ids: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise ValueError("vocabulary ids must be strictly increasing")
        self.ids = ids
        self._table = None
        if len(ids) and 0 <= ids[0] and ids[-1] < max(_DENSE_LIMIT, 4 * len(ids)):
            self._table = np.zeros(int(ids[-1]) + 1, np.int64)
            self._table[ids] = np.arange(1, len(ids) + 1)

    @classmethod
    def build(cls, values: np.ndarray, min_count: int = 1) -> Vocab:
        """Every raw id seen in `values` at least min_count times."""
        uniq, cnt = np.unique(np.asarray(values, np.int64), return_counts=True)
        return cls(uniq[cnt >= min_count])

    def __len__(self) -> int:
        """Number of rows an embedding table needs: every known id plus the padding/unknown row 0."""
        return len(self.ids) + 1

    def encode(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.int64)
        if self._table is not None:
            if raw.size == 0 or (raw.min() >= 0 and raw.max() < len(self._table)):
                return self._table[raw]  # the common case: one gather, no masks
            inside = (raw >= 0) & (raw < len(self._table))
            return np.where(inside, self._table[np.where(inside, raw, 0)], 0)
        if not len(self.ids):
            return np.zeros_like(raw)
        pos = np.minimum(np.searchsorted(self.ids, raw), len(self.ids) - 1)
        return np.where(self.ids[pos] == raw, pos + 1, 0)

    def decode(self, index: np.ndarray) -> np.ndarray:
        """Indices -> raw ids; index 0 (padding/unknown) and indices past the end decode to -1."""
        index = np.asarray(index, dtype=np.int64)
        if not len(self.ids):
            return np.full_like(index, -1)
        known = (index > 0) & (index <= len(self.ids))  # out-of-range indices are unknown too
        return np.where(known, self.ids[np.clip(index - 1, 0, len(self.ids) - 1)], -1)
