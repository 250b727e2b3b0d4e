"""Elementwise op programs over many features in one launch: ids (hash, mod, bucketize) and
dense floats (log1p, clip, normalize, fill NaN).

Every feature owns a contiguous slice of one values buffer (``value_offsets``) and a short
program of op slots applied in registers. One Triton launch serves every feature: each
element finds its feature with a binary search over ``value_offsets`` (no host sync, no
per-feature launch), reads that feature's op slots from the small program table and applies
them with ``tl.where`` over the op code.

Sparse ops (``sparse_program``; int64 values, a slot is ``(opcode, p0, p1, p2)``):

* ``OP_HASH``, ``p0 = seed`` (the int64 bit pattern of a uint64 seed): XXH64 of the value's
  8 little-endian bytes, equal to ``recstack.core.hash64(x, seed & (2**64 - 1))``;
* ``OP_MOD``, ``p0 = m > 0``: ``torch.remainder(x, m)``, in ``[0, m)`` for negative ``x`` too;
* ``OP_UMOD``, ``p0 = m > 0``: the value's 64 bits read unsigned, mod ``m`` (how a hash
  becomes one of ``m`` buckets);
* ``OP_BUCKETIZE``, ``p0 = start, p1 = count >= 1, p2 = right``:
  ``torch.bucketize(x, boundaries[start:start + count], right=bool(right))``.

Dense ops (``dense_program``; float32 ``[F, B]`` in, float32 ``[B, F]`` out, the model's dense
input, written transposed by the same launch). Both paths compute exactly this, so they
agree bit for bit (NaN positions match; NaN payload bits are not specified):

* ``DOP_LOG1P``: ``float32(log(1 + float64(x)))``, or ``x`` itself when ``|x| < 2**-29``
  (there ``log1p(x)`` rounds to ``x`` in float32, and ``1 + x`` would lose ``x``'s low bits
  in float64). The float64 detour makes the float32 result correctly rounded except when the
  float64 ``log`` of two libraries differ by an ulp right at a float32 rounding boundary
  (a chance of about 2**-28 per value); ``-1 -> -inf``, ``x < -1 -> NaN``;
* ``DOP_CLIP``, ``p0 = lo, p1 = hi``: ``lo`` where ``x < lo``, then ``hi`` where above ``hi``
  (NaN stays NaN; ``-0.0`` is not moved to ``0.0``);
* ``DOP_NORMALIZE``, ``p0 = mean, p1 = std > 0``: ``(x - mean) / std`` with IEEE division;
* ``DOP_FILL_NAN``, ``p0 = value``: NaN becomes ``value``.

Every float parameter is first rounded to float32 (round to nearest even); arithmetic is
float32 except the log1p detour above.

``bucketize_float`` buckets float32/float64 values per feature against that feature's own
float64 boundary list (``torch.bucketize`` semantics, compared in float64; NaN goes past the
last boundary).

Validation of the small tables (program, ops/params, boundary tables) reads them on the
host once and is cached per tensor object and version (``Tensor._version``), so a table
built once and reused costs no device sync after the first call; change a table through
ordinary tensor ops (in place is fine), not through ``.data``. ``value_offsets`` changes
every batch: checking it costs one host sync on CUDA, skipped with ``check_offsets=False``.

``compile_sparse_program``, ``compile_dense_program`` and ``compile_float_boundaries`` build
these tables from per-feature lists of ops in pure Python.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from recstack.core import kernels
from recstack.core.kernels import HAS_TRITON
from recstack.core.kernels.hash import PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME64_5

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.hash import tl_xxh64_u64

__all__ = [
    "DOP_CLIP",
    "DOP_FILL_NAN",
    "DOP_LOG1P",
    "DOP_NOP",
    "DOP_NORMALIZE",
    "MAX_SLOTS",
    "OP_BUCKETIZE",
    "OP_HASH",
    "OP_MOD",
    "OP_NOP",
    "OP_UMOD",
    "bucketize_float",
    "bucketize_float_reference",
    "compile_dense_program",
    "compile_float_boundaries",
    "compile_sparse_program",
    "dense_program",
    "dense_program_reference",
    "sparse_program",
    "sparse_program_reference",
]

OP_NOP = 0
OP_HASH = 1
OP_MOD = 2
OP_UMOD = 3
OP_BUCKETIZE = 4
_SPARSE_NAMES = ("NOP", "HASH", "MOD", "UMOD", "BUCKETIZE")

DOP_NOP = 0
DOP_LOG1P = 1
DOP_CLIP = 2
DOP_NORMALIZE = 3
DOP_FILL_NAN = 4
_DENSE_NAMES = ("NOP", "LOG1P", "CLIP", "NORMALIZE", "FILL_NAN")

#: Most op slots per feature: slots are unrolled in the kernel (and their 4-bit opcode masks
#: travel in one 64-bit constexpr), so programs stay short.
MAX_SLOTS = 12

_MASK64 = (1 << 64) - 1
_INT64_MAX = (1 << 63) - 1
# Below this |x|, float32 log1p(x) == x (and float64 1 + x would drop x's low bits).
_LOG1P_TINY = 2.0**-29

_SPARSE_BLOCK = 1024
_FLOAT_BLOCK = 1024
_DENSE_TILE = 4096


def _signed(v: int) -> int:
    """The int64 whose two's complement bit pattern is ``v mod 2**64``."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


# ----------------------------------------------------------------------------------------
# Compile helpers: per-feature op lists -> tables (pure Python, CPU tensors)
# ----------------------------------------------------------------------------------------


def _where(i: int, j: int | None, names: Sequence[str] | None) -> str:
    feature = f"feature {names[i]!r} (index {i})" if names is not None else f"feature {i}"
    return feature if j is None else f"{feature}, op {j}"


def _int(v: object, what: str) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{what} must be an int, got {type(v).__name__}")
    return operator.index(v)


def _slot_count(lengths: list[int], slots: int | None, names: Sequence[str] | None) -> int:
    k = max(lengths, default=0)
    if k > MAX_SLOTS:
        where = _where(lengths.index(k), None, names)
        raise ValueError(f"{where} has {k} ops; programs have at most {MAX_SLOTS} op slots")
    if slots is not None:
        if _int(slots, "slots") < k:
            raise ValueError(f"slots={slots} is less than the longest program ({k} ops)")
        if slots > MAX_SLOTS:
            raise ValueError(f"slots={slots}: programs have at most {MAX_SLOTS} op slots")
        k = slots
    return k


