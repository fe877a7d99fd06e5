"""dmrx.integrations on a real local Ray cluster and a real local Spark session: scores equal `dmrx score`
on the same rows (torch fp32 <= 1e-6, onnxruntime fp32 <= 1e-5), top k equals `dmrx retrieve --all`, and
bad input is a DmrxError on the driver before anything fans out.

Skipped unless the `ray` / `spark` extras are installed (.ci/run installs them). About a minute together on
two cores, most of it starting Ray, Spark and their Python workers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import h5py
import numpy as np
import pytest

from dmrx.errors import DmrxError

pytestmark = pytest.mark.engines
pytest.importorskip("pyarrow")

TORCH_TOL, ORT_TOL = 1e-6, 1e-5


def invoke(*args):
    from typer.testing import CliRunner

    from dmrx.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


# ---- what the engines are compared with: the CLI on the same files ------------------------------------
@pytest.fixture(scope="module")
def work(tiny_data, tiny_run, tmp_path_factory):
    """A copy of the tiny run with an HNSW index, its export on its own, the training file (2,496 rows) as
    Parquet, and the CLI's scores and top k for them."""
    from dmrx.export.pipeline import ExportOptions, export_run

    root = tmp_path_factory.mktemp("engines")
    run = root / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("index", "export"))
    export = root / "export"
    export_run(run, ExportOptions(out=export, gate=False))
    cands = root / "cands.parquet"
    assert invoke("data", "parquet", tiny_data / "train.h5", cands).exit_code == 0
    ref = {}
    for name, model, backend in (("torch", run, "torch"), ("onnxruntime", export, "onnxruntime")):
        out = root / f"{name}.scores.h5"
        res = invoke("score", tiny_data / "train.h5", "--model", model, "--backend", backend, "--out", out)
        assert res.exit_code == 0, res.output
        with h5py.File(out) as f:
            ref[name] = f["score"][:]
    assert invoke("index", "build", run, "--ann", "hnsw").exit_code == 0
    top = {}
    for search, exclude in (("exact", False), ("exact", True), ("hnsw", False)):
        out = root / f"top-{search}-{exclude}.h5"
        flags = ["--exclude-seen"] if exclude else []
        res = invoke("retrieve", run, "--all", "--topk", 20, "--search", search, *flags, "--out", out)
        assert res.exit_code == 0, res.output
        with h5py.File(out) as f:
            top[search, exclude] = f["users"][:], f["items"][:], f["scores"][:]
    return {"run": run, "export": export, "cands": cands, "ref": ref, "top": top}


def check_scores(rows: np.ndarray, scores: np.ndarray, ref: np.ndarray, tol: float) -> None:
    assert len(rows) == len(ref) and np.array_equal(np.sort(rows), np.arange(len(ref)))
    assert np.abs(np.asarray(scores, np.float32) - ref[rows]).max() <= tol


def check_top(users, items, scores, expected) -> None:
    """Per user, the engine's items equal the CLI's (its -1 padding dropped) and the scores within 1e-6."""
    want_users, want_items, want_scores = expected
    got = {int(u): (np.asarray(i), np.asarray(s)) for u, i, s in zip(users, items, scores, strict=True)}
    assert sorted(got) == sorted(want_users.tolist())
    for u, wi, ws in zip(want_users.tolist(), want_items, want_scores, strict=True):
        gi, gs = got[u]
        keep = wi >= 0
        np.testing.assert_array_equal(gi, wi[keep])
        assert np.abs(gs - ws[keep]).max(initial=0) <= 1e-6


# ---- Ray ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_ray_scores_equal_dmrx_score(ray_local, work, backend):
    from dmrx.integrations import ray as dmrx_ray

    model = work["run"] if backend == "torch" else work["export"]
    ds = ray_local.data.read_parquet(str(work["cands"]))
    out = dmrx_ray.score(ds, model, backend, keep=["row", "user"], batch_size=512).to_pandas()
    assert list(out.columns) == ["row", "user", "score"]
    check_scores(out["row"].to_numpy(), out["score"].to_numpy(), work["ref"][backend], TORCH_TOL)
    check_scores(out["row"].to_numpy(), out["score"].to_numpy(), work["ref"]["torch"], ORT_TOL)


def test_ray_recommend_equals_retrieve_all(ray_local, work):
    from dmrx.integrations import ray as dmrx_ray

    users = work["top"]["exact", False][0]
    ds = ray_local.data.from_items([{"user": int(u)} for u in users] + [{"user": 10**9}])
    out = dmrx_ray.recommend(ds, work["run"], k=20).to_pandas()
    unknown = out["user"] == 10**9
    assert len(out.loc[unknown, "items"].iloc[0]) == 0  # a user the index lacks: empty lists, no failure
    out = out[~unknown]
    check_top(out["user"], out["items"], out["scores"], work["top"]["exact", False])


