"""The TensorRT lint's dtype and explicit-quantization rules, each on a tiny hand-built graph that breaks it
(the graphs dmrx exports pass: tests/test_export.py::test_lint_passes_on_every_exported_graph)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from dmrx.export.lint import lint


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, elem, shape=("n", 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _qdq(scale=0.1, scale_dtype=np.float32, **kw):
    """x -> QuantizeLinear(q) -> DequantizeLinear(dq) -> Relu -> y, with a chosen scale."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q", **kw),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="dq", **kw),
        helper.make_node("Relu", ["dq"], ["y"], name="relu"),
    ]
    zp = _const("zp", np.zeros(np.shape(scale)), np.int8)
    return _model(nodes, [_vi("x", T.FLOAT)], [_vi("y", T.FLOAT)], [_const("s", scale, scale_dtype), zp])


def _problems(model) -> str:
    return " | ".join(lint(model).problems)


def test_a_clean_qdq_graph_passes():
    assert lint(_qdq()).ok, lint(_qdq()).problems


@pytest.mark.parametrize(
    "model,expect",
    [
        (_qdq(scale=-0.1), "QuantizeLinear node q: scale s is not all positive"),
        (_qdq(scale=0.0), "DequantizeLinear node dq: scale s is not all positive"),
        (_qdq(scale_dtype=np.float16), "QuantizeLinear node q: scale s is FLOAT16, the input is FLOAT"),
        (_qdq(scale=[0.1, 0.2, 0.3, 0.4], axis=1), "QuantizeLinear node q: per-channel scale on an activation"),
    ],
)
def test_bad_scales_are_flagged(model, expect):
    assert expect in _problems(model)


def test_a_scale_computed_at_run_time_is_flagged():
    nodes = [
        helper.make_node("Abs", ["x"], ["s"], name="scale_of_x"),
        helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq"),
    ]
    model = _model(nodes, [_vi("x", T.FLOAT, [])], [_vi("y", T.FLOAT, [])])
    assert "QuantizeLinear node q: scale s is not a constant" in _problems(model)


def _weight_model(axis, consumer="MatMul", trans_b=0):
    """An INT8 weight [4, 3] dequantized per channel on `axis`, read as B by MatMul or Gemm."""
    w = _const("w", np.ones((4, 3) if not trans_b else (3, 4)), np.int8)
    scale = _const("ws", np.full(3, 0.1))
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws"], ["wf"], name="dqw", axis=axis)]
    if consumer == "MatMul":
        nodes.append(helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm"))
    else:
        nodes.append(helper.make_node("Gemm", ["x", "wf"], ["y"], name="mm", transB=trans_b))
    return _model(nodes, [_vi("x", T.FLOAT)], [_vi("y", T.FLOAT, ("n", 3))], [w, scale])


def test_per_channel_only_on_a_weights_output_axis():
    assert lint(_weight_model(axis=1)).ok, lint(_weight_model(axis=1)).problems
    assert lint(_weight_model(axis=0, consumer="Gemm", trans_b=1)).ok
    bad = _problems(_weight_model(axis=1, consumer="Gemm", trans_b=1))
    assert "DequantizeLinear node dqw: per-channel on axis 1 of weight w, read by Gemm mm whose output axis is 0" in bad


def test_a_quantized_graph_output_is_flagged():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q")]
    model = _model(nodes, [_vi("x", T.FLOAT)], [_vi("q", T.INT8)], [_const("s", 0.1), _const("zp", 0, np.int8)])
    assert "QuantizeLinear node q: its INT8 output q is a graph output" in _problems(model)


def test_float64_and_int8_activations_into_ops_are_flagged():
    nodes = [
        helper.make_node("Cast", ["x"], ["x64"], name="to64", to=T.DOUBLE),
        helper.make_node("Relu", ["x64"], ["r"], name="relu64"),
        helper.make_node("Cast", ["r"], ["y"], name="back", to=T.FLOAT),
        helper.make_node("Cast", ["x"], ["x8"], name="to8", to=T.INT8),
        helper.make_node("Neg", ["x8"], ["z"], name="neg8"),
    ]
    model = _model(nodes, [_vi("x", T.FLOAT)], [_vi("y", T.FLOAT), _vi("z", T.INT8)])
    problems = _problems(model)
    assert "Relu node relu64: reads float64 tensor x64" in problems
    assert "Neg node neg8: reads INT8 tensor x8" in problems


def test_graph_io_types_tensorrt_cannot_bind_are_flagged():
    nodes = [helper.make_node("Cast", ["x"], ["y"], name="c", to=T.FLOAT)]
    model = _model(nodes, [_vi("x", T.DOUBLE)], [_vi("y", T.FLOAT)])
    assert "graph input x is DOUBLE: TensorRT binds float32, float16, int32, int64, bool, int8" in _problems(model)
    nodes = [helper.make_node("Cast", ["x"], ["y"], name="c", to=T.UINT16)]
    model = _model(nodes, [_vi("x", T.FLOAT)], [_vi("y", T.UINT16)])
    assert "graph output y is UINT16" in _problems(model)


def test_nonzero_is_not_a_false_flag():
    nodes = [helper.make_node("NonZero", ["x"], ["y"], name="nz")]
    model = _model(nodes, [_vi("x", T.FLOAT)], [_vi("y", T.INT64, (2, None))])
    assert lint(model).ok, lint(model).problems
