"""Scoring a Parquet candidate file (`dmrx score CANDIDATES.parquet`): the layout Ray and Spark read too.

The file is streamed in record batches (pyarrow's ParquetFile.iter_batches): a background thread reads a
few batches ahead and turns each into a `Work` (dmrx.data.arrow.to_columns, then Scorer.prepare: rows with
identical histories in a batch share one user encoding), the scorer's workers score them, and /score is
written in row order into an HDF5 file under a temporary name, renamed when complete: the same output as
for an .h5 input. A Parquet run is not resumable and has no shards (split the data into several files, or
run it on an engine: dmrx.integrations).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

from dmrx.artifacts.atomic import atomic_file
from dmrx.data.arrow import check_schema, pyarrow_modules, to_columns
from dmrx.errors import DmrxError
from dmrx.scoring.files import DEFAULT_BATCH, _field_name, _fingerprint, output_attrs
from dmrx.scoring.scorer import Scorer, Work


def default_output(candidates: Path) -> Path:
    """CANDIDATES.scores.h5 beside the input (its Parquet suffix dropped)."""
    return candidates.with_name(f"{candidates.stem}.scores.h5")


def _open(path: Path):
    _, _, pq = pyarrow_modules()
    if not path.exists():
        raise DmrxError(f"{path}: no such file")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged or foreign file
        raise DmrxError(f"{path}: not a readable Parquet file ({e.__class__.__name__}: {str(e)[:200]})") from None


def score_parquet(
    candidates: str | os.PathLike,
    model=None,
    out: str | os.PathLike | None = None,
    backend: str = "auto",
    precision: str = "fp32",
    batch_size: int = DEFAULT_BATCH,
    threads: int | None = None,
    device: str | None = None,
    prefetch_depth: int = 4,
    progress: Callable[[int, int], None] | None = None,
    scorer: Scorer | None = None,
) -> dict:
    """Score a Parquet candidate file into OUT (default CANDIDATES.scores.h5); return the summary, as
    `dmrx.scoring.score_file` does for an .h5 file."""
    from dmrx.data.prefetch import prefetch

    t0 = time.perf_counter()
    candidates = Path(candidates)
    if batch_size < 1:
        raise DmrxError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out) if out is not None else default_output(candidates)
    if out.resolve() == candidates.resolve():
        raise DmrxError(f"{out}: the output would overwrite the input; choose another --out")
    pf = _open(candidates)
    n = pf.metadata.num_rows
    if scorer is None:
        scorer = Scorer(model, backend, precision, device, threads)
    columns = check_schema(pf.schema_arrow, scorer.spec, str(candidates)) if n else {}
    desc = scorer.describe()
    source = _fingerprint(candidates, n)  # before reading: the input the scores belong to
    t_ready = time.perf_counter()

    def works() -> Iterator[tuple[Work, tuple]]:
        """Prepared batches, with their unknown-id counts and user column (in the prefetch thread)."""
        start = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=sorted(set(columns.values()))):
            where = f"{candidates} rows {start}:{start + batch.num_rows}"
            try:
                work, unknown = scorer.prepare(to_columns(batch, columns, scorer.max_len, where))
            except DmrxError as e:  # Scorer names the column and the row within the batch
                msg = str(e)
                raise DmrxError(msg if msg.startswith(str(candidates)) else f"{where}: {msg}") from None
            yield work, (work, unknown, np.asarray(batch.column(columns["user"])))
            start += batch.num_rows

    unknown_total: dict[str, int] = {}
    user_runs, encodings, done, last = 0, 0, 0, None
    with atomic_file(out) as tmp:
        with h5py.File(tmp, "w") as h5:
            ds = h5.create_dataset("score", shape=(n,), dtype="<f4")
            if progress is not None:
                progress(0, n)
            if n:
                with prefetch(works(), depth=prefetch_depth, name="dmrx-score-parquet") as prepared:
                    for (work, unknown, users), scores in scorer.score_stream(prepared):
                        m = work.n_candidates
                        ds[done : done + m] = scores
                        done += m
                        encodings += work.n_users
                        for k, v in unknown.items():
                            unknown_total[k] = unknown_total.get(k, 0) + v
                        if m:
                            user_runs += int((users[1:] != users[:-1]).sum()) + int(last is None or users[0] != last)
                            last = int(users[-1])
                        if progress is not None:
                            progress(done, n)
            if done != n:
                raise DmrxError(f"{candidates}: read {done} of the {n} rows its metadata declares")
            attrs = output_attrs(scorer, desc, candidates, source, (0, n), None, batch_size)
            for k, v in attrs.items():
                h5.attrs[k] = v
    t_end = time.perf_counter()
    return {
        "input": str(candidates),
        "output": str(out),
        "rows": n,
        "rows_scored_now": n,
        "resumed_from_row": None,
        "users": user_runs,
        "user_encodings": encodings,
        "unknown_ids": {_field_name(k): v for k, v in sorted(unknown_total.items())},
        **desc,
        "batch_size": batch_size,
        "shard": None,
        "row_range": [0, n],
        "model": str(scorer.bundle.path),
        "model_hash": scorer.model_hash,
        "wall_s": t_end - t0,
        "load_s": t_ready - t0,
        "score_s": t_end - t_ready,
        "rows_per_s": n / (t_end - t_ready) if t_end > t_ready else 0.0,
    }
