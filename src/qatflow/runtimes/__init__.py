"""One engine interface over ONNX Runtime (CPU) and TensorRT (GPU).

``build_engine(onnx_path, output_path, runtime)`` turns an ONNX model into an engine file;
``load_engine(path)`` returns an :class:`Engine` whose ``run(batch)`` gives logits.
"""

from qatflow.runtimes.base import Engine, EngineMetadata
from qatflow.runtimes.dispatch import build_engine, load_engine

__all__ = ["Engine", "EngineMetadata", "build_engine", "load_engine"]
