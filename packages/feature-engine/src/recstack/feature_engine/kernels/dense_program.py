"""Elementwise dense programs (log1p, clip, normalize, fill NaN) over many features, one launch.

``dense_program`` takes float32 ``[F, B]`` (one row per dense feature) and writes float32
``[B, F]``, the model's dense input, transposed by the same launch. Each feature runs a
short program of op slots ``(opcode, p0, p1)``. Both paths compute exactly this, so they
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
float32 except the log1p detour above. The ops and params tables are validated on the host
once per tensor version (:func:`~recstack.feature_engine.kernels.host.cached`);
:func:`compile_dense_program` builds them from per-feature lists of ops in pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any

import torch

from recstack.core import kernels
from recstack.core.kernels import HAS_TRITON
from recstack.core.kernels.host import next_pow2
from recstack.feature_engine.kernels import host, program_tables

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "DOP_CLIP",
    "DOP_FILL_NAN",
    "DOP_LOG1P",
    "DOP_NOP",
    "DOP_NORMALIZE",
    "DenseOpcode",
    "compile_dense_program",
    "dense_program",
    "dense_program_reference",
]


class DenseOpcode(IntEnum):
    """The opcode of a dense program slot (see the module docstring)."""

    NOP = 0
    LOG1P = 1
    CLIP = 2
    NORMALIZE = 3
    FILL_NAN = 4


DOP_NOP, DOP_LOG1P, DOP_CLIP, DOP_NORMALIZE, DOP_FILL_NAN = DenseOpcode

# Each op's tuple length in compile_dense_program (the opcode and its parameters).
_ARITY = {DOP_NOP: 1, DOP_LOG1P: 1, DOP_CLIP: 3, DOP_NORMALIZE: 3, DOP_FILL_NAN: 2}
# Below this |x|, float32 log1p(x) == x (and float64 1 + x would drop x's low bits).
_LOG1P_TINY = 2.0**-29
_TILE = 4096  # elements per program (a BLOCK_F x BLOCK_B tile)


# ----------------------------------------------------------------------------------------
# Compiling per-feature op lists into tables (pure Python, CPU tensors)
# ----------------------------------------------------------------------------------------


def compile_dense_program(
    features: Sequence[Sequence[Sequence[Any]]],
    *,
    slots: int | None = None,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``(ops, params)`` for :func:`dense_program` from per-feature op lists.

    Args:
        features: one op list per feature; each op is ``(DOP_NOP,)``, ``(DOP_LOG1P,)``,
            ``(DOP_CLIP, lo, hi)``, ``(DOP_NORMALIZE, mean, std)`` or
            ``(DOP_FILL_NAN, value)``.
        slots: pad every program to this many slots (default: the longest program).
        names: feature names for error messages.

    Returns:
        ``ops`` int64 ``[F, K]`` and ``params`` float64 ``[F, K, 2]`` on the CPU, checked
        like the launcher does.

    Examples:
        >>> ops, params = compile_dense_program([[(DOP_FILL_NAN, 0.0), (DOP_LOG1P,)]])
        >>> ops.tolist()
        [[4, 1]]
    """
    k = program_tables.slot_count([len(o) for o in features], slots, names)
    ops = [[0] * k for _ in features]
    params = [[[0.0, 0.0] for _ in range(k)] for _ in features]
    for i, j, where, code, op in program_tables.program_ops(features, DenseOpcode, _ARITY, names):
        if code not in _ARITY:
            raise ValueError(
                f"{where}: unknown dense opcode {code}; use DOP_NOP..DOP_FILL_NAN (0..4)"
            )
        try:
            values = [float(v) for v in op[1:]]
        except (TypeError, ValueError):
            name = DenseOpcode(code).name
            raise TypeError(f"{where}: {name} parameters must be floats, got {op!r}") from None
        ops[i][j] = code
        params[i][j][: len(values)] = values
    ops_t = torch.tensor(ops, dtype=torch.int64).reshape(len(features), k)
    params_t = torch.tensor(params, dtype=torch.float64).reshape(len(features), k, 2)
    _tables_check(ops_t, params_t, "compile_dense_program", names)
    return ops_t, params_t


# ----------------------------------------------------------------------------------------
# Validation (small tables on the host, cached per tensor version)
# ----------------------------------------------------------------------------------------


