"""Typed, validated configs of embedding tables and the features that read them.

* :class:`Initializer`: how a new row's values are drawn (zeros, constant, uniform, normal,
  truncated normal, xavier). Values are a pure function of (id, column, seed), see
  :mod:`recstack.embedding_engine.kernels.init_rows`.
* :class:`Eviction`: when rows are dropped (capacity cap with LRU/LFU, TTL, low counts).
* :class:`Admission`: an id becomes a row only once seen ``min_count`` times.
* :class:`TableConfig`: one embedding table (dynamic hash table, or fixed-size).
* :class:`FeatureConfig`: one feature of a ``KeyedJaggedTensor`` and how it is pooled.
* :func:`check_configs`: cross-validation of tables and features.

Every config is a frozen dataclass with ``to_dict``/``from_dict`` (JSON-able; unknown keys are
rejected). Every error is a :class:`ConfigError` naming the table, feature or initializer.
Options with a fixed set of values are ``Literal`` types (:data:`Pooling`,
:data:`TruncateSide`, :data:`EvalDefault`, :data:`EvictionPolicy`, :data:`InitializerKind`,
:data:`TableDtypeName`), checked at construction against the same values.

Examples:
    >>> t = TableConfig("item", dim=64, initializer=Initializer.normal(std=0.01))
    >>> f = FeatureConfig("clicked_items", table="item", pooling="mean")
    >>> sorted(check_configs([t], [f]))
    ['item']
    >>> TableConfig.from_dict(t.to_dict()) == t
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar, get_args

import torch

from recstack.core import kernels
from recstack.core.checks import check_int
from recstack.core.hashing import hash64
from recstack.core.jagged import JaggedTensor
from recstack.embedding_engine.hbm_budget import parse_hbm_budget

__all__ = [
    "ADMISSION_COUNTER_SLOTS",
    "Admission",
    "ConfigError",
    "EVAL_DEFAULTS",
    "EVICTION_POLICIES",
    "EvalDefault",
    "Eviction",
    "EvictionPolicy",
    "FeatureConfig",
    "INITIALIZER_KINDS",
    "Initializer",
    "InitializerKind",
    "POOLINGS",
    "Pooling",
    "TABLE_DTYPES",
    "TRUNCATE_SIDES",
    "TableConfig",
    "TableDtypeName",
    "TruncateSide",
    "check_configs",
]


class ConfigError(ValueError):
    """An invalid table, feature or initializer config; the message names it."""


#: The name of a row dtype a table may store (what ``to_dict`` writes).
TableDtypeName = Literal["float32", "bfloat16", "float16"]
#: Row dtypes a table may store, by name.
TABLE_DTYPES: dict[TableDtypeName, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {v: k for k, v in TABLE_DTYPES.items()}
#: Which rows a capacity cap drops: none (no cap), least recently or least often seen.
EvictionPolicy = Literal["none", "lru", "lfu"]
EVICTION_POLICIES: tuple[EvictionPolicy, ...] = get_args(EvictionPolicy)
#: How a feature's bag comes out: summed, averaged, as a sequence, or tiled.
Pooling = Literal["sum", "mean", "none", "tile"]
POOLINGS: tuple[Pooling, ...] = get_args(Pooling)
#: Which end of a sequence longer than ``max_len`` is cut (the feature engine's ``Truncate``
#: sides): ``"left"`` cuts the start and keeps the last ``max_len`` ids (the most recent
#: behaviours), ``"right"`` cuts the end and keeps the first ``max_len``.
TruncateSide = Literal["left", "right"]
TRUNCATE_SIDES: tuple[TruncateSide, ...] = get_args(TruncateSide)
#: What an id without a row reads: its initializer's row (not inserted) or zeros.
EvalDefault = Literal["initializer", "zeros"]
EVAL_DEFAULTS: tuple[EvalDefault, ...] = get_args(EvalDefault)
#: Default size of an admission counter: 2**20 counters (4 MiB as int32).
ADMISSION_COUNTER_SLOTS = 1 << 20

#: How an initializer draws values (its parameters: :data:`INITIALIZER_KINDS`).
InitializerKind = Literal[
    "zeros", "constant", "uniform", "normal", "truncated_normal", "xavier_uniform", "xavier_normal"
]
# Parameters of each initializer kind; ``None`` marks a required one.
_REQUIRED = None
INITIALIZER_KINDS: dict[InitializerKind, dict[str, float | None]] = {
    "zeros": {},
    "constant": {"value": _REQUIRED},
    "uniform": {"low": _REQUIRED, "high": _REQUIRED},
    "normal": {"mean": 0.0, "std": 1.0},
    "truncated_normal": {"mean": 0.0, "std": 1.0, "a": -2.0, "b": 2.0},
    "xavier_uniform": {"gain": 1.0},
    "xavier_normal": {"gain": 1.0},
}
# Truncation points further out than this many std are meaningless for an initializer and
# would push the normal CDF below fp64's normal range.
_MAX_TRUNCATION = 20.0


# ----------------------------------------------------------------------------------------
# field checks
# ----------------------------------------------------------------------------------------


def _int(owner: str, name: str, value: object, low: int, high: int | None = None) -> int:
    try:
        return check_int(value, f"{owner}: {name}", minimum=low, maximum=high)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def _opt_int(owner: str, name: str, value: object, low: int, high: int | None = None) -> int | None:
    return None if value is None else _int(owner, name, value, low, high)


def _float(owner: str, name: str, value: object) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise ConfigError(f"{owner}: {name} must be a number, got {value!r}")
    try:
        v = float(value)  # type: ignore[arg-type]  # ints, floats, numpy / 0-d torch scalars
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{owner}: {name} must be finite, got {v}")
    return v


_Choice = TypeVar("_Choice", bound=str)


def _choice(owner: str, name: str, value: object, choices: Sequence[_Choice]) -> _Choice:
    if value not in choices:
        raise ConfigError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def _identifier(owner: str, what: str, value: object) -> str:
    if not isinstance(value, str) or not value.isidentifier():
        raise ConfigError(
            f"{owner}: {what} must be a non-empty identifier (letters, digits, _), got {value!r}"
        )
    return value


def _mapping(owner: str, data: object, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{owner}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        raise ConfigError(f"{owner}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    return data


_Config = TypeVar("_Config")


def _config_from_dict(cls: type[_Config], data: object, required: Sequence[str] = ()) -> _Config:
    """``cls(**data)`` for a dataclass config: unknown keys and missing ``required`` keys
    raise a :class:`ConfigError` naming the config (and its ``name``, when it has one)."""
    allowed = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    name = data.get("name") if isinstance(data, Mapping) and "name" in allowed else None
    owner = cls.__name__ if name is None else f"{cls.__name__} {name!r}"
    checked = _mapping(owner, data, allowed)
    for key in required:
        if key not in checked:
            raise ConfigError(f"{owner}: missing required key {key!r}")
    return cls(**checked)


def _fields_dict(config: object) -> dict[str, Any]:
    """A flat dataclass config's fields by name (its JSON-able ``to_dict``)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}  # type: ignore[arg-type]


