"""`--check-tensorrt`: lint an ONNX file against the ONNX-TensorRT parser's rules, without TensorRT.

The operator list is the support matrix of onnx-tensorrt's docs/operators.md as published for
TensorRT 10.15 ("supports operators in the inclusive range of opset 9 to opset 24"); the ops it marks
"N" are left out. What is checked:
- the default-domain opset is within the parser's range, and no op comes from another domain;
- every op is one the parser supports;
- QuantizeLinear/DequantizeLinear zero points are all 0 (the docs: "`x_zero_point` must be zero",
  "`y_zero_point` must be 0"), DequantizeLinear reads INT8 only (no INT32 bias dequantization, no UINT8),
  and no DynamicQuantizeLinear (unsupported);
- Q/DQ scales are constants (initializers or Constant nodes), all positive, in the float type of the
  tensor quantized (QuantizeLinear) or of a float type (DequantizeLinear); per-tensor on activations, and
  per-channel only on a weight's output axis (MatMul/Gemm B's output columns, Conv's output channels), as
  TensorRT's explicit quantization requires; no QuantizeLinear output is a graph output (an INT8 tensor
  TensorRT would have to hand back);
- INT8 tensors flow only Q -> DQ (INT8 is a "quantized type" in TensorRT: an op computing on it is an error);
- no op reads a float64 tensor (TensorRT has no FP64 activations; the parser only narrows FP64
  initializers), and the graph's inputs and outputs are of types TensorRT binds (float32, float16, int32,
  int64, bool, int8);
- Reduce*/Squeeze/Unsqueeze/Slice axes given as inputs are constants (the docs' "axes must be an
  initializer" restrictions), and TopK's K is a constant.
Ops with data-dependent output shapes (NonZero, NonMaxSuppression) are parsed, so not flagged here: an
engine whose output shape depends on the data is refused when it runs (dmrx.runtime.tensorrt.Engine).
This is a static approximation of what the parser accepts; a real TensorRT build is the final word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dmrx.runtime.onnx_edit import readers

TRT_DOC_VERSION = "10.15"
OPSET_MIN, OPSET_MAX = 9, 24

SUPPORTED_OPS = frozenset(
    """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split()
)

_T = onnx.TensorProto
BINDABLE = {_T.FLOAT: "float32", _T.FLOAT16: "float16", _T.INT32: "int32", _T.INT64: "int64", _T.BOOL: "bool"}
BINDABLE[_T.INT8] = "int8"
_FLOATS = (_T.FLOAT, _T.FLOAT16, _T.BFLOAT16)
# (op, input index) -> the output axis of a weight read there, given the weight's rank and the node
_OUTPUT_AXIS = {
    ("MatMul", 1): lambda rank, node: rank - 1,
    ("Gemm", 1): lambda rank, node: 0 if _attr(node, "transB", 0) else 1,
    ("Conv", 1): lambda rank, node: 0,
    ("ConvTranspose", 1): lambda rank, node: 1,
}


def _attr(node: onnx.NodeProto, name: str, default):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def _type_name(elem: int) -> str:
    return onnx.TensorProto.DataType.Name(elem)


_AXES_INPUT = {
    "ReduceSum": 1,
    "ReduceMean": 1,
    "ReduceMax": 1,
    "ReduceMin": 1,
    "ReduceProd": 1,
    "ReduceL1": 1,
    "ReduceL2": 1,
    "ReduceLogSum": 1,
    "ReduceLogSumExp": 1,
    "ReduceSumSquare": 1,
    "Squeeze": 1,
    "Unsqueeze": 1,
    "Slice": 3,
    "TopK": 1,
}


@dataclass
class LintReport:
    path: str
    opset: int
    problems: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "opset": self.opset,
            "problems": self.problems,
            "trt_rules": f"onnx-tensorrt operators.md, TensorRT {TRT_DOC_VERSION}, opset {OPSET_MIN}..{OPSET_MAX}",
        }


