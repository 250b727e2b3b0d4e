"""Write the objects.inv inventories the docs link Python, torch, numpy and pyarrow names with.

mkdocstrings turns a name such as ``torch.Tensor`` in a signature or docstring into a
link when an objects.inv inventory lists it. The docs build must work offline (CI reaches
only package registries), so the inventories are committed under
``tools/docs/inventories/`` and ``mkdocs.yml`` loads them from there, with the real
documentation site as each one's base URL. This script (re)writes them:

- ``python.inv`` is Python's own Sphinx inventory, copied from Debian's ``python3.11-doc``
  package (``apt-get install python3.11-doc``), which ships the built HTML docs.
- ``torch.inv``, ``numpy.inv`` and ``pyarrow.inv`` are generated from the table below:
  none of these projects' docs are packaged anywhere this build can reach. Each entry is
  checked against the installed package (the object must exist), and its page follows
  the project's documentation layout. Add a row when the API starts mentioning a new
  name.

Run it from the repository root::

    python tools/docs/inventories.py
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import zlib
from pathlib import Path

OUT = Path(__file__).parent / "inventories"
"""Where the inventories are written (``mkdocs.yml`` reads them from here)."""

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/objects.inv")
"""Python's inventory as Debian's ``python3.11-doc`` package installs it."""

# (object, Sphinx role, page relative to the project's docs root; "$" is the object name)
TORCH = [
    ("torch.Tensor", "class", "tensors.html#$"),
    ("torch.Tensor.to", "method", "generated/torch.Tensor.to.html#$"),
    ("torch.Tensor.pin_memory", "method", "generated/torch.Tensor.pin_memory.html#$"),
    ("torch.Tensor.record_stream", "method", "generated/torch.Tensor.record_stream.html#$"),
    ("torch.device", "class", "tensor_attributes.html#$"),
    ("torch.dtype", "class", "tensor_attributes.html#$"),
    ("torch.float16", "data", "tensor_attributes.html#torch.dtype"),
    ("torch.bfloat16", "data", "tensor_attributes.html#torch.dtype"),
    ("torch.float32", "data", "tensor_attributes.html#torch.dtype"),
    ("torch.float64", "data", "tensor_attributes.html#torch.dtype"),
    ("torch.int32", "data", "tensor_attributes.html#torch.dtype"),
    ("torch.int64", "data", "tensor_attributes.html#torch.dtype"),
    ("torch.uint8", "data", "tensor_attributes.html#torch.dtype"),
    ("torch.Size", "class", "size.html#$"),
    ("torch.Generator", "class", "generated/torch.Generator.html#$"),
    ("torch.compile", "function", "generated/torch.compile.html#$"),
    ("torch.autograd.Function", "class", "autograd.html#$"),
    ("torch.nn.Module", "class", "generated/torch.nn.Module.html#$"),
    ("torch.nn.Parameter", "class", "generated/torch.nn.parameter.Parameter.html"),
    ("torch.nn.Embedding", "class", "generated/torch.nn.Embedding.html#$"),
    ("torch.nn.EmbeddingBag", "class", "generated/torch.nn.EmbeddingBag.html#$"),
    ("torch.nn.Linear", "class", "generated/torch.nn.Linear.html#$"),
    ("torch.optim.Optimizer", "class", "optim.html#$"),
    (
        "torch.optim.lr_scheduler.LRScheduler",
        "class",
        "generated/torch.optim.lr_scheduler.LRScheduler.html#$",
    ),
    ("torch.cuda.Stream", "class", "generated/torch.cuda.Stream.html#$"),
    ("torch.cuda.Event", "class", "generated/torch.cuda.Event.html#$"),
    ("torch.distributed.ProcessGroup", "class", "distributed.html"),
    ("torch.utils.data.IterableDataset", "class", "data.html#$"),
    ("torch.utils.data.DataLoader", "class", "data.html#$"),
]

NUMPY = [
    ("numpy.ndarray", "class", "reference/generated/numpy.ndarray.html#$"),
    ("numpy.dtype", "class", "reference/generated/numpy.dtype.html#$"),
    ("numpy.random.Generator", "class", "reference/random/generator.html#$"),
]

PYARROW = [
    (f"pyarrow.{name}", "class", f"python/generated/pyarrow.{name}.html#$")
    for name in (
        "Array",
        "ChunkedArray",
        "DataType",
        "Field",
        "RecordBatch",
        "RecordBatchReader",
        "Schema",
        "Table",
        "fs.FileSystem",
        "fs.LocalFileSystem",
        "fs.S3FileSystem",
        "parquet.ParquetFile",
    )
] + [
    (f"pyarrow.parquet.{name}", "function", f"python/generated/pyarrow.parquet.{name}.html#$")
    for name in ("read_table", "write_table")
]

PROJECTS = {
    "torch": ("PyTorch", TORCH),
    "numpy": ("NumPy", NUMPY),
    "pyarrow": ("Apache Arrow", PYARROW),
}
"""File stem -> (project name, entries), for the generated inventories."""


def find_object(path: str) -> object:
    """Import ``path`` (``torch.nn.Module``, ``pyarrow.fs.FileSystem``) and return it.

    Args:
        path: A dotted path to a module or an attribute of one.

    Raises:
        LookupError: When no such object exists in the installed package.
    """
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            if not hasattr(obj, name):
                raise LookupError(f"{path}: the installed package has no {name!r}")
            obj = getattr(obj, name)
        return obj
    raise LookupError(f"{path}: cannot import it")


def inventory(project: str, version: str, entries: list[tuple[str, str, str]]) -> bytes:
    """A Sphinx version-2 inventory (the objects.inv format) listing ``entries``.

    Args:
        project: The documented project's name, for the header.
        version: The project's version, for the header.
        entries: ``(object, role, uri)`` rows, ``role`` without the ``py:`` domain.
    """
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    lines = "".join(f"{name} py:{role} 1 {uri} -\n" for name, role, uri in sorted(entries))
    return header.encode() + zlib.compress(lines.encode(), 9)


def main(argv: list[str] | None = None) -> int:
    """Write every inventory; return the exit status.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when omitted).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python-inventory",
        type=Path,
        default=PYTHON_DOCS,
        help="Python's objects.inv to copy (default: Debian's python3.11-doc)",
    )
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    errors = []
    for stem, (project, entries) in PROJECTS.items():
        for name, _, _ in entries:
            try:
                find_object(name)
            except LookupError as error:
                errors.append(str(error))
        version = getattr(importlib.import_module(stem), "__version__", "")
        (OUT / f"{stem}.inv").write_bytes(inventory(project, version, entries))
        print(f"wrote {OUT / f'{stem}.inv'} ({len(entries)} objects)")
    if args.python_inventory.exists():
        shutil.copyfile(args.python_inventory, OUT / "python.inv")
        print(f"copied {args.python_inventory} to {OUT / 'python.inv'}")
    else:
        print(f"{args.python_inventory} not found: kept {OUT / 'python.inv'}", file=sys.stderr)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
