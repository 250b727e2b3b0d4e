"""Which saved names a load or an export takes: ``include``/``exclude`` glob patterns and
``rename`` prefixes, as :meth:`~recstack.saver.Checkpointer.load` and
:func:`~recstack.saver.export_checkpoint` take them."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

__all__ = ["NameFilter"]


class NameFilter:
    """Selects and renames the names of tables, module entries and objects.

    Args:
        include: glob patterns (``fnmatch``) a name must match one of; ``None``: all.
        exclude: glob patterns of names to leave out.
        rename: ``{old: new}`` name prefixes, replaced at ``.`` boundaries; the longest
            matching prefix wins.
    """

    def __init__(
        self,
        include: Sequence[str] | None,
        exclude: Sequence[str] | None,
        rename: Mapping[str, str],
    ) -> None:
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        # Longest prefix first, so a specific rename beats a general one.
        self.rename = sorted(rename.items(), key=lambda kv: -len(kv[0]))

    def renamed(self, name: str) -> str:
        """``name`` with its longest ``rename`` prefix replaced (unchanged without one).

        Args:
            name: a saved name (``"model.ec.item"``).
        """
        for old, new in self.rename:
            if name == old or name.startswith(old + "."):
                return new + name[len(old) :]
        return name

    def selected(self, name: str) -> bool:
        """Whether ``name`` matches ``include`` (when given) and no ``exclude`` pattern.

        Args:
            name: the name, after renaming.
        """
        pats = self.include
        if pats is not None and not any(fnmatch.fnmatchcase(name, p) for p in pats):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
