"""One HSTU training step (recstack.pipelines.models.HSTU) against the same model in plain
PyTorch.

Workload: ``--batch`` users whose history lengths follow a Zipf law of mean ``--mean`` and
max / mean ``--ratio`` (as in ``jagged_attention.py``); item ids (history and one candidate
per user) Zipf-distributed over a vocabulary of ``--vocabs`` items (the rank-``r`` item drawn
with probability ~ ``1 / r``, ranks scattered over ``[0, vocab)``); one 0/1 click label per
user. ``--batches`` batches are made on the device before anything runs and both sides cycle
through the same ones. The model: ``--emb-dim`` item embeddings (fp32 rows), projected to
``--dim``, learned positions counted back from the candidate, ``--layers`` causal HSTU
blocks of ``--heads`` pointwise heads, a final layer norm, a ranking MLP (``--mlp-hidden``)
over the candidate's state and embedding, and the next-item softmax over the whole
vocabulary (an output layer ``[vocab, dim]``). Loss: BCE-with-logits on the click plus
``--next-item-weight`` times the next-item loss. The dense side runs under bf16 autocast on
a GPU (``--dtype``). Each vocabulary is one row.

* Ours: ``HSTU(HSTUConfig(attention="pointwise", next_item_loss="full", ...))`` over an
  ``EmbeddingCollection`` with one dynamic table (``TableConfig(capacity=vocab)``) read by a
  pooled candidate feature and a jagged history feature; the batch is a
  ``KeyedJaggedTensor``. Sequences stay jagged (the fused jagged attention) and the
  next-item loss is the fused linear cross-entropy. ``recstack.sparse_optim.SparseAdam``
  trains the table, fused ``torch.optim.AdamW`` the rest.
* Baseline, the same network the usual way: ``nn.Embedding(vocab + 1, emb_dim,
  padding_idx=vocab, sparse=True)`` over a right-padded ``[B, L + 1]`` id matrix (``L`` the
  batch's longest history) with the candidate at index ``length`` of its row; each block
  ``x + W2(layer_norm(silu(q k^T * scale) * mask / n @ v) * u)`` with ``u, v, q, k =
  silu(W1 layer_norm(x))``, per head, on ``[B, heads, L + 1, L + 1]`` scores, the mask causal
  and limited to the row's ``length + 1`` tokens and ``n = length + 1`` (what ours divides by
  when no ``max_len`` is given); the next-item loss as ``F.cross_entropy`` of the full
  ``[tokens, vocab]`` logits of the history tokens that have a successor, picked with a
  boolean mask. ``torch.optim.SparseAdam`` trains the embedding, fused ``AdamW`` the rest.
  Initial values are drawn like ours (the embedding like the table's default initializer),
  so the two start at similar losses.

Before timing, one ``HSTUBlock`` of ours and one baseline block given the same weights are
run on a tiny jagged batch on the same device and must agree, and both sides' dense
parameter counts must be equal. Timed: ``--warmup`` steps, then ``--steps`` steps each
between two device syncs (the wall clock: both sides read values back to the host inside a
step by design: ours for the hash table's unique and new ids, the attention's offset checks,
the next-item id check and the sparse optimizer's checks; the baseline for the boolean
selection, the padding filter and the coalescing of the sparse gradient). A step is the
forward, the loss, the backward and both optimizers' steps and ``zero_grad``. Reported: the
median step (the table), the mean and the longest (``extra``), samples/s and tokens/s over
the timed steps (history tokens plus candidates), the peak GPU memory allocated during the
timed steps (parameters and optimizer states included), the useful FLOPs of a step (6 x the
dense parameters each token uses x the tokens, i.e. the blocks and input projection for
every token, the output layer for every next-item target and the MLP for every candidate;
plus ``12 * head_dim * heads * layers`` per allowed (query, key) pair, forward and
backward) and TFLOP/s, and MBU = a lower bound of the bytes a step must move / the median
step / the copy bandwidth measured in this run. The bound counts the optimizers only:
AdamW reads a dense parameter, its gradient and two moments and writes the parameter and
the moments, 28 bytes in fp32 per parameter, and the sparse Adam does the same for every
element of each unique embedding row of the batch (the mean over the batches). A side that
runs out of memory is reported as such.

    python benchmarks/hstu.py                     # on a GPU
    python benchmarks/hstu.py --vocabs 200000     # one vocabulary
    python benchmarks/hstu.py --device cpu        # smoke run, tiny sizes
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _harness import Report, Row, copy_bandwidth, device_name, sized_for_device, synchronize
from _results import Measurement, add_json_option, measurement, report_result, save
from jagged_attention import useful_pairs, zipf_lengths
from torch import nn

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import FeatureConfig, TableConfig
from recstack.pipelines.models import HSTU, HSTUConfig
from recstack.pipelines.models.hstu import HSTUBlock
from recstack.sparse_optim import SparseAdam

_GPU_SIZES: dict[str, Any] = {
    "batch": 128, "mean": 256, "emb_dim": 128, "dim": 768, "heads": 6, "layers": 8,
    "warmup": 5, "steps": 20, "vocabs": [200_000, 1_000_000],
}  # fmt: skip
_CPU_SIZES: dict[str, Any] = {
    "batch": 4, "mean": 8, "emb_dim": 16, "dim": 32, "heads": 2, "layers": 2,
    "warmup": 2, "steps": 2, "vocabs": [500],
}  # fmt: skip
BASELINE = "plain PyTorch: padded, nn.Embedding + SparseAdam, full logits"
_ADAM_BYTES = 28  # fp32: read weight, grad, exp_avg, exp_avg_sq; write weight and both


# ------------------------------------------------------------------------------ the data


@dataclass
class Batch:
    """One batch in both layouts, on the device, and its sizes (known on the host)."""

    ours: dict[str, Any]  # {"sparse": KeyedJaggedTensor, "label": [B]}
    ids: torch.Tensor  # [B, L + 1]: history, the candidate at index length, then padding
    lengths: torch.Tensor  # [B] history lengths
    label: torch.Tensor  # [B] float 0/1
    tokens: int  # history tokens plus candidates
    next_targets: int  # history tokens followed by another
    pairs: int  # allowed (query, key) pairs of the causal attention
    unique_rows: int  # distinct ids


def make_batches(args: argparse.Namespace, vocab: int, device: torch.device) -> list[Batch]:
    """``args.batches`` batches of Zipf lengths and Zipf item ids (the same lengths for
    every vocabulary)."""
    gen = torch.Generator().manual_seed(args.seed)
    # Popular items are scattered over the id range, not the smallest ids.
    scatter = torch.randperm(vocab, generator=gen)

    def draw(n: int) -> torch.Tensor:
        # (vocab + 1) ** u is log-uniform: its floor k has probability ~ 1 / k (Zipf, s = 1).
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        rank = (float(vocab + 1) ** u).floor().long().sub_(1).clamp_(0, vocab - 1)
        return scatter[rank]

    batches = []
    b = args.batch
    for _ in range(args.batches):
        lengths = zipf_lengths(b, args.mean, args.ratio, gen)
        num = int(lengths.sum())
        history, candidate = draw(num), draw(b)
        label = torch.randint(0, 2, (b,), generator=gen).float()
        kjt = KeyedJaggedTensor(
            ["candidate", "history"],
            torch.cat([candidate, history]).to(device),
            lengths=torch.cat([torch.ones(b, dtype=torch.int64), lengths]).to(device),
            length_per_key=[b, num],  # known here, so the model never syncs for it
        )
        longest = int(lengths.max())
        ids = torch.full((b, longest + 1), vocab, dtype=torch.int64)
        row = torch.repeat_interleave(torch.arange(b), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        ids[row, torch.arange(num) - starts[row]] = history
        ids[torch.arange(b), lengths] = candidate
        batches.append(
            Batch(
                ours={"sparse": kjt, "label": label.to(device)},
                ids=ids.to(device),
                lengths=lengths.to(device),
                label=label.to(device),
                tokens=num + b,
                next_targets=int((lengths - 1).clamp(min=0).sum()),
                pairs=useful_pairs(lengths + 1, 0, True),
                unique_rows=int(torch.cat([history, candidate]).unique().numel()),
            )
        )
    return batches


# ------------------------------------------------------------------------------ baseline


class PlainHSTUBlock(nn.Module):
    """HSTU's pre-norm block on a padded ``[B, L, dim]`` batch."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 4 * dim)  # u, v, q, k
        self.attn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x`` plus the block's output; ``weights`` ``[B, 1, L, L]`` is the mask over
        each row's token count (:func:`pointwise_weights`)."""
        b, length, _ = x.shape
        u, v, q, k = F.silu(self.in_proj(self.norm(x))).split(self.dim, dim=-1)
        q, k, v = (
            t.reshape(b, length, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v)
        )
        scores = F.silu(q @ k.transpose(-1, -2) * self.head_dim**-0.5) * weights
        attended = (scores @ v).transpose(1, 2).reshape(b, length, self.dim)
        return x + self.out_proj(self.attn_norm(attended) * u)


