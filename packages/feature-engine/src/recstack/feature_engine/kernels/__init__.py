"""Fused Feature Engine kernels: one launch per op type over every feature.

* :mod:`~recstack.feature_engine.kernels.gather`: batch columns into one key-major buffer
  (ids copied, floats bucketized, strings hashed), one launch for every feature.
* :mod:`~recstack.feature_engine.kernels.program`: elementwise op programs (hash, mod,
  bucketize; dense log1p/clip/normalize) over many features at once.
* :mod:`~recstack.feature_engine.kernels.rows`: row-length changes (truncate, pad, fill,
  filter) over a whole buffer, with per-feature parameters.
* :mod:`~recstack.feature_engine.kernels.concat`: many 1-D tensors into one, one launch.
* :mod:`~recstack.feature_engine.kernels.cross`: hashed per-row cartesian products.

Each op has a Triton kernel and a torch reference; ``recstack.core.kernels`` picks one.
"""
