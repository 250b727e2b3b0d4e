"""Delimited text in, Arrow string columns out: bounded memory and exact line numbers.

A file is read in blocks of ``block_size`` bytes (decompressed on the fly for ``.gz``,
``.bz2`` and ``.zst``) by Arrow's CSV reader while every line is good; from the first bad
line on, by a reader that cuts lines with numpy and splits them with Arrow's
``split_pattern`` and so knows each row's physical line number, which is what errors and
skip reports name. No Python code runs per line either way. Blank lines are ignored.

The parsers turn a string column into a typed one and a mask of the rows that did not
parse; converters hand the masks to :class:`~recstack.pipelines.data.common.Problems`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from recstack.pipelines.data.common import ConvertError, NeedLineNumbers, Problems

__all__ = [
    "COMPRESSIONS",
    "FieldBlock",
    "parse_choice",
    "parse_float",
    "parse_hex",
    "parse_int",
    "parse_string",
    "read_tables",
    "show",
    "text_size",
]

#: File suffix -> Arrow codec of the compressed text inputs a converter accepts.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}

_INT32_MAX = 2**31 - 1


@dataclass
class FieldBlock:
    """Some consecutive lines of one file, split into fields.

    Args:
        path: the file.
        lines: the 1-based line number of each row (int64), or ``None`` from the fast
            reader, which does not know them.
        fields: one string column per field, empty fields as ``""``.
    """

    path: str
    lines: np.ndarray | None
    fields: list[pa.StringArray]

    def __len__(self) -> int:
        return len(self.fields[0])


def text_size(path: Path) -> tuple[int, int]:
    """``(bytes on disk, estimated bytes of text)``: compressed text is guessed 4x larger.

    Args:
        path: a text file, maybe compressed.
    """
    size = os.path.getsize(path)
    return size, size * 4 if path.suffix.lower() in COMPRESSIONS else size


def _split_lines(block: bytes, terminated: bool) -> pa.StringArray:
    """The lines of ``block`` (each ended by ``\\n`` or ``\\r\\n``; the last maybe not)."""
    data = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(data == 10)
    newline = np.ones(len(ends), dtype=bool)
    if not terminated:
        ends = np.append(ends, len(data))
        newline = np.append(newline, False)
    starts = np.empty_like(ends)
    starts[:1] = 0
    starts[1:] = ends[:-1] + 1
    cr = (ends > starts) & (data[np.maximum(ends - 1, 0)] == 13) & newline
    lengths = ends - starts - cr
    # Drop the line ends so the lines lie back to back, as an Arrow string array needs.
    keep = np.ones(len(data), dtype=bool)
    keep[ends[newline]] = False
    keep[ends[cr] - 1] = False
    packed = data[keep] if not keep.all() else data
    if len(packed) > _INT32_MAX:
        raise ValueError("a block of text over 2 GiB; lower block_size")
    offsets = np.zeros(len(ends) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.StringArray.from_buffers(
        len(ends), pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(packed))
    )


def _open(path: Path) -> tuple[pa.NativeFile, pa.NativeFile]:
    try:
        raw = pa.OSFile(str(path), "rb")
    except (OSError, pa.ArrowException) as exc:
        raise ConvertError(f"cannot open: {exc}", path=str(path)) from exc
    codec = COMPRESSIONS.get(path.suffix.lower())
    return raw, (pa.CompressedInputStream(raw, codec) if codec else raw)


class _Meter:
    """Reports raw bytes read to ``on_bytes`` once each, however often a file is re-read."""

    def __init__(self, on_bytes: Callable[[int], None]) -> None:
        self._on_bytes = on_bytes
        self._reported = 0

    def update(self, raw: pa.NativeFile) -> None:
        position = raw.tell()
        if position > self._reported:
            self._on_bytes(position - self._reported)
            self._reported = position


def _exact_lines(path: Path, block_size: int, meter: _Meter) -> Iterator[pa.StringArray]:
    """The file's lines, a block at a time, cut with numpy (no Python per line)."""
    raw, stream = _open(path)
    try:
        carry = b""
        while True:
            try:
                chunk = stream.read(block_size)
            except (OSError, pa.ArrowException) as exc:
                raise ConvertError(f"cannot read: {exc}", path=str(path)) from exc
            meter.update(raw)
            if not chunk:
                if carry:
                    yield _split_lines(carry, terminated=False)
                return
            buf = carry + chunk if carry else chunk
            cut = buf.rfind(b"\n") + 1
            if cut == 0:  # a line longer than the block: keep reading
                carry = buf
                continue
            carry = buf[cut:]
            yield _split_lines(buf[:cut], terminated=True)
    finally:
        if stream is not raw:
            stream.close()
        raw.close()


