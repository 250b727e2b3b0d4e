"""Elementwise id programs (hash, mod, bucketize) over many features in one launch.

Every feature owns a contiguous slice of one int64 values buffer (``value_offsets``) and a
short program of op slots applied in registers. One Triton launch serves every feature:
each element finds its feature with a binary search over ``value_offsets`` (no host sync,
no per-feature launch), reads that feature's op slots from the small program table and
applies them with ``tl.where`` over the opcode. A slot is ``(opcode, p0, p1, p2)``:

* ``OP_HASH``, ``p0 = seed`` (the int64 bit pattern of a uint64 seed): XXH64 of the value's
  8 little-endian bytes, equal to ``recstack.core.hash64(x, seed & (2**64 - 1))``;
* ``OP_MOD``, ``p0 = m > 0``: ``torch.remainder(x, m)``, in ``[0, m)`` for negative ``x`` too;
* ``OP_UMOD``, ``p0 = m > 0``: the value's 64 bits read unsigned, mod ``m`` (how a hash
  becomes one of ``m`` buckets);
* ``OP_BUCKETIZE``, ``p0 = start, p1 = count >= 1, p2 = right``:
  ``torch.bucketize(x, boundaries[start:start + count], right=bool(right))``.

The program and boundary tables are validated on the host once per tensor version
(:func:`~recstack.feature_engine.kernels.host.cached`); ``value_offsets`` changes every
batch: checking it costs one host sync on CUDA, skipped with ``check_offsets=False``.
:func:`compile_sparse_program` builds the tables from per-feature lists of ops in pure
Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any

import torch

from recstack.core import kernels
from recstack.core.checks import check_int
from recstack.core.kernels import HAS_TRITON
from recstack.core.kernels.hash import (
    PRIME64_5,
    xxh64_avalanche,
    xxh64_int_reference,
    xxh64_step8,
)
from recstack.core.kernels.host import as_int64
from recstack.feature_engine.kernels import host, program_tables

if HAS_TRITON:
    import triton
    import triton.language as tl

    from recstack.core.kernels.hash import tl_xxh64_u64
    from recstack.feature_engine.kernels.device import bucket_of, feature_of

__all__ = [
    "OP_BUCKETIZE",
    "OP_HASH",
    "OP_MOD",
    "OP_NOP",
    "OP_UMOD",
    "SparseOpcode",
    "compile_sparse_program",
    "sparse_program",
    "sparse_program_reference",
]


class SparseOpcode(IntEnum):
    """The opcode column of a sparse program slot (see the module docstring)."""

    NOP = 0
    HASH = 1
    MOD = 2
    UMOD = 3
    BUCKETIZE = 4


OP_NOP, OP_HASH, OP_MOD, OP_UMOD, OP_BUCKETIZE = SparseOpcode

# Each op's tuple length in compile_sparse_program (the opcode and its parameters).
_ARITY = {OP_NOP: 1, OP_HASH: 2, OP_MOD: 2, OP_UMOD: 2}
_MASK64 = (1 << 64) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_BLOCK = 1024
# XXH64 of 8 bytes starts its accumulator at seed + PRIME64_5 + 8 (as int64 bits, wrapping).
_SHORT_PATH_8 = as_int64(PRIME64_5 + 8)


# ----------------------------------------------------------------------------------------
# Compiling per-feature op lists into tables (pure Python, CPU tensors)
# ----------------------------------------------------------------------------------------


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

    Examples:
        >>> prog, bounds = compile_sparse_program([[(OP_HASH, 7), (OP_UMOD, 100)],
        ...                                        [(OP_BUCKETIZE, [0, 10, 100])]])
        >>> prog.shape, bounds.tolist()
        (torch.Size([2, 2, 4]), [0, 10, 100])
    """
    k = program_tables.slot_count([len(ops) for ops in features], slots, names)
    program = [[[0, 0, 0, 0] for _ in range(k)] for _ in features]
    bounds: list[int] = []
    starts: dict[tuple[int, ...], int] = {}
    for i, j, where, code, op in program_tables.program_ops(features, SparseOpcode, _ARITY, names):
        if code == OP_BUCKETIZE:
            key, right = _bucketize_slot(op, where)
            if key not in starts:
                starts[key] = len(bounds)
                bounds.extend(key)
            program[i][j] = [OP_BUCKETIZE, starts[key], len(key), right]
        elif code == OP_HASH:
            seed = check_int(op[1], f"{where}: HASH seed")
            if not 0 <= seed <= _MASK64:
                raise ValueError(f"{where}: HASH seed must be in [0, 2**64), got {seed}")
            program[i][j] = [OP_HASH, as_int64(seed), 0, 0]
        elif code in (OP_MOD, OP_UMOD):
            name = SparseOpcode(code).name
            m = check_int(op[1], f"{where}: {name} modulus")
            if not 1 <= m <= _INT64_MAX:
                raise ValueError(f"{where}: {name} modulus must be in [1, 2**63), got {m}")
            program[i][j] = [code, m, 0, 0]
        elif code != OP_NOP:
            raise ValueError(
                f"{where}: unknown sparse opcode {code}; use OP_NOP..OP_BUCKETIZE (0..4)"
            )
    prog = torch.tensor(program, dtype=torch.int64).reshape(len(features), k, 4)
    return prog, torch.tensor(bounds, dtype=torch.int64)


