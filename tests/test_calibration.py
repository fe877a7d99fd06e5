"""calibration/: the streaming reader, the range cache (keyed on the weights' hash), and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from dmrx.artifacts import manifests
from dmrx.calibration import (
    DataFileReader,
    RangeCache,
    cache_key,
    check_calibration_file,
    precision_report,
    report_table,
)
from dmrx.errors import DmrxError
from dmrx.export import int8
from dmrx.export.graphs import export_graph
from dmrx.models import bundle
from dmrx.runtime.graphs import GraphSpec
from dmrx.runtime.ort import session


@pytest.fixture(scope="module")
def graphs(tiny_run, tmp_path_factory):
    b = bundle.load(tiny_run)
    gs = GraphSpec.of(b.model)
    d = tmp_path_factory.mktemp("graphs")
    paths = {}
    for g in ("ranking", "user_encoder", "candidate_scorer"):
        paths[g] = d / f"{g}.onnx"
        onnx.save(export_graph(b.model, gs, g), str(paths[g]))
    return b, gs, paths


def test_reader_streams_the_requested_rows_as_graph_feeds(graphs, tiny_data):
    b, gs, paths = graphs
    for g in ("ranking", "user_encoder", "candidate_scorer"):
        user = session(paths["user_encoder"]) if g == "candidate_scorer" else None
        r = DataFileReader(tiny_data / "train.h5", b.encoder(), gs, g, rows=300, batch_size=128, user_session=user)
        feeds = list(iter(r.get_next, None))
        # whole batches only (histogram calibrators need equal shapes): 300 rows asked, 2 x 128 read
        assert r.rows_read == 256 and [len(next(iter(f.values()))) for f in feeds] == [128, 128]
        want = {i.name for i in session(paths[g]).get_inputs()}
        assert all(set(f) == want for f in feeds)
        r.rewind()
        assert r.get_next() is not None


def test_reader_sample_is_a_seeded_shuffle(graphs, tiny_data):
    b, gs, _ = graphs

    def users(seed):
        r = DataFileReader(tiny_data / "train.h5", b.encoder(), gs, "ranking", rows=64, batch_size=64, seed=seed)
        return r.get_next()["user_index"]

    assert np.array_equal(users(0), users(0)) and not np.array_equal(users(0), users(1))


def test_check_calibration_file(graphs, tiny_data):
    b, _, _ = graphs
    assert check_calibration_file(tiny_data / "train.h5", b.encoder(), 10**9) > 1000  # capped at the file
    with pytest.raises(DmrxError, match="too few"):
        check_calibration_file(tiny_data / "train.h5", b.encoder(), 8)
    with pytest.raises(DmrxError, match="no such file"):
        check_calibration_file(tiny_data / "absent.h5", b.encoder(), 1000)


def test_cache_key_changes_with_weights_method_rows_and_data(tiny_data):
    base = dict(
        weights_hash="w1", graph_hash="g", method="minmax", data_path=tiny_data / "train.h5", rows=512, graph="ranking"
    )
    k = cache_key(**base)
    assert k == cache_key(**base)
    for change in (
        {"weights_hash": "w2"},
        {"method": "entropy"},
        {"rows": 513},
        {"data_path": tiny_data / "valid.h5"},
        {"graph": "user_encoder"},
    ):
        assert cache_key(**{**base, **change}) != k, change


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_quantize_each_method_then_reuse_the_cache(graphs, tiny_data, tmp_path, method):
    b, gs, paths = graphs
    cache = RangeCache(tmp_path / "cache")
    cache.prepare()
    key = cache_key(b.weights_hash, manifests.sha256(paths["ranking"]), method, tiny_data / "train.h5", 256, "ranking")
    r = DataFileReader(tiny_data / "train.h5", b.encoder(), gs, "ranking", rows=256)
    first = int8.quantize(paths["ranking"], tmp_path / "a.onnx", r, method, cache.path(key))
    assert not first["cache_hit"] and first["rows"] == 256 and cache.has(key)
    r2 = DataFileReader(tiny_data / "train.h5", b.encoder(), gs, "ranking", rows=256)
    second = int8.quantize(paths["ranking"], tmp_path / "b.onnx", r2, method, cache.path(key))
    assert second["cache_hit"] and r2.rows_read == 0  # ranges came from the cache, no data was read
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_damaged_cache_entry_is_a_miss(tmp_path):
    cache = RangeCache(tmp_path)
    cache.path("k").write_text("{not json")
    assert not cache.has("k") and not cache.path("k").exists()


def test_report_json_and_table():
    rep = precision_report(
        {
            "fp32": {"auc": 0.70, "logloss": 0.40, "bytes": 1000, "rows_per_s": 100.0},
            "int8": {"auc": 0.6995, "logloss": 0.401, "bytes": 300, "rows_per_s": 150.0},
        }
    )
    assert rep["int8"]["auc_diff"] == pytest.approx(-0.0005)
    assert rep["int8"]["logloss_rel_diff"] == pytest.approx(0.0025)
    assert rep["int8"]["size_ratio"] == pytest.approx(0.3) and rep["int8"]["speedup"] == pytest.approx(1.5)
    assert report_table(rep).row_count == 2


def test_select_nodes_keeps_the_final_logit_and_the_scorer_vectors_out(graphs):
    _, _, paths = graphs
    m = onnx.load(str(paths["ranking"]))
    quant, exclude = int8.select_nodes(m)
    assert exclude[0] == int8.final_logit_node(m) and not set(exclude) & set(quant)
    # the attention scorers' z (one output column) stay FP32: one per attention network, U2I and I2I
    scorers = [n for n in exclude[1:] if n.split("/")[-2].split("_")[0] == "z"]
    assert scorers == exclude[1:] and len(scorers) == 2
    ops = {n.name: n.op_type for n in m.graph.node}
    assert {ops[q] for q in quant} <= {"MatMul", "Gemm", "Gather"}
    assert any(ops[q] == "Gather" for q in quant)


def test_unknown_calibration_path_in_cache_key(tmp_path):
    with pytest.raises(FileNotFoundError):
        cache_key("w", "g", "minmax", Path(tmp_path / "nope.h5"), 1, "ranking")


def test_attention_core_in_8_bits_matches_tanh():
    """Add(keys, query) -> Tanh -> MatMul(z) rewritten as QLinearAdd, QLinearSigmoid (tanh = 2 sigmoid(2h) - 1)
    and an integer matmul whose bias carries the -1: the scores within a few quantization steps of float."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    S, g, T, h = 3, 5, 7, 16
    k = rng.normal(0, 1.0, (S, 1, T, h)).astype(np.float32)
    q = rng.normal(0, 0.5, (S, g, 1, h)).astype(np.float32)
    z = rng.normal(0, 0.3, (h, 1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["k", "q"], ["a"], name="core"),
            helper.make_node("Tanh", ["a"], ["t"]),
            helper.make_node("MatMul", ["t", "z"], ["y"]),
        ],
        "core",
        [
            helper.make_tensor_value_info("k", TensorProto.FLOAT, [S, 1, T, h]),
            helper.make_tensor_value_info("q", TensorProto.FLOAT, [S, g, 1, h]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [S, g, T, 1])],
        [numpy_helper.from_array(z, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    want = np.tanh(k + q) @ z
    ranges = {"core": [float(np.abs(k).max()), float(np.abs(q).max()), float(np.abs(k + q).max())]}
    assert int8._quantize_attention_cores(model, ranges) == 1
    assert {n.op_type for n in model.graph.node} == {
        "QuantizeLinear",
        "Shape",
        "Expand",  # the 8-bit query to the keys' [S, g, T, h]
        "QLinearAdd",
        "QLinearSigmoid",
        "MatMulIntegerToFloat",
    }
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"k": k, "q": q}
    )[0]
    # error budget: h rounded to range/127 (tanh' <= 1), sigmoid to 1/255 (x2), z to 7 bits, summed over h
    step = ranges["core"][2] / 127 + 2 / 255
    assert np.abs(got - want).max() <= step * np.abs(z).sum()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999
