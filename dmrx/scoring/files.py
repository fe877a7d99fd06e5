"""Scoring whole candidate files (`dmrx score`): streamed in chunks, committed as it goes, resumable.

A background thread reads and encodes the next batches while the current ones are scored; /score is written
in row order to a temporary file and renamed when complete. Progress is committed after every chunk, so an
interrupted run continues with `resume=True` and ends with the same bytes in /score as an uninterrupted one.

Commit protocol (crash-safe at any instant, constant memory): beside the output, `.OUT.partial/` holds
`scores.f32` (raw little-endian float32, appended chunk by chunk, fsynced) and `state.json` (replaced
atomically after the scores it counts are on disk: committed rows, the model hash, backend, precision,
batch and chunk sizes, threads, the input's identity, running statistics). Scores past the committed count
are discarded on resume. The final HDF5 is built from scores.f32 in blocks, then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from dmrx import __version__
from dmrx.artifacts.atomic import atomic_file, check_destination, write_json, writing
from dmrx.artifacts.hdf5 import h5_writer
from dmrx.errors import DmrxError, OutputError
from dmrx.scoring.scorer import Scorer, Work, _count_unknown_hist
from dmrx.scoring.shards import shard_range

SCORES_FORMAT, SCORES_VERSION = "dmrx-scores", 1
STATE_VERSION = 1
DEFAULT_BATCH = 4096
DEFAULT_CHUNK = 1 << 16  # rows per committed chunk (rounded to a multiple of the batch size)
READ_BATCHES = 4  # batches read from the file at a time


def default_output(candidates: Path, shard: tuple[int, int] | None = None) -> Path:
    stem = candidates.name[:-3] if candidates.name.endswith(".h5") else candidates.name
    tag = f".shard-{shard[0]}-of-{shard[1]}" if shard and shard[1] > 1 else ""
    return candidates.with_name(f"{stem}.scores{tag}.h5")


def _fingerprint(path: Path, n_rows: int) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "rows": n_rows}


def _partial_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def _write_state(pdir: Path, state: dict) -> None:
    write_json(pdir / "state.json", state, durable=True)


def _read_state(pdir: Path) -> dict | None:
    try:
        state = json.loads((pdir / "state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return state if state.get("version") == STATE_VERSION else None


@dataclass
class _Part:
    """One batch, read and encoded, and what score_file commits with it."""

    work: Work
    users: np.ndarray  # the raw user column (for counting user runs)
    unknown: dict[str, int]
    commit: int | None  # the row its commit chunk ends at, on the chunk's last batch


def _parts(data, scorer: Scorer, lo: int, hi: int, batch_size: int, chunk_rows: int) -> Iterator[_Part]:
    """Read, validate and encode rows [lo, hi) batch by batch (this runs in the prefetch thread). The file is
    read READ_BATCHES batches at a time, so scoring starts once the first of them are read."""
    spec, enc = scorer.spec, scorer.encoder
    keys = sorted(set(spec.batch_keys()) | {"user"})
    for c0 in range(lo, hi, chunk_rows):
        c1 = min(c0 + chunk_rows, hi)
        row = 0
        for batch in data.batches(
            batch_size,
            scorer.max_len,
            row_range=(c0, c1),
            chunk_rows=READ_BATCHES * batch_size,
            encoder=enc,
            keys=keys,
            behavior_fields=list(spec.behaviors),
            distinct_histories=True,
        ):
            row += len(batch["user"])
            hist = {k: batch[k] for k in scorer.hist_keys}
            hist_len = np.asarray(batch["hist_len"], np.int64)
            cand = enc.finish({k: batch[k] for k in keys})
            unknown = enc.unknown_counts(cand)
            for k, v in _count_unknown_hist(hist, hist_len).items():
                unknown[k] = unknown.get(k, 0) + v
            cand = {k: np.ascontiguousarray(cand[k]) for k in scorer.cand_keys + ["user_index"] * spec.use_user_id}
            work = Work(hist, hist_len, batch["user_row"], cand)
            yield _Part(work, batch["user"], unknown, c1 if row == c1 - c0 else None)
        if row != c1 - c0:
            raise DmrxError(f"{data.path}: read {row} rows of chunk {c0}:{c1}")  # a reader bug, not user input


def _field_name(key: str) -> str:
    return {"user_index": "user"}.get(key, key)


def score_file(
    candidates: str | os.PathLike,
    model=None,
    out: str | os.PathLike | None = None,
    backend: str = "auto",
    precision: str = "fp32",
    batch_size: int = DEFAULT_BATCH,
    threads: int | None = None,
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    chunk_rows: int = DEFAULT_CHUNK,
    device: str | None = None,
    prefetch_depth: int = 2,
    progress: Callable[[int, int], None] | None = None,
    on_commit: Callable[[int], None] | None = None,
    scorer: Scorer | None = None,
) -> dict:
    """Score a candidate file into OUT (default CANDIDATES.scores.h5); return the summary.

    progress(rows_done, rows_total) is called after every batch. on_commit(committed_rows) is called after
    every committed chunk: an exception raised there interrupts the run exactly as a crash after that
    commit would (the documented hook the resume tests use).
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
    check_destination(out, "file")
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
        ident = {
            "model_hash": scorer.model_hash,
            "backend": desc["backend"],
            "precision": desc["precision"],
            "input": _fingerprint(candidates, n_total),
            "row_range": [lo, hi],
            "shard": list(shard) if shard else None,
            "max_len": scorer.max_len,
        }
        if state is not None:
            for key, what in (
                ("model_hash", "model"),
                ("backend", "backend"),
                ("precision", "precision"),
                ("input", "input file"),
                ("row_range", "row range (shard)"),
                ("max_len", "history length"),
            ):
                if state.get(key) != ident[key]:
                    raise DmrxError(
                        f"--resume: {pdir} was scored with another {what} ({state.get(key)!r}, "
                        f"now {ident[key]!r}); rerun without --resume to start over"
                    )
        elif resume and out.exists():
            done = _complete_matches(out, ident)
            if done is not None:
                return {**done, "wall_s": time.perf_counter() - t0, "note": "already complete, nothing to resume"}

        fresh = state is None
        if fresh:
            state = {
                "version": STATE_VERSION,
                **ident,
                "batch_size": batch_size,
                "chunk_rows": chunk_rows,
                "threads": desc.get("threads"),
                "committed_rows": 0,
                "unknown": {},
                "user_runs": 0,
                "last_user": None,
                "histories": 0,
            }
        t_ready = time.perf_counter()
        committed = int(state["committed_rows"])
        resumed_from = lo + committed if committed else None
        start = lo + committed
        rows_done = committed
        try:
            if fresh:
                shutil.rmtree(pdir, ignore_errors=True)
                with writing(out):
                    pdir.mkdir(parents=True)
                    (pdir / "scores.f32").touch()
                _write_state(pdir, state)
            with writing(out), open(pdir / "scores.f32", "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                if size < committed * 4:
                    raise DmrxError(
                        f"--resume: {pdir}/scores.f32 holds fewer scores than state.json commits; "
                        "rerun without --resume to start over"
                    )
                f.truncate(committed * 4)
                f.seek(committed * 4)
                if progress is not None:
                    progress(rows_done, hi - lo)
                with prefetch(
                    _parts(data, scorer, start, hi, batch_size, chunk_rows),
                    depth=prefetch_depth,
                    name="dmrx-score-read",
                ) as parts:
                    scores: list[np.ndarray] = []
                    for part, res in scorer.score_stream((p.work, p) for p in parts):
                        n = part.work.n_candidates
                        scores.append(res)
                        state["histories"] += part.work.n_users
                        if n:
                            users, last = part.users, state["last_user"]
                            state["user_runs"] += int((users[1:] != users[:-1]).sum()) + int(
                                last is None or users[0] != last
                            )
                            state["last_user"] = int(users[-1])
                        for k, v in part.unknown.items():
                            state["unknown"][k] = state["unknown"].get(k, 0) + v
                        rows_done += n
                        if progress is not None:
                            progress(rows_done, hi - lo)
                        if part.commit is None:
                            continue
                        f.write(np.concatenate(scores).astype("<f4", copy=False).tobytes())
                        f.flush()
                        os.fsync(f.fileno())
                        scores = []
                        state["committed_rows"] = part.commit - lo
                        _write_state(pdir, state)
                        if on_commit is not None:
                            on_commit(state["committed_rows"])
            if state["committed_rows"] != hi - lo:
                raise DmrxError(f"{candidates}: scored {state['committed_rows']} of {hi - lo} rows")
            attrs = output_attrs(scorer, desc, candidates, ident["input"], (lo, hi), shard, batch_size)
            _finish(out, pdir / "scores.f32", hi - lo, attrs)
        except OutputError as e:
            if not state["committed_rows"]:
                shutil.rmtree(pdir, ignore_errors=True)
                raise
            # the scores committed so far are sound: keep them for --resume
            raise OutputError(
                f"{e}; {state['committed_rows']:,} scored rows are kept in {pdir}: rerun with --resume once "
                "the output can be written"
            ) from None
        except DmrxError:
            shutil.rmtree(pdir, ignore_errors=True)  # bad input: nothing worth resuming, nothing left behind
            raise
    shutil.rmtree(pdir, ignore_errors=True)
    t_end = time.perf_counter()
    scored = hi - lo - committed
    return {
        "input": str(candidates),
        "output": str(out),
        "rows": hi - lo,
        "rows_scored_now": scored,
        "resumed_from_row": resumed_from,
        "users": state["user_runs"],
        "user_encodings": state["histories"],
        "unknown_ids": {_field_name(k): v for k, v in sorted(state["unknown"].items())},
        **{k: v for k, v in desc.items()},
        "batch_size": batch_size,
        "chunk_rows": chunk_rows,
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "row_range": [lo, hi],
        "model": str(scorer.bundle.path),
        "model_hash": scorer.model_hash,
        "wall_s": t_end - t0,
        "load_s": t_ready - t0,
        "score_s": t_end - t_ready,
        "rows_per_s": scored / (t_end - t_ready) if t_end > t_ready else 0.0,
    }


def output_attrs(
    scorer,
    desc: dict,
    candidates: Path,
    source: dict,
    rows: tuple[int, int],
    shard: tuple[int, int] | None,
    batch_size: int,
) -> dict:
    """The root attributes of a scores file: what made it and from which input (`merge_shards` and resume
    read them back). source: the input's identity (_fingerprint)."""
    return {
        "dmrx_format": SCORES_FORMAT,
        "version": SCORES_VERSION,
        "model_hash": scorer.model_hash,
        "model": str(scorer.bundle.path),
        "backend": desc["backend"],
        "precision": desc["precision"],
        "device": str(desc.get("device", desc.get("providers", ""))),
        "input": str(candidates.resolve()),
        "input_rows": source["rows"],
        "input_bytes": source["bytes"],
        "input_mtime_ns": source["mtime_ns"],
        "row_start": rows[0],
        "row_stop": rows[1],
        "shard_index": shard[0] if shard else 0,
        "shard_count": shard[1] if shard else 1,
        "batch_size": batch_size,
        "dmrx_version": __version__,
    }


def _complete_matches(out: Path, ident: dict) -> dict | None:
    """The summary of an existing complete output made by the same model/backend/precision/input, or None."""
    try:
        with h5py.File(out, "r") as h5:
            a = dict(h5.attrs)
            n = h5["score"].shape[0]
    except (OSError, KeyError):
        return None
    same = (
        a.get("model_hash") == ident["model_hash"]
        and a.get("backend") == ident["backend"]
        and a.get("precision") == ident["precision"]
        and a.get("input_bytes") == ident["input"]["bytes"]
        and a.get("input_mtime_ns") == ident["input"]["mtime_ns"]
        and [a.get("row_start"), a.get("row_stop")] == ident["row_range"]
        and n == ident["row_range"][1] - ident["row_range"][0]
    )
    if not same:
        return None
    return {
        "input": ident["input"]["path"],
        "output": str(out),
        "rows": n,
        "rows_scored_now": 0,
        "backend": ident["backend"],
        "precision": ident["precision"],
        "model_hash": ident["model_hash"],
        "rows_per_s": 0.0,
    }


def _finish(out: Path, raw: Path, n: int, attrs: dict, block: int = 1 << 20) -> None:
    """OUT with /score from the raw float32 file, written to a temporary file and renamed."""
    with atomic_file(out) as tmp:
        with h5_writer(tmp) as h5, open(raw, "rb") as f:
            ds = h5.create_dataset("score", shape=(n,), dtype="<f4")
            for s in range(0, n, block):
                m = min(block, n - s)
                ds[s : s + m] = np.frombuffer(f.read(4 * m), dtype="<f4")
            for k, v in attrs.items():
                h5.attrs[k] = v
