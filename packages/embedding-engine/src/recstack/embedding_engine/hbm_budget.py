"""How much of a table may live in GPU memory: ``TableConfig(hbm_budget=...)``.

A budget is a row count (an int) or a byte size (a string: ``"24GiB"``, ``"500MB"``,
``"1.5TiB"``). Rows count what a table keeps per row wherever it sits: its values, every
optimizer slot registered on it (``PagedTensor`` companions) and its per-row bookkeeping
(:data:`ROW_OVERHEAD_BYTES`). A byte budget therefore becomes rows once the optimizer is
attached; see :mod:`recstack.embedding_engine.tiers`.

Examples:
    >>> parse_hbm_budget("TableConfig 'item'", "1.5GiB")
    '1.5GiB'
    >>> budget_bytes("1.5GiB"), budget_bytes("2kB"), budget_bytes(10_000)
    (1610612736, 2000, None)
"""

from __future__ import annotations

import math
import re

from recstack.core.checks import check_int

__all__ = ["ROW_OVERHEAD_BYTES", "budget_bytes", "parse_hbm_budget"]

#: Bytes of bookkeeping per row besides values and optimizer slots: the last-seen step and
#: hit count (int64 each), the delta-checkpoint flag, and the tier maps (``loc``, ``owner``,
#: ``hold`` and ``stamp``, int64 each).
ROW_OVERHEAD_BYTES = 8 + 8 + 1 + 4 * 8

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]+)\s*$")


def budget_bytes(budget: int | str | None) -> int | None:
    """The bytes a string budget names (``None`` for a row budget or no budget).

    Raises:
        ValueError: a string that is not a number with a unit (B, kB, MB, GB, TB, KiB,
            MiB, GiB, TiB).
    """
    if not isinstance(budget, str):
        return None
    m = _SIZE.match(budget)
    unit = None if m is None else _UNITS.get(m.group(2).lower())
    if m is None or unit is None:
        raise ValueError(
            f"hbm_budget {budget!r} is not a size: write a number and a unit, e.g. '24GiB' or "
            "'500MB' (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), or give a row count"
        )
    value = float(m.group(1)) * unit
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"hbm_budget {budget!r} must be at least one byte")
    return int(value)


def parse_hbm_budget(owner: str, budget: object) -> int | str | None:
    """Check a ``hbm_budget`` value: ``None``, a row count >= 1, or a byte size string.

    Args:
        owner: who has it, for messages (``"TableConfig 'item'"``).
        budget: the value.

    Raises:
        ValueError: anything else (with ``owner`` in the message).
    """
    if budget is None:
        return None
    if isinstance(budget, str):
        try:
            budget_bytes(budget)
        except ValueError as exc:
            raise ValueError(f"{owner}: {exc}") from None
        return budget.strip()
    try:
        return check_int(budget, f"{owner}: hbm_budget (rows)", minimum=1)
    except TypeError:
        raise ValueError(
            f"{owner}: hbm_budget must be a row count (int) or a size string such as '24GiB', "
            f"got {budget!r}"
        ) from None
