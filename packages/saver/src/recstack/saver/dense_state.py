"""The dense state of a saved checkpoint (its manifest's ``dense`` entry): the JSON trees
of modules, optimizers and other objects, the files holding their tensors, and each
tensor's recorded dtype and shape; tensors are read on demand, each file once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recstack.saver.dtype_names import DTYPES_BY_NAME, safetensors_name
from recstack.saver.errors import CheckpointError
from recstack.saver.read import CheckedFile, read_checked

__all__ = ["DenseState"]


class DenseState:
    """The dense state of checkpoint ``ckpt``.

    Args:
        ckpt: the checkpoint directory.
        manifest: its manifest.

    Attributes:
        trees: ``{name: {"kind", "tree"}}`` of each saved object.
        files: ``{tensor name: file}`` (relative to ``ckpt``).
        info: ``{tensor name: {"dtype", "shape"}}`` as recorded.
    """

    def __init__(self, ckpt: Path, manifest: dict[str, Any]) -> None:
        dense = manifest["dense"] or {}
        self.ckpt, self.manifest = ckpt, manifest
        self.trees: dict[str, Any] = dense.get("trees", {})
        self.files: dict[str, str] = dense.get("tensors", {})
        self.info: dict[str, Any] = dense.get("info", {})
        self._read: dict[str, dict[str, torch.Tensor]] = {}

    def shape(self, name: str) -> tuple[list[int], torch.dtype | None] | None:
        """``(shape, dtype)`` recorded for tensor ``name`` (``dtype`` ``None`` when
        unknown), or ``None`` when the manifest has no entry for it.

        Args:
            name: a tensor name of a tree.
        """
        info = self.info.get(name)
        if not isinstance(info, dict):
            return None
        return list(info.get("shape", [])), DTYPES_BY_NAME.get(str(info.get("dtype")))

    def checked_files(self, names: set[str]) -> list[tuple[CheckedFile, dict[str, Any]]]:
        """The files holding tensors ``names``, each with the tensors it must hold (for
        :func:`~recstack.saver.read.verify_files`).

        Args:
            names: tensor names of the trees.

        Raises:
            CheckpointError: a tensor has no file.
        """
        by_file: dict[str, dict[str, Any]] = {}
        for name in names:
            rel = self.files.get(name)
            if rel is None:
                raise CheckpointError(f"{self.ckpt}: dense tensor {name!r} has no file")
            info = self.info.get(name, {})
            by_file.setdefault(rel, {})[name] = (
                safetensors_name(info.get("dtype")),
                info.get("shape"),
            )
        return [
            (CheckedFile(self.ckpt, self.manifest, rel), e) for rel, e in sorted(by_file.items())
        ]

    def tensors(self, names: set[str]) -> dict[str, torch.Tensor]:
        """Tensors ``names``, read from files :meth:`checked_files` listed and
        :func:`~recstack.saver.read.verify_files` checked (so without a second CRC pass).

        Args:
            names: tensor names of the trees.
        """
        out = {}
        for name in names:
            rel = self.files[name]
            if rel not in self._read:
                f = CheckedFile(self.ckpt, self.manifest, rel)
                self._read[rel] = read_checked(f, crc=False)
            out[name] = self._read[rel][name]
        return out
