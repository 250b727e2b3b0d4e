"""recstack.columnio.shm: shared-memory slots and the JSON layout of a batch placed in one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from columnio_testdata import flat_batch, make_table

from recstack.columnio.shm import Slot, decode_layout, encode_layout
from recstack.core import JaggedTensor, KeyedJaggedTensor


@pytest.mark.parametrize("rows", [0, 1, 17])
def test_layout_round_trip(tmp_path: Path, rows: int) -> None:
    t = make_table(rows)
    batch = {
        "id": torch.tensor(t.column("id").to_pylist(), dtype=torch.int64),
        "hist": JaggedTensor.from_list(t.column("hist").to_pylist(), dtype=torch.int64),
        "tags": JaggedTensor.from_string_lists(t.column("tags").to_pylist()),
        "kjt": KeyedJaggedTensor(["a"], torch.arange(rows), torch.ones(rows, dtype=torch.int64)),
    }
    slot = Slot.create(1 << 16, "test")
    try:
        at = 0
        placed = {}
        for name, v in batch.items():

            def put(t: torch.Tensor) -> torch.Tensor:
                nonlocal at
                n = t.numel() * t.element_size()
                view = slot.tensor[at : at + n].view(t.dtype).view(t.shape)
                view.copy_(t)
                at += -(-n // 64) * 64 if n else 0
                return view

            placed[name] = put(v) if isinstance(v, torch.Tensor) else v.map_tensors(put)
        layout = json.loads(json.dumps(encode_layout(placed, slot.tensor)))
        back = decode_layout(layout, slot.tensor.clone())
        assert flat_batch(back) == flat_batch(batch)
    finally:
        slot.close(unlink=True)
