"""``make bench``: every benchmark in one run; numbers and targets in bench/README.md."""

from __future__ import annotations

import sys

from bench import ort_int8_bench, pipeline_bench, toolkit_bench


def main() -> int:
    """Toolkit timings, then the runtime and accuracy comparisons, then the ORT rewrite study."""
    print("== toolkit (issue 2 targets)")
    toolkit_bench.run()
    print("\n== FP32 vs PTQ vs QAT INT8 on ONNX Runtime (issue 3 targets)")
    pipeline_bench.main([])
    print("\n== ORT INT8 rewrite variants (docs/ort-int8.md)")
    return ort_int8_bench.main(["--skip-small-cnn"])


if __name__ == "__main__":
    sys.exit(main())
