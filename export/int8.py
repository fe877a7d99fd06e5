"""Static INT8 with Q/DQ nodes (onnxruntime.quantization.quantize_static, QuantFormat.QDQ).

What is quantized, and what is kept out:
- MatMul/Gemm nodes whose weight (input 1) is an initializer: INT8 weights and INT8 activations on
  their inputs, each through its own Q -> DQ (dedicate_activation_qdq: the form ONNX Runtime fuses into
  integer kernels; other readers of the same tensor read it unrounded). Activation-by-activation
  matmuls (the attention-weighted sums, whose left operand is a softmax output in [0, 1]) stay FP32:
  no weight to shrink, and 8 bits would flatten the attention.
- Gather nodes reading an embedding table (an initializer): the table is stored INT8 (weight-only for
  the file size; ONNX Runtime drops the DQ -> Gather -> Q pair and gathers INT8 rows directly).
- Kept out: the padding-mask fill (Where), the softmax (ReduceMax/Exp/Div...), the final logit Gemm
  and the sigmoid. Only the listed nodes are handed to the quantizer (nodes_to_quantize), the final
  logit node is also named in nodes_to_exclude.
- The MLP's input layer (a weight matmul reading a Concat of different features) gets INT8 weights
  only, its activation stays FP32 (weight_only_nodes).
- MatMul/Gemm outputs are not re-quantized (OpTypesToExcludeOutputQuantization): the attention
  scores enter the masked softmax and the MLP pre-activations their PReLU in float.
- Symmetric activations and weights, so every zero point is 0 (TensorRT's rule), and no INT32 bias
  quantization (QuantizeBias=False): TensorRT's DequantizeLinear takes INT8/FP8/INT4 inputs only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from dmrx.errors import DmrxError
from dmrx.runtime.onnx_edit import producers, readers, rewrite, use_contrib_ops

QUANT_OPS = ("MatMul", "Gemm", "Gather")

METHOD_NAMES = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def final_logit_node(model: onnx.ModelProto, output: str = "logit") -> str | None:
    """The last MatMul/Gemm on the path to the logit output."""
    producer = producers(model.graph)
    seen, stack = set(), [output]
    while stack:
        name = stack.pop()
        n = producer.get(name)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type in ("MatMul", "Gemm"):
            return n.name
        stack.extend(n.input)
    return None


def _mixed_input(n: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> bool:
    """Whether a matmul's activation is a Concat of unlike features (anything besides embedding lookups)."""
    src = producer.get(n.input[0])
    if src is None or src.op_type != "Concat":
        return False
    return any(producer.get(x) is None or producer[x].op_type != "Gather" for x in src.input)


