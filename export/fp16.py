"""FP32 -> FP16 ONNX conversion with FP32 islands for the numerically sensitive ops.

Written against onnx's own helpers (no onnxconverter-common dependency) because the rule that matters here
is structural, not a flat op list: the masked softmax (ReduceMin/ReduceMax, the masked fill `Where`, the
shift `Sub`, `Exp`, the mask `Mul`, the sum, the clamp and the division), every ReduceSum (r, r_hat and
the softmax's denominator) and the final Sigmoid stay FP32; everything else (embedding tables, matmuls,
attention projections, the MLP) runs in FP16.

Rule: an op in BLOCK always runs FP32; an op in FOLLOW runs FP32 when one of its (non-constant) float
inputs is FP32, so the chain Where -> Sub -> Exp -> Mul of the masked softmax stays FP32 while a PReLU's
Where/Mul (FP16 inputs) stays FP16. Casts are inserted where a tensor crosses precisions; constants go
FP16 when all their consumers are FP16. Graph inputs and outputs keep FP32 (keep_io_types), so the FP16
graph is a drop-in replacement for the FP32 one and TensorRT's strongly typed build reads the precision
straight from the file.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BLOCK = frozenset(
    {
        "ReduceMin",
        "ReduceMax",
        "ReduceSum",
        "ReduceMean",
        "Exp",
        "Log",
        "Div",
        "Clip",
        "Sigmoid",
        "Softmax",
        "LogSoftmax",
    }
)
FOLLOW = frozenset({"Where", "Sub", "Mul", "Add", "Neg", "Max", "Min"})
_TYPELESS_INPUT = frozenset({"Shape", "Cast", "Size"})  # read any float type: no input cast needed

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def convert(model: onnx.ModelProto, block: frozenset[str] = BLOCK, follow: frozenset[str] = FOLLOW) -> onnx.ModelProto:
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = model.graph
    elem: dict[str, int] = {}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        elem[v.name] = v.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        elem[t.name] = t.data_type
    consts: dict[str, onnx.NodeProto] = {}
    for n in g.node:
        if n.op_type == "Constant":
            val = next((a.t for a in n.attribute if a.name == "value"), None)
            if val is not None:
                elem[n.output[0]] = val.data_type
                consts[n.output[0]] = n

    def is_float(name: str) -> bool:
        return bool(name) and elem.get(name) == F32

    # pass 1: each node's precision, tags of the float tensors it produces
    tag: dict[str, str] = {v.name: "fp32" for v in g.input}
    for name in list(inits) + list(consts):
        tag[name] = "const"
    prec: dict[int, str] = {}
    for i, n in enumerate(g.node):
        if n.op_type == "Constant":
            continue
        ins = [x for x in n.input if is_float(x) and tag.get(x) != "const"]
        if n.op_type in block:
            p = "fp32"
        elif n.op_type in follow and any(tag.get(x) == "fp32" for x in ins):
            p = "fp32"
        else:
            p = "fp16"
        prec[i] = p
        for o in n.output:
            if n.op_type == "Cast":
                to = next(a.i for a in n.attribute if a.name == "to")
                if to == F32:
                    tag[o] = p
            elif is_float(o):
                tag[o] = p

    # pass 2: constants go FP16 when every float-reading consumer is FP16
    users: dict[str, set[str]] = {}
    for i, n in enumerate(g.node):
        if n.op_type == "Constant" or n.op_type in _TYPELESS_INPUT:
            continue
        for x in n.input:
            if is_float(x) and tag.get(x) == "const":
                users.setdefault(x, set()).add(prec[i])
    for name, ps in users.items():
        if ps == {"fp16"}:
            if name in inits:
                t = inits[name]
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), name))
            else:
                attr = next(a for a in consts[name].attribute if a.name == "value")
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), name))
            tag[name] = "fp16"
        else:
            tag[name] = "fp32"

    # pass 3: rewrite, inserting casts where a float tensor crosses precisions
    out_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, str], str] = {}

    def cast_of(name: str, want: str) -> str:
        key = (name, want)
        if key not in casts:
            new = f"{name}__to_{want}"
            out_nodes.append(
                helper.make_node("Cast", [name], [new], to=F16 if want == "fp16" else F32, name=f"{name}/cast_{want}")
            )
            casts[key] = new
        return casts[key]

    for i, n in enumerate(g.node):
        if n.op_type == "Constant":
            out_nodes.append(n)
            continue
        p = prec[i]
        if n.op_type == "Cast" and p == "fp16":
            for a in n.attribute:
                if a.name == "to" and a.i == F32:
                    a.i = F16
        if n.op_type == "ConstantOfShape" and p == "fp16":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == F32:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16)))
        if n.op_type not in _TYPELESS_INPUT:
            for j, x in enumerate(n.input):
                if is_float(x) and tag.get(x) not in (None, p):
                    n.input[j] = cast_of(x, p)
        out_nodes.append(n)

    # graph outputs stay FP32
    for v in g.output:
        if tag.get(v.name) == "fp16":
            inner = f"{v.name}__fp16"
            for n in out_nodes:
                for j, x in enumerate(n.input):
                    if x == v.name:
                        n.input[j] = inner
                for j, x in enumerate(n.output):
                    if x == v.name:
                        n.output[j] = inner
            out_nodes.append(helper.make_node("Cast", [inner], [v.name], to=F32, name=f"{v.name}/cast_out"))

    del g.node[:]
    g.node.extend(out_nodes)
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def fp32_islands(model: onnx.ModelProto) -> list[str]:
    """Op types that compute in FP32 inside a converted graph (for the manifest)."""
    model = onnx.shape_inference.infer_shapes(model)
    elem = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    ops = {
        n.op_type
        for n in model.graph.node
        if n.op_type not in ("Cast", "Constant") and any(elem.get(o) == F32 for o in n.output)
    }
    return sorted(ops)
