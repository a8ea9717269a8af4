"""``qatflow prepare-data``, ``prepare-model``, ``finetune``, ``build-engine``, ``evaluate``,
``compare``: the pipeline's other steps, one command each, calling the same ``qatflow.steps``
functions as the KFP components.
"""

from __future__ import annotations

import argparse
import re

from qatflow.cli.options import add_custom_objects
from qatflow.params import (
    COMPARE,
    DATA,
    ENGINE,
    EVALUATE,
    FINETUNE,
    MODEL,
    OPTIMIZERS,
    RUNTIMES,
    help_of,
    help_text,
)
from qatflow.runtimes.cpu_int8 import ENCODING_CHOICES

_FLOW = """\
The pipeline's steps by hand (the same functions the KFP components call):
  qatflow prepare-data fashion-mnist --output data.json
  qatflow prepare-model demo --dataset data.json --output fp32.keras
  qatflow quantize fp32.keras --calibration-data data.json --output ptq.keras
  qatflow finetune ptq.keras --dataset data.json --output qat.keras
  qatflow export qat.keras --output qat.onnx        (and fp32.keras -> fp32.onnx)
  qatflow build-engine qat.onnx --output qat.engine.onnx
  qatflow evaluate fp32.engine.onnx --dataset data.json --output fp32.json
  qatflow evaluate qat.engine.onnx --dataset data.json --reference fp32.json --output qat.json
  qatflow compare fp32=fp32.json qat_int8=qat.json --output report/
"""
_DATASET_HELP = "dataset spec (.json) written by `qatflow prepare-data`"
_OUTPUT_HELP = "output {} (local, or an s3:// URI: written locally, then uploaded)"
_VARIANT = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the step subcommands."""
    _register_data(subparsers)
    _register_training(subparsers)
    _register_engines(subparsers)


def _parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=_FLOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _register_data(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    data = _parser(
        subparsers,
        "prepare-data",
        "load a dataset once, check it (every image of every split finite, labels in range) "
        "and write its spec",
    )
    data.add_argument("dataset", metavar="DATASET", help=help_text(DATA, "dataset_uri"))
    data.add_argument("--output", "-o", required=True, help=_OUTPUT_HELP.format("spec (.json)"))
    data.add_argument(
        "--preprocessing", default=DATA.preprocessing, help=help_of(DATA, "preprocessing")
    )
    data.add_argument(
        "--batch-size", type=int, default=DATA.batch_size, help=help_of(DATA, "batch_size")
    )
    data.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=DATA.image_size,
        help=help_of(DATA, "image_size"),
    )
    data.add_argument("--channels", type=int, help="convert images to this many channels")
    data.add_argument(
        "--calibration-size",
        type=int,
        default=DATA.calibration_size,
        help=help_of(DATA, "calibration_size"),
    )
    data.add_argument("--limit", type=int, default=DATA.limit, help=help_of(DATA, "limit"))
    data.add_argument("--seed", type=int, default=DATA.seed, help=help_of(DATA, "seed"))
    data.set_defaults(func=run_prepare_data)

    model = _parser(
        subparsers,
        "prepare-model",
        "write the FP32 model as .keras: loaded, or the demo model trained (cached)",
    )
    model.add_argument("model", metavar="MODEL", help=help_text(MODEL, "model_uri"))
    model.add_argument("--dataset", required=True, help=_DATASET_HELP)
    model.add_argument("--output", "-o", required=True, help=_OUTPUT_HELP.format(".keras file"))
    model.add_argument("--weights", help="weights file for a keras.applications name")
    model.add_argument(
        "--pretrain-epochs",
        type=int,
        default=MODEL.pretrain_epochs,
        help=help_of(MODEL, "pretrain_epochs"),
    )
    add_overwrite(model)
    add_custom_objects(model)
    model.set_defaults(func=run_prepare_model)


def _register_training(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    finetune = _parser(
        subparsers,
        "finetune",
        "quantization-aware fine-tuning of a calibrated model from `qatflow quantize`",
    )
    finetune.add_argument("model", metavar="MODEL", help="quantized, calibrated .keras file")
    finetune.add_argument("--dataset", required=True, help=_DATASET_HELP)
    finetune.add_argument("--output", "-o", required=True, help=_OUTPUT_HELP.format(".keras file"))
    finetune.add_argument(
        "--epochs", type=int, default=FINETUNE.epochs, help=help_of(FINETUNE, "epochs")
    )
    finetune.add_argument(
        "--learning-rate",
        type=float,
        default=FINETUNE.learning_rate,
        help=help_of(FINETUNE, "learning_rate"),
    )
    finetune.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=FINETUNE.optimizer,
        help=help_of(FINETUNE, "optimizer"),
    )
    finetune.add_argument(
        "--checkpoint-dir",
        help="checkpoint after every epoch and resume from here after an interruption (only "
        "a checkpoint of the same model, data and settings is resumed)",
    )
    finetune.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="discard the checkpoint in --checkpoint-dir and start over",
    )
    finetune.add_argument(
        "--early-stopping-patience",
        type=int,
        help="stop after this many epochs without a better validation accuracy",
    )
    finetune.add_argument(
        "--steps-per-epoch",
        type=int,
        default=FINETUNE.steps_per_epoch,
        help=help_of(FINETUNE, "steps_per_epoch"),
    )
    add_overwrite(finetune)
    add_custom_objects(finetune)
    finetune.set_defaults(func=run_finetune)


def _register_engines(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    engine = _parser(
        subparsers,
        "build-engine",
        "build an inference engine from ONNX: ONNX Runtime on CPU or TensorRT on a GPU",
    )
    engine.add_argument("onnx", metavar="MODEL.onnx")
    engine.add_argument("--output", "-o", required=True, help=_OUTPUT_HELP.format("engine file"))
    engine.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=ENGINE.runtime,
        help=help_of(ENGINE, "runtime"),
    )
    engine.add_argument(
        "--batch-profile",
        type=int,
        nargs=3,
        metavar=("MIN", "OPT", "MAX"),
        default=ENGINE.batch_profile,
        help=help_of(ENGINE, "batch_profile"),
    )
    engine.add_argument(
        "--dataset",
        help="check the engine on this dataset before it is written: its validation split, "
        "then its calibration split (without it, synthetic inputs check the integer kernels "
        "only): " + _DATASET_HELP,
    )
    engine.add_argument(
        "--fidelity-samples",
        type=int,
        default=ENGINE.fidelity_samples,
        metavar="N",
        help=help_of(ENGINE, "fidelity_samples"),
    )
    engine.add_argument(
        "--encoding",
        choices=ENCODING_CHOICES,
        default=ENGINE.encoding,
        help="ONNX Runtime integer weight encoding: auto picks u8s8 where this CPU's kernels "
        "compute it exactly (VNNI/AMX), else u8u8, which keeps int8 weights only where the "
        "activations are 7-bit ReLU outputs (default: %(default)s)",
    )
    add_overwrite(engine)
    engine.set_defaults(func=run_build_engine)

    evaluate = _parser(
        subparsers,
        "evaluate",
        "accuracy, latency, throughput and size of an engine (or .keras/.onnx model)",
    )
    evaluate.add_argument("engine", metavar="ENGINE")
    evaluate.add_argument("--dataset", required=True, help=_DATASET_HELP)
    evaluate.add_argument(
        "--output", "-o", required=True, help=_OUTPUT_HELP.format("result (.json)")
    )
    evaluate.add_argument("--reference", help="the FP32 result (.json), for top-1 agreement")
    for name in ("latency_iterations", "warmup", "throughput_batch", "max_batches"):
        evaluate.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=getattr(EVALUATE, name),
            help=help_of(EVALUATE, name),
        )
    evaluate.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    evaluate.set_defaults(func=run_evaluate)

    compare = _parser(
        subparsers,
        "compare",
        "tabulate evaluation results side by side and write the report",
    )
    compare.add_argument(
        "results",
        metavar="VARIANT=RESULT.json",
        type=_variant_result,
        nargs="+",
        help="one per variant; the baseline must be named fp32",
    )
    compare.add_argument("--output", "-o", required=True, help="report folder")
    compare.add_argument("--title", default=COMPARE.title, help=help_of(COMPARE, "title"))
    compare.add_argument("--placement", help="placement summary (.md) to add to the report")
    compare.add_argument(
        "--accuracy-gate",
        type=float,
        default=COMPARE.accuracy_gate,
        metavar="POINTS",
        help=help_of(COMPARE, "accuracy_gate"),
    )
    compare.add_argument(
        "--dataset", help=f"{_DATASET_HELP}, named in the report's provenance header"
    )
    compare.set_defaults(func=run_compare)


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """Add ``--overwrite`` (allow the output to replace the input)."""
    parser.add_argument(
        "--overwrite", action="store_true", help="allow --output to be the input file"
    )


def run_prepare_data(args: argparse.Namespace) -> int:
    """Load and check the dataset, write its spec."""
    from qatflow import steps

    prepared = steps.prepare_data(
        args.dataset,
        args.output,
        preprocessing=args.preprocessing,
        batch_size=args.batch_size,
        image_size=tuple(args.image_size) if args.image_size else None,
        channels=args.channels,
        calibration_size=args.calibration_size,
        limit=args.limit,
        seed=args.seed,
    )
    print(f"wrote {prepared.spec}")
    return 0


def run_prepare_model(args: argparse.Namespace) -> int:
    """Load (or train) the FP32 model and save it as .keras."""
    from qatflow import steps

    prepared = steps.prepare_model(
        args.model,
        args.dataset,
        args.output,
        weights=args.weights,
        pretrain_epochs=args.pretrain_epochs,
        overwrite=args.overwrite,
    )
    print(f"wrote {prepared.model}")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    """QAT fine-tuning; the history goes beside the output."""
    from qatflow import steps

    tuned = steps.finetune(
        args.model,
        args.dataset,
        args.output,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        early_stopping_patience=args.early_stopping_patience,
        steps_per_epoch=args.steps_per_epoch,
        overwrite=args.overwrite,
    )
    print(f"wrote {tuned.model} (history: {tuned.history_file})")
    return 0


def run_build_engine(args: argparse.Namespace) -> int:
    """Build the engine."""
    from qatflow import steps

    built = steps.build_engine(
        args.onnx,
        args.output,
        runtime=args.runtime,
        batch_profile=tuple(args.batch_profile),
        dataset_spec=args.dataset,
        encoding=args.encoding,
        fidelity_samples=args.fidelity_samples,
        overwrite=args.overwrite,
    )
    print(f"wrote {built.engine}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate and print the headline numbers."""
    from qatflow import steps

    evaluated = steps.evaluate(
        args.engine,
        args.dataset,
        args.output,
        reference_path=args.reference,
        latency_iterations=args.latency_iterations,
        warmup=args.warmup,
        throughput_batch=args.throughput_batch,
        threads=args.threads,
        max_batches=args.max_batches,
    )
    result = evaluated.evaluation
    agreement = "" if result.agreement is None else f", agreement {100 * result.agreement:.2f} %"
    print(
        f"top-1 {100 * result.top1:.2f} % on {result.num_samples} images{agreement}; "
        f"latency p50 {result.latency.p50_ms:.2f} ms, p99 {result.latency.p99_ms:.2f} ms "
        f"(batch 1, {result.runtime}); throughput "
        f"{result.throughput.images_per_second:.0f} images/s"
    )
    print(f"wrote {evaluated.result}")
    return 0


def _variant_result(text: str) -> tuple[str, str]:
    match = _VARIANT.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected VARIANT=RESULT.json, got {text!r}")
    return match[1], match[2]


def run_compare(args: argparse.Namespace) -> int:
    """Compare the results and print the table."""
    from qatflow import steps
    from qatflow.errors import QatflowError

    results: dict[str, str] = {}
    for variant, path in args.results:
        if variant in results:
            raise QatflowError(f"variant {variant!r} is given twice")
        results[variant] = path
    compared = steps.compare(
        results,
        args.output,
        title=args.title,
        placement_summary=args.placement,
        accuracy_gate=args.accuracy_gate,
        dataset_spec=args.dataset,
    )
    print(compared.comparison.to_text())
    print(f"\nwrote {compared.comparison_json} and the report beside it")
    return 0
