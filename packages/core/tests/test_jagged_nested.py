"""Nested JaggedTensor: rows of strings, each string a row of bytes (list<string> columns)."""

import pytest
import torch

from recstack.core import JaggedTensor

ROWS = [["a", "bb"], [], ["ccc"], ["", "d", "ee"]]


def test_from_string_lists_round_trips() -> None:
    jt = JaggedTensor.from_string_lists(ROWS)
    assert jt.is_nested and len(jt) == 4 and jt.numel() == 6
    assert jt.lengths().tolist() == [2, 0, 1, 3]
    assert jt.values.to_strings() == ["a", "bb", "ccc", "", "d", "ee"]
    assert jt.to_strings() == ROWS
    assert jt.validate() is jt


@pytest.mark.parametrize("rows", [[], [[]], [["x"]], [[], []]])
def test_empty_and_length_one(rows: list[list[str]]) -> None:
    jt = JaggedTensor.from_string_lists(rows)
    assert jt.to_strings() == rows
    assert len(jt) == len(rows)


def test_slicing_rows_and_to_list() -> None:
    jt = JaggedTensor.from_string_lists(ROWS)
    assert jt[1:4].to_strings() == ROWS[1:4]
    assert jt[3].to_strings() == ROWS[3]
    assert [r.to_strings() for r in jt.unbind()] == ROWS
    assert jt.to_list()[0] == [[97], [98, 98]]


def test_move_keeps_nesting() -> None:
    jt = JaggedTensor.from_string_lists(ROWS)
    moved = jt.to("cpu")
    assert moved.is_nested and moved.to_strings() == ROWS
    assert moved.dtype == torch.uint8


def test_padding_needs_flat_values() -> None:
    with pytest.raises(TypeError, match="nested"):
        JaggedTensor.from_string_lists(ROWS).to_padded(2)


def test_validate_checks_inner_offsets() -> None:
    inner = JaggedTensor(torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="offsets\\[-1\\]"):
        JaggedTensor(inner, torch.tensor([0, 1])).validate()
    with pytest.raises(ValueError, match="offsets\\[-1\\]"):
        outer_inner = JaggedTensor(torch.tensor([1], dtype=torch.uint8), torch.tensor([0, 1]))
        JaggedTensor(outer_inner, torch.tensor([0, 2])).validate()


def test_one_string_is_rejected() -> None:
    with pytest.raises(TypeError):
        JaggedTensor.from_string_lists(["abc"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        JaggedTensor.from_strings("abc")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_nested_pin_and_cuda() -> None:
    jt = JaggedTensor.from_string_lists(ROWS).pin_memory()
    assert jt.is_pinned()
    dev = jt.to("cuda", non_blocking=True)
    dev.record_stream(torch.cuda.current_stream())
    assert dev.values.values.is_cuda and dev.to_strings() == ROWS
