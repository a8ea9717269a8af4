"""Report plots as PNG bytes (matplotlib Agg, no pyplot state)."""

from __future__ import annotations

import io
from collections.abc import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qatflow import gate
from qatflow.comparison import Comparison
from qatflow.evaluation import EvaluationResult

MAX_CLASS_BARS = 40
_SHORT_LABEL = 3  # tick labels up to this length stay horizontal
_DPI = 120
_LOG_SPREAD = 20.0


def variant_colors(variants: list[str]) -> dict[str, str]:
    """One fixed colour per variant, the same in every plot."""
    palette = [f"C{i}" for i in range(10)]
    return {name: palette[i % len(palette)] for i, name in enumerate(variants)}


def accuracy_vs_latency(comparison: Comparison) -> bytes:
    """``accuracy_vs_latency_figure`` as PNG bytes."""
    return _png(accuracy_vs_latency_figure(comparison))


def accuracy_vs_latency_figure(comparison: Comparison) -> Figure:
    """Scatter of top-1 accuracy against batch-1 p50 latency, one point per variant, over the
    accuracy gate's band: the variants inside it pass."""
    colors = variant_colors(comparison.variants)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for index, row in enumerate(comparison.rows):
        tail = max(row.latency_ms_p99 - row.latency_ms_p50, 0.0)
        ax.errorbar(
            row.latency_ms_p50,
            100 * row.top1,
            xerr=[[0.0], [tail]],
            fmt="o",
            markersize=9,
            capsize=4,
            color=colors[row.variant],
            label=f"{row.variant} ({row.runtime})",
        )
        ax.annotate(
            row.variant,
            (row.latency_ms_p50, 100 * row.top1),
            textcoords="offset points",
            # Alternate above and below so variants with equal accuracy stay readable.
            xytext=(8, 8 if index % 2 == 0 else -14),
            fontsize=9,
        )
    base_pct = gate.points(comparison.row(comparison.baseline).top1)
    ax.axhline(
        base_pct,
        color="grey",
        linestyle="--",
        linewidth=0.8,
        label=f"{comparison.baseline} top-1",
    )
    ax.axhspan(
        max(base_pct - comparison.gate_points, 0.0),
        base_pct,
        color="tab:green",
        alpha=0.12,
        label=f"accuracy gate: within {comparison.gate_points:g} {gate.UNIT}",
    )
    latencies = [row.latency_ms_p99 for row in comparison.rows]
    latencies += [row.latency_ms_p50 for row in comparison.rows]
    if max(latencies) / max(min(latencies), 1e-9) > _LOG_SPREAD:
        ax.set_xscale("log")
    ax.margins(x=0.25, y=0.3)
    ax.set_xlabel("batch-1 latency (ms): dot = p50, whisker = p99")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy vs latency (up and left is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def per_class_change(
    comparison: Comparison, results: Mapping[str, EvaluationResult]
) -> bytes | None:
    """``per_class_change_figure`` as PNG bytes, or ``None``."""
    fig = per_class_change_figure(comparison, results)
    return None if fig is None else _png(fig)


def per_class_change_figure(
    comparison: Comparison, results: Mapping[str, EvaluationResult]
) -> Figure | None:
    """Bars of per-class top-1 change vs the baseline, one panel per other variant.

    Bars are labelled with the dataset's class names (horizontal when short); an unchanged
    class is marked with a dot on the zero line, so it does not look missing. With more than
    ``MAX_CLASS_BARS`` classes only the largest changes are shown, worst first. Returns
    ``None`` when there is no variant besides the baseline.
    """
    others = [name for name in comparison.variants if name != comparison.baseline]
    if not others:
        return None
    base = results[comparison.baseline]
    names = base.class_names
    fig = Figure(
        figsize=(max(7.0, 0.28 * min(len(names), MAX_CLASS_BARS) + 2), 2.8 * len(others) + 0.6),
        layout="constrained",
    )
    axes = fig.subplots(len(others), 1, squeeze=False, sharey=True)[:, 0]
    for ax, name in zip(axes, others, strict=True):
        deltas = [
            (label, 100 * (new - old))
            for label, new, old in zip(
                names,
                results[name].metrics.per_class_accuracy,
                base.metrics.per_class_accuracy,
                strict=True,
            )
            if new is not None and old is not None
        ]
        title = f"{name} vs {comparison.baseline}"
        if len(deltas) > MAX_CLASS_BARS:
            largest = sorted(deltas, key=lambda item: -abs(item[1]))[:MAX_CLASS_BARS]
            deltas = sorted(largest, key=lambda item: item[1])
            title += f" ({MAX_CLASS_BARS} largest changes of {len(names)} classes)"
        labels = [label for label, _ in deltas]
        values = [value for _, value in deltas]
        colors = ["tab:red" if v < 0 else "tab:green" for v in values]
        ax.bar(range(len(values)), values, color=colors)
        ax.axhline(0, color="black", linewidth=0.8)
        unchanged = [index for index, value in enumerate(values) if value == 0]
        ax.plot(unchanged, [0.0] * len(unchanged), "o", color="grey", markersize=4)
        short = all(len(label) <= _SHORT_LABEL for label in labels)
        rotation, align = (0, "center") if short else (45, "right")
        ax.set_xticks(range(len(values)), labels, rotation=rotation, ha=align, fontsize=8)
        ax.set_xlabel("class")
        ax.set_ylabel(f"change ({gate.UNIT})")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Per-class top-1 accuracy change")
    return fig


def latency_distribution(comparison: Comparison, results: Mapping[str, EvaluationResult]) -> bytes:
    """Box plot of the raw batch-1 latency samples of every variant."""
    variants = comparison.variants
    colors = variant_colors(variants)
    samples = [results[name].latency.samples_ms for name in variants]
    fig = Figure(figsize=(7, 1.0 + 0.7 * len(variants)), layout="constrained")
    ax = fig.add_subplot()
    boxes = ax.boxplot(
        samples,
        orientation="horizontal",
        tick_labels=variants,
        patch_artist=True,
        whis=(1, 99),
        flierprops={"markersize": 3, "alpha": 0.5},
        medianprops={"color": "black"},
    )
    for patch, name in zip(boxes["boxes"], variants, strict=True):
        patch.set_facecolor(colors[name])
        patch.set_alpha(0.6)
    low = min(min(s) for s in samples)
    high = max(max(s) for s in samples)
    if high / max(low, 1e-9) > _LOG_SPREAD:
        ax.set_xscale("log")
    ax.invert_yaxis()
    counts = sorted({len(s) for s in samples})
    ax.set_xlabel(
        "batch-1 latency (ms): box = quartiles, whiskers = p1-p99, "
        f"{'/'.join(map(str, counts))} samples"
    )
    ax.set_title("Latency distribution")
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


def _png(fig: Figure) -> bytes:
    """Render with the Agg canvas (no pyplot, no global backend switch)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()