def _tables_check(
    ops: torch.Tensor, params: torch.Tensor, op: str, names: Sequence[str] | None = None
) -> int:
    """Validate a dense program (parameters as float32); return the per-slot opcode bit mask."""
    o = ops.detach().cpu()
    p = params.detach().cpu().to(torch.float32)
    a, b = p.unbind(-1)

    def fail(mask: torch.Tensor, why: str) -> None:
        f, k = host.first_true(mask)
        where = program_tables.feature_label(f, k, names)
        raise ValueError(
            f"{op}: {where}: ops={int(o[f, k])}, params={p[f, k].tolist()} (as float32): {why}"
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
    return program_tables.slot_opcode_mask(o, DOP_NOP)


# ----------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------


def _apply(code: int, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One dense op over rows ``x`` with per-row float32 parameters ``a``, ``b``."""
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
    """Torch reference of :func:`dense_program`: float32 ``[F, B]`` -> float32 ``[B, F]``.

    Args:
        x: float32 ``[F, B]``.
        ops: int64 ``[F, K]``, valid opcodes.
        params: float64 ``[F, K, 2]``.
    """
    y = x.clone()
    num_slots = ops.shape[1]
    if y.numel() and num_slots:
        o = ops.cpu()
        p = params.to(torch.float32)
        for k in range(num_slots):
            for c in (DOP_LOG1P, DOP_CLIP, DOP_NORMALIZE, DOP_FILL_NAN):
                rows = o[:, k] == c
                if not bool(rows.any()):
                    continue
                if bool(rows.all()):
                    y = _apply(c, y, p[:, k, 0, None], p[:, k, 1, None])
                else:
                    idx = rows.nonzero().squeeze(1).to(y.device)
                    a, b = p[idx, k, 0, None], p[idx, k, 1, None]
                    y[idx] = _apply(c, y[idx], a, b)
    return y.t().contiguous()


# ----------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit(do_not_specialize=["batch", "b_tiles"])
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


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------


def dense_program(x: torch.Tensor, ops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Run each dense feature's op program over its row; return the transposed ``[B, F]``.

    Args:
        x: float32 ``[F, B]``, one row per dense feature.
        ops: int64 ``[F, K]`` op codes (``DOP_*``), applied for ``k = 0..K-1``.
        params: float64 ``[F, K, 2]``; rounded to float32 before use (both paths).

    Returns:
        A new float32 ``[B, F]`` tensor (the model's dense input), written by one launch.

    Raises:
        TypeError: an argument of the wrong type or dtype, named.
        ValueError: a bad shape or table, naming the feature and op slot.

    Examples:
        >>> import torch
        >>> ops = torch.tensor([[DOP_FILL_NAN, DOP_CLIP]])
        >>> params = torch.tensor([[[0.0, 0.0], [-1.0, 1.0]]], dtype=torch.float64)
        >>> dense_program(torch.tensor([[float("nan"), 5.0, -0.5]]), ops, params).tolist()
        [[0.0], [1.0], [-0.5]]
    """
    op = "dense_program"
    host.check_tensor(x, "x", op, (torch.float32,), 2)
    host.check_tensor(ops, "ops", op, (torch.int64,), 2)
    host.check_tensor(params, "params", op, (torch.float64,), 3)
    host.check_same_device(op, x=x, ops=ops, params=params)
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
    if num_slots > program_tables.MAX_SLOTS:
        raise ValueError(f"{op}: ops has {num_slots} slots, at most {program_tables.MAX_SLOTS}")
    slot_ops = host.cached(op, (ops, params), lambda: _tables_check(ops, params, op))
    x, ops, params = host.contiguous(x, ops, params)
    if not kernels.use_triton(x, op=op):
        kernels.record_launch("dense_program_reference")
        return dense_program_reference(x, ops, params)
    out = torch.empty(batch, num_features, dtype=torch.float32, device=x.device)
    if num_features and batch:
        kernels.record_launch(op)
        block_f = min(16, next_pow2(num_features))
        block_b = max(16, min(next_pow2(batch), _TILE // block_f))
        b_tiles = triton.cdiv(batch, block_b)
        _dense_program_kernel[(triton.cdiv(num_features, block_f) * b_tiles,)](
            x,
            host.nonempty(ops, torch.int64),
            host.nonempty(params, torch.float64),
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
