"""What the Ray and Spark integrations share: checks on the driver, one model per worker process, and the
Arrow-batch functions the workers run.

A job carries small picklable references (`ModelRef`, `IndexRef`: a path, the backend, the weights hash the
driver loaded), never the model: every worker process loads the files itself, once (`scorer_for`,
`index_for` are per-process caches keyed by the reference), and checks it sees the driver's weights.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmrx.data.arrow import check_schema, pyarrow_modules, to_columns
from dmrx.errors import DmrxError
from dmrx.scoring.scorer import Scorer

SCORE = "score"
ITEMS, SCORES = "items", "scores"


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to load the driver's model: an absolute path, the backend `auto` resolved to on
    the driver, and the weights hash it must find there."""

    path: str
    backend: str
    precision: str
    threads: int | None
    device: str | None
    weights_hash: str


def load_on_driver(model, backend: str, precision: str, threads: int | None, device: str | None):
    """(ModelRef, Scorer): the model loaded once on the driver, which checks the path, backend and precision
    before any job starts."""
    from dmrx.models.bundle import Bundle, resolve_run

    scorer = Scorer(model, backend, precision, device, threads)
    path = model.path if isinstance(model, Bundle) else resolve_run(model)
    ref = ModelRef(
        path=str(Path(path).resolve()),
        backend=scorer.describe()["backend"],
        precision=precision,
        threads=threads,
        device=device,
        weights_hash=scorer.model_hash,
    )
    return ref, scorer


def _on_worker(path: str, e: DmrxError) -> DmrxError:
    return DmrxError(f"on worker {socket.gethostname()}: {e} (every worker must see {path})")


@functools.lru_cache(maxsize=4)
def scorer_for(ref: ModelRef) -> Scorer:
    """The worker process's Scorer for ref, loaded on first use and kept (a Spark Python worker serves many
    tasks; a Ray actor calls this once)."""
    try:
        scorer = Scorer(ref.path, ref.backend, ref.precision, ref.device, ref.threads)
    except DmrxError as e:
        raise _on_worker(ref.path, e) from None
    if scorer.model_hash != ref.weights_hash:
        raise DmrxError(
            f"on worker {socket.gethostname()}: {ref.path} holds weights {scorer.model_hash[:12]}, the driver "
            f"loaded {ref.weights_hash[:12]}; give every worker the same model files"
        )
    return scorer


def _with_columns(batch, keep: list[str] | None, extra: dict):
    """batch (a RecordBatch or a Table) reduced to `keep` (None: every column) with `extra` columns appended."""
    pa, _, _ = pyarrow_modules()
    names = list(batch.schema.names) if keep is None else list(keep)
    arrays = [batch.column(n) for n in names] + list(extra.values())
    names += list(extra)
    if isinstance(batch, pa.Table):
        return pa.Table.from_arrays(arrays, names=names)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def check_keep(keep: list[str] | None, names: list[str], where: str, added: list[str]) -> list[str] | None:
    if keep is None:
        clash = [a for a in added if a in names]
    else:
        missing = [k for k in keep if k not in names]
        if missing:
            raise DmrxError(f"{where}: keep names column(s) {', '.join(missing)}, which it lacks")
        clash = [a for a in added if a in keep]
    if clash:
        raise DmrxError(f"{where}: already has a column {clash[0]}; drop it or leave it out of keep")
    return None if keep is None else list(keep)


def check_candidates(schema, spec, where: str, keep: list[str] | None) -> dict[str, str]:
    """The batch key -> column mapping the workers use, checked on the driver (see dmrx.data.arrow)."""
    columns = check_schema(schema, spec, where)
    check_keep(keep, list(schema.names), where, [SCORE])
    return columns


