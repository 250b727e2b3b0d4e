"""Arrow arrays to tensors, vectorized: buffers become tensors without per-row Python.

The tensors made here alias Arrow's memory (``torch.frombuffer`` keeps the buffer alive);
batch assembly copies out of them, so no batch a user sees shares memory with Arrow.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from recstack.columnio.columns import MISSING, ResolvedColumn, arrow_type_of
from recstack.columnio.errors import ColumnIOError, ReadStats
from recstack.core import JaggedTensor

__all__ = ["ColumnValue", "convert_column", "convert_table"]

ColumnValue = torch.Tensor | JaggedTensor


def _from_buffer(buf: pa.Buffer | None, dtype: torch.dtype, count: int, first: int) -> torch.Tensor:
    """``count`` items of ``dtype`` starting at item ``first`` of ``buf`` (no copy)."""
    if count == 0 or buf is None:
        return torch.empty(0, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=first * itemsize)


def _single(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        if arr.num_chunks == 1:
            arr = arr.chunk(0)
        elif arr.num_chunks == 0:
            arr = pa.array([], type=arr.type)
        else:
            arr = pa.concat_arrays(arr.chunks)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _fill(arr: pa.Array, default: Any, what: str, rc: ResolvedColumn, file: str) -> pa.Array:
    """Replace nulls with ``default``, or raise naming the column when there is none."""
    if default is MISSING:
        raise ColumnIOError(
            f"{arr.null_count} null {what}(s) and no default; pass "
            f"Column({rc.name!r}, {'element_default' if 'item' in what else 'default'}=...) "
            "to say what a null becomes",
            file=file,
            column=rc.name,
        )
    try:
        return pc.fill_null(arr, pa.scalar(default, type=arr.type))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
        raise ColumnIOError(
            f"default {default!r} does not fit the column's type {arr.type}: {e}",
            file=file,
            column=rc.name,
        ) from e


def _primitive(arr: pa.Array, rc: ResolvedColumn, file: str) -> torch.Tensor:
    assert rc.dtype is not None
    target = arrow_type_of(rc.dtype)
    if arr.type != target:
        try:
            arr = arr.cast(target, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ColumnIOError(
                f"cannot convert {arr.type} to {rc.dtype}: {e}", file=file, column=rc.name
            ) from e
    if rc.dtype == torch.bool:
        # Arrow packs booleans as bits; a tensor needs a byte each.
        arr = arr.cast(pa.uint8())
        return _from_buffer(arr.buffers()[1], torch.uint8, len(arr), arr.offset).view(torch.bool)
    return _from_buffer(arr.buffers()[1], rc.dtype, len(arr), arr.offset)


def _offsets(arr: pa.Array, large: bool) -> tuple[torch.Tensor, int, int]:
    """int64 offsets rebased to 0, and the child range ``[first, last)`` they cover."""
    raw = _from_buffer(
        arr.buffers()[1], torch.int64 if large else torch.int32, len(arr) + 1, arr.offset
    )
    if raw.numel() == 0:  # a zero-length array may carry no offsets buffer
        return torch.zeros(1, dtype=torch.int64), 0, 0
    first, last = int(raw[0]), int(raw[-1])
    return raw.to(torch.int64) - first, first, last


def _strings(arr: pa.Array, rc: ResolvedColumn, file: str) -> JaggedTensor:
    t = arr.type
    if not (
        pa.types.is_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_string(t)
        or pa.types.is_large_binary(t)
    ):
        arr = arr.cast(pa.large_binary())  # string/binary views have no offsets buffer
        t = arr.type
    large = pa.types.is_large_string(t) or pa.types.is_large_binary(t)
    offsets, first, last = _offsets(arr, large)
    values = _from_buffer(arr.buffers()[2], torch.uint8, last - first, first)
    return JaggedTensor(values, offsets)


def _fill_items(
    child: pa.Array, rc: ResolvedColumn, file: str, stats: ReadStats | None
) -> pa.Array:
    """Nulls inside lists take ``element_default`` and count with the row nulls."""
    if not child.null_count:
        return child
    n = child.null_count
    child = _fill(child, rc.spec.element_default, "list item", rc, file)
    if stats is not None:
        stats.add_nulls(rc.name, n)
    return child


def _list_child(
    arr: pa.Array, rc: ResolvedColumn, file: str, stats: ReadStats | None
) -> tuple[torch.Tensor, pa.Array]:
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        arr = arr.cast(pa.large_list(t.value_type))  # list views have no offsets buffer
        t = arr.type
    offsets, first, last = _offsets(arr, pa.types.is_large_list(t))
    child = arr.values.slice(first, last - first)
    if pa.types.is_dictionary(child.type):
        child = child.dictionary_decode()
    return offsets, _fill_items(child, rc, file, stats)


def convert_column(
    arr: pa.Array | pa.ChunkedArray, rc: ResolvedColumn, file: str, stats: ReadStats | None = None
) -> ColumnValue:
    """One column of a decoded unit as a tensor or :class:`JaggedTensor`.

    Null rows take the column's ``default`` and null list items its ``element_default``
    (both counted in ``stats``, per column), or raise :class:`ColumnIOError` naming
    ``file`` and the column.
    """
    arr = _single(arr)
    # Row nulls are filled first: filling rebuilds the list children, so the item nulls
    # counted below are only those of visible rows, not whatever a null row's slots held.
    if arr.null_count:
        n = arr.null_count
        arr = _fill(arr, rc.spec.default, "value", rc, file)
        if stats is not None:
            stats.add_nulls(rc.name, n)
    if rc.kind == "scalar":
        return _primitive(arr, rc, file)
    if rc.kind == "string":
        return _strings(arr, rc, file)
    if rc.kind == "fixed":
        k = rc.width
        child = _fill_items(arr.values.slice(arr.offset * k, len(arr) * k), rc, file, stats)
        return _primitive(child, rc, file).view(len(arr), k)
    offsets, child = _list_child(arr, rc, file, stats)
    if rc.kind == "list":
        return JaggedTensor(_primitive(child, rc, file), offsets)
    return JaggedTensor(_strings(child, rc, file), offsets)


def convert_table(
    table: pa.Table, columns: list[ResolvedColumn], file: str, stats: ReadStats | None = None
) -> dict[str, ColumnValue]:
    """Every selected column of ``table`` converted with :func:`convert_column`."""
    return {rc.name: convert_column(table.column(rc.name), rc, file, stats) for rc in columns}
