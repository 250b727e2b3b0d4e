"""Per-stripe row counts from an ORC file tail.

pyarrow reads ORC stripes but does not expose how many rows each stripe holds; without
that a reader cannot plan exact batches or skip a stripe by its rows. The counts are in
the file tail, which pyarrow does hand out as the serialized ``FileTail`` protobuf
(``ORCFile.reader.serialized_file_tail()``, already decompressed). This module is a small
protobuf wire-format reader for the few fields needed, so no protobuf dependency or
generated code is pulled in:

    FileTail          1: PostScript postscript, 2: Footer footer, ...
    Footer            3: repeated StripeInformation stripes, 6: uint64 numberOfRows, ...
    StripeInformation 5: uint64 numberOfRows, ...

Unknown fields of every wire type are skipped, so newer ORC writers still parse.
"""

from __future__ import annotations

from collections.abc import Iterator

from recstack.columnio.errors import ColumnIOError

__all__ = ["iter_fields", "read_varint", "stripe_row_counts"]

# Protobuf wire types (groups, 3 and 4, are deprecated and never written by ORC).
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

_FILE_TAIL_FOOTER = 2
_FOOTER_STRIPES = 3
_FOOTER_NUM_ROWS = 6
_STRIPE_NUM_ROWS = 5


class _WireError(ValueError):
    """Malformed protobuf bytes; turned into a ColumnIOError naming the file by the caller."""


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns ``(value, next_pos)``.

    Raises ValueError on a truncated varint or one longer than 10 bytes (past 64 bits).
    """
    value = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise _WireError(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= 1 << 64:
                raise _WireError(f"varint ending at byte {pos} exceeds 64 bits")
            return value, pos
        shift += 7
        if shift >= 70:
            raise _WireError(f"varint ending at byte {pos} is longer than 10 bytes")


def iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield ``(field_number, wire_type, value)`` for each field of one protobuf message.

    Varint fields yield their int; length-delimited fields a memoryview of their bytes
    (a nested message or a string, decoded by the caller); fixed32/fixed64 fields yield
    their little-endian int. Raises ValueError on malformed input.
    """
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    pos = 0
    end = len(view)
    while pos < end:
        tag, pos = read_varint(view, pos)
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            raise _WireError(f"field number 0 at byte {pos}")
        if wire_type == _VARINT:
            value, pos = read_varint(view, pos)
            yield field, wire_type, value
        elif wire_type == _LEN:
            length, pos = read_varint(view, pos)
            if pos + length > end:
                raise _WireError(f"field {field} of {length} bytes runs past the end ({end})")
            yield field, wire_type, view[pos : pos + length]
            pos += length
        elif wire_type in (_FIXED32, _FIXED64):
            size = 4 if wire_type == _FIXED32 else 8
            if pos + size > end:
                raise _WireError(f"fixed field {field} runs past the end ({end})")
            yield field, wire_type, int.from_bytes(view[pos : pos + size], "little")
            pos += size
        else:
            raise _WireError(f"unsupported wire type {wire_type} for field {field}")


def _stripe_rows(stripe: memoryview) -> int:
    rows = 0
    for field, wire_type, value in iter_fields(stripe):
        if field == _STRIPE_NUM_ROWS and wire_type == _VARINT:
            rows = value  # last one wins, as protobuf merges scalars
    return int(rows)


def stripe_row_counts(
    serialized_tail: bytes | memoryview,
    *,
    expected_rows: int | None = None,
    file: str | None = None,
) -> tuple[int, ...]:
    """Rows in each stripe, in file order, from a serialized ORC ``FileTail``.

    The sum is checked against the footer's ``numberOfRows`` (when the writer set it) and
    against ``expected_rows`` (when given, e.g. ``ORCFile.nrows``). Raises
    :class:`ColumnIOError` naming ``file`` when the tail is malformed or the counts disagree.
    """
    try:
        footer: memoryview | None = None
        for field, wire_type, value in iter_fields(serialized_tail):
            if field == _FILE_TAIL_FOOTER and wire_type == _LEN:
                footer = value  # type: ignore[assignment]
        if footer is None:
            raise _WireError("FileTail has no footer")
        stripes: list[int] = []
        footer_rows: int | None = None
        for field, wire_type, value in iter_fields(footer):
            if field == _FOOTER_STRIPES and wire_type == _LEN:
                stripes.append(_stripe_rows(value))  # type: ignore[arg-type]
            elif field == _FOOTER_NUM_ROWS and wire_type == _VARINT:
                footer_rows = int(value)  # type: ignore[arg-type]
    except _WireError as err:
        raise ColumnIOError(f"corrupt ORC file tail: {err}", file=file) from None
    total = sum(stripes)
    if footer_rows is not None and total != footer_rows:
        raise ColumnIOError(
            f"ORC stripes hold {total} rows in all but the footer says {footer_rows}", file=file
        )
    if expected_rows is not None and total != expected_rows:
        raise ColumnIOError(
            f"ORC stripes hold {total} rows in all but the file reports {expected_rows}",
            file=file,
        )
    return tuple(stripes)