def score_arrow(scorer: Scorer, batch, columns: dict[str, str], keep: list[str] | None, where: str):
    """One Arrow batch of candidates -> the same rows (the `keep` columns) with a float32 `score` column."""
    pa, _, _ = pyarrow_modules()
    scores = []
    if batch.num_rows:
        cols = to_columns(batch, columns, scorer.max_len, where)
        try:
            scores = scorer.score_batch(cols)
        except DmrxError as e:  # Scorer names the column and the row within the batch
            raise DmrxError(f"{where}: {e}") from None
    return _with_columns(batch, keep, {SCORE: pa.array(np.asarray(scores, np.float32), pa.float32())})


# ---- retrieval ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexRef:
    """A run's index as a worker finds it, and the search every worker runs."""

    run: str
    weights_hash: str
    k: int
    method: str
    exclude_seen: bool
    ef_search: int | None


def index_on_driver(run, k: int, method: str, exclude_seen: bool, ef_search: int | None):
    """(IndexRef, Index): the run's index loaded and verified on the driver, k and the search method checked
    (an HNSW search needs an index built with --ann hnsw)."""
    from dmrx.models.bundle import resolve_run
    from dmrx.retrieval.index import load_index

    run_dir = Path(resolve_run(run)).resolve()
    index = load_index(run_dir)
    k = index.check_k(k)
    index.searcher(method, ef_search)
    return IndexRef(str(run_dir), index.manifest["weights_hash"], k, method, bool(exclude_seen), ef_search), index


@functools.lru_cache(maxsize=2)
def index_for(run: str, weights_hash: str):
    """The worker process's copy of the run's index, loaded (and its files' hashes checked) on first use."""
    from dmrx.retrieval.index import load_index

    try:
        index = load_index(Path(run))
    except DmrxError as e:
        raise _on_worker(run, e) from None
    if index.manifest["weights_hash"] != weights_hash:
        raise DmrxError(
            f"on worker {socket.gethostname()}: the index of {run} was built for other weights than the "
            "driver's; give every worker the same run"
        )
    return index


def check_users(schema, user: str, where: str, keep: list[str] | None) -> None:
    pa, _, _ = pyarrow_modules()
    if user not in schema.names:
        raise DmrxError(f"{where}: lacks the user column {user!r} (columns: {', '.join(schema.names) or 'none'})")
    t = schema.field(user).type
    if not pa.types.is_integer(t):
        raise DmrxError(f"{where}: column {user} has type {t}; it must hold integer user ids")
    check_keep(keep, list(schema.names), where, [ITEMS, SCORES])


def recommend_arrow(ref: IndexRef, batch, user: str, keep: list[str] | None, where: str):
    """One Arrow batch of users -> the same rows with `items` (list<int64>, best first) and `scores`
    (list<float32>, u . v'). A user the index does not hold gets empty lists; so does the tail of a list
    that has fewer than k items left after excluding seen ones."""
    pa, _, _ = pyarrow_modules()
    index = index_for(ref.run, ref.weights_hash)
    col = batch.column(user)
    if col.null_count:
        raise DmrxError(f"{where}: column {user} row {int(np.argmax(np.asarray(col.is_null())))}: null")
    users = np.asarray(col).astype(np.int64, copy=False)
    rows = index.user_rows(users)
    known = rows >= 0
    items = np.full((len(users), ref.k), -1, np.int64)
    scores = np.full((len(users), ref.k), -np.inf, np.float32)
    if known.any():
        exclude = index.seen(rows[known]) if ref.exclude_seen else None
        items[known], scores[known] = index.search(
            index.user_vectors[rows[known]], ref.k, ref.method, exclude, ref.ef_search
        )
    real = items >= 0  # padding (-1) only ever trails a row's real items
    offsets = pa.array(np.concatenate([[0], np.cumsum(real.sum(axis=1))]).astype(np.int32))
    return _with_columns(
        batch,
        keep,
        {
            ITEMS: pa.ListArray.from_arrays(offsets, pa.array(items[real])),
            SCORES: pa.ListArray.from_arrays(offsets, pa.array(scores[real], pa.float32())),
        },
    )