def pointwise_weights(counts: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, width, width]``: ``1 / counts[b]`` where query ``i`` may see key ``j``
    (``j <= i`` and ``j < counts[b]``), else 0; built once a step, in the scores' dtype."""
    pos = torch.arange(width, device=counts.device)
    causal = pos[:, None] >= pos[None, :]
    allowed = causal[None] & (pos[None, None, :] < counts[:, None, None])
    return (allowed / counts[:, None, None]).to(dtype)[:, None]


class PlainHSTU(nn.Module):
    """The baseline: HSTU on right-padded id matrices, ``model(ids, lengths) -> (click
    logits [B], mean next-item loss)``."""

    def __init__(self, args: argparse.Namespace, vocab: int) -> None:
        super().__init__()
        emb, dim = args.emb_dim, args.dim
        self.vocab, self.max_positions = vocab, args.max_positions
        self.items = nn.Embedding(vocab + 1, emb, padding_idx=vocab, sparse=True)
        with torch.no_grad():  # the table's default initializer, padding row kept zero
            self.items.weight[:vocab].uniform_(-(emb**-0.5), emb**-0.5)
        self.input_proj: nn.Module = nn.Linear(emb, dim) if dim != emb else nn.Identity()
        self.positions = nn.Embedding(args.max_positions, dim)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.blocks = nn.ModuleList(PlainHSTUBlock(dim, args.heads) for _ in range(args.layers))
        self.final_norm = nn.LayerNorm(dim)
        layers: list[nn.Module] = []
        width = dim + emb
        for size in args.mlp_hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.head = nn.Sequential(*layers, nn.Linear(width, 1))
        self.out_weight = nn.Parameter(torch.randn(vocab, dim) * dim**-0.5)

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p is not self.items.weight]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, width = ids.shape
        kind = ids.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        pos = torch.arange(width, device=ids.device)
        emb = self.items(ids)  # [B, L + 1, emb]
        from_end = (lengths[:, None] - pos).clamp(0, self.max_positions - 1)
        x = self.input_proj(emb) + self.positions(from_end)
        weights = pointwise_weights(lengths + 1, width, dtype or x.dtype)
        for block in self.blocks:
            x = block(x, weights)
        x = self.final_norm(x)
        rows = torch.arange(b, device=ids.device)
        state = torch.cat([x[rows, lengths].float(), emb[rows, lengths].float()], dim=-1)
        logits = self.head(state).squeeze(-1).float()
        has_next = pos[None, :] < (lengths - 1)[:, None]
        hidden = x[has_next]  # the history tokens with a next history token
        targets = ids.roll(-1, dims=1)[has_next]
        next_loss = F.cross_entropy(hidden @ self.out_weight.T, targets)
        return logits, next_loss


