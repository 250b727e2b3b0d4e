"""What the per-feature op programs share: op-slot tables and the features' value slices.

:func:`~recstack.feature_engine.kernels.sparse_program.sparse_program` and
:func:`~recstack.feature_engine.kernels.dense_program.dense_program` run a short program of
op slots per feature; both unroll the slots in the kernel and skip, per slot, the opcodes
no feature uses (:func:`slot_opcode_mask`). ``sparse_program`` and
:func:`~recstack.feature_engine.kernels.bucketize_float.bucketize_float` give each feature a
slice of one values buffer through ``value_offsets`` (:func:`check_values_span`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from enum import IntEnum
from typing import Any

import torch

from recstack.core.checks import check_int

__all__ = [
    "MAX_SLOTS",
    "check_value_offsets",
    "check_values_span",
    "feature_label",
    "program_ops",
    "search_steps",
    "slot_count",
    "slot_opcode_mask",
]

#: Most op slots per feature: slots are unrolled in the kernel (and their 4-bit opcode masks
#: travel in one 64-bit constexpr), so programs stay short.
MAX_SLOTS = 12


def feature_label(i: int, j: int | None, names: Sequence[str] | None) -> str:
    """``feature 'name' (index i)``, with ``, op j`` when ``j`` is given, for messages.

    Args:
        i: the feature's index.
        j: the op's index in the feature's program, or ``None``.
        names: the features' names, or ``None`` to name features by index only.
    """
    feature = f"feature {names[i]!r} (index {i})" if names is not None else f"feature {i}"
    return feature if j is None else f"{feature}, op {j}"


def program_ops(
    features: Sequence[Sequence[Sequence[Any]]],
    opcodes: type[IntEnum],
    arity: dict[int, int],
    names: Sequence[str] | None,
) -> Iterator[tuple[int, int, str, int, Sequence[Any]]]:
    """Each op of each feature's list, as ``(feature, slot, label, opcode, op)``.

    Args:
        features: one op list per feature; an op is a tuple ``(opcode, *params)``.
        opcodes: the op's opcode enum, for messages.
        arity: the tuple length of each opcode with a fixed one; an opcode missing here
            (unknown, or of variable length) is the caller's to check.
        names: the features' names for messages (``label`` is :func:`feature_label`).

    Raises:
        TypeError: an op that is not a non-empty tuple, or an opcode that is not an int.
        ValueError: an op of the wrong length for its opcode.
    """
    for i, ops in enumerate(features):
        for j, op in enumerate(ops):
            where = feature_label(i, j, names)
            if not isinstance(op, Sequence) or not op:
                raise TypeError(f"{where}: an op is a tuple (opcode, *params), got {op!r}")
            code = check_int(op[0], f"{where}: opcode")
            if code in arity and len(op) != arity[code]:
                raise ValueError(
                    f"{where}: {opcodes(code).name} takes {arity[code] - 1} parameter(s), "
                    f"got {op!r}"
                )
            yield i, j, where, code, op


def slot_count(lengths: list[int], slots: int | None, names: Sequence[str] | None) -> int:
    """The slots every program is padded to: ``slots``, or the longest program's length.

    Args:
        lengths: each feature's number of ops.
        slots: the slot count asked for, or ``None``.
        names: the features' names for messages, or ``None``.

    Raises:
        ValueError: a program, or ``slots``, exceeds :data:`MAX_SLOTS`, or ``slots`` is
            shorter than the longest program.
    """
    k = max(lengths, default=0)
    if k > MAX_SLOTS:
        where = feature_label(lengths.index(k), None, names)
        raise ValueError(f"{where} has {k} ops; programs have at most {MAX_SLOTS} op slots")
    if slots is not None:
        if check_int(slots, "slots") < k:
            raise ValueError(f"slots={slots} is less than the longest program ({k} ops)")
        if slots > MAX_SLOTS:
            raise ValueError(f"slots={slots}: programs have at most {MAX_SLOTS} op slots")
        k = slots
    return k


def slot_opcode_mask(codes: torch.Tensor, nop: int) -> int:
    """One bit per (slot, opcode) in use: bit ``4 * k + code - 1`` for slot ``k``.

    The kernels read it as a constexpr and compile only the opcodes some feature uses in
    each slot, so absent ops cost nothing.

    Args:
        codes: int64 ``[F, K]`` opcodes on the host, in ``[nop, nop + 4]``.
        nop: the opcode that does nothing (it sets no bit).
    """
    mask = 0
    for k in range(codes.shape[1]):
        for c in torch.unique(codes[:, k]).tolist():
            if c != nop:
                mask |= 1 << (4 * k + c - 1)
    return mask


def search_steps(count: int) -> int:
    """Binary-search steps that narrow ``count`` candidates to one (``ceil(log2(count))``).

    Args:
        count: the number of candidates (features, say), ``>= 0``.
    """
    return max(count - 1, 0).bit_length()


def check_values_span(
    values: torch.Tensor,
    value_offsets: torch.Tensor,
    num_features: int,
    op: str,
    check_offsets: bool,
) -> int:
    """``len(values)``, after checking the offsets cover it (the host sync only when asked).

    Args:
        values: the values buffer the features slice.
        value_offsets: int64 ``[F + 1]``, feature ``f``'s slice bounds at ``f`` and ``f + 1``.
        num_features: ``F``.
        op: the op's name, for the message.
        check_offsets: whether to read ``value_offsets`` back (:func:`check_value_offsets`);
            a buffer with values and no features is refused either way (host-known).

    Raises:
        ValueError: the offsets do not split ``values``.
    """
    n = values.numel()
    if num_features == 0 and n:
        raise ValueError(f"{op}: values has {n} elements but there are no features")
    if check_offsets:
        check_value_offsets(value_offsets, n, op)
    return n


def check_value_offsets(
    offsets: torch.Tensor, n: int, op: str, name: str = "value_offsets"
) -> None:
    """Raise unless ``offsets`` starts at 0, ends at ``n`` and never decreases (one host sync).

    Args:
        offsets: int64 ``[F + 1]``.
        n: the length of the buffer they split.
        op: the op's name, for the message.
        name: the argument's name, for the message.

    Raises:
        ValueError: naming the first and last offsets and the first feature whose slice
            would have a negative length.
    """
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
