"""JaggedTensor: one variable-length feature for a batch.

Row ``i`` of a batch of ``B`` rows is ``values[offsets[i]:offsets[i + 1]]``. ``values`` may
carry trailing dims (``[N, D]`` for a sequence of embeddings); ``weights`` (optional) holds
one number per item. Strings travel as rows of utf-8 bytes (``uint8`` values).

For example:

    >>> import torch
    >>> from recstack.core.jagged import JaggedTensor
    >>> jt = JaggedTensor.from_lengths(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3]))
    >>> jt.to_padded(max_len=2, side="left", truncate="left").tolist()
    [[0, 1], [0, 0], [3, 4]]
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch

from recstack.core.capacity import items_first_index, padded_item_mask
from recstack.core.length_check import LengthCheck

__all__ = ["JaggedTensor"]

Side = Literal["left", "right"]

_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_side(name: str, value: str) -> None:
    if value not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")


def _as_index_tensor(name: str, t: Any, device: torch.device | None = None) -> torch.Tensor:
    """1-D int64 tensor from an integer tensor (converted, never reinterpreted)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must have an integer dtype (int64 preferred), got {t.dtype}")
    if device is not None and t.device != device:
        t = t.to(device)
    return t.to(torch.int64)


def _offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``[0, cumsum(lengths)...]`` as int64 on the lengths' device; no host sync."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


