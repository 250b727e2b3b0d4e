"""The plain-PyTorch side of ``e2e.py``: a DIN training step written the usual way.

What a user writes without RecStack: a ``torch.utils.data.DataLoader`` over the Parquet
files (an ``IterableDataset`` that reads row groups with pyarrow in the worker processes and
collates each batch to tensors there: ids ``% N``, the history cut to its last ``hist`` items
and padded), one ``nn.EmbeddingBag(N, dim, mode="sum", sparse=True)`` per id feature, the
history looked up in the candidate item's table with ``F.embedding(..., sparse=True)`` and a
mask, the DIN attention and MLP in fp32, ``torch.optim.SparseAdam`` on the tables and
``AdamW`` on the dense layers. Nothing here imports RecStack.

The loop reports to a timer (``mark(phase)`` closes the interval since the previous mark as
that phase; ``step_end(step)`` closes a step); ``e2e.py`` owns the timer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

Batch = dict[str, torch.Tensor]


class Timer(Protocol):
    """What the training loop reports to (``e2e.StepTimer``)."""

    splitting: bool

    def mark(self, phase: str) -> None: ...

    def step_end(self, step: int) -> None: ...


# ---------------------------------------------------------------------------- data


class ParquetBatches(IterableDataset[Batch]):
    """Batches of ``batch_size`` rows from Parquet files, collated to tensors.

    Row groups are dealt round-robin to the DataLoader's workers; each worker carries the
    rows left over at the end of a row group into its next batch and drops its last,
    partial batch.

    Args:
        paths: the Parquet files.
        batch_size: rows per batch.
        sparse: the id columns (the first is the candidate item).
        dense: the float columns.
        hist: the history's padded length (its last ``hist`` items are kept).
        num_ids: ``N``: ids are taken ``% N``; the history pads with ``N``.
    """

    def __init__(
        self,
        paths: Sequence[str],
        batch_size: int,
        sparse: Sequence[str],
        dense: Sequence[str],
        hist: int,
        num_ids: int,
    ) -> None:
        super().__init__()
        self.paths = list(paths)
        self.batch_size = batch_size
        self.sparse = list(sparse)
        self.dense = list(dense)
        self.hist = hist
        self.num_ids = num_ids
        self.columns = [*self.sparse, *self.dense, "history", "label"]

    def _units(self) -> list[tuple[str, int]]:
        return [
            (path, group)
            for path in self.paths
            for group in range(pq.ParquetFile(path).num_row_groups)
        ]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pending: list[pa.Table] = []
        rows = 0
        for path, group in self._units()[worker::workers]:
            pending.append(pq.ParquetFile(path).read_row_group(group, columns=self.columns))
            rows += pending[-1].num_rows
            while rows >= self.batch_size:
                table = pa.concat_tables(pending)
                yield self.collate(table.slice(0, self.batch_size))
                rest = table.slice(self.batch_size)
                pending, rows = [rest], rest.num_rows

    def collate(self, table: pa.Table) -> Batch:
        """One batch of tensors from ``table``'s rows."""
        n = self.num_ids
        sparse = np.stack([table.column(c).to_numpy() for c in self.sparse], axis=1) % n
        dense = np.stack([table.column(c).to_numpy() for c in self.dense], axis=1)
        history = table.column("history").combine_chunks()
        offsets = history.offsets.to_numpy().astype(np.int64)
        items = history.values.to_numpy() % n
        lengths = np.minimum(offsets[1:] - offsets[:-1], self.hist)
        # The last `hist` items of each row, left-aligned, padded with N (padding_idx).
        positions = np.arange(self.hist)[None, :]
        keep = positions < lengths[:, None]
        index = np.where(keep, offsets[1:, None] - lengths[:, None] + positions, 0)
        padded = np.where(keep, items[index] if items.size else 0, n)
        return {
            "sparse": torch.from_numpy(sparse.astype(np.int64)),
            "dense": torch.from_numpy(dense.astype(np.float32)),
            "hist": torch.from_numpy(padded.astype(np.int64)),
            "hist_len": torch.from_numpy(lengths),
            "label": torch.from_numpy(table.column("label").to_numpy().astype(np.float32)),
        }


