"""The ONNX layer, one concern per module.

* ``export``: Keras (FP32 or quantized) to ONNX with tf2onnx, Q/DQ kept where placed.
* ``trt_layout``: post-export rewrites that put Q/DQ where TensorRT's parser wants them.
* ``validate``: TensorRT's import rules, checked on a graph.
* ``graph``: graph indexing, layout evaluation, the one constant quantizer.
* ``reference``: the one reference runner (a QDQ model as float math on ONNX Runtime).
* ``ort_int8``: the rewrite that makes TensorRT-style INT8 graphs run in ORT's integer kernels.
* ``encoding``: the integer weight encodings (U8S8 as exported, U8U8 for CPUs without VNNI).

Modules import ``onnx`` itself absolutely, so this package never shadows it.
"""
