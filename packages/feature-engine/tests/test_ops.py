"""The ops: typed, validated at construction, and serializable as config entries."""

from __future__ import annotations

import math

import pytest

from recstack.feature_engine import ops


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ops.Clip(min=math.nan), "Clip min is NaN"),
        (lambda: ops.Clip(max=math.nan), "Clip max is NaN"),
        (lambda: ops.Clip(0.0, math.nan), "Clip max is NaN"),
        (lambda: ops.Clip(min=math.inf), "Clip min=inf would turn every value into inf"),
        (lambda: ops.Clip(max=-math.inf), "Clip max=-inf would turn every value into -inf"),
        (lambda: ops.Normalize(mean=math.nan), "Normalize mean must be a finite number, got nan"),
        (lambda: ops.Normalize(mean=math.inf), "Normalize mean must be a finite number, got inf"),
        (lambda: ops.Normalize(mean=-math.inf), "Normalize mean must be a finite number, got -inf"),
        (lambda: ops.Normalize(std=math.nan), "Normalize std must be a positive finite number"),
        (lambda: ops.Normalize(std=math.inf), "Normalize std must be a positive finite number"),
        (lambda: ops.Normalize(std=0), "Normalize std must be a positive finite number"),
    ],
)
def test_non_finite_dense_op_values_are_refused_by_the_op(make, message: str) -> None:
    with pytest.raises(ops.OpError, match=f"^{message}"):
        make()


def test_bucketize_boundaries_are_checked() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        ops.Bucketize([3, 1])
    with pytest.raises(ValueError, match="empty"):
        ops.Bucketize([])
    with pytest.raises(ops.OpError, match=r"^boundaries must be strictly increasing"):
        ops.Bucketize([2**53 + 1, 2.0**53])  # 2**53 + 1 > 2.0**53, compared exactly


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ops.Truncate(3, side="up"), "side must be 'left' or 'right', got 'up'"),
        (lambda: ops.Pad(3, side="middle"), "side must be 'left' or 'right', got 'middle'"),
        (lambda: ops.Pad(3, truncate=None), "truncate must be 'left' or 'right', got None"),
        (lambda: ops.Truncate(-1), "max_len must be an int >= 0, got -1"),
        (lambda: ops.Truncate(True), "max_len must be an int, got True"),
        (lambda: ops.Mod(2.0), "m must be an int, got 2.0"),
        (lambda: ops.Hash(seed=2**64), "seed must be an int >= 0 and <= 18446744073709551615"),
        (lambda: ops.MultiHash(k=65), "k must be an int >= 1 and <= 64, got 65"),
    ],
)
def test_choices_and_ints_are_checked_at_construction(make, message: str) -> None:
    with pytest.raises(ops.OpError, match=f"^{message}"):
        make()


def test_op_kinds_and_dict_round_trip() -> None:
    assert (ops.Hash.kind, ops.Log1p.kind, ops.FillMissing.kind) == ("sparse", "dense", "any")
    op = ops.Pad(4, value=-1, side="left")
    entry = op.to_dict()
    assert entry == {"op": "Pad", "length": 4, "value": -1, "side": "left", "truncate": "left"}
    assert ops.op_from_dict(entry) == op
    assert ops.op_from_dict({"op": "Mask", "ids": [3, 1]}) == ops.FilterIds((3, 1))
    assert ops.Mask([3, 1], keep=True) == ops.FilterIds((3, 1), True)
    with pytest.raises(ops.OpError, match="unknown op 'Nope'"):
        ops.op_from_dict({"op": "Nope"})
    with pytest.raises(ops.OpError, match=r"Hash has no parameter\(s\) \['sed'\]"):
        ops.op_from_dict({"op": "Hash", "sed": 1})
