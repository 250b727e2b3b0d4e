"""jagged_attention and JaggedSelfAttention through the public API: the Triton path (the
interpreter on the CPU) against the torch path, forward and gradients, and bad inputs."""

from __future__ import annotations

import zlib

import pytest
import torch

from recstack.core import JaggedTensor, kernels
from recstack.pipelines.ops.jagged_attention import JaggedSelfAttention, jagged_attention

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def offsets_of(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return offsets.to(device)


@pytest.fixture
def triton_device(device: torch.device) -> torch.device:
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("needs Triton on a GPU or TRITON_INTERPRET=1")
    return device


def forward_backward(backend, q, k, v, offsets, dout, **options):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with kernels.use_backend(backend):
        out = jagged_attention(*leaves, offsets, **options)
    out.backward(dout)
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["softmax", "pointwise"])
def test_triton_path_matches_torch_path(triton_device, kind, dtype):
    gen = torch.Generator().manual_seed(seed(kind, dtype))
    lengths = [9, 0, 1, 70 // 3]
    total = sum(lengths)
    offsets = offsets_of(lengths, triton_device)
    q, k, v, dout = (
        torch.randn(total, 2, 16, generator=gen).to(dtype).to(triton_device) for _ in range(4)
    )
    targets = torch.tensor([2, 0, 1, 5], device=triton_device)
    for causal, num_targets in ((True, targets), (False, None)):
        options = dict(kind=kind, causal=causal, num_targets=num_targets)
        ours = forward_backward("triton", q, k, v, offsets, dout, **options)
        refs = forward_backward("torch", q, k, v, offsets, dout, **options)
        tol = TOLERANCE[dtype]
        for name, a, b in zip(("out", "dq", "dk", "dv"), ours, refs, strict=True):
            assert a.dtype == dtype and a.shape == (total, 2, 16)
            torch.testing.assert_close(
                a.float(), b.float(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}"
            )


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch_gives_empty_output_and_grads(triton_device, backend):
    for lengths in ([], [0, 0, 0]):
        offsets = offsets_of(lengths, triton_device)
        q, k, v = (torch.zeros(0, 2, 16, device=triton_device, requires_grad=True) for _ in "qkv")
        with kernels.use_backend(backend):
            out = jagged_attention(q, k, v, offsets, kind="pointwise")
        assert out.shape == (0, 2, 16)
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.shape == (0, 2, 16)


def test_sequences_do_not_interact(triton_device):
    # A sequence attends within itself: computed alone it gives the same rows.
    gen = torch.Generator().manual_seed(seed("alone"))
    lengths = [6, 1, 11]
    offsets = offsets_of(lengths, triton_device)
    q, k, v = (torch.randn(18, 1, 16, generator=gen).to(triton_device) for _ in "qkv")
    with kernels.use_backend("triton"):
        batch = jagged_attention(q, k, v, offsets, kind="pointwise")
        alone = jagged_attention(
            q[7:], k[7:], v[7:], offsets_of([11], triton_device), kind="pointwise"
        )
    torch.testing.assert_close(batch[7:], alone)


def test_max_len_is_the_pointwise_divisor():
    gen = torch.Generator().manual_seed(seed("max_len"))
    offsets = offsets_of([3, 5])
    q, k, v = (torch.randn(8, 2, 16, generator=gen) for _ in "qkv")
    by_length = jagged_attention(q, k, v, offsets, kind="pointwise")
    by_max = jagged_attention(q, k, v, offsets, kind="pointwise", max_len=10)
    torch.testing.assert_close(by_max[:3], by_length[:3] * 3 / 10)
    torch.testing.assert_close(by_max[3:], by_length[3:] * 5 / 10)
    # For softmax max_len only bounds the lengths.
    torch.testing.assert_close(
        jagged_attention(q, k, v, offsets, max_len=10), jagged_attention(q, k, v, offsets)
    )


# ---------------------------------------------------------------------------- bad inputs


def good_inputs():
    q = torch.randn(5, 2, 16)
    return q, q.clone(), q.clone(), offsets_of([2, 3])


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: {**a, "offsets": a["offsets"].int()}, TypeError, "offsets must be int64"),
        (
            lambda a: {**a, "offsets": torch.tensor([0, 4, 3, 5])},
            ValueError,
            "offsets must be non-decreasing",
        ),
        (lambda a: {**a, "offsets": torch.tensor([0, 2, 4])}, ValueError, r"offsets\[-1\]=4"),
        (lambda a: {**a, "offsets": torch.tensor([1, 2, 5])}, ValueError, r"offsets\[0\]"),
        (lambda a: {**a, "offsets": torch.zeros(0, dtype=torch.int64)}, ValueError, "offsets"),
        (lambda a: {**a, "num_targets": torch.tensor([3, 0])}, ValueError, "num_targets"),
        (lambda a: {**a, "num_targets": torch.tensor([-1, 0])}, ValueError, "num_targets"),
        (lambda a: {**a, "num_targets": torch.tensor([1])}, ValueError, "num_targets must be"),
        (lambda a: {**a, "num_targets": torch.tensor([1, 0]).int()}, TypeError, "num_targets"),
        (lambda a: {**a, "k": torch.randn(5, 2, 8)}, ValueError, "k has shape"),
        (lambda a: {**a, "v": torch.randn(4, 2, 16)}, ValueError, "v has shape"),
        (lambda a: {**a, "q": torch.randn(5, 32)}, ValueError, "q must be 3-D"),
        (lambda a: {**a, "v": a["v"].bfloat16()}, TypeError, "v is torch.bfloat16"),
        (lambda a: {**a, "q": a["q"].long()}, TypeError, "q must be float32"),
        (lambda a: {**a, "kind": "relu"}, ValueError, "kind must be one of"),
        (lambda a: {**a, "max_len": 2}, ValueError, "max_len=2"),
        (lambda a: {**a, "scale": float("nan")}, ValueError, "scale"),
    ],
)
def test_bad_inputs_name_the_argument(change, error, match):
    q, k, v, offsets = good_inputs()
    args = change({"q": q, "k": k, "v": v, "offsets": offsets})
    q, k, v, offsets = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("offsets")
    with pytest.raises(error, match=match):
        jagged_attention(q, k, v, offsets, **args)