def _bucketize_slot(op: Sequence[Any], where: str) -> tuple[tuple[int, ...], int]:
    """A BUCKETIZE op's checked boundaries and right flag (0 or 1)."""
    if len(op) not in (2, 3):
        raise ValueError(f"{where}: BUCKETIZE takes (boundaries[, right]), got {op!r}")
    try:
        key = tuple(check_int(b, "boundary") for b in op[1])
    except TypeError as exc:
        raise TypeError(f"{where}: BUCKETIZE boundaries must be ints ({exc})") from None
    if not key:
        raise ValueError(f"{where}: BUCKETIZE needs at least one boundary")
    if any(not _INT64_MIN <= b <= _INT64_MAX for b in key):
        raise ValueError(f"{where}: BUCKETIZE boundaries must fit in int64")
    if any(a > b for a, b in zip(key, key[1:], strict=False)):
        raise ValueError(f"{where}: BUCKETIZE boundaries must be non-decreasing")
    right = op[2] if len(op) == 3 else False
    if right not in (0, 1):  # bools and 0/1 ints
        raise ValueError(f"{where}: BUCKETIZE right must be a bool, got {right!r}")
    return key, int(right)


# ----------------------------------------------------------------------------------------
# Validation (small tables on the host, cached per tensor version)
# ----------------------------------------------------------------------------------------


def _tables_check(program: torch.Tensor, boundaries: torch.Tensor, op: str) -> tuple[int, int]:
    """Validate a sparse program; return (per-slot opcode bit mask, max BUCKETIZE count)."""
    prog = program.detach().cpu()
    m = boundaries.numel()
    code, p0, p1, p2 = prog.unbind(-1)

    def fail(mask: torch.Tensor, why: str) -> None:
        f, k = host.first_true(mask)
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
    return program_tables.slot_opcode_mask(code, OP_NOP), max_count


# ----------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------


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


