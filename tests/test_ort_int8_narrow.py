"""rewrite_for_ort_int8's narrow stage and the U8S8 kernels it keeps under the u8u8 encoding.

The stage stores a ReLU's uint8 output with zero-point 0 (the int8 values 0..127 TensorRT
keeps) instead of 128: bit-exact, in float math and on ORT's kernels. Convolutions that read
only such 7-bit tensors keep their int8 weights under ``u8u8``, because U8S8 pair sums cannot
saturate there (2 x 127 x 127 < 32767); that is checked on an emulated AVX2 CPU without VNNI,
where the same convolution on zero-point-128 activations does saturate.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tests.int8_models import narrow_cnn, near_binary

from qatflow.onnx.encoding import NARROW_MAX, encode_weights
from qatflow.onnx.ort_int8 import METADATA_KEY, rewrite_for_ort_int8
from qatflow.onnx.reference import run_optimized, run_reference
from qatflow.runtimes.cpu_int8 import detect

ROOT = Path(__file__).resolve().parents[1]
EXACT = {"relu": "exact", "requantize": "none", "fold_affine": False}


def summary(model: onnx.ModelProto) -> dict[str, Any]:
    return json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))


def encoded(model: onnx.ModelProto, encoding: str) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    encode_weights(out, encoding)  # type: ignore[arg-type]
    return out


def int8_weights(model: onnx.ModelProto) -> set[str]:
    return {
        i.name for i in model.graph.initializer if numpy_helper.to_array(i).dtype == np.int8
    } & {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}


def bounds(model: onnx.ModelProto) -> list[int]:
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [int(consts[n.input[2]]) for n in model.graph.node if n.op_type == "Clip"]


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return near_binary(64)


def test_narrow_stage_is_bit_exact(samples: np.ndarray) -> None:
    """As float math against the source; on ORT's kernels against the graph before the stage,
    in every encoding that is exact on this CPU (u8u8 compared with the all-uint8 weights)."""
    source = narrow_cnn()
    narrowed = rewrite_for_ort_int8(source, **EXACT)  # type: ignore[arg-type]
    before = rewrite_for_ort_int8(source, **EXACT, until="swish")  # type: ignore[arg-type]
    feeds = {"x": samples}
    np.testing.assert_array_equal(
        run_reference(narrowed, feeds)[0], run_reference(source, feeds)[0]
    )
    assert detect().exact  # at least one encoding is exact on every CPU
    for encoding in detect().exact:
        np.testing.assert_array_equal(
            run_optimized(encoded(narrowed, encoding), feeds)[0],
            run_optimized(encoded(before, encoding), feeds)[0],
        )
    assert summary(narrowed)["relu_narrowed"] == 2
    ops = Counter(n.op_type for n in narrowed.graph.node)
    assert ops["Max"] == 0 and ops["Clip"] == 2 and bounds(narrowed) == [NARROW_MAX] * 2


def test_u8u8_keeps_int8_weights_only_where_the_activations_are_7_bit() -> None:
    narrowed = rewrite_for_ort_int8(narrow_cnn(), **EXACT)  # type: ignore[arg-type]
    before = rewrite_for_ort_int8(narrow_cnn(), **EXACT, until="swish")  # type: ignore[arg-type]
    # The stem reads the input (zero-point 128), the dense layer a GlobalAveragePool output:
    # uint8 weights. The second convolution reads a ReLU output through a float MaxPool.
    assert encode_weights(narrowed, "u8u8") == 2 and int8_weights(narrowed) == {"conv_q"}
    assert encode_weights(before, "u8u8") == 3 and int8_weights(before) == set()


def relu6_pad_graph(pad_value: float = 0.0) -> onnx.ModelProto:
    """Q/DQ -> Conv -> Relu6 (Clip) -> Q/DQ -> Pad 0 -> MaxPool -> Q/DQ -> Conv, TensorRT style:
    the ResNet50 stem's ZeroPadding before its MaxPool, with MobileNet's ReLU6."""
    rng = np.random.default_rng(3)
    w1 = np.clip(np.rint(rng.normal(0, 40, (8, 3, 3, 3))), -127, 127).astype(np.int8)
    w2 = np.clip(np.rint(rng.normal(0, 40, (4, 8, 1, 1))), -127, 127).astype(np.int8)
    scalars = {"xs": 1 / 40, "rs": 8.0 / 127, "ws": 0.01, "lo": 0.0, "hi": 6.0, "pv": pad_value}
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars.items()]
    inits += [
        numpy_helper.from_array(np.array(0, np.int8), "z"),
        numpy_helper.from_array(w1, "w1q"),
        numpy_helper.from_array(w2, "w2q"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w1q", "ws", "z"], ["w1"]),
        helper.make_node("Conv", ["xd", "w1"], ["c1"]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
        helper.make_node("QuantizeLinear", ["r1", "rs", "z"], ["r1q"]),
        helper.make_node("DequantizeLinear", ["r1q", "rs", "z"], ["r1d"]),
        helper.make_node("Pad", ["r1d", "pads", "pv"], ["p"]),
        helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("QuantizeLinear", ["m", "rs", "z"], ["mq"]),
        helper.make_node("DequantizeLinear", ["mq", "rs", "z"], ["md"]),
        helper.make_node("DequantizeLinear", ["w2q", "ws", "z"], ["w2"]),
        helper.make_node("Conv", ["md", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "relu6_pad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_relu6_and_a_zero_pad_follow_the_new_zero_point() -> None:
    source = relu6_pad_graph()
    x = np.random.default_rng(4).normal(0, 2, (16, 3, 12, 12)).astype(np.float32)
    narrowed = rewrite_for_ort_int8(source, **EXACT)  # type: ignore[arg-type]
    before = rewrite_for_ort_int8(source, **EXACT, until="swish")  # type: ignore[arg-type]
    feeds = {"x": x}
    np.testing.assert_array_equal(
        run_reference(narrowed, feeds)[0], run_reference(source, feeds)[0]
    )
    for encoding in detect().exact:
        np.testing.assert_array_equal(
            run_optimized(encoded(narrowed, encoding), feeds)[0],
            run_optimized(encoded(before, encoding), feeds)[0],
        )
    assert summary(narrowed)["relu_narrowed"] == 1
    six = round(6.0 / (8.0 / 127))  # ReLU6's top in steps of the Q's scale, below 127
    assert bounds(narrowed) == [six]
    consts = {i.name: numpy_helper.to_array(i) for i in narrowed.graph.initializer}
    pads = [n for n in narrowed.graph.node if n.op_type == "Pad"]
    assert [int(consts[p.input[2]]) for p in pads] == [0]  # was the zero-point 128
    assert int8_weights(encoded(narrowed, "u8u8")) == {"w2q"}


def test_a_pad_of_another_value_keeps_the_relu_output_as_it_was() -> None:
    """A Pad value other than 0.0 is not the zero-point: that ReLU output is left alone."""
    source = relu6_pad_graph(pad_value=1.0)
    x = {"x": np.random.default_rng(5).normal(0, 2, (8, 3, 12, 12)).astype(np.float32)}
    narrowed = rewrite_for_ort_int8(source, **EXACT)  # type: ignore[arg-type]
    assert "relu_narrowed" not in summary(narrowed)
    np.testing.assert_array_equal(run_reference(narrowed, x)[0], run_reference(source, x)[0])
    assert int8_weights(encoded(narrowed, "u8u8")) == set()


EMULATED = """
import copy, json, sys
import numpy as np
sys.path.insert(0, {root!r})
from tests.int8_models import narrow_cnn, near_binary
from qatflow.onnx.encoding import encode_weights
from qatflow.onnx.ort_int8 import rewrite_for_ort_int8
from qatflow.onnx.reference import run_optimized
from qatflow.runtimes.cpu_int8 import detect
exact = dict(relu="exact", requantize="none", fold_affine=False)
narrowed = rewrite_for_ort_int8(narrow_cnn(), **exact)
wide = rewrite_for_ort_int8(narrow_cnn(), **exact, until="swish")
x = {{"x": near_binary(64)}}
def run(model, encoding):
    model = copy.deepcopy(model)
    encode_weights(model, encoding)
    return run_optimized(model, x)[0]
expected = run(wide, "u8u8")  # uint8 weights everywhere: never saturates
print(json.dumps({{
    "isa": detect().isa,
    "exact": list(detect().exact),
    "narrow_u8u8": bool(np.array_equal(run(narrowed, "u8u8"), expected)),
    "wide_u8s8": bool(np.array_equal(run(wide, "u8s8"), expected)),
}}))
"""


def test_on_an_emulated_avx2_cpu_u8s8_on_7_bit_activations_is_exact(tmp_path: Path) -> None:
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-user is needed for the AVX2 test: `make setup` installs it"
    script = tmp_path / "emulated.py"
    script.write_text(EMULATED.format(root=str(ROOT)))
    done = subprocess.run(
        [qemu, "-cpu", "Haswell", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["isa"] == "avx2 (no VNNI)" and result["exact"] == ["u8u8"]
    assert result["narrow_u8u8"] is True  # int8 weights on 7-bit activations: exact
    assert result["wide_u8s8"] is False  # the same kernels on zero-point 128 saturate
