"""One calling convention over Keras models and runtime engines: ``run(batch) -> logits``."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qatflow.errors import ModelError
from qatflow.evaluation.result import json_safe
from qatflow.runtimes import Engine, EngineMetadata, load_engine

log = logging.getLogger("qatflow.evaluation")

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class Predictor:
    """A model ready to run, with what the result must record about where it ran.

    ``input_shape`` is NHWC with ``None`` for free dimensions; ``fixed_batch`` is set when the
    engine only accepts one batch size, and ``run`` then pads or splits batches to that size.
    ``fidelity`` and ``engine`` come from an engine's build metadata (see ``engine_provenance``).
    """

    run: Callable[[np.ndarray], np.ndarray]
    source: str
    input_shape: Shape | None
    fixed_batch: int | None
    runtime: str
    runtime_version: str
    device: str
    threads: int | None
    size_bytes: int | None
    fidelity: dict[str, Any] | None = None
    engine: dict[str, str] | None = None


def make_predictor(
    model_or_engine: Any, *, threads: int | None, model_file: str | os.PathLike[str] | None
) -> Predictor:
    """Wrap a Keras model, an engine, or a file path: a ``.keras``/``.h5`` model (loaded with
    ``qatflow.models.load_model``, its size reported) or an engine (``load_engine``)."""
    import keras

    from qatflow.models import H5_SUFFIXES, KERAS_SUFFIXES, load_model

    if isinstance(model_or_engine, str | os.PathLike):
        if Path(model_or_engine).suffix.lower() in KERAS_SUFFIXES + H5_SUFFIXES:
            model_file = model_file or model_or_engine
            model_or_engine = load_model(str(model_or_engine))
        else:
            model_or_engine = load_engine(model_or_engine, threads=threads)
    if isinstance(model_or_engine, keras.Model):
        return keras_predictor(model_or_engine, threads=threads, model_file=model_file)
    if isinstance(model_or_engine, Engine):
        return engine_predictor(model_or_engine, threads=threads)
    raise ModelError(
        f"evaluate: expected a Keras model, an engine, or a model or engine file path, "
        f"got {type(model_or_engine).__name__}"
    )


def keras_predictor(
    model: Any, *, threads: int | None, model_file: str | os.PathLike[str] | None
) -> Predictor:
    """Run ``model(x, training=False)`` in a traced ``tf.function``."""
    import keras
    import tensorflow as tf

    input_shape = _keras_input_shape(model)
    signature = None
    if input_shape is not None:
        signature = [tf.TensorSpec((None, *input_shape[1:]), tf.float32)]

    @tf.function(input_signature=signature, reduce_retracing=True)
    def forward(x: tf.Tensor) -> tf.Tensor:
        outputs = model(x, training=False)
        if isinstance(outputs, dict | list | tuple):
            raise ModelError(f"model {model.name!r} has several outputs; evaluation needs one")
        return tf.cast(outputs, tf.float32)

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(forward(tf.convert_to_tensor(batch)))

    return Predictor(
        run=run,
        source=str(model_file) if model_file is not None else f"keras model {model.name!r}",
        input_shape=input_shape,
        fixed_batch=None,
        runtime="tensorflow",
        runtime_version=f"{tf.__version__} (keras {keras.__version__})",
        device=_tensorflow_device(),
        threads=_set_tensorflow_threads(threads),
        size_bytes=_file_size(model_file),
    )


def engine_predictor(engine: Engine, *, threads: int | None) -> Predictor:
    """Wrap a runtime engine; batches are fitted to a fixed batch size when it has one."""
    shape: Shape = tuple(None if d is None or int(d) <= 0 else int(d) for d in engine.input_shape)
    fixed = shape[0] if shape else None
    if threads is not None and threads != engine.threads:
        log.warning(
            "engine %s runs with %s threads, not threads=%d; load it with the thread count "
            "you want to measure",
            engine.path,
            engine.threads,
            threads,
        )
    run = engine.run if fixed is None else _fixed_batch_runner(engine.run, fixed)
    fidelity, provenance = engine_provenance(engine.metadata)
    return Predictor(
        run=run,
        source=str(engine.path),
        input_shape=shape,
        fixed_batch=fixed,
        runtime=engine.runtime,
        runtime_version=engine.runtime_version,
        device=engine.device,
        threads=engine.threads,
        size_bytes=engine.size_bytes,
        fidelity=fidelity,
        engine=provenance,
    )


def engine_provenance(
    metadata: EngineMetadata,
) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """The build-time fidelity report and the kernel provenance recorded in engine metadata.

    Returns ``(fidelity, engine)``: ``fidelity`` is ``metadata.fidelity`` (``None`` when empty,
    i.e. no check was made); ``engine`` holds ``encoding`` (``build_options["encoding"]``) and
    ``isa`` (``device["isa"]``) and the share of compute nodes and of kernel time in integer
    kernels (``integer_nodes``, ``integer_time``) where recorded, and ``fallback`` when the
    build refused faster rewrites (why this engine is slower), ``None`` when none is.
    """
    provenance: dict[str, str] = {}
    for key, recorded in (("encoding", metadata.build_options), ("isa", metadata.device)):
        value = recorded.get(key)
        if value is not None and str(value):
            provenance[key] = str(value)
    share = metadata.build_options.get("integer_share") or {}
    for key in ("nodes", "time"):
        if isinstance(share.get(key), int | float):
            provenance[f"integer_{key}"] = f"{100 * share[key]:.1f}%"
    refused = metadata.build_options.get("refused_rewrites") or []
    if refused:
        ideal = (metadata.fidelity.get("details") or {}).get("ideal_integer") or {}
        reason = (
            "integer rounding alone moves this model past the tolerance"
            if ideal.get("passed") is False
            else "they failed the fidelity check"
        )
        provenance["fallback"] = f"{len(refused)} faster rewrite(s) refused: {reason}"
    fidelity = json_safe(dict(metadata.fidelity)) if metadata.fidelity else None
    return fidelity, provenance or None


def _fixed_batch_runner(
    run: Callable[[np.ndarray], np.ndarray], size: int
) -> Callable[[np.ndarray], np.ndarray]:
    """Split ``batch`` into chunks of ``size``, zero-padding the last one, and drop padded rows."""

    def fitted(batch: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, batch.shape[0], size):
            chunk = batch[start : start + size]
            real = chunk.shape[0]
            if real < size:
                pad = np.zeros((size - real, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outputs.append(np.asarray(run(chunk))[:real])
        return np.concatenate(outputs)

    return fitted


def _keras_input_shape(model: Any) -> Shape | None:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs:
        return None
    if len(inputs) != 1:
        raise ModelError(f"model {model.name!r} has {len(inputs)} inputs; evaluation needs one")
    return tuple(None if d is None else int(d) for d in inputs[0].shape)


def _set_tensorflow_threads(threads: int | None) -> int:
    """Apply ``threads`` as TF's intra-op thread count if TF still allows it; return the count.

    The count in effect is the configured one, else ``TF_NUM_INTRAOP_THREADS``, else TF's
    default of one thread per schedulable CPU.
    """
    import tensorflow as tf

    if threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:
            log.warning(
                "threads=%d not applied: TensorFlow is already initialised in this process "
                "(set it before any TensorFlow op runs)",
                threads,
            )
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    from_env = os.environ.get("TF_NUM_INTRAOP_THREADS", "")
    if not configured and from_env.isdigit():
        configured = int(from_env)
    return configured or _available_cpus()


def _tensorflow_device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return f"gpu ({gpus[0].name})"
    return f"cpu ({platform.machine()})"


def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _file_size(path: str | os.PathLike[str] | None) -> int | None:
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    if not target.exists():
        raise ModelError(f"model_file {target} does not exist")
    return target.stat().st_size
