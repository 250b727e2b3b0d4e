"""Fused Feature Engine kernels: one launch per op type over every feature.

One op a module, each with its Triton kernel(s), its launcher and its torch reference:

* :mod:`~recstack.feature_engine.kernels.gather`: batch columns into one key-major buffer
  (ids copied, floats bucketized, strings hashed), one launch for every feature.
* :mod:`~recstack.feature_engine.kernels.sparse_program`: elementwise id programs (hash,
  mod, bucketize) over many features at once.
* :mod:`~recstack.feature_engine.kernels.dense_program`: dense float programs (log1p, clip,
  normalize, fill NaN) over many features, written transposed as the model's input.
* :mod:`~recstack.feature_engine.kernels.bucketize_float`: floats bucketized per feature
  against each feature's own boundaries.
* :mod:`~recstack.feature_engine.kernels.reshape_rows`: row-length changes (truncate, pad,
  fill) over a whole buffer, with per-feature parameters.
* :mod:`~recstack.feature_engine.kernels.filter_rows`: listed ids dropped or kept per
  feature over a whole buffer.
* :mod:`~recstack.feature_engine.kernels.cross`: hashed per-row cartesian products.
* :mod:`~recstack.feature_engine.kernels.concat`: many 1-D tensors into one, one launch.

What several ops share: :mod:`~recstack.feature_engine.kernels.program_tables` (op-slot
tables and per-feature value slices), :mod:`~recstack.feature_engine.kernels.row_buffer`
(the key-major jagged buffer on the host), :mod:`~recstack.feature_engine.kernels.host`
(argument checks, the validation cache) and :mod:`~recstack.feature_engine.kernels.device`
(``@triton.jit`` helpers).

Each op has a Triton kernel and a torch reference; ``recstack.core.kernels`` picks one.
"""
