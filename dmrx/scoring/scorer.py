"""Scoring numpy batches: raw-id columns in, CTRs out.

`Scorer(model, backend, precision).score_batch(cols)` is a function over one numpy batch (raw ids, as in a
dmrx candidate file, plus each row's history), so any engine can fan it out (Ray Data `map_batches`, Spark
`mapInPandas`: see docs/scoring.md). Candidates that share a history (same `seq` and `end`, or identical
history rows when those columns are absent) share one user encoding: the user side runs once per distinct
history, the candidate side once per candidate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from dmrx.choices import BACKENDS, PRECISIONS
from dmrx.data.features import batch_key
from dmrx.data.reader import group_rows
from dmrx.errors import DmrxError

Tag = TypeVar("Tag")


@dataclass
class Work:
    """A batch ready for a backend: table indices, histories once per distinct user encoding.

    hist: "hist/<field>" -> [U, T] int64 indices (padding 0 on the left, T = the model's max_len)
    hist_len: [U] real behaviours per history; user_row: [B] the history row of each candidate
    cand: candidate-side batch keys [B] (target/*, profile/*, user_index, context/*, dense/* standardised)
    """

    hist: dict[str, np.ndarray]
    hist_len: np.ndarray
    user_row: np.ndarray
    cand: dict[str, np.ndarray]

    @property
    def n_candidates(self) -> int:
        return len(self.user_row)

    @property
    def n_users(self) -> int:
        return len(self.hist_len)

    def split(self, parts: int) -> list[Work]:
        """Contiguous candidate ranges, each with only the histories it uses (for parallel workers)."""
        B = self.n_candidates
        bounds = np.linspace(0, B, max(1, min(parts, B)) + 1).astype(np.int64)
        out = []
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=False):
            users, row = np.unique(self.user_row[a:b], return_inverse=True)
            out.append(
                Work(
                    {k: v[users] for k, v in self.hist.items()},
                    self.hist_len[users],
                    row.reshape(-1).astype(np.int64),
                    {k: v[a:b] for k, v in self.cand.items()},
                )
            )
        return out


def _count_unknown_hist(hist: dict[str, np.ndarray], hist_len: np.ndarray) -> dict[str, int]:
    if not hist:
        return {}
    T = next(iter(hist.values())).shape[1]
    real = np.arange(T)[None, :] >= (T - hist_len)[:, None]
    return {k: int(((v == 0) & real).sum()) for k, v in hist.items()}


class Scorer:
    """Scores numpy batches with a trained run (torch) or an export bundle (onnxruntime, TensorRT; the export
    alone, anywhere: see dmrx.runtime.export_bundle).

    model: a run directory, an export directory, a loaded Bundle, or None for the most recent
    run. backend: auto | torch | onnxruntime | tensorrt; precision: fp32 | fp16 | bf16 | int8 (what each
    backend offers: see docs/scoring.md). threads: CPU threads (torch intra-op / onnxruntime intra-op).
    """

    def __init__(
        self,
        model=None,
        backend: str = "auto",
        precision: str = "fp32",
        device: str | None = None,
        threads: int | None = None,
    ):
        from dmrx.scoring.backends import load_model, make_backend

        if backend not in BACKENDS:
            raise DmrxError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if precision not in PRECISIONS:
            raise DmrxError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if threads is not None and threads < 1:
            raise DmrxError(f"--threads must be >= 1, got {threads}")
        self.bundle, self.export = load_model(model, backend)
        self.spec = self.bundle.spec
        self.max_len = self.bundle.max_len
        self.encoder = self.bundle.encoder()
        self.backend = make_backend(self.bundle, self.export, backend, precision, device, threads)
        self._pool = None
        self.hist_keys = [f"hist/{f}" for f in self.spec.behaviors]
        self.cand_keys = [k for k in self.spec.batch_keys() if k != "user"]

    @property
    def model_hash(self) -> str:
        return self.bundle.weights_hash

    def describe(self) -> dict:
        return self.backend.describe()

    # -- numpy batches with raw ids ------------------------------------------------------------------
    def prepare(self, cols: dict, validate: bool = True) -> tuple[Work, dict[str, int]]:
        """Raw-id columns -> (Work, unknown ids per field). Keys may use "__" for "/" (target__item).

        Needs: user, the model's target/profile/context/dense columns, and per behaviour field "hist/<f>"
        either [B, T'] (right-aligned, most recent last, with "hist_len" [B]) or a length-B sequence of
        1-D id lists (most recent last; hist_len is then their lengths). "seq" and "end", when present,
        identify histories (rows with equal (seq, end) share one encoding); otherwise identical history
        rows do.
        """
        cols = {batch_key(str(k)): v for k, v in cols.items()}
        if "user" not in cols:
            raise DmrxError("batch lacks column 'user'")
        B = len(cols["user"])
        need = self.spec.batch_keys() + self.hist_keys
        missing = [k for k in need if k not in cols]
        if missing:
            raise DmrxError(f"batch lacks column(s) {', '.join(missing)}, which the model reads")
        raw: dict[str, np.ndarray] = {}
        for k in self.spec.batch_keys():
            arr = np.asarray(cols[k])
            if arr.shape != (B,):
                raise DmrxError(f"batch column {k} has shape {arr.shape}, expected ({B},)")
            if k.startswith("dense/"):
                if arr.dtype.kind not in "iuf":
                    raise DmrxError(f"batch column {k} must be numeric, has dtype {arr.dtype}")
                arr = arr.astype(np.float32, copy=False)
                if validate and not np.isfinite(arr).all():
                    raise DmrxError(f"batch column {k} row {int(np.argmax(~np.isfinite(arr)))}: not a finite number")
            else:
                if arr.dtype.kind not in "iu" and not (arr.size == 0):
                    raise DmrxError(f"batch column {k} must hold integer ids, has dtype {arr.dtype}")
                arr = arr.astype(np.int64, copy=False)
                if validate and len(arr) and arr.min() < 0:
                    raise DmrxError(f"batch column {k} row {int(np.argmax(arr < 0))}: negative id {arr.min()}")
            raw[k] = arr
        hist, hist_len = self._histories(cols, B, validate)
        if "seq" in cols and "end" in cols:
            first, inverse = group_rows(np.asarray(cols["seq"], np.int64), np.asarray(cols["end"], np.int64))
        else:
            first, inverse = group_rows(np.column_stack([hist_len] + [hist[k] for k in self.hist_keys]))
        hist_u = {}
        T = self.max_len
        hl = hist_len[first]
        pad = np.arange(T)[None, :] < (T - hl)[:, None]
        for k in self.hist_keys:
            enc = self.encoder(k, hist[k][first])
            enc[pad] = 0
            hist_u[k] = enc
        enc_cols = {k: (self.encoder(k, v) if v.dtype == np.int64 else v) for k, v in raw.items()}
        enc_cols = self.encoder.finish(enc_cols)
        unknown = self.encoder.unknown_counts(enc_cols)
        unknown.update(_count_unknown_hist(hist_u, hl))
        cand = {k: enc_cols[k] for k in self.cand_keys}
        if self.spec.use_user_id:
            cand["user_index"] = enc_cols["user_index"]
        return Work(hist_u, hl, inverse, cand), unknown

    def _histories(self, cols: dict, B: int, validate: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Histories as [B, max_len] right-aligned raw ids (zeros left), and their lengths."""
        T = self.max_len
        hist, lengths = {}, None
        for k in self.hist_keys:
            v = cols[k]
            arr = v if isinstance(v, np.ndarray) and v.dtype != object else None
            if arr is not None and arr.ndim == 2:
                if arr.shape[0] != B:
                    raise DmrxError(f"batch column {k} has {arr.shape[0]} rows, expected {B}")
                if arr.dtype.kind not in "iu" and arr.size:
                    raise DmrxError(f"batch column {k} must hold integer ids, has dtype {arr.dtype}")
                if "hist_len" not in cols:
                    raise DmrxError(f"batch column {k} is a [B, T] array: hist_len [B] must come with it")
                arr = arr.astype(np.int64, copy=False)
                width = arr.shape[1]
                if width >= T:
                    arr = arr[:, width - T :]
                else:
                    arr = np.concatenate([np.zeros((B, T - width), np.int64), arr], axis=1)
                hist[k] = np.ascontiguousarray(arr)
                continue
            seqs = list(v)  # ragged: one id sequence per row, most recent last
            if len(seqs) != B:
                raise DmrxError(f"batch column {k} has {len(seqs)} rows, expected {B}")
            lens = np.array([len(s) for s in seqs], np.int64)
            if lengths is not None and not np.array_equal(lens, lengths):
                row = int(np.argmax(lens != lengths))
                raise DmrxError(
                    f"batch column {k} row {row}: history length {lens[row]} differs from the "
                    f"other behaviour fields' {lengths[row]}"
                )
            lengths = lens
            out = np.zeros((B, T), np.int64)
            for i, s in enumerate(seqs):
                s = np.asarray(s, dtype=np.int64)[-T:]
                if len(s):
                    out[i, T - len(s) :] = s
            hist[k] = out
        if "hist_len" in cols:
            hl = np.asarray(cols["hist_len"]).astype(np.int64)
            if hl.shape != (B,):
                raise DmrxError(f"batch column hist_len has shape {hl.shape}, expected ({B},)")
            if lengths is not None and not np.array_equal(np.minimum(hl, T), np.minimum(lengths, T)):
                row = int(np.argmax(np.minimum(hl, T) != np.minimum(lengths, T)))
                raise DmrxError(f"batch column hist_len row {row}: {hl[row]} differs from the history's length")
        elif lengths is not None:
            hl = lengths
        else:
            hl = np.zeros(B, np.int64)
        if validate and len(hl) and hl.min() < 0:
            raise DmrxError(f"batch column hist_len row {int(np.argmax(hl < 0))}: negative length")
        hl = np.minimum(hl, T)
        if validate:
            for k, arr in hist.items():
                if arr.size and arr.min() < 0:
                    row = int(np.argmax((arr < 0).any(axis=1)))
                    raise DmrxError(f"batch column {k} row {row}: negative id")
        return hist, hl

    @property
    def workers(self) -> int:
        """Batches scored at once on CPU (threads, each running one batch single-threaded)."""
        return int(getattr(self.backend, "workers", 1))

    def score_work(self, work: Work) -> np.ndarray:
        return self.backend.score(work)

    def score_works(self, works: list[Work]) -> Iterator[np.ndarray]:
        """Scores of each Work, in order, spread over the workers."""
        return (scores for _, scores in self.score_stream((w, None) for w in works))

    def score_stream(self, items: Iterable[tuple[Work, Tag]]) -> Iterator[tuple[Tag, np.ndarray]]:
        """(tag, scores) for each (Work, tag), in order. The works are scored on the workers as they arrive,
        up to two per worker ahead of the consumer, so a stream never waits at a group boundary and its
        first scores come as soon as its first Work is read."""
        if self.workers <= 1:
            for work, tag in items:
                yield tag, self.backend.score(work)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dmrx-score")
        pending: deque = deque()
        for work, tag in items:
            pending.append((tag, self._pool.submit(self.backend.score, work)))
            if len(pending) > 2 * self.workers:
                tag0, done = pending.popleft()
                yield tag0, done.result()
        while pending:
            tag0, done = pending.popleft()
            yield tag0, done.result()

    def score_batch(self, cols: dict) -> np.ndarray:
        """CTR (float32 [B]) of every row of a raw-id numpy batch (see `prepare` for the columns)."""
        work, _ = self.prepare(cols)
        if self.workers > 1 and work.n_candidates >= 1024 * self.workers:
            return np.concatenate(list(self.score_works(work.split(self.workers))))
        return self.score_work(work)

    def __call__(self, batch: dict) -> dict:
        """For Ray Data's map_batches (batch_format="numpy"): the batch with a "score" column added."""
        out = dict(batch)
        out["score"] = self.score_batch(batch)
        return out
