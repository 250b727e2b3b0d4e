"""Small models and data shared by the pipelines tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from recstack.pipelines import Trainer
from recstack.saver import Checkpointer


def toy_data(n: int = 640, batch: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    w = torch.tensor([1.5, -2.0, 0.5, 0.0])
    y = (torch.sigmoid(x @ w) > torch.rand(n, generator=g)).float()
    return [{"x": x[i : i + batch], "label": y[i : i + batch]} for i in range(0, n, batch)]


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["x"])


def make(root: Path | None, data=None, **kw) -> tuple[Toy, Trainer]:
    torch.manual_seed(1)
    model = Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.8)
    ckpt = Checkpointer(root, progress=False) if root is not None else None
    kw.setdefault("epochs", 3)
    trainer = Trainer(
        model,
        data if data is not None else toy_data(),
        toy_data(seed=5),
        dense_optimizer=opt,
        lr_scheduler=sched,
        checkpointer=ckpt,
        device="cpu",
        progress=False,
        **kw,
    )
    return model, trainer


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
