"""ONNX Runtime for dmrx graphs: the one place a session is made, and the graphs' input names.

Every consumer (scoring, user vectors for retrieval, the INT8 retrieval search, the export's gates and
calibration, the benchmarks) opens its sessions through `session`, so they all run a graph the same way:
one-column matmuls as one-row GEMMs on CPU (`row_products`), INT8 graphs rearranged for the CPU kernels at
load (`for_cpu`) with integer matmuls that do not saturate
on x86 CPUs without VNNI (`X64_PRECISION`), one intra-op thread count, quiet logging, and a one-line
DmrxError naming the file when a graph cannot be loaded.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

from dmrx.data.features import flat_name
from dmrx.errors import DmrxError
from dmrx.runtime.onnx_edit import producers, readers, rewrite

# Inputs are named after the batch keys with "/" written "__" ("hist/item" -> "hist__item"): "/" is not a
# valid name everywhere ONNX names travel (TensorRT engine bindings, some runtimes' C identifiers).
USER_PREFIX = "user__"  # candidate_scorer's inputs holding user-side tensors: user__hist_emb, ...


onnx_name = flat_name  # the graph input name of a batch key


NUMPY_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(double)": np.float64,
}


def for_cpu(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same INT8 graph arranged for ONNX Runtime's CPU kernels: DQ(table) -> Gather becomes
    Gather(INT8 table) -> DQ, so a call dequantizes only the rows it gathers instead of whole tables;
    a quantized Gemm (float bias: ONNX Runtime fuses no integer kernel for it) becomes DQ -> MatMul <- DQ
    plus the bias Add (fused into MatMulIntegerToFloat when the session disables MatMulAddFusion, as
    `session` does); a weight-only Gemm's DQ(weight) is dequantized once at load.

    Same numbers up to float rounding (a per-tensor DequantizeLinear commutes with Gather; a folded
    weight is the DQ's own output): run through `session`, the ranking graph's CTR is within 1e-7 of
    the stored graph's own Q/DQ arithmetic (ONNX Runtime with graph optimizations off); without
    X64_PRECISION it is not, on x86 CPUs without VNNI (see there). The stored artifact keeps the standard
    DQ -> Gather form, which the ONNX-TensorRT parser takes (TensorRT gathers no INT8 tensors); CPU
    consumers apply this at load (`session` does)."""
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    consumers, producer = readers(g), producers(g)
    drop, replace, folded = set(), {}, []
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        if inits[n.input[0]].data_type != onnx.TensorProto.INT8:
            continue
        if n.input[1] not in inits or len(inits[n.input[1]].dims) > 0:
            continue  # per-axis or non-constant scales: leave as is
        users = consumers.get(n.output[0], [])
        if users and all(u.op_type == "Gemm" and u.input[1] == n.output[0] for u in users):
            gemm_attrs = [{a.name: helper.get_attribute_value(a) for a in u.attribute} for u in users]
            dq_act = [u.input[0] in producer and producer[u.input[0]].op_type == "DequantizeLinear" for u in users]
            if (
                len(users) == 1
                and dq_act[0]
                and gemm_attrs[0].get("transA", 0) == 0
                and gemm_attrs[0].get("alpha", 1.0) == 1.0
                and gemm_attrs[0].get("beta", 1.0) == 1.0
            ):
                # a quantized Gemm with a float bias: ONNX Runtime fuses no integer kernel for it, but
                # does for DQ -> MatMul <- DQ (MatMulIntegerToFloat) followed by the bias Add
                u = users[0]
                w = numpy_helper.to_array(inits[n.input[0]])
                if gemm_attrs[0].get("transB", 0):
                    w = np.ascontiguousarray(w.T)
                wname = n.input[0] + "__kn"
                folded.append(numpy_helper.from_array(w, wname))
                mm_out = u.output[0] + "__mm"
                nodes_for = [
                    helper.make_node("DequantizeLinear", [wname, *n.input[1:]], [wname + "_dq"], name=wname + "_DQ"),
                    helper.make_node(
                        "MatMul",
                        [u.input[0], wname + "_dq"],
                        [mm_out if len(u.input) > 2 and u.input[2] else u.output[0]],
                        name=u.name + "__MatMul",
                    ),
                ]
                if len(u.input) > 2 and u.input[2]:
                    nodes_for.append(
                        helper.make_node("Add", [mm_out, u.input[2]], list(u.output), name=u.name + "__Add")
                    )
                replace[id(u)] = nodes_for
                drop.add(id(n))
                continue
            # weight-only (float activation): dequantize the weight once here instead of every call
            w = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            folded.append(numpy_helper.from_array(w * scale, n.output[0]))
            drop.add(id(n))
            continue
        if not users or any(u.op_type != "Gather" or u.input[0] != n.output[0] for u in users):
            continue
        drop.add(id(n))
        for u in users:
            raw = u.output[0] + "__int8"
            gather = helper.make_node(
                "Gather",
                [n.input[0], u.input[1]],
                [raw],
                name=u.name + "__int8",
                **{a.name: helper.get_attribute_value(a) for a in u.attribute},
            )
            dq = helper.make_node("DequantizeLinear", [raw, *n.input[1:]], list(u.output), name=u.name + "__dq")
            replace[id(u)] = [gather, dq]
    if not drop:
        return model
    rewrite(g, drop, replace)
    g.initializer.extend(folded)
    used = {x for n in g.node for x in n.input}
    for t in [t for t in out.graph.initializer if t.name not in used]:
        out.graph.initializer.remove(t)
    return out


