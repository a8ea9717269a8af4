"""Load FP32 Keras models: ``.keras``, ``.h5``, SavedModel folders, or ``keras.applications``."""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import keras

from qatflow import storage
from qatflow.errors import ModelError
from qatflow.keras_compat import flatten_layers
from qatflow.quantization.scope import quantize_scope

log = logging.getLogger("qatflow.models")

KERAS_SUFFIXES = (".keras",)
H5_SUFFIXES = (".h5", ".hdf5")
_CUSTOM_HINT = (
    "; if it uses custom layers or a subclassed model, register them: --custom-objects "
    "MODULE:ATTR on the command line, qatflow.models.register_custom_objects in Python"
)
# keras.applications builders by normalised name: "mobilenet_v2" and "MobileNetV2" both match.
APPLICATIONS = {
    re.sub(r"[^a-z0-9]", "", name.lower()): name
    for name in dir(keras.applications)
    if name[:1].isupper() and callable(getattr(keras.applications, name))
}


def load_model(
    uri: str,
    *,
    weights: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> keras.Model:
    """Load a Keras model: an FP32 model to quantize, or one qatflow quantized and saved.

    qatflow's layers load without any other import (``quantize_scope`` is applied).

    ``uri`` is a ``.keras`` or ``.h5`` file, a SavedModel folder (local or ``s3://``), or a
    ``keras.applications`` name such as ``resnet50``, ``mobilenet_v2`` or ``EfficientNetB0``.
    An application is built untrained (``weights=None``) with ``input_shape`` and
    ``num_classes`` (default 1000); ``weights`` (a weights file, local or ``s3://``) is then
    loaded into it. For model files, ``input_shape`` / ``num_classes`` are checked when given.
    A SavedModel is wrapped in one ``keras.layers.TFSMLayer``: it runs, but its layers cannot be
    quantized one by one (see ``qatflow.quantization.graph.check_layerwise``).
    """
    builder = _application(uri)
    if builder is not None:
        model = _build_application(builder, input_shape, num_classes)
    else:
        model = _load_file(storage.fetch(uri, storage.cache_dir("models")), uri)
        _check_signature(model, input_shape, num_classes, uri)
    if weights is not None:
        _load_weights(model, weights)
    log.info("loaded model %s from %s", model.name, uri)
    return model


def register_custom_objects(specs: Iterable[str]) -> dict[str, Any]:
    """Import each ``module:attr`` and register it with Keras so that model files using it load.

    ``attr`` is a layer/model class or function (registered under its Keras name and its
    Python name) or a dict of name -> object. Importing the module also runs whatever it
    registers itself (``keras.saving.register_keras_serializable``,
    ``qatflow.register_layer_config``). The current directory is searched first, so a module
    beside the model files imports as it would with ``python -m``. Returns what was registered.
    """
    registered: dict[str, Any] = {}
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ModelError(
                f"--custom-objects {spec!r}: expected MODULE:ATTR, e.g. my_layers:Scale"
            )
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelError(
                f"--custom-objects {spec!r}: cannot import {module_name}: {exc}"
            ) from exc
        try:
            found = getattr(module, attr)
        except AttributeError:
            raise ModelError(
                f"--custom-objects {spec!r}: module {module_name} has no attribute {attr!r}"
            ) from None
        registered.update(_custom_names(found, spec))
    keras.saving.get_custom_objects().update(registered)
    if registered:
        log.info("registered custom objects %s", ", ".join(sorted(registered)))
    return registered


def _custom_names(found: Any, spec: str) -> dict[str, Any]:
    if isinstance(found, dict):
        if not all(isinstance(name, str) and callable(obj) for name, obj in found.items()):
            raise ModelError(
                f"--custom-objects {spec!r}: the dict must map names to classes or functions"
            )
        return dict(found)
    if not callable(found):
        raise ModelError(
            f"--custom-objects {spec!r} is a {type(found).__name__}, not a class, function or dict"
        )
    return {keras.saving.get_registered_name(found): found, found.__name__: found}


def _application(uri: str) -> str | None:
    """The keras.applications builder named by ``uri``, None for paths; unknown names raise."""
    if storage.is_s3_uri(uri) or Path(uri).expanduser().exists():
        return None
    if "/" in uri or Path(uri).suffix:
        raise ModelError(f"model file not found: {uri}")
    key = re.sub(r"[^a-z0-9]", "", uri.lower())
    if key in APPLICATIONS:
        return APPLICATIONS[key]
    some = ", ".join(
        ("resnet50", "mobilenet_v2", "efficientnet_b0", *sorted(APPLICATIONS.values())[:6])
    )
    raise ModelError(
        f"unknown model {uri!r}: not a file and not a keras.applications name; known names "
        f"include {some} ({len(APPLICATIONS)} in all)"
    )


def _build_application(
    builder: str, input_shape: tuple[int, ...] | None, num_classes: int | None
) -> keras.Model:
    try:
        model: keras.Model = getattr(keras.applications, builder)(
            weights=None, input_shape=input_shape, classes=num_classes or 1000
        )
    except ValueError as exc:
        raise ModelError(
            f"cannot build keras.applications.{builder} with input_shape={input_shape}, "
            f"num_classes={num_classes}: {exc}"
        ) from exc
    return model


def _load_file(path: Path, uri: str) -> keras.Model:
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ModelError(f"model folder {uri} is not a SavedModel (it has no saved_model.pb)")
        return _load_saved_model(path, uri)
    suffix = path.suffix.lower()
    if suffix in KERAS_SUFFIXES and not zipfile.is_zipfile(path):
        raise ModelError(f"{uri} is not a valid Keras (.keras) file: it is not a zip archive")
    if suffix not in KERAS_SUFFIXES + H5_SUFFIXES:
        raise ModelError(
            f"unsupported model file {uri}: expected a .keras or .h5 file or a SavedModel folder"
        )
    try:
        with quantize_scope():
            model = keras.saving.load_model(path, compile=False)
    except OSError as exc:
        raise ModelError(f"{uri} is not a valid Keras/H5 file: {exc}") from exc
    except ValueError as exc:
        if "No model config found" in str(exc):
            raise ModelError(
                f"{uri} holds weights only, no model; pass it as weights= together with the "
                "model (e.g. a keras.applications name)"
            ) from exc
        if "Unknown" not in str(exc):
            raise ModelError(f"cannot load the Keras model {uri}: {exc}") from exc
        raise ModelError(f"cannot load the Keras model {uri} ({exc}){_CUSTOM_HINT}") from exc
    except (TypeError, KeyError) as exc:
        raise ModelError(f"cannot load the Keras model {uri} ({exc}){_CUSTOM_HINT}") from exc
    if not isinstance(model, keras.Model):
        raise ModelError(f"{uri} holds a {type(model).__name__}, not a Keras model")
    return model


def _load_saved_model(path: Path, uri: str) -> keras.Model:
    """Wrap a SavedModel's ``serving_default`` signature into a functional model."""
    try:
        layer = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
    except (ValueError, OSError) as exc:
        raise ModelError(f"cannot load the SavedModel {uri}: {exc}") from exc
    _, specs = layer.call_endpoint_fn.structured_input_signature
    outputs = layer.call_endpoint_fn.structured_outputs
    if len(specs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"SavedModel {uri} must have one input and one output in its serving_default "
            f"signature; it has inputs {sorted(specs)} and outputs {sorted(outputs)}"
        )
    (name, spec), (output_name,) = next(iter(specs.items())), outputs
    inputs = keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype.name, name=name)
    result = layer(inputs)
    model = keras.Model(inputs, result[output_name], name=path.name)
    log.warning(
        "%s is a SavedModel: it is wrapped in one TFSMLayer and cannot be quantized layer by layer",
        uri,
    )
    return model


