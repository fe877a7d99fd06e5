"""Scoring and retrieval on Spark: a DataFrame of candidates (or users) in, the same DataFrame with scores out.

    from dmrx.integrations import spark as dmrx_spark

    cands = spark.read.parquet("/data/candidates/")            # the layout of dmrx.data.arrow
    scored = dmrx_spark.score(cands, model="/models/runs/best", keep=["row", "user"])
    scored.write.parquet("/data/scores/")

    top = dmrx_spark.recommend(spark.createDataFrame([(123,)], "user long"), run="/models/runs/best", k=50)

Each call checks the model and the DataFrame's columns on the driver, then maps the partitions with
`mapInArrow`: Arrow record batches go to the Python workers without a pandas round trip, history lists
stay Arrow lists (turned into arrays without a Python loop per row). What travels with each task is a
small reference (path, backend, weights hash); each Python worker process loads the model once and keeps
it for every later task (Spark reuses Python workers: spark.python.worker.reuse, on by default).

A user's candidates share one history encoding when they sit next to each other in one Arrow batch: keep the
data grouped by user (a Parquet file written sorted by user is; otherwise
`repartition("user").sortWithinPartitions("user")` first). Batches hold at most
`spark.sql.execution.arrow.maxRecordsPerBatch` rows (default 10,000), cut here to `batch_size`.
"""

from __future__ import annotations

import functools

from dmrx.errors import DmrxError
from dmrx.integrations import common


def _spark():
    try:
        from pyspark.sql import types as T
        from pyspark.sql.pandas.types import to_arrow_schema
    except ImportError:
        raise DmrxError('the Spark integration needs pyspark and pandas: pip install "dmrx[spark]"') from None
    return T, to_arrow_schema


def _arrow_schema(df):
    _, to_arrow_schema = _spark()
    try:
        return to_arrow_schema(df.schema)
    except TypeError as e:  # a Spark type Arrow cannot carry
        raise DmrxError(f"Spark DataFrame: {e}") from None


def _out_schema(df, keep: list[str] | None, extra: list):
    T, _ = _spark()
    fields = df.schema.fields if keep is None else [df.schema[k] for k in keep]
    return T.StructType(list(fields) + extra)


def _slices(batches, batch_size: int):
    for b in batches:
        for s in range(0, max(b.num_rows, 1), batch_size):
            yield b.slice(s, batch_size)


def score_batches(batches, ref: common.ModelRef, columns: dict[str, str], keep, batch_size: int):
    """mapInArrow's function: a partition's record batches -> the same rows with a score column. The
    Scorer comes from the worker process's cache (loaded by the first task the process runs)."""
    scorer = common.scorer_for(ref)
    for b in _slices(batches, batch_size):
        yield common.score_arrow(scorer, b, columns, keep, "Spark partition batch")


def recommend_batches(batches, ref: common.IndexRef, user: str, keep, batch_size: int):
    for b in _slices(batches, batch_size):
        yield common.recommend_arrow(ref, b, user, keep, "Spark partition batch")


def score(
    df,
    model=None,
    backend: str = "auto",
    precision: str = "fp32",
    *,
    keep: list[str] | None = None,
    batch_size: int = 4096,
    threads: int | None = 1,
    device: str | None = None,
):
    """The DataFrame `df` of candidates with a float `score` column (CTR) added, lazily.

    model: a run or export directory (None: the most recent run), at the same path on every executor.
    backend, precision: as for `dmrx score`; `auto` is resolved once, on the driver. keep: the input
    columns to carry into the output (None: all). threads: CPU threads per Python worker (one task per
    core is Spark's default, hence 1).
    """
    T, _ = _spark()
    ref, scorer = common.load_on_driver(model, backend, precision, threads, device)
    columns = common.check_candidates(_arrow_schema(df), scorer.spec, "Spark DataFrame", keep)
    fn = functools.partial(score_batches, ref=ref, columns=columns, keep=keep, batch_size=batch_size)
    return df.mapInArrow(fn, _out_schema(df, keep, [T.StructField(common.SCORE, T.FloatType())]))


def recommend(
    df,
    run=None,
    k: int = 50,
    method: str = "exact",
    exclude_seen: bool = False,
    *,
    user: str = "user",
    keep: list[str] | None = None,
    ef_search: int | None = None,
    batch_size: int = 4096,
):
    """The DataFrame `df` of users with their top k items by u . v' from the run's index: `items`
    (array<bigint>, best first) and `scores` (array<float>). method: exact | int8 | hnsw (faiss; the
    index must be built with --ann hnsw). Users the index does not hold get empty arrays."""
    T, _ = _spark()
    ref, _ = common.index_on_driver(run, k, method, exclude_seen, ef_search)
    common.check_users(_arrow_schema(df), user, "Spark DataFrame", keep)
    fn = functools.partial(recommend_batches, ref=ref, user=user, keep=keep, batch_size=batch_size)
    extra = [
        T.StructField(common.ITEMS, T.ArrayType(T.LongType())),
        T.StructField(common.SCORES, T.ArrayType(T.FloatType())),
    ]
    return df.mapInArrow(fn, _out_schema(df, keep, extra))
