"""The ops a feature is made of, as small typed, validated, serializable dataclasses.

Sparse ops act on ids (int64, one or many per row); dense ops act on one float per row.

=============  ========================================================================
op             what it does
=============  ========================================================================
Hash           int ids, strings or lists of strings -> int64 ids: ``hash64`` (XXH64)
               with ``seed``; ``buckets`` maps the 64-bit hash to ``[0, buckets)``.
Mod            ``id mod m`` into ``[0, m)`` (floor modulo: never negative).
Bucketize      numbers -> bucket index ``i`` with ``boundaries[i-1] < x <= boundaries[i]``
               (``right=True``: ``boundaries[i-1] <= x < boundaries[i]``), in ``[0, n]``.
MultiHash      ``k`` independent hashes of each id, as ``k`` features ``name/0`` ...
Cross          per-row cartesian product with other features, each pair hashed.
Truncate       keep at most ``max_len`` ids per row, cutting the ``side`` end.
Pad            make every row exactly ``length`` ids: cut, then fill with ``value``.
FilterIds      drop the ids in ``ids`` (``keep=True``: keep only those).
FillMissing    an empty row (sparse) or a NaN (dense) becomes ``value``.
Log1p          ``log(1 + x)`` (dense).
Clip           clamp into ``[min, max]`` (dense).
Normalize      ``(x - mean) / std`` (dense).
=============  ========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal, get_args

from recstack.core.checks import check_int

__all__ = [
    # The ops, in the order of the table above.
    "Hash",
    "Mod",
    "Bucketize",
    "MultiHash",
    "Cross",
    "Truncate",
    "Pad",
    "FilterIds",
    "Mask",
    "FillMissing",
    "Log1p",
    "Clip",
    "Normalize",
    # What they share.
    "OPS",
    "Op",
    "OpError",
    "OpKind",
    "Side",
    "op_from_dict",
]

#: The end of a row an op cuts or pads: ``"left"`` (its start) or ``"right"`` (its end).
Side = Literal["left", "right"]
#: What an op applies to: ids (``"sparse"``), one float a row (``"dense"``) or either.
OpKind = Literal["sparse", "dense", "any"]

_U64 = 1 << 64


class OpError(ValueError):
    """An op's parameters are invalid (the engine adds the feature's name)."""


def _int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    # Python ints only: an op keeps the value it was given, and configs write it back.
    if not isinstance(value, int):
        raise OpError(f"{name} must be an int, got {value!r}")
    try:
        return check_int(value, name, minimum=low, maximum=high)
    except (TypeError, ValueError) as e:  # a bool, or out of range
        raise OpError(str(e)) from None


def _choice(name: str, value: Any, choices: Any) -> None:
    """Refuse a ``value`` outside the ``Literal`` type ``choices``, naming the allowed ones."""
    allowed = get_args(choices)
    if value not in allowed:
        listed = " or ".join(repr(c) for c in allowed)
        raise OpError(f"{name} must be {listed}, got {value!r}")


def _seed(value: Any) -> int:
    return _int("seed", value, 0, _U64 - 1)


def _buckets(value: Any) -> int | None:
    return None if value is None else _int("buckets", value, 1, (1 << 63) - 1)


def _number(name: str, value: Any) -> int | float:
    # Ints stay ints: float() would round those past 2**53 and overflow past 1e308.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OpError(f"{name} must be a number, got {value!r}")
    return value


def _is_nan(value: int | float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _is_finite(value: int | float) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


@dataclass(frozen=True)
class Op:
    """Base class. ``kind`` says what the op takes: ``"sparse"``, ``"dense"`` or ``"any"``."""

    kind: ClassVar[OpKind] = "sparse"

    def to_dict(self) -> dict[str, Any]:
        """``{"op": "<Name>", **params}``: what config files hold."""
        out: dict[str, Any] = {"op": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class Hash(Op):
    """``hash64(x, seed)`` of ints, strings or lists of strings; optional ``buckets``."""

    seed: int = 0
    buckets: int | None = None

    def __post_init__(self) -> None:
        _seed(self.seed)
        _buckets(self.buckets)


@dataclass(frozen=True)
class Mod(Op):
    """``x mod m`` with the result in ``[0, m)`` (floor modulo, as ``torch.remainder``)."""

    m: int = 1

    def __post_init__(self) -> None:
        _int("m", self.m, 1, (1 << 63) - 1)


@dataclass(frozen=True)
class Bucketize(Op):
    """Bucket index of each number: ``torch.bucketize(x, boundaries, right=right)``.

    ``boundaries`` must be non-empty, finite and strictly increasing. On a dense column
    the result is a sparse feature with one id per row.

    On integer ids the boundaries must be integers (ints, or floats with an integral value)
    within int64; they are compared with the ids exactly, ints never passing through
    float64. On a float column they are compared in float64, so they must stay distinct
    there.
    """

    kind: ClassVar[OpKind] = "any"
    boundaries: tuple[float, ...] = ()
    right: bool = False

    def __post_init__(self) -> None:
        b = self.boundaries
        if isinstance(b, (str, bytes)) or not isinstance(b, Sequence):
            raise OpError(f"boundaries must be a list of numbers, got {b!r}")
        values = [_number("boundaries", v) for v in b]
        if not values:
            raise OpError("boundaries is empty: give at least one boundary")
        if not all(_is_finite(v) for v in values):
            raise OpError(f"boundaries must be finite, got {list(b)}")
        # Compared as given (Python compares int and float exactly): 2**53 < 2**53 + 1
        # although both are the same float64.
        if any(y <= x for x, y in zip(values, values[1:], strict=False)):
            raise OpError(f"boundaries must be strictly increasing, got {list(b)}")
        object.__setattr__(self, "boundaries", tuple(b))
        if not isinstance(self.right, bool):
            raise OpError(f"right must be a bool, got {self.right!r}")


@dataclass(frozen=True)
class MultiHash(Op):
    """``k`` hashes of each id with seeds ``seed, seed+1, ...``: features ``name/0..k-1``."""

    k: int = 2
    seed: int = 0
    buckets: int | None = None

    def __post_init__(self) -> None:
        _int("k", self.k, 1, 64)
        _seed(self.seed)
        _seed(self.seed + self.k - 1)
        _buckets(self.buckets)


@dataclass(frozen=True)
class Cross(Op):
    """Per-row cartesian product of this feature's ids with the named features' outputs.

    Each tuple is hashed: ``h = xxh64(LE(a) || LE(b), seed)``, folded for more features.
    """

    others: tuple[str, ...] = ()
    seed: int = 0
    buckets: int | None = None

    def __post_init__(self) -> None:
        o = self.others
        if isinstance(o, str):
            o = (o,)
        if not isinstance(o, Sequence) or not all(isinstance(x, str) and x for x in o):
            raise OpError(f"others must be feature names, got {self.others!r}")
        if not 1 <= len(o) <= 3:
            raise OpError(f"a cross takes 1 to 3 other features, got {len(o)}")
        if len(set(o)) != len(o):
            raise OpError(f"a cross names the same feature twice: {list(o)}")
        object.__setattr__(self, "others", tuple(o))
        _seed(self.seed)
        _buckets(self.buckets)


@dataclass(frozen=True)
class Truncate(Op):
    """At most ``max_len`` ids per row; ``side="left"`` cuts the start (keeps the latest)."""

    max_len: int = 1
    side: Side = "left"

    def __post_init__(self) -> None:
        _int("max_len", self.max_len, 0)
        _choice("side", self.side, Side)


@dataclass(frozen=True)
class Pad(Op):
    """Exactly ``length`` ids per row: cut as :class:`Truncate` with ``truncate``, then
    fill with ``value`` on the ``side`` end."""

    length: int = 1
    value: int = 0
    side: Side = "right"
    truncate: Side = "left"

    def __post_init__(self) -> None:
        _int("length", self.length, 0)
        _int("value", self.value, -(1 << 63), (1 << 63) - 1)
        _choice("side", self.side, Side)
        _choice("truncate", self.truncate, Side)


@dataclass(frozen=True)
class FilterIds(Op):
    """Drop the ids in ``ids`` from every row (``keep=True``: keep only those)."""

    ids: tuple[int, ...] = ()
    keep: bool = False

    def __post_init__(self) -> None:
        ids = self.ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise OpError(f"ids must be a list of ints, got {ids!r}")
        object.__setattr__(
            self, "ids", tuple(_int("ids", v, -(1 << 63), (1 << 63) - 1) for v in ids)
        )
        if not isinstance(self.keep, bool):
            raise OpError(f"keep must be a bool, got {self.keep!r}")


def Mask(ids: Sequence[int], keep: bool = False) -> FilterIds:  # noqa: N802 - an op alias
    """Alias of :class:`FilterIds`."""
    return FilterIds(tuple(ids), keep)


@dataclass(frozen=True)
class FillMissing(Op):
    """An empty row becomes ``[value]`` (sparse); a NaN becomes ``value`` (dense).

    On ids the value must be an integer within int64; on a dense float it must not be NaN
    and, unless infinite, must fit float32. The engine checks both.
    """

    kind: ClassVar[OpKind] = "any"
    value: float = 0

    def __post_init__(self) -> None:
        # NaN and infinities are left to the engine: they suit a dense feature (NaN round
        # trips through configs) but not ids, and only the engine knows which this is.
        _number("value", self.value)


@dataclass(frozen=True)
class Log1p(Op):
    """``log(1 + x)``; clip first if ``x`` can be below -1."""

    kind: ClassVar[OpKind] = "dense"


@dataclass(frozen=True)
class Clip(Op):
    """Clamp into ``[min, max]``; either bound may be ``None`` (no bound), none may be NaN.

    ``-inf``/``inf`` on the open side is the same as ``None``; ``min=inf`` or ``max=-inf``
    is refused, as it would turn every value into that infinity.
    """

    kind: ClassVar[OpKind] = "dense"
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        lo = None if self.min is None else _number("Clip min", self.min)
        hi = None if self.max is None else _number("Clip max", self.max)
        if lo is None and hi is None:
            raise OpError("Clip needs min, max or both")
        # NaN compares false with everything, so it would pass the order check below and
        # make every value NaN. An infinite bound on the open side is the same as None.
        for name, v in (("min", lo), ("max", hi)):
            if v is not None and _is_nan(v):
                raise OpError(f"Clip {name} is NaN: give a number, or None for no bound")
        if lo == math.inf or hi == -math.inf:
            side, v = ("min", lo) if lo == math.inf else ("max", hi)
            raise OpError(f"Clip {side}={v} would turn every value into {v}")
        if lo is not None and hi is not None and lo > hi:
            raise OpError(f"Clip min {lo} is above max {hi}")


@dataclass(frozen=True)
class Normalize(Op):
    """``(x - mean) / std`` with a finite ``mean`` and a finite ``std > 0``."""

    kind: ClassVar[OpKind] = "dense"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not _is_finite(_number("Normalize mean", self.mean)):
            raise OpError(f"Normalize mean must be a finite number, got {self.mean!r}")
        std = _number("Normalize std", self.std)
        if not _is_finite(std) or not std > 0:
            raise OpError(f"Normalize std must be a positive finite number, got {self.std!r}")


#: Every op by the name config files use.
OPS: dict[str, type[Op]] = {
    cls.__name__: cls
    for cls in (
        Hash,
        Mod,
        Bucketize,
        MultiHash,
        Cross,
        Truncate,
        Pad,
        FilterIds,
        FillMissing,
        Log1p,
        Clip,
        Normalize,
    )
}


def op_from_dict(data: Mapping[str, Any]) -> Op:
    """The op a config entry ``{"op": "Hash", "seed": 1, ...}`` describes."""
    if not isinstance(data, Mapping) or "op" not in data:
        raise OpError(f"an op needs an 'op' name, got {data!r}")
    name = data["op"]
    if name == "Mask":
        name = "FilterIds"
    cls = OPS.get(name)
    if cls is None:
        raise OpError(f"unknown op {name!r}; known ops: {sorted(OPS)}")
    known = {f.name for f in fields(cls)}
    extra = set(data) - known - {"op"}
    if extra:
        raise OpError(f"{name} has no parameter(s) {sorted(extra)}; it takes {sorted(known)}")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "op"}
    try:
        return cls(**params)
    except TypeError as e:
        raise OpError(f"{name}: {e}") from e
