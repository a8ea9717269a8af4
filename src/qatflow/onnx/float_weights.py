"""Float Convs of an optimized ONNX Runtime engine read float32 weights, not int8 ones.

Once ONNX Runtime has fused the integer QDQ groups, each Conv it left in float still reads
``DequantizeLinear(int8 weights)``, which runs on every call. This pass stores those values as
float32 initializers, computed by ONNX Runtime's own DequantizeLinear (so bit for bit what the
engine computed).

By default they are listed as graph inputs too. ONNX Runtime treats such an overridable
initializer as a runtime value, not a constant: it folds no batch norm into it and keeps the
Conv on the kernel it ran before, so the engine computes exactly what it computed before,
without the per-call dequantization. ``overridable=False`` stores plain constants instead:
ONNX Runtime then folds the batch norms into them and moves the Convs to its NCHWc kernels,
which is faster and sums in another order. Deep nets can amplify that rounding past the
fidelity tolerance, so the build uses constants only where the engine still passes its check,
and the loader goes back to the overridable form (:func:`overridable_form`) on a CPU whose
float kernels differ from the build machine's (docs/exact-int8.md, "Float weights").
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qatflow.onnx.graph import GraphIndex, drop_unused_initializers
from qatflow.onnx.reference import run_reference

# What marks an initializer as a float weight this pass stored (its doc_string).
_MARK = "qatflow: precomputed float weight"
# (domain, op) of the float convolutions ORT leaves; the weight is input 1 of both.
_FLOAT_CONVS = frozenset({("", "Conv"), ("com.microsoft", "FusedConv")})


def precompute_float_weights(
    model: onnx.ModelProto, *, overridable: bool = True
) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose float Convs read precomputed float weights (graph inputs too
    when ``overridable``), and how many Convs that changed."""
    index = GraphIndex(model.graph)
    dequantized = [dq for node in model.graph.node if (dq := _weight_dq(index, node))]
    if not dequantized:
        return model, 0
    values = _dequantize(model, index, dequantized)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = {dq.output[0] for dq in dequantized}
    kept = [
        node
        for node in out.graph.node
        if not (node.op_type == "DequantizeLinear" and node.output[0] in names)
    ]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    stored = []
    for dq in dequantized:
        value = numpy_helper.from_array(values[dq.output[0]], dq.output[0])
        value.doc_string = _MARK
        out.graph.initializer.append(value)
        stored.append(value)
    drop_unused_initializers(out.graph)
    if overridable:
        _list_as_inputs(out.graph, stored)
    return out, len(dequantized)


def overridable_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every float weight :func:`precompute_float_weights` stored listed as a
    graph input too: the same numbers on ORT's plain Conv kernels (a copy; ``model`` itself when
    it has no such constant weights)."""
    inputs = {value.name for value in model.graph.input}
    constant = [
        init
        for init in model.graph.initializer
        if init.doc_string == _MARK and init.name not in inputs
    ]
    if not constant:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _list_as_inputs(out.graph, constant)
    return out


def _list_as_inputs(graph: onnx.GraphProto, initializers: list[onnx.TensorProto]) -> None:
    """Make ``initializers`` of ``graph`` overridable: graph inputs too, in place."""
    graph.input.extend(
        helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        for init in initializers
    )


def _weight_dq(index: GraphIndex, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The DequantizeLinear of constants that only ``node``, a float Conv, reads as weight."""
    if (node.domain, node.op_type) not in _FLOAT_CONVS or len(node.input) < 2:
        return None
    dq = index.producer.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.output[0] in index.outputs:
        return None
    if any(name and name not in index.initializers for name in dq.input):
        return None
    return dq if len(index.consumers.get(dq.output[0], [])) == 1 else None


def _dequantize(
    model: onnx.ModelProto, index: GraphIndex, dequantized: list[onnx.NodeProto]
) -> dict[str, np.ndarray]:
    """The outputs of the ``dequantized`` nodes, run by ONNX Runtime as they are in ``model``."""
    needed = {name for dq in dequantized for name in dq.input if name}
    graph = helper.make_graph(
        dequantized,
        "dequantize_weights",
        [],
        [
            helper.make_tensor_value_info(
                dq.output[0], index.initializers[dq.input[1]].data_type, None
            )
            for dq in dequantized
        ],
        [init for init in model.graph.initializer if init.name in needed],
    )
    weights = helper.make_model(
        graph, opset_imports=model.opset_import, ir_version=model.ir_version
    )
    names = [dq.output[0] for dq in dequantized]
    return dict(zip(names, run_reference(weights, {}, names), strict=True))
