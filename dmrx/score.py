"""Offline batch scoring: numpy batches in, CTRs out; whole candidate files with resume, shards and merge.

Two layers:

- `Scorer(model, backend, precision).score_batch(cols)`: a function over one numpy batch (raw ids, as in a
  dmrx candidate file, plus each row's history), so any engine can fan it out (Ray Data `map_batches`,
  Spark `mapInPandas`: see docs/scoring.md). Candidates that share a history (same `seq` and `end`, or
  identical history rows when those columns are absent) share one user encoding: the user side runs once
  per distinct history, the candidate side once per candidate.
- `score_file(...)` (`dmrx score`): streams a candidate file in chunks (a background thread reads and
  encodes the next chunks while the current one is scored), writes /score in row order to a temporary
  file and renames it when complete. Progress is committed after every chunk, so an interrupted run
  continues with `resume=True` and ends with the same bytes in /score as an uninterrupted one.

Commit protocol (crash-safe at any instant, constant memory): beside the output, `.OUT.partial/` holds
`scores.f32` (raw little-endian float32, appended chunk by chunk, fsynced) and `state.json` (replaced
atomically after the scores it counts are on disk: committed rows, the model hash, backend, precision,
batch and chunk sizes, threads, the input's identity, running statistics). Scores past the committed count
are discarded on resume. The final HDF5 is built from scores.f32 in blocks, then renamed into place.

Shards (`shard=(i, n)`) are contiguous row ranges whose boundaries are moved forward to the next change of
user, so a user's candidates stay in one shard (and are grouped as in an unsharded run, for files sorted by
user as dmrx writes them). Each shard output records its row range; `merge_shards` checks that the ranges
tile the file exactly and joins them in row order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from dmrx import __version__
from dmrx.atomic import atomic_file
from dmrx.errors import DmrxError

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
SCORES_FORMAT, SCORES_VERSION = "dmrx-scores", 1
STATE_VERSION = 1
DEFAULT_BATCH = 4096
DEFAULT_CHUNK = 1 << 16  # rows per committed chunk (rounded to a multiple of the batch size)
TEST_KILL_ENV = "DMRX_SCORE_TEST_KILL"  # internal test hook: SIGKILL self mid-commit of chunk N (see below)


# ---- one batch ------------------------------------------------------------------------------------------
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
            out.append(Work({k: v[users] for k, v in self.hist.items()}, self.hist_len[users],
                            row.reshape(-1).astype(np.int64), {k: v[a:b] for k, v in self.cand.items()}))
        return out


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


def _count_unknown_hist(hist: dict[str, np.ndarray], hist_len: np.ndarray) -> dict[str, int]:
    if not hist:
        return {}
    T = next(iter(hist.values())).shape[1]
    real = np.arange(T)[None, :] >= (T - hist_len)[:, None]
    return {k: int(((v == 0) & real).sum()) for k, v in hist.items()}


class Scorer:
    """Scores numpy batches with a trained run (torch) or its export bundle (onnxruntime, TensorRT).

    model: a run directory, an export directory (RUN/export), a loaded Bundle, or None for the most recent
    run. backend: auto | torch | onnxruntime | tensorrt; precision: fp32 | fp16 | bf16 | int8 (what each
    backend offers: see docs/scoring.md). threads: CPU threads (torch intra-op / onnxruntime intra-op).
    """

    def __init__(self, model=None, backend: str = "auto", precision: str = "fp32", device: str | None = None,
                 threads: int | None = None):
        from dmrx.score_backends import load_model, make_backend

        if backend not in BACKENDS:
            raise DmrxError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if precision not in PRECISIONS:
            raise DmrxError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if threads is not None and threads < 1:
            raise DmrxError(f"--threads must be >= 1, got {threads}")
        self.bundle, self.export_dir = load_model(model)
        self.spec = self.bundle.spec
        self.max_len = self.bundle.model.cfg.max_len
        self.encoder = self.bundle.encoder()
        self.backend = make_backend(self.bundle, self.export_dir, backend, precision, device, threads)
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
        cols = {str(k).replace("__", "/"): v for k, v in cols.items()}
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
                    arr = arr[:, width - T:]
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
                raise DmrxError(f"batch column {k} row {row}: history length {lens[row]} differs from the "
                                f"other behaviour fields' {lengths[row]}")
            lengths = lens
            out = np.zeros((B, T), np.int64)
            for i, s in enumerate(seqs):
                s = np.asarray(s, dtype=np.int64)[-T:]
                if len(s):
                    out[i, T - len(s):] = s
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
        if self.workers <= 1 or len(works) <= 1:
            return (self.backend.score(w) for w in works)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dmrx-score")
        return self._pool.map(self.backend.score, works)

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


# ---- files --------------------------------------------------------------------------------------------
def default_output(candidates: Path, shard: tuple[int, int] | None = None) -> Path:
    stem = candidates.name[:-3] if candidates.name.endswith(".h5") else candidates.name
    tag = f".shard-{shard[0]}-of-{shard[1]}" if shard and shard[1] > 1 else ""
    return candidates.with_name(f"{stem}.scores{tag}.h5")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DmrxError(f"--shard must be I/N (shard I of N, 0 <= I < N), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise DmrxError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return i, n


def shard_range(data, index: int, count: int, window: int = 4096) -> tuple[int, int]:
    """Rows [lo, hi) of shard `index` of `count`: equal slices moved forward to the next change of user."""
    N = data.n_rows

    def boundary(k: int) -> int:
        b = k * N // count
        if b <= 0 or b >= N:
            return min(max(b, 0), N)
        pos = b
        while pos < N:
            users = data.read_columns(pos - 1, min(pos + window, N), ["user"])["user"]
            change = np.flatnonzero(users[1:] != users[:-1])
            if len(change):
                return pos + int(change[0])
            pos += len(users) - 1
        return N

    return boundary(index), boundary(index + 1)


def _fingerprint(path: Path, n_rows: int) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "rows": n_rows}


def _partial_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def _write_state(pdir: Path, state: dict) -> None:
    tmp = pdir / "state.json.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, pdir / "state.json")


def _read_state(pdir: Path) -> dict | None:
    try:
        state = json.loads((pdir / "state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return state if state.get("version") == STATE_VERSION else None


@dataclass
class _Chunk:
    start: int
    stop: int
    works: list[Work]
    users: list[np.ndarray]  # raw user column per batch (for counting user runs)
    unknown: dict[str, int]


def _chunks(data, scorer: Scorer, lo: int, hi: int, batch_size: int, chunk_rows: int) -> Iterator[_Chunk]:
    """Read, validate and encode rows [lo, hi) chunk by chunk (this runs in the prefetch thread)."""
    spec, enc = scorer.spec, scorer.encoder
    keys = sorted(set(spec.batch_keys()) | {"user"})
    for c0 in range(lo, hi, chunk_rows):
        c1 = min(c0 + chunk_rows, hi)
        se = data.read_columns(c0, c1, ["seq", "end"])
        works, users, unknown = [], [], {}
        row = 0
        for batch in data.batches(batch_size, scorer.max_len, row_range=(c0, c1), chunk_rows=chunk_rows,
                                  encoder=enc, keys=keys, behavior_fields=list(spec.behaviors)):
            n = len(batch["user"])
            first, inverse = group_rows(se["seq"][row:row + n], se["end"][row:row + n])
            row += n
            users.append(batch["user"])
            hist = {k: np.ascontiguousarray(batch[k][first]) for k in scorer.hist_keys}
            hist_len = np.asarray(batch["hist_len"][first], np.int64)
            cand = enc.finish({k: batch[k] for k in keys})
            for k, v in enc.unknown_counts(cand).items():
                unknown[k] = unknown.get(k, 0) + v
            for k, v in _count_unknown_hist(hist, hist_len).items():
                unknown[k] = unknown.get(k, 0) + v
            cand = {k: np.ascontiguousarray(cand[k]) for k in scorer.cand_keys + ["user_index"] * spec.use_user_id}
            works.append(Work(hist, hist_len, inverse, cand))
        if row != c1 - c0:
            raise DmrxError(f"{data.path}: read {row} rows of chunk {c0}:{c1}")  # a reader bug, not user input
        yield _Chunk(c0, c1, works, users, unknown)


def _field_name(key: str) -> str:
    return {"user_index": "user"}.get(key, key)


def score_file(candidates: str | os.PathLike, model=None, out: str | os.PathLike | None = None,
               backend: str = "auto", precision: str = "fp32", batch_size: int = DEFAULT_BATCH,
               threads: int | None = None, resume: bool = False, shard: tuple[int, int] | None = None,
               chunk_rows: int = DEFAULT_CHUNK, device: str | None = None, prefetch_depth: int = 2,
               progress: Callable[[int, int], None] | None = None,
               on_commit: Callable[[int], None] | None = None, scorer: Scorer | None = None) -> dict:
    """Score a candidate file into OUT (default CANDIDATES.scores.h5); return the summary.

    progress(rows_done, rows_total) is called after every batch. on_commit(committed_rows) is called after
    every committed chunk: an exception raised there interrupts the run exactly as a crash after that
    commit would (the documented hook the resume tests use). The environment variable
    DMRX_SCORE_TEST_KILL=N makes the process SIGKILL itself after writing chunk N's scores and before
    committing them (the worst moment to die), for subprocess tests.
    """
    from dmrx.data.prefetch import prefetch
    from dmrx.data.reader import DataFile

    t0 = time.perf_counter()
    candidates = Path(candidates)
    if batch_size < 1:
        raise DmrxError(f"--batch-size must be >= 1, got {batch_size}")
    if chunk_rows < 1:
        raise DmrxError(f"--chunk-rows must be >= 1, got {chunk_rows}")
    out = Path(out) if out is not None else default_output(candidates, shard)
    if out.resolve() == candidates.resolve():
        raise DmrxError(f"{out}: the output would overwrite the input; choose another --out")
    pdir = _partial_dir(out)
    state = _read_state(pdir) if resume else None
    if state is not None:  # a resumed run keeps what fixes the bytes of every score
        batch_size, chunk_rows = state["batch_size"], state["chunk_rows"]
        threads = state.get("threads") or threads
    chunk_rows = max(batch_size, chunk_rows // batch_size * batch_size)

    with DataFile(candidates) as data:
        if scorer is None:
            scorer = Scorer(model, backend, precision, device, threads)
        if data.n_rows:  # an empty file has nothing to score, whatever columns it declares
            scorer.encoder.check_file(data)
        n_total = data.n_rows
        lo, hi = shard_range(data, *shard) if shard else (0, n_total)
        desc = scorer.describe()
        ident = {"model_hash": scorer.model_hash, "backend": desc["backend"], "precision": desc["precision"],
                 "input": _fingerprint(candidates, n_total), "row_range": [lo, hi],
                 "shard": list(shard) if shard else None, "max_len": scorer.max_len}
        if state is not None:
            for key, what in (("model_hash", "model"), ("backend", "backend"), ("precision", "precision"),
                              ("input", "input file"), ("row_range", "row range (shard)"),
                              ("max_len", "history length")):
                if state.get(key) != ident[key]:
                    raise DmrxError(f"--resume: {pdir} was scored with another {what} ({state.get(key)!r}, "
                                    f"now {ident[key]!r}); rerun without --resume to start over")
        elif resume and out.exists():
            done = _complete_matches(out, ident)
            if done is not None:
                return {**done, "wall_s": time.perf_counter() - t0, "note": "already complete, nothing to resume"}

        if state is None:
            shutil.rmtree(pdir, ignore_errors=True)
            pdir.mkdir(parents=True)
            (pdir / "scores.f32").touch()
            state = {"version": STATE_VERSION, **ident, "batch_size": batch_size, "chunk_rows": chunk_rows,
                     "threads": desc.get("threads"), "committed_rows": 0, "unknown": {}, "user_runs": 0,
                     "last_user": None, "histories": 0}
            _write_state(pdir, state)
        t_ready = time.perf_counter()
        committed = int(state["committed_rows"])
        resumed_from = lo + committed if committed else None
        start = lo + committed
        kill_after = int(os.environ.get(TEST_KILL_ENV, "0") or 0)
        chunks_done = 0
        rows_done = committed
        try:
            with open(pdir / "scores.f32", "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                if size < committed * 4:
                    raise DmrxError(f"--resume: {pdir}/scores.f32 holds fewer scores than state.json commits; "
                                    "rerun without --resume to start over")
                f.truncate(committed * 4)
                f.seek(committed * 4)
                if progress is not None:
                    progress(rows_done, hi - lo)
                with prefetch(_chunks(data, scorer, start, hi, batch_size, chunk_rows), depth=prefetch_depth,
                              name="dmrx-score-read") as chunks:
                    for chunk in chunks:
                        scores = np.empty(chunk.stop - chunk.start, np.float32)
                        pos = 0
                        last = state["last_user"]
                        results = scorer.score_works(chunk.works)
                        for work, users, res in zip(chunk.works, chunk.users, results, strict=True):
                            n = work.n_candidates
                            scores[pos:pos + n] = res
                            pos += n
                            state["histories"] += work.n_users
                            if n:
                                runs = int((users[1:] != users[:-1]).sum()) + int(last is None or users[0] != last)
                                state["user_runs"] += runs
                                last = int(users[-1])
                            rows_done += n
                            if progress is not None:
                                progress(rows_done, hi - lo)
                        state["last_user"] = last
                        for k, v in chunk.unknown.items():
                            state["unknown"][k] = state["unknown"].get(k, 0) + v
                        f.write(scores.astype("<f4", copy=False).tobytes())
                        f.flush()
                        os.fsync(f.fileno())
                        chunks_done += 1
                        if kill_after and chunks_done == kill_after:
                            os.kill(os.getpid(), signal.SIGKILL)
                        state["committed_rows"] = chunk.stop - lo
                        _write_state(pdir, state)
                        if on_commit is not None:
                            on_commit(state["committed_rows"])
            if state["committed_rows"] != hi - lo:
                raise DmrxError(f"{candidates}: scored {state['committed_rows']} of {hi - lo} rows")
            attrs = {"dmrx_format": SCORES_FORMAT, "version": SCORES_VERSION, "model_hash": scorer.model_hash,
                     "model": str(scorer.bundle.path), "backend": desc["backend"], "precision": desc["precision"],
                     "device": str(desc.get("device", desc.get("providers", ""))),
                     "input": str(candidates.resolve()), "input_rows": n_total, "input_bytes": ident["input"]["bytes"],
                     "input_mtime_ns": ident["input"]["mtime_ns"], "row_start": lo, "row_stop": hi,
                     "shard_index": shard[0] if shard else 0, "shard_count": shard[1] if shard else 1,
                     "batch_size": batch_size, "dmrx_version": __version__}
            _finish(out, pdir / "scores.f32", hi - lo, attrs)
        except DmrxError:
            shutil.rmtree(pdir, ignore_errors=True)  # bad input: nothing worth resuming, nothing left behind
            raise
    shutil.rmtree(pdir, ignore_errors=True)
    t_end = time.perf_counter()
    scored = hi - lo - committed
    return {
        "input": str(candidates), "output": str(out), "rows": hi - lo, "rows_scored_now": scored,
        "resumed_from_row": resumed_from, "users": state["user_runs"], "user_encodings": state["histories"],
        "unknown_ids": {_field_name(k): v for k, v in sorted(state["unknown"].items())},
        **{k: v for k, v in desc.items()}, "batch_size": batch_size, "chunk_rows": chunk_rows,
        "shard": f"{shard[0]}/{shard[1]}" if shard else None, "row_range": [lo, hi],
        "model": str(scorer.bundle.path), "model_hash": scorer.model_hash,
        "wall_s": t_end - t0, "load_s": t_ready - t0, "score_s": t_end - t_ready,
        "rows_per_s": scored / (t_end - t_ready) if t_end > t_ready else 0.0,
    }


def _complete_matches(out: Path, ident: dict) -> dict | None:
    """The summary of an existing complete output made by the same model/backend/precision/input, or None."""
    try:
        with h5py.File(out, "r") as h5:
            a = dict(h5.attrs)
            n = h5["score"].shape[0]
    except (OSError, KeyError):
        return None
    same = (a.get("model_hash") == ident["model_hash"] and a.get("backend") == ident["backend"]
            and a.get("precision") == ident["precision"] and a.get("input_bytes") == ident["input"]["bytes"]
            and a.get("input_mtime_ns") == ident["input"]["mtime_ns"]
            and [a.get("row_start"), a.get("row_stop")] == ident["row_range"]
            and n == ident["row_range"][1] - ident["row_range"][0])
    if not same:
        return None
    return {"input": ident["input"]["path"], "output": str(out), "rows": n, "rows_scored_now": 0,
            "backend": ident["backend"], "precision": ident["precision"], "model_hash": ident["model_hash"],
            "rows_per_s": 0.0}


def _finish(out: Path, raw: Path, n: int, attrs: dict, block: int = 1 << 20) -> None:
    """OUT with /score from the raw float32 file, written to a temporary file and renamed."""
    with atomic_file(out) as tmp:
        with h5py.File(tmp, "w") as h5, open(raw, "rb") as f:
            ds = h5.create_dataset("score", shape=(n,), dtype="<f4")
            for s in range(0, n, block):
                m = min(block, n - s)
                ds[s:s + m] = np.frombuffer(f.read(4 * m), dtype="<f4")
            for k, v in attrs.items():
                h5.attrs[k] = v


# ---- merge --------------------------------------------------------------------------------------------
def read_scores_attrs(path: Path) -> tuple[dict, int]:
    path = Path(path)
    if not path.exists():
        raise DmrxError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as h5:
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
            if "score" not in h5 or not isinstance(h5["score"], h5py.Dataset):
                raise DmrxError(f"{path}: missing dataset /score")
            n = h5["score"].shape[0]
    except OSError as e:
        kind = "not an HDF5 file" if not h5py.is_hdf5(path) else "damaged or truncated HDF5 file"
        raise DmrxError(f"{path}: {kind} ({e.__class__.__name__})") from None
    if attrs.get("dmrx_format") != SCORES_FORMAT:
        raise DmrxError(f"{path}: not a dmrx scores file (root attribute dmrx_format is not {SCORES_FORMAT!r})")
    return attrs, n


def merge_shards(paths: list[str | os.PathLike], out: str | os.PathLike | None = None) -> dict:
    """Join shard outputs of one candidate file into one /score in row order (checked to tile the file)."""
    t0 = time.perf_counter()
    if not paths:
        raise DmrxError("--merge needs the shard outputs to join")
    shards = []
    for p in paths:
        attrs, n = read_scores_attrs(Path(p))
        if n != attrs["row_stop"] - attrs["row_start"]:
            raise DmrxError(f"{p}: dataset /score has {n} rows, its row range {attrs['row_start']}:"
                            f"{attrs['row_stop']} needs {attrs['row_stop'] - attrs['row_start']}")
        shards.append((Path(p), attrs, n))
    ref = shards[0][1]
    for p, a, _ in shards[1:]:
        for key in ("input", "input_rows", "input_bytes", "input_mtime_ns", "model_hash", "backend", "precision",
                    "shard_count"):
            if a.get(key) != ref.get(key):
                raise DmrxError(f"{p}: {key} {a.get(key)!r} differs from {shards[0][0]}'s {ref.get(key)!r}; "
                                "shards to merge must come from one input, model, backend and precision")
    count = int(ref["shard_count"])
    seen = sorted(int(a["shard_index"]) for _, a, _ in shards)
    if seen != list(range(count)):
        dup = sorted({i for i in seen if seen.count(i) > 1})
        lost = sorted(set(range(count)) - set(seen))
        what = f"shard(s) {dup} given twice" if dup else f"shard(s) {lost} of {count} missing"
        raise DmrxError(f"--merge: {what}")
    shards.sort(key=lambda s: s[1]["row_start"])
    pos = 0
    for p, a, _ in shards:
        if a["row_start"] != pos:
            raise DmrxError(f"{p}: starts at row {a['row_start']}, expected {pos} (shards overlap or leave a gap)")
        pos = a["row_stop"]
    total = int(ref["input_rows"])
    if pos != total:
        raise DmrxError(f"--merge: shards cover rows 0:{pos} of {total}")
    if out is None:
        name = shards[0][0].name
        cut = name.find(".shard-")
        out = shards[0][0].with_name(name[:cut] + ".h5" if cut >= 0 else "merged." + name)
    out = Path(out)
    if any(out.resolve() == p.resolve() for p, _, _ in shards):
        raise DmrxError(f"{out}: the merged output would overwrite a shard; choose another --out")
    block = 1 << 20
    with atomic_file(out) as tmp:
        with h5py.File(tmp, "w") as h5:
            ds = h5.create_dataset("score", shape=(total,), dtype="<f4")
            for p, a, n in shards:
                with h5py.File(p, "r") as src:
                    for s in range(0, n, block):
                        ds[a["row_start"] + s:a["row_start"] + min(s + block, n)] = src["score"][s:s + block]
            attrs = dict(ref)
            attrs.update(row_start=0, row_stop=total, shard_index=0, shard_count=1, merged_from=len(shards))
            for k, v in attrs.items():
                h5.attrs[k] = v
    return {"output": str(out), "rows": total, "shards": len(shards), "backend": ref["backend"],
            "precision": ref["precision"], "model_hash": ref["model_hash"], "wall_s": time.perf_counter() - t0}


def flops_per_candidate(model) -> dict:
    """Multiply-adds x2 per candidate, counted from the model's shapes (embedding lookups not counted).

    full: the whole model for one aligned row (user side + candidate side), as naive per-row scoring does.
    grouped: the candidate side only, as user-grouped scoring runs it (the profile block of the first MLP
    layer moved to once per user run, so it is not counted); user_side: once per distinct history.
    """
    cfg, spec = model.cfg, model.spec
    T, H = cfg.max_len, cfg.attn_hidden
    d_e = model.d_e
    tables = model.tables
    d_t = sum(tables[model.table_of[f"target/{f}"]].embedding_dim for f in spec.target)
    d_p = sum(tables[model.table_of[k]].embedding_dim for k in spec.profile_keys())
    lin = [m for m in model.mlp if hasattr(m, "in_features")]
    mlp = sum(m.in_features * m.out_features for m in lin)
    h1 = lin[0].out_features
    user = 0
    cand_attn = 0
    if cfg.use_u2i:
        user += T * d_e * H + T * H + T * d_e + d_e * model.d_v  # projection, scores, weighted sum, g
        cand_attn += model.d_v  # r = u . v'
    if cfg.use_i2i:
        user += T * d_e * H  # W_e e_t
        cand_attn += d_t * H + T * H + T * H + T * d_e + T  # W_q x_t, + keys, z.tanh(.), alpha e, r_hat
    grouped = 2 * (cand_attn + mlp - d_p * h1)
    return {"full": 2 * (user + cand_attn + mlp), "grouped": grouped, "user_side": 2 * user,
            "tanh_per_candidate": T * H if cfg.use_i2i else 0}


__all__ = ["Scorer", "Work", "score_file", "merge_shards", "shard_range", "parse_shard", "default_output",
           "flops_per_candidate", "group_rows"]