# ------------------------------------------------------------------------------ the sides

Step = Callable[[Batch], torch.Tensor]


def optimize(
    loss: torch.Tensor, sparse: torch.optim.Optimizer, dense: torch.optim.Optimizer
) -> torch.Tensor:
    """The backward of ``loss`` and both optimizers' steps; the loss, detached."""
    loss.backward()
    sparse.step()
    sparse.zero_grad()
    dense.step()
    dense.zero_grad()
    return loss.detach()


def build_ours(args: argparse.Namespace, vocab: int, device: torch.device) -> tuple[Step, int]:
    """Our step and the model's dense parameter count."""
    tables = [TableConfig("item", dim=args.emb_dim, capacity=vocab)]
    features = [
        FeatureConfig("candidate", "item"),
        FeatureConfig("history", "item", pooling="none"),  # jagged: no max_len
    ]
    config = HSTUConfig(
        "candidate", "history",
        dim=args.dim, layers=args.layers, heads=args.heads, attention="pointwise",
        max_positions=args.max_positions, mlp_hidden=args.mlp_hidden,
        next_item_loss="full", vocab_size=vocab,
    )  # fmt: skip
    model = HSTU(config, tables, features, device=device)
    sparse = SparseAdam(model.embeddings.sparse_parameters(), lr=args.lr)
    dense = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    autocast = _autocast(args, device)

    def step(batch: Batch) -> torch.Tensor:
        with autocast():
            out = model(batch.ours)
        loss = F.binary_cross_entropy_with_logits(out["label"], batch.label)
        loss = loss + args.next_item_weight * out["next_item"]
        return optimize(loss, sparse, dense)

    return step, sum(p.numel() for p in model.parameters())