def _one_column(n: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """Whether a weight matmul produces a single column (a matrix-vector product)."""
    dims = list(inits[n.input[1]].dims)
    trans_b = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
    return len(dims) == 2 and dims[0 if trans_b else 1] == 1


def _per_slot(x: str, model: onnx.ModelProto, producer: dict[str, onnx.NodeProto]) -> bool:
    """Whether tensor x is computed from the candidate scorer's per-slot inputs only (axis 0 "slots": the
    user's own features), not from any per-candidate or per-user input."""
    inputs = {v.name: v for v in model.graph.input}
    seen, stack, found = set(), [x], False
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs:
            dims = inputs[name].type.tensor_type.shape.dim
            if not dims or dims[0].dim_param != "slots":
                return False
            found = True
        elif name in producer:
            stack.extend(producer[name].input)
    return found


def select_nodes(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(nodes to quantize, nodes to exclude) for a dmrx FP32 graph: every embedding Gather and every
    weight MatMul/Gemm except the final logit, the weight-only ones (weight_only_nodes), those with one
    output column and those over per-slot inputs only. The attention's scorer z has one output column: a
    multiply-add per element of its [.., T, h] input, which quantizing would cost a whole extra pass over
    (measured: INT8 rows/s up ~10% on a 2-core Xeon with it kept FP32). The profile block's share of the
    MLP's first layer runs once per slot: FP32 costs next to nothing there and keeps the user's features
    exact (quantized on their own they cost the tiny test model 0.0015 of AUC)."""
    inits = {t.name: t for t in model.graph.initializer}
    exclude = [n for n in [final_logit_node(model)] if n]
    producer = producers(model.graph)
    quant = []
    for n in model.graph.node:
        if n.name in exclude:
            continue
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits:
            if _one_column(n, inits) or _per_slot(n.input[0], model, producer):
                exclude.append(n.name)
            elif not _mixed_input(n, producer):
                quant.append(n.name)
        elif n.op_type == "Gather" and n.input[0] in inits:
            quant.append(n.name)
    return quant, exclude


def weight_only_nodes(model: onnx.ModelProto) -> list[str]:
    """Weight MatMul/Gemm nodes reading a concatenation of unlike features (the MLP's input layer:
    embeddings of ~0.05, r and r_hat of up to tens, standardised dense fields). One per-tensor INT8 scale
    over such a mix rounds the small features to zero (measured: |ΔAUC| 0.009 on a 2,000-user model),
    so these get INT8 weights (DQ on the weight only) and keep FP32 activations. With the MLP input's
    batch norm (the default) the layer reads normalised features instead and is quantized in full."""
    inits = {t.name for t in model.graph.initializer}
    producer = producers(model.graph)
    final = final_logit_node(model)
    return [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm")
        and n.name != final
        and len(n.input) > 1
        and n.input[1] in inits
        and _mixed_input(n, producer)
    ]


def dedicate_activation_qdq(model: onnx.ModelProto) -> int:
    """Give each quantized matmul its own Q -> DQ of its activation, and let every other reader of that
    activation read the float tensor itself.

    quantize_static shares one Q -> DQ between all readers of a tensor; the behaviour features e_t, for
    one, feed the attention projections (quantized) and the attention-weighted sums (FP32). ONNX
    Runtime fuses DQ -> MatMul <- DQ into an integer kernel only when the Q output reaches nothing else,
    so with the pair shared the projections ran in float behind an extra Q/DQ (INT8 at ~0.7x FP32 on
    CPU). The FP32 readers also stop seeing a rounded copy. Returns the number of rewired readers.

    A graph output the quantizer put behind a Q -> DQ (the user encoder's hist_emb, read by the
    projections) is first given back its float value: the DQ gets a name of its own and the output is the
    unrounded tensor, so the projections can take integer kernels (without this the INT8 user encoder
    ran slower than the FP32 one) and callers read what the FP32 graph returns."""
    from onnx import helper

    _unround_outputs(model)
    init_of = {t.name: t for t in model.graph.initializer}
    inits = set(init_of)
    producer, consumers = producers(model.graph), readers(model.graph)
    outputs = {v.name for v in model.graph.output}

    def quantized_matmul(n: onnx.NodeProto, x: str) -> bool:
        if n.op_type not in ("MatMul", "Gemm") or n.input[0] != x or len(n.input) < 2:
            return False
        w = producer.get(n.input[1])
        return w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits

    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    rewired = 0
    for q in list(model.graph.node):
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        dqs = [d for d in consumers.get(q.output[0], []) if d.op_type == "DequantizeLinear"]
        if len(dqs) != len(consumers.get(q.output[0], [])):
            continue
        pairs = [(d, u) for d in dqs for u in consumers.get(d.output[0], [])]
        mms = [(d, u) for d, u in pairs if quantized_matmul(u, d.output[0])]
        if not mms or any(d.output[0] in outputs for d in dqs):
            continue
        if len(mms) == len(pairs) == 1:
            continue
        for d, u in pairs:
            if (d, u) in mms:
                continue
            for j, x in enumerate(u.input):
                if x == d.output[0]:
                    u.input[j] = q.input[0]  # FP32 readers take the unrounded tensor
                    rewired += 1
        added = []
        for k, (_d, u) in enumerate(mms):
            if k == 0 and len(dqs) == 1:
                continue  # the original pair serves the first matmul
            tag = f"{q.output[0]}__{k}"
            # own copies of scale and zero point: ONNX Runtime's common-subexpression pass would merge
            # a Q reading the same tensors back into one Q feeding two DQs, undoing the split
            params = []
            for j, x in enumerate(q.input[1:]):
                t = onnx.TensorProto()
                t.CopyFrom(init_of[x])
                t.name = f"{tag}_p{j}"
                model.graph.initializer.append(t)
                params.append(t.name)
            added.append(helper.make_node("QuantizeLinear", [q.input[0], *params], [tag + "_q"], name=tag + "_Q"))
            added.append(helper.make_node("DequantizeLinear", [tag + "_q", *params], [tag + "_dq"], name=tag + "_DQ"))
            u.input[0] = tag + "_dq"
            rewired += 1
        new_nodes[id(q)] = added
    if rewired:
        nodes = []
        for n in model.graph.node:
            nodes.append(n)
            nodes.extend(new_nodes.get(id(n), []))
        # drop DQ (and Q) nodes nobody reads any more
        while True:
            used = {x for n in nodes for x in n.input} | outputs
            keep = [
                n
                for n in nodes
                if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or any(o in used for o in n.output)
            ]
            if len(keep) == len(nodes):
                break
            nodes = keep
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        used = {x for n in nodes for x in n.input}
        dead = [t for t in model.graph.initializer if t.name not in used]
        for t in dead:
            model.graph.initializer.remove(t)
    return rewired


def _unround_outputs(model: onnx.ModelProto) -> None:
    """Graph outputs produced by Q -> DQ of a computed tensor become that tensor itself (see
    dedicate_activation_qdq); the DQ keeps serving the tensor's other readers under a new name."""
    outputs = {v.name for v in model.graph.output}
    producer = producers(model.graph)
    inits = {t.name for t in model.graph.initializer}
    for dq in list(model.graph.node):
        if dq.op_type != "DequantizeLinear" or dq.output[0] not in outputs:
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in producer or q.input[0] in inits:
            continue
        name, rounded, unrounded = dq.output[0], dq.output[0] + "__dq", q.input[0]
        dq.output[0] = rounded
        src = producer[unrounded]
        src.output[list(src.output).index(unrounded)] = name
        for n in model.graph.node:
            for j, x in enumerate(n.input):
                if x == name:
                    n.input[j] = rounded
                elif x == unrounded:
                    n.input[j] = name


def add_weight_only(model: onnx.ModelProto, names: list[str]) -> int:
    """INT8 weights (symmetric, per-tensor, zero point 0) behind a DequantizeLinear for the named nodes;
    returns how many were converted."""
    from onnx import helper

    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    done = 0
    for n in model.graph.node:
        if n.name not in names or n.input[1] not in inits:
            continue
        name = n.input[1]
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        scale = np.float32(max(float(np.abs(w).max()), 1e-12) / 127.0)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        base = f"{name}__woq"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(q, base + "_quantized"),
                numpy_helper.from_array(np.array(scale, np.float32), base + "_scale"),
                numpy_helper.from_array(np.array(0, np.int8), base + "_zero_point"),
            ]
        )
        model.graph.node.insert(
            0,
            helper.make_node(
                "DequantizeLinear",
                [base + "_quantized", base + "_scale", base + "_zero_point"],
                [base],
                name=base + "_DequantizeLinear",
            ),
        )
        n.input[1] = base
        if uses.get(name, 0) == 1:
            model.graph.initializer.remove(inits[name])
        done += 1
    return done


