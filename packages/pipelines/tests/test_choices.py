"""recstack.pipelines.choices: a fixed-value option is checked against its Literal type."""

from __future__ import annotations

from typing import Literal

import pytest

from recstack.pipelines.choices import check_choice

Mode = Literal["max", "min"]


def test_a_choice_is_returned_and_another_value_is_named() -> None:
    assert check_choice("min", "EarlyStopping: mode", Mode) == "min"
    with pytest.raises(
        ValueError, match=r"^EarlyStopping: mode must be 'max' or 'min', got 'mid'$"
    ):
        check_choice("mid", "EarlyStopping: mode", Mode)
    with pytest.raises(ValueError, match=r"must be 'a', 'b' or 'c', got None"):
        check_choice(None, "x", Literal["a", "b", "c"])
