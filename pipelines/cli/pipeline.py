"""``qatflow run`` and ``qatflow compile``: the pipeline, locally or compiled for a cluster.

``register`` adds them (see ``qatflow_pipelines.cli``). Building the parser imports
neither kfp nor TensorFlow; the handlers import the runner and the compiler.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from qatflow_pipelines.cli.parameters import add_param_option, typed_parameters
from qatflow_pipelines.runner.profiles import (
    DEFAULT_PROFILE,
    DEFAULT_RUNNER,
    PROFILES,
    RUNNERS,
    SUMMARIES,
    settings,
)

from qatflow import gate
from qatflow.cluster import GPU_LIMIT, GPU_RESOURCE
from qatflow.errors import PipelineError
from qatflow.params import (
    CALIBRATION_METHODS,
    CLUSTER_RUNTIME,
    DATA,
    ENGINE,
    FINETUNE,
    MODEL,
    QUANTIZE,
    RUNTIMES,
    help_of,
)


def _profiles() -> str:
    """Each profile's parameters and summary, for the epilog of ``qatflow run --help``."""
    lines = ["profiles (their parameters over the pipeline's defaults):"]
    for name in PROFILES:
        text = f"{name:<8} {settings(name)}: {SUMMARIES[name]}"
        lines += textwrap.wrap(text, width=92, initial_indent="  ", subsequent_indent=" " * 11)
    return "\n".join(lines)


_RUN_EPILOG = f"""\
{_profiles()}

Each task runs as a subprocess of this Python with kfp.local (--runner docker: in a container
of its image, as your user); engines run on ONNX Runtime (CPU). A rerun reuses the cached
data, model, quantization, export and engine steps of the same inputs and the same qatflow
source (and image IDs with docker; --no-cache to redo them anyway). Results in --output:
comparison.json, report.html/.md, plots/, publish.json, pipeline.log (KFP's full log) and,
when MLflow is unreachable, mlflow-offline/. S3 credentials come from the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), never from the command line.

exit status:
  0  the run finished and the accuracy gate passed QAT INT8 (or --allow-refused was given)
  2  bad input or a failed step: nothing of the pipeline ran, or the failed task is named
  {gate.EXIT_REFUSED}  the run finished but the accuracy gate refused QAT INT8 (see report.html)

examples:
  qatflow run --output runs/local
  qatflow run --profile smoke --accuracy-gate 2.5 --allow-refused
  qatflow run --profile smoke --output runs/smoke --tracking-uri http://127.0.0.1:5000
  qatflow run --model model.keras --dataset data.npz --epochs 2 --s3-prefix s3://bucket/qat
"""

