"""KeyedJaggedTensor: many jagged features of one batch packed in one values buffer.

The layout is TorchRec's: ``lengths`` is key-major ``[K * B]`` (key 0's ``B`` row lengths,
then key 1's, ...) and ``values`` holds every key's items in that same order, so key ``k``
owns the contiguous slice ``values[offset_per_key()[k]:offset_per_key()[k + 1]]``.

For example:

    >>> import torch
    >>> from recstack.core.keyed_jagged import KeyedJaggedTensor
    >>> kjt = KeyedJaggedTensor(
    ...     ["user_seq", "item_tags"],
    ...     values=torch.tensor([11, 12, 13, 21, 22]),
    ...     lengths=torch.tensor([2, 1, 0, 2]),  # B = 2 rows per key
    ... )
    >>> kjt.length_per_key(), kjt["item_tags"].lengths().tolist()
    ([3, 2], [0, 2])
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from recstack.core.capacity import count_mask, items_first_index
from recstack.core.jagged import (
    JaggedTensor,
    Side,
    _as_index_tensor,
    _check_same_device,
    _check_weights,
    _offsets_from_lengths,
)
from recstack.core.jagged_build import (
    DenseFeatures,
    FeatureGroup,
    PackedFeatures,
    PaddedFeatures,
    pack_features,
)
from recstack.core.length_check import LengthCheck

__all__ = ["KeyedJaggedTensor"]


def _check_keys(keys: Sequence[str]) -> list[str]:
    if isinstance(keys, str):
        raise TypeError("KeyedJaggedTensor: keys must be a list of str, got a single str")
    keys = list(keys)
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"KeyedJaggedTensor: keys must be str, got {k!r}")
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"KeyedJaggedTensor: duplicate keys {dupes}")
    return keys


class KeyedJaggedTensor:
    """Jagged features ``keys`` over a batch of ``stride()`` rows, packed key-major.

    ``lengths`` (or ``offsets``, ``K * B + 1`` entries) delimits the rows; ``weights``, when
    given, has one entry per item of ``values``. ``stride`` defaults to
    ``len(lengths) // len(keys)``. ``length_per_key`` (items per key) may be passed when
    known, sparing the host sync that computing it costs. The constructor never syncs;
    :meth:`validate` checks the contents.

    ``kjt["key"]`` is a :class:`JaggedTensor` whose ``values`` is a slice of the packed
    buffer (no copy).

    ``compact=False`` declares a *capacity* layout: ``values`` may be longer than
    ``offsets()[-1]``, and ``values()[offsets()[-1]:]`` is unused padding. The sync-free
    :meth:`from_padded` builds one. Per-key views, :meth:`split` and :meth:`permute` read
    only the items; :meth:`compact` trims the padding (one sync) for code that reads
    ``values()`` as a whole.

    For example:

        >>> kjt = KeyedJaggedTensor(["a", "b"], torch.tensor([1, 2, 3]), torch.tensor([1, 0, 2, 0]))
        >>> kjt.stride(), kjt["b"].to_list()
        (2, [[2, 3], []])
    """

    def __init__(
        self,
        keys: Sequence[str],
        values: torch.Tensor,
        lengths: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        stride: int | None = None,
        offsets: torch.Tensor | None = None,
        length_per_key: Sequence[int] | None = None,
        *,
        compact: bool = True,
    ) -> None:
        keys = _check_keys(keys)
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"KeyedJaggedTensor: values must be a torch.Tensor, got {type(values)}")
        if values.dim() < 1:
            raise ValueError("KeyedJaggedTensor: values must have at least 1 dim (items first)")
        _check_weights("KeyedJaggedTensor", values, weights)
        if offsets is not None:
            offsets = _as_index_tensor("KeyedJaggedTensor: offsets", offsets)
            if offsets.numel() < 1:
                raise ValueError("KeyedJaggedTensor: offsets needs K * B + 1 >= 1 entries")
        if lengths is not None:
            lengths = _as_index_tensor("KeyedJaggedTensor: lengths", lengths)
        elif offsets is not None:
            lengths = offsets[1:] - offsets[:-1]
        else:
            raise ValueError("KeyedJaggedTensor: give lengths or offsets")
        if offsets is not None and offsets.numel() != lengths.numel() + 1:
            raise ValueError(
                f"KeyedJaggedTensor: offsets has {offsets.numel()} entries, "
                f"expected len(lengths) + 1 = {lengths.numel() + 1}"
            )
        _check_same_device(
            "KeyedJaggedTensor", values=values, lengths=lengths, weights=weights, offsets=offsets
        )
        n_keys = len(keys)
        if stride is None:
            if n_keys == 0:
                if lengths.numel() != 0:
                    raise ValueError("KeyedJaggedTensor: no keys but lengths is not empty")
                stride = 0
            else:
                stride = lengths.numel() // n_keys
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            raise ValueError(
                f"KeyedJaggedTensor: stride must be a non-negative int, got {stride!r}"
            )
        if lengths.numel() != n_keys * stride:
            raise ValueError(
                f"KeyedJaggedTensor: lengths has {lengths.numel()} entries, expected "
                f"len(keys) * stride = {n_keys} * {stride} (key-major, one per key and row)"
            )
        if length_per_key is not None:
            length_per_key = [int(n) for n in length_per_key]
            if len(length_per_key) != n_keys:
                raise ValueError(
                    f"KeyedJaggedTensor: length_per_key has {len(length_per_key)} entries "
                    f"for {n_keys} keys"
                )
            total = sum(length_per_key)
            if total > values.shape[0] or (compact and total != values.shape[0]):
                raise ValueError(
                    f"KeyedJaggedTensor: length_per_key sums to {total} but values "
                    f"has {values.shape[0]} items"
                )
        self._keys = keys
        self._index = {k: i for i, k in enumerate(keys)}
        self._values = values
        self._lengths = lengths
        self._weights = weights
        self._stride = stride
        self._offsets = offsets
        self._length_per_key = length_per_key
        self._offset_per_key: list[int] | None = None
        self._compact = bool(compact)
        # Lengths a sync-free constructor could not check yet (see length_check.py).
        self._pending: LengthCheck | None = None

    # ------------------------------------------------------------------ accessors

    def keys(self) -> list[str]:
        return list(self._keys)

    def values(self) -> torch.Tensor:
        return self._values

    def lengths(self) -> torch.Tensor:
        """Row lengths, key-major int64 ``[K * B]``."""
        return self._lengths

    def offsets(self) -> torch.Tensor:
        """``[K * B + 1]`` int64 offsets into ``values`` (computed once, no host sync)."""
        if self._offsets is None:
            self._offsets = _offsets_from_lengths(self._lengths)
        return self._offsets

    def weights(self) -> torch.Tensor:
        if self._weights is None:
            raise ValueError("this KeyedJaggedTensor has no weights; use weights_or_none()")
        return self._weights

    def weights_or_none(self) -> torch.Tensor | None:
        return self._weights

    def stride(self) -> int:
        """Batch size ``B`` (rows per key)."""
        return self._stride

    def length_per_key(self) -> list[int]:
        """Items per key. The first call reads them from the device (one sync), then cached.

        That read also runs the length check a sync-free :meth:`from_padded` left pending,
        so a length outside ``[0, L]`` raises here, before any row is used.
        """
        if self._length_per_key is None:
            if self._stride == 0 or not self._keys:
                self._length_per_key = [0] * len(self._keys)
            else:
                per_key = self._lengths.view(len(self._keys), self._stride).sum(1)
                pending = self._pending
                if pending is None:
                    self._length_per_key = per_key.tolist()
                else:
                    synced = torch.cat([per_key, pending.bounds]).tolist()
                    pending.raise_if_bad(synced[len(self._keys) :])
                    self._pending = None
                    self._length_per_key = synced[: len(self._keys)]
        return list(self._length_per_key)

    @property
    def is_compact(self) -> bool:
        """Whether ``values()`` holds exactly the items (False: a capacity layout)."""
        return self._compact

    def compact(self) -> KeyedJaggedTensor:
        """This KJT with ``values`` (and ``weights``) trimmed to the items.

        A compact KJT is returned as is. A capacity layout reads :meth:`length_per_key`
        (one host sync unless already known, running any pending length check); the result
        shares memory with ``self`` (slices, no copy).
        """
        if self._compact and self._pending is None:
            return self
        lpk = self.length_per_key()
        if self._pending is not None:  # length_per_key was given: check the lengths here
            self._pending.run()
            self._pending = None
        if self._compact:
            return self
        total = sum(lpk)
        out = KeyedJaggedTensor(
            self._keys,
            self._values[:total],
            self._lengths,
            weights=self._weights[:total] if self._weights is not None else None,
            stride=self._stride,
            offsets=self._offsets,
            length_per_key=lpk,
        )
        out._offset_per_key = self._offset_per_key
        return out

    def offset_per_key(self) -> list[int]:
        """``K + 1`` offsets: key ``k`` owns ``values[opk[k]:opk[k + 1]]``."""
        if self._offset_per_key is None:
            self._offset_per_key = [0, *itertools.accumulate(self.length_per_key())]
        return list(self._offset_per_key)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[str]:
        """Iterate over the keys, like a dict (``kjt[key]`` gives each feature)."""
        return iter(list(self._keys))

    @property
    def device(self) -> torch.device:
        return self._values.device

    @property
    def dtype(self) -> torch.dtype:
        return self._values.dtype

    def key_index(self, key: str) -> int:
        """The position of feature ``key`` among the keys.

        Raises:
            KeyError: no such key.
        """
        try:
            return self._index[key]
        except (KeyError, TypeError):
            raise KeyError(f"unknown feature {key!r}; available keys: {self._keys}") from None

    def __getitem__(self, key: str) -> JaggedTensor:
        """Feature ``key`` as a JaggedTensor: ``values``/``weights`` are slices (no copy)."""
        k = self.key_index(key)
        opk = self.offset_per_key()
        lo, hi = opk[k], opk[k + 1]
        b = self._stride
        offsets = self.offsets()[k * b : (k + 1) * b + 1] - lo
        w = self._weights[lo:hi] if self._weights is not None else None
        return JaggedTensor(self._values[lo:hi], offsets, w)

    def to_dict(self) -> dict[str, JaggedTensor]:
        """Every feature as a zero-copy JaggedTensor view."""
        return {key: self[key] for key in self._keys}

    def validate(self) -> KeyedJaggedTensor:
        """Check the contents (one host sync); returns ``self``.

        Lengths must be >= 0, sum to the number of items (at most ``len(values)`` for a
        capacity layout), and agree with any given offsets and ``length_per_key``; a
        sync-free :meth:`from_padded`'s lengths must have been within ``[0, L]``.
        """
        n = self._values.shape[0]
        n_keys = len(self._keys)
        zero = torch.zeros((), dtype=torch.int64, device=self._lengths.device)
        mismatch = zero
        if self._offsets is not None:
            rebuilt = _offsets_from_lengths(self._lengths)
            mismatch = (rebuilt != self._offsets).any().to(torch.int64)
        per_key = self._lengths.view(n_keys, self._stride).sum(1)
        head = torch.stack(
            [(self._lengths < 0).any().to(torch.int64), self._lengths.sum(), mismatch]
        )
        pending = self._pending
        bounds = [pending.bounds] if pending is not None else []
        result = torch.cat([head, per_key, *bounds]).tolist()
        negative, total, bad_offsets = result[0], result[1], result[2]
        actual = result[3 : 3 + n_keys]
        if pending is not None:
            pending.raise_if_bad(result[3 + n_keys :])
            self._pending = None
        if negative:
            raise ValueError("KeyedJaggedTensor: lengths must be >= 0")
        if total > n or (self._compact and total != n):
            raise ValueError(f"KeyedJaggedTensor: lengths sum to {total} but values has {n} items")
        if bad_offsets:
            raise ValueError("KeyedJaggedTensor: offsets do not match cumsum(lengths) from 0")
        if self._length_per_key is not None and actual != self._length_per_key:
            raise ValueError(
                f"KeyedJaggedTensor: length_per_key {self._length_per_key} does not match "
                f"the lengths ({actual})"
            )
        return self

    # ------------------------------------------------------------------ restructuring

    def split(self, segments: Sequence[int]) -> list[KeyedJaggedTensor]:
        """Consecutive key groups of ``segments[i]`` keys each; every piece is zero-copy."""
        segments = list(segments)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in segments):
            raise ValueError(f"split: segments must be non-negative ints, got {segments}")
        if sum(segments) != len(self._keys):
            raise ValueError(
                f"split: segments {segments} sum to {sum(segments)}, "
                f"expected {len(self._keys)} keys"
            )
        lpk = self.length_per_key()
        opk = self.offset_per_key()
        b = self._stride
        out: list[KeyedJaggedTensor] = []
        first = 0
        for size in segments:
            last = first + size
            lo, hi = opk[first], opk[last]
            offsets = None
            if self._offsets is not None:
                offsets = self._offsets[first * b : last * b + 1] - lo
            out.append(
                KeyedJaggedTensor(
                    self._keys[first:last],
                    self._values[lo:hi],
                    self._lengths[first * b : last * b],
                    weights=self._weights[lo:hi] if self._weights is not None else None,
                    stride=b,
                    offsets=offsets,
                    length_per_key=lpk[first:last],
                )
            )
            first = last
        return out

    def permute(self, order: Sequence[int]) -> KeyedJaggedTensor:
        """Keys in ``order`` (indices into ``keys()``; a subset is allowed, repeats are not).

        Values and weights are reordered with one gather.
        """
        order = [int(i) for i in order]
        n_keys = len(self._keys)
        bad = [i for i in order if not 0 <= i < n_keys]
        if bad:
            raise ValueError(f"permute: indices {bad} out of range for {n_keys} keys")
        if len(set(order)) != len(order):
            raise ValueError(f"permute: order {order} repeats a key")
        lpk = self.length_per_key()
        opk = self.offset_per_key()
        b = self._stride
        device = self._values.device
        seg_len = [lpk[i] for i in order]
        total = sum(seg_len)
        dst_start = [0, *itertools.accumulate(seg_len)][:-1]
        shift = [opk[i] - d for i, d in zip(order, dst_start, strict=True)]
        # Item j of the output comes from j + shift of its key's segment.
        index = torch.arange(total, device=device) + torch.repeat_interleave(
            torch.tensor(shift, dtype=torch.int64, device=device),
            torch.tensor(seg_len, dtype=torch.int64, device=device),
            output_size=total,
        )
        order_t = torch.tensor(order, dtype=torch.int64, device=device)
        lengths = self._lengths.view(n_keys, b).index_select(0, order_t).reshape(-1)
        return KeyedJaggedTensor(
            [self._keys[i] for i in order],
            self._values.index_select(0, index),
            lengths,
            weights=self._weights.index_select(0, index) if self._weights is not None else None,
            stride=b,
            length_per_key=seg_len,
        )

    @staticmethod
    def concat(kjts: Sequence[KeyedJaggedTensor]) -> KeyedJaggedTensor:
        """Keys of every input, in order, over the same batch (same ``stride()``).

        Capacity-layout inputs give a capacity-layout result, still without a host sync.
        """
        kjts = list(kjts)
        if not kjts:
            raise ValueError("concat: needs at least one KeyedJaggedTensor")
        head = kjts[0]
        has_w = head._weights is not None
        for i, kjt in enumerate(kjts):
            if kjt.stride() != head.stride():
                raise ValueError(
                    f"concat: input {i} has stride {kjt.stride()}, input 0 has {head.stride()}"
                )
            if kjt.dtype != head.dtype or kjt._values.shape[1:] != head._values.shape[1:]:
                raise ValueError(
                    f"concat: input {i} values are {kjt.dtype} {tuple(kjt._values.shape[1:])}, "
                    f"input 0 values are {head.dtype} {tuple(head._values.shape[1:])}"
                )
            if kjt.device != head.device:
                raise ValueError(f"concat: input {i} is on {kjt.device}, input 0 on {head.device}")
            if (kjt._weights is not None) != has_w:
                raise ValueError(f"concat: input {i} and input 0 differ in having weights")
        keys = [k for kjt in kjts for k in kjt._keys]  # duplicates rejected by the constructor
        lpks = [kjt._length_per_key for kjt in kjts]
        lpk = None if any(x is None for x in lpks) else [n for x in lpks for n in x]
        values = torch.cat([kjt._values for kjt in kjts])
        weights = torch.cat([kjt._weights for kjt in kjts]) if has_w else None  # type: ignore[misc]
        compact = all(kjt._compact for kjt in kjts)
        if not compact:
            # Each input's items, then the next input's: all padding goes to the end.
            valid = torch.cat([kjt._item_mask() for kjt in kjts])
            order = items_first_index(valid)
            values = values.index_select(0, order)
            weights = weights.index_select(0, order) if weights is not None else None
        out = KeyedJaggedTensor(
            keys,
            values,
            torch.cat([kjt._lengths for kjt in kjts]),
            weights=weights,
            stride=head.stride(),
            length_per_key=lpk,
            compact=compact,
        )
        out._pending = LengthCheck.merge([kjt._pending for kjt in kjts])
        return out

    def _item_mask(self) -> torch.Tensor:
        """Bool ``[len(values)]``: True at the slots holding items (all, when compact)."""
        n = self._values.shape[0]
        if self._compact:
            return torch.ones(n, dtype=torch.bool, device=self._values.device)
        return count_mask(n, self.offsets()[-1])

    @classmethod
    def from_jagged_dict(cls, features: Mapping[str, JaggedTensor]) -> KeyedJaggedTensor:
        """Pack ``{key: JaggedTensor}`` (one batch size, values dtype and device) into a KJT.

        Each JaggedTensor must start at 0 (``offsets[0] == 0``, as
        :meth:`JaggedTensor.validate` checks). Compact ones (``offsets[-1] == len(values)``)
        give a compact KJT whose per-key lengths are known without a host sync; if any is
        a capacity layout (``compact=False``) the result is one too, still without a sync.
        """
        if not features:
            raise ValueError("from_jagged_dict: needs at least one feature")
        items = list(features.items())
        key0, jt0 = items[0]
        has_w = jt0.weights is not None
        for key, jt in items:
            if not isinstance(jt, JaggedTensor):
                raise TypeError(f"from_jagged_dict: feature {key!r} is a {type(jt).__name__}")
            if len(jt) != len(jt0):
                raise ValueError(
                    f"from_jagged_dict: feature {key!r} has batch size {len(jt)}, "
                    f"feature {key0!r} has {len(jt0)}"
                )
            if jt.values.dtype != jt0.values.dtype or jt.values.shape[1:] != jt0.values.shape[1:]:
                raise ValueError(
                    f"from_jagged_dict: feature {key!r} values are {jt.values.dtype} "
                    f"{tuple(jt.values.shape[1:])}, feature {key0!r} values are "
                    f"{jt0.values.dtype} {tuple(jt0.values.shape[1:])}"
                )
            if jt.values.device != jt0.values.device:
                raise ValueError(
                    f"from_jagged_dict: feature {key!r} is on {jt.values.device}, "
                    f"feature {key0!r} on {jt0.values.device}"
                )
            if (jt.weights is not None) != has_w:
                raise ValueError(
                    f"from_jagged_dict: feature {key!r} and feature {key0!r} differ in having "
                    "weights"
                )
        jts = [jt for _, jt in items]
        if any(not jt.is_compact or jt._pending is not None for jt in jts):
            return cls._build("from_jagged_dict", [dict(items)], False)
        return cls(
            [k for k, _ in items],
            torch.cat([jt.values for jt in jts]),
            torch.cat([jt.lengths() for jt in jts]),
            weights=torch.cat([jt.weights for jt in jts]) if has_w else None,
            stride=len(jt0),
            length_per_key=[jt.values.shape[0] for jt in jts],
        )

    @classmethod
    def from_dense(
        cls,
        ids: Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> KeyedJaggedTensor:
        """Features whose every row has ``n_k`` ids, from ``{key: [B, n_k]}`` tensors.

        A 1-D ``[B]`` tensor is one id per row. The result is compact with its per-key
        lengths known (``B * n_k``), built with a concatenation and no host sync, so its
        per-key views never sync either.

        Args:
            ids: ``{key: [B, n_k]}`` or ``{key: [B]}``, one batch size, dtype and device.
            weights: optional per-id weights ``{key: [B, n_k]}`` (``[B]`` for 1-D ids),
                for every key.

        For example:

            >>> kjt = KeyedJaggedTensor.from_dense(
            ...     {"user": torch.tensor([7, 8]), "tags": torch.tensor([[1, 2], [3, 4]])}
            ... )
            >>> kjt.lengths().tolist(), kjt["tags"].to_list()
            ([1, 1, 2, 2], [[1, 2], [3, 4]])
        """
        return cls._build("KeyedJaggedTensor.from_dense", [DenseFeatures(ids, weights)], False)

    @classmethod
    def from_padded(
        cls,
        ids: Mapping[str, torch.Tensor],
        lengths: Mapping[str, torch.Tensor] | None = None,
        *,
        mask: Mapping[str, torch.Tensor] | None = None,
        pad: int | float | None = None,
        side: Side = "right",
        weights: Mapping[str, torch.Tensor] | None = None,
        validate: bool = False,
    ) -> KeyedJaggedTensor:
        """Variable-length features from padded ``{key: [B, L_k]}`` tensors, without a sync.

        The items of each row come from one of ``lengths`` (padding on ``side``), ``mask``
        (True at items) or ``pad`` (every id not equal to ``pad``); with none of them every
        slot is an item. See :class:`PaddedFeatures`.

        When some slots are padding, the result is a capacity layout: ``values()`` keeps
        all ``sum_k B * L_k`` slots, the items first (key-major, row by row) and the
        padding after them, because the item count is only known on the device. Per-key
        views, ``split``, ``permute``, padding and ``lengths()`` read only the items;
        :meth:`compact` trims the padding with one host sync.

        A length outside ``[0, L_k]`` cannot be seen without a sync: it is reported (a
        ``ValueError`` naming the key) by the first ``length_per_key()`` (which every
        per-key view calls), :meth:`validate` or :meth:`compact`; ``validate=True``
        checks right away with one host sync.

        Args:
            ids: ``{key: [B, L_k]}`` padded ids, one batch size, dtype and device.
            lengths: optional ``{key: integer [B]}`` row lengths, for every key.
            mask: optional ``{key: bool [B, L_k]}`` item masks, for every key.
            pad: optional padding id (instead of lengths or mask).
            side: with ``lengths``, where the padding is (``"right"`` or ``"left"``).
            weights: optional ``{key: [B, L_k]}`` per-slot weights, for every key.
            validate: check the lengths now (one host sync).

        For example:

            >>> kjt = KeyedJaggedTensor.from_padded(
            ...     {"seq": torch.tensor([[5, 6, 0], [7, 0, 0]])}, {"seq": torch.tensor([2, 1])}
            ... )
            >>> kjt["seq"].to_list(), kjt.values().tolist()
            ([[5, 6], [7]], [5, 6, 7, 0, 0, 0])
        """
        group = PaddedFeatures(ids, lengths, mask, pad, side, weights)
        return cls._build("KeyedJaggedTensor.from_padded", [group], validate)

    @classmethod
    def from_features(
        cls, groups: Sequence[FeatureGroup], *, validate: bool = False
    ) -> KeyedJaggedTensor:
        """One KJT from several groups of features, laid out key-major in group order.

        Each group is :class:`DenseFeatures`, :class:`PaddedFeatures` or a
        ``{key: JaggedTensor}`` dict; keys keep their order within a group. Nothing
        syncs. The result is compact when every group is (dense ids, padded ids without
        lengths, mask or pad, compact JaggedTensors) and a capacity layout otherwise (see
        :meth:`from_padded`).

        Args:
            groups: the feature groups, all over one batch size, values dtype and device.
            validate: check the padded groups' lengths now (one host sync).

        For example:

            >>> from recstack.core.jagged_build import DenseFeatures, PaddedFeatures
            >>> kjt = KeyedJaggedTensor.from_features(
            ...     [
            ...         DenseFeatures({"user": torch.tensor([7, 8])}),
            ...         PaddedFeatures({"seq": torch.tensor([[5, 0], [6, 4]])}, pad=0),
            ...     ]
            ... )
            >>> kjt.keys(), kjt["seq"].to_list()
            (['user', 'seq'], [[5], [6, 4]])
        """
        if isinstance(groups, (DenseFeatures, PaddedFeatures, Mapping)):
            raise TypeError(
                "KeyedJaggedTensor.from_features takes a list of feature groups, not one group"
            )
        return cls._build("KeyedJaggedTensor.from_features", list(groups), validate)

    @classmethod
    def _build(cls, op: str, groups: list[Any], validate: bool) -> KeyedJaggedTensor:
        kjt = cls._from_packed(pack_features(op, groups))
        if validate and kjt._pending is not None:
            kjt._pending.run()
            kjt._pending = None
        return kjt

    @classmethod
    def _from_packed(cls, packed: PackedFeatures) -> KeyedJaggedTensor:
        out = cls(
            packed.keys,
            packed.values,
            packed.lengths,
            weights=packed.weights,
            stride=packed.stride,
            length_per_key=packed.length_per_key,
            compact=packed.compact,
        )
        out._pending = packed.pending
        return out

    # ------------------------------------------------------------------ torchrec

    def to_torchrec(self) -> Any:
        """This KJT as ``torchrec.sparse.jagged_tensor.KeyedJaggedTensor`` (needs torchrec).

        A capacity layout is compacted first (one host sync): TorchRec expects ``values``
        to end with the last row.
        """
        from recstack.core.torchrec_interop import to_torchrec

        return to_torchrec(self)

    @classmethod
    def from_torchrec(cls, trec_kjt: Any) -> KeyedJaggedTensor:
        """Wrap a TorchRec KeyedJaggedTensor's tensors (no copy for int64 lengths)."""
        from recstack.core.torchrec_interop import from_torchrec

        return from_torchrec(trec_kjt)

    # ------------------------------------------------------------------ device movement

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> KeyedJaggedTensor:
        """The same rows with ``fn`` applied to every tensor inside (nested values too).

        How batches are moved, pinned or repacked generically: ``fn`` must keep each
        tensor's shape and meaning (a copy, a move, a view of another buffer).
        """
        return self._map(fn)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> KeyedJaggedTensor:
        out = KeyedJaggedTensor(
            self._keys,
            fn(self._values),
            fn(self._lengths),
            weights=fn(self._weights) if self._weights is not None else None,
            stride=self._stride,
            offsets=fn(self._offsets) if self._offsets is not None else None,
            length_per_key=self._length_per_key,
            compact=self._compact,
        )
        out._offset_per_key = self._offset_per_key
        out._pending = self._pending.map(fn) if self._pending is not None else None
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> KeyedJaggedTensor:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def cuda(
        self, device: torch.device | int | None = None, non_blocking: bool = False
    ) -> KeyedJaggedTensor:
        return self._map(lambda t: t.cuda(device, non_blocking=non_blocking))

    def cpu(self) -> KeyedJaggedTensor:
        return self._map(lambda t: t.cpu())

    def pin_memory(self) -> KeyedJaggedTensor:
        """Page-locked copies of CPU tensors (needs a CUDA build with a device)."""
        return self._map(lambda t: t.pin_memory())

    def is_pinned(self) -> bool:
        return all(t.is_pinned() for t in self._tensors())

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Mark the CUDA tensors as used on ``stream``; CPU tensors are skipped."""
        for t in self._tensors():
            if t.is_cuda:
                t.record_stream(stream)

    def _tensors(self) -> list[torch.Tensor]:
        return [
            t for t in (self._values, self._lengths, self._weights, self._offsets) if t is not None
        ]

    def __repr__(self) -> str:
        w = "" if self._weights is None else ", weighted"
        if not self._compact:
            w += ", capacity layout"
        keys = repr(self._keys) if len(self._keys) <= 8 else f"[{len(self._keys)} keys]"
        return (
            f"KeyedJaggedTensor(keys={keys}, stride={self._stride}, "
            f"values={tuple(self._values.shape)} {self._values.dtype}, "
            f"device={self._values.device}{w})"
        )