def _dtype(owner: str, value: object) -> torch.dtype:
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if name in TABLE_DTYPES:
            return TABLE_DTYPES[name]
    elif isinstance(value, torch.dtype) and value in _DTYPE_NAMES:
        return value
    raise ConfigError(f"{owner}: dtype must be one of {list(TABLE_DTYPES)}, got {value!r}")


# ----------------------------------------------------------------------------------------
# Initializer
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, init=False, repr=False)
class Initializer:
    """How a new row's values are drawn: ``Initializer(kind, **params)``.

    Kinds and parameters (defaults in brackets):

    * ``"zeros"``;
    * ``"constant"``: ``value``;
    * ``"uniform"``: ``low``, ``high`` (``low < high``), values in ``[low, high)``;
    * ``"normal"``: ``mean`` [0], ``std`` [1];
    * ``"truncated_normal"``: ``mean`` [0], ``std`` [1], ``a`` [-2], ``b`` [2]: a normal
      restricted to ``[mean + a*std, mean + b*std]`` (``a``, ``b`` in std units, as in
      TensorFlow's ``truncated_normal``; ``-20 <= a < b <= 20``);
    * ``"xavier_uniform"``: ``gain`` [1]: uniform in ``±gain * sqrt(6 / (fan_in + fan_out))``;
    * ``"xavier_normal"``: ``gain`` [1]: normal with ``std = gain * sqrt(2 / (fan_in +
      fan_out))`` (not truncated, as ``torch.nn.init.xavier_normal_``).

    Xavier fans: a dynamic table has no row count, so an embedding row is treated as a
    ``dim -> dim`` map, ``fan_in = fan_out = dim``: bound ``gain * sqrt(3 / dim)``, std
    ``gain / sqrt(dim)``. (``torch.nn.init`` on a ``[num_embeddings, dim]`` weight would use
    ``num_embeddings`` for one fan, which a hash table does not have.)

    The convenience constructors :meth:`zeros`, :meth:`constant`, :meth:`uniform`,
    :meth:`normal`, :meth:`truncated_normal`, :meth:`xavier_uniform` and
    :meth:`xavier_normal` take the same parameters.

    Examples:
        >>> Initializer("uniform", low=-0.1, high=0.1) == Initializer.uniform(-0.1, 0.1)
        True
        >>> Initializer.truncated_normal(std=0.02).params
        {'mean': 0.0, 'std': 0.02, 'a': -2.0, 'b': 2.0}
    """

    kind: InitializerKind
    param_items: tuple[tuple[str, float], ...]

    def __init__(self, kind: InitializerKind, **params: float) -> None:
        kind = _choice("Initializer", "kind", kind, tuple(INITIALIZER_KINDS))
        owner = f"Initializer {kind!r}"
        spec = INITIALIZER_KINDS[kind]
        unknown = sorted(set(params) - set(spec))
        if unknown:
            allowed = ", ".join(spec) if spec else "none"
            raise ConfigError(f"{owner}: unknown parameter(s) {unknown}; allowed: {allowed}")
        values: dict[str, float] = {}
        for name, default in spec.items():
            if name not in params and default is _REQUIRED:
                raise ConfigError(f"{owner}: parameter {name!r} is required")
            values[name] = _float(owner, name, params.get(name, default))
        if kind == "uniform" and not values["low"] < values["high"]:
            raise ConfigError(f"{owner}: low ({values['low']}) must be < high ({values['high']})")
        if "std" in values and not values["std"] > 0:
            raise ConfigError(f"{owner}: std must be > 0, got {values['std']}")
        if "gain" in values and not values["gain"] > 0:
            raise ConfigError(f"{owner}: gain must be > 0, got {values['gain']}")
        if kind == "truncated_normal":
            a, b = values["a"], values["b"]
            if not -_MAX_TRUNCATION <= a < b <= _MAX_TRUNCATION:
                raise ConfigError(
                    f"{owner}: need -{_MAX_TRUNCATION:g} <= a < b <= {_MAX_TRUNCATION:g} "
                    f"(bounds in std units), got a={a}, b={b}"
                )
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "param_items", tuple(values.items()))

    # -- convenience constructors ------------------------------------------------------

    @classmethod
    def zeros(cls) -> Initializer:
        """All zeros."""
        return cls("zeros")

    @classmethod
    def constant(cls, value: float) -> Initializer:
        """Every value ``value``."""
        return cls("constant", value=value)

    @classmethod
    def uniform(cls, low: float, high: float) -> Initializer:
        """Uniform in ``[low, high)``."""
        return cls("uniform", low=low, high=high)

    @classmethod
    def normal(cls, mean: float = 0.0, std: float = 1.0) -> Initializer:
        """Normal ``N(mean, std**2)``."""
        return cls("normal", mean=mean, std=std)

    @classmethod
    def truncated_normal(
        cls, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
    ) -> Initializer:
        """Normal restricted to ``[mean + a*std, mean + b*std]``."""
        return cls("truncated_normal", mean=mean, std=std, a=a, b=b)

    @classmethod
    def xavier_uniform(cls, gain: float = 1.0) -> Initializer:
        """Uniform in ``±gain * sqrt(3 / dim)`` (``fan_in = fan_out = dim``)."""
        return cls("xavier_uniform", gain=gain)

    @classmethod
    def xavier_normal(cls, gain: float = 1.0) -> Initializer:
        """Normal with ``std = gain / sqrt(dim)`` (``fan_in = fan_out = dim``)."""
        return cls("xavier_normal", gain=gain)

    @classmethod
    def default_for(cls, dim: int) -> Initializer:
        """The default of a table of width ``dim``: uniform in ``±1/sqrt(dim)``.

        TorchRec's ``±sqrt(1/num_embeddings)`` needs a row count a dynamic table lacks;
        ``1/sqrt(dim)`` keeps a row's expected squared norm at 1/3 whatever its width.
        """
        bound = 1.0 / math.sqrt(dim)
        return cls.uniform(-bound, bound)

    # -- views ---------------------------------------------------------------------------

    @property
    def params(self) -> dict[str, float]:
        """The parameters, defaults filled in."""
        return dict(self.param_items)

    def support(self, dim: int) -> tuple[float, float]:
        """The closed range holding every value for rows of width ``dim`` (may be infinite).

        Uniform draws lie in ``[low, high)`` before rounding to the table dtype, which can
        round a value up to ``high``.
        """
        p = self.params
        if self.kind == "zeros":
            return 0.0, 0.0
        if self.kind == "constant":
            return p["value"], p["value"]
        if self.kind == "uniform":
            return p["low"], p["high"]
        if self.kind == "xavier_uniform":
            bound = p["gain"] * math.sqrt(3.0 / dim)
            return -bound, bound
        if self.kind == "truncated_normal":
            return p["mean"] + p["a"] * p["std"], p["mean"] + p["b"] * p["std"]
        return -math.inf, math.inf

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": ..., **params}`` (JSON-able)."""
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Initializer:
        """The inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"Initializer: expected a mapping, got {type(data).__name__}")
        if "kind" not in data:
            raise ConfigError(f"Initializer: missing 'kind' (one of {list(INITIALIZER_KINDS)})")
        params = {k: v for k, v in data.items() if k != "kind"}
        bad = [k for k in params if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"Initializer: parameter names must be strings, got {bad}")
        return cls(data["kind"], **params)

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.param_items)
        return f"Initializer({self.kind!r}{args})"


# ----------------------------------------------------------------------------------------
# Eviction and admission
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Eviction:
    """When a table drops rows (their slots are reused by new ids).

    Args:
        policy: ``"none"``, ``"lru"`` (drop the least recently seen rows) or ``"lfu"`` (drop
            the least often seen rows). A policy only chooses victims for ``max_rows``.
        max_rows: a capacity cap: when the table holds more rows, ``policy`` picks which to
            drop. Needs ``policy`` ``"lru"`` or ``"lfu"``, which in turn need ``max_rows``.
        ttl_steps: rows not seen for more than this many steps are dropped.
        min_count: rows seen fewer than this many times are dropped (>= 2; every row has
            been seen once).

    ``ttl_steps`` and ``min_count`` are applied at each eviction pass, with or without a
    policy. ``Eviction()`` never evicts.

    Examples:
        >>> Eviction("lru", max_rows=10_000_000, ttl_steps=100_000).enabled
        True
    """

    policy: EvictionPolicy = "none"
    max_rows: int | None = None
    ttl_steps: int | None = None
    min_count: int | None = None

    def __post_init__(self) -> None:
        owner = "Eviction"
        _choice(owner, "policy", self.policy, EVICTION_POLICIES)
        object.__setattr__(self, "max_rows", _opt_int(owner, "max_rows", self.max_rows, 1))
        object.__setattr__(self, "ttl_steps", _opt_int(owner, "ttl_steps", self.ttl_steps, 1))
        object.__setattr__(self, "min_count", _opt_int(owner, "min_count", self.min_count, 2))
        if self.max_rows is not None and self.policy == "none":
            raise ConfigError(
                f"{owner}: max_rows={self.max_rows} needs policy 'lru' or 'lfu' to choose "
                "which rows to drop"
            )
        if self.max_rows is None and self.policy != "none":
            raise ConfigError(
                f"{owner}: policy {self.policy!r} needs max_rows (the capacity cap it enforces)"
            )

    @property
    def enabled(self) -> bool:
        """True when some rule may drop rows."""
        return self.max_rows is not None or self.ttl_steps is not None or self.min_count is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Eviction:
        """The inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return _config_from_dict(cls, data)