def test_unchecked_inputs_skip_the_value_checks():
    q, k, v, offsets = good_inputs()
    out = jagged_attention(q, k, v, offsets, max_len=3, check_inputs=False)
    torch.testing.assert_close(out, jagged_attention(q, k, v, offsets))


# ------------------------------------------------------------------------------- module


@pytest.mark.parametrize("kind", ["softmax", "pointwise"])
def test_module_triton_matches_torch_and_trains(triton_device, kind):
    torch.manual_seed(seed("module", kind))
    attn = JaggedSelfAttention(32, heads=2, kind=kind).to(triton_device)
    lengths = [5, 0, 1, 13]
    offsets = offsets_of(lengths, triton_device)
    x = torch.randn(sum(lengths), 32, device=triton_device)
    targets = torch.tensor([1, 0, 0, 4], device=triton_device)
    grads = {}
    outs = {}
    for backend in ("triton", "torch"):
        attn.zero_grad()
        with kernels.use_backend(backend):
            outs[backend] = attn(x, offsets, num_targets=targets)
        outs[backend].square().sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in attn.named_parameters()}
    assert outs["triton"].shape == (19, 32)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-4, atol=1e-4)
    for name, g in grads["triton"].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads["torch"][name], rtol=1e-4, atol=1e-4, msg=name)


def test_module_takes_a_jagged_tensor():
    attn = JaggedSelfAttention(16, heads=1, kind="softmax", causal=False)
    jt = JaggedTensor.from_lengths(torch.randn(6, 16), torch.tensor([2, 4]))
    out = attn(jt)
    assert isinstance(out, JaggedTensor) and out.values.shape == (6, 16)
    assert torch.equal(out.offsets, jt.offsets)
    torch.testing.assert_close(out.values, attn(jt.values, jt.offsets))


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        JaggedSelfAttention(16, 2, kind="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a multiple of heads"):
        JaggedSelfAttention(15, 2)
    attn = JaggedSelfAttention(16, 2, head_dim=16)
    with pytest.raises(ValueError, match=r"x must be \[N, 16\]"):
        attn(torch.randn(4, 8), offsets_of([4]))
    with pytest.raises(ValueError, match="offsets is required"):
        attn(torch.randn(4, 16))


@pytest.mark.parametrize("kind", ["softmax", "pointwise"])
def test_module_under_bf16_autocast(kind):
    torch.manual_seed(seed("autocast", kind))
    attn = JaggedSelfAttention(16, heads=2, kind=kind)
    x, offsets = torch.randn(9, 16), offsets_of([4, 5])
    expected = attn(x, offsets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, offsets)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
