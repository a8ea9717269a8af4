"""FP32 vs PTQ INT8 vs QAT INT8 vs ONNX Runtime's quantize_static, side by side on ORT CPU.

Two parts, each measured in one run:

1. Latency, ResNet50 at 224x224 (``weights=None``: latency does not depend on the weights),
   batch 1, two threads and one: FP32, qatflow INT8 (Q/DQ placed for ONNX Runtime, built with
   ``qatflow.build_engine``; PTQ and QAT give the same graph) and ``quantize_static`` (QDQ,
   per-channel, uint8 activations), then ORT's per-node profile grouped by kernel class
   (``bench.kernel_profile``). Targets: INT8 >= 3.5x faster than FP32 and <= 1.0x the
   latency of quantize_static.
2. Accuracy, the demo model on Fashion-MNIST: FP32, PTQ INT8, QAT INT8 with frozen activation
   ranges (the default) and with EMA ranges, and quantize_static. Target: QAT INT8 top-1
   within 0.2 points of FP32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("QATFLOW_NO_PROGRESS", "1")

import keras
import numpy as np
import onnx

import qatflow
from bench import PLACEMENT_RUNTIME
from bench.kernel_profile import (
    KernelClasses,
    conv_ceiling,
    print_kernel_table,
    profile_kernel_classes,
)
from bench.ort_int8_bench import ort_quantize_static
from qatflow.models import initialize_batchnorm
from qatflow.runtimes import build_engine, load_engine


def _build(
    variants: Mapping[str, Path], workdir: Path, threads: int, rewrite: Mapping[str, bool]
) -> dict[str, Path]:
    return {
        name: build_engine(
            onnx_path,
            workdir / f"{name}.engine.onnx",
            threads=threads,
            int8_rewrite=rewrite.get(name, True),
        )
        for name, onnx_path in variants.items()
    }


def _static_baseline(fp32_onnx: Path, calibration: np.ndarray, workdir: Path) -> Path:
    model = onnx.load(str(fp32_onnx))
    name = model.graph.input[0].name
    feeds = [{name: calibration[i : i + 1]} for i in range(len(calibration))]
    path = workdir / "quantize_static.onnx"
    onnx.save(ort_quantize_static(model, feeds), str(path))
    return path


def interleaved_p50(
    engines: Mapping[str, Any], x: np.ndarray, runs: int, rounds: int = 5
) -> dict[str, float]:
    """Median batch-1 latency (ms) of each engine, measured in alternating blocks.

    Each round runs a short block per engine (after a few warm-up calls), so machine load
    hits every engine alike; whole blocks rather than single calls, because ONNX Runtime's
    threads keep spinning briefly after a call and would slow the next session's call.
    """
    samples: dict[str, list[float]] = {name: [] for name in engines}
    per_block = max(1, runs // rounds)
    for _ in range(rounds):
        for name, engine in engines.items():
            for _ in range(5):
                engine.run(x)
            for _ in range(per_block):
                start = time.perf_counter()
                engine.run(x)
                samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def resnet50_latency(thread_counts: Sequence[int], runs: int) -> dict[int, dict[str, float]]:
    """Part 1: p50 latency of FP32, qatflow INT8 and quantize_static ResNet50 on ORT.

    The engines are built once and timed at each thread count in ``thread_counts``; each
    timing is followed by a per-kernel-class profile of FP32 and INT8.
    """
    rng = np.random.default_rng(0)
    calibration = rng.random((8, 224, 224, 3), dtype=np.float32)
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    initialize_batchnorm(model, calibration)
    qmodel = qatflow.quantize_model(model, runtime=PLACEMENT_RUNTIME)
    qatflow.calibrate(qmodel, calibration, num_batches=2, batch_size=4)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = {
            "fp32": qatflow.export_onnx(model, work / "fp32.onnx"),
            "qatflow_int8": qatflow.export_onnx(qmodel, work / "int8.onnx"),
        }
        variants["quantize_static"] = _static_baseline(variants["fp32"], calibration, work)
        built = _build(variants, work, max(thread_counts), {"quantize_static": False})
        for threads in thread_counts:
            engines = {name: load_engine(path, threads=threads) for name, path in built.items()}
            p50 = interleaved_p50(engines, calibration[:1], runs)
            del engines  # their thread pools must not compete with the profiling sessions
            classes = {
                name: profile_kernel_classes(
                    built[name], calibration[:1], threads=threads, runs=max(20, runs // 4)
                )
                for name in ("fp32", "qatflow_int8")
            }
            results[threads] = _report_latency(threads, runs, p50, classes)
    return results


def _report_latency(
    threads: int, runs: int, p50: Mapping[str, float], classes: Mapping[str, KernelClasses]
) -> dict[str, float]:
    plural = "thread" if threads == 1 else "threads"
    print(
        f"\nResNet50 224x224, batch 1, {threads} {plural}, "
        f"p50 of {runs} calls in alternating blocks"
    )
    for name, value in p50.items():
        print(f"  {name:16s} {value:8.2f} ms")
    speedup = p50["fp32"] / p50["qatflow_int8"]
    versus_static = p50["qatflow_int8"] / p50["quantize_static"]
    print(f"  INT8 speedup vs FP32: {speedup:.2f}x (target >= 3.5x)")
    print(f"  INT8 latency vs quantize_static: {versus_static:.2f}x (target <= 1.0x)")
    print(f"\n  Where the time goes, {threads} {plural} (ORT profile, per-node medians per class)")
    print_kernel_table(classes["fp32"], classes["qatflow_int8"])
    return {
        **{f"{k}_ms": v for k, v in p50.items()},
        "speedup": speedup,
        "vs_static": versus_static,
        "conv_ceiling": conv_ceiling(classes["fp32"], classes["qatflow_int8"])[1],
    }


def demo_accuracy(
    qat_epochs: int, threads: int, runs: int, learning_rate: float
) -> dict[str, float]:
    """Part 2: FP32 / PTQ / QAT (frozen, EMA) / quantize_static on the Fashion-MNIST demo."""
    from qatflow.comparison import compare
    from qatflow.data import load_dataset
    from qatflow.evaluation import evaluate
    from qatflow.training import finetune
    from qatflow.training.pretrain import pretrain

    data = load_dataset("fashion-mnist", batch_size=128)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = keras.models.load_model(pretrain(data, work / "fp32.keras"))
        keras_models: dict[str, keras.Model] = {"fp32": fp32}
        ptq = qatflow.quantize_model(fp32, runtime=PLACEMENT_RUNTIME)
        qatflow.calibrate(ptq, data.calibration, method="percentile", num_batches=4)
        keras_models["ptq_int8"] = ptq
        for mode in ("frozen", "ema"):
            qat = qatflow.quantize_model(fp32, activation_range=mode, runtime=PLACEMENT_RUNTIME)
            qatflow.calibrate(qat, data.calibration, method="percentile", num_batches=4)
            result = finetune(
                qat,
                data.train,
                data.validation,
                epochs=qat_epochs,
                learning_rate=learning_rate,
                warmup_epochs=0.1,
                progress=False,
            )
            keras_models[f"qat_int8_{mode}"] = result.model
        variants = {
            name: qatflow.export_onnx(model, work / f"{name}.onnx")
            for name, model in keras_models.items()
        }
        images = np.concatenate([x for x, _ in data.calibration.take(4)])
        variants["quantize_static"] = _static_baseline(variants["fp32"], images[:64], work)
        built = _build(variants, work, threads, {"quantize_static": False})
        engines = {name: load_engine(path, threads=threads) for name, path in built.items()}
        results = {}
        for name, engine in engines.items():
            reference = results["fp32"].predictions if "fp32" in results else None
            results[name] = evaluate(
                engine,
                data,
                reference_predictions=reference,
                latency_iterations=runs,
                warmup=10,
                threads=threads,
            )
    comparison = compare(results)
    print("\nDemo model on Fashion-MNIST (10,000 test images), ONNX Runtime CPU")
    print(comparison.to_text())
    drop = {name: 100 * (results["fp32"].top1 - r.top1) for name, r in results.items()}
    print(
        f"  QAT (frozen) vs FP32: {-drop['qat_int8_frozen']:+.2f} points, "
        f"QAT (EMA) {-drop['qat_int8_ema']:+.2f}, PTQ {-drop['ptq_int8']:+.2f} "
        "(target: QAT within 0.2 points)"
    )
    return {f"{name}_top1": r.top1 for name, r in results.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Run both parts (or one) and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2, 1],
        help="intra-op thread counts for the latency part (the accuracy part uses the first)",
    )
    parser.add_argument("--runs", type=int, default=200, help="timed calls per model")
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--part", choices=("all", "latency", "accuracy"), default="all")
    args = parser.parse_args(argv)
    if args.part in ("all", "latency"):
        resnet50_latency(args.threads, args.runs)
    if args.part in ("all", "accuracy"):
        demo_accuracy(args.qat_epochs, args.threads[0], args.runs, args.learning_rate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
