"""program_tables: slot counts and value slices, shared by the program ops."""

from __future__ import annotations

import pytest
import torch

from recstack.feature_engine.kernels.bucketize_float import bucketize_float
from recstack.feature_engine.kernels.program_tables import (
    MAX_SLOTS,
    feature_label,
    search_steps,
    slot_count,
    slot_opcode_mask,
)
from recstack.feature_engine.kernels.sparse_program import (
    OP_NOP,
    compile_sparse_program,
    sparse_program,
)


def test_compile_slots_too_small():
    with pytest.raises(ValueError, match="slots=1"):
        compile_sparse_program([[(OP_NOP,), (OP_NOP,)]], slots=1)


def test_values_without_features_always_rejected():
    e = torch.empty(0, dtype=torch.int64)
    for check in (True, False):
        with pytest.raises(ValueError, match="no features"):
            sparse_program(
                torch.arange(3), torch.tensor([0]), e.view(0, 1, 4), e, check_offsets=check
            )
        with pytest.raises(ValueError, match="no features"):
            bucketize_float(
                torch.zeros(3),
                torch.tensor([0]),
                e.double(),
                torch.tensor([0]),
                e,
                check_offsets=check,
            )


def test_slot_count_and_labels():
    assert slot_count([1, 3, 0], None, None) == 3
    assert slot_count([1], 4, None) == 4
    with pytest.raises(ValueError, match=r"feature 'b' \(index 1\) has 13 ops"):
        slot_count([1, MAX_SLOTS + 1], None, ["a", "b"])
    with pytest.raises(ValueError, match="at most 12"):
        slot_count([1], MAX_SLOTS + 1, None)
    with pytest.raises(TypeError, match="slots must be an int"):
        slot_count([1], 2.0, None)
    assert feature_label(2, None, None) == "feature 2"
    assert feature_label(0, 1, ["age"]) == "feature 'age' (index 0), op 1"


def test_slot_opcode_mask_and_search_steps():
    codes = torch.tensor([[1, 0], [4, 2], [1, 0]])
    assert slot_opcode_mask(codes, 0) == (1 << 0) | (1 << 3) | (1 << (4 + 1))
    assert slot_opcode_mask(torch.zeros(3, 2, dtype=torch.int64), 0) == 0
    assert [search_steps(c) for c in (0, 1, 2, 3, 4, 5, 1024, 1025)] == [0, 0, 1, 2, 2, 3, 10, 11]