def attention_cores(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """The Item-to-Item attention cores of a graph: Add(keys, query) -> Tanh -> MatMul(z, one column)."""
    inits = {t.name: t for t in model.graph.initializer}
    reads = readers(model.graph)
    cores = []
    for add in model.graph.node:
        if add.op_type != "Add" or any(x in inits for x in add.input):
            continue
        tanh = reads.get(add.output[0], [])
        if len(tanh) != 1 or tanh[0].op_type != "Tanh":
            continue
        mm = reads.get(tanh[0].output[0], [])
        if len(mm) == 1 and mm[0].op_type == "MatMul" and mm[0].input[1] in inits and _one_column(mm[0], inits):
            cores.append((add, tanh[0], mm[0]))
    return cores


def attention_ranges(fp32_path: Path, reader) -> dict[str, list[float]]:
    """Per attention core (by its Add's name), the largest |keys|, |query| and |keys + query| the
    calibration rows reach, from the FP32 graph (onnxruntime, the reader's feeds)."""
    import onnxruntime as ort

    model = onnx.load(str(fp32_path))
    cores = attention_cores(model)
    if not cores:
        return {}
    names = {add.name: [add.input[0], add.input[1], add.output[0]] for add, _, _ in cores}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for tensors in names.values():
        probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    fetch = [t for tensors in names.values() for t in tensors]
    top = dict.fromkeys(fetch, 0.0)
    rank = {}
    reader.rewind()
    while (feeds := reader.get_next()) is not None:
        for t, v in zip(fetch, sess.run(fetch, feeds), strict=True):
            top[t] = max(top[t], float(np.abs(v).max()) if v.size else 0.0)
            rank[t] = v.ndim
    # the Item-to-Item core broadcasts keys [R, 1, T, h] against queries [R, g, 1, h]; the User-to-Item
    # one ([B, T, h], no query) is per user and feeds retrieval's u: it stays float
    return {add: [top[t] for t in tensors] for add, tensors in names.items() if rank.get(tensors[2]) == 4}


def _quantize_attention_cores(model: onnx.ModelProto, ranges: dict[str, list[float]]) -> int:
    """Add(keys, query) -> Tanh -> MatMul(z) as 8-bit arithmetic: keys and query quantized (uint8, zero
    point 128, scales from their calibrated ranges), QLinearAdd, tanh(h) = 2 sigmoid(2h) - 1 with
    QLinearSigmoid (a table lookup), and z (7-bit) in MatMulIntegerToFloat whose bias carries the -1:
    a = sum_h z_h (2 s_h - 1). Returns the number of cores rewritten."""
    from onnx import helper

    inits = {t.name: t for t in model.graph.initializer}
    replace, drop = {}, set()
    for add, tanh, mm in attention_cores(model):
        if add.name not in ranges or min(ranges[add.name]) <= 0:
            continue
        k_max, q_max, h_max = ranges[add.name]
        z = numpy_helper.to_array(inits[mm.input[1]]).astype(np.float32)
        z_scale = np.float32(max(float(np.abs(z).max()), 1e-12) / 63.0)
        zq = np.clip(np.round(z / z_scale), -63, 63).astype(np.int8)
        tag = add.name + "__q8"
        consts = {
            "k_s": np.array(k_max / 127.0, np.float32),
            "q_s": np.array(q_max / 127.0, np.float32),
            "h_s": np.array(h_max / 127.0, np.float32),
            "h2_s": np.array(2.0 * h_max / 127.0, np.float32),
            "s_s": np.array(1.0 / 255.0, np.float32),
            "zp128": np.array(128, np.uint8),
            "zp0": np.array(0, np.uint8),
            "z": zq,
            "z2_s": np.array(2.0 * z_scale, np.float32),
            "z_zp": np.array(0, np.int8),
            "bias": np.array([-float(z_scale) * float(zq.astype(np.int64).sum())], np.float32),
        }
        model.graph.initializer.extend(numpy_helper.from_array(v, f"{tag}_{k}") for k, v in consts.items())
        c = {k: f"{tag}_{k}" for k in consts}
        nodes = [
            helper.make_node("QuantizeLinear", [add.input[0], c["k_s"], c["zp128"]], [tag + "_k"], name=tag + "_Qk"),
            helper.make_node("QuantizeLinear", [add.input[1], c["q_s"], c["zp128"]], [tag + "_q"], name=tag + "_Qq"),
            # the 8-bit query [R, g, 1, h] spelled out to [R, g, T, h] first (a cheap byte copy): QLinearAdd
            # then adds keys broadcast over g in spans of T * h, about twice as fast as spans of h
            helper.make_node("Shape", [add.input[0]], [tag + "_kshape"], name=tag + "_Shape"),
            helper.make_node("Expand", [tag + "_q", tag + "_kshape"], [tag + "_qe"], name=tag + "_Expand"),
            helper.make_node(
                "QLinearAdd",
                [tag + "_k", c["k_s"], c["zp128"], tag + "_qe", c["q_s"], c["zp128"], c["h_s"], c["zp128"]],
                [tag + "_h"],
                name=tag + "_Add",
                domain="com.microsoft",
            ),
            # read as 2h (scale doubled): sigmoid(2h), whose 2x - 1 is tanh(h)
            helper.make_node(
                "QLinearSigmoid",
                [tag + "_h", c["h2_s"], c["zp128"], c["s_s"], c["zp0"]],
                [tag + "_s"],
                name=tag + "_Sigmoid",
                domain="com.microsoft",
            ),
            helper.make_node(
                "MatMulIntegerToFloat",
                [tag + "_s", c["z"], c["s_s"], c["z2_s"], c["zp0"], c["z_zp"], c["bias"]],
                list(mm.output),
                name=tag + "_z",
                domain="com.microsoft",
            ),
        ]
        replace[id(add)] = nodes
        drop.update({id(tanh), id(mm)})
    if replace:
        rewrite(model.graph, drop, replace)
        use_contrib_ops(model)
    return len(replace)


def _drop_requantization(model: onnx.ModelProto) -> int:
    """Gather(INT8 table) -> DQ -> Q -> DQ -> float readers becomes Gather -> DQ -> readers: the second
    pair re-rounds rows already on an INT8 grid (the quantizer gives a Gather's output its table's scale,
    so the CTRs do not change). Returns the number of pairs dropped."""
    g = model.graph
    producer, reads = producers(g), readers(g)
    outputs = {v.name for v in g.output}
    drop, rename = set(), {}
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.input[0] not in producer:
            continue
        dq1 = producer[q.input[0]]
        if (
            dq1.op_type != "DequantizeLinear"
            or dq1.input[0] not in producer
            or producer[dq1.input[0]].op_type != "Gather"
        ):
            continue
        dq2s = reads.get(q.output[0], [])
        if len(dq2s) != 1 or dq2s[0].op_type != "DequantizeLinear" or dq2s[0].output[0] in outputs:
            continue
        if any(n.op_type in ("MatMul", "Gemm") for n in reads.get(dq2s[0].output[0], [])):
            continue  # the pair feeds an integer matmul's activation
        drop.update({id(q), id(dq2s[0])})
        rename[dq2s[0].output[0]] = dq1.output[0]
    rewrite(g, drop, {})
    for n in g.node:
        for j, x in enumerate(n.input):
            n.input[j] = rename.get(x, x)
    return len(rename)


def _integer_matmuls(model: onnx.ModelProto) -> int:
    """Q(x) -> DQ -> MatMul <- DQ(W) [-> Add(bias)] as QuantizeLinear to uint8 (zero point 128) ->
    com.microsoft MatMulIntegerToFloat(W, bias): ONNX Runtime's u8 x s8 kernel, as its QDQ fusion runs it,
    with the bias added in the kernel's output pass. Same numbers: a symmetric INT8 value v is the uint8
    v + 128 with zero point 128. Returns the number of matmuls rewritten."""
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer, reads = producers(g), readers(g)
    outputs = {v.name for v in g.output}

    def const(name: str) -> bool:
        return name in inits

    drop, replace = set(), {}
    for mm in g.node:
        if mm.op_type != "MatMul" or mm.input[0] not in producer or mm.input[1] not in producer:
            continue
        dq_a, dq_w = producer[mm.input[0]], producer[mm.input[1]]
        q = producer.get(dq_a.input[0])
        if dq_a.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear" or q is None:
            continue
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or not all(map(const, [*q.input[1:], *dq_w.input])):
            continue
        if any(len(reads[x.output[0]]) != 1 for x in (q, dq_a, dq_w)):
            continue
        if inits[q.input[2]].data_type != onnx.TensorProto.INT8 or numpy_helper.to_array(inits[q.input[2]]).any():
            continue  # symmetric INT8 activations only
        out, bias = mm.output[0], []
        after = reads.get(out, [])
        if len(after) == 1 and after[0].op_type == "Add" and out not in outputs:
            add = after[0]
            other = add.input[1] if add.input[0] == out else add.input[0]
            if const(other) and len(inits[other].dims) == 1:
                bias, out = [other], add.output[0]
                drop.add(id(add))
        zp = q.output[0] + "__u8zp"
        model.graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zp))
        q_u8 = helper.make_node(
            "QuantizeLinear", [q.input[0], q.input[1], zp], [q.output[0] + "__u8"], name=q.name + "__u8"
        )
        fused = helper.make_node(
            "MatMulIntegerToFloat",
            [q_u8.output[0], dq_w.input[0], q.input[1], dq_w.input[1], zp, dq_w.input[2], *bias],
            [out],
            name=mm.name + "__integer",
            domain="com.microsoft",
        )
        drop.update({id(q), id(dq_a), id(dq_w)})
        replace[id(mm)] = [q_u8, fused]
    if replace:
        rewrite(g, drop, replace)
        use_contrib_ops(model)
    return len(replace)