def build_plain(args: argparse.Namespace, vocab: int, device: torch.device) -> tuple[Step, int]:
    """The baseline's step and its dense parameter count."""
    model = PlainHSTU(args, vocab).to(device)
    params = model.dense_parameters()
    sparse = torch.optim.SparseAdam([model.items.weight], lr=args.lr)
    dense = torch.optim.AdamW(params, lr=args.lr, fused=device.type == "cuda")
    autocast = _autocast(args, device)

    def step(batch: Batch) -> torch.Tensor:
        with autocast():
            logits, next_loss = model(batch.ids, batch.lengths)
        loss = F.binary_cross_entropy_with_logits(logits, batch.label)
        loss = loss + args.next_item_weight * next_loss
        return optimize(loss, sparse, dense)

    return step, sum(p.numel() for p in params)


def _autocast(args: argparse.Namespace, device: torch.device) -> Callable[[], Any]:
    enabled = args.dtype == "bf16"
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@dataclass
class Side:
    """One side's timed steps."""

    times: list[float]  # seconds
    peak: int | None  # bytes allocated at the peak of the timed steps (GPU)
    first_loss: float  # the first warm-up step's, before any update
    last_loss: float
    dense_params: int


def run_side(
    build: Callable[..., tuple[Step, int]],
    args: argparse.Namespace,
    vocab: int,
    batches: list[Batch],
    device: torch.device,
) -> Side | None:
    """Build a side, warm it up and time ``args.steps`` steps; ``None`` if it runs out of
    memory. Its model and optimizers are freed before this returns."""
    try:
        side = _time_side(build, args, vocab, batches, device)
    except torch.cuda.OutOfMemoryError:
        side = None
    # Out of the handler, the traceback's frames (and their tensors) are gone.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return side


def _time_side(build, args, vocab, batches, device) -> Side:
    torch.manual_seed(args.seed)
    step, dense_params = build(args, vocab, device)
    first = step(batches[0])
    for i in range(1, args.warmup):
        step(batches[i % len(batches)])
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        batch = batches[i % len(batches)]
        synchronize(device)
        t0 = time.perf_counter()
        last = step(batch)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Side(times, peak, first.item(), last.item(), dense_params)


# ------------------------------------------------------------------------------ checks


def check_block(device: torch.device) -> float:
    """The largest difference between our ``HSTUBlock`` and the baseline's block given the
    same weights, on a tiny jagged batch in fp32; raises if they disagree."""
    torch.manual_seed(0)
    dim, heads = 32, 2
    ours = HSTUBlock(dim, heads, "pointwise", 0.0).to(device)
    plain = PlainHSTUBlock(dim, heads).to(device)
    with torch.no_grad():
        for mine, theirs in (
            (plain.norm, ours.norm),
            (plain.in_proj, ours.attention.in_proj),
            (plain.attn_norm, ours.attention.norm),
            (plain.out_proj, ours.attention.out_proj),
        ):
            mine.load_state_dict(theirs.state_dict())
    counts = torch.tensor([4, 1, 7, 3], device=device)  # history lengths + 1 (candidate)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    x = torch.randn(int(offsets[-1]), dim, device=device)
    width = int(counts.max())
    valid = torch.arange(width, device=device)[None, :] < counts[:, None]
    padded = x.new_zeros(len(counts), width, dim)
    padded[valid] = x
    with torch.no_grad():
        want = ours(x, offsets)
        got = plain(padded, pointwise_weights(counts, width, x.dtype))[valid]
    err = (got - want).abs().max().item()
    # The GPU kernel may multiply fp32 in TF32; the CPU paths are exact to rounding.
    tolerance = 2e-2 if device.type == "cuda" else 1e-4
    if not err < tolerance:
        raise AssertionError(f"HSTU block: ours and the baseline differ by {err:.3g}")
    return err


