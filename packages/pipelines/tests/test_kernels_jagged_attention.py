"""Jagged attention kernels against the torch reference, and the reference against oracles.

The Triton kernels run through the interpreter on the CPU (``TRITON_INTERPRET=1``) or on
a GPU. Sizes stay tiny (at most ~60 tokens, head_dim 16); 16-token tiles make sequences
span several tiles, with lengths that are not multiples of the tile.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from recstack.core import kernels
from recstack.pipelines.kernels.jagged_attention import (
    attention_blocks,
    check_jagged_attention_inputs,
    jagged_attention_backward_triton,
    jagged_attention_forward_triton,
    jagged_attention_mask,
    jagged_attention_reference,
    jagged_block_schedule,
)

KINDS = ("softmax", "pointwise")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def offsets_of(lengths: list[int]) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return offsets


def make_qkv(total: int, heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    return [torch.randn(total, heads, head_dim, generator=gen).to(dtype) for _ in range(3)]


@pytest.fixture
def triton_device(device: torch.device) -> torch.device:
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("needs Triton on a GPU or TRITON_INTERPRET=1")
    return device


def loop_oracle(q, k, v, offsets, *, kind, causal, num_targets=None, scale=None, max_len=None):
    """Float64, one sequence and one (query, key) pair at a time, the mask from its words."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    scale = q.shape[2] ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    bounds = offsets.tolist()
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        length = hi - lo
        hist = length - (int(num_targets[b]) if num_targets is not None else 0)
        for i in range(length):
            if i >= hist:  # a target: the whole history and itself
                keys = [*range(hist), i]
            else:
                keys = [j for j in range(hist) if not causal or j <= i]
            s = torch.stack([(q[lo + i] * k[lo + j]).sum(-1) for j in keys]) * scale  # [keys, H]
            if kind == "softmax":
                w = s.softmax(dim=0)
            else:
                w = torch.nn.functional.silu(s) / (max_len if max_len else length)
            out[lo + i] = (w[:, :, None] * v[lo + torch.tensor(keys)]).sum(0)
    return out


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_targets", [False, True])
def test_reference_matches_loop_oracle(kind, causal, with_targets):
    gen = torch.Generator().manual_seed(seed(kind, causal, with_targets))
    lengths = [4, 0, 1, 7]
    offsets = offsets_of(lengths)
    q, k, v = make_qkv(sum(lengths), 2, 8, torch.float64, gen)
    targets = torch.tensor([2, 0, 1, 7]) if with_targets else None
    for max_len in (None, 9):
        args = dict(kind=kind, causal=causal, num_targets=targets, max_len=max_len)
        ref = jagged_attention_reference(q, k, v, offsets, **args)
        torch.testing.assert_close(ref, loop_oracle(q, k, v, offsets, **args))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_targets", [False, True])
def test_reference_softmax_matches_sdpa(causal, with_targets):
    gen = torch.Generator().manual_seed(seed("sdpa", causal, with_targets))
    lengths = [5, 1, 0, 9]
    offsets = offsets_of(lengths)
    q, k, v = make_qkv(sum(lengths), 2, 16, torch.float32, gen)
    targets = torch.tensor([2, 1, 0, 3]) if with_targets else None
    ref = jagged_attention_reference(q, k, v, offsets, causal=causal, num_targets=targets)
    lens = offsets[1:] - offsets[:-1]
    mask = jagged_attention_mask(lens, 9, causal=causal, num_targets=targets)

    def pad(t):
        out = torch.zeros(4, 9, 2, 16)
        for b in range(4):
            out[b, : lengths[b]] = t[offsets[b] : offsets[b + 1]]
        return out.transpose(1, 2)

    dense = torch.nn.functional.scaled_dot_product_attention(
        pad(q), pad(k), pad(v), attn_mask=mask[:, None]
    ).transpose(1, 2)
    expected = torch.cat([dense[b, : lengths[b]] for b in range(4)])
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)


