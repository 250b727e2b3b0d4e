"""recstack.saver: Saver: safetensors checkpoints, resharding and incremental deltas.

Package skeleton: the public API lands with its own issue; see docs/packages/saver.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