def test_ray_checks_on_the_driver(ray_local, work, tmp_path):
    from dmrx.integrations import ray as dmrx_ray

    ds = ray_local.data.read_parquet(str(work["cands"])).drop_columns(["hist__cate"])
    with pytest.raises(DmrxError, match=r"Ray Dataset: lacks column\(s\) hist__cate"):
        dmrx_ray.score(ds, work["run"], "torch")
    with pytest.raises(DmrxError, match=str(tmp_path / "nowhere")):
        dmrx_ray.score(ds, tmp_path / "nowhere", "torch")
    with pytest.raises(DmrxError, match=r"Ray Dataset: lacks the user column 'user' \(columns: uid\)"):
        dmrx_ray.recommend(ray_local.data.from_items([{"uid": 1}]), work["run"])


# ---- Spark -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark")
    pytest.importorskip("pandas")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Spark needs a Java runtime (17 or newer for pyspark 4)")
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers run this interpreter, with dmrx
    session = (
        SparkSession.builder.master("local[2]")
        .appName("dmrx-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_spark_scores_equal_dmrx_score(spark, work, backend):
    from dmrx.integrations import spark as dmrx_spark

    model = work["run"] if backend == "torch" else work["export"]
    df = spark.read.parquet(str(work["cands"])).repartition(2, "user")  # two Python workers, users kept whole
    out = dmrx_spark.score(df, model, backend, keep=["row"], batch_size=512).toPandas()
    check_scores(out["row"].to_numpy(), out["score"].to_numpy(), work["ref"][backend], TORCH_TOL)
    check_scores(out["row"].to_numpy(), out["score"].to_numpy(), work["ref"]["torch"], ORT_TOL)


@pytest.mark.parametrize("search, exclude", [("exact", True), ("hnsw", False)])
def test_spark_recommend_equals_retrieve_all(spark, work, search, exclude):
    from dmrx.integrations import spark as dmrx_spark

    users = work["top"][search, exclude][0]
    df = spark.createDataFrame([(int(u),) for u in users], "user long").repartition(2)
    out = dmrx_spark.recommend(df, work["run"], k=20, method=search, exclude_seen=exclude).toPandas()
    check_top(out["user"], out["items"], out["scores"], work["top"][search, exclude])


def test_spark_checks_on_the_driver(spark, work, tmp_path):
    from dmrx.integrations import spark as dmrx_spark

    df = spark.read.parquet(str(work["cands"]))
    with pytest.raises(DmrxError, match="Spark DataFrame: column hist__item has type int64"):
        dmrx_spark.score(df.withColumn("hist__item", df["user"]), work["run"], "torch")
    with pytest.raises(DmrxError, match="keep names column"):
        dmrx_spark.score(df, work["run"], "torch", keep=["row_id"])
    with pytest.raises(DmrxError, match="retrieve|index"):  # an export has no index: retrieval needs the run
        dmrx_spark.recommend(df, work["export"], k=5)
    with pytest.raises(DmrxError, match="--topk 5000 is larger"):
        dmrx_spark.recommend(df, work["run"], k=5000)


# ---- the worker side, in this process ----------------------------------------------------------------
def test_a_worker_loads_the_model_once_and_checks_it(work, tmp_path):
    """The per-process cache: many partitions, one load; a worker that sees other files says so."""
    import dataclasses

    import pyarrow.parquet as pq

    from dmrx.integrations import common
    from dmrx.integrations import spark as dmrx_spark

    ref, scorer = common.load_on_driver(work["run"], "torch", "fp32", 1, None)
    columns = common.check_candidates(pq.ParquetFile(work["cands"]).schema_arrow, scorer.spec, "t", None)
    common.scorer_for.cache_clear()
    table = pq.read_table(work["cands"])
    for task in range(3):  # three tasks of one Python worker
        batch = table.slice(task * 800, 800).combine_chunks().to_batches()[0]
        out = list(dmrx_spark.score_batches([batch], ref, columns, ["row"], batch_size=300))
        assert [b.num_rows for b in out] == [300, 300, 200]
    assert common.scorer_for.cache_info().misses == 1 and common.scorer_for.cache_info().hits == 2

    with pytest.raises(DmrxError, match=r"on worker .*nowhere: no such run"):
        common.scorer_for(dataclasses.replace(ref, path=str(tmp_path / "nowhere")))
    other = tmp_path / "other"
    shutil.copytree(work["run"], other, ignore=shutil.ignore_patterns("index"))
    with pytest.raises(DmrxError, match="the driver loaded"):
        common.scorer_for(dataclasses.replace(ref, path=str(other), weights_hash="0" * 64))
    assert json.loads((other / "manifest.json").read_text())  # untouched