def _check_signature(
    model: keras.Model, input_shape: tuple[int, ...] | None, num_classes: int | None, uri: str
) -> None:
    if input_shape is None and num_classes is None:
        return
    try:
        have_shape, have_classes = tuple(model.inputs[0].shape[1:]), model.outputs[0].shape[-1]
    except (AttributeError, ValueError, TypeError) as exc:
        raise ModelError(f"model {uri} has no defined input/output to check: {exc}") from exc
    if input_shape is not None and have_shape != tuple(input_shape):
        raise ModelError(
            f"model {uri} takes inputs of shape {have_shape}, not input_shape={tuple(input_shape)}"
        )
    if num_classes is not None and have_classes != num_classes:
        raise ModelError(
            f"model {uri} outputs {have_classes} classes, not num_classes={num_classes}"
        )


def _load_weights(model: keras.Model, weights: str) -> None:
    if not storage.is_s3_uri(weights) and not Path(weights).expanduser().is_file():
        raise ModelError(f"weights file not found: {weights}")
    path = storage.fetch(weights, storage.cache_dir("models"))
    try:
        model.load_weights(path)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelError(f"cannot load weights {weights} into model {model.name}: {exc}") from exc


def initialize_batchnorm(model: keras.Model, images: Any) -> keras.Model:
    """Set every BatchNormalization's moving statistics to those of ``images``; return ``model``.

    A ``keras.applications`` model built with ``weights=None`` has moving mean/variance 0/1, so
    its activations shrink or die layer after layer and its logits carry no signal. One
    training-mode pass with momentum 0 gives it the statistics a trained model would have,
    which makes random-weight models usable for latency and structure work.
    """
    norms = [x for x in flatten_layers(model) if isinstance(x, keras.layers.BatchNormalization)]
    saved = [bn.momentum for bn in norms]
    try:
        for bn in norms:
            bn.momentum = 0.0
        model(images, training=True)
    finally:
        for bn, momentum in zip(norms, saved, strict=True):
            bn.momentum = momentum
    return model
