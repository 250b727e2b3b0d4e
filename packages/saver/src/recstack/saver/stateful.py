"""What a checkpoint saves of each object it is given, and under which names.

``Checkpointer.save(step, model=..., opt=..., reader=PerRank(reader), extras={...})``
sorts every named object into:

* **tables**: each core ``KeyedState`` found, by a dotted name: the object itself when it
  is one (``"name"``), the values of a dict of them (``"name.key"``), and the tables of
  every ``HasKeyedStates`` (an embedding collection), also inside a ``torch.nn.Module``
  (``"model.sparse.ec.item"`` for table ``item`` of submodule ``sparse.ec``);
* **dense**: objects with ``state_dict()``/``load_state_dict()`` (modules, optimizers,
  schedulers) and plain dicts of JSON values; written once (by rank 0) and loaded on
  every rank;
* **per rank**: objects wrapped in :class:`PerRank` (a data reader's position), written
  by every rank and loaded by the rank of the same index.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from recstack.core import HasKeyedStates, KeyedState

__all__ = ["PerRank", "Sorted", "declared_dim", "sort_stateful"]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]*$")


class PerRank:
    """Mark an object whose state differs between ranks (a data reader's position): each
    rank saves its own, and on load rank ``r`` gets what rank ``r`` saved.

    Args:
        obj: an object with ``state_dict()``/``load_state_dict()``, or a dict.
    """

    def __init__(self, obj: Any) -> None:
        if not (_is_stateful(obj) or isinstance(obj, dict)):
            raise TypeError(
                f"PerRank: expected an object with state_dict()/load_state_dict() or a dict, "
                f"got {type(obj).__name__}"
            )
        self.obj = obj


@dataclass
class Sorted:
    """The objects of one save or load call, by kind."""

    tables: dict[str, KeyedState] = field(default_factory=dict)
    dense: dict[str, Any] = field(default_factory=dict)
    per_rank: dict[str, Any] = field(default_factory=dict)


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def _add_table(out: Sorted, name: str, state: object) -> None:
    if not isinstance(state, KeyedState):
        raise TypeError(f"{name}: expected a KeyedState, got {type(state).__name__}")
    if name in out.tables:
        raise ValueError(f"two tables are named {name!r}")
    out.tables[name] = state


def _add_tables_of(out: Sorted, prefix: str, owner: HasKeyedStates) -> None:
    states = owner.keyed_states()
    if not isinstance(states, Mapping):
        raise TypeError(f"{prefix}: keyed_states() must return a dict of KeyedStates")
    for key, state in states.items():
        _add_table(out, f"{prefix}.{key}", state)


def sort_stateful(stateful: Mapping[str, Any]) -> Sorted:
    """Sort named objects into tables, dense and per-rank state (see the module docs).

    Raises:
        ValueError: a name that is empty or holds characters other than letters, digits,
            ``_ . + -``; two tables with one name.
        TypeError: an object that is none of the kinds above.
    """
    out = Sorted()
    for name, obj in stateful.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"checkpoint names are letters, digits and _ . + - (not starting with . + -); "
                f"got {name!r}"
            )
        if isinstance(obj, PerRank):
            out.per_rank[name] = obj.obj
            continue
        if isinstance(obj, KeyedState):
            _add_table(out, name, obj)
            continue
        if isinstance(obj, HasKeyedStates) and not isinstance(obj, nn.Module):
            _add_tables_of(out, name, obj)
            if _is_stateful(obj):
                out.dense[name] = obj
            continue
        if isinstance(obj, nn.Module):
            for path, module in obj.named_modules():
                if isinstance(module, HasKeyedStates):
                    _add_tables_of(out, f"{name}.{path}" if path else name, module)
            out.dense[name] = obj
            continue
        if (
            isinstance(obj, Mapping)
            and obj
            and all(isinstance(v, KeyedState) for v in obj.values())
        ):
            for key, state in obj.items():
                _add_table(out, f"{name}.{key}", state)
            continue
        if _is_stateful(obj) or isinstance(obj, dict):
            out.dense[name] = obj
            continue
        raise TypeError(
            f"{name}: cannot checkpoint a {type(obj).__name__}: pass a KeyedState, a dict of "
            "them, an object with keyed_states() or state_dict()/load_state_dict() (a "
            "module, an optimizer), a dict of JSON values, or PerRank(obj)"
        )
    return out


def declared_dim(meta: object) -> int | None:
    """The row width a keyed state's metadata declares: its ``"dim"``, or the shape of its
    ``"values"`` slot; ``None`` when it declares neither."""
    if not isinstance(meta, Mapping):
        return None
    dim = meta.get("dim")
    if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0:
        return dim
    slots = meta.get("slots")
    info = slots.get("values") if isinstance(slots, Mapping) else None
    shape = info.get("shape") if isinstance(info, Mapping) else None
    if isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int):
        return shape[0]
    return None
