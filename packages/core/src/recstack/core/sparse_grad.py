"""SparseGrad: row ids into a PagedTensor and their gradient rows.

The embedding backward produces one, sparse optimizers consume one. ``coalesce()`` sums the
rows that share an id (one sort + one fused segment-sum kernel) so an optimizer updates each
row exactly once.
"""

from __future__ import annotations

import torch

from recstack.core.kernels.segment_sum import coalesce_rows
from recstack.core.paged import move_rows

__all__ = ["SparseGrad"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class SparseGrad:
    """Gradient rows ``values[i]`` for table rows ``rows[i]``.

    Args:
        rows: 1-D integer tensor of row ids (converted to int64); may repeat unless
            ``is_coalesced``.
        values: ``[len(rows), dim]`` float tensor on the same device.
        is_coalesced: the caller guarantees ``rows`` is sorted and unique (not checked on
            device; producers that already reduced duplicates pass ``True``).

    Examples:
        >>> import torch
        >>> g = SparseGrad(torch.tensor([7, 2, 7]), torch.ones(3, 2))
        >>> c = g.coalesce()
        >>> c.rows.tolist(), c.values.tolist(), c.is_coalesced
        ([2, 7], [[1.0, 1.0], [2.0, 2.0]], True)
    """

    __slots__ = ("_rows", "_values", "_coalesced")

    def __init__(
        self, rows: torch.Tensor, values: torch.Tensor, *, is_coalesced: bool = False
    ) -> None:
        if not isinstance(rows, torch.Tensor):
            raise TypeError(f"SparseGrad: rows must be a torch.Tensor, got {type(rows).__name__}")
        if not isinstance(values, torch.Tensor):
            raise TypeError(
                f"SparseGrad: values must be a torch.Tensor, got {type(values).__name__}"
            )
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
            raise TypeError(f"SparseGrad: rows must be an integer tensor, got {rows.dtype}")
        if rows.dim() != 1:
            raise ValueError(f"SparseGrad: rows must be 1-D, got shape {tuple(rows.shape)}")
        if values.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"SparseGrad: values must be a float tensor, got {values.dtype}")
        if values.dim() != 2:
            raise ValueError(
                f"SparseGrad: values must be 2-D [n, dim], got shape {tuple(values.shape)}"
            )
        if values.shape[0] != rows.shape[0]:
            raise ValueError(
                f"SparseGrad: values has {values.shape[0]} rows but rows has {rows.shape[0]} "
                "entries"
            )
        if rows.device != values.device:
            raise ValueError(
                f"SparseGrad: rows is on device {rows.device} but values is on device "
                f"{values.device}"
            )
        self._rows = rows.to(torch.int64)
        self._values = values
        self._coalesced = bool(is_coalesced)

    @property
    def rows(self) -> torch.Tensor:
        """int64 row ids, ``[num_rows]``."""
        return self._rows

    @property
    def values(self) -> torch.Tensor:
        """Gradient rows, ``[num_rows, dim]``."""
        return self._values

    @property
    def is_coalesced(self) -> bool:
        """True when ``rows`` is sorted and unique."""
        return self._coalesced

    @property
    def num_rows(self) -> int:
        return self._rows.shape[0]

    def __len__(self) -> int:
        return self._rows.shape[0]

    @property
    def dim(self) -> int:
        return self._values.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._values.dtype

    @property
    def device(self) -> torch.device:
        return self._values.device

    def coalesce(self, **tile: int) -> SparseGrad:
        """Sorted unique rows with their summed values (fp32 accumulation, values' dtype).

        Returns ``self`` when already coalesced. ``tile`` keywords (``tile_elems``,
        ``max_block_d``, ``num_warps``) tune the segment-sum kernel.
        """
        if self._coalesced:
            return self
        rows, values = coalesce_rows(self._rows, self._values, **tile)
        return SparseGrad(rows, values, is_coalesced=True)

    def moved(self, src: torch.Tensor, dst: torch.Tensor) -> SparseGrad:
        """This gradient after its table's rows ``src`` moved to ``dst``
        (``PagedTensor.rows_moved``; see :func:`~recstack.core.paged.move_rows`). A
        coalesced gradient stays coalesced: its rows are sorted again.

        Args:
            src: int64 ``[n]`` rows that moved.
            dst: int64 ``[n]``, where each went.
        """
        if not self._rows.numel() or not src.numel():
            return self
        rows = move_rows(self._rows, src.to(self.device), dst.to(self.device))
        if not self._coalesced:
            return SparseGrad(rows, self._values, is_coalesced=False)
        rows, order = torch.sort(rows)
        return SparseGrad(rows, self._values[order], is_coalesced=True)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseGrad:
        """This gradient on ``device`` (``self`` when already there)."""
        device = torch.device(device)
        if self._rows.device == device:
            return self
        return SparseGrad(
            self._rows.to(device, non_blocking=non_blocking),
            self._values.to(device, non_blocking=non_blocking),
            is_coalesced=self._coalesced,
        )

    def __repr__(self) -> str:
        return (
            f"SparseGrad(num_rows={self.num_rows}, dim={self.dim}, dtype={self.dtype}, "
            f"device={self.device}, is_coalesced={self._coalesced})"
        )
