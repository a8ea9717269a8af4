"""TensorRT-style QDQ placement, fake quantization and calibration for Keras 3 models."""

from qatflow.quantization.calibration import CalibrationResult, calibrate
from qatflow.quantization.cases import (
    EfficientNetCase,
    InceptionCase,
    MaxPoolCase,
    MobileNetCase,
    QDQCase,
    ResidualAddCase,
    ResNetV1Case,
    ResNetV2Case,
    cases_for_model,
)
from qatflow.quantization.registry import (
    DEFAULT_REGISTRY,
    LayerQuantizeConfig,
    LayerRegistry,
    register_layer_config,
)
from qatflow.quantization.scope import quantize_scope
from qatflow.quantization.spec import QuantizationSpec, SpecEntry
from qatflow.quantization.summary import PlacementSummary, summarize
from qatflow.quantization.transform import quantize_model
from qatflow.quantization.wrapper import QuantizeWrapper, uncalibrated_quantizers

__all__ = [
    "DEFAULT_REGISTRY",
    "CalibrationResult",
    "EfficientNetCase",
    "InceptionCase",
    "LayerQuantizeConfig",
    "LayerRegistry",
    "MaxPoolCase",
    "MobileNetCase",
    "PlacementSummary",
    "QDQCase",
    "QuantizationSpec",
    "QuantizeWrapper",
    "ResNetV1Case",
    "ResNetV2Case",
    "ResidualAddCase",
    "SpecEntry",
    "calibrate",
    "cases_for_model",
    "quantize_model",
    "quantize_scope",
    "register_layer_config",
    "summarize",
    "uncalibrated_quantizers",
]
