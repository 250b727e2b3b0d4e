"""RowUpdate checks its fields, and RowUpdater is a runtime-checkable protocol."""

from __future__ import annotations

import pytest
import torch

from recstack.core import PagedTensor, RowUpdate, RowUpdater
from recstack.core.kernels.row_update import new_gate


def test_row_update_validates_its_fields() -> None:
    table = PagedTensor(2, torch.float32, "cpu", name="t")
    with pytest.raises(ValueError, match="at most 6 params"):
        RowUpdate("x", None, lambda r, g: None, 0.1, params=(0.0,) * 7)
    half = PagedTensor(2, torch.float16, "cpu", name="h")
    with pytest.raises(ValueError, match="slot 'h' is torch.float16"):
        RowUpdate("x", None, lambda r, g: None, 0.1, slots=(table, half))
    with pytest.raises(ValueError, match="gate must be an int32 tensor of shape"):
        RowUpdate("x", None, lambda r, g: None, 0.1, gate=torch.zeros(2))
    assert RowUpdate("x", None, lambda r, g: None, 0.1, gate=new_gate("cpu")).gate is not None


def test_row_updater_protocol_is_runtime_checkable() -> None:
    class Updater:
        def begin_row_update(self, table):
            return None

        def end_row_update(self, table, *, gate):
            return None

    assert isinstance(Updater(), RowUpdater)
    assert not isinstance(object(), RowUpdater)
