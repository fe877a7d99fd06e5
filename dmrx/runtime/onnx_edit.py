"""Small edits of ONNX graphs, shared by the load-time CPU layout (dmrx.runtime.ort.for_cpu) and the export's
INT8 rewrites (dmrx.export.int8): who produces and who reads each tensor, and replacing nodes in place."""

from __future__ import annotations

import onnx


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output}


def readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for x in n.input:
            out.setdefault(x, []).append(n)
    return out


def rewrite(graph: onnx.GraphProto, drop: set[int], replace: dict[int, list[onnx.NodeProto]]) -> None:
    """The graph's nodes in order, without those whose id() is in drop and with replace[id(node)] in place
    of a node (a replacement is written where the node it replaces stood, so the order stays topological
    when the new nodes read what the old one read)."""
    nodes = []
    for n in graph.node:
        if id(n) not in drop:
            nodes.extend(replace.get(id(n), [n]))
    del graph.node[:]
    graph.node.extend(nodes)


def use_contrib_ops(model: onnx.ModelProto) -> None:
    """Declare ONNX Runtime's com.microsoft operator set, once."""
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
