"""Scoring and retrieval on Ray Data: a Dataset of candidates (or users) in, the same Dataset with scores out.

    import ray
    from dmrx.integrations import ray as dmrx_ray

    ds = ray.data.read_parquet("/data/candidates/")          # the layout of dmrx.data.arrow
    scored = dmrx_ray.score(ds, model="/models/runs/best", backend="onnxruntime", keep=["row", "user"])
    scored.write_parquet("/data/scores/")

    top = dmrx_ray.recommend(ray.data.from_items([{"user": 123}]), run="/models/runs/best", k=50)

Each call checks the model and the Dataset's columns on the driver, then adds a `map_batches` stage run by
a pool of actors (`concurrency` of them, `num_cpus` each; default: autoscaling from 1 to one per CPU of
the cluster), each of
which loads the model once in its constructor and scores Arrow batches of `batch_size` rows. Ray Data does
not keep row order across blocks by default: keep an id column (`keep`) to join the scores back.
"""

from __future__ import annotations

from dmrx.errors import DmrxError
from dmrx.integrations import common


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise DmrxError('the Ray integration needs Ray Data: pip install "dmrx[ray]"') from None
    return ray


def _schema(ds, where: str):
    """The Dataset's schema as a pyarrow Schema (the types Ray reports for each column)."""
    import pyarrow as pa

    s = ds.schema()
    if s is None:
        raise DmrxError(f"{where}: the Dataset has no schema (is it empty?)")
    fields = []
    for name, t in zip(s.names, s.types, strict=True):
        fields.append(pa.field(name, t if isinstance(t, pa.DataType) else pa.null()))
    return pa.schema(fields)


def _concurrency(concurrency, num_cpus: float) -> int | tuple[int, int]:
    """The actor pool: as given, else autoscaling from one actor up to one per `num_cpus` of the cluster.
    A fixed pool that takes every CPU leaves none to the read tasks that feed it, and the job stalls."""
    if concurrency is not None:
        return concurrency
    ray = _ray()
    if not ray.is_initialized():
        ray.init()
    cpus = ray.cluster_resources().get("CPU", 1)
    return (1, max(1, int(cpus // max(num_cpus, 1e-9))))


class ScoreActor:
    """A Ray Data map_batches callable: one Scorer per actor, loaded in the constructor."""

    def __init__(self, ref: common.ModelRef, columns: dict[str, str], keep: list[str] | None):
        self.scorer = common.scorer_for(ref)
        self.columns, self.keep = columns, keep

    def __call__(self, table):  # batch_format="pyarrow": a pyarrow.Table
        return common.score_arrow(self.scorer, table, self.columns, self.keep, "Ray Data batch")


class RecommendActor:
    """A Ray Data map_batches callable: the run's index loaded once per actor."""

    def __init__(self, ref: common.IndexRef, user: str, keep: list[str] | None):
        common.index_for(ref.run, ref.weights_hash)
        self.ref, self.user, self.keep = ref, user, keep

    def __call__(self, table):
        return common.recommend_arrow(self.ref, table, self.user, self.keep, "Ray Data batch")


def score(
    ds,
    model=None,
    backend: str = "auto",
    precision: str = "fp32",
    *,
    keep: list[str] | None = None,
    batch_size: int = 4096,
    concurrency: int | tuple[int, int] | None = None,
    num_cpus: float = 1,
    threads: int | None = 1,
    device: str | None = None,
):
    """The Dataset `ds` of candidates with a float32 `score` column (CTR) added, lazily (a Ray Dataset).

    model: a run or export directory (None: the most recent run), at the same path on every node.
    backend, precision: as for `dmrx score`; `auto` is resolved once, on the driver. keep: the input
    columns to carry into the output (None: all). threads: CPU threads per actor (match num_cpus).
    """
    _ray()
    ref, scorer = common.load_on_driver(model, backend, precision, threads, device)
    columns = common.check_candidates(_schema(ds, "Ray Dataset"), scorer.spec, "Ray Dataset", keep)
    return ds.map_batches(
        ScoreActor,
        fn_constructor_kwargs={"ref": ref, "columns": columns, "keep": keep},
        batch_format="pyarrow",
        batch_size=batch_size,
        concurrency=_concurrency(concurrency, num_cpus),
        num_cpus=num_cpus,
    )


def recommend(
    ds,
    run=None,
    k: int = 50,
    method: str = "exact",
    exclude_seen: bool = False,
    *,
    user: str = "user",
    keep: list[str] | None = None,
    ef_search: int | None = None,
    batch_size: int = 4096,
    concurrency: int | tuple[int, int] | None = None,
    num_cpus: float = 1,
):
    """The Dataset `ds` of users with their top k items by u . v' from the run's index: `items`
    (list<int64>, best first) and `scores` (list<float32>). method: exact | int8 | hnsw (faiss; the
    index must be built with --ann hnsw). Users the index does not hold get empty lists."""
    _ray()
    ref, _ = common.index_on_driver(run, k, method, exclude_seen, ef_search)
    common.check_users(_schema(ds, "Ray Dataset"), user, "Ray Dataset", keep)
    return ds.map_batches(
        RecommendActor,
        fn_constructor_kwargs={"ref": ref, "user": user, "keep": keep},
        batch_format="pyarrow",
        batch_size=batch_size,
        concurrency=_concurrency(concurrency, num_cpus),
        num_cpus=num_cpus,
    )