def _check_same_device(owner: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{owner}: tensors must be on one device, got {listed}")


def _num_items(values: Any) -> int:
    """Items in ``values``: its first dim, or the rows of a nested JaggedTensor."""
    return len(values) if isinstance(values, JaggedTensor) else int(values.shape[0])


def _check_weights(owner: str, values: Any, weights: torch.Tensor | None) -> None:
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{owner}: weights must be a torch.Tensor, got {type(weights).__name__}")
    n = _num_items(values)
    if weights.dim() != 1 or weights.shape[0] != n:
        raise ValueError(
            f"{owner}: weights must be 1-D with one entry per item of values "
            f"({n}), got shape {tuple(weights.shape)}"
        )


def _check_pad_value(dtype: torch.dtype, pad_value: float | int | bool, name: str) -> None:
    # masked_fill would silently truncate 0.5 into an integer tensor.
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return
    info = torch.iinfo(dtype)
    try:
        # Integers are compared exactly: a float64 round trip turns 2**63 - 1 into 2**63.
        exact: int | None = operator.index(pad_value)  # type: ignore[arg-type]
    except TypeError:
        as_float = float(pad_value)
        exact = int(as_float) if as_float.is_integer() else None  # NaN and inf are not
    if exact is None or not info.min <= exact <= info.max:
        raise ValueError(
            f"{name}={pad_value!r} cannot be stored in a {dtype} tensor "
            f"(integers in [{info.min}, {info.max}])"
        )


class JaggedTensor:
    """Variable-length rows packed in one ``values`` buffer, delimited by int64 ``offsets``.

    Row ``i`` is ``values[offsets[i]:offsets[i + 1]]``; ``offsets`` has ``B + 1`` entries.
    ``values`` is ``[N, *trailing]`` (``N`` items over all rows); ``weights``, when given,
    is ``[N]``.

    The constructor only checks what it can without reading device memory (dims, dtypes,
    devices), so it never waits on the GPU; call :meth:`validate` to check the offsets too.
    Integer offsets of any width are converted to int64.

    ``compact=False`` declares a *capacity* layout: ``values`` may be longer than
    ``offsets[-1]``, and ``values[offsets[-1]:]`` is unused padding (what
    ``from_padded(..., compact=False)`` builds without a host sync). Row views, padding
    and ``lengths()`` read only the rows; :meth:`compact` trims the padding off (one sync)
    for code that reads ``values`` as a whole.

    ``values`` may itself be a JaggedTensor (two levels: a ``list<string>`` column is rows
    of strings, each string a row of bytes; see :meth:`from_string_lists`). A nested
    JaggedTensor moves, pins, slices, validates and converts to lists like a flat one;
    padding needs a flat one.

    For example:

        >>> jt = JaggedTensor(torch.tensor([5, 6, 7]), torch.tensor([0, 2, 2, 3]))
        >>> len(jt), jt.lengths().tolist(), jt[0].tolist()
        (3, [2, 0, 1], [5, 6])
    """

    def __init__(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        compact: bool = True,
    ) -> None:
        if not isinstance(values, (torch.Tensor, JaggedTensor)):
            raise TypeError(
                f"JaggedTensor: values must be a torch.Tensor or JaggedTensor, got {type(values)}"
            )
        if isinstance(values, torch.Tensor) and values.dim() < 1:
            raise ValueError("JaggedTensor: values must have at least 1 dim (items first)")
        offsets = _as_index_tensor("JaggedTensor: offsets", offsets)
        if offsets.numel() < 1:
            raise ValueError("JaggedTensor: offsets needs B + 1 >= 1 entries, got 0")
        _check_weights("JaggedTensor", values, weights)
        _check_same_device("JaggedTensor", values=values, offsets=offsets, weights=weights)
        self.values = values
        self.offsets = offsets
        self.weights = weights
        self._compact = bool(compact)
        # Lengths a sync-free constructor could not check yet (see length_check.py).
        self._pending: LengthCheck | None = None

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_lengths(
        cls,
        values: torch.Tensor | JaggedTensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> JaggedTensor:
        """Rows of ``lengths[i]`` consecutive items of ``values`` (no host sync).

        ``lengths`` is moved to ``values``' device if it lives elsewhere.
        """
        if not isinstance(values, (torch.Tensor, JaggedTensor)):
            raise TypeError(f"from_lengths: values must be a torch.Tensor, got {type(values)}")
        lengths = _as_index_tensor("from_lengths: lengths", lengths, values.device)
        return cls(values, _offsets_from_lengths(lengths), weights)

    @classmethod
    def from_padded(
        cls,
        padded: torch.Tensor,
        lengths: torch.Tensor,
        side: Side = "right",
        weights: torch.Tensor | None = None,
        *,
        compact: bool = True,
        validate: bool = False,
    ) -> JaggedTensor:
        """Jagged rows from a padded ``[B, L, *trailing]`` tensor.

        ``side`` names where the padding is: ``"right"`` means row ``i``'s items are
        ``padded[i, :lengths[i]]``, ``"left"`` means they are ``padded[i, L - lengths[i]:]``.

        With ``compact=True`` (the default) ``values`` holds exactly the items: one host
        sync reads their total (the output size) and checks ``0 <= lengths <= L``.

        With ``compact=False`` nothing syncs: ``values`` keeps all ``B * L`` slots, the
        items first (row by row) and the padding slots after them, so
        ``offsets[-1] <= len(values)`` (a capacity layout, see the class docs). The
        lengths are checked at the first :meth:`validate` or :meth:`compact`, or right
        away (one sync) with ``validate=True``.

        Args:
            padded: ``[B, L, *trailing]`` rows, padded on ``side``.
            lengths: integer ``[B]``, items per row (moved to ``padded``'s device).
            side: where the padding is, ``"right"`` or ``"left"``.
            weights: optional ``[B, L]`` per-item weights, padded the same way.
            compact: trim ``values`` to the items (one host sync) or keep the capacity.
            validate: with ``compact=False``, check the lengths now (one host sync).
        """
        _check_side("side", side)
        if not isinstance(padded, torch.Tensor):
            raise TypeError(f"from_padded: padded must be a torch.Tensor, got {type(padded)}")
        if padded.dim() < 2:
            raise ValueError(
                f"from_padded: padded must be [B, L, *trailing], got shape {tuple(padded.shape)}"
            )
        device = padded.device
        batch, width = padded.shape[0], padded.shape[1]
        lengths = _as_index_tensor("from_padded: lengths", lengths, device)
        if lengths.shape[0] != batch:
            raise ValueError(
                f"from_padded: lengths has {lengths.shape[0]} entries but padded has {batch} rows"
            )
        if weights is not None:
            if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (batch, width):
                shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else None
                raise ValueError(
                    f"from_padded: weights must be [B, L] = {(batch, width)}, got {shape}"
                )
            weights = weights.to(device)
        if not compact:
            return cls._from_padded_capacity(padded, lengths, side, weights, validate)
        offsets = _offsets_from_lengths(lengths)
        if batch == 0:
            total = 0
        else:
            total, lo, hi = torch.stack([offsets[-1], lengths.min(), lengths.max()]).tolist()
            LengthCheck(["from_padded"], [width], lengths.new_empty(0)).raise_if_bad([lo, hi])
        flat = cls._padded_source_index(offsets, lengths, width, side, total)
        values = padded.flatten(0, 1).index_select(0, flat)
        w = weights.flatten(0, 1).index_select(0, flat) if weights is not None else None
        return cls(values, offsets, w)

    @classmethod
    def _from_padded_capacity(
        cls,
        padded: torch.Tensor,
        lengths: torch.Tensor,
        side: str,
        weights: torch.Tensor | None,
        validate: bool,
    ) -> JaggedTensor:
        width = padded.shape[1]
        check = LengthCheck.of("from_padded", width, lengths)
        if validate and check is not None:
            check.run()
        # Clamped, a bad length still gives self-consistent rows until the check reports it.
        kept = lengths.clamp(0, width)
        order = items_first_index(padded_item_mask(kept, width, side).reshape(-1))
        values = padded.flatten(0, 1).index_select(0, order)
        w = weights.flatten(0, 1).index_select(0, order) if weights is not None else None
        out = cls(values, _offsets_from_lengths(kept), w, compact=values.shape[0] == 0)
        out._pending = None if validate else check
        return out

    @staticmethod
    def _padded_source_index(
        offsets: torch.Tensor, lengths: torch.Tensor, width: int, side: str, total: int
    ) -> torch.Tensor:
        """Flat index into a ``[B * width]`` padded buffer of each of the ``total`` items."""
        device = offsets.device
        batch = lengths.shape[0]
        rows = torch.repeat_interleave(
            torch.arange(batch, device=device), lengths, output_size=total
        )
        pos = torch.arange(total, device=device) - offsets[:-1].index_select(0, rows)
        if side == "left":
            pos = pos + (width - lengths).index_select(0, rows)
        return rows * width + pos

    @classmethod
    def from_list(
        cls,
        rows: Sequence[Sequence[Any] | torch.Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> JaggedTensor:
        """Build from a list of rows (Python sequences or tensors).

        ``dtype=None`` lets torch infer it (float32 when every row is empty). Rows may be
        sequences of sequences for trailing dims (``[[1, 2], [3, 4]]`` is a row of two
        2-vectors).
        """
        rows = list(rows)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        if any(isinstance(r, torch.Tensor) for r in rows):
            parts = [torch.as_tensor(r, dtype=dtype) for r in rows]
            values = torch.cat(parts) if parts else torch.empty(0, dtype=dtype)
        else:
            flat = list(itertools.chain.from_iterable(rows))
            values = torch.tensor(flat, dtype=dtype)
        if device is not None:
            values = values.to(device)
        return cls.from_lengths(values, lengths)

    @classmethod
    def from_strings(
        cls, strings: Sequence[str | bytes], device: torch.device | str | None = None
    ) -> JaggedTensor:
        """One row of utf-8 bytes (uint8 values) per string; ``bytes`` are taken as is."""
        encoded: list[bytes] = []
        if isinstance(strings, (str, bytes)):
            raise TypeError("from_strings takes a sequence of strings, not one string")
        for i, s in enumerate(strings):
            if isinstance(s, str):
                encoded.append(s.encode("utf-8"))
            elif isinstance(s, (bytes, bytearray, memoryview)):
                encoded.append(bytes(s))
            else:
                raise TypeError(f"from_strings: item {i} is a {type(s).__name__}, not str/bytes")
        blob = b"".join(encoded)
        if blob:
            values = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        else:
            values = torch.empty(0, dtype=torch.uint8)
        lengths = torch.tensor([len(b) for b in encoded], dtype=torch.int64)
        if device is not None:
            values = values.to(device)
        return cls.from_lengths(values, lengths)

    @classmethod
    def from_string_lists(
        cls, rows: Sequence[Sequence[str | bytes]], device: torch.device | str | None = None
    ) -> JaggedTensor:
        """Nested: row ``i`` holds the strings ``rows[i]``, each a row of utf-8 bytes.

        ``jt.values`` is the flat :meth:`from_strings` JaggedTensor of every string.
        """
        rows = list(rows)
        for i, r in enumerate(rows):
            if isinstance(r, (str, bytes)):
                raise TypeError(f"from_string_lists: row {i} is one string, not a list of them")
        inner = cls.from_strings(list(itertools.chain.from_iterable(rows)), device=device)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        if device is not None:
            lengths = lengths.to(device)
        return cls.from_lengths(inner, lengths)

    @property
    def is_nested(self) -> bool:
        """Whether ``values`` is itself a JaggedTensor."""
        return isinstance(self.values, JaggedTensor)

    def _require_flat(self, op: str) -> None:
        if self.is_nested:
            raise TypeError(f"JaggedTensor.{op} needs flat values; this one is nested")

    # ------------------------------------------------------------------ checks

    def validate(self) -> JaggedTensor:
        """Check everything the constructor skips (one host sync); returns ``self``.

        Raises ``ValueError`` unless ``offsets[0] == 0``, ``offsets`` is non-decreasing and
        ``offsets[-1] == len(values)`` (``<=`` for a capacity layout, ``compact=False``),
        and, for a sync-free ``from_padded``, every length was within ``[0, L]``.
        """
        n = _num_items(self.values)
        _check_weights("JaggedTensor", self.values, self.weights)
        if isinstance(self.values, JaggedTensor):
            self.values.validate()
        decreasing = (self.offsets[1:] < self.offsets[:-1]).any()
        head = torch.stack([self.offsets[0], self.offsets[-1], decreasing.to(torch.int64)])
        pending = self._pending
        if pending is not None:
            head = torch.cat([head, pending.bounds])
        synced = head.tolist()
        first, last, bad = synced[:3]
        if pending is not None:
            pending.raise_if_bad(synced[3:])
            self._pending = None  # checked once; the lengths cannot change under us
        if first != 0:
            raise ValueError(f"JaggedTensor: offsets[0] must be 0, got {first}")
        if bad:
            raise ValueError("JaggedTensor: offsets must be non-decreasing (a row has length < 0)")
        if self._compact and last != n:
            raise ValueError(
                f"JaggedTensor: offsets[-1]={last} must equal the number of items in values ({n})"
            )
        if last > n:
            raise ValueError(
                f"JaggedTensor: offsets[-1]={last} exceeds the capacity of values ({n})"
            )
        return self

    @property
    def is_compact(self) -> bool:
        """Whether ``values`` ends where the last row ends (False: a capacity layout)."""
        return self._compact

    def compact(self) -> JaggedTensor:
        """This JaggedTensor with ``values`` (and ``weights``) trimmed to the items.

        A compact one is returned as is. A capacity layout (``compact=False``) costs one
        host sync, which also runs any pending length check of a sync-free ``from_padded``;
        the result shares memory with ``self`` (slices, no copy).
        """
        if self._compact and self._pending is None:
            return self
        end = self.offsets[-1:]
        pending = self._pending
        if pending is not None:
            end = torch.cat([end, pending.bounds])
        synced = end.tolist()
        if pending is not None:
            pending.raise_if_bad(synced[1:])
            self._pending = None
        if self._compact:
            return self
        total = synced[0]
        if isinstance(self.values, JaggedTensor):
            values: Any = self.values[:total]
        else:
            values = self.values[:total]
        w = self.weights[:total] if self.weights is not None else None
        return JaggedTensor(values, self.offsets, w)

    # ------------------------------------------------------------------ views

    def lengths(self) -> torch.Tensor:
        """Row lengths, int64 ``[B]``."""
        return self.offsets[1:] - self.offsets[:-1]

    def __len__(self) -> int:
        """Batch size ``B``."""
        return self.offsets.numel() - 1

    def numel(self) -> int:
        """Number of items over all rows, not counting trailing dims.

        ``values.shape[0]`` for a compact JaggedTensor (no sync); ``offsets[-1]`` for a
        capacity layout, which costs one host sync.
        """
        if not self._compact:
            return int(self.offsets[-1])
        return _num_items(self.values)

    def weights_or_none(self) -> torch.Tensor | None:
        return self.weights

    def __getitem__(self, index: int | slice) -> Any:
        """``jt[i]`` is row ``i`` (a view of ``values``); ``jt[a:b]`` is a JaggedTensor view.

        Both read two offsets from the device (one host sync).
        """
        batch = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(batch)
            if step != 1:
                raise ValueError("JaggedTensor slicing supports step 1 only")
            stop = max(stop, start)
            sub = self.offsets[start : stop + 1]
            lo, hi = sub[[0, -1]].tolist()
            w = self.weights[lo:hi] if self.weights is not None else None
            return JaggedTensor(self.values[lo:hi], sub - lo, w)
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"JaggedTensor indices must be int or slice, got {type(index)}")
        index = int(index.__index__())  # also numpy ints and 0-d integer tensors
        if not -batch <= index < batch:
            raise IndexError(f"row {index} out of range for a batch of {batch}")
        index %= batch
        lo, hi = self.offsets[index : index + 2].tolist()
        return self.values[lo:hi]

    def unbind(self) -> list[torch.Tensor]:
        """Every row as a view of ``values`` (one host sync)."""
        offs = self.offsets.tolist()
        if isinstance(self.values, JaggedTensor):
            return [self.values[a:b] for a, b in itertools.pairwise(offs)]
        base = self.values.narrow(0, offs[0], offs[-1] - offs[0])
        return list(base.split([b - a for a, b in itertools.pairwise(offs)]))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.unbind())

    def to_list(self) -> list[list[Any]]:
        """Rows as Python lists (trailing dims become nested lists)."""
        offs = self.offsets.tolist()
        flat = (
            self.values.to_list() if isinstance(self.values, JaggedTensor) else self.values.tolist()
        )
        return [flat[a:b] for a, b in itertools.pairwise(offs)]

    def to_strings(self, errors: str = "strict") -> list[Any]:
        """Decode uint8 rows as utf-8 (the inverse of :meth:`from_strings`).

        A nested JaggedTensor gives a list of strings per row (see :meth:`from_string_lists`).
        """
        if isinstance(self.values, JaggedTensor):
            flat = self.values.to_strings(errors)
            offs = self.offsets.tolist()
            return [flat[a:b] for a, b in itertools.pairwise(offs)]
        if self.values.dtype != torch.uint8 or self.values.dim() != 1:
            raise TypeError(
                "to_strings needs 1-D uint8 values (utf-8 bytes), got "
                f"{self.values.dtype} of shape {tuple(self.values.shape)}"
            )
        blob = self.values.cpu().numpy().tobytes()
        offs = self.offsets.tolist()
        return [blob[a:b].decode("utf-8", errors=errors) for a, b in itertools.pairwise(offs)]

    # ------------------------------------------------------------------ padding

    def _resolve_max_len(self, max_len: int | None) -> int:
        if max_len is None:
            return int(self.lengths().max()) if len(self) > 0 else 0
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
            raise ValueError(f"max_len must be a non-negative int or None, got {max_len!r}")
        return max_len

    def _padded_gather(
        self, max_len: int, side: str, truncate: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Source item of every ``[B, max_len]`` slot, and which slots hold an item.

        Row ``b`` keeps ``k = min(len_b, max_len)`` items: its first ``k`` when
        ``truncate="right"`` or its last ``k`` when ``truncate="left"``.
        """
        _check_side("side", side)
        _check_side("truncate", truncate)
        lengths = self.lengths()
        kept = lengths.clamp(max=max_len)
        cols = torch.arange(max_len, device=self.offsets.device, dtype=torch.int64)
        if side == "right":
            pos = cols.unsqueeze(0).expand(len(self), max_len)
            valid = pos < kept.unsqueeze(1)
        else:
            pos = cols.unsqueeze(0) - (max_len - kept).unsqueeze(1)
            valid = pos >= 0
        start = self.offsets[:-1]
        if truncate == "left":
            start = start + (lengths - kept)
        return start.unsqueeze(1) + pos, valid

    @staticmethod
    def _pad(
        source: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, pad_value: float | int
    ) -> torch.Tensor:
        batch, max_len = valid.shape
        trailing = tuple(source.shape[1:])
        if source.shape[0] == 0 or index.numel() == 0:
            return source.new_full((batch, max_len, *trailing), pad_value)
        flat = index.clamp(0, source.shape[0] - 1).reshape(-1)
        out = source.index_select(0, flat).view(batch, max_len, *trailing)
        mask = (~valid).view(batch, max_len, *([1] * len(trailing)))
        return out.masked_fill(mask, pad_value)

    def to_padded(
        self,
        max_len: int | None = None,
        pad_value: float | int | bool = 0,
        side: Side = "right",
        truncate: Side = "right",
    ) -> torch.Tensor:
        """Dense ``[B, max_len, *trailing]`` copy of the rows.

        ``side`` is where padding goes (``"right"``: items first, then padding).
        ``truncate`` is which end of a row longer than ``max_len`` is cut: ``"left"`` keeps
        the last ``max_len`` items (the most recent behaviours). ``max_len=None`` uses the
        longest row, which costs one host sync; with ``max_len`` given nothing syncs.
        """
        self._require_flat("to_padded")
        max_len = self._resolve_max_len(max_len)
        _check_pad_value(self.values.dtype, pad_value, "pad_value")
        index, valid = self._padded_gather(max_len, side, truncate)
        return self._pad(self.values, index, valid, pad_value)

    def to_padded_weights(
        self,
        max_len: int | None = None,
        pad_value: float = 0.0,
        side: Side = "right",
        truncate: Side = "right",
    ) -> torch.Tensor:
        """``weights`` padded exactly like :meth:`to_padded` pads ``values``: ``[B, max_len]``."""
        if self.weights is None:
            raise ValueError("to_padded_weights: this JaggedTensor has no weights")
        max_len = self._resolve_max_len(max_len)
        _check_pad_value(self.weights.dtype, pad_value, "pad_value")
        index, valid = self._padded_gather(max_len, side, truncate)
        return self._pad(self.weights, index, valid, pad_value)

    def padding_mask(self, max_len: int | None = None, side: Side = "right") -> torch.Tensor:
        """Bool ``[B, max_len]``: True where :meth:`to_padded` puts an item (not padding)."""
        max_len = self._resolve_max_len(max_len)
        return self._padded_gather(max_len, side, "right")[1]

    # ------------------------------------------------------------------ device movement

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> JaggedTensor:
        """The same rows with ``fn`` applied to every tensor inside (nested values too).

        How batches are moved, pinned or repacked generically: ``fn`` must keep each
        tensor's shape and meaning (a copy, a move, a view of another buffer).
        """
        return self._map(fn)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> JaggedTensor:
        w = fn(self.weights) if self.weights is not None else None
        values = self.values._map(fn) if isinstance(self.values, JaggedTensor) else fn(self.values)
        out = JaggedTensor(values, fn(self.offsets), w, compact=self._compact)
        out._pending = self._pending.map(fn) if self._pending is not None else None
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> JaggedTensor:
        """Move every tensor to ``device``. ``non_blocking`` needs pinned memory to overlap."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def cuda(
        self, device: torch.device | int | None = None, non_blocking: bool = False
    ) -> JaggedTensor:
        return self._map(lambda t: t.cuda(device, non_blocking=non_blocking))

    def cpu(self) -> JaggedTensor:
        return self._map(lambda t: t.cpu())

    def pin_memory(self) -> JaggedTensor:
        """Page-locked copies of CPU tensors (needs a CUDA build with a device)."""
        return self._map(lambda t: t.pin_memory())

    def is_pinned(self) -> bool:
        tensors = [self.values, self.offsets] + ([self.weights] if self.weights is not None else [])
        return all(t.is_pinned() for t in tensors)

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tell the caching allocator these CUDA tensors are used on ``stream``.

        CPU tensors have nothing to record and are skipped.
        """
        if isinstance(self.values, JaggedTensor):
            self.values.record_stream(stream)
        for t in (self.values, self.offsets, self.weights):
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(stream)

    def __repr__(self) -> str:
        w = "" if self.weights is None else f", weights={self.weights.dtype}"
        if not self._compact:
            w += ", capacity layout"
        if isinstance(self.values, JaggedTensor):
            return f"JaggedTensor(batch={len(self)}, values={self.values!r}{w})"
        return (
            f"JaggedTensor(batch={len(self)}, values={tuple(self.values.shape)} "
            f"{self.values.dtype}, device={self.values.device}{w})"
        )