def compile_sparse_program(
    features: Sequence[Sequence[Sequence[Any]]],
    *,
    slots: int | None = None,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``(program, boundaries)`` for :func:`sparse_program` from per-feature op lists.

    Args:
        features: one op list per feature; each op is a tuple ``(OP_NOP,)``,
            ``(OP_HASH, seed)`` (``seed`` in ``[0, 2**64)``), ``(OP_MOD, m)``,
            ``(OP_UMOD, m)`` (``m`` in ``[1, 2**63)``) or ``(OP_BUCKETIZE, boundaries)`` /
            ``(OP_BUCKETIZE, boundaries, right)`` (non-empty, non-decreasing int64 list).
        slots: pad every program to this many slots (default: the longest program).
        names: feature names for error messages.

    Returns:
        ``program`` int64 ``[F, K, 4]`` and ``boundaries`` int64 ``[M]`` on the CPU;
        identical boundary lists share one slice.

    Example:
        >>> prog, bounds = compile_sparse_program([[(OP_HASH, 7), (OP_UMOD, 100)],
        ...                                        [(OP_BUCKETIZE, [0, 10, 100])]])
        >>> prog.shape, bounds.tolist()
        (torch.Size([2, 2, 4]), [0, 10, 100])
    """
    k = _slot_count([len(ops) for ops in features], slots, names)
    program = [[[0, 0, 0, 0] for _ in range(k)] for _ in features]
    bounds: list[int] = []
    starts: dict[tuple[int, ...], int] = {}
    for i, ops in enumerate(features):
        for j, op in enumerate(ops):
            where = _where(i, j, names)
            if not isinstance(op, Sequence) or not op:
                raise TypeError(f"{where}: an op is a tuple (opcode, *params), got {op!r}")
            code = _int(op[0], f"{where}: opcode")
            arity = {OP_NOP: (1,), OP_HASH: (2,), OP_MOD: (2,), OP_UMOD: (2,)}
            if code == OP_BUCKETIZE:
                if len(op) not in (2, 3):
                    raise ValueError(f"{where}: BUCKETIZE takes (boundaries[, right]), got {op!r}")
                try:
                    key = tuple(_int(b, "boundary") for b in op[1])
                except TypeError as exc:
                    raise TypeError(f"{where}: BUCKETIZE boundaries must be ints ({exc})") from None
                if not key:
                    raise ValueError(f"{where}: BUCKETIZE needs at least one boundary")
                if any(not -(1 << 63) <= b <= _INT64_MAX for b in key):
                    raise ValueError(f"{where}: BUCKETIZE boundaries must fit in int64")
                if any(a > b for a, b in zip(key, key[1:], strict=False)):
                    raise ValueError(f"{where}: BUCKETIZE boundaries must be non-decreasing")
                right = op[2] if len(op) == 3 else False
                if right not in (0, 1):  # bools and 0/1 ints
                    raise ValueError(f"{where}: BUCKETIZE right must be a bool, got {right!r}")
                if key not in starts:
                    starts[key] = len(bounds)
                    bounds.extend(key)
                program[i][j] = [OP_BUCKETIZE, starts[key], len(key), int(right)]
                continue
            if code not in arity:
                raise ValueError(
                    f"{where}: unknown sparse opcode {code}; use OP_NOP..OP_BUCKETIZE (0..4)"
                )
            if len(op) not in arity[code]:
                raise ValueError(
                    f"{where}: {_SPARSE_NAMES[code]} takes {arity[code][0] - 1} "
                    f"parameter(s), got {op!r}"
                )
            if code == OP_HASH:
                seed = _int(op[1], f"{where}: HASH seed")
                if not 0 <= seed <= _MASK64:
                    raise ValueError(f"{where}: HASH seed must be in [0, 2**64), got {seed}")
                program[i][j] = [OP_HASH, _signed(seed), 0, 0]
            elif code in (OP_MOD, OP_UMOD):
                m = _int(op[1], f"{where}: {_SPARSE_NAMES[code]} modulus")
                if not 1 <= m <= _INT64_MAX:
                    raise ValueError(
                        f"{where}: {_SPARSE_NAMES[code]} modulus must be in [1, 2**63), got {m}"
                    )
                program[i][j] = [code, m, 0, 0]
    prog = torch.tensor(program, dtype=torch.int64).reshape(len(features), k, 4)
    return prog, torch.tensor(bounds, dtype=torch.int64)


def compile_dense_program(
    features: Sequence[Sequence[Sequence[Any]]],
    *,
    slots: int | None = None,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``(ops, params)`` for :func:`dense_program` from per-feature op lists.

    Each op is ``(DOP_NOP,)``, ``(DOP_LOG1P,)``, ``(DOP_CLIP, lo, hi)``,
    ``(DOP_NORMALIZE, mean, std)`` or ``(DOP_FILL_NAN, value)``. Returns ``ops`` int64
    ``[F, K]`` and ``params`` float64 ``[F, K, 2]`` on the CPU, checked like the launcher does.

    Example:
        >>> ops, params = compile_dense_program([[(DOP_FILL_NAN, 0.0), (DOP_LOG1P,)]])
        >>> ops.tolist()
        [[4, 1]]
    """
    k = _slot_count([len(o) for o in features], slots, names)
    arity = {DOP_NOP: 1, DOP_LOG1P: 1, DOP_CLIP: 3, DOP_NORMALIZE: 3, DOP_FILL_NAN: 2}
    ops = [[0] * k for _ in features]
    params = [[[0.0, 0.0] for _ in range(k)] for _ in features]
    for i, feature_ops in enumerate(features):
        for j, op in enumerate(feature_ops):
            where = _where(i, j, names)
            if not isinstance(op, Sequence) or not op:
                raise TypeError(f"{where}: an op is a tuple (opcode, *params), got {op!r}")
            code = _int(op[0], f"{where}: opcode")
            if code not in arity:
                raise ValueError(
                    f"{where}: unknown dense opcode {code}; use DOP_NOP..DOP_FILL_NAN (0..4)"
                )
            if len(op) != arity[code]:
                raise ValueError(
                    f"{where}: {_DENSE_NAMES[code]} takes {arity[code] - 1} "
                    f"parameter(s), got {op!r}"
                )
            try:
                values = [float(v) for v in op[1:]]
            except (TypeError, ValueError):
                raise TypeError(
                    f"{where}: {_DENSE_NAMES[code]} parameters must be floats, got {op!r}"
                ) from None
            ops[i][j] = code
            params[i][j][: len(values)] = values
    ops_t = torch.tensor(ops, dtype=torch.int64).reshape(len(features), k)
    params_t = torch.tensor(params, dtype=torch.float64).reshape(len(features), k, 2)
    _dense_tables_check(ops_t, params_t, "compile_dense_program", names)
    return ops_t, params_t


def compile_float_boundaries(
    boundary_lists: Sequence[Sequence[float]],
    right: bool | Sequence[bool] = False,
    *,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build ``(boundaries, bound_offsets, right)`` for :func:`bucketize_float` (CPU tensors).

    ``boundary_lists[f]`` is feature ``f``'s strictly increasing, non-empty, NaN-free list;
    ``right`` is one flag for all features or one per feature.

    Example:
        >>> b, off, r = compile_float_boundaries([[0.5, 1.5], [10.0]], right=[False, True])
        >>> off.tolist(), r.tolist()
        ([0, 2, 3], [0, 1])
    """
    f = len(boundary_lists)
    flags = [right] * f if isinstance(right, bool | int) else list(right)
    if len(flags) != f:
        raise ValueError(f"right has {len(flags)} flags for {f} features")
    flat: list[float] = []
    offsets = [0]
    for i, bl in enumerate(boundary_lists):
        try:
            flat.extend(float(b) for b in bl)
        except (TypeError, ValueError):
            raise TypeError(f"{_where(i, None, names)}: boundaries must be floats") from None
        offsets.append(len(flat))
        if flags[i] not in (0, 1):
            raise ValueError(f"{_where(i, None, names)}: right must be a bool, got {flags[i]!r}")
    b = torch.tensor(flat, dtype=torch.float64)
    off = torch.tensor(offsets, dtype=torch.int64)
    r = torch.tensor([int(x) for x in flags], dtype=torch.int64)
    _float_tables_check(b, off, r, "compile_float_boundaries", names)
    return b, off, r


# ----------------------------------------------------------------------------------------
# Validation (small tables on the host, cached per tensor version)
# ----------------------------------------------------------------------------------------

_ANALYSES: dict[tuple[str, int], tuple[tuple[weakref.ref, ...], tuple, Any]] = {}
_MAX_ANALYSES = 256


def _cached(kind: str, tables: tuple[torch.Tensor, ...], compute: Callable[[], Any]) -> Any:
    """``compute()`` once per (tables, their versions): validating a reused table is free."""
    try:
        sig = tuple(
            (t._version, t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride())
            for t in tables
        )
    except RuntimeError:  # inference-mode tensors keep no version counter: no caching
        return compute()
    key = (kind, id(tables[0]))
    entry = _ANALYSES.get(key)
    if entry is not None:
        refs, old_sig, result = entry
        # A weakref to a dead tensor returns None, so a new tensor at a recycled id misses.
        if old_sig == sig and all(r() is t for r, t in zip(refs, tables, strict=True)):
            return result
    result = compute()
    if len(_ANALYSES) >= _MAX_ANALYSES:  # entries of dead tables pile up: start over
        _ANALYSES.clear()
    _ANALYSES[key] = (tuple(weakref.ref(t) for t in tables), sig, result)
    return result


def _tensor(x: object, name: str, op: str, dtypes: tuple[torch.dtype, ...], dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must be {want}, got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(x.shape)}")


def _same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")


def _check_values_span(
    values: torch.Tensor,
    value_offsets: torch.Tensor,
    num_features: int,
    op: str,
    check_offsets: bool,
) -> int:
    """``len(values)``, after checking the offsets cover it (the sync only when asked)."""
    n = values.numel()
    if num_features == 0 and n:  # host-known, so checked even when offsets are trusted
        raise ValueError(f"{op}: values has {n} elements but there are no features")
    if check_offsets:
        _check_offsets(value_offsets, n, op)
    return n


def _check_offsets(offsets: torch.Tensor, n: int, op: str, name: str = "value_offsets") -> None:
    """``offsets`` starts at 0, ends at ``n`` and never decreases (one host sync)."""
    bad = (offsets[0] != 0) | (offsets[-1] != n)
    if offsets.numel() > 1:
        bad = bad | (offsets[1:] < offsets[:-1]).any()
    if bool(bad):
        host = offsets.cpu()
        dec = (host[1:] < host[:-1]).nonzero()
        detail = ""
        if dec.numel():
            f = int(dec[0, 0])
            detail = (
                f"; feature {f} would have a negative length ({name}[{f}]={int(host[f])} > "
                f"{name}[{f + 1}]={int(host[f + 1])})"
            )
        raise ValueError(
            f"{op}: {name} must be non-decreasing from 0 to len(values)={n}, got first="
            f"{int(host[0])}, last={int(host[-1])}{detail}"
        )


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in mask.nonzero()[0])


def _sparse_tables_check(program: torch.Tensor, boundaries: torch.Tensor, op: str) -> Any:
    """Validate a sparse program; return (per-slot opcode bit mask, max BUCKETIZE count)."""
    prog = program.detach().cpu()
    m = boundaries.numel()
    code, p0, p1, p2 = prog.unbind(-1)

    def fail(mask: torch.Tensor, why: str) -> None:
        f, k = _first(mask)
        raise ValueError(f"{op}: program[{f}, {k}] = {prog[f, k].tolist()}: {why}")

    bad = (code < OP_NOP) | (code > OP_BUCKETIZE)
    if bad.any():
        fail(bad, "unknown opcode; use OP_NOP, OP_HASH, OP_MOD, OP_UMOD or OP_BUCKETIZE (0..4)")
    bad = ((code == OP_MOD) | (code == OP_UMOD)) & (p0 <= 0)
    if bad.any():
        fail(bad, "MOD/UMOD needs a modulus p0 > 0")
    buck = code == OP_BUCKETIZE
    if buck.any():
        # p0 > m - p1 rather than p0 + p1 > m: no int64 overflow on huge parameters.
        bad = buck & ((p1 < 1) | (p0 < 0) | (p0 > m - p1))
        if bad.any():
            fail(bad, f"BUCKETIZE needs 0 <= p0 and 1 <= p1 with p0 + p1 <= len(boundaries)={m}")
        bad = buck & (p2 != 0) & (p2 != 1)
        if bad.any():
            fail(bad, "BUCKETIZE right flag p2 must be 0 or 1")
        # Descents before each index: a slice [s, s + c) is sorted iff none lie inside it.
        b = boundaries.detach().cpu()
        descents = torch.zeros(m, dtype=torch.int64)
        if m > 1:
            torch.cumsum((b[1:] < b[:-1]).to(torch.int64), 0, out=descents[1:])
        s = torch.where(buck, p0, 0)
        e = torch.where(buck, p0 + p1 - 1, 0)
        bad = buck & (descents[e] != descents[s])
        if bad.any():
            fail(bad, "BUCKETIZE boundaries[p0:p0 + p1] must be non-decreasing")
    max_count = int(p1[buck].max()) if buck.any() else 0
    slot_ops = 0
    for k in range(prog.shape[1]):
        present = torch.unique(code[:, k]).tolist()
        for c in present:
            if c != OP_NOP:
                slot_ops |= 1 << (4 * k + c - 1)
    return slot_ops, max_count


def _dense_tables_check(
    ops: torch.Tensor, params: torch.Tensor, op: str, names: Sequence[str] | None = None
) -> int:
    """Validate a dense program (parameters as float32); return the per-slot opcode bit mask."""
    o = ops.detach().cpu()
    p = params.detach().cpu().to(torch.float32)
    a, b = p.unbind(-1)

    def fail(mask: torch.Tensor, why: str) -> None:
        f, k = _first(mask)
        raise ValueError(
            f"{op}: {_where(f, k, names)}: ops={int(o[f, k])}, params={p[f, k].tolist()} "
            f"(as float32): {why}"
        )

    bad = (o < DOP_NOP) | (o > DOP_FILL_NAN)
    if bad.any():
        fail(
            bad,
            "unknown opcode; use DOP_NOP, DOP_LOG1P, DOP_CLIP, DOP_NORMALIZE or "
            "DOP_FILL_NAN (0..4)",
        )
    bad = (o == DOP_CLIP) & ~(a <= b)  # also catches NaN bounds
    if bad.any():
        fail(bad, "CLIP needs lo <= hi, neither NaN")
    bad = (o == DOP_NORMALIZE) & ~(torch.isfinite(a) & torch.isfinite(b) & (b > 0))
    if bad.any():
        fail(bad, "NORMALIZE needs a finite mean and a finite std > 0")
    slot_ops = 0
    for k in range(o.shape[1]):
        for c in torch.unique(o[:, k]).tolist():
            if c != DOP_NOP:
                slot_ops |= 1 << (4 * k + c - 1)
    return slot_ops


def _float_tables_check(
    boundaries: torch.Tensor,
    bound_offsets: torch.Tensor,
    right: torch.Tensor,
    op: str,
    names: Sequence[str] | None = None,
) -> int:
    """Validate per-feature float boundary lists; return the longest list's length."""
    b = boundaries.detach().cpu()
    off = bound_offsets.detach().cpu()
    r = right.detach().cpu()
    m = b.numel()
    if off.numel() > 1:
        counts = off[1:] - off[:-1]
        if int(off[0]) < 0 or int(off[-1]) > m or bool((counts < 1).any()):
            empty = (counts < 1).nonzero()
            detail = (
                f"; {_where(int(empty[0, 0]), None, names)} has no boundaries"
                if empty.numel()
                else ""
            )
            raise ValueError(
                f"{op}: bound_offsets must be strictly increasing within [0, len(boundaries)="
                f"{m}] (every feature needs a boundary), got first={int(off[0])}, "
                f"last={int(off[-1])}{detail}"
            )
    bad = (r != 0) & (r != 1)
    if bad.any():
        raise ValueError(f"{op}: {_where(_first(bad)[0], None, names)}: right must be 0 or 1")
    if b.isnan().any():
        raise ValueError(f"{op}: boundaries must not be NaN (at index {_first(b.isnan())[0]})")
    if off.numel() > 1 and m > 1:
        descents = torch.zeros(m, dtype=torch.int64)
        torch.cumsum((b[1:] <= b[:-1]).to(torch.int64), 0, out=descents[1:])
        bad = descents[off[1:] - 1] != descents[off[:-1]]
        if bad.any():
            raise ValueError(
                f"{op}: {_where(_first(bad)[0], None, names)}: boundaries must be strictly "
                "increasing"
            )
    return int((off[1:] - off[:-1]).max()) if off.numel() > 1 else 0


# ----------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------

_S_P1 = _signed(PRIME64_1)
_S_P2 = _signed(PRIME64_2)
_S_P3 = _signed(PRIME64_3)
_S_P4 = _signed(PRIME64_4)
_S_P5_8 = _signed(PRIME64_5 + 8)


def _rotl_(t: torch.Tensor, r: int, tmp: torch.Tensor) -> None:
    # torch's >> on int64 is arithmetic; the mask turns it into a logical shift.
    torch.bitwise_right_shift(t, 64 - r, out=tmp)
    tmp &= (1 << r) - 1
    t <<= r
    t |= tmp


def _xor_lshr_(t: torch.Tensor, r: int, tmp: torch.Tensor) -> None:
    torch.bitwise_right_shift(t, r, out=tmp)
    tmp &= (1 << (64 - r)) - 1
    t ^= tmp


def _xxh64_ref(x: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """XXH64 of each int64's 8 bytes, seeds as int64 bit patterns (scalar or per element).

    In place on fresh buffers: about 3x faster on the CPU than out-of-place ops.
    """
    t = x * _S_P2
    tmp = torch.empty_like(t)
    _rotl_(t, 31, tmp)
    t *= _S_P1
    # The 8-byte short path: acc = seed + PRIME64_5 + 8, mixed with one lane.
    t ^= seed + _S_P5_8 if isinstance(seed, torch.Tensor) else _signed(seed + _S_P5_8)
    _rotl_(t, 27, tmp)
    t *= _S_P1
    t += _S_P4
    _xor_lshr_(t, 33, tmp)
    t *= _S_P2
    _xor_lshr_(t, 29, tmp)
    t *= _S_P3
    _xor_lshr_(t, 32, tmp)
    return t


def _umod_offset(m: int | torch.Tensor) -> int | torch.Tensor:
    """``m - (2**64 mod m)``, in ``(0, m]``, for ``0 < m < 2**63`` without leaving int64."""
    if not isinstance(m, torch.Tensor):
        return m - (1 << 64) % m
    t = torch.remainder(_INT64_MAX, m) + 1  # 2**63 mod m, or m
    t = torch.where(t == m, 0, t)
    c = t - (m - t)  # 2t mod m, as t - (m - t) cannot overflow
    return m - torch.where(c < 0, c + m, c)


def _umod_ref(x: torch.Tensor, m: int | torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """``uint64(x) mod m`` with ``k = _umod_offset(m)``; a negative x stands for x + 2**64.

    Sign-mask arithmetic instead of ``torch.where``: 7 in-place passes, nothing overflows.
    """
    r = torch.remainder(x, m)
    s = x >> 63  # all ones where x < 0
    s &= k
    r -= s  # x < 0: r + (2**64 mod m) - m, in (-m, m)
    torch.bitwise_right_shift(r, 63, out=s)
    s &= m
    r += s  # back into [0, m)
    return r


def sparse_program_reference(
    values: torch.Tensor,
    value_offsets: torch.Tensor,
    program: torch.Tensor,
    boundaries: torch.Tensor,
) -> torch.Tensor:
    """Torch reference of :func:`sparse_program` (inputs assumed valid; any device).

    Vectorized per (slot, opcode): a parameter shared by every feature using the op is a
    scalar, otherwise it is expanded per element with ``repeat_interleave``; BUCKETIZE runs
    ``torch.bucketize`` once per run of adjacent features with the same boundary slice.
    """
    end = int(value_offsets[-1]) if value_offsets.numel() else 0
    if end < values.numel():  # spare room past the last feature: copied unchanged
        out = values.clone()
        out[:end] = sparse_program_reference(values[:end], value_offsets, program, boundaries)
        return out
    x = values.clone()
    n = x.numel()
    num_slots = program.shape[1]
    if n == 0 or num_slots == 0:
        return x
    dev = x.device
    prog = program.cpu()
    offs = value_offsets.cpu()
    offs_list = offs.tolist()
    lengths = offs[1:] - offs[:-1]
    live = lengths > 0  # features with values: only their programs matter
    busy = (prog[:, :, 0] != OP_NOP).any(1) & live
    if not bool(busy.all()):
        # Only the runs of features with ops do any work; the rest is copied as it is.
        flags = busy.tolist()
        fa = 0
        while fa < len(flags):
            fb = fa + 1
            while fb < len(flags) and flags[fb] == flags[fa]:
                fb += 1
            if flags[fa]:
                a, b = offs_list[fa], offs_list[fb]
                x[a:b] = sparse_program_reference(
                    values[a:b], value_offsets[fa : fb + 1] - a, program[fa:fb], boundaries
                )
            fa = fb
        return x
    lengths_dev = lengths.to(dev)
    for k in range(num_slots):
        code = prog[:, k, 0]
        for c in (OP_HASH, OP_MOD, OP_UMOD, OP_BUCKETIZE):
            sel = (code == c) & live
            if not bool(sel.any()):
                continue
            if c == OP_BUCKETIZE:
                _bucketize_runs(x, sel, prog[:, k], boundaries, offs_list)
                continue
            # The selected features' elements (None: all of them, no gather needed).
            elem = None
            if not bool(sel[live].all()):
                elem = torch.repeat_interleave(sel.to(dev), lengths_dev, output_size=n)
            xs = x if elem is None else x[elem]
            p = prog[:, k, 1]
            tables = [p, _umod_offset(p.clamp(min=1))] if c == OP_UMOD else [p]
            used = p[sel]
            if bool((used == used[0]).all()):  # one parameter for all: Python scalars
                f0 = int(sel.nonzero()[0, 0])
                args: list[Any] = [int(t[f0]) for t in tables]
            else:
                args = []
                for t in tables:
                    per = torch.repeat_interleave(t.to(dev), lengths_dev, output_size=n)
                    args.append(per if elem is None else per[elem])
            if c == OP_HASH:
                y = _xxh64_ref(xs, *args)
            elif c == OP_MOD:
                y = torch.remainder(xs, *args)
            else:
                y = _umod_ref(xs, *args)
            if elem is None:
                x = y
            else:
                x[elem] = y
    return x


def _bucketize_runs(
    x: torch.Tensor,
    sel: torch.Tensor,
    slot: torch.Tensor,
    boundaries: torch.Tensor,
    offs: list[int],
) -> None:
    """In place: BUCKETIZE each selected feature's slice, merging adjacent equal programs."""
    feats = sel.nonzero().squeeze(1).tolist()
    params = slot[:, 1:].tolist()
    i = 0
    while i < len(feats):
        f0 = f1 = feats[i]
        # Features are contiguous in ``x``: neighbours with one boundary slice share a call.
        while i + 1 < len(feats) and feats[i + 1] == f1 + 1 and params[f1 + 1] == params[f0]:
            i += 1
            f1 += 1
        start, count, right = params[f0]
        s, e = offs[f0], offs[f1 + 1]
        x[s:e] = torch.bucketize(x[s:e], boundaries[start : start + count], right=bool(right))
        i += 1


def _dense_apply(code: int, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if code == DOP_LOG1P:
        return torch.where(x.abs() < _LOG1P_TINY, x, (x.double() + 1.0).log().float())
    if code == DOP_CLIP:
        y = torch.where(x < a, a, x)
        return torch.where(y > b, b, y)
    if code == DOP_NORMALIZE:
        return (x - a) / b
    return torch.where(x.isnan(), a, x)  # DOP_FILL_NAN


def dense_program_reference(
    x: torch.Tensor, ops: torch.Tensor, params: torch.Tensor
) -> torch.Tensor:
    """Torch reference of :func:`dense_program`: float32 ``[F, B]`` -> float32 ``[B, F]``."""
    y = x.clone()
    num_features, num_slots = ops.shape
    if y.numel() and num_slots:
        o = ops.cpu()
        p = params.to(torch.float32)
        for k in range(num_slots):
            for c in (DOP_LOG1P, DOP_CLIP, DOP_NORMALIZE, DOP_FILL_NAN):
                rows = o[:, k] == c
                if not bool(rows.any()):
                    continue
                if bool(rows.all()):
                    y = _dense_apply(c, y, p[:, k, 0, None], p[:, k, 1, None])
                else:
                    idx = rows.nonzero().squeeze(1).to(y.device)
                    a, b = p[idx, k, 0, None], p[idx, k, 1, None]
                    y[idx] = _dense_apply(c, y[idx], a, b)
    return y.t().contiguous()


def bucketize_float_reference(
    values: torch.Tensor,
    value_offsets: torch.Tensor,
    boundaries: torch.Tensor,
    bound_offsets: torch.Tensor,
    right: torch.Tensor,
) -> torch.Tensor:
    """Torch reference of :func:`bucketize_float` (one ``torch.bucketize`` per feature)."""
    x = values.to(torch.float64)
    out = torch.empty(x.shape, dtype=torch.int64, device=x.device)
    vo = value_offsets.tolist()
    bo = bound_offsets.tolist()
    flags = right.tolist()
    for f in range(len(vo) - 1):
        s, e = vo[f], vo[f + 1]
        if s == e:
            continue
        xs = x[s:e]
        ids = torch.bucketize(xs, boundaries[bo[f] : bo[f + 1]], right=bool(flags[f]))
        out[s:e] = torch.where(xs.isnan(), bo[f + 1] - bo[f], ids)
    return out


# ----------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _feature_of(offsets_ptr, i, num_features, steps):
        # Largest f in [0, F) with offsets[f] <= i: the feature owning element i (empty
        # features share their start with the next one and lose the tie). ``steps`` =
        # ceil(log2(F)); once hi == lo + 1, mid == lo and the step is a no-op. ``i`` is one
        # int64 position or a block of them.
        lo = i * 0
        hi = lo + num_features
        for _ in range(steps):
            mid = (lo + hi) >> 1
            go = tl.load(offsets_ptr + mid) <= i
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        return lo

    @triton.jit
    def _apply_program(
        x, row, bounds_ptr, b_steps, K: tl.constexpr, SLOT_OPS: tl.constexpr, BLOCK: tl.constexpr
    ):
        """``x`` through the op slots at ``row`` (one feature's, or one per element)."""
        for k in tl.static_range(K):
            # SLOT_OPS has one bit per (slot, opcode) in use: absent ops cost nothing.
            if (SLOT_OPS >> (4 * k)) & 15:
                code = tl.load(row + 4 * k)
                p0 = tl.load(row + 4 * k + 1)
                if (SLOT_OPS >> (4 * k)) & 1:
                    h = tl_xxh64_u64(x.to(tl.uint64, bitcast=True), p0.to(tl.uint64, bitcast=True))
                    x = tl.where(code == 1, h.to(tl.int64, bitcast=True), x)
                if (SLOT_OPS >> (4 * k + 1)) & 1:
                    is_mod = code == 2
                    m = tl.where(is_mod, p0, 1)  # lanes of other ops never divide by 0
                    r = x % m  # truncated remainder, sign of x
                    x = tl.where(is_mod, tl.where(r < 0, r + m, r), x)
                if (SLOT_OPS >> (4 * k + 2)) & 1:
                    is_umod = code == 3
                    m = tl.where(is_umod, p0, 1).to(tl.uint64, bitcast=True)
                    r = x.to(tl.uint64, bitcast=True) % m
                    x = tl.where(is_umod, r.to(tl.int64, bitcast=True), x)
                if (SLOT_OPS >> (4 * k + 3)) & 1:
                    is_bucket = code == 4
                    start = tl.where(is_bucket, p0, 0)
                    right = tl.load(row + 4 * k + 3) != 0
                    # lower_bound (right=0: first b >= x) / upper_bound (right=1: first b > x)
                    lo = tl.zeros([BLOCK], dtype=tl.int64)
                    hi = lo + tl.where(is_bucket, tl.load(row + 4 * k + 2), 0)  # a block
                    for _ in range(b_steps):
                        active = lo < hi
                        mid = (lo + hi) >> 1
                        b = tl.load(bounds_ptr + start + mid, mask=active, other=0)
                        go = tl.where(right, b <= x, b < x)
                        lo = tl.where(active & go, mid + 1, lo)
                        hi = tl.where(active & ~go, mid, hi)
                    x = tl.where(is_bucket, lo, x)
        return x

    @triton.jit(do_not_specialize=["num_features", "f_steps", "b_steps"])
    def _sparse_program_kernel(
        values_ptr,
        offsets_ptr,
        program_ptr,
        bounds_ptr,
        out_ptr,
        n,
        num_features,
        f_steps,
        b_steps,
        K: tl.constexpr,
        SLOT_OPS: tl.constexpr,
        IN_PLACE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        first = tl.program_id(0).to(tl.int64) * BLOCK
        i = first + tl.arange(0, BLOCK)
        in_range = i < n
        # Ids past the last feature's end are spare room: copied, never transformed.
        end = tl.load(offsets_ptr + num_features)
        # Most tiles lie inside one feature: then its program is read once for the tile,
        # and in place a tile of a feature without ops is skipped altogether.
        last = tl.minimum(tl.minimum(first + BLOCK, n), end) - 1
        f0 = _feature_of(offsets_ptr, first, num_features, f_steps)
        f1 = _feature_of(offsets_ptr, tl.maximum(last, first), num_features, f_steps)
        if first >= end:
            if not IN_PLACE:
                z = tl.load(values_ptr + i, mask=in_range, other=0)
                tl.store(out_ptr + i, z, mask=in_range)
        elif f0 == f1:
            prog_row = program_ptr + f0 * (K * 4)
            busy = 0
            for k in tl.static_range(K):
                if (SLOT_OPS >> (4 * k)) & 15:
                    busy = busy | tl.load(prog_row + 4 * k)
            if IN_PLACE:  # noqa: SIM108  (a constexpr branch)
                run = busy != 0
            else:
                run = True
            if run:
                x = tl.load(values_ptr + i, mask=in_range, other=0)
                t = _apply_program(x, prog_row, bounds_ptr, b_steps, K, SLOT_OPS, BLOCK)
                tl.store(out_ptr + i, tl.where(i < end, t, x), mask=in_range)
        else:
            y = tl.load(values_ptr + i, mask=in_range, other=0)
            feat = _feature_of(offsets_ptr, i, num_features, f_steps)
            rows = program_ptr + feat * (K * 4)  # feat < F always: table loads need no mask
            u = _apply_program(y, rows, bounds_ptr, b_steps, K, SLOT_OPS, BLOCK)
            tl.store(out_ptr + i, tl.where(i < end, u, y), mask=in_range)

    @triton.jit(do_not_specialize=["num_features", "f_steps", "b_steps"])
    def _bucketize_float_kernel(
        values_ptr,
        offsets_ptr,
        bounds_ptr,
        bound_offsets_ptr,
        right_ptr,
        out_ptr,
        n,
        num_features,
        f_steps,
        b_steps,
        BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = i < n
        x = tl.load(values_ptr + i, mask=in_range, other=0).to(tl.float64)
        feat = _feature_of(offsets_ptr, i, num_features, f_steps)
        start = tl.load(bound_offsets_ptr + feat)
        count = tl.load(bound_offsets_ptr + feat + 1) - start
        right = tl.load(right_ptr + feat) != 0
        lo = tl.zeros([BLOCK], dtype=tl.int64)
        hi = count
        for _ in range(b_steps):
            active = lo < hi
            mid = (lo + hi) >> 1
            b = tl.load(bounds_ptr + start + mid, mask=active, other=0.0)
            go = tl.where(right, b <= x, b < x)
            lo = tl.where(active & go, mid + 1, lo)
            hi = tl.where(active & ~go, mid, hi)
        tl.store(out_ptr + i, tl.where(x != x, count, lo), mask=in_range)

    @triton.jit
    def _dense_program_kernel(
        x_ptr,
        ops_ptr,
        params_ptr,
        out_ptr,
        num_features,
        batch,
        b_tiles,
        K: tl.constexpr,
        SLOT_OPS: tl.constexpr,
        BLOCK_F: tl.constexpr,
        BLOCK_B: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        f = (pid // b_tiles) * BLOCK_F + tl.arange(0, BLOCK_F)
        b = (pid % b_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
        f_ok = f < num_features
        mask = f_ok[:, None] & (b < batch)[None, :]
        x = tl.load(x_ptr + f[:, None] * batch + b[None, :], mask=mask, other=0.0)
        for k in tl.static_range(K):
            if (SLOT_OPS >> (4 * k)) & 15:
                code = tl.load(ops_ptr + f * K + k, mask=f_ok, other=0)[:, None]
                # float64 -> float32 rounds to nearest even, as torch's .to(float32) does.
                p = params_ptr + (f * K + k) * 2
                a = tl.load(p, mask=f_ok, other=0.0).to(tl.float32)[:, None]
                c = tl.load(p + 1, mask=f_ok, other=1.0).to(tl.float32)[:, None]
                if (SLOT_OPS >> (4 * k)) & 1:
                    lg = tl.log(x.to(tl.float64) + 1.0).to(tl.float32)
                    y = tl.where(tl.abs(x) < 1.862645149230957e-09, x, lg)  # 2**-29
                    x = tl.where(code == 1, y, x)
                if (SLOT_OPS >> (4 * k + 1)) & 1:
                    y = tl.where(x < a, a, x)
                    y = tl.where(y > c, c, y)
                    x = tl.where(code == 2, y, x)
                if (SLOT_OPS >> (4 * k + 2)) & 1:
                    is_norm = code == 3
                    y = tl.math.div_rn(x - a, tl.where(is_norm, c, 1.0))  # IEEE division
                    x = tl.where(is_norm, y, x)
                if (SLOT_OPS >> (4 * k + 3)) & 1:
                    x = tl.where((code == 4) & (x != x), a, x)
        # Written straight into the [B, F] output: no separate transpose launch.
        tl.store(out_ptr + b[None, :] * num_features + f[:, None], x, mask=mask)


def _steps(count: int) -> int:
    """Binary-search steps that narrow ``count`` candidates to one (ceil(log2(count)))."""
    return max(count - 1, 0).bit_length()


def _nonempty(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Kernels need a real buffer even where nothing is read from it.
    return t if t.numel() else torch.zeros(1, dtype=dtype, device=t.device)


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


# ----------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------


def sparse_program(
    values: torch.Tensor,
    value_offsets: torch.Tensor,
    program: torch.Tensor,
    boundaries: torch.Tensor,
    *,
    check_offsets: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run each feature's op program over its slice of ``values``, one launch for all features.

    Args:
        values: int64 ``[N]``, every feature's values back to back.
        value_offsets: int64 ``[F + 1]``, non-decreasing from 0 to ``N``; feature ``f`` owns
            ``values[value_offsets[f]:value_offsets[f + 1]]``. With ``check_offsets=False``
            the last offset may stop short of ``N``: the ids past it are spare room (a
            buffer sized by an upper bound), copied unchanged.
        program: int64 ``[F, K, 4]``; feature ``f``'s slot ``k`` is ``(opcode, p0, p1, p2)``,
            applied for ``k = 0..K-1`` (NOP slots skipped). See the module docstring.
        boundaries: int64 ``[M]``, the boundary lists BUCKETIZE slots point into.
        check_offsets: check ``value_offsets`` (one host sync on CUDA). Pass ``False`` only
            for offsets known valid: bad offsets then pick wrong programs (never read out of
            bounds). The program and boundaries are always checked (cached per version).
        out: where to write, ``values`` itself for in place (then the features whose
            programs are all NOP cost nothing on the Triton path); default a new tensor.

    Returns:
        A new int64 ``[N]`` tensor on ``values``' device.

    Raises:
        TypeError: an argument of the wrong type or dtype, named.
        ValueError: a bad shape or table, naming the argument or the ``program[f, k]`` slot.

    Example:
        >>> import torch
        >>> prog = torch.tensor([[[OP_MOD, 10, 0, 0]], [[OP_BUCKETIZE, 0, 2, 0]]])
        >>> sparse_program(torch.tensor([-3, 5, 0, 7]), torch.tensor([0, 2, 4]), prog,
        ...                torch.tensor([0, 5])).tolist()
        [7, 5, 0, 2]
    """
    op = "sparse_program"
    _tensor(values, "values", op, (torch.int64,), 1)
    _tensor(value_offsets, "value_offsets", op, (torch.int64,), 1)
    _tensor(program, "program", op, (torch.int64,), 3)
    _tensor(boundaries, "boundaries", op, (torch.int64,), 1)
    _same_device(
        op, values=values, value_offsets=value_offsets, program=program, boundaries=boundaries
    )
    num_features = value_offsets.numel() - 1
    if num_features < 0:
        raise ValueError(f"{op}: value_offsets must have F + 1 >= 1 entries, got 0")
    if program.shape[0] != num_features or program.shape[2] != 4:
        raise ValueError(
            f"{op}: program must have shape [F={num_features}, K, 4] (F from value_offsets), "
            f"got {tuple(program.shape)}"
        )
    if program.shape[1] > MAX_SLOTS:
        raise ValueError(f"{op}: program has {program.shape[1]} slots, at most {MAX_SLOTS}")
    slot_ops, max_count = _cached(
        op, (program, boundaries), lambda: _sparse_tables_check(program, boundaries, op)
    )
    n = _check_values_span(values, value_offsets, num_features, op, check_offsets)
    in_place = out is not None and out.data_ptr() == values.data_ptr() and n > 0
    if out is not None:
        _tensor(out, "out", op, (torch.int64,), 1)
        if out.shape != values.shape or out.device != values.device:
            raise ValueError(f"{op}: out must be like values, got shape {tuple(out.shape)}")
        if not out.is_contiguous() or (in_place and out is not values):
            raise ValueError(f"{op}: out must be contiguous, and be values itself to alias it")
    values = values.contiguous()
    value_offsets = value_offsets.contiguous()
    program = program.contiguous()
    boundaries = boundaries.contiguous()
    if not kernels.use_triton(values, op=op):
        kernels.record_launch("sparse_program_reference")
        result = sparse_program_reference(values, value_offsets, program, boundaries)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty_like(values)
    if n:
        kernels.record_launch(op)
        num_slots = program.shape[1]
        _sparse_program_kernel[(triton.cdiv(n, _SPARSE_BLOCK),)](
            values,
            value_offsets,
            _nonempty(program, torch.int64),
            _nonempty(boundaries, torch.int64),
            out,
            n,
            num_features,
            _steps(num_features),
            max_count.bit_length(),  # search steps over <= max_count + 1 answers
            K=num_slots,
            SLOT_OPS=slot_ops,
            IN_PLACE=in_place,
            BLOCK=_SPARSE_BLOCK,
            num_warps=4,
        )
    return out


def dense_program(x: torch.Tensor, ops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Run each dense feature's op program over its row; return the transposed ``[B, F]``.

    Args:
        x: float32 ``[F, B]``, one row per dense feature.
        ops: int64 ``[F, K]`` op codes (``DOP_*``), applied for ``k = 0..K-1``.
        params: float64 ``[F, K, 2]``; rounded to float32 before use (both paths).

    Returns:
        A new float32 ``[B, F]`` tensor (the model's dense input), written by one launch.

    Example:
        >>> import torch
        >>> ops = torch.tensor([[DOP_FILL_NAN, DOP_CLIP]])
        >>> params = torch.tensor([[[0.0, 0.0], [-1.0, 1.0]]], dtype=torch.float64)
        >>> dense_program(torch.tensor([[float("nan"), 5.0, -0.5]]), ops, params).tolist()
        [[0.0], [1.0], [-0.5]]
    """
    op = "dense_program"
    _tensor(x, "x", op, (torch.float32,), 2)
    _tensor(ops, "ops", op, (torch.int64,), 2)
    _tensor(params, "params", op, (torch.float64,), 3)
    _same_device(op, x=x, ops=ops, params=params)
    num_features, batch = x.shape
    num_slots = ops.shape[1]
    if ops.shape[0] != num_features:
        raise ValueError(
            f"{op}: ops must have shape [F={num_features}, K] (F = x.shape[0]), "
            f"got {tuple(ops.shape)}"
        )
    if tuple(params.shape) != (num_features, num_slots, 2):
        raise ValueError(
            f"{op}: params must have shape [F, K, 2] = [{num_features}, {num_slots}, 2], "
            f"got {tuple(params.shape)}"
        )
    if num_slots > MAX_SLOTS:
        raise ValueError(f"{op}: ops has {num_slots} slots, at most {MAX_SLOTS}")
    slot_ops = _cached(op, (ops, params), lambda: _dense_tables_check(ops, params, op))
    x = x.contiguous()
    ops = ops.contiguous()
    params = params.contiguous()
    if not kernels.use_triton(x, op=op):
        kernels.record_launch("dense_program_reference")
        return dense_program_reference(x, ops, params)
    out = torch.empty(batch, num_features, dtype=torch.float32, device=x.device)
    if num_features and batch:
        kernels.record_launch(op)
        block_f = min(16, _next_pow2(num_features))
        block_b = max(16, min(_next_pow2(batch), _DENSE_TILE // block_f))
        b_tiles = triton.cdiv(batch, block_b)
        _dense_program_kernel[(triton.cdiv(num_features, block_f) * b_tiles,)](
            x,
            _nonempty(ops, torch.int64),
            _nonempty(params, torch.float64),
            out,
            num_features,
            batch,
            b_tiles,
            K=num_slots,
            SLOT_OPS=slot_ops,
            BLOCK_F=block_f,
            BLOCK_B=block_b,
            num_warps=4,
        )
    return out


def bucketize_float(
    values: torch.Tensor,
    value_offsets: torch.Tensor,
    boundaries: torch.Tensor,
    bound_offsets: torch.Tensor,
    right: torch.Tensor,
    *,
    check_offsets: bool = True,
) -> torch.Tensor:
    """Bucketize each feature's float values against its own boundaries, one launch.

    Args:
        values: float32 or float64 ``[N]``; feature ``f`` owns
            ``values[value_offsets[f]:value_offsets[f + 1]]``.
        value_offsets: int64 ``[F + 1]``, non-decreasing from 0 to ``N``.
        boundaries: float64 ``[M]``; feature ``f``'s list is
            ``boundaries[bound_offsets[f]:bound_offsets[f + 1]]`` (non-empty, strictly
            increasing, no NaN; checked once per table version).
        bound_offsets: int64 ``[F + 1]``.
        right: int64 ``[F]`` of 0/1, ``torch.bucketize``'s ``right`` per feature.
        check_offsets: check ``value_offsets`` (one host sync on CUDA).

    Returns:
        int64 ``[N]``: ``torch.bucketize`` of each value in float64 against its feature's
        list; NaN gets the list's length (past the last boundary).

    Example:
        >>> import torch
        >>> bucketize_float(torch.tensor([0.5, 2.0, float("nan")]), torch.tensor([0, 3]),
        ...                 torch.tensor([1.0, 2.0], dtype=torch.float64),
        ...                 torch.tensor([0, 2]), torch.tensor([0])).tolist()
        [0, 1, 2]
    """
    op = "bucketize_float"
    _tensor(values, "values", op, (torch.float32, torch.float64), 1)
    _tensor(value_offsets, "value_offsets", op, (torch.int64,), 1)
    _tensor(boundaries, "boundaries", op, (torch.float64,), 1)
    _tensor(bound_offsets, "bound_offsets", op, (torch.int64,), 1)
    _tensor(right, "right", op, (torch.int64,), 1)
    _same_device(
        op,
        values=values,
        value_offsets=value_offsets,
        boundaries=boundaries,
        bound_offsets=bound_offsets,
        right=right,
    )
    num_features = value_offsets.numel() - 1
    if num_features < 0:
        raise ValueError(f"{op}: value_offsets must have F + 1 >= 1 entries, got 0")
    if bound_offsets.numel() != num_features + 1:
        raise ValueError(
            f"{op}: bound_offsets must have F + 1 = {num_features + 1} entries (F from "
            f"value_offsets), got {bound_offsets.numel()}"
        )
    if right.numel() != num_features:
        raise ValueError(f"{op}: right must have F = {num_features} entries, got {right.numel()}")
    max_count = _cached(
        op,
        (bound_offsets, boundaries, right),
        lambda: _float_tables_check(boundaries, bound_offsets, right, op),
    )
    n = _check_values_span(values, value_offsets, num_features, op, check_offsets)
    values = values.contiguous()
    value_offsets = value_offsets.contiguous()
    boundaries = boundaries.contiguous()
    bound_offsets = bound_offsets.contiguous()
    right = right.contiguous()
    if not kernels.use_triton(values, op=op):
        kernels.record_launch("bucketize_float_reference")
        return bucketize_float_reference(values, value_offsets, boundaries, bound_offsets, right)
    out = torch.empty(n, dtype=torch.int64, device=values.device)
    if n:
        kernels.record_launch(op)
        _bucketize_float_kernel[(triton.cdiv(n, _FLOAT_BLOCK),)](
            values,
            value_offsets,
            _nonempty(boundaries, torch.float64),
            bound_offsets,
            right,
            out,
            n,
            num_features,
            _steps(num_features),
            max_count.bit_length(),
            BLOCK=_FLOAT_BLOCK,
            num_warps=4,
        )
    return out
