"""The QAT INT8 pipeline: FP32, PTQ INT8 and QAT INT8 side by side, then compare and publish.

DAG (no dsl.If / ParallelFor, so ``kfp.local`` runs it exactly as a cluster would)::

    check_inputs -> prepare_data -> prepare_model -+-> export -> engine -> evaluate (fp32)
                                                   +-> quantize_calibrate -+-> export -> engine
                                                   |                       |   -> evaluate (ptq)
                                                   |                       +-> qat_finetune
                                                   |                           -> export -> engine
                                                   |                           -> evaluate (qat)
    evaluate x3 -> compare -> publish

The PTQ and QAT branches share one quantize_calibrate task: QAT starts from the calibrated PTQ
model. The INT8 evaluations get the FP32 result as the reference for top-1 agreement.

The engine runtime is chosen when the pipeline is built (``build_pipeline(runtime=...)``):
for ``tensorrt`` the engine build and evaluate tasks run the TensorRT image on a GPU node,
for ``onnxruntime`` they run the TensorFlow image on CPU. The ``runtime`` parameter defaults
to that choice; overriding it at submit time does not change the images.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, PipelineTask
from qatflow_components.build_engine.component import build_engine
from qatflow_components.check_inputs.component import check_inputs
from qatflow_components.compare.component import compare
from qatflow_components.evaluate.component import evaluate
from qatflow_components.export_onnx.component import export_onnx
from qatflow_components.prepare_data.component import prepare_data
from qatflow_components.prepare_model.component import prepare_model
from qatflow_components.publish.component import publish
from qatflow_components.qat_finetune.component import qat_finetune
from qatflow_components.quantize_calibrate.component import quantize_calibrate

from qatflow.cluster import GPU_LIMIT, GPU_RESOURCE, GPU_TOLERATION, apply_gpu_settings
from qatflow.errors import PipelineError
from qatflow.images import TENSORFLOW_IMAGE, TENSORRT_IMAGE
from qatflow.params import CLUSTER_RUNTIME, pipeline_default

PIPELINE_NAME = "qatflow-qat-int8"
DESCRIPTION = "Keras FP32 vs PTQ INT8 vs QAT INT8: ONNX, engines, comparison, MLflow and S3"
ENGINE_IMAGES: Mapping[str, str] = {"tensorrt": TENSORRT_IMAGE, "onnxruntime": TENSORFLOW_IMAGE}
RETRIES = 2
RETRY_BACKOFF = "30s"
CODE_VERSION_ENV = "QATFLOW_CODE_VERSION"


@dataclass(frozen=True)
class GpuOptions:
    """Where the engine build and evaluate tasks run when the runtime is TensorRT.

    ``toleration`` None adds none; ``node_selector`` adds one nodeSelector entry per item.
    """

    accelerator_type: str = GPU_RESOURCE
    accelerator_limit: int = GPU_LIMIT
    toleration: Mapping[str, object] | None = field(default_factory=lambda: dict(GPU_TOLERATION))
    node_selector: Mapping[str, str] = field(default_factory=dict)


class Outputs(NamedTuple):
    """The pipeline's outputs: the report folder, the publish record folder, and the accuracy
    gate's verdict on the QAT INT8 candidate (``passed``/``refused``) to branch on."""

    report: Artifact
    publish_record: Artifact
    gate_verdict: str