_COMPILE_EPILOG = """\
The engine build and evaluate tasks request one nvidia.com/gpu, tolerate the nvidia.com/gpu
NoSchedule taint and run the TensorRT image; every other task runs the TensorFlow image.
Image references come from qatflow.images (QATFLOW_TF_IMAGE / QATFLOW_TRT_IMAGE override them).

examples:
  qatflow compile --output pipeline.yaml
  qatflow compile -o pipeline.yaml --gpu-node-selector cloud.google.com/gke-accelerator=nvidia-l4
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``run`` and ``compile`` subcommands."""
    run = subparsers.add_parser(
        "run",
        help="run the whole pipeline locally (kfp.local) and write the comparison report",
        description="Run the QAT INT8 pipeline on this machine: FP32, PTQ INT8 and QAT INT8 "
        "models, their ONNX Runtime engines, the comparison report, MLflow tracking and the "
        "optional S3 export.",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("runs/local"),
        metavar="DIR",
        help="output folder (default: %(default)s)",
    )
    run.add_argument(
        "--profile",
        choices=tuple(PROFILES),
        default=DEFAULT_PROFILE,
        help="preset parameters (default: %(default)s; see below)",
    )
    run.add_argument(
        "--model",
        dest="model_uri",
        metavar="URI",
        help=help_of(MODEL, "model_uri"),
    )
    run.add_argument(
        "--dataset",
        dest="dataset_uri",
        metavar="URI",
        help=help_of(DATA, "dataset_uri"),
    )
    run.add_argument("--preprocessing", help=help_of(DATA, "preprocessing"))
    run.add_argument("--batch-size", type=int, help=f"batch size (default: {DATA.batch_size})")
    run.add_argument("--limit", type=int, help="cap on every split, for quick runs (0 = all)")
    run.add_argument(
        "--pretrain-epochs",
        type=int,
        help="demo model pretraining epochs "
        f"(default profile: {PROFILES[DEFAULT_PROFILE]['pretrain_epochs']})",
    )
    run.add_argument(
        "--epochs",
        type=int,
        help=f"QAT fine-tuning epochs (default profile: {PROFILES[DEFAULT_PROFILE]['epochs']})",
    )
    run.add_argument(
        "--learning-rate",
        type=float,
        help=f"QAT learning rate (default: {FINETUNE.learning_rate})",
    )
    run.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        help=f"PTQ calibration method (default: {QUANTIZE.calibration_method})",
    )
    run.add_argument(
        "--calibration-batches",
        type=int,
        help=f"calibration batches (default: {QUANTIZE.calibration_batches})",
    )
    run.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=ENGINE.runtime,
        help="engine runtime, which the Q/DQ placement is for too; tensorrt needs TensorRT and "
        "a GPU here (default: %(default)s)",
    )
    run.add_argument(
        "--accuracy-gate",
        type=float,
        metavar="POINTS",
        help=f"the accuracy gate in {gate.UNIT}: the largest top-1 drop of an INT8 variant vs "
        "FP32, and of QAT INT8 vs the registry's champion, that passes "
        f"(default: {gate.DEFAULT_POINTS:g})",
    )
    run.add_argument(
        "--allow-refused",
        action="store_true",
        help=f"exit 0 even when the gate refuses QAT INT8 (default: exit {gate.EXIT_REFUSED}), "
        "for exploratory runs",
    )
    run.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlflow.db in the working directory)",
    )
    run.add_argument("--s3-prefix", help="s3://bucket/prefix to export the final artifacts to")
    run.add_argument(
        "--no-cache",
        dest="enable_caching",
        action="store_false",
        help="rerun every step instead of reusing cached results",
    )
    add_param_option(
        run,
        help="any other pipeline parameter (listed by `qatflow submit --help`), repeatable; "
        "converted to the parameter's type, e.g. --param quantization_spec=spec.yaml",
    )
    run.add_argument(
        "--runner",
        choices=RUNNERS,
        default=DEFAULT_RUNNER,
        help="run each task as a subprocess of this Python, or in a container of its image "
        "built here (`make images-tf`) (default: %(default)s)",
    )
    run.set_defaults(func=run_pipeline)

    compile_ = subparsers.add_parser(
        "compile",
        help="compile the pipeline to a KFP v2 YAML package",
        description="Compile the QAT INT8 pipeline for a Kubeflow Pipelines cluster.",
        epilog=_COMPILE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compile_.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("pipeline.yaml"),
        help="YAML file to write (default: %(default)s)",
    )
    compile_.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=CLUSTER_RUNTIME,
        help="engine runtime, which the Q/DQ placement is for too; onnxruntime runs the engine "
        "tasks on CPU without GPU requests (default: %(default)s)",
    )
    compile_.add_argument(
        "--gpu-node-selector",
        action="append",
        default=[],
        type=_label,
        metavar="KEY=VALUE",
        help="nodeSelector label for the GPU tasks, repeatable",
    )
    compile_.add_argument(
        "--no-toleration",
        dest="toleration",
        action="store_false",
        help="do not tolerate the nvidia.com/gpu NoSchedule taint",
    )
    compile_.add_argument(
        "--accelerator-type",
        default=GPU_RESOURCE,
        help="accelerator resource of the GPU tasks (default: %(default)s)",
    )
    compile_.add_argument(
        "--accelerator-limit",
        type=int,
        default=GPU_LIMIT,
        help="accelerators per GPU task (default: %(default)s)",
    )
    compile_.set_defaults(func=compile_package)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--gpu-node-selector {text!r} must look like KEY=VALUE")
    return key.strip(), value.strip()


_RUN_PARAMETERS = (
    "model_uri",
    "dataset_uri",
    "preprocessing",
    "batch_size",
    "limit",
    "pretrain_epochs",
    "epochs",
    "learning_rate",
    "calibration_method",
    "calibration_batches",
    "runtime",
    "accuracy_gate",
    "tracking_uri",
    "s3_prefix",
)


def run_pipeline(args: argparse.Namespace) -> int:
    """Handle ``qatflow run``."""
    from qatflow_pipelines.runner.local_run import run_local

    from qatflow.publish import SUMMARY_FILE, verdict
    from qatflow.report.write import HTML_FILE

    flags = {name: getattr(args, name) for name in _RUN_PARAMETERS}
    out = run_local(
        args.output,
        profile=args.profile,
        runner=args.runner,
        enable_caching=args.enable_caching,
        **flags,
        **_extra_parameters(args.params, flags),
    )
    if verdict(out / SUMMARY_FILE) == gate.REFUSED and not args.allow_refused:
        print(
            f"qatflow run: the accuracy gate refused QAT INT8 (exit {gate.EXIT_REFUSED}; "
            f"--allow-refused exits 0): see {out / HTML_FILE}"
        )
        return gate.EXIT_REFUSED
    return 0


def _extra_parameters(pairs: list[tuple[str, str]], flags: dict[str, object]) -> dict[str, object]:
    """``--param`` values converted to the pipeline's types; refused where a flag says it too."""
    if not pairs:
        return {}
    doubled = sorted(name for name, _ in pairs if name in flags)
    if doubled:
        raise PipelineError(
            f"--param {', '.join(doubled)}: `qatflow run` has a flag for it (see --help)"
        )
    return typed_parameters(pairs)


def compile_package(args: argparse.Namespace) -> int:
    """Handle ``qatflow compile``."""
    from qatflow_pipelines.qat_int8.pipeline import GpuOptions
    from qatflow_pipelines.runner.compile import compile_pipeline

    gpu = GpuOptions(
        accelerator_type=args.accelerator_type,
        accelerator_limit=args.accelerator_limit,
        node_selector=dict(args.gpu_node_selector),
        **({} if args.toleration else {"toleration": None}),
    )
    path = compile_pipeline(args.output, runtime=args.runtime, gpu=gpu)
    print(f"compiled the pipeline to {path}")
    return 0