def _exact_blocks(
    path: Path,
    separator: str,
    num_fields: int,
    problems: Problems,
    header: Sequence[str] | None,
    block_size: int,
    meter: _Meter,
) -> Iterator[FieldBlock]:
    """Blocks whose rows know their line numbers.

    A line with a wrong field count goes to ``problems`` after the good lines before it
    have been yielded, so the first bad line is reported whatever is wrong with it.
    """
    name = str(path)
    first_line = 1
    for lines in _exact_lines(path, block_size, meter):
        numbers = np.arange(first_line, first_line + len(lines), dtype=np.int64)
        first_line += len(lines)
        if header is not None and numbers[0] == 1:
            found = lines[0].as_py() if len(lines) else ""
            if found.split(separator) != list(header):
                raise ConvertError(
                    f"expected the header {separator.join(header)!r}, found {found[:200]!r}",
                    path=name,
                    line=1,
                )
            lines, numbers = lines.slice(1), numbers[1:]
        blank = pc.equal(pc.binary_length(lines), 0).to_numpy(zero_copy_only=False)
        parts = pc.split_pattern(lines, separator)
        counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
        wrong = (counts != num_fields) & ~blank
        good = ~blank & ~wrong
        if not good.all():
            parts = parts.filter(pa.array(good))
        values = parts.flatten()
        total = int(good.sum()) * num_fields
        fields = [values.take(np.arange(j, total, num_fields)) for j in range(num_fields)]
        kept = numbers[good]
        # Good rows before each wrong line: yield them, then report the line.
        good_before = np.cumsum(good) - good
        start = 0
        for w in np.flatnonzero(wrong):
            end = int(good_before[w])
            if end > start:
                part = [f.slice(start, end - start) for f in fields]
                yield FieldBlock(name, kept[start:end], part)
            start = end
            reason = f"expected {num_fields} fields separated by {separator!r}, found {counts[w]}"
            problems.reject(name, numbers[w : w + 1], [(np.ones(1, bool), lambda i, r=reason: r)])
        if len(kept) > start:
            rest = len(kept) - start
            yield FieldBlock(name, kept[start:], [f.slice(start, rest) for f in fields])


def _fast_blocks(
    path: Path,
    separator: str,
    num_fields: int,
    header: Sequence[str] | None,
    block_size: int,
    meter: _Meter,
) -> Iterator[FieldBlock]:
    """Blocks from Arrow's multi-threaded CSV reader, without line numbers.

    Raises :class:`NeedLineNumbers` at the first sign of trouble (a wrong field count, a
    wrong header, a read error), before yielding the block it is in.
    """
    raw, stream = _open(path)
    trouble: list[str] = []

    def invalid_row(row: pa_csv.InvalidRow) -> str:
        trouble.append(row.text)
        return "skip"

    names = [f"f{j}" for j in range(num_fields)]
    try:
        reader = pa_csv.open_csv(
            stream,
            read_options=pa_csv.ReadOptions(column_names=names, block_size=block_size),
            parse_options=pa_csv.ParseOptions(
                delimiter=separator,
                quote_char=False,
                escape_char=False,
                ignore_empty_lines=True,
                invalid_row_handler=invalid_row,
            ),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                check_utf8=False,
            ),
        )
        first = True
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                batch = None
            meter.update(raw)
            if trouble:
                raise NeedLineNumbers
            if batch is None:
                return
            fields = list(batch.columns)
            if first and header is not None:
                if [f[0].as_py() if len(f) else None for f in fields] != list(header):
                    raise NeedLineNumbers
                fields = [f.slice(1) for f in fields]
            first = False
            if len(fields[0]):
                yield FieldBlock(str(path), None, fields)
    except (pa.ArrowInvalid, OSError) as exc:
        raise NeedLineNumbers from exc
    finally:
        if stream is not raw:
            stream.close()
        raw.close()