@dataclass(frozen=True)
class Admission:
    """Admission filter: an id becomes a row only once it has been seen ``min_count`` times.

    Until then it reads the table's eval default and gets no gradient. Counts live in a
    compact count-min style counter of ``counter_slots`` int32 counters per table (ids hash
    into it, so a colliding id may be admitted early, never late), not in a second full
    table. ``min_count=1`` (the default) admits every id at once and allocates no counter.

    Examples:
        >>> Admission(min_count=3).enabled
        True
    """

    min_count: int = 1
    counter_slots: int = ADMISSION_COUNTER_SLOTS

    def __post_init__(self) -> None:
        owner = "Admission"
        object.__setattr__(
            self, "min_count", _int(owner, "min_count", self.min_count, 1, 2**31 - 1)
        )
        object.__setattr__(
            self, "counter_slots", _int(owner, "counter_slots", self.counter_slots, 1, 2**40)
        )

    @property
    def enabled(self) -> bool:
        """True when ids must be seen more than once to get a row."""
        return self.min_count > 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Admission:
        """The inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return _config_from_dict(cls, data)


# ----------------------------------------------------------------------------------------
# Tables and features
# ----------------------------------------------------------------------------------------


def _sub(owner: str, what: str, cls: type, value: object) -> Any:
    """``value`` as a ``cls`` (a mapping is parsed), errors prefixed with ``owner``."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        try:
            return cls.from_dict(value)  # type: ignore[attr-defined]
        except ConfigError as exc:
            raise ConfigError(f"{owner}: {what}: {exc}") from exc
    raise ConfigError(f"{owner}: {what} must be a {cls.__name__}, got {type(value).__name__}")


