"""qatflow: Keras 3 quantization-aware training to TensorRT-ready INT8, as a Kubeflow pipeline.

Public names are imported lazily so that ``import qatflow`` (and ``qatflow --help``) stays
fast; TensorFlow loads on first use of a function that needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "quantize_model": "qatflow.quantization",
    "QuantizationSpec": "qatflow.quantization",
    "QDQCase": "qatflow.quantization",
    "calibrate": "qatflow.quantization",
    "summarize": "qatflow.quantization",
    "PlacementSummary": "qatflow.quantization",
    "register_layer_config": "qatflow.quantization",
    "LayerQuantizeConfig": "qatflow.quantization",
    "QuantizeWrapper": "qatflow.quantization",
    "LayerRegistry": "qatflow.quantization",
    "DEFAULT_REGISTRY": "qatflow.quantization",
    "quantize_scope": "qatflow.quantization",
    "export_onnx": "qatflow.onnx.export",
    "validate_onnx": "qatflow.onnx.validate",
    "load_model": "qatflow.models",
    "load_dataset": "qatflow.data",
    "pretrain": "qatflow.training",
    "finetune": "qatflow.training",
    "build_engine": "qatflow.runtimes",
    "load_engine": "qatflow.runtimes",
    "evaluate": "qatflow.evaluation",
    "compare": "qatflow.comparison",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qatflow' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
