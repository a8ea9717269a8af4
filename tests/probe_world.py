"""A tiny world of real files for the CLI probes: data, models, ONNX, an engine, a result.

Everything is built once per session in-process (8x8 grey images, 4 classes, a few dozen
examples), so each probe only pays for its own ``qatflow`` subprocess.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import onnx
from tests.model_zoo import small_cnn

from qatflow import steps

SHAPE = (8, 8, 1)
CLASSES = 4
# No GPU, no progress bars, no TensorFlow chatter: what a user sees is the message.
PROBE_ENV = {
    "QATFLOW_NO_PROGRESS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "CUDA_VISIBLE_DEVICES": "",
}


@dataclass(frozen=True)
class World:
    """The files the probes start from (never modified by a probe)."""

    root: Path
    npz: Path
    spec: Path
    fp32: Path
    ptq: Path
    onnx: Path
    engine: Path
    result: Path

    def run(
        self, *argv: object, env: dict[str, str] | None = None, timeout: float = 240
    ) -> subprocess.CompletedProcess[str]:
        """Run ``qatflow *argv`` in a subprocess from ``root``, as a user would; one string
        argument is a command line, split as the shell would."""
        if len(argv) == 1 and isinstance(argv[0], str):
            args = shlex.split(argv[0])
        else:
            args = [str(a) for a in argv]
        return subprocess.run(
            [sys.executable, "-m", "qatflow", *args],
            cwd=self.root,
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The probes' environment: this process's, quiet, with a private cache."""
        return {
            **os.environ,
            **PROBE_ENV,
            "QATFLOW_CACHE_DIR": str(self.root / "cache"),
            **(extra or {}),
        }


def write_npz(path: Path, seed: int = 0, *, train: int = 96, test: int = 32) -> Path:
    """A random 4-class dataset of 8x8 grey uint8 images in the ``.npz`` layout."""
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (train, *SHAPE), dtype=np.uint8),
        y_train=np.arange(train) % CLASSES,
        x_test=rng.integers(0, 256, (test, *SHAPE), dtype=np.uint8),
        y_test=np.arange(test) % CLASSES,
    )
    return path


def build_world(root: Path) -> World:
    """Write the data, FP32 and PTQ models, ONNX, engine and an evaluation result."""
    npz = write_npz(root / "data.npz")
    spec = Path(
        steps.prepare_data(str(npz), root / "data.json", batch_size=16, calibration_size=32).spec
    )
    fp32 = root / "fp32.keras"
    keras.utils.set_random_seed(0)
    small_cnn(CLASSES, SHAPE).save(fp32)
    ptq = Path(
        steps.quantize(
            fp32, root / "ptq.keras", calibration_data=spec, calibration_batches_count=2
        ).model
    )
    onnx_path = Path(steps.export(ptq, root / "ptq.onnx").onnx)
    engine = Path(
        steps.build_engine(onnx_path, root / "ptq.engine.onnx", batch_profile=(1, 4, 16)).engine
    )
    result = Path(
        steps.evaluate(
            engine,
            spec,
            root / "ptq.result.json",
            latency_iterations=2,
            warmup=1,
            throughput_batch=4,
            max_batches=1,
        ).result
    )
    return World(root, npz, spec, fp32, ptq, onnx_path, engine, result)


def corrupt_member(source: Path, target: Path) -> Path:
    """Copy a .keras file with bytes flipped in the middle of its largest member's data."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        member = max(archive.infolist(), key=lambda info: info.compress_size)
    header = member.header_offset
    name_length = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_length = int.from_bytes(data[header + 28 : header + 30], "little")
    middle = header + 30 + name_length + extra_length + member.compress_size // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    target.write_bytes(bytes(data))
    return target


def edited_onnx(source: Path, target: Path, *, nan_scale: bool = False) -> Path:
    """Copy an ONNX file with one Q/DQ scale set to NaN, or else a node input pointing nowhere."""
    model = onnx.load(source)
    if nan_scale:
        node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
        scale = next(i for i in model.graph.initializer if i.name == node.input[1])
        value = onnx.numpy_helper.to_array(scale).copy()
        value[...] = np.nan
        scale.CopyFrom(onnx.numpy_helper.from_array(value, scale.name))
    else:
        node = next(n for n in model.graph.node if n.op_type == "Conv")
        node.input[0] = "tensor_nothing_produces"
    onnx.save(model, target)
    return target
