"""The three ONNX graphs of a DMR model, exported from torch with a dynamic batch.

- ranking:          aligned rows (history + candidate features) -> ctr, logit, r, r_hat
- user_encoder:     history -> the user-side tensors (hist_emb, mask, u, i2i_keys)
- candidate_scorer: user-side tensors of U users + user_row [S] + candidate features [C] -> ctr [C], ...
                    (S slots of C / S candidates: dmrx.runtime.graphs)

Their inputs and outputs (names, order, dtypes) are the contract in dmrx.runtime.graphs. The history
length T is fixed at the model's max_len (the reader always assembles T = max_len slots); only the batch
axis is dynamic.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. torch 2.13's default dynamo
exporter needs the onnxscript package (not a dependency of dmrx), and the TorchScript path takes
`dynamic_axes` directly, keeps module scopes in node names (which the INT8 exclusion rules read) and
constant-folds the position embeddings; parity against torch is checked after every export anyway.
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from torch import Tensor, nn

from dmrx.models.dmr import DMR
from dmrx.runtime.graphs import USER_PREFIX, GraphSpec

OPSET = 17  # inside ONNX Runtime's range and the ONNX-TensorRT parser's (9..24 for TensorRT 10.15)


class _Ranking(nn.Module):
    def __init__(self, model: DMR, gs: GraphSpec):
        super().__init__()
        self.model, self.keys, self.outs = model, gs.hist_keys + gs.cand_keys, gs.score_outputs

    def forward(self, *xs: Tensor):
        out = self.model(dict(zip(self.keys, xs, strict=False)))
        return _score_tuple(out, self.outs)


class _UserEncoder(nn.Module):
    def __init__(self, model: DMR, gs: GraphSpec):
        super().__init__()
        self.model, self.keys, self.outs = model, gs.hist_keys, gs.user_outputs

    def forward(self, *xs: Tensor):
        user = self.model.encode_user(dict(zip(self.keys, xs, strict=False)))
        return tuple(user[k] for k in self.outs)


class _CandidateScorer(nn.Module):
    def __init__(self, model: DMR, gs: GraphSpec):
        super().__init__()
        self.model, self.user_keys, self.keys, self.outs = model, gs.user_outputs, gs.cand_keys, gs.score_outputs

    def forward(self, *xs: Tensor):
        n = len(self.user_keys)
        user = dict(zip(self.user_keys, xs[:n], strict=False))
        out = self.model.score_grouped(user, xs[n], dict(zip(self.keys, xs[n + 1 :], strict=False)))
        return _score_tuple(out, self.outs)


def _score_tuple(out: dict[str, Tensor], names: list[str]) -> tuple[Tensor, ...]:
    res = {"ctr": torch.sigmoid(out["logit"]), **out}
    return tuple(res[k] for k in names)


def example_inputs(model: DMR, gs: GraphSpec, graph: str, n: int = 3) -> tuple[Tensor, ...]:
    """Small valid inputs for tracing (index 1 everywhere, full histories)."""
    T = gs.max_len

    def feat(key: str) -> Tensor:
        if key.startswith("hist/"):
            return torch.ones(n, T, dtype=torch.long)
        if key == "hist_len":
            return torch.full((n,), T, dtype=torch.long)
        if key.startswith("dense/"):
            return torch.zeros(n)
        return torch.ones(n, dtype=torch.long)

    if graph == "candidate_scorer":
        with torch.no_grad():
            user = model.encode_user({k: feat(k) for k in gs.hist_keys})
        ex = [user[k] for k in gs.user_outputs] + [torch.zeros(n, dtype=torch.long)]
        return tuple(ex + [feat(k) for k in gs.cand_keys])
    keys = gs.hist_keys + (gs.cand_keys if graph == "ranking" else [])
    return tuple(feat(k) for k in keys)


def export_graph(model: DMR, gs: GraphSpec, graph: str, opset: int = OPSET) -> onnx.ModelProto:
    """Trace one graph and return it as an ONNX model (checked by onnx.checker)."""
    wrapper = {"ranking": _Ranking, "user_encoder": _UserEncoder, "candidate_scorer": _CandidateScorer}[graph]
    module = wrapper(model, gs).eval()
    inputs, outputs = gs.inputs(graph), gs.outputs(graph)
    dyn: dict[str, dict[int, str]] = {}
    for name in inputs:
        if graph != "candidate_scorer":
            dyn[name] = {0: "batch"}
        elif name.startswith(USER_PREFIX):
            dyn[name] = {0: "users"}
        else:  # user_row and the user's own features come once per slot of candidates
            per_slot = ["user_row"] + [gs.names[k] for k in gs.slot_keys]
            dyn[name] = {0: "slots" if name in per_slot else "candidates"}
    for name in outputs:
        dyn[name] = {0: "candidates" if graph == "candidate_scorer" else "batch"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        torch.onnx.export(
            module,
            example_inputs(model, gs, graph),
            buf,
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dyn,
            opset_version=opset,
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = f"dmrx {graph} graph"
    with torch.no_grad():  # the tracer leaves some fixed axes unnamed-symbolic: write the known sizes down
        ref = module(*example_inputs(model, gs, graph))
    for v, t in zip(proto.graph.output, ref, strict=False):
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            if axis > 0:
                d.Clear()
                d.dim_value = int(t.shape[axis])
    onnx.checker.check_model(proto)
    return proto


_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.INT8: "int8",
}


def describe_io(proto: onnx.ModelProto) -> dict:
    """{"inputs": [{name, dtype, shape}], "outputs": [...]}: symbolic axes by name, fixed ones as ints."""

    def one(v) -> dict:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}

    return {"inputs": [one(v) for v in proto.graph.input], "outputs": [one(v) for v in proto.graph.output]}


def opset_of(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
