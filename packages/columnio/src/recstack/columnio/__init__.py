"""recstack.columnio: ColumnIO: columnar (Parquet/ORC/Arrow) reading straight into device batches.

Package skeleton: the public API lands with issue 3; see docs/packages/columnio.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