def lint(model: onnx.ModelProto | str | Path) -> LintReport:
    path = ""
    if not isinstance(model, onnx.ModelProto):
        path = str(model)
        model = onnx.load(path)
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    rep = LintReport(path, opset)
    if not OPSET_MIN <= opset <= OPSET_MAX:
        rep.problems.append(f"opset {opset} is outside the parser's range {OPSET_MIN}..{OPSET_MAX}")
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            val = next((a.t for a in n.attribute if a.name == "value"), None)
            if val is not None:
                consts[n.output[0]] = numpy_helper.to_array(val)
    elem = {t.name: t.data_type for t in g.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            elem.setdefault(v.name, v.type.tensor_type.elem_type)
    except Exception as e:  # noqa: BLE001 -- a model shape inference rejects is a lint finding, not a crash
        rep.problems.append(f"shape inference failed: {e.__class__.__name__}")
    consumers = readers(g)
    graph_outputs = {o.name for o in g.output}
    for v in list(g.input) + list(g.output):
        t = v.type.tensor_type.elem_type
        if v.name not in consts and t not in BINDABLE:
            rep.problems.append(
                f"graph {'input' if v in g.input else 'output'} {v.name} is {_type_name(t)}: TensorRT binds "
                f"{', '.join(BINDABLE.values())}"
            )
    for n in g.node:
        rep.ops[n.op_type] = rep.ops.get(n.op_type, 0) + 1
        where = f"{n.op_type} node {n.name or '(unnamed)'}"
        if n.domain not in ("", "ai.onnx"):
            rep.problems.append(f"{where}: custom domain {n.domain!r} is not parsed by TensorRT")
            continue
        if n.op_type == "DynamicQuantizeLinear":
            rep.problems.append(f"{where}: DynamicQuantizeLinear is not supported by TensorRT")
            continue
        if n.op_type not in SUPPORTED_OPS:
            rep.problems.append(f"{where}: op not supported by the ONNX-TensorRT parser")
        qdq = n.op_type in ("QuantizeLinear", "DequantizeLinear")
        for i, x in enumerate(n.input):
            if not x:
                continue
            if elem.get(x) == _T.DOUBLE and x not in consts:
                rep.problems.append(f"{where}: reads float64 tensor {x}; TensorRT has no float64 activations")
            as_zero_point = qdq and i == 2
            if elem.get(x) == _T.INT8 and n.op_type != "DequantizeLinear" and not as_zero_point:
                what = f"initializer {x}" if x in consts else f"INT8 tensor {x}"
                rep.problems.append(f"{where}: reads {what}; only a DequantizeLinear may read INT8 in TensorRT")
        if qdq:
            _check_qdq(n, where, consts, elem, consumers, graph_outputs, rep.problems)
        idx = _AXES_INPUT.get(n.op_type)
        if idx is not None and len(n.input) > idx and n.input[idx] and n.input[idx] not in consts:
            rep.problems.append(f"{where}: input {idx} ({n.input[idx]}) must be a constant for TensorRT")
    return rep


def _check_qdq(n, where, consts, elem, consumers, graph_outputs, problems) -> None:
    """The explicit-quantization rules for one QuantizeLinear/DequantizeLinear node."""
    if len(n.input) > 2 and n.input[2]:
        zp = consts.get(n.input[2])
        if zp is None:
            problems.append(f"{where}: zero point {n.input[2]} is not a constant")
        elif np.any(zp != 0):
            problems.append(f"{where}: zero point is not 0 (TensorRT needs symmetric quantization)")
    x, scale_name = n.input[0], n.input[1]
    if n.op_type == "DequantizeLinear" and elem.get(x) not in (None, _T.INT8):
        problems.append(f"{where}: dequantizes {_type_name(elem[x])}; TensorRT's DequantizeLinear reads INT8")
    if n.op_type == "QuantizeLinear":
        for c in consumers.get(n.output[0], []):
            if c.op_type != "DequantizeLinear":
                problems.append(f"{where}: its INT8 output feeds {c.op_type} {c.name}, not a DequantizeLinear")
        if n.output[0] in graph_outputs:
            problems.append(
                f"{where}: its INT8 output {n.output[0]} is a graph output; TensorRT needs a DequantizeLinear"
            )
    scale = consts.get(scale_name)
    if scale is None:
        problems.append(f"{where}: scale {scale_name} is not a constant (TensorRT needs initializer scales)")
        return
    if scale.size == 0 or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        problems.append(f"{where}: scale {scale_name} is not all positive and finite")
    s_type = elem.get(scale_name)
    want = elem.get(x) if n.op_type == "QuantizeLinear" else None
    if want in _FLOATS and s_type is not None and s_type != want:
        problems.append(f"{where}: scale {scale_name} is {_type_name(s_type)}, the input is {_type_name(want)}")
    elif s_type is not None and s_type not in _FLOATS:
        problems.append(f"{where}: scale {scale_name} is {_type_name(s_type)}, not a float type")
    if scale.size <= 1:
        return
    # per-channel: only a weight (a constant dequantized) on the output axis of the op that reads it
    if n.op_type == "QuantizeLinear" or x not in consts:
        problems.append(f"{where}: per-channel scale on an activation; TensorRT quantizes activations per-tensor")
        return
    rank = consts[x].ndim
    axis = _attr(n, "axis", 1) % max(rank, 1)
    readers = consumers.get(n.output[0], [])
    for c in readers:
        i = list(c.input).index(n.output[0])
        out_axis = _OUTPUT_AXIS.get((c.op_type, i))
        if out_axis is None:
            problems.append(
                f"{where}: per-channel weight read by {c.op_type} {c.name}; TensorRT takes per-channel only on "
                "MatMul/Gemm/Conv weights"
            )
        elif axis != out_axis(rank, c):
            problems.append(
                f"{where}: per-channel on axis {axis} of weight {x}, read by {c.op_type} {c.name} whose output "
                f"axis is {out_axis(rank, c)}"
            )
