"""recstack.pipelines: the trainer, multi-stage/multi-task/online pipelines, the CLI.

Package skeleton: the public API lands with its own issue; see docs/packages/pipelines.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