def read_tables(
    path: Path,
    parse: Callable[[FieldBlock], pa.Table],
    *,
    separator: str,
    num_fields: int,
    problems: Problems,
    header: Sequence[str] | None = None,
    block_size: int = 8 << 20,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Iterator[pa.Table]:
    """Stream ``path`` as tables: its lines split into fields and typed by ``parse``.

    Arrow's multi-threaded CSV reader does the work while every line is good. At the first
    bad line, the file is read again by a slower reader that knows each row's line number,
    and continues from where the fast one stopped: ``problems`` then raises or skips with
    the exact line. ``parse`` reports bad rows through ``problems.reject(block.path,
    block.lines, ...)``, which asks for line numbers when ``block.lines`` is ``None``.

    Args:
        path: a text file, maybe compressed (see :data:`COMPRESSIONS`).
        parse: one block's fields -> a table of its good rows.
        separator: the field separator (may be longer than one character, e.g. ``"::"``,
            which always takes the line-numbered reader). Fields are not quoted.
        num_fields: fields per line; a line with another count is a bad line.
        problems: the bad-line policy; it raises or counts bad lines.
        header: the fields the first line must hold (it is then not a data row).
        block_size: bytes read at a time; memory use is a small multiple of it.
        on_bytes: called with the number of raw bytes read since its last call.

    Raises:
        ConvertError: a wrong header, or (with ``on_error="raise"``) a bad line, naming
            the file and line.
    """
    meter = _Meter(on_bytes)
    done = 0
    if len(separator) == 1:
        try:
            for block in _fast_blocks(path, separator, num_fields, header, block_size, meter):
                table = parse(block)
                done += table.num_rows
                yield table
            return
        except NeedLineNumbers:
            pass
    # Every row before the fast reader's first trouble was good, so the first ``done``
    # rows of the line-numbered reader are the ones already yielded.
    for block in _exact_blocks(path, separator, num_fields, problems, header, block_size, meter):
        table = parse(block)
        if done:
            drop = min(done, table.num_rows)
            table, done = table.slice(drop), done - drop
        if table.num_rows:
            yield table


def show(column: pa.Array, row: int) -> str:
    """Row ``row`` of a string column, quoted and shortened for an error message.

    Args:
        column: a string column.
        row: the row.
    """
    raw = column.cast(pa.binary())[row].as_py() or b""
    text = raw.decode("utf-8", "replace")
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _cast_or_locate(column: pa.Array, to: pa.DataType) -> tuple[pa.Array, np.ndarray | None]:
    """``column`` cast to ``to``, with the rows that do not parse as nulls and a bad mask."""
    try:
        return pc.cast(column, to), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Only on failure: find the bad rows with Arrow's own parser, 64 rows then 1 at a time,
    # so "bad" means exactly what the fast cast refuses.
    bad = np.zeros(len(column), dtype=bool)
    for start in range(0, len(column), 64):
        piece = column.slice(start, 64)
        try:
            pc.cast(piece, to)
            continue
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        for i in range(len(piece)):
            try:
                pc.cast(piece.slice(i, 1), to)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                bad[start + i] = True
    masked = pc.if_else(pa.array(bad), pa.scalar(None, column.type), column)
    return pc.cast(masked, to), bad


def _empty(column: pa.Array) -> np.ndarray:
    return pc.equal(pc.binary_length(column), 0).to_numpy(zero_copy_only=False)


def _union(*masks: np.ndarray | None) -> np.ndarray | None:
    present = [m for m in masks if m is not None]
    return np.logical_or.reduce(present) if present else None


def parse_int(column: pa.Array, *, nullable: bool) -> tuple[pa.Array, np.ndarray | None]:
    """Decimal integers as int64; returns ``(values, bad rows or None)``.

    Args:
        column: a string column.
        nullable: an empty field becomes null; otherwise it is a bad row.
    """
    empty = _empty(column)
    source = pc.if_else(pa.array(empty), pa.scalar(None, column.type), column)
    values, bad = _cast_or_locate(source, pa.int64())
    return values, (bad if nullable else _union(bad, empty if empty.any() else None))


def parse_float(column: pa.Array, to: pa.DataType) -> tuple[pa.Array, np.ndarray | None]:
    """Finite decimal numbers as ``to`` (a float type); empty, NaN and infinity are bad.

    Args:
        column: a string column.
        to: ``pa.float32()`` or ``pa.float64()``.
    """
    values, bad = _cast_or_locate(column, pa.float64())
    finite = pc.fill_null(pc.is_finite(values), False).to_numpy(zero_copy_only=False)
    if bad is not None:
        finite |= bad  # already reported as unparsable
    bad = _union(bad, ~finite if not finite.all() else None)
    return values.cast(to, safe=False), bad


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", dtype=np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)


def parse_hex(column: pa.StringArray, *, nullable: bool) -> tuple[pa.Array, np.ndarray | None]:
    """Hexadecimal strings (1 to 16 digits, below 2**63) as int64, vectorized.

    Args:
        column: a string column.
        nullable: an empty field becomes null; otherwise it is a bad row.
    """
    n = len(column)
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[
        column.offset : column.offset + n + 1
    ]
    lengths = np.diff(offsets)
    if column.null_count:
        lengths[column.is_null().to_numpy(zero_copy_only=False)] = 0
    empty = lengths == 0
    bad = (lengths > 16) | (empty & (not nullable))
    rows = np.flatnonzero(~empty & ~bad)
    values = np.zeros(n, dtype=np.int64)
    if len(rows):
        data = np.frombuffer(column.buffers()[2], dtype=np.uint8)
        first = offsets[rows].astype(np.int64)
        size = lengths[rows]
        width = 8 if size.max() <= 8 else 16
        # Right-align each string in a [rows, width] matrix of digits; padding reads as 0.
        index = (first - (width - size))[:, None] + np.arange(width)
        if (size == width).all():
            digits = _HEX[data[index]]
        else:
            digits = _HEX[data[np.maximum(index, 0)]]
            digits[index < first[:, None]] = 0
        wrong = (digits > 15).any(axis=1)
        # Two digits make a byte; the bytes read big-endian make the number.
        packed = (digits[:, 0::2] << 4) | digits[:, 1::2]
        word = packed.view(f">u{width // 2}").ravel().astype(np.uint64)
        wrong |= word >= np.uint64(2**63)
        bad[rows[wrong]] = True
        values[rows] = word.view(np.int64)
    valid = ~empty & ~bad
    return pa.array(values, mask=~valid), (bad if bad.any() else None)


def parse_string(column: pa.Array, *, nullable: bool) -> tuple[pa.Array, np.ndarray | None]:
    """Checked UTF-8 strings; returns ``(values, bad rows or None)``.

    Args:
        column: a string column whose UTF-8 is not checked yet.
        nullable: an empty field becomes null; otherwise it is a bad row.
    """
    empty = _empty(column)
    source = pc.if_else(pa.array(empty), pa.scalar(None, pa.binary()), column.cast(pa.binary()))
    values, bad = _cast_or_locate(source, pa.string())
    return values, (bad if nullable else _union(bad, empty if empty.any() else None))


def parse_choice(column: pa.Array, choices: Sequence[str]) -> tuple[pa.Array, np.ndarray | None]:
    """Each value's index in ``choices`` as int8; any other value is a bad row.

    Args:
        column: a string column.
        choices: the allowed values (at most 127).
    """
    index = pc.index_in(column, value_set=pa.array(list(choices), type=pa.string()))
    missing = index.is_null().to_numpy(zero_copy_only=False)
    return index.cast(pa.int8()), (missing if missing.any() else None)
