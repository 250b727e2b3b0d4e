"""The fused ops past 2**31 elements: a batch whose ``B x L x D`` (or tokens x vocabulary)
exceeds 2**31 gives the same result as the same batch split in two, each half below it.
That is what int64 offsets in the kernels are for; an int32 product would wrap and read or
write the wrong rows. GPU only (the batches take several GiB)."""

from __future__ import annotations

import pytest
import torch

from recstack.pipelines.ops import jagged_attention, linear_cross_entropy, target_attention

pytestmark = pytest.mark.gpu

BIG = 2**31


def _free_gib() -> float:
    if not torch.cuda.is_available():
        return 0.0
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def needs_gib(gib: float) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        _free_gib() < gib, reason=f"needs a CUDA device with {gib:g} GiB free"
    )


def close(a: torch.Tensor, b: torch.Tensor, tol: float, name: str) -> None:
    scale = max(float(b.abs().max()), 1.0) if b.numel() else 1.0
    err = float((a.float() - b.float()).abs().max()) if b.numel() else 0.0
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} x {scale:.3g}"


@needs_gib(40)
def test_target_attention_past_2_31_gathered_elements():
    # 2**26 positions x dim 64 = 2**32 gathered elements, from a small table.
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    batch, dim, hidden = 4, 64, (32, 16)
    per_row = 2**24
    table = torch.randn(1 << 20, dim, device=dev, generator=gen) * 0.1
    row_ids = torch.randint(0, table.shape[0], (batch * per_row,), device=dev, generator=gen)
    offsets = torch.arange(batch + 1, device=dev, dtype=torch.int64) * per_row
    assert row_ids.numel() * dim > BIG
    query = torch.randn(batch, dim, device=dev, generator=gen) * 0.1
    sizes = [4 * dim, *hidden, 1]
    layers = [
        (torch.randn(o, i, device=dev, generator=gen) / i**0.5, torch.zeros(o, device=dev))
        for i, o in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    whole = target_attention(query, offsets, layers, table=table, row_ids=row_ids, softmax=True)
    half = batch // 2
    cut = int(offsets[half])
    parts = [
        target_attention(
            query[:half], offsets[: half + 1], layers, table=table, row_ids=row_ids[:cut],
            softmax=True,
        ),
        target_attention(
            query[half:], offsets[half:] - cut, layers, table=table, row_ids=row_ids[cut:],
            softmax=True,
        ),
    ]  # fmt: skip
    close(whole, torch.cat(parts), 1e-4, "out")


@needs_gib(40)
def test_jagged_attention_past_2_31_elements():
    # 2**24 tokens x 2 heads x 64 = 2**31 elements in q, k and v each (bf16).
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    heads, head_dim, length = 2, 64, 512
    tokens = 2**24 + length  # one sequence more: past 2**31 elements, not at it
    offsets = torch.arange(0, tokens + 1, length, device=dev, dtype=torch.int64)
    q, k, v = (
        torch.randn(tokens, heads, head_dim, device=dev, generator=gen, dtype=torch.bfloat16)
        for _ in range(3)
    )
    assert q.numel() > BIG
    whole = jagged_attention(q, k, v, offsets, kind="softmax", causal=True)
    mid = (offsets.numel() - 1) // 2
    cut = int(offsets[mid])
    first = jagged_attention(q[:cut], k[:cut], v[:cut], offsets[: mid + 1], causal=True)
    second = jagged_attention(q[cut:], k[cut:], v[cut:], offsets[mid:] - cut, causal=True)
    close(whole, torch.cat([first, second]), 1e-2, "out")


@needs_gib(30)
def test_linear_cross_entropy_past_2_31_logits():
    # One chunk of 2,304 tokens x 1M items = 2.4e9 logits in one block.
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(2)
    tokens, vocab, width = 2304, 1 << 20, 64
    assert tokens * vocab > BIG
    hidden = torch.randn(tokens, width, device=dev, generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(vocab, width, device=dev, generator=gen, dtype=torch.bfloat16) * 0.05
    target = torch.randint(0, vocab, (tokens,), device=dev, generator=gen)
    h = hidden.clone().requires_grad_()
    whole = linear_cross_entropy(h, weight, target, reduction="sum", chunk_size=tokens)
    whole.backward()
    half = tokens // 2
    losses, grads = [], []
    for rows in (slice(0, half), slice(half, tokens)):
        part = hidden[rows].clone().requires_grad_()
        loss = linear_cross_entropy(part, weight, target[rows], reduction="sum")
        loss.backward()
        losses.append(loss.float())
        grads.append(part.grad)
    close(whole.float().reshape(1), sum(losses).reshape(1), 1e-3, "loss")
    close(h.grad, torch.cat(grads), 2e-2, "hidden grad")
