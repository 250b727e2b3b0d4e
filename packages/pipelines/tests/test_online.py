"""Online learning: progressive validation per window, delta checkpoints, resume after the
last complete window."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from recstack.columnio import StreamingReader
from recstack.pipelines import Trainer
from recstack.saver import Checkpointer
from recstack.saver.manifest import read_manifest


def write_windows(root: Path, files: int = 5, rows: int = 192) -> None:
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([1.5, -2.0, 0.5, 0.0])
    for i in range(files):
        x = torch.randn(rows, 4, generator=g)
        y = (torch.sigmoid(x @ w) > torch.rand(rows, generator=g)).float()
        cols = {f"x{j}": pa.array(x[:, j].numpy()) for j in range(4)}
        cols["label"] = pa.array(y.numpy())
        pq.write_table(pa.table(cols), root / f"part-{i:03d}.parquet")


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, batch):
        return self.net(torch.stack([batch[f"x{j}"] for j in range(4)], dim=1))


def online(data: Path, ckpt: Path) -> tuple[Flat, Trainer]:
    torch.manual_seed(3)
    model = Flat()
    reader = StreamingReader(
        str(data), batch_size=64, window_files=1, poll_interval=0.01, idle_timeout=0.3
    )
    trainer = Trainer(
        model, reader, dense_optimizer=torch.optim.Adam(model.parameters(), lr=0.02),
        checkpointer=Checkpointer(ckpt, progress=False), device="cpu", progress=False,
    )  # fmt: skip
    return model, trainer


def test_windows_are_validated_then_trained_and_checkpointed(tmp_path: Path) -> None:
    write_windows(tmp_path / "data")
    model, trainer = online(tmp_path / "data", tmp_path / "ck")
    result = trainer.fit_online(full_every=3)
    assert [w.window for w in result.windows] == [0, 1, 2, 3, 4]
    assert all(w.rows == 192 for w in result.windows) and result.step == 15
    assert [w.delta for w in result.windows] == [False, True, True, False, True]
    for w in result.windows:
        manifest = read_manifest(w.checkpoint)
        assert manifest["kind"] == ("delta" if w.delta else "full")
        assert 0.0 <= w.metrics["label/auc"] <= 1.0 and w.metrics["window"] == w.window
    # Progressive validation: the first window is predicted by the untrained model, later
    # ones by a model that learned the signal.
    assert result.windows[-1].metrics["label/auc"] > result.windows[0].metrics["label/auc"]


@pytest.mark.parametrize("first", [1, 2, 4])
def test_restart_continues_after_the_last_complete_window(tmp_path: Path, first: int) -> None:
    write_windows(tmp_path / "data")
    full, trainer = online(tmp_path / "data", tmp_path / "a")
    trainer.fit_online(full_every=2)
    _, part = online(tmp_path / "data", tmp_path / "b")
    assert len(part.fit_online(full_every=2, max_windows=first).windows) == first
    resumed, rest = online(tmp_path / "data", tmp_path / "b")
    result = rest.fit_online(full_every=2)
    assert [w.window for w in result.windows] == list(range(first, 5))
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