def _hash_ids(x: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """XXH64 of each id's 8 bytes with its seed: an int64 bit pattern, or one per id.

    One seed is core's :func:`~recstack.core.kernels.hash.xxh64_int_reference`; a seed per
    id runs the same short path (one 8-byte lane from ``seed + PRIME64_5 + 8``) through
    core's XXH64 steps.
    """
    if not isinstance(seed, torch.Tensor):
        return xxh64_int_reference(x, seed & _MASK64)
    return xxh64_avalanche(xxh64_step8(seed + _SHORT_PATH_8, x))


def _runs(sel: torch.Tensor, params: torch.Tensor, offs: list[int]) -> list[list[Any]]:
    """``[start, end, params]`` of each maximal run of selected features with equal
    parameters and adjacent slices: one torch call serves a whole run."""
    runs: list[list[Any]] = []
    rows = params.tolist()
    for f in sel.nonzero().squeeze(1).tolist():
        if runs and runs[-1][1] == offs[f] and runs[-1][2] == rows[f]:
            runs[-1][1] = offs[f + 1]
        else:
            runs.append([offs[f], offs[f + 1], rows[f]])
    return runs


def sparse_program_reference(
    values: torch.Tensor,
    value_offsets: torch.Tensor,
    program: torch.Tensor,
    boundaries: torch.Tensor,
) -> torch.Tensor:
    """Torch reference of :func:`sparse_program` (inputs assumed valid; any device).

    Vectorized per (slot, opcode): a parameter shared by every feature using the op is a
    scalar, otherwise it is expanded per element with ``repeat_interleave``; HASH is core's
    XXH64 reference; BUCKETIZE runs ``torch.bucketize`` once per run of adjacent features
    with the same boundary slice.

    Args:
        values: int64 ``[N]``.
        value_offsets: int64 ``[F + 1]``; ids past ``value_offsets[-1]`` are copied.
        program: int64 ``[F, K, 4]``.
        boundaries: int64 ``[M]``.
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
                for s, e, (start, count, right) in _runs(sel, prog[:, k, 1:], offs_list):
                    bounds = boundaries[start : start + count]
                    x[s:e] = torch.bucketize(x[s:e], bounds, right=bool(right))
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
                y = _hash_ids(xs, *args)
            elif c == OP_MOD:
                y = torch.remainder(xs, *args)
            else:
                y = _umod_ref(xs, *args)
            if elem is None:
                x = y
            else:
                x[elem] = y
    return x


# ----------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _apply_program(x, row, bounds_ptr, b_steps, K: tl.constexpr, SLOT_OPS: tl.constexpr):
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
                    count = tl.where(is_bucket, tl.load(row + 4 * k + 2), 0)
                    lo = bucket_of(bounds_ptr + start, x, count, right, b_steps)
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
        f0 = feature_of(offsets_ptr, first, num_features, f_steps)
        f1 = feature_of(offsets_ptr, tl.maximum(last, first), num_features, f_steps)
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
                t = _apply_program(x, prog_row, bounds_ptr, b_steps, K, SLOT_OPS)
                tl.store(out_ptr + i, tl.where(i < end, t, x), mask=in_range)
        else:
            y = tl.load(values_ptr + i, mask=in_range, other=0)
            feat = feature_of(offsets_ptr, i, num_features, f_steps)
            rows = program_ptr + feat * (K * 4)  # feat < F always: table loads need no mask
            u = _apply_program(y, rows, bounds_ptr, b_steps, K, SLOT_OPS)
            tl.store(out_ptr + i, tl.where(i < end, u, y), mask=in_range)


# ----------------------------------------------------------------------------------------
# Launcher
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

    Examples:
        >>> import torch
        >>> prog = torch.tensor([[[OP_MOD, 10, 0, 0]], [[OP_BUCKETIZE, 0, 2, 0]]])
        >>> sparse_program(torch.tensor([-3, 5, 0, 7]), torch.tensor([0, 2, 4]), prog,
        ...                torch.tensor([0, 5])).tolist()
        [7, 5, 0, 2]
    """
    op = "sparse_program"
    host.check_tensor(values, "values", op, (torch.int64,), 1)
    host.check_tensor(value_offsets, "value_offsets", op, (torch.int64,), 1)
    host.check_tensor(program, "program", op, (torch.int64,), 3)
    host.check_tensor(boundaries, "boundaries", op, (torch.int64,), 1)
    host.check_same_device(
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
    if program.shape[1] > program_tables.MAX_SLOTS:
        raise ValueError(
            f"{op}: program has {program.shape[1]} slots, at most {program_tables.MAX_SLOTS}"
        )
    slot_ops, max_count = host.cached(
        op, (program, boundaries), lambda: _tables_check(program, boundaries, op)
    )
    n = program_tables.check_values_span(values, value_offsets, num_features, op, check_offsets)
    in_place = out is not None and out.data_ptr() == values.data_ptr() and n > 0
    if out is not None:
        host.check_tensor(out, "out", op, (torch.int64,), 1)
        if out.shape != values.shape or out.device != values.device:
            raise ValueError(f"{op}: out must be like values, got shape {tuple(out.shape)}")
        if not out.is_contiguous() or (in_place and out is not values):
            raise ValueError(f"{op}: out must be contiguous, and be values itself to alias it")
    values, value_offsets, program, boundaries = host.contiguous(
        values, value_offsets, program, boundaries
    )
    if not kernels.use_triton(values, op=op):
        kernels.record_launch("sparse_program_reference")
        result = sparse_program_reference(values, value_offsets, program, boundaries)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty_like(values)
    if n:
        kernels.record_launch(op)
        _sparse_program_kernel[(triton.cdiv(n, _BLOCK),)](
            values,
            value_offsets,
            host.nonempty(program, torch.int64),
            host.nonempty(boundaries, torch.int64),
            out,
            n,
            num_features,
            program_tables.search_steps(num_features),
            max_count.bit_length(),  # search steps over <= max_count + 1 answers
            K=program.shape[1],
            SLOT_OPS=slot_ops,
            IN_PLACE=in_place,
            BLOCK=_BLOCK,
            num_warps=4,
        )
    return out
