"""``qatflow quantize``, ``export`` and ``validate``: the toolkit commands."""

from __future__ import annotations

import argparse
import sys

from qatflow.cli.options import add_custom_objects
from qatflow.cli.steps import add_overwrite
from qatflow.params import (
    ACTIVATION_RANGES,
    CALIBRATION_METHODS,
    DATA,
    EXPORT,
    QUANTIZE,
    QUANTIZE_MODES,
    RUNTIMES,
    help_of,
    help_text,
)

_QUANTIZE_EPILOG = """\
MODEL is a .keras/.h5 file, a SavedModel folder, an s3:// URI, or a keras.applications name
(resnet50, mobilenet_v2, ...; built with random weights unless --weights names a weights file).
--output may be an s3:// URI: the files are written locally, then uploaded.

--calibration-data takes a dataset spec written by the pipeline (.json), an array of
preprocessed images (.npy), or a dataset URI (fashion-mnist, an image folder, TFRecords, .npz;
local or s3://) loaded with --preprocessing. Without it the activation ranges stay unset and
`qatflow export` refuses the model until it is calibrated.

--spec is a YAML file of placement overrides:
  layers:
    - name: conv1_conv            # by layer name
      quantize_weight: false
    - class: Add                  # by Keras class
      quantization_index: all     # a list of input indices, 'any' or 'all'
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the toolkit subcommands."""
    quantize = subparsers.add_parser(
        "quantize",
        help="insert TensorRT-style Q/DQ into a Keras model and calibrate it (PTQ)",
        description="Quantize MODEL with Q/DQ where TensorRT wants them, calibrate the "
        "activation ranges, save the result as .keras and print the placement summary.",
        epilog=_QUANTIZE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    quantize.add_argument("model", metavar="MODEL", help="model file, URI or application name")
    quantize.add_argument("--output", "-o", required=True, help="output .keras file or s3:// URI")
    quantize.add_argument(
        "--weights", help="weights file (.weights.h5, local or s3://) for an application name"
    )
    quantize.add_argument(
        "--mode",
        choices=QUANTIZE_MODES,
        default=QUANTIZE.mode,
        help="full: defaults + architecture cases + spec; partial: only what the spec names "
        "(default: %(default)s)",
    )
    quantize.add_argument("--spec", help="YAML placement overrides (see below)")
    quantize.add_argument("--calibration-data", help="calibration data (see below)")
    quantize.add_argument(
        "--preprocessing",
        default=DATA.preprocessing,
        help="preprocessing for a dataset URI: scale01, tf, caffe, torch, raw "
        "(default: %(default)s)",
    )
    quantize.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default=QUANTIZE.calibration_method,
        help="how activation ranges are chosen from the data (default: %(default)s)",
    )
    quantize.add_argument(
        "--calibration-batches",
        type=int,
        default=QUANTIZE.calibration_batches,
        help="batches to calibrate on, >= 1 (default: %(default)s)",
    )
    quantize.add_argument(
        "--percentile",
        type=float,
        default=QUANTIZE.percentile,
        help=help_of(QUANTIZE, "percentile"),
    )
    quantize.add_argument(
        "--activation-range",
        choices=ACTIVATION_RANGES,
        default=QUANTIZE.activation_range,
        help="how activation ranges evolve in later QAT: keep the calibrated ones (frozen) or "
        "follow a moving average (default: %(default)s)",
    )
    quantize.add_argument(
        "--fold-batch-norm",
        action=argparse.BooleanOptionalAction,
        default=QUANTIZE.fold_batch_norm,
        help=help_text(QUANTIZE, "fold_batch_norm") + "; --no-fold-batch-norm leaves them for "
        "the runtime to fold after quantization, which rounds (default: %(default)s)",
    )
    quantize.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=QUANTIZE.runtime,
        help=help_of(QUANTIZE, "runtime"),
    )
    quantize.add_argument(
        "--strict", action="store_true", help="fail on layer classes qatflow does not know"
    )
    add_overwrite(quantize)
    add_custom_objects(quantize)
    quantize.set_defaults(func=run_quantize)

    export = subparsers.add_parser(
        "export",
        help="export a Keras model (FP32 or quantized) to ONNX with Q/DQ kept",
        description="Export MODEL to ONNX with tf2onnx: Q/DQ pairs stay where they were "
        "placed, the batch dimension is dynamic, and the graph is checked against TensorRT's "
        "rules before anything is written.",
    )
    export.add_argument("model", metavar="MODEL", help=".keras file (or any MODEL as for quantize)")
    export.add_argument("--output", "-o", required=True, help="output .onnx file or s3:// URI")
    export.add_argument("--opset", type=int, default=EXPORT.opset, help=help_of(EXPORT, "opset"))
    export.add_argument(
        "--dataset",
        help="dataset spec (.json) written by `qatflow prepare-data`: the ONNX is compared "
        "with the Keras model on its calibration split (default: synthetic inputs)",
    )
    add_overwrite(export)
    add_custom_objects(export)
    export.set_defaults(func=run_export)

    validate = subparsers.add_parser(
        "validate",
        help="check an ONNX graph against TensorRT's Q/DQ import rules",
        description="Check zero-points (int8, 0), scales (positive, finite), per-channel axes, "
        "Q/DQ on both inputs of every INT8 Conv/MatMul/Gemm, and no Q/DQ on outputs. Exits 1 "
        "when the graph breaks a rule. The ONNX checker runs first (full check with shape "
        "inference): a node input that nothing produces is an error.",
    )
    validate.add_argument("onnx", metavar="MODEL.onnx")
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.set_defaults(func=run_validate)


def run_quantize(args: argparse.Namespace) -> int:
    """Quantize (and calibrate) a model, then print the placement summary."""
    from qatflow import steps

    outputs = steps.quantize(
        args.model,
        args.output,
        calibration_data=args.calibration_data,
        preprocessing=args.preprocessing,
        mode=args.mode,
        spec_path=args.spec,
        calibration_method=args.calibration_method,
        calibration_batches_count=args.calibration_batches,
        percentile=args.percentile,
        activation_range=args.activation_range,
        fold_batch_norm=args.fold_batch_norm,
        runtime=args.runtime,
        strict=args.strict,
        weights=args.weights,
        overwrite=args.overwrite,
    )
    print(outputs.summary.to_text())
    print(f"\nwrote {outputs.model}")
    print(f"placement summary: {outputs.placement_markdown}")
    if outputs.calibration is None:
        print("not calibrated: pass --calibration-data before exporting", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Export to ONNX and print the validation report."""
    from qatflow import steps
    from qatflow.onnx.parity import export_check_line

    exported = steps.export(
        args.model,
        args.output,
        opset=args.opset,
        dataset_spec=args.dataset,
        overwrite=args.overwrite,
    )
    print(exported.report)
    print(export_check_line(exported.check))
    print(f"wrote {exported.onnx}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    """Validate an ONNX file; exit 1 on rule violations."""
    import json

    from qatflow.onnx.validate import validate_onnx

    report = validate_onnx(args.onnx)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.ok else 1
