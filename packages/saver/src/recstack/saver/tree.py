"""State dicts as JSON plus named tensors, and back, with their Python types intact.

``torch`` state dicts (modules, optimizers, LR schedulers) mix tensors with ints, floats,
tuples, dicts keyed by ints and ``None``. Checkpoints hold no pickles, so a state dict is
split into a JSON tree and a flat ``{name: tensor}`` map (written to safetensors files).
Plain JSON values stay as they are; the rest is tagged with a one-key object:

* ``{"__tensor__": name}``: a tensor (``name`` keys the tensor map);
* ``{"__tuple__": [...]}``, ``{"__dict__": [[key, value], ...]}`` (non-str keys, or a
  str key that looks like a tag), ``{"__float__": "nan" | "inf" | "-inf"}``,
  ``{"__dtype__": "float32"}``, ``{"__device__": "cuda:0"}``;
* ``{"__companion__": name}``: an optimizer slot kept as a companion of a table's rows
  (core's ``PagedTensor.add_companion``). It travels with the table's keys, so the state
  dict leaves it out when loaded: the optimizer takes the table's companion over.

A ``PagedTensor`` that is not a companion is written as its dense rows and comes back as a
plain tensor (which the sparse optimizers' ``load_state_dict`` accepts). Anything else
(a function, an arbitrary object) is refused with the path that holds it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from recstack.core import PagedTensor

__all__ = ["decode_tree", "encode_tree", "tensor_names"]

_DTYPES = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


def encode_tree(value: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(json tree, {tensor name: tensor})`` of ``value``; tensor names start with
    ``prefix`` and follow the path (``"opt/state/0/exp_avg"``).

    Raises:
        TypeError: a value of a type the tree cannot hold, naming its path.
    """
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(value, prefix, tensors)
    return tree, tensors


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"__float__": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, torch.Tensor):
        name = _unique(path, tensors)
        tensors[name] = value.detach()
        return {"__tensor__": name}
    if isinstance(value, PagedTensor):
        if value.companion_of is not None:
            return {"__companion__": value.name}
        name = _unique(path, tensors)
        tensors[name] = value.to_dense()
        return {"__tensor__": name}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, torch.Size):
        return {"__tuple__": list(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        # A one-key dict whose key looks like a tag would read back as that tag.
        plain = all(isinstance(k, str) for k in value) and not (
            len(value) == 1 and _looks_like_tag(next(iter(value)))
        )
        if plain:
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        return {
            "__dict__": [
                [_encode(k, f"{path}/key", tensors), _encode(v, f"{path}/{k}", tensors)]
                for k, v in value.items()
            ]
        }
    raise TypeError(
        f"{path}: a {type(value).__name__} cannot be saved (checkpoints hold tensors and JSON "
        "values: dicts, lists, tuples, str, int, float, bool, None; no pickles)"
    )


def _looks_like_tag(key: str) -> bool:
    return key.startswith("__") and key.endswith("__") and len(key) > 4


def _unique(path: str, tensors: Mapping[str, torch.Tensor]) -> str:
    name, i = path, 1
    while name in tensors:
        name, i = f"{path}#{i}", i + 1
    return name


def decode_tree(tree: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    """The value :func:`encode_tree` encoded; companion slots are left out of their dict.

    Raises:
        ValueError: the tree names a tensor the map lacks, or holds an unknown tag.
    """
    return _decode(tree, tensors, where)


def tensor_names(tree: Any) -> list[str]:
    """The tensor names a tree refers to (its ``{"__tensor__": name}`` tags), in order.

    Args:
        tree: a JSON tree :func:`encode_tree` made (or a manifest holds).
    """
    out: list[str] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, dict):
            if set(node) == {"__tensor__"} and isinstance(node["__tensor__"], str):
                out.append(node["__tensor__"])
            else:
                stack.extend(reversed(list(node.values())))
    return out


_DROP = object()


def _decode(tree: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    if isinstance(tree, list):
        return [v for v in (_decode(x, tensors, where) for x in tree) if v is not _DROP]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        ((tag, arg),) = tree.items()
        if tag == "__tensor__":
            if arg not in tensors:
                raise ValueError(f"{where}: tensor {arg!r} is missing from the checkpoint")
            return tensors[arg]
        if tag == "__companion__":
            return _DROP
        if tag == "__tuple__":
            return tuple(_decode(x, tensors, where) for x in arg)
        if tag == "__dict__":
            out = {}
            for k, v in arg:
                val = _decode(v, tensors, where)
                if val is not _DROP:
                    out[_decode(k, tensors, where)] = val
            return out
        if tag == "__float__":
            return float(arg)
        if tag == "__dtype__":
            if arg not in _DTYPES:
                raise ValueError(f"{where}: unknown dtype {arg!r}")
            return _DTYPES[arg]
        if tag == "__device__":
            return torch.device(arg)
        if _looks_like_tag(tag):
            raise ValueError(f"{where}: unknown tag {tag!r} (written by a newer version?)")
    out = {}
    for k, v in tree.items():
        val = _decode(v, tensors, where)
        if val is not _DROP:
            out[k] = val
    return out