def build_pipeline(
    *,
    runtime: str = CLUSTER_RUNTIME,
    gpu: GpuOptions | None = None,
    code_version: str | None = None,
) -> Any:
    """The pipeline (a KFP ``GraphComponent``) with engine tasks set up for ``runtime``.

    ``code_version``, when given, is set as ``QATFLOW_CODE_VERSION`` on every task, so the
    step cache (which keys on a task's environment) misses after qatflow's code changes. Local
    runs pass a hash of the installed source; on a cluster the image tags pin the code.
    """
    if runtime not in ENGINE_IMAGES:
        raise PipelineError(f"runtime must be one of {sorted(ENGINE_IMAGES)}, got {runtime!r}")
    options = gpu or GpuOptions()
    engine_runtime = runtime
    env = {CODE_VERSION_ENV: code_version} if code_version else {}

    def settings(task: PipelineTask, name: str, *, cache: bool, retry: bool = False) -> None:
        _settings(task, name, cache=cache, retry=retry, env=env)

    def on_engine_node(task: PipelineTask) -> PipelineTask:
        task.set_container_image(ENGINE_IMAGES[engine_runtime])
        if engine_runtime == "tensorrt":
            apply_gpu_settings(
                task,
                accelerator_type=options.accelerator_type,
                accelerator_limit=options.accelerator_limit,
                toleration=options.toleration,
                node_selector=options.node_selector,
            )
        return task

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def qat_int8(
        model_uri: str = pipeline_default("model_uri"),
        dataset_uri: str = pipeline_default("dataset_uri"),
        preprocessing: str = pipeline_default("preprocessing"),
        batch_size: int = pipeline_default("batch_size"),
        image_size: str = pipeline_default("image_size"),
        limit: int = pipeline_default("limit"),
        pretrain_epochs: int = pipeline_default("pretrain_epochs"),
        epochs: int = pipeline_default("epochs"),
        learning_rate: float = pipeline_default("learning_rate"),
        qat_steps_per_epoch: int = pipeline_default("qat_steps_per_epoch"),
        calibration_method: str = pipeline_default("calibration_method"),
        calibration_batches: int = pipeline_default("calibration_batches"),
        percentile: float = pipeline_default("percentile"),
        quantization_spec: str = pipeline_default("quantization_spec"),
        activation_range: str = pipeline_default("activation_range"),
        runtime: str = engine_runtime,
        batch_profile_min: int = pipeline_default("batch_profile_min"),
        batch_profile_opt: int = pipeline_default("batch_profile_opt"),
        batch_profile_max: int = pipeline_default("batch_profile_max"),
        int8_encoding: str = pipeline_default("int8_encoding"),
        fidelity_samples: int = pipeline_default("fidelity_samples"),
        latency_iterations: int = pipeline_default("latency_iterations"),
        eval_max_batches: int = pipeline_default("eval_max_batches"),
        accuracy_gate: float = pipeline_default("accuracy_gate"),
        tracking_uri: str = pipeline_default("tracking_uri"),
        mlflow_experiment: str = pipeline_default("mlflow_experiment"),
        registered_model: str = pipeline_default("registered_model"),
        s3_prefix: str = pipeline_default("s3_prefix"),
    ) -> Outputs:
        """QAT INT8 pipeline.

        Args:
            model_uri: ``demo`` (train the demo CNN), a model file/SavedModel (local or
                s3://) or a keras.applications name.
            dataset_uri: ``fashion-mnist``, or an IDX/image/TFRecord folder or .npz (local or
                s3://).
            preprocessing: scale01, tf, caffe, torch or raw.
            batch_size: batch size of every split.
            image_size: resize the images to H,W, e.g. 224,224 (empty = as stored).
            limit: cap on every split for smoke runs (0 = all).
            pretrain_epochs: epochs of demo-model pretraining (demo only; cached).
            epochs: QAT fine-tuning epochs.
            learning_rate: QAT learning rate.
            qat_steps_per_epoch: QAT steps per epoch (0 = whole epochs).
            calibration_method: max, percentile or mse.
            calibration_batches: batches of calibration data.
            percentile: the percentile of calibration method percentile.
            quantization_spec: YAML placement overrides (docs/quantization.md), a local path
                or s3:// URI (empty = none).
            activation_range: activation ranges during QAT: frozen (the calibrated ones) or
                ema (a moving average).
            runtime: engine runtime (tensorrt on the cluster, onnxruntime locally); the Q/DQ
                placement is for it too.
            batch_profile_min: smallest batch the engine accepts.
            batch_profile_opt: batch the engine is tuned for.
            batch_profile_max: largest batch the engine accepts.
            int8_encoding: ONNX Runtime integer weight encoding: auto (exact for the CPU of
                the engine node), u8s8 or u8u8.
            fidelity_samples: images (validation split first, then calibration) each engine
                is checked against its reference on before it is written.
            latency_iterations: timed single-image runs per evaluation.
            eval_max_batches: test batches to evaluate (0 = the whole test split).
            accuracy_gate: the accuracy gate in top-1 points: the largest top-1 drop of an
                INT8 variant vs FP32 (and of QAT INT8 vs the champion) that passes.
            tracking_uri: MLflow tracking URI (empty = MLFLOW_TRACKING_URI or
                sqlite:///mlflow.db).
            mlflow_experiment: MLflow experiment name.
            registered_model: MLflow registered model for the QAT INT8 ONNX.
            s3_prefix: s3:// prefix for the final artifacts (empty = no export).
        """
        checked = check_inputs(
            model_uri=model_uri,
            dataset_uri=dataset_uri,
            s3_prefix=s3_prefix,
            spec=quantization_spec,
        )
        settings(checked, "check inputs", cache=False)
        data = prepare_data(
            dataset_uri=dataset_uri,
            preprocessing=preprocessing,
            batch_size=batch_size,
            limit=limit,
            image_size=image_size,
        ).after(checked)
        settings(data, "prepare data", cache=True, retry=True)
        dataset = data.outputs["dataset"]
        fp32 = prepare_model(dataset=dataset, model_uri=model_uri, pretrain_epochs=pretrain_epochs)
        settings(fp32, "prepare FP32 model", cache=True, retry=True)
        quantized = quantize_calibrate(
            model=fp32.outputs["model"],
            dataset=dataset,
            calibration_method=calibration_method,
            calibration_batches=calibration_batches,
            percentile=percentile,
            activation_range=activation_range,
            spec=quantization_spec,
            runtime=runtime,
        )
        settings(quantized, "quantize + calibrate (PTQ)", cache=True)
        qat = qat_finetune(
            model=quantized.outputs["quantized"],
            dataset=dataset,
            epochs=epochs,
            learning_rate=learning_rate,
            steps_per_epoch=qat_steps_per_epoch,
        )
        settings(qat, "QAT fine-tune", cache=True)

        def branch(variant: str, keras_model: Any, reference: Any = None) -> tuple[Any, ...]:
            onnx = export_onnx(model=keras_model, dataset=dataset)
            settings(onnx, f"{variant}: export ONNX", cache=True)
            engine = build_engine(
                onnx_model=onnx.outputs["onnx_model"],
                runtime=runtime,
                batch_min=batch_profile_min,
                batch_opt=batch_profile_opt,
                batch_max=batch_profile_max,
                encoding=int8_encoding,
                fidelity_samples=fidelity_samples,
                dataset=dataset,
            )
            settings(on_engine_node(engine), f"{variant}: build engine", cache=True)
            extra = {} if reference is None else {"reference": reference}
            evaluated = evaluate(
                engine=engine.outputs["engine"],
                dataset=dataset,
                variant=variant,
                latency_iterations=latency_iterations,
                max_batches=eval_max_batches,
                **extra,
            )
            settings(on_engine_node(evaluated), f"{variant}: evaluate", cache=False)
            return onnx, engine, evaluated

        fp32_onnx, fp32_engine, fp32_eval = branch("fp32", fp32.outputs["model"])
        reference = fp32_eval.outputs["result"]
        ptq_onnx, ptq_engine, ptq_eval = branch(
            "ptq_int8", quantized.outputs["quantized"], reference
        )
        qat_onnx, qat_engine, qat_eval = branch("qat_int8", qat.outputs["finetuned"], reference)

        report = compare(
            fp32_result=fp32_eval.outputs["result"],
            ptq_result=ptq_eval.outputs["result"],
            qat_result=qat_eval.outputs["result"],
            placement=quantized.outputs["placement"],
            dataset=dataset,
            model_uri=model_uri,
            accuracy_gate=accuracy_gate,
            run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        settings(report, "compare + report", cache=True)
        published = publish(
            report=report.outputs["report"],
            fp32_result=fp32_eval.outputs["result"],
            ptq_result=ptq_eval.outputs["result"],
            qat_result=qat_eval.outputs["result"],
            fp32_onnx=fp32_onnx.outputs["onnx_model"],
            ptq_onnx=ptq_onnx.outputs["onnx_model"],
            qat_onnx=qat_onnx.outputs["onnx_model"],
            fp32_engine=fp32_engine.outputs["engine"],
            ptq_engine=ptq_engine.outputs["engine"],
            qat_engine=qat_engine.outputs["engine"],
            placement=quantized.outputs["placement"],
            model_uri=model_uri,
            dataset_uri=dataset_uri,
            preprocessing=preprocessing,
            batch_size=batch_size,
            limit=limit,
            image_size=image_size,
            pretrain_epochs=pretrain_epochs,
            epochs=epochs,
            learning_rate=learning_rate,
            qat_steps_per_epoch=qat_steps_per_epoch,
            calibration_method=calibration_method,
            calibration_batches=calibration_batches,
            percentile=percentile,
            activation_range=activation_range,
            spec=quantization_spec,
            runtime=runtime,
            batch_min=batch_profile_min,
            batch_opt=batch_profile_opt,
            batch_max=batch_profile_max,
            tracking_uri=tracking_uri,
            experiment=mlflow_experiment,
            registered_model=registered_model,
            s3_prefix=s3_prefix,
            run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        settings(published, "publish (MLflow + S3)", cache=False, retry=True)
        return Outputs(
            report=report.outputs["report"],
            publish_record=published.outputs["record"],
            gate_verdict=published.outputs["Output"],
        )

    return qat_int8


def _settings(
    task: PipelineTask,
    display_name: str,
    *,
    cache: bool,
    retry: bool = False,
    env: Mapping[str, str] | None = None,
) -> None:
    """Display name, caching, environment, and retries for steps that can fail transiently."""
    task.set_display_name(display_name)
    for name, value in (env or {}).items():
        task.set_env_variable(name, value)
    task.set_caching_options(enable_caching=cache)
    if retry:
        task.set_retry(num_retries=RETRIES, backoff_duration=RETRY_BACKOFF, backoff_factor=2.0)
