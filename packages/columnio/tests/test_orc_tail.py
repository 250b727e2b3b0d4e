"""recstack.columnio.orc_tail: the ORC file tail (protobuf) reader behind stripe row counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.orc as orc
import pytest

from recstack.columnio.errors import ColumnIOError
from recstack.columnio.orc_tail import iter_fields, read_varint, stripe_row_counts


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes | int) -> bytes:
    tag = _varint(number << 3 | wire_type)
    if wire_type == 0:
        return tag + _varint(int(payload))
    if wire_type == 2:
        return tag + _varint(len(payload)) + payload  # type: ignore[arg-type]
    return tag + payload  # type: ignore[operator]


def _tail(stripe_rows: list[int], total: int | None, noise: bool = True) -> bytes:
    footer = _field(1, 0, 3)
    for rows in stripe_rows:
        stripe = _field(1, 0, 12345) + _field(5, 0, rows)
        if noise:  # unknown fields of every wire type must be skipped
            stripe += _field(9, 1, b"\x01" * 8) + _field(10, 5, b"\x02" * 4) + _field(11, 2, b"x")
        footer += _field(3, 2, stripe)
    footer += _field(4, 2, _field(1, 0, 12))  # a Type message, ignored
    if total is not None:
        footer += _field(6, 0, total)
    postscript = _field(1, 0, len(footer)) + _field(8000, 2, b"ORC")
    return _field(1, 2, postscript) + _field(2, 2, footer) + _field(3, 0, 999)


def test_varint_round_trip():
    rng = np.random.default_rng(14)
    values = [0, 1, 127, 128, 300, 2**32, 2**63, 2**64 - 1, *rng.integers(0, 2**62, 50).tolist()]
    for v in values:
        encoded = _varint(v)
        assert read_varint(b"\xff" + encoded, 1) == (v, len(encoded) + 1)


def test_varint_errors():
    with pytest.raises(ValueError, match="truncated"):
        read_varint(b"\x80\x80", 0)
    with pytest.raises(ValueError):
        read_varint(b"\xff" * 11 + b"\x01", 0)
    with pytest.raises(ValueError, match="64 bits"):
        read_varint(_varint(2**64), 0)


def test_iter_fields_wire_types():
    msg = _field(1, 0, 7) + _field(2, 1, b"\x01" + bytes(7)) + _field(3, 5, b"\x02\0\0\0")
    msg += _field(4, 2, b"hello")
    got = [(f, w, bytes(v) if isinstance(v, memoryview) else v) for f, w, v in iter_fields(msg)]
    assert got == [(1, 0, 7), (2, 1, 1), (3, 5, 2), (4, 2, b"hello")]
    with pytest.raises(ValueError, match="runs past"):
        list(iter_fields(_field(4, 2, b"hello")[:-1]))
    with pytest.raises(ValueError, match="wire type"):
        list(iter_fields(_varint(1 << 3 | 3)))


@pytest.mark.parametrize("rows", [[], [0], [1], [5, 0, 7, 0], [2**40, 3]])
def test_stripe_row_counts_synthetic(rows):
    tail = _tail(rows, sum(rows))
    assert stripe_row_counts(tail, expected_rows=sum(rows)) == tuple(rows)
    assert stripe_row_counts(_tail(rows, None, noise=False)) == tuple(rows)


def test_stripe_row_counts_mismatch_names_file():
    with pytest.raises(ColumnIOError, match="footer says 10") as info:
        stripe_row_counts(_tail([4, 5], 10), file="x.orc")
    assert info.value.file == "x.orc"
    with pytest.raises(ColumnIOError, match="reports 8"):
        stripe_row_counts(_tail([4, 5], 9), expected_rows=8, file="x.orc")
    with pytest.raises(ColumnIOError, match="corrupt ORC file tail"):
        stripe_row_counts(_tail([4, 5], 9)[:-7], file="x.orc")
    with pytest.raises(ColumnIOError, match="no footer"):
        stripe_row_counts(_field(3, 0, 1), file="x.orc")


def test_stripe_row_counts_match_pyarrow(tmp_path):
    rng = np.random.default_rng(15)
    source = pa.table(
        {
            "id": pa.array(np.arange(3000), pa.int64()),
            "x": pa.array(rng.random(3000), pa.float64()),
            "name": pa.array([f"n{i}" * (i % 4) for i in range(3000)], pa.string()),
        }
    )
    path = tmp_path / "t.orc"
    orc.write_table(source, path, stripe_size=1024, batch_size=128)
    reader = orc.ORCFile(str(path))
    counts = stripe_row_counts(reader.reader.serialized_file_tail(), expected_rows=reader.nrows)
    assert reader.nstripes > 5
    assert counts == tuple(reader.read_stripe(i).num_rows for i in range(reader.nstripes))
