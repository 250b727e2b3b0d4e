"""Column selection: which columns to read, what a null becomes, and what tensor comes out.

A column is named by a string, or by a :class:`Column` that also sets the null default and
an optional dtype. The Arrow type of the column decides the kind of tensor a batch holds:

====================================  ===================================================
Arrow type                            batch value
====================================  ===================================================
int / float / bool / date / timestamp  1-D tensor ``[B]``
string / binary                        ``JaggedTensor`` of uint8 bytes, one row a string
list<int or float>                     ``JaggedTensor`` (one row the list)
list<string>                           nested ``JaggedTensor``: rows -> strings -> bytes
fixed_size_list<int or float>[k]       2-D tensor ``[B, k]``
====================================  ===================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.types as pat
import torch

from recstack.columnio.errors import ColumnIOError

__all__ = ["MISSING", "Column", "ColumnKind", "ResolvedColumn", "normalize_columns", "resolve"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"

    def __reduce__(self) -> str:
        return "MISSING"


#: "No default": a null in the column is an error that names the file and column.
MISSING: Any = _Missing()

ColumnKind = Literal["scalar", "string", "list", "string_list", "fixed"]

_TORCH_OF_ARROW: dict[pa.DataType, torch.dtype] = {
    pa.int8(): torch.int8,
    pa.int16(): torch.int16,
    pa.int32(): torch.int32,
    pa.int64(): torch.int64,
    pa.uint8(): torch.uint8,
    # Widened so every value fits: torch has no general-purpose unsigned 16/32-bit dtypes.
    pa.uint16(): torch.int32,
    pa.uint32(): torch.int64,
    pa.float16(): torch.float16,
    pa.float32(): torch.float32,
    pa.float64(): torch.float64,
    pa.bool_(): torch.bool,
}

_ARROW_OF_TORCH: dict[torch.dtype, pa.DataType] = {
    torch.int8: pa.int8(),
    torch.int16: pa.int16(),
    torch.int32: pa.int32(),
    torch.int64: pa.int64(),
    torch.uint8: pa.uint8(),
    torch.float16: pa.float16(),
    torch.float32: pa.float32(),
    torch.float64: pa.float64(),
    torch.bool: pa.bool_(),
}


@dataclass(frozen=True)
class Column:
    """One column to read.

    Args:
        name: the column's name in the files.
        default: what a null becomes. Without one, a null is an error naming the file and
            column. A number for numeric columns, a ``str`` for strings, a list for list
            columns (``[]`` makes a null list an empty row), a list of ``k`` numbers for
            ``fixed_size_list[k]``.
        element_default: what a null *inside* a list becomes (a number, or a ``str`` for
            ``list<string>``). Without one, such a null is an error.
        dtype: cast the values to this torch dtype. The cast is checked: a value that does
            not fit (``300`` into ``int8``, ``1.5`` into an integer) is an error.
    """

    name: str
    default: Any = MISSING
    element_default: Any = MISSING
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Column name must be a non-empty string, got {self.name!r}")
        if self.dtype is not None and self.dtype not in _ARROW_OF_TORCH:
            raise ValueError(
                f"column {self.name!r}: dtype {self.dtype} is not supported; use one of "
                f"{sorted(str(d) for d in _ARROW_OF_TORCH)}"
            )


@dataclass(frozen=True)
class ResolvedColumn:
    """A :class:`Column` matched to the Arrow type found in the files."""

    spec: Column
    kind: ColumnKind
    arrow_type: pa.DataType  # normalized (dictionary decoded, large_* as regular)
    item_type: pa.DataType  # the scalar type of the values (list items for list kinds)
    dtype: torch.dtype | None  # tensor dtype of the values; None for byte strings
    width: int = 0  # k of fixed_size_list[k]

    @property
    def name(self) -> str:
        return self.spec.name


def normalize_columns(columns: Sequence[str | Column] | None) -> list[Column] | None:
    """Columns as :class:`Column` objects; each name at most once."""
    if columns is None:
        return None
    if isinstance(columns, (str, Column)):
        columns = [columns]
    out: list[Column] = []
    seen: set[str] = set()
    for c in columns:
        col = Column(c) if isinstance(c, str) else c
        if not isinstance(col, Column):
            raise TypeError(f"columns must be names or Column objects, got {type(c).__name__}")
        if col.name in seen:
            raise ValueError(f"column {col.name!r} is selected twice")
        seen.add(col.name)
        out.append(col)
    if not out:
        raise ValueError("columns is empty: select at least one column (or None for all)")
    return out


def _is_string(t: pa.DataType) -> bool:
    return (
        pat.is_string(t)
        or pat.is_large_string(t)
        or pat.is_binary(t)
        or pat.is_large_binary(t)
        or getattr(pat, "is_string_view", lambda _: False)(t)
        or getattr(pat, "is_binary_view", lambda _: False)(t)
    )


def _is_var_list(t: pa.DataType) -> bool:
    return (
        pat.is_list(t)
        or pat.is_large_list(t)
        or getattr(pat, "is_list_view", lambda _: False)(t)
        or getattr(pat, "is_large_list_view", lambda _: False)(t)
    )


def normalize_type(t: pa.DataType) -> pa.DataType:
    """The type a column is compared by across files: dictionaries decoded, large_* folded."""
    if pat.is_dictionary(t):
        return normalize_type(t.value_type)
    if pat.is_large_string(t) or getattr(pat, "is_string_view", lambda _: False)(t):
        return pa.string()
    if pat.is_large_binary(t) or getattr(pat, "is_binary_view", lambda _: False)(t):
        return pa.binary()
    if _is_var_list(t):
        return pa.list_(normalize_type(t.value_type))
    if pat.is_fixed_size_list(t):
        return pa.list_(normalize_type(t.value_type), t.list_size)
    return t


def _scalar_dtype(t: pa.DataType, col: Column, file: str) -> torch.dtype:
    if col.dtype is not None:
        return col.dtype
    if t in _TORCH_OF_ARROW:
        return _TORCH_OF_ARROW[t]
    if pat.is_timestamp(t) or pat.is_date64(t) or pat.is_duration(t) or pat.is_time64(t):
        return torch.int64
    if pat.is_date32(t) or pat.is_time32(t):
        return torch.int32
    hint = ""
    if t == pa.uint64():
        hint = (
            "; uint64 does not fit int64 in general: pass Column(dtype=torch.int64) to cast "
            "with a range check"
        )
    elif pat.is_decimal(t):
        hint = "; pass Column(dtype=torch.float64) (or an integer dtype) to cast it"
    raise ColumnIOError(f"type {t} has no tensor dtype{hint}", file=file, column=col.name)


def resolve(col: Column, arrow_type: pa.DataType, file: str) -> ResolvedColumn:
    """Decide the batch value kind of ``col`` from the Arrow type it has in ``file``."""
    t = normalize_type(arrow_type)
    if _is_string(t):
        if col.dtype is not None:
            raise ColumnIOError(
                f"dtype= does not apply to a {t} column (strings travel as uint8 bytes)",
                file=file,
                column=col.name,
            )
        return ResolvedColumn(col, "string", t, t, None)
    if pat.is_list(t):
        item = t.value_type
        if _is_string(item):
            return ResolvedColumn(col, "string_list", t, item, None)
        if pat.is_nested(item):
            raise ColumnIOError(
                f"type {arrow_type} (a list of {item}) is not supported: lists of lists "
                "cannot become one tensor",
                file=file,
                column=col.name,
            )
        return ResolvedColumn(col, "list", t, item, _scalar_dtype(item, col, file))
    if pat.is_fixed_size_list(t):
        item = t.value_type
        if pat.is_nested(item) or _is_string(item):
            raise ColumnIOError(
                f"type {arrow_type} is not supported: fixed-size lists need numeric items",
                file=file,
                column=col.name,
            )
        return ResolvedColumn(col, "fixed", t, item, _scalar_dtype(item, col, file), t.list_size)
    if pat.is_nested(t):
        raise ColumnIOError(f"type {arrow_type} is not supported", file=file, column=col.name)
    return ResolvedColumn(col, "scalar", t, t, _scalar_dtype(t, col, file))


def arrow_type_of(dtype: torch.dtype) -> pa.DataType:
    """The Arrow type a tensor dtype casts to."""
    return _ARROW_OF_TORCH[dtype]