def make_loader(
    dataset: ParquetBatches, num_workers: int, device: torch.device
) -> DataLoader[Batch]:
    """The DataLoader a user writes for a dataset that yields whole batches."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


# ---------------------------------------------------------------------------- model


class Dice(nn.Module):
    """DIN's Dice activation: ``p * x + (1 - p) * alpha * x``, ``p`` the sigmoid of the
    batch-normalized input (batch statistics in training, running ones in eval)."""

    def __init__(self, dim: int, eps: float = 1e-8, momentum: float = 0.01) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # statistics in fp32, also under autocast
        if self.training:
            var, mean = torch.var_mean(x, dim=0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((x - mean) * torch.rsqrt(var + self.eps))
        return p * x + (1 - p) * self.alpha * x


class PlainDIN(nn.Module):
    """DIN with one ``nn.EmbeddingBag`` per id feature; the history reads the item table.

    Args:
        num_sparse: id features (the first is the candidate item).
        num_ids: ``N``, rows per table (the item table has one more: the padding row).
        dim: embedding width.
        dense_dim: dense features.
        attention_hidden: hidden sizes of the attention unit (sigmoid).
        mlp_hidden: hidden sizes of the final MLP (Dice).
    """

    def __init__(
        self,
        num_sparse: int,
        num_ids: int,
        dim: int,
        dense_dim: int,
        attention_hidden: Sequence[int],
        mlp_hidden: Sequence[int],
    ) -> None:
        super().__init__()
        self.pad = num_ids
        bound = 1.0 / math.sqrt(dim)  # small rows, as RecStack's default initializer
        self.tables = nn.ModuleList()
        for i in range(num_sparse):
            rows = num_ids + 1 if i == 0 else num_ids
            bag = nn.EmbeddingBag(
                rows, dim, mode="sum", sparse=True, padding_idx=self.pad if i == 0 else None
            )
            with torch.no_grad():
                bag.weight.uniform_(-bound, bound)
                if i == 0:
                    bag.weight[self.pad].zero_()
            self.tables.append(bag)
        layers: list[nn.Module] = []
        width = 4 * dim
        for size in attention_hidden:
            layers += [nn.Linear(width, size), nn.Sigmoid()]
            width = size
        self.attention = nn.Sequential(*layers, nn.Linear(width, 1))
        layers = []
        width = (num_sparse + 1) * dim + dense_dim
        for size in mlp_hidden:
            layers += [nn.Linear(width, size), Dice(size)]
            width = size
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in self.tables]

    def dense_parameters(self) -> list[nn.Parameter]:
        return [*self.attention.parameters(), *self.mlp.parameters()]

    def embed(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The pooled rows of every id feature ``[B, dim]`` and the history's ``[B, L, dim]``."""
        ids = batch["sparse"]
        pooled = [table(ids[:, i : i + 1]) for i, table in enumerate(self.tables)]
        item = self.tables[0].weight
        history = F.embedding(batch["hist"], item, padding_idx=self.pad, sparse=True)
        return pooled, history

    def head(
        self, pooled: list[torch.Tensor], history: torch.Tensor, mask: torch.Tensor, dense: Any
    ) -> torch.Tensor:
        """Logits ``[B]`` from the embeddings, the history mask and the dense features."""
        item = pooled[0]
        q = item.unsqueeze(1).expand_as(history)
        scores = self.attention(torch.cat([q, history, q - history, q * history], -1))
        weights = scores.squeeze(-1).float() * mask
        interest = torch.einsum("bl,bld->bd", weights, history.float())
        x = torch.cat([interest, item.float(), *(p.float() for p in pooled[1:]), dense], -1)
        return self.mlp(x).squeeze(-1).float()


def history_mask(batch: Batch) -> torch.Tensor:
    """Bool ``[B, L]``, True where the padded history holds an item."""
    length = batch["hist"].shape[1]
    positions = torch.arange(length, device=batch["hist"].device)
    return positions[None, :] < batch["hist_len"][:, None]


# ---------------------------------------------------------------------------- loop


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(
    model: PlainDIN,
    batches: Iterator[Batch],
    device: torch.device,
    steps: int,
    sparse_optimizer: torch.optim.Optimizer,
    dense_optimizer: torch.optim.Optimizer,
    timer: Timer,
    *,
    autocast: bool = False,
) -> None:
    """``steps`` training steps; the phases are reported to ``timer``.

    Args:
        model: the model.
        batches: the DataLoader's iterator.
        device: where the model lives.
        steps: how many steps.
        sparse_optimizer: ``torch.optim.SparseAdam`` over the tables.
        dense_optimizer: ``AdamW`` over the dense layers.
        timer: what the phases are reported to.
        autocast: run the dense tower under bf16 autocast (an option beside the fp32
            default of this baseline).
    """
    model.train()
    loss_fn = nn.BCEWithLogitsLoss()

    def mark_dense(grad: torch.Tensor) -> None:
        timer.mark("dense")

    for step in range(1, steps + 1):
        timer.mark("other")
        batch = _to(next(batches), device)
        timer.mark("io")
        mask = history_mask(batch)
        timer.mark("features")
        pooled, history = model.embed(batch)
        timer.mark("sparse")
        if timer.splitting:
            # The last of these fires where the dense backward hands over to the tables'.
            for t in (*pooled, history):
                t.register_hook(mark_dense)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model.head(pooled, history, mask, batch["dense"])
        loss = loss_fn(logits, batch["label"])
        if timer.splitting:
            logits.register_hook(mark_dense)
        loss.backward()
        timer.mark("sparse")
        sparse_optimizer.step()
        sparse_optimizer.zero_grad(set_to_none=True)
        timer.mark("sparse")
        dense_optimizer.step()
        dense_optimizer.zero_grad(set_to_none=True)
        timer.mark("dense")
        timer.step_end(step)


@torch.no_grad()
def predict(
    model: PlainDIN, batches: Iterator[Batch], device: torch.device, *, autocast: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted click probabilities and labels over ``batches`` (eval mode)."""
    model.eval()
    scores, labels = [], []
    for cpu_batch in batches:
        batch = _to(cpu_batch, device)
        pooled, history = model.embed(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model.head(pooled, history, history_mask(batch), batch["dense"])
        scores.append(torch.sigmoid(logits).cpu().numpy())
        labels.append(cpu_batch["label"].numpy())
    model.train()
    if not scores:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(scores), np.concatenate(labels)
