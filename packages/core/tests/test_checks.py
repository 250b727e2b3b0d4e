"""Shared option checks: the value back, or an error naming the option and the range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recstack.core.checks import check_int


def test_accepts_integers_of_every_kind() -> None:
    assert check_int(3, "x") == 3
    assert check_int(np.int64(4), "x", minimum=0) == 4
    assert type(check_int(torch.tensor(5), "x")) is int
    assert check_int(-7, "x") == -7


@pytest.mark.parametrize("bad", [True, 1.0, "3", None, [1]])
def test_non_integers_raise_type_error_with_the_name(bad: object) -> None:
    with pytest.raises(TypeError, match=r"Reader: batch_size must be an int"):
        check_int(bad, "Reader: batch_size", minimum=1)


def test_range_errors_name_the_bounds() -> None:
    with pytest.raises(ValueError, match=r"^opt must be an int >= 1, got 0$"):
        check_int(0, "opt", minimum=1)
    with pytest.raises(ValueError, match=r"^opt must be an int <= 9, got 10$"):
        check_int(10, "opt", maximum=9)
    with pytest.raises(ValueError, match=r"^opt must be an int >= 0 and <= 9, got -1$"):
        check_int(-1, "opt", minimum=0, maximum=9)
    assert check_int(9, "opt", minimum=0, maximum=9) == 9
