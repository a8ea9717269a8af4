"""Exceptions raised by qatflow. Every message names the file, layer or parameter at fault."""


def flagged(parameter: str) -> str:
    """A parameter as both its users know it: ``batch_size (--batch-size)``."""
    return f"{parameter} (--{parameter.replace('_', '-')})"


class QatflowError(Exception):
    """Base class for errors that the CLI reports without a traceback."""


class ModelError(QatflowError):
    """A model file or model structure that qatflow cannot work with."""


class QuantizationError(QatflowError):
    """A placement, spec or calibration problem."""


class ExportError(QatflowError):
    """ONNX export failed or produced a graph TensorRT would reject."""


class DataError(QatflowError):
    """A dataset that is missing, malformed or does not match the model."""


class StorageError(QatflowError):
    """A local path or S3 URI that cannot be read or written."""


class RuntimeBackendError(QatflowError):
    """An engine that cannot be built or loaded by the requested runtime."""


class PipelineError(QatflowError):
    """A pipeline parameter, cluster call or schedule that is wrong."""
