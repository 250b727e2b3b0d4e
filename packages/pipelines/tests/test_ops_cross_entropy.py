"""linear_cross_entropy against F.cross_entropy on the full logits (loss and the autograd
gradients of hidden, weight and bias) over reductions, dtypes, chunkings, ignored and bad
targets, label smoothing and empty batches; the sampled and in-batch softmax losses against
hand-written references (masks, log-Q correction, temperature, gradients)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from backends import DEVICE

from recstack.core import kernels
from recstack.pipelines.ops.cross_entropy import (
    LOGITS_BLOCK_BYTES,
    LinearCrossEntropy,
    in_batch_softmax_loss,
    linear_cross_entropy,
    logits_chunk_rows,
    sampled_softmax_loss,
)

# (loss, gradient) tolerances against torch computing in the same dtype.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2)}


@pytest.fixture(autouse=True)
def on_the_device() -> Iterator[None]:
    """The tensors a test makes live on the GPU where there is one (the compiled kernels
    read no CPU tensor), else on the CPU."""
    with torch.device(DEVICE):
        yield


def _inputs(rows, vocab, dim, dtype, bias, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, vocab, (rows,), generator=gen)
    target[2::5] = -100
    return hidden, weight, b, target


def _grads(loss, leaves, upstream):
    leaves = [t for t in leaves if t is not None]
    return torch.autograd.grad(loss, leaves, upstream)


def _compare(hidden, weight, bias, target, *, reduction, eps=0.0, chunk_size=None):
    loss = linear_cross_entropy(
        hidden, weight, target, bias=bias, reduction=reduction,
        label_smoothing=eps, chunk_size=chunk_size,
    )  # fmt: skip
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    ref = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=eps)
    assert loss.dtype == ref.dtype and loss.shape == ref.shape
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    upstream = (torch.rand(ref.shape, generator=gen) + 0.5).to(ref.dtype)
    got = _grads(loss, (hidden, weight, bias), upstream)
    want = _grads(ref, (hidden, weight, bias), upstream)
    tol, grad_tol = TOL[hidden.dtype]
    torch.testing.assert_close(loss.float(), ref.float(), rtol=tol, atol=tol, equal_nan=True)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = max(1.0, w.float().abs().max().item())
        torch.testing.assert_close(g.float(), w.float(), rtol=grad_tol, atol=grad_tol * scale)


CASES = [
    ("mean", 0.0, False),
    ("sum", 0.1, True),
    ("none", 0.0, True),
    ("mean", 0.2, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("reduction", "eps", "bias"), CASES)
def test_matches_full_logits(backend, dtype, reduction, eps, bias):
    # 37 tokens in chunks of 8 (the last one 5 rows), 300 items (not a multiple of 16).
    hidden, weight, b, target = _inputs(37, 300, 16, dtype, bias)
    _compare(hidden, weight, b, target, reduction=reduction, eps=eps, chunk_size=8)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_chunk_and_default_chunk(backend, reduction):
    hidden, weight, b, target = _inputs(11, 64, 8, torch.float32, True, seed=1)
    _compare(hidden, weight, b, target, reduction=reduction)
    _compare(hidden, weight, b, target, reduction=reduction, chunk_size=1000)


@pytest.mark.parametrize("rows", [1, 2])
def test_tiny_batches(backend, rows):
    hidden, weight, b, target = _inputs(rows, 5, 3, torch.float32, True, seed=2)
    target[:] = torch.arange(rows)
    for reduction in ("mean", "sum", "none"):
        _compare(hidden, weight, b, target, reduction=reduction, chunk_size=1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, reduction):
    hidden, weight, b, target = _inputs(0, 20, 4, torch.float32, True)
    loss = linear_cross_entropy(hidden, weight, target, bias=b, reduction=reduction)
    ref = F.cross_entropy(hidden @ weight.T + b, target, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)  # mean: NaN, as torch
    if reduction == "none":
        assert loss.shape == (0,)
        return
    d_hidden, d_weight, d_bias = torch.autograd.grad(loss, (hidden, weight, b))
    assert d_hidden.shape == (0, 4)
    assert torch.equal(d_weight, torch.zeros(20, 4)) and torch.equal(d_bias, torch.zeros(20))


def test_all_ignored(backend):
    hidden, weight, b, target = _inputs(6, 20, 4, torch.float32, True)
    target[:] = -100
    mean = linear_cross_entropy(hidden, weight, target, bias=b)
    assert torch.isnan(mean)  # 0 / 0, as F.cross_entropy
    grads = torch.autograd.grad(mean, (hidden, weight, b))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    total = linear_cross_entropy(hidden, weight, target, bias=b, reduction="sum")
    assert total.item() == 0.0
    none = linear_cross_entropy(hidden, weight, target, reduction="none")
    assert torch.equal(none, torch.zeros(6))


def test_custom_ignore_index_and_leading_dims(backend):
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    hidden = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(40, 8, generator=gen, requires_grad=True)
    target = torch.randint(0, 40, (3, 5), generator=gen)
    target[:, -2:] = 0  # padding id 0
    loss = linear_cross_entropy(
        hidden, weight, target, ignore_index=0, reduction="none", chunk_size=4
    )
    ref = F.cross_entropy((hidden @ weight.T).reshape(15, 40), target.reshape(15), ignore_index=0,
                          reduction="none").reshape(3, 5)  # fmt: skip
    assert loss.shape == (3, 5)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(loss.sum(), (hidden, weight))
    want = torch.autograd.grad(ref.sum(), (hidden, weight))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_bad_target_raises(backend):
    hidden, weight, _, target = _inputs(9, 30, 4, torch.float32, False)
    target[6] = 30
    with pytest.raises(ValueError, match=r"target\[6\] = 30 is outside \[0, 30\)"):
        linear_cross_entropy(hidden, weight, target, chunk_size=4)
    target[6] = -3
    with pytest.raises(ValueError, match=r"target\[6\] = -3"), torch.no_grad():
        linear_cross_entropy(hidden, weight, target, reduction="none")
    loss = linear_cross_entropy(hidden, weight, target, reduction="none", check_target=False)
    assert torch.isnan(loss[6]) and torch.isfinite(loss[:6]).all()


def test_no_grad_and_frozen_weight(backend):
    hidden, weight, b, target = _inputs(13, 50, 8, torch.float32, True, seed=4)
    ref = F.cross_entropy(hidden @ weight.T + b, target)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, target, bias=b, chunk_size=5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    frozen = weight.detach()
    loss = linear_cross_entropy(hidden, frozen, target, chunk_size=5)
    (d_hidden,) = torch.autograd.grad(loss, (hidden,))
    (want,) = torch.autograd.grad(F.cross_entropy(hidden @ frozen.T, target), (hidden,))
    torch.testing.assert_close(d_hidden, want, rtol=1e-5, atol=1e-6)


def test_launches_per_chunk(backend):
    hidden, weight, _, target = _inputs(10, 20, 4, torch.float32, False)
    name = "cross_entropy_rows" if backend == "triton" else "cross_entropy_rows_reference"
    with kernels.count_launches() as launches:
        loss = linear_cross_entropy(hidden, weight, target, chunk_size=4)
        loss.backward()
    assert launches == {name: 3}  # gradients made in the forward: nothing recomputed
    with kernels.count_launches() as launches:
        loss = linear_cross_entropy(hidden, weight, target, chunk_size=4, reduction="none")
        loss.sum().backward()
    assert launches == {name: 6}  # "none" runs the chunks again in the backward


def test_backward_twice_with_retain_graph(backend):
    hidden, weight, b, target = _inputs(7, 12, 4, torch.float32, True)
    loss = linear_cross_entropy(hidden, weight, target, bias=b, reduction="sum")
    loss.backward(retain_graph=True)
    first = weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(weight.grad, 2 * first)


def test_module(backend):
    hidden, weight, b, target = _inputs(9, 30, 4, torch.float32, True)
    module = LinearCrossEntropy(reduction="sum", label_smoothing=0.1, chunk_size=4)
    assert "reduction='sum'" in repr(module)
    got = module(hidden, weight, target, b)
    want = linear_cross_entropy(
        hidden, weight, target, bias=b, reduction="sum", label_smoothing=0.1
    )
    torch.testing.assert_close(got, want)


def test_chunk_rows():
    assert logits_chunk_rows(8192, 1_000_000, torch.bfloat16) == 1024
    assert logits_chunk_rows(8192, 1_000_000, torch.float32) == 512
    assert logits_chunk_rows(100, 1_000_000, torch.float32) == 100
    assert logits_chunk_rows(1100, 1_000_000, torch.bfloat16) == 552  # balanced, 8-aligned
    assert logits_chunk_rows(0, 10, torch.float32) == 1
    assert logits_chunk_rows(50, 10**9, torch.float32, budget_bytes=1) == 1
    rows = logits_chunk_rows(10**6, 1_000_003, torch.bfloat16)
    assert rows * 1_000_016 * 2 <= LOGITS_BLOCK_BYTES


def test_bad_arguments():
    hidden, weight, b, target = _inputs(4, 10, 3, torch.float32, True)
    with pytest.raises(TypeError, match="weight is torch.bfloat16 but hidden is torch.float32"):
        linear_cross_entropy(hidden, weight.bfloat16(), target)
    with pytest.raises(ValueError, match="hidden must be"):
        linear_cross_entropy(hidden[:, :2], weight, target)
    with pytest.raises(ValueError, match="target has shape"):
        linear_cross_entropy(hidden, weight, target[:3])
    with pytest.raises(TypeError, match="target must be an integer"):
        linear_cross_entropy(hidden, weight, target.float())
    with pytest.raises(ValueError, match="bias must be"):
        linear_cross_entropy(hidden, weight, target, bias=b[:5])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, target, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, target, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, target, chunk_size=0)
    with pytest.raises(ValueError, match="V >= 1"):
        linear_cross_entropy(hidden, weight[:0], target)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_against_full_logits(dtype, reduction):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1000, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(50_000, 64, device="cuda", generator=gen) * 0.2).to(dtype)
    weight.requires_grad_()
    bias = torch.zeros(50_000, device="cuda", dtype=dtype, requires_grad=True)
    target = torch.randint(0, 50_000, (1000,), device="cuda", generator=gen)
    target[::9] = -100
    _compare(hidden, weight, bias, target, reduction=reduction, eps=0.1, chunk_size=300)


# ----------------------------------------------------------------------------------------
# Sampled softmax
# ----------------------------------------------------------------------------------------


def _sampled_reference(hidden, pos_emb, neg_emb, pos_ids, neg_ids, pos_logq, neg_logq,
                       temperature, remove_hits):  # fmt: skip
    """Token by token, in float64: -log softmax of the positive over [pos, kept negs]."""
    losses = []
    for t in range(hidden.shape[0]):
        h = hidden[t].double()
        logits = [h @ pos_emb[t].double() / temperature - float(pos_logq[t])]
        for s in range(neg_emb.shape[0]):
            if remove_hits and int(neg_ids[s]) == int(pos_ids[t]):
                continue
            logits.append(h @ neg_emb[s].double() / temperature - float(neg_logq[s]))
        stacked = torch.stack(logits)
        losses.append(torch.logsumexp(stacked, 0) - stacked[0])
    return torch.stack(losses)


def _sampled_inputs(seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    table = torch.randn(30, 6, generator=gen, requires_grad=True)
    hidden = torch.randn(7, 6, generator=gen, requires_grad=True)
    pos_ids = torch.tensor([3, 8, 3, 15, 0, 29, 8])
    neg_ids = torch.tensor([8, 1, 3, 22, 8, 14])  # 8 and 3 are hits for some tokens
    logq = torch.log(torch.rand(30, generator=gen) * 0.1 + 0.01)
    return table, hidden, pos_ids, neg_ids, logq


@pytest.mark.parametrize("remove_hits", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_sampled_softmax_matches_reference(remove_hits, temperature):
    table, hidden, pos_ids, neg_ids, logq = _sampled_inputs()
    loss = sampled_softmax_loss(
        hidden, pos_ids, neg_ids, table, pos_logq=logq[pos_ids], neg_logq=logq[neg_ids],
        remove_accidental_hits=remove_hits, temperature=temperature, reduction="none",
    )  # fmt: skip
    ref = _sampled_reference(hidden, table[pos_ids], table[neg_ids], pos_ids, neg_ids,
                             logq[pos_ids], logq[neg_ids], temperature, remove_hits)  # fmt: skip
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(loss.sum(), (hidden, table))
    want = torch.autograd.grad(ref.sum(), (hidden, table))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-5)


def test_sampled_softmax_correction_and_masks_change_the_loss():
    table, hidden, pos_ids, neg_ids, logq = _sampled_inputs(1)
    plain = sampled_softmax_loss(hidden, pos_ids, neg_ids, table, reduction="none")
    ref = _sampled_reference(hidden, table[pos_ids], table[neg_ids], pos_ids, neg_ids,
                             torch.zeros(7), torch.zeros(6), 1.0, True)  # fmt: skip
    torch.testing.assert_close(plain.double(), ref, rtol=1e-5, atol=1e-5)
    # Subtracting the same log Q from every logit changes nothing.
    same = sampled_softmax_loss(hidden, pos_ids, neg_ids, table, pos_logq=torch.full((7,), -2.0),
                                neg_logq=torch.full((6,), -2.0), reduction="none")  # fmt: skip
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-6)
    # A frequent negative (large Q) weighs less after the correction.
    neg_logq = torch.zeros(6)
    neg_logq[3] = 5.0
    corrected = sampled_softmax_loss(hidden, pos_ids, neg_ids, table, neg_logq=neg_logq,
                                     reduction="none")  # fmt: skip
    assert (corrected <= plain + 1e-6).all() and (corrected < plain).any()
    # The hit rows of token 0 (pos 3: neg 3) are out of its softmax.
    kept = sampled_softmax_loss(hidden, pos_ids, neg_ids, table, remove_accidental_hits=False,
                                reduction="none")  # fmt: skip
    assert kept[0] > plain[0] and kept[3] == plain[3]


def test_sampled_softmax_gathered_rows_and_ignore():
    table, hidden, pos_ids, neg_ids, logq = _sampled_inputs(2)
    pos_ids = pos_ids.clone()
    pos_ids[4] = -100
    by_table = sampled_softmax_loss(hidden, pos_ids, neg_ids, table, neg_logq=logq[neg_ids])
    pos_emb = table[pos_ids.clamp(min=0)]
    by_rows = sampled_softmax_loss(hidden, pos_ids, neg_ids, pos_emb=pos_emb,
                                   neg_emb=table[neg_ids], neg_logq=logq[neg_ids])  # fmt: skip
    torch.testing.assert_close(by_table, by_rows)
    keep = pos_ids != -100
    ref = _sampled_reference(hidden[keep], table[pos_ids[keep]], table[neg_ids], pos_ids[keep],
                             neg_ids, torch.zeros(6), logq[neg_ids], 1.0, True)  # fmt: skip
    torch.testing.assert_close(by_table.double(), ref.mean(), rtol=1e-5, atol=1e-5)
    (d_pos,) = torch.autograd.grad(by_rows, (pos_emb,))
    assert torch.equal(d_pos[4], torch.zeros(6))  # the ignored token's row gets nothing
    total = sampled_softmax_loss(hidden, pos_ids, neg_ids, table, reduction="sum")
    none = sampled_softmax_loss(hidden, pos_ids, neg_ids, table, reduction="none")
    assert none[4].item() == 0.0
    torch.testing.assert_close(total, none.sum())
    # No ids at all: no hits removed, nothing ignored.
    free = sampled_softmax_loss(hidden, None, None, pos_emb=table[:7], neg_emb=table[7:12],
                                remove_accidental_hits=False)  # fmt: skip
    assert free.shape == () and torch.isfinite(free)


def test_sampled_softmax_bf16_and_empty():
    table, hidden, pos_ids, neg_ids, _ = _sampled_inputs(3)
    loss = sampled_softmax_loss(hidden.bfloat16(), pos_ids, neg_ids, table.bfloat16())
    ref = sampled_softmax_loss(hidden, pos_ids, neg_ids, table)
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), ref, rtol=3e-2, atol=3e-2)
    empty = sampled_softmax_loss(hidden[:0], pos_ids[:0], neg_ids, table, reduction="sum")
    assert empty.item() == 0.0


def test_sampled_softmax_errors():
    table, hidden, pos_ids, neg_ids, logq = _sampled_inputs()
    with pytest.raises(ValueError, match=r"neg_ids\[1\] = 30 is outside \[0, 30\)"):
        sampled_softmax_loss(hidden, pos_ids, torch.tensor([0, 30]), table)
    with pytest.raises(ValueError, match="item_weight or pos_emb/neg_emb, not both"):
        sampled_softmax_loss(hidden, pos_ids, neg_ids, table, pos_emb=table[pos_ids])
    with pytest.raises(ValueError, match="both pos_emb and neg_emb"):
        sampled_softmax_loss(hidden, pos_ids, neg_ids, pos_emb=table[pos_ids])
    with pytest.raises(ValueError, match="remove_accidental_hits needs pos_ids"):
        sampled_softmax_loss(hidden, None, None, pos_emb=table[:7], neg_emb=table[:3])
    with pytest.raises(ValueError, match="neg_logq must be"):
        sampled_softmax_loss(hidden, pos_ids, neg_ids, table, neg_logq=logq)
    with pytest.raises(ValueError, match="temperature"):
        sampled_softmax_loss(hidden, pos_ids, neg_ids, table, temperature=0.0)
    with pytest.raises(TypeError, match="pos_emb is torch.bfloat16"):
        sampled_softmax_loss(hidden, pos_ids, neg_ids, pos_emb=table[pos_ids].bfloat16(),
                             neg_emb=table[neg_ids])  # fmt: skip


def _in_batch_reference(hidden, pos_emb, pos_ids, freq, temperature, remove_hits):
    logq = freq.double().log()
    keep = [t for t in range(len(pos_ids)) if int(pos_ids[t]) != -100]
    losses = []
    for t in keep:
        h = hidden[t].double()
        logits = [h @ pos_emb[t].double() / temperature - logq[t]]
        for j in keep:
            if j == t or (remove_hits and int(pos_ids[j]) == int(pos_ids[t])):
                continue
            logits.append(h @ pos_emb[j].double() / temperature - logq[j])
        stacked = torch.stack(logits)
        losses.append(torch.logsumexp(stacked, 0) - stacked[0])
    return torch.stack(losses)


@pytest.mark.parametrize("remove_hits", [True, False])
def test_in_batch_softmax(remove_hits):
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    hidden = torch.randn(6, 4, generator=gen, requires_grad=True)
    pos_emb = torch.randn(6, 4, generator=gen, requires_grad=True)
    pos_ids = torch.tensor([4, 9, 4, -100, 2, 7])
    counts = torch.tensor([50.0, 5.0, 50.0, 1.0, 20.0, 3.0])
    loss = in_batch_softmax_loss(hidden, pos_emb, pos_ids, pos_frequency=counts,
                                 remove_accidental_hits=remove_hits, temperature=0.5,
                                 reduction="sum")  # fmt: skip
    ref = _in_batch_reference(hidden, pos_emb, pos_ids, counts, 0.5, remove_hits).sum()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(loss, (hidden, pos_emb))
    want = torch.autograd.grad(ref, (hidden, pos_emb))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-5)
    # Counts or probabilities: the normalisation cancels.
    probs = in_batch_softmax_loss(hidden, pos_emb, pos_ids, pos_frequency=counts / counts.sum(),
                                  remove_accidental_hits=remove_hits, temperature=0.5,
                                  reduction="sum")  # fmt: skip
    torch.testing.assert_close(probs, loss, rtol=1e-5, atol=1e-5)


def test_in_batch_without_frequency_is_plain_in_batch_softmax():
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    hidden, pos_emb = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    pos_ids = torch.arange(5)
    loss = in_batch_softmax_loss(hidden, pos_emb, pos_ids)
    ref = F.cross_entropy(hidden @ pos_emb.T, torch.arange(5))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pos_frequency must be"):
        in_batch_softmax_loss(hidden, pos_emb, pos_ids, pos_frequency=torch.ones(4))


def test_docstring_examples():
    import doctest

    from recstack.pipelines.ops import cross_entropy as module

    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0
