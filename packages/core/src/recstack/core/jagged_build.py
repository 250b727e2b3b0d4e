"""Dense and padded id tensors packed key-major into one KeyedJaggedTensor, without a sync.

:class:`DenseFeatures` (every row has ``n_k`` ids) and :class:`PaddedFeatures` (rows
padded to ``L_k``) describe features; :func:`pack_features` lays out any sequence of
them, and of ``{key: JaggedTensor}`` dicts, in one values buffer. Each feature becomes a
row-major slot buffer with a mask of the slots holding items; when every slot holds an
item the buffers are simply concatenated (a compact layout with known per-key totals),
otherwise one gather moves all items first and the padding slots after them (a capacity
layout, see :mod:`recstack.core.capacity`). Output sizes depend only on shapes, so
nothing reads the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from recstack.core.capacity import count_mask, items_first_index, padded_item_mask
from recstack.core.jagged import _INDEX_DTYPES, JaggedTensor, Side, _check_side
from recstack.core.length_check import LengthCheck

__all__ = ["DenseFeatures", "FeatureGroup", "PackedFeatures", "PaddedFeatures", "pack_features"]


@dataclass(frozen=True)
class DenseFeatures:
    """Features whose every row has the same number of ids, one tensor per key.

    Args:
        ids: ``{key: [B, n_k]}`` (``n_k`` ids per row; ``n_k`` may differ between keys and
            may be 0), ``{key: [B]}`` for one id per row, or ``[B, n_k, *trailing]``.
        weights: optional ``{key: [B, n_k]}`` (``[B]`` for 1-D ids) per-id weights, for
            every key of ``ids``.
    """

    ids: Mapping[str, torch.Tensor]
    weights: Mapping[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class PaddedFeatures:
    """Variable-length features given as padded ``[B, L_k]`` tensors, one per key.

    Which slots hold items comes from at most one of:

    * ``lengths``: ``{key: [B]}`` items per row, padded on ``side`` (for every key);
    * ``mask``: ``{key: bool [B, L_k]}``, True at the items (for every key; any pattern);
    * ``pad``: the padding id; every slot not equal to ``pad`` is an item;
    * none of them: every slot is an item (rows of exactly ``L_k`` ids).

    ``lengths``, ``mask`` and ``weights`` are moved to their ids' device; keep them there
    (a copy from pageable host memory would wait for the device).

    Args:
        ids: ``{key: [B, L_k]}`` padded rows (``[B, L_k, *trailing]`` with ``lengths`` or
            ``mask``).
        lengths: optional ``{key: integer [B]}`` row lengths in ``[0, L_k]``.
        mask: optional ``{key: bool [B, L_k]}`` item masks.
        pad: optional padding id (instead of ``lengths`` or ``mask``).
        side: with ``lengths``, where the padding is: ``"right"`` (row ``i`` is
            ``ids[i, :lengths[i]]``) or ``"left"`` (``ids[i, L - lengths[i]:]``).
        weights: optional ``{key: [B, L_k]}`` per-slot weights, padded like ``ids``.
    """

    ids: Mapping[str, torch.Tensor]
    lengths: Mapping[str, torch.Tensor] | None = None
    mask: Mapping[str, torch.Tensor] | None = None
    pad: int | float | None = None
    side: Side = "right"
    weights: Mapping[str, torch.Tensor] | None = None


FeatureGroup = DenseFeatures | PaddedFeatures | Mapping[str, JaggedTensor]


@dataclass
class PackedFeatures:
    """The tensors of a key-major KeyedJaggedTensor, as :func:`pack_features` lays them out.

    Args:
        keys: feature names in order.
        values: every key's items, key-major; in a capacity layout followed by padding.
        lengths: int64 ``[K * B]``, key-major.
        weights: ``[len(values)]`` or ``None``.
        stride: the batch size ``B``.
        length_per_key: items per key when known without a sync (compact layouts).
        compact: whether ``values`` holds exactly the items.
        pending: length bounds still to check at the next host sync.
    """

    keys: list[str]
    values: torch.Tensor
    lengths: torch.Tensor
    weights: torch.Tensor | None
    stride: int
    length_per_key: list[int] | None
    compact: bool
    pending: LengthCheck | None


@dataclass
class _Slots:
    """One feature as a row-major slot buffer."""

    key: str
    values: torch.Tensor  # [C, *trailing]
    lengths: torch.Tensor  # int64 [B], consistent with valid
    weights: torch.Tensor | None  # [C]
    valid: torch.Tensor | None  # bool [C]; None: every slot is an item
    pending: LengthCheck | None = None


def _check_mapping(op: str, what: str, m: object) -> Mapping[str, torch.Tensor]:
    if not isinstance(m, Mapping):
        raise TypeError(f"{op}: {what} must be a dict of tensors by key, got {type(m).__name__}")
    for key, t in m.items():
        if not isinstance(key, str):
            raise TypeError(f"{op}: {what} keys must be str, got {key!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {what}[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
    return m


def _same_keys(op: str, what: str, ids: Mapping[str, torch.Tensor], other: Mapping) -> None:
    missing = [k for k in ids if k not in other]
    extra = [k for k in other if k not in ids]
    if missing or extra:
        raise ValueError(
            f"{op}: {what} must have exactly the keys of ids; missing {missing}, unexpected {extra}"
        )


def _weights_for(
    op: str, key: str, weights: Mapping[str, torch.Tensor] | None, shape: tuple[int, ...]
) -> torch.Tensor | None:
    if weights is None:
        return None
    w = weights[key]
    if tuple(w.shape) != shape:
        raise ValueError(
            f"{op}: feature {key!r}: weights must have shape {shape}, got {tuple(w.shape)}"
        )
    if not w.dtype.is_floating_point:
        raise TypeError(f"{op}: feature {key!r}: weights must be floating point, got {w.dtype}")
    return w


def _dense_slots(op: str, group: DenseFeatures) -> list[_Slots]:
    ids = _check_mapping(op, "ids", group.ids)
    weights = None
    if group.weights is not None:
        weights = _check_mapping(op, "weights", group.weights)
        _same_keys(op, "weights", ids, weights)
    out = []
    for key, t in ids.items():
        if t.dim() == 0:
            raise ValueError(f"{op}: feature {key!r}: ids must be [B] or [B, n], got a scalar")
        items = t if t.dim() == 1 else t.flatten(0, 1)
        per_row = 1 if t.dim() == 1 else t.shape[1]
        w = _weights_for(op, key, weights, tuple(t.shape[: min(t.dim(), 2)]))
        if w is not None:
            w = w.to(t.device).reshape(-1)
        lengths = torch.full((t.shape[0],), per_row, dtype=torch.int64, device=t.device)
        out.append(_Slots(key, items, lengths, w, None))
    return out


def _index_tensor(op: str, key: str, t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: feature {key!r}: lengths must be integers, got {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ValueError(
            f"{op}: feature {key!r}: lengths must have shape ({batch},) (one per row), "
            f"got {tuple(t.shape)}"
        )
    return t.to(torch.int64)


def _padded_slots(op: str, group: PaddedFeatures) -> list[_Slots]:
    ids = _check_mapping(op, "ids", group.ids)
    _check_side("side", group.side)
    lengths = mask = weights = None
    given = [n for n in ("lengths", "mask", "pad") if getattr(group, n) is not None]
    if len(given) > 1:
        raise ValueError(f"{op}: give at most one of lengths, mask and pad, got {given}")
    if group.lengths is not None:
        lengths = _check_mapping(op, "lengths", group.lengths)
        _same_keys(op, "lengths", ids, lengths)
    elif group.mask is not None:
        mask = _check_mapping(op, "mask", group.mask)
        _same_keys(op, "mask", ids, mask)
    if group.weights is not None:
        weights = _check_mapping(op, "weights", group.weights)
        _same_keys(op, "weights", ids, weights)
    out = []
    for key, t in ids.items():
        if t.dim() < 2:
            raise ValueError(
                f"{op}: feature {key!r}: padded ids must be [B, L], got shape {tuple(t.shape)}"
            )
        batch, width = t.shape[0], t.shape[1]
        device = t.device
        w = _weights_for(op, key, weights, (batch, width))
        if w is not None:
            w = w.to(device).reshape(-1)
        pending = None
        if lengths is not None:
            given = _index_tensor(op, key, lengths[key], batch).to(device)
            pending = LengthCheck.of(f"{op}: feature {key!r}", width, given)
            # Clamped, a bad length still gives self-consistent rows until the check reports.
            rows = given.clamp(0, width)
            valid = padded_item_mask(rows, width, group.side)
        elif mask is not None:
            valid = mask[key]
            if valid.dtype != torch.bool or tuple(valid.shape) != (batch, width):
                raise ValueError(
                    f"{op}: feature {key!r}: mask must be bool [B, L] = {(batch, width)}, "
                    f"got {valid.dtype} {tuple(valid.shape)}"
                )
            valid = valid.to(device)
            rows = valid.sum(1, dtype=torch.int64)
        elif group.pad is not None:
            if t.dim() != 2:
                raise ValueError(
                    f"{op}: feature {key!r}: pad= needs [B, L] ids (one id per slot), got "
                    f"shape {tuple(t.shape)}; give lengths or mask instead"
                )
            valid = t != group.pad
            rows = valid.sum(1, dtype=torch.int64)
        else:
            valid = None
            rows = torch.full((batch,), width, dtype=torch.int64, device=device)
        flat_valid = valid.reshape(-1) if valid is not None else None
        out.append(_Slots(key, t.flatten(0, 1), rows, w, flat_valid, pending))
    return out


def _jagged_slots(op: str, group: Mapping[str, JaggedTensor]) -> list[_Slots]:
    out = []
    for key, jt in group.items():
        if not isinstance(key, str):
            raise TypeError(f"{op}: keys must be str, got {key!r}")
        if not isinstance(jt, JaggedTensor):
            raise TypeError(f"{op}: feature {key!r} is a {type(jt).__name__}, not a JaggedTensor")
        if jt.is_nested:
            raise TypeError(f"{op}: feature {key!r} is a nested JaggedTensor; pack flat ones")
        valid = None
        if not jt.is_compact:
            valid = count_mask(jt.values.shape[0], jt.offsets[-1])
        out.append(_Slots(key, jt.values, jt.lengths(), jt.weights, valid, jt._pending))
    return out


def _slots(op: str, group: object) -> list[_Slots]:
    if isinstance(group, DenseFeatures):
        return _dense_slots(op, group)
    if isinstance(group, PaddedFeatures):
        return _padded_slots(op, group)
    if isinstance(group, Mapping):
        return _jagged_slots(op, group)
    raise TypeError(
        f"{op}: each group must be DenseFeatures, PaddedFeatures or a dict of JaggedTensors, "
        f"got {type(group).__name__}"
    )


def _check_alike(op: str, slots: list[_Slots]) -> None:
    """One batch size, dtype, item shape, device and weighting across features."""
    head = slots[0]
    for s in slots[1:]:
        if s.lengths.shape[0] != head.lengths.shape[0]:
            raise ValueError(
                f"{op}: feature {s.key!r} has batch size {s.lengths.shape[0]}, "
                f"feature {head.key!r} has {head.lengths.shape[0]}"
            )
        if s.values.dtype != head.values.dtype or s.values.shape[1:] != head.values.shape[1:]:
            raise ValueError(
                f"{op}: feature {s.key!r} is {s.values.dtype} {tuple(s.values.shape[1:])} per "
                f"item, feature {head.key!r} is {head.values.dtype} "
                f"{tuple(head.values.shape[1:])}; use one dtype for all keys"
            )
        if s.values.device != head.values.device:
            raise ValueError(
                f"{op}: feature {s.key!r} is on {s.values.device}, "
                f"feature {head.key!r} on {head.values.device}"
            )
        if (s.weights is None) != (head.weights is None):
            weighted, plain = (s, head) if s.weights is not None else (head, s)
            raise ValueError(
                f"{op}: feature {weighted.key!r} has weights but feature {plain.key!r} has "
                "none; weight every feature or none"
            )
        if (
            s.weights is not None
            and head.weights is not None
            and s.weights.dtype != head.weights.dtype
        ):
            raise ValueError(
                f"{op}: feature {s.key!r} has {s.weights.dtype} weights, "
                f"feature {head.key!r} has {head.weights.dtype}"
            )


def pack_features(op: str, groups: Sequence[object]) -> PackedFeatures:
    """Lay out every feature of ``groups``, in order, key-major in one buffer (no sync).

    The layout is compact (``length_per_key`` known) when every slot of every feature is
    an item (dense features, padded ones without lengths, mask or pad, compact
    JaggedTensors); otherwise it is a capacity layout.

    Args:
        op: the caller's name, for error messages.
        groups: :class:`DenseFeatures`, :class:`PaddedFeatures` or ``{key: JaggedTensor}``.
    """
    slots = [s for g in groups for s in _slots(op, g)]
    if not slots:
        raise ValueError(f"{op}: needs at least one feature")
    keys = [s.key for s in slots]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"{op}: feature(s) {dupes} given more than once")
    _check_alike(op, slots)
    values = torch.cat([s.values for s in slots])
    has_w = slots[0].weights is not None
    weights = torch.cat([s.weights for s in slots]) if has_w else None  # type: ignore[misc]
    lengths = torch.cat([s.lengths for s in slots])
    compact = all(s.valid is None for s in slots)
    if compact:
        lpk: list[int] | None = [s.values.shape[0] for s in slots]
    else:
        lpk = None
        device = values.device
        valid = torch.cat(
            [
                s.valid
                if s.valid is not None
                else torch.ones(s.values.shape[0], dtype=torch.bool, device=device)
                for s in slots
            ]
        )
        order = items_first_index(valid)
        values = values.index_select(0, order)
        weights = weights.index_select(0, order) if weights is not None else None
        compact = values.shape[0] == 0
    pending = LengthCheck.merge([s.pending for s in slots])
    if compact and lpk is None and pending is None:
        lpk = [0] * len(slots)
    return PackedFeatures(
        keys=keys,
        values=values,
        lengths=lengths,
        weights=weights,
        stride=int(slots[0].lengths.shape[0]),
        length_per_key=lpk,
        compact=compact,
        pending=pending,
    )
