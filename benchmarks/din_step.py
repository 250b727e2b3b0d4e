"""A plain-PyTorch DIN training step: where its sparse optimizer time goes.

The sparse optimizers' anchor workload: how much of a plain-PyTorch DIN step
``torch.optim.SparseAdam`` takes, and how much ours takes in its place.

DIN (Zhou et al., 2018): user, target item and category embeddings, a behaviour history of
``--hist`` items with their categories, an attention unit (an MLP over ``[q, k, q - k,
q * k]``) weighting the history, and an MLP over the concatenation. Embeddings are
``nn.Embedding(sparse=True)``; the dense part trains with ``torch.optim.Adam``. The sparse
embeddings train with ``torch.optim.SparseAdam`` (the baseline) or with
``recstack.sparse_optim.SparseAdam(tf_compat=True)`` (the same update), both given the
same uncoalesced gradients the backward leaves; ours runs twice, reading each step's
checks at its end (the default) and with ``deferred_checks=True``. Reported: the whole step
and the sparse optimizer's part of it (the step minus the same step without it).

    python benchmarks/din_step.py [--batch 4096 --hist 100 --items 10000000]
"""

from __future__ import annotations

import argparse

import torch
from _harness import Report, Row, copy_bandwidth, device_name, median_time
from _results import add_json_option, report_result, save
from torch import nn

from recstack.sparse_optim import SparseAdam


class DIN(nn.Module):
    """Deep Interest Network with sparse embedding tables."""

    def __init__(self, items: int, cats: int, users: int, dim: int) -> None:
        super().__init__()
        self.item = nn.Embedding(items, dim, sparse=True)
        self.cat = nn.Embedding(cats, dim, sparse=True)
        self.user = nn.Embedding(users, dim, sparse=True)
        d = 2 * dim  # an item is its embedding and its category's
        self.attention = nn.Sequential(nn.Linear(4 * d, 80), nn.Sigmoid(), nn.Linear(80, 1))
        self.mlp = nn.Sequential(
            nn.Linear(dim + 2 * d, 200), nn.ReLU(), nn.Linear(200, 80), nn.ReLU(), nn.Linear(80, 1)
        )

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.item.weight, self.cat.weight, self.user.weight]

    def dense_parameters(self) -> list[nn.Parameter]:
        return [*self.attention.parameters(), *self.mlp.parameters()]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        q = torch.cat([self.item(batch["item"]), self.cat(batch["cat"])], dim=-1)  # [B, d]
        k = torch.cat([self.item(batch["hist_item"]), self.cat(batch["hist_cat"])], dim=-1)
        qe = q[:, None, :].expand_as(k)
        w = self.attention(torch.cat([qe, k, qe - k, qe * k], dim=-1)).squeeze(-1)  # [B, L]
        w = w.masked_fill(~batch["mask"], 0.0)
        interest = (w[..., None] * k).sum(dim=1)
        x = torch.cat([self.user(batch["user"]), q, interest], dim=-1)
        return self.mlp(x).squeeze(-1)


def make_batch(args, gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    b, hist = args.batch, args.hist
    # Popular items are drawn more often (a power law), as in click logs.
    u = torch.rand(b, hist + 1, generator=gen, device=device)
    items = (args.items * u.pow(3)).long().clamp_(max=args.items - 1)
    lengths = torch.randint(1, hist + 1, (b,), generator=gen, device=device)
    return {
        "user": torch.randint(0, args.users, (b,), generator=gen, device=device),
        "item": items[:, 0],
        "cat": items[:, 0] % args.cats,
        "hist_item": items[:, 1:],
        "hist_cat": items[:, 1:] % args.cats,
        "mask": torch.arange(hist, device=device)[None, :] < lengths[:, None],
        "label": torch.randint(0, 2, (b,), generator=gen, device=device).float(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--hist", type=int, default=100)
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--cats", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=10)
    add_json_option(parser)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    args = parser.parse_args()
    device = torch.device(args.device)
    report = Report(
        f"DIN training step, batch {args.batch}, history {args.hist}, {args.items:,} items x "
        f"{args.dim}",
        device_name(device),
        copy_bandwidth(device),
    )
    gen = torch.Generator(device=device).manual_seed(0)
    batch = make_batch(args, gen, device)
    times = {}
    for name in ("torch", "ours", "deferred"):
        torch.manual_seed(0)
        model = DIN(args.items, args.cats, args.users, args.dim).to(device)
        dense = torch.optim.Adam(model.dense_parameters(), lr=1e-3)
        sparse: torch.optim.Optimizer
        if name == "torch":
            sparse = torch.optim.SparseAdam(model.sparse_parameters(), lr=1e-3)
        else:
            sparse = SparseAdam(
                model.sparse_parameters(), lr=1e-3, tf_compat=True,
                deferred_checks=name == "deferred",
            )  # fmt: skip
        loss_fn = nn.BCEWithLogitsLoss()

        def forward_backward(model=model, dense=dense, loss_fn=loss_fn) -> None:
            loss = loss_fn(model(batch), batch["label"])
            loss.backward()
            dense.step()
            dense.zero_grad()

        def without_sparse_step(forward_backward=forward_backward, model=model) -> None:
            forward_backward()
            for p in model.sparse_parameters():
                p.grad = None

        def step(forward_backward=forward_backward, sparse=sparse) -> None:
            forward_backward()
            sparse.step()
            sparse.zero_grad()

        times[name] = (
            median_time(step, device, repeat=args.repeat),
            median_time(without_sparse_step, device, repeat=args.repeat),
        )
        if isinstance(sparse, SparseAdam):
            sparse.flush_checks()  # a deferred step's NaN/Inf would raise here
        del model, dense, sparse
    t_step, t_fb = times["torch"]
    for name, label in (("ours", ""), ("deferred", ", deferred_checks=True")):
        o_step, o_fb = times[name]
        report.add(Row(f"whole step (forward, backward, both optimizers){label}", o_step,
                       t_step, 0, baseline="same step, torch.optim.SparseAdam"))  # fmt: skip
        report.add(Row(f"sparse optimizer's part (step minus the step without it){label}",
                       o_step - o_fb, t_step - t_fb, 0,
                       baseline="torch.optim.SparseAdam"))  # fmt: skip
    print(f"  torch.optim.SparseAdam: {(t_step - t_fb) / t_step:.0%} of the step")
    print()
    print(report.markdown())
    save(report_result(report, "din_step", device, args), args.json)


if __name__ == "__main__":
    main()
