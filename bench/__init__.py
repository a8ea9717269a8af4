"""``make bench``: every benchmark in one run; numbers and targets in bench/README.md."""

# Every engine the benchmarks build is an ONNX Runtime one, so they place Q/DQ for it
# (``quantize_model(runtime=...)``), as the local pipeline does.
PLACEMENT_RUNTIME = "onnxruntime"