@dataclass(frozen=True)
class TableConfig:
    """One embedding table.

    Args:
        name: a non-empty identifier, unique among tables.
        dim: row width (> 0).
        dtype: row dtype, ``torch.float32``, ``torch.bfloat16`` or ``torch.float16`` (or
            its name).
        initializer: how new rows are drawn; ``None`` means
            :meth:`Initializer.default_for` ``(dim)``: uniform in ``±1/sqrt(dim)``.
        eviction: when rows are dropped (:class:`Eviction`; default never).
        admission: when ids get a row (:class:`Admission`; default on first sight).
        capacity: initial capacity hint (rows) of a dynamic table; it grows past it.
        fixed_size: make this a fixed-size, non-hashed table of ``fixed_size`` rows for a
            small vocabulary: ids must lie in ``[0, fixed_size)`` and index rows directly.
            Such a table neither evicts nor filters admission, and takes no ``capacity``.
        eval_default: what ids without a row read in eval mode (and not-yet-admitted ids
            in training): ``"initializer"``, the row they would get (initial values are a
            pure function of id and seed, so this is what training would insert), or
            ``"zeros"``.
        init_seed: seed of the initializer, an int in ``[0, 2**64)``; ``None`` derives one
            from the table name (XXH64 of its UTF-8 bytes), so two tables given the same
            id start with independent rows.
        hbm_budget: how much of a dynamic table stays in GPU memory: a row count or a
            size (``"24GiB"``); rows past it live in pinned host memory and the most
            recently used are promoted to the GPU between steps
            (:mod:`recstack.embedding_engine.tiers`). ``None`` (default): all of it.

    Examples:
        >>> t = TableConfig("user", dim=16)
        >>> t.initializer
        Initializer('uniform', low=-0.25, high=0.25)
        >>> t.dtype
        torch.float32
    """

    name: str
    dim: int
    dtype: torch.dtype = torch.float32
    initializer: Initializer | None = None
    eviction: Eviction = field(default_factory=Eviction)
    admission: Admission = field(default_factory=Admission)
    capacity: int | None = None
    fixed_size: int | None = None
    eval_default: EvalDefault = "initializer"
    init_seed: int | None = None
    hbm_budget: int | str | None = None

    def __post_init__(self) -> None:
        _identifier("TableConfig", "name", self.name)
        owner = f"TableConfig {self.name!r}"
        set_ = object.__setattr__
        set_(self, "dim", _int(owner, "dim", self.dim, 1))
        set_(self, "dtype", _dtype(owner, self.dtype))
        init = self.initializer
        init = Initializer.default_for(self.dim) if init is None else init
        set_(self, "initializer", _sub(owner, "initializer", Initializer, init))
        set_(self, "eviction", _sub(owner, "eviction", Eviction, self.eviction))
        set_(self, "admission", _sub(owner, "admission", Admission, self.admission))
        set_(self, "capacity", _opt_int(owner, "capacity", self.capacity, 1))
        set_(self, "fixed_size", _opt_int(owner, "fixed_size", self.fixed_size, 1))
        _choice(owner, "eval_default", self.eval_default, EVAL_DEFAULTS)
        seed = _name_seed(self.name) if self.init_seed is None else self.init_seed
        set_(self, "init_seed", _int(owner, "init_seed", seed, 0, 2**64 - 1))
        try:
            set_(self, "hbm_budget", parse_hbm_budget(owner, self.hbm_budget))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.fixed_size is not None:
            if self.hbm_budget is not None:
                raise ConfigError(
                    f"{owner}: a fixed-size table (fixed_size={self.fixed_size}) stays on the "
                    "GPU whole; hbm_budget is for dynamic tables"
                )
            if self.eviction.enabled:
                raise ConfigError(
                    f"{owner}: a fixed-size table (fixed_size={self.fixed_size}) does not "
                    "evict; drop eviction or fixed_size"
                )
            if self.admission.enabled:
                raise ConfigError(
                    f"{owner}: a fixed-size table (fixed_size={self.fixed_size}) has no "
                    "admission filter; drop admission or fixed_size"
                )
            if self.capacity is not None:
                raise ConfigError(
                    f"{owner}: capacity is a hint for dynamic tables; a fixed-size table "
                    f"has exactly fixed_size={self.fixed_size} rows"
                )

    @property
    def is_fixed_size(self) -> bool:
        """True for a fixed-size, non-hashed table."""
        return self.fixed_size is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (dtype by name, nested configs as dicts)."""
        assert self.initializer is not None  # filled in by __post_init__
        return {
            "name": self.name,
            "dim": self.dim,
            "dtype": _DTYPE_NAMES[self.dtype],
            "initializer": self.initializer.to_dict(),
            "eviction": self.eviction.to_dict(),
            "admission": self.admission.to_dict(),
            "capacity": self.capacity,
            "fixed_size": self.fixed_size,
            "eval_default": self.eval_default,
            "init_seed": self.init_seed,
            "hbm_budget": self.hbm_budget,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableConfig:
        """The inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return _config_from_dict(cls, data, required=("name", "dim"))


