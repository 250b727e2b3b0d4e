"""recstack.feature_engine: declarative feature transforms run as a few fused kernels.

Package skeleton: the public API lands with issue 4; see docs/packages/feature-engine.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