def row_products(model: onnx.ModelProto) -> onnx.ModelProto:
    """MatMul(X [..., h], w [h, 1]) as Gemm(w^T [1, h], X [N, h], transB=1) -> [1, N], reshaped back to
    [..., 1]: ONNX Runtime's CPU GEMM computes N outputs of one row about twice as fast as one output
    column of N rows (the attention's z: ~0.45 against ~0.85 us per candidate). The same sums, in another
    order (within float rounding). Graphs before opset 15 (Shape without start/end) are returned as they
    are."""
    from onnx import helper

    if not any(o.domain in ("", "ai.onnx") and o.version >= 15 for o in model.opset_import):
        return model
    inits = {t.name: t for t in model.graph.initializer}
    columns = {
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in inits
        and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
        and len(inits[n.input[1]].dims) == 2
        and inits[n.input[1]].dims[1] == 1
    }
    if not columns:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    replace = {}
    nodes = [n for n in g.node if n.op_type == "MatMul" and n.name in columns]  # held: rewrite matches by id()
    for n in nodes:
        w = numpy_helper.to_array(inits[n.input[1]])
        t = n.name + "__row"
        g.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(w.T), t + "_w"),
                numpy_helper.from_array(np.array([-1, w.shape[0]], np.int64), t + "_2d"),
                numpy_helper.from_array(np.array([1], np.int64), t + "_one"),
            ]
        )
        replace[id(n)] = [
            helper.make_node("Reshape", [n.input[0], t + "_2d"], [t + "_x"], name=t + "_Reshape2d"),
            helper.make_node("Gemm", [t + "_w", t + "_x"], [t + "_y"], name=t + "_Gemm", transB=1),
            helper.make_node("Shape", [n.input[0]], [t + "_lead"], name=t + "_Shape", end=-1),
            helper.make_node("Concat", [t + "_lead", t + "_one"], [t + "_shape"], name=t + "_Concat", axis=0),
            helper.make_node("Reshape", [t + "_y", t + "_shape"], list(n.output), name=t + "_Reshape"),
        ]
    rewrite(g, set(), replace)
    return out


# ONNX Runtime runs our INT8 x INT8 matmuls (MatMulIntegerToFloat) on x86 as U8S8: the activation is shifted
# to uint8 (QDQS8ToU8Transformer) and, on AVX2 or AVX-512 CPUs without VNNI, multiplied with VPMADDUBSW, which
# adds two u8*s8 products into a saturating int16. Symmetric INT8 weights reach +-127 and a shifted activation
# near zero is already 128, so 128*127*2 > 32767: the sums clip. Measured on an AVX2-only EPYC, tiny test
# model: CTR off by 0.025 and r_hat by 0.1 against the graph's own Q/DQ arithmetic. This option makes ONNX
# Runtime convert weights outside [-64, 63] to uint8 and use its U8U8 kernel, which does not saturate; the
# numbers do not change on CPUs with VNNI (or not x86), the speed does: ~30% of INT8 rows/s on an AVX-512 VNNI
# Xeon (benchmarks/edge.py), which is why the export's CPU flavour has 7-bit weights and runs without it.
# Cost on the AVX2 host: ~3% of INT8 rows/s. (`session.qdqisint8allowed=1`, S8S8 kernels, is exact too but
# halves the rows/s there.) The stored, Gather-after-DQ form cannot take it: ONNX Runtime (1.31, 1.32) fails
# to load it ("Attempt to replace the existing tensor": an INT8 table read by two DequantizeLinear nodes is
# converted twice); for_cpu's form loads.
X64_PRECISION = ("session.x64quantprecision", "1")
# Graphs quantized with 7-bit weights (|w| <= 64: 255 * 64 * 2 < 32767, no saturation) carry this metadata
# entry and run without X64_PRECISION, which also slows VNNI CPUs (by ~30% of INT8 rows/s on one).
SEVEN_BIT = ("dmrx.int8_weights", "7-bit")
CPU_INT8 = "int8-cpu"  # the export's INT8 graph set for CPUs (user_encoder.int8-cpu.onnx, ...; export.int8)


def session(
    model: onnx.ModelProto | str | os.PathLike,
    threads: int = 0,
    providers: list[str] | None = None,
    spinning: bool = True,
):
    """An ONNX Runtime session for a dmrx graph (a path or a ModelProto).

    threads: intra-op threads (0: ONNX Runtime's default, one per core). providers: execution providers in
    order of preference (default CPU only). On the CPU provider one-column matmuls become one-row GEMMs
    (row_products), integer matmuls run with X64_PRECISION, so
    that they do not saturate, and an INT8 graph goes through for_cpu with MatMulAddFusion off, so that the
    quantized MLP layers keep their integer kernels. spinning: whether idle intra-op threads spin (off for callers that
    run many single-threaded sessions side by side).
    """
    import onnxruntime as ort

    where = model if not isinstance(model, onnx.ModelProto) else (model.doc_string or "an ONNX graph")
    providers = list(providers or ["CPUExecutionProvider"])
    try:
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        cpu = providers[0] == "CPUExecutionProvider"
        seven_bit = any((p.key, p.value) == SEVEN_BIT for p in model.metadata_props)
        if cpu and not seven_bit:  # 7-bit weights cannot saturate the u8 x s8 kernels
            options.add_session_config_entry(*X64_PRECISION)  # for any integer matmul in the graph
        if cpu:
            model = row_products(model)
        if cpu and any(n.op_type == "DequantizeLinear" for n in model.graph.node):
            return ort.InferenceSession(
                for_cpu(model).SerializeToString(),
                options,
                providers=providers,
                disabled_optimizers=["MatMulAddFusion"],
            )
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as e:  # onnx and onnxruntime raise their own exception types
        raise DmrxError(
            f"{where}: ONNX Runtime cannot load it ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