def check_losses(name: str, ours: Side, plain: Side | None) -> None:
    """Finite losses on both sides, and similar ones before the first update."""
    sides = [("ours", ours)] + ([("baseline", plain)] if plain is not None else [])
    for side, result in sides:
        for when, loss in (("first", result.first_loss), ("last", result.last_loss)):
            if not math.isfinite(loss):
                raise AssertionError(f"{name}: {side}'s {when} loss is {loss}")
    if plain is not None and not 0.5 < ours.first_loss / plain.first_loss < 2.0:
        raise AssertionError(
            f"{name}: step-0 losses differ too much: ours {ours.first_loss:.4f}, baseline "
            f"{plain.first_loss:.4f}"
        )
    if plain is not None and ours.dense_params != plain.dense_params:
        raise AssertionError(
            f"{name}: dense parameters differ: ours {ours.dense_params:,}, baseline "
            f"{plain.dense_params:,}"
        )


# ------------------------------------------------------------------------------ counting


@dataclass(frozen=True)
class ParamsUsed:
    """Dense parameters by what uses them: every token (input projection, blocks, final
    norm), every next-item target (the output layer) and every candidate (the MLP)."""

    per_token: int
    per_target: int
    per_candidate: int

    @classmethod
    def of(cls, args: argparse.Namespace, vocab: int) -> ParamsUsed:
        with torch.device("meta"):  # shapes only, nothing allocated
            model = PlainHSTU(args, vocab)

        def count(*modules: nn.Module) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        return cls(
            count(model.input_proj, model.blocks, model.final_norm),
            model.out_weight.numel(),
            count(model.head),
        )

    def flops(self, args: argparse.Namespace, batch: Batch) -> int:
        """The useful forward and backward FLOPs of one step over ``batch``."""
        dense = (
            self.per_token * batch.tokens
            + self.per_target * batch.next_targets
            + self.per_candidate * args.batch
        )
        attention = 12 * (args.dim // args.heads) * args.heads * args.layers * batch.pairs
        return 6 * dense + attention


def step_bytes(dense_params: int, emb_dim: int, unique_rows: int) -> int:
    """The optimizers' bytes of one step: the lower bound MBU counts."""
    return _ADAM_BYTES * (dense_params + emb_dim * unique_rows)


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="users a batch (128 on a GPU, 4 on a CPU)")
    parser.add_argument("--mean", type=int, help="mean history length (256 on a GPU, 8 on a CPU)")
    parser.add_argument("--ratio", type=float, default=4.0, help="longest / mean history")
    parser.add_argument("--vocabs", type=int, nargs="+", help="items; one row each")
    parser.add_argument("--emb-dim", type=int, help="item embedding width")
    parser.add_argument("--dim", type=int, help="the transformer's width")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--max-positions", type=int, default=1024)
    parser.add_argument("--mlp-hidden", type=int, nargs="*", default=[256])
    parser.add_argument("--next-item-weight", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int, help="timed steps")
    parser.add_argument("--seed", type=int, default=0)
    add_json_option(parser)
    args = parser.parse_args()
    device = sized_for_device(args, _GPU_SIZES, _CPU_SIZES)
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if args.dim % args.heads:
        parser.error(f"--dim {args.dim} is not a multiple of --heads {args.heads}")
    if args.warmup < 1 or args.steps < 1 or args.batches < 1:
        parser.error("--warmup, --steps and --batches must be >= 1")

    bandwidth = copy_bandwidth(device)
    report = Report(
        f"HSTU training step, B {args.batch}, Zipf histories of mean {args.mean} (max / mean "
        f"{args.ratio:g}), emb {args.emb_dim}, dim {args.dim}, {args.layers} layers x "
        f"{args.heads} pointwise heads, full next-item softmax, {args.dtype}",
        device_name(device),
        bandwidth,
    )
    print(f"{report.device}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s", flush=True)
    err = check_block(device)
    print(f"  HSTU block, ours vs the baseline with the same weights: max |diff| {err:.2e}")
    out_of_memory: list[Measurement] = []
    for vocab in args.vocabs:
        _run_vocab(args, report, out_of_memory, device, vocab)
    print()
    print(report.markdown())
    for row in out_of_memory:
        ours = f"{row.ours:.3f}" if row.ours is not None else "out of memory"
        base = f"{row.baseline_value:.3f}" if row.baseline_value is not None else "out of memory"
        print(f"| {row.name} | {ours} | {base} | {row.baseline} | | | |")
    result = report_result(report, "hstu", device, args)
    result.rows += out_of_memory
    save(result, args.json)