def _name_seed(name: str) -> int:
    """The default init seed of table ``name``: XXH64 of its UTF-8 bytes, as a uint64."""
    # The torch reference is bit-identical to the kernel and needs no launch.
    with torch.device("cpu"), kernels.use_backend("torch"):
        h = hash64(JaggedTensor.from_strings([name]))
    return int(h[0]) & ((1 << 64) - 1)


@dataclass(frozen=True)
class FeatureConfig:
    """One feature (a key of the input ``KeyedJaggedTensor``) and how its ids are pooled.

    Args:
        name: the feature's key, a non-empty string unique among features.
        table: the name of the :class:`TableConfig` it reads; several features may share
            a table.
        pooling: per bag (one row of the feature):

            * ``"sum"``: the sum of its rows -> ``[B, dim]`` (empty bags give zeros);
            * ``"mean"``: the sum divided by the bag length (zeros for empty bags);
            * ``"none"``: the rows as a sequence: a ``JaggedTensor`` of ``[n, dim]`` values,
              or with ``max_len`` a padded ``[B, max_len, dim]`` tensor (a bag's kept ids
              first, in order, then zero padding on the right; a longer bag is cut as
              ``truncate`` says);
            * ``"tile"`` (RecIS/DeepRec's tile): the sequence padded/truncated to
              ``max_len`` as for ``"none"``, then concatenated along dim ->
              ``[B, max_len * dim]``.
        max_len: sequence length for ``"tile"`` (required) and padded ``"none"``; not
            allowed with ``"sum"``/``"mean"``.
        weighted: use the feature's per-id weights: a weighted sum for ``"sum"``, the
            weighted sum divided by the bag length for ``"mean"`` (as FBGEMM/TorchRec). Only
            with ``"sum"`` or ``"mean"``.
        truncate: which end of a bag longer than ``max_len`` is cut, as the feature
            engine's ``Truncate(side=...)``: ``"left"`` (the default) cuts the start and
            keeps the last ``max_len`` ids, the most recent behaviours of a history logged
            oldest first; ``"right"`` cuts the end and keeps the first ``max_len`` ids.
            Only used with ``max_len``; every id is still looked up (and, in training,
            inserted), cut or not.
        with_lengths: with ``pooling="none"`` and ``max_len``, output a
            :class:`~recstack.embedding_engine.sequence.PaddedSequence` ``(values,
            lengths)`` instead of the bare ``[B, max_len, dim]`` tensor: ``lengths`` (int64
            ``[B]``) counts each row's ids, so ``values[b, :lengths[b]]`` holds them and
            ``.mask`` is the ``[B, max_len]`` padding mask, with no host sync.
        gather: with ``pooling="none"`` and no ``max_len`` (a jagged sequence), ``False``
            outputs a :class:`~recstack.embedding_engine.table_rows.TableRows` (the table,
            each id's row and the offsets) instead of the gathered ``[n_ids, dim]`` rows:
            for a consumer that reads the rows inside its own kernel (DIN's fused target
            attention), so the rows are never copied out and their gradient comes back
            through the ``TableRows``' sink.

    Examples:
        >>> FeatureConfig("hist", "item", pooling="tile", max_len=50).output_dim(8)
        400
        >>> FeatureConfig("hist", "item", pooling="none", max_len=50).truncate  # most recent
        'left'
    """

    name: str
    table: str
    pooling: Pooling = "sum"
    max_len: int | None = None
    weighted: bool = False
    truncate: TruncateSide = "left"
    with_lengths: bool = False
    gather: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"FeatureConfig: name must be a non-empty string, got {self.name!r}")
        owner = f"FeatureConfig {self.name!r}"
        _identifier(owner, "table", self.table)
        _choice(owner, "pooling", self.pooling, POOLINGS)
        object.__setattr__(self, "max_len", _opt_int(owner, "max_len", self.max_len, 1))
        if not isinstance(self.weighted, bool):
            raise ConfigError(f"{owner}: weighted must be a bool, got {self.weighted!r}")
        if self.pooling == "tile" and self.max_len is None:
            raise ConfigError(f"{owner}: pooling 'tile' needs max_len (the tiled length)")
        if self.pooling in ("sum", "mean") and self.max_len is not None:
            raise ConfigError(
                f"{owner}: max_len is only used by pooling 'none' and 'tile', not "
                f"{self.pooling!r} (truncate sequences upstream to cap a bag)"
            )
        if self.weighted and self.pooling not in ("sum", "mean"):
            raise ConfigError(
                f"{owner}: weighted needs pooling 'sum' or 'mean', not {self.pooling!r}"
            )
        if self.truncate not in TRUNCATE_SIDES:
            raise ConfigError(
                f"{owner}: truncate must be 'left' (cut the start, keep the last max_len ids, "
                f"the most recent) or 'right' (cut the end, keep the first max_len ids), got "
                f"{self.truncate!r}"
            )
        if not isinstance(self.with_lengths, bool):
            raise ConfigError(f"{owner}: with_lengths must be a bool, got {self.with_lengths!r}")
        if self.with_lengths and (self.pooling != "none" or self.max_len is None):
            raise ConfigError(
                f"{owner}: with_lengths needs pooling 'none' with max_len (a padded "
                f"sequence), got pooling {self.pooling!r}"
                + ("" if self.max_len is None else f" with max_len={self.max_len}")
                + (
                    " (a jagged output already carries its offsets)"
                    if self.pooling == "none"
                    else ""
                )
            )

        if not isinstance(self.gather, bool):
            raise ConfigError(f"{owner}: gather must be a bool, got {self.gather!r}")
        if not self.gather and (self.pooling != "none" or self.max_len is not None):
            raise ConfigError(
                f"{owner}: gather=False needs a jagged sequence (pooling 'none' without "
                f"max_len), got pooling {self.pooling!r}"
                + ("" if self.max_len is None else f" with max_len={self.max_len}")
            )

    @property
    def is_sequence(self) -> bool:
        """True for pooling ``"none"`` (per-id rows out) and ``"tile"``."""
        return self.pooling in ("none", "tile")

    def output_dim(self, table_dim: int) -> int:
        """Width of the feature's last output dimension for a table of width ``table_dim``."""
        if self.pooling == "tile":
            assert self.max_len is not None
            return self.max_len * table_dim
        return table_dim

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureConfig:
        """The inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return _config_from_dict(cls, data, required=("name", "table"))


def check_configs(
    tables: Sequence[TableConfig], features: Sequence[FeatureConfig]
) -> dict[str, TableConfig]:
    """Cross-validate tables and features; return the tables by name (in the given order).

    Checks: at least one table; each item has the right type; table names and feature
    names are unique; every feature names a defined table; every table is read by some
    feature.

    Raises:
        ConfigError: naming the offending table or feature.
    """
    if isinstance(tables, (TableConfig, str)) or not isinstance(tables, Sequence):
        raise ConfigError(f"tables must be a list of TableConfig, got {type(tables).__name__}")
    if isinstance(features, (FeatureConfig, str)) or not isinstance(features, Sequence):
        raise ConfigError(
            f"features must be a list of FeatureConfig, got {type(features).__name__}"
        )
    if not tables:
        raise ConfigError("at least one TableConfig is needed")
    by_name: dict[str, TableConfig] = {}
    for i, t in enumerate(tables):
        if not isinstance(t, TableConfig):
            raise ConfigError(f"tables[{i}] must be a TableConfig, got {type(t).__name__}")
        if t.name in by_name:
            raise ConfigError(f"TableConfig {t.name!r}: duplicate table name")
        by_name[t.name] = t
    used: set[str] = set()
    seen: set[str] = set()
    for i, f in enumerate(features):
        if not isinstance(f, FeatureConfig):
            raise ConfigError(f"features[{i}] must be a FeatureConfig, got {type(f).__name__}")
        if f.name in seen:
            raise ConfigError(f"FeatureConfig {f.name!r}: duplicate feature name")
        seen.add(f.name)
        if f.table not in by_name:
            raise ConfigError(
                f"FeatureConfig {f.name!r}: table {f.table!r} is not defined "
                f"(tables: {', '.join(by_name)})"
            )
        used.add(f.table)
    for name in by_name:
        if name not in used:
            raise ConfigError(f"TableConfig {name!r}: no feature reads this table")
    return by_name
