"""`--check-tensorrt`: lint an ONNX file against the ONNX-TensorRT parser's rules, without TensorRT.

The operator list is the support matrix of onnx-tensorrt's docs/operators.md as published for
TensorRT 10.15 ("supports operators in the inclusive range of opset 9 to opset 24"); the ops it marks
"N" are left out. What is checked:
- the default-domain opset is within the parser's range, and no op comes from another domain;
- every op is one the parser supports;
- QuantizeLinear/DequantizeLinear zero points are all 0 (the docs: "`x_zero_point` must be zero",
  "`y_zero_point` must be 0"), DequantizeLinear reads INT8 only (no INT32 bias dequantization, no UINT8),
  and no DynamicQuantizeLinear (unsupported);
- INT8 tensors flow only Q -> DQ (INT8 is a "quantized type" in TensorRT: an op computing on it is an error);
- no data-dependent output shapes (NonZero, Unique, Compress, NonMaxSuppression, ...);
- Reduce*/Squeeze/Unsqueeze/Slice axes given as inputs are constants (the docs' "axes must be an
  initializer" restrictions), and TopK's K is a constant.
This is a static approximation of what the parser accepts; a real TensorRT build is the final word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

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

# Supported by the parser, but their output shape depends on the data: not for a fixed-shape engine.
DATA_DEPENDENT = frozenset({"NonZero", "Unique", "Compress", "NonMaxSuppression", "StringSplit"})
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
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
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
        if n.op_type in DATA_DEPENDENT:
            rep.problems.append(f"{where}: output shape depends on the data")
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if len(n.input) > 2 and n.input[2]:
                zp = consts.get(n.input[2])
                if zp is None:
                    rep.problems.append(f"{where}: zero point {n.input[2]} is not a constant")
                elif np.any(zp != 0):
                    rep.problems.append(f"{where}: zero point is not 0 (TensorRT needs symmetric quantization)")
            if n.op_type == "DequantizeLinear" and elem.get(n.input[0]) not in (None, onnx.TensorProto.INT8):
                kind = onnx.TensorProto.DataType.Name(elem[n.input[0]])
                rep.problems.append(f"{where}: dequantizes {kind}; TensorRT's DequantizeLinear reads INT8")
            if n.op_type == "QuantizeLinear":
                for c in consumers.get(n.output[0], []):
                    if c.op_type != "DequantizeLinear":
                        rep.problems.append(
                            f"{where}: its INT8 output feeds {c.op_type} {c.name}, not a DequantizeLinear"
                        )
        idx = _AXES_INPUT.get(n.op_type)
        if idx is not None and len(n.input) > idx and n.input[idx] and n.input[idx] not in consts:
            rep.problems.append(f"{where}: input {idx} ({n.input[idx]}) must be a constant for TensorRT")
    for t in g.initializer:
        if t.data_type == onnx.TensorProto.INT8:
            for c in consumers.get(t.name, []):
                as_zero_point = c.op_type in ("QuantizeLinear", "DequantizeLinear") and t.name not in c.input[:2]
                if c.op_type != "DequantizeLinear" and not as_zero_point:
                    rep.problems.append(
                        f"initializer {t.name}: INT8 data read by {c.op_type} {c.name}, not a DequantizeLinear"
                    )
    return rep