def _run_vocab(args, report, out_of_memory, device, vocab) -> None:
    batches = make_batches(args, vocab, device)
    timed = [batches[i % len(batches)] for i in range(args.warmup, args.warmup + args.steps)]
    tokens = sum(b.tokens for b in batches) / len(batches)
    longest = max(b.ids.shape[1] - 1 for b in batches)
    name = (
        f"vocab {vocab:,}, {tokens:,.0f} tokens a batch (longest history {longest}), "
        "forward + backward + both optimizers"
    )
    ours = run_side(build_ours, args, vocab, batches, device)
    plain = run_side(build_plain, args, vocab, batches, device)
    if ours is not None:
        check_losses(name, ours, plain)
    used = ParamsUsed.of(args, vocab)
    flops = sum(used.flops(args, b) for b in timed)
    unique = sum(b.unique_rows for b in batches) / len(batches)
    measured = [side for side in (ours, plain) if side is not None]
    dense_params = measured[0].dense_params if measured else 0
    nbytes = step_bytes(dense_params, args.emb_dim, round(unique))
    extra: dict[str, float] = {
        "useful_flops": flops / len(timed), "dense_params": dense_params, "unique_rows": unique,
    }  # fmt: skip
    for label, side in (("ours", ours), ("baseline", plain)):
        if side is None:
            print(f"  {label}: out of memory")
            continue
        total = sum(side.times)
        extra |= {
            f"{label}_mean_ms": statistics.mean(side.times) * 1e3,
            f"{label}_max_ms": max(side.times) * 1e3,
            f"{label}_samples_per_s": args.batch * len(timed) / total,
            f"{label}_tokens_per_s": sum(b.tokens for b in timed) / total,
            f"{label}_tflops": flops / total / 1e12,
            f"{label}_first_loss": side.first_loss,
            f"{label}_last_loss": side.last_loss,
        }
        peak = "n/a"
        if side.peak is not None:
            extra[f"{label}_peak_mib"] = side.peak / 2**20
            peak = f"{side.peak / 2**20:,.0f} MiB"
        print(
            f"  {label}: median {statistics.median(side.times) * 1e3:.3f} ms, mean "
            f"{extra[f'{label}_mean_ms']:.3f}, max {extra[f'{label}_max_ms']:.3f}; "
            f"{extra[f'{label}_samples_per_s']:,.0f} samples/s, "
            f"{extra[f'{label}_tokens_per_s']:,.0f} tokens/s, "
            f"{extra[f'{label}_tflops']:.2f} TFLOP/s; peak {peak}; loss "
            f"{side.first_loss:.4f} -> {side.last_loss:.4f}",
            flush=True,
        )
    if ours is not None and plain is not None:
        ours_s, base_s = statistics.median(ours.times), statistics.median(plain.times)
        row = report.add(Row(name, ours_s, base_s, nbytes, baseline=BASELINE, extra=extra))
        print(
            f"    MBU ours {row.mbu(report.bandwidth, ours_s):.0%}, baseline "
            f"{row.mbu(report.bandwidth, base_s):.0%}",
            flush=True,
        )
        return
    if ours is not None:
        ours_s = statistics.median(ours.times)
        print(f"  measured: {name}: ours {ours_s * 1e3:.3f} ms, baseline OOM", flush=True)
        out_of_memory.append(
            measurement(
                name, ours_s, None, baseline=BASELINE, nbytes=nbytes, bandwidth=report.bandwidth,
                notes="baseline out of memory", extra=extra,
            )
        )  # fmt: skip
        return
    base_ms = statistics.median(plain.times) * 1e3 if plain is not None else None
    print(f"  measured: {name}: ours OOM", flush=True)
    out_of_memory.append(
        Measurement(
            name, None, "ms", baseline=BASELINE, baseline_value=base_ms,
            notes="ours out of memory" + ("" if plain is not None else ", baseline too"),
            extra=extra,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
