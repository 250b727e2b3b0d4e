"""Embedding Engine kernels: the GPU hash table and the embedding lookups built on it.

Each op has a Triton kernel and a torch reference; ``recstack.core.kernels`` picks one.
"""
