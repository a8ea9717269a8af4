"""``make bench``: every benchmark in one run; numbers and targets in bench/README.md."""

from __future__ import annotations

import sys

from bench import isa_bench, ort_int8_bench, pipeline_bench, toolkit_bench


def main() -> int:
    """Toolkit timings, the runtime and accuracy comparisons, the ORT rewrite study, then the
    INT8-on-every-CPU latency and fidelity tables."""
    print("== toolkit (issue 2 targets)")
    toolkit_bench.run()
    print("\n== FP32 vs PTQ vs QAT INT8 on ONNX Runtime (issue 3 targets)")
    pipeline_bench.main([])
    print("\n== ORT INT8 rewrite variants (docs/ort-int8.md)")
    status = ort_int8_bench.main(["--skip-small-cnn"])
    print("\n== INT8 on every CPU (isa_bench.py, docs/exact-int8.md)")
    return isa_bench.main([]) or status


if __name__ == "__main__":
    sys.exit(main())