def test_target_mask_picture():
    # 4 history items then 2 targets, causal: the picture of the docs page.
    mask = jagged_attention_mask(torch.tensor([6]), 6, causal=True, num_targets=torch.tensor([2]))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0], expected)
    bidirectional = jagged_attention_mask(
        torch.tensor([4]), 4, causal=False, num_targets=torch.tensor([1])
    )
    assert bidirectional[0].int().tolist() == [
        [1, 1, 1, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]


# ------------------------------------------------------------------------------- schedule


def test_block_schedule_covers_every_tile_heaviest_first():
    lengths = [40, 0, 3, 17, 16]
    offsets = offsets_of(lengths)
    total = sum(lengths)
    for causal in (True, False):
        for by_key in (False, True):
            sched = jagged_block_schedule(offsets, total, 16, causal=causal, by_key=by_key)
            assert sched.shape == (total // 16 + len(lengths), 2)
            real = sched[sched[:, 0] < len(lengths)].tolist()
            expected = {(b, t) for b, n in enumerate(lengths) for t in range(-(-n // 16))}
            assert sorted(map(tuple, real)) == sorted(expected)
            # Spare slots (sequence == B) come after every real tile.
            assert (sched[len(real) :, 0] == len(lengths)).all()
            tiles = [-(-n // 16) for n in lengths]
            if not causal:
                costs = [tiles[b] for b, _ in real]
            elif by_key:
                costs = [tiles[b] - t for b, t in real]
            else:
                costs = [t + 1 for _, t in real]
            assert costs == sorted(costs, reverse=True)


def test_attention_blocks_fit_tl_dot():
    for head_dim in (1, 12, 16, 64, 100, 128, 256):
        for backward in (False, True):
            for element_size in (2, 4):
                bm, bn, warps = attention_blocks(head_dim, backward, element_size)
                assert bm >= 16 and bn >= 16 and warps in (4, 8)
                assert bm & (bm - 1) == 0 and bn & (bn - 1) == 0


# -------------------------------------------------------------------------------- kernels


def run_both(q, k, v, offsets, dout, *, kind, causal, targets, max_len=None, blocks=(16, 16)):
    """Kernel forward + backward, and the reference's through autograd."""
    scale = check_jagged_attention_inputs(
        q, k, v, offsets, kind=kind, num_targets=targets, max_len=max_len
    )
    opts = dict(kind=kind, causal=causal, num_targets=targets, scale=scale, max_len=max_len)
    bm, bn = blocks
    out, lse = jagged_attention_forward_triton(q, k, v, offsets, **opts, block_m=bm, block_n=bn)
    grads = jagged_attention_backward_triton(
        dout, q, k, v, out, lse, offsets, **opts, block_m=bm, block_n=bn
    )
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = jagged_attention_reference(*leaves, offsets, **opts)
    ref.backward(dout)
    return (out, *grads), (ref.detach(), *(t.grad for t in leaves))


def assert_all_close(ours, refs, dtype):
    tol = TOLERANCE[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, refs, strict=True):
        assert a.dtype == dtype, name
        torch.testing.assert_close(
            a.float(), b.float(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_targets", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_kernels_match_reference(triton_device, kind, causal, with_targets, dtype):
    gen = torch.Generator().manual_seed(seed(kind, causal, with_targets, dtype))
    lengths = [0, 1, 21, 5, 33]  # empty, length 1, not multiples of the 16-token tile
    offsets = offsets_of(lengths).to(triton_device)
    q, k, v = (t.to(triton_device) for t in make_qkv(sum(lengths), 2, 16, dtype, gen))
    dout = torch.randn(q.shape, generator=gen).to(dtype).to(triton_device)
    targets = torch.tensor([0, 1, 4, 0, 18], device=triton_device) if with_targets else None
    ours, refs = run_both(q, k, v, offsets, dout, kind=kind, causal=causal, targets=targets)
    assert_all_close(ours, refs, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_one_head_padded_head_dim_and_max_len(triton_device, kind):
    # head_dim 12 is padded to a 16-wide tile inside the kernels; max_len is the pointwise n.
    gen = torch.Generator().manual_seed(seed("hd12", kind))
    lengths = [17, 2, 0, 9]
    offsets = offsets_of(lengths).to(triton_device)
    q, k, v = (t.to(triton_device) for t in make_qkv(sum(lengths), 1, 12, torch.float32, gen))
    dout = torch.randn(q.shape, generator=gen).to(triton_device)
    targets = torch.tensor([3, 2, 0, 0], device=triton_device)
    ours, refs = run_both(
        q, k, v, offsets, dout, kind=kind, causal=True, targets=targets, max_len=24
    )
    assert_all_close(ours, refs, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_default_blocks_and_strided_inputs(triton_device, kind):
    # q, k, v as views of one fused projection (token stride 3 * heads * head_dim).
    gen = torch.Generator().manual_seed(seed("strided", kind))
    lengths = [30, 1, 11]
    total = sum(lengths)
    offsets = offsets_of(lengths).to(triton_device)
    fused = torch.randn(total, 3, 2, 16, generator=gen).to(triton_device)
    q, k, v = fused.unbind(1)
    assert not q.is_contiguous()
    dout = torch.randn(total, 2, 16, generator=gen).to(triton_device)
    ours, refs = run_both(
        q, k, v, offsets, dout, kind=kind, causal=True, targets=None, blocks=(None, None)
    )
    assert_all_close(ours, refs, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_only_targets_and_length_one(triton_device, kind):
    # Every position a target: each attends to itself only (softmax output == v).
    gen = torch.Generator().manual_seed(seed("all-targets", kind))
    lengths = [1, 1, 5]
    offsets = offsets_of(lengths).to(triton_device)
    q, k, v = (t.to(triton_device) for t in make_qkv(7, 2, 16, torch.float32, gen))
    targets = torch.tensor([1, 0, 5], device=triton_device)
    dout = torch.randn(q.shape, generator=gen).to(triton_device)
    ours, refs = run_both(q, k, v, offsets, dout, kind=kind, causal=False, targets=targets)
    assert_all_close(ours, refs, torch.float32)
    if kind == "softmax":
        torch.testing.assert_close(ours[0], v)


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_empty_batch(triton_device, kind):
    for lengths in ([], [0, 0]):
        offsets = offsets_of(lengths).to(triton_device)
        q = torch.zeros(0, 2, 16, device=triton_device)
        out, lse = jagged_attention_forward_triton(q, q, q, offsets, kind=kind, scale=0.25)
        assert out.shape == (0, 2, 16)
        grads = jagged_attention_backward_triton(
            out, q, q, q, out, lse, offsets, kind=kind, scale=0.25
        )
        assert all(g.shape == (0, 2, 16) for g in grads)


def test_kernels_record_launches(triton_device):
    offsets = offsets_of([3, 4]).to(triton_device)
    q = torch.randn(7, 1, 16, device=triton_device)
    with kernels.count_launches() as launches:
        out, lse = jagged_attention_forward_triton(q, q, q, offsets, scale=0.25)
        jagged_attention_backward_triton(out, q, q, q, out, lse, offsets, scale=0.25)
    assert launches == {
        "jagged_attention_fwd": 1,
        "jagged_attention_dq": 1,
        "jagged_attention_dkdv": 1,
    }
