"""Triton kernels of the dense side: each file one kernel family, its launcher and its
torch reference (the autograd glue lives in :mod:`recstack.pipelines.ops`)."""
