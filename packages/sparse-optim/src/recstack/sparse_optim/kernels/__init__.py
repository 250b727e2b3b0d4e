"""Triton kernels of the sparse optimizers (with torch references in ``rules``)."""