def quantize(
    fp32_path: Path,
    out_path: Path,
    reader,
    method: str,
    cache_path: Path,
    per_channel: bool = False,
    reduce_range: bool = False,
) -> dict:
    """Quantize fp32_path -> out_path; ranges come from cache_path if present, else from `reader`
    (and are then written there). reduce_range: 7-bit weights (see cpu_flavour). Returns what was done,
    for the manifest."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(fp32_path))
    quant, exclude = select_nodes(model)
    if not quant:
        raise DmrxError(f"{fp32_path}: no MatMul/Gemm/Gather node with a weight to quantize")
    hit = cache_path.is_file()
    options = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "CalibTensorRangeSymmetric": True,
        # matmul outputs stay float: the attention scores reach the masked softmax, and the
        # MLP's pre-activations its PReLU, unrounded (TensorRT fuses DQ into the matmul inputs)
        "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
    }
    if method == "percentile":
        options["CalibPercentile"] = 99.999
    ort_log = logging.getLogger()
    level = ort_log.level
    ort_log.setLevel(logging.ERROR)  # quantize_static logs a pre-processing hint on every call
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            quantize_static(
                str(fp32_path),
                str(out_path),
                calibration_data_reader=None if hit else reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANT_OPS),
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=quant,
                nodes_to_exclude=exclude,
                calibrate_method=getattr(CalibrationMethod, METHOD_NAMES[method]),
                extra_options=options,
                calibration_cache_path=str(cache_path),
            )
    finally:
        ort_log.setLevel(level)
    woq = weight_only_nodes(model)
    qmodel = onnx.load(str(out_path))
    add_weight_only(qmodel, woq)
    rewired = dedicate_activation_qdq(qmodel)
    onnx.checker.check_model(qmodel)
    onnx.save(qmodel, str(out_path))
    return {
        "method": method,
        "cache_hit": hit,
        "quantized_nodes": len(quant),
        "excluded_nodes": exclude,
        "weight_only_nodes": woq,
        "rewired_readers": rewired,
        "rows": None if hit else getattr(reader, "rows_read", None),
        "per_channel": per_channel,
        "symmetric": True,
        "format": "QDQ",
    }


def cpu_flavour(qdq_path: Path, fp32_path: Path, out_path: Path, attention: dict | None = None) -> dict:
    """The INT8 graph for ONNX Runtime on CPUs, derived from the TensorRT-targeted Q/DQ graph (same
    activation ranges, same nodes) and written beside it.

    - 7-bit matmul weights (|w| <= 63, requantized from the FP32 weights): on x86 without VNNI ONNX Runtime
      multiplies u8 activations by s8 weights with VPMADDUBSW, whose int16 pair sums saturate for 8-bit
      weights (dmrx.runtime.ort's X64_PRECISION comment); with 7 bits they cannot (255 * 63 * 2 < 32767),
      so sessions need no overflow-safe kernel, which cost ~30% of INT8 rows/s on an AVX-512 VNNI CPU too.
      One bit of weight precision is the price; the embedding tables (gathered, not multiplied) keep 8.
      The export's INT8 gates check this graph on held-out rows like the Q/DQ one.
    - Stored as `for_cpu` lays it out (INT8 Gathers, DQ -> MatMul), so loading skips that rewrite; the
      ONNX-TensorRT parser does not take INT8 Gathers, which is why the Q/DQ graph stays for TensorRT.
    - Each quantized matmul as the integer kernel ONNX Runtime would pick, with its bias inside
      (`_integer_matmuls`): ONNX Runtime's own fusion left the bias as an Add, a pass over every output.
    - Gathered INT8 embedding rows are dequantized once, not rounded again to an activation scale on
      their way to float ops (`_drop_requantization`): one Q/DQ pass fewer per table, closer to FP32.
    - `attention`: calibrated ranges of the Item-to-Item attention core (`attention_ranges`), which then
      runs in 8 bits (`_quantize_attention_cores`): in float, the add, tanh and z product over [g, T, h]
      per slot are ~40% of this graph's time and the one cost the other INT8 layers leave. The export's
      INT8 gates check the result like the rest.
    """
    from onnx import helper

    from dmrx.runtime.ort import SEVEN_BIT, for_cpu

    model = onnx.load(str(qdq_path))
    floats = {t.name: t for t in onnx.load(str(fp32_path)).graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    reads = readers(model.graph)
    done = 0
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or n.input[1] not in inits:
            continue
        users = reads.get(n.output[0], [])
        if not users or any(u.op_type not in ("MatMul", "Gemm") or u.input[1] != n.output[0] for u in users):
            continue  # not a matmul weight (an embedding table, an activation)
        q, scale = inits[n.input[0]], inits[n.input[1]]
        if q.data_type != onnx.TensorProto.INT8 or len(scale.dims) > 0:
            continue
        src = floats.get(n.input[0].removesuffix("_quantized").removesuffix("__woq"))
        if src is not None:
            w = numpy_helper.to_array(src).astype(np.float32)
        else:
            w = numpy_helper.to_array(q).astype(np.float32) * numpy_helper.to_array(scale).astype(np.float32)
        s7 = np.float32(max(float(np.abs(w).max()), 1e-12) / 63.0)
        w7 = np.clip(np.round(w / s7), -63, 63).astype(np.int8).reshape(tuple(q.dims))
        q.CopyFrom(numpy_helper.from_array(w7, q.name))
        name = n.input[1] + "__7bit"  # a scale of its own: the 8-bit one may be shared
        model.graph.initializer.append(numpy_helper.from_array(np.array(s7, np.float32), name))
        n.input[1] = name
        done += 1
    model = for_cpu(model)
    _drop_requantization(model)
    fused = _integer_matmuls(model)
    cores = _quantize_attention_cores(model, attention or {})
    used = {x for n in model.graph.node for x in n.input}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)
    del model.metadata_props[:]
    helper.set_model_props(model, dict([SEVEN_BIT]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return {"seven_bit_weights": done, "layout": "for_cpu", "integer_matmuls": fused, "attention_cores": cores}
