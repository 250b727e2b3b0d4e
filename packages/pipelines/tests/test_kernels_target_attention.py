"""Fused target attention kernels vs the torch reference: forward and every gradient, on
jagged rows (values) and gathered table rows, one and two hidden layers, softmax on and off;
on spans (starts + lengths), the padded ``[B, L, D]`` layout read in place; and on rows read
through a PagedTensor's page table, with negative row ids reading zero rows."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import pytest
import torch
from backends import DEVICE, RUNNABLE

from recstack.core import PagedTensor, kernels
from recstack.pipelines.kernels.target_attention import (
    FUSED_ACTIVATIONS,
    MAX_FUSED_WIDTH,
    TargetAttentionSaved,
    gather_table_rows,
    padded_target_attention_reference,
    target_attention_backward,
    target_attention_forward,
    target_attention_reference,
)

needs_kernels = pytest.mark.skipif(
    not RUNNABLE, reason="needs a GPU or TRITON_INTERPRET=1 to run the Triton kernels"
)
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
# Ragged rows: empty, length 1, longer than a block and not a multiple of it.
LENGTHS = [0, 1, 17, 40, 3]


@pytest.fixture(autouse=True)
def torch_kernels() -> Iterator[None]:
    """Replaces the package's fixture (which forces the torch reference under the
    interpreter): these tests pick the backend themselves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_case(
    lengths: list[int],
    dim: int,
    hidden: tuple[int, ...],
    dtype: torch.dtype,
    *,
    table_rows: int = 0,
    seed: object = 0,
) -> dict:
    """Random query, rows, offsets and MLP layers (``table_rows``: gather mode with repeats)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(seed).encode()))
    batch = len(lengths)
    offsets = torch.zeros(batch + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    n = int(offsets[-1])
    widths = [4 * dim, *hidden, 1]
    layers = [
        (
            (torch.randn(o, i, generator=gen) / i**0.5).to(DEVICE),
            (0.1 * torch.randn(o, generator=gen)).to(DEVICE),
        )
        for i, o in zip(widths[:-1], widths[1:], strict=True)
    ]
    case = {
        "query": torch.randn(batch, dim, generator=gen).to(dtype).to(DEVICE),
        "offsets": offsets.to(DEVICE),
        "layers": layers,
    }
    if table_rows:
        case["table"] = torch.randn(table_rows, dim, generator=gen).to(dtype).to(DEVICE)
        # A small table, so ids repeat within and across rows.
        case["row_ids"] = torch.randint(0, table_rows, (n,), generator=gen).to(DEVICE)
    else:
        case["values"] = torch.randn(n, dim, generator=gen).to(dtype).to(DEVICE)
    return case


def reference_grads(case: dict, grad_out: torch.Tensor, **options) -> tuple[torch.Tensor, list]:
    """Output and gradients (query, rows, layers) by autograd through the reference; the
    rows' gradient is per gathered position, as the kernel returns it."""
    query = case["query"].detach().clone().requires_grad_()
    if "table" in case:
        rows = gather_table_rows(case["table"], case["row_ids"]).detach().requires_grad_()
    else:
        rows = case["values"].detach().clone().requires_grad_()
    layers = [(w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_())
              for w, b in case["layers"]]  # fmt: skip
    flat = [t for pair in layers for t in pair]
    with kernels.use_backend("torch"):
        out = target_attention_reference(query, case["offsets"], layers, values=rows, **options)
    grads = torch.autograd.grad(out, [query, rows, *flat], grad_out, allow_unused=True)
    return out.detach(), [g if g is not None else torch.zeros_like(t)
                          for g, t in zip(grads, [query, rows, *flat], strict=True)]  # fmt: skip


def run_kernels(case: dict, grad_out: torch.Tensor, **options) -> tuple[torch.Tensor, list]:
    sources = {k: case[k] for k in ("values", "table", "row_ids") if k in case}
    with kernels.use_backend("triton"):
        out, saved = target_attention_forward(
            case["query"], case["offsets"], case["layers"], **sources, **options
        )
        grads = target_attention_backward(
            grad_out, case["query"], case["offsets"], case["layers"], saved, **sources,
            **options,
        )  # fmt: skip
    return out, [grads.query, grads.rows, *(t for pair in grads.layers for t in pair)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: {actual.shape} vs {expected.shape}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(float(e.abs().max()) if e.numel() else 0.0, 1.0)
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} x {scale:.3g}"


GRAD_NAMES = ["query", "rows", "w1", "b1", "w2", "b2", "w3", "b3"]


def check_case(case: dict, tol: float, **options) -> None:
    gen = torch.Generator().manual_seed(7)
    grad_out = torch.randn(case["query"].shape, generator=gen).to(case["query"].dtype)
    grad_out = grad_out.to(DEVICE)
    ref_out, ref_grads = reference_grads(case, grad_out, **options)
    out, grads = run_kernels(case, grad_out, **options)
    assert out.dtype == case["query"].dtype
    assert_close(out, ref_out, tol, "out")
    names = GRAD_NAMES if len(grads) == 8 else [*GRAD_NAMES[:4], "w3", "b3"]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        assert_close(g, r, tol, f"d_{name}")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["values", "table"])
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
@pytest.mark.parametrize("hidden", [(12,), (20, 12)], ids=["1layer", "2layers"])
def test_forward_and_gradients_match_the_reference(hidden, softmax, mode, dtype):
    case = make_case(
        LENGTHS, 16, hidden, dtype, table_rows=7 if mode == "table" else 0,
        seed=(hidden, softmax, mode, str(dtype)),
    )  # fmt: skip
    check_case(case, TOL[dtype], softmax=softmax)


@needs_kernels
@pytest.mark.parametrize("dim", [16, 24, 32])
def test_widths_including_a_non_power_of_two(dim):
    case = make_case([5, 0, 33], dim, (40, 24), torch.float32, table_rows=11, seed=dim)
    check_case(case, TOL[torch.float32], softmax=True)


@needs_kernels
@pytest.mark.parametrize("activation", sorted(FUSED_ACTIVATIONS))
def test_every_fused_activation(activation):
    case = make_case([3, 18], 16, (16, 16), torch.float32, seed=activation)
    check_case(case, TOL[torch.float32], activation=activation, softmax=activation == "tanh")


@needs_kernels
@pytest.mark.parametrize("block_l", [16, 64])
@pytest.mark.parametrize("programs", [1, 2, 5])
def test_tiles_and_program_counts_agree(block_l, programs):
    case = make_case([9, 70, 2, 0, 31], 16, (24,), torch.float32, seed="tiles")
    grad_out = torch.randn(case["query"].shape).to(DEVICE)
    ref_out, ref_grads = reference_grads(case, grad_out, softmax=True)
    with kernels.use_backend("triton"):
        out, saved = target_attention_forward(
            case["query"], case["offsets"], case["layers"], values=case["values"],
            softmax=True, block_l=block_l,
        )  # fmt: skip
        grads = target_attention_backward(
            grad_out, case["query"], case["offsets"], case["layers"], saved,
            values=case["values"], softmax=True, block_l=block_l, programs=programs,
        )  # fmt: skip
    assert_close(out, ref_out, 1e-4, "out")
    flat = [grads.query, grads.rows, *(t for pair in grads.layers for t in pair)]
    for name, g, r in zip(["query", "rows", "w1", "b1", "w3", "b3"], flat, ref_grads, strict=True):
        assert_close(g, r, 1e-4, f"d_{name}")


@needs_kernels
def test_backward_is_deterministic():
    case = make_case([12, 40, 7], 16, (20, 12), torch.float32, table_rows=5, seed="det")
    grad_out = torch.randn(case["query"].shape).to(DEVICE)
    _, first = run_kernels(case, grad_out, softmax=True)
    _, second = run_kernels(case, grad_out, softmax=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@needs_kernels
def test_float32_row_gradients_on_request():
    case = make_case([4, 9], 16, (16,), torch.bfloat16, table_rows=3, seed="f32rows")
    grad_out = torch.randn(case["query"].shape).to(torch.bfloat16).to(DEVICE)
    with kernels.use_backend("triton"):
        _, saved = target_attention_forward(
            case["query"], case["offsets"], case["layers"], table=case["table"],
            row_ids=case["row_ids"],
        )  # fmt: skip
        grads = target_attention_backward(
            grad_out, case["query"], case["offsets"], case["layers"], saved,
            table=case["table"], row_ids=case["row_ids"], rows_dtype=torch.float32,
        )  # fmt: skip
    assert grads.rows.dtype == torch.float32 and grads.rows.shape == (13, 16)
    _, ref = reference_grads(case, grad_out)
    assert_close(grads.rows, ref[1], TOL[torch.bfloat16], "d_rows")


@needs_kernels
@pytest.mark.parametrize("lengths", [[], [0, 0, 0]], ids=["empty-batch", "no-behaviours"])
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
def test_empty_batch_and_rows_without_behaviours(lengths, softmax):
    case = make_case(lengths, 16, (16, 16), torch.float32, seed=(len(lengths), softmax))
    grad_out = torch.randn(case["query"].shape).to(DEVICE)
    out, grads = run_kernels(case, grad_out, softmax=softmax)
    assert out.shape == (len(lengths), 16)
    assert torch.equal(out, torch.zeros_like(out))
    _, ref_grads = reference_grads(case, grad_out, softmax=softmax)
    for name, g, ref in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert g.shape == ref.shape, name
        assert torch.equal(g, torch.zeros_like(g)), name


@needs_kernels
def test_strided_query_and_values():
    case = make_case([6, 20], 16, (16,), torch.float32, seed="strided")
    wide_q = torch.randn(2, 40).to(DEVICE)
    wide_q[:, 3:19] = case["query"]
    wide_v = torch.randn(26, 48).to(DEVICE)
    wide_v[:, 5:21] = case["values"]
    with kernels.use_backend("triton"):
        out, _ = target_attention_forward(
            wide_q[:, 3:19], case["offsets"], case["layers"], values=wide_v[:, 5:21]
        )
    ref = target_attention_reference(
        case["query"], case["offsets"], case["layers"], values=case["values"]
    )
    assert_close(out, ref, 1e-4, "out")


# ------------------------------------------------------------------------------ bad input


def linears(*shapes: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero ``(weight, bias)`` pairs of the given shapes, alternating weight and bias."""
    tensors = [torch.zeros(shape) for shape in shapes]
    return list(zip(tensors[0::2], tensors[1::2], strict=True))


def _bad(case: dict, **changes) -> dict:
    merged = {**case, **changes}
    return {k: v for k, v in merged.items() if v is not None}


def _forward(args: dict, **options):
    args = dict(args)
    query, offsets, layers = args.pop("query"), args.pop("offsets"), args.pop("layers")
    with kernels.use_backend("torch"):
        return target_attention_forward(query, offsets, layers, **args, **options)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"query": torch.zeros(3)}, ValueError, "query must be 2-D"),
        ({"query": torch.zeros(2, 16, dtype=torch.float64)}, TypeError, "query must be float32"),
        ({"offsets": torch.tensor([0, 3, 5], dtype=torch.int32)}, TypeError, "offsets must be"),
        ({"offsets": torch.tensor([0, 5])}, ValueError, "offsets has 2 entries"),
        ({"values": torch.zeros(5, 8)}, ValueError, "values must be 2-D"),
        ({"values": torch.zeros(5, 16, dtype=torch.bfloat16)}, TypeError, "values has dtype"),
        ({"table": torch.zeros(4, 16)}, ValueError, "either values or table"),
        ({"values": None}, ValueError, "either values or table"),
        ({"row_ids": torch.zeros(5, dtype=torch.int64)}, ValueError, "row_ids goes with table"),
        ({"layers": []}, ValueError, "layers must be 2 or 3"),
        ({"layers": linears((8, 60), (8,), (1, 8), (1,))}, ValueError, r"layers\[0\] weight must"),
        ({"layers": linears((8, 64), (7,), (1, 8), (1,))}, ValueError, r"layers\[0\] bias"),
        ({"layers": linears((8, 64), (8,), (2, 8), (2,))}, ValueError, r"layers\[1\] weight must"),
        ({"offsets": torch.tensor([1, 3, 5])}, ValueError, r"offsets\[0\] must be 0"),
        ({"offsets": torch.tensor([0, 3, 4])}, ValueError, r"offsets\[-1\] must equal"),
        ({"offsets": torch.tensor([0, 6, 5])}, ValueError, "non-decreasing"),
    ],
)
def test_bad_inputs_name_the_argument(changes, error, match):
    case = make_case([3, 2], 16, (8,), torch.float32, seed="bad")
    case = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    case["layers"] = [(w.cpu(), b.cpu()) for w, b in case["layers"]]
    with pytest.raises(error, match=match):
        _forward(_bad(case, **changes))


def test_bad_row_ids_and_activation_and_widths():
    case = make_case([3, 2], 16, (8,), torch.float32, table_rows=4, seed="bad-table")
    case = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    case["layers"] = [(w.cpu(), b.cpu()) for w, b in case["layers"]]
    with pytest.raises(IndexError, match="row_ids holds 4"):
        _forward(_bad(case, row_ids=torch.tensor([0, 1, 4, 2, 3])))
    # Negative ids are zero rows (ids an admission filter left out), not errors.
    out, _ = _forward(_bad(case, row_ids=torch.tensor([0, 1, -1, 2, -5])))
    assert out.shape == (2, 16)
    with pytest.raises(TypeError, match="row_ids must be a 1-D int64"):
        _forward(_bad(case, row_ids=torch.zeros(5)))
    with pytest.raises(ValueError, match="activation 'dice' is not supported"):
        _forward(case, activation="dice")
    wide = MAX_FUSED_WIDTH + 1
    layers = [(torch.zeros(wide, 64), torch.zeros(wide)), (torch.zeros(1, wide), torch.zeros(1))]
    with pytest.raises(ValueError, match=r"hidden\[0\] = 257 is wider"):
        _forward(_bad(case, layers=layers))


@needs_kernels
def test_backward_checks_grad_out_and_saved_state():
    case = make_case([3, 2], 16, (8,), torch.float32, seed="bad-bwd")
    with pytest.raises(ValueError, match="grad_out must be"):
        target_attention_backward(
            torch.zeros(3, 16).to(DEVICE), case["query"], case["offsets"], case["layers"],
            TargetAttentionSaved(None, None), values=case["values"],
        )  # fmt: skip
    with pytest.raises(ValueError, match="softmax needs"):
        target_attention_backward(
            torch.zeros(2, 16).to(DEVICE), case["query"], case["offsets"], case["layers"],
            TargetAttentionSaved(None, None), values=case["values"], softmax=True,
        )  # fmt: skip


# ------------------------------------------------------------------- spans / padded mode


def make_padded_case(
    lengths: list[int],
    max_len: int,
    dim: int,
    hidden: tuple[int, ...],
    dtype: torch.dtype,
    *,
    table_rows: int = 0,
    seed: object = 0,
) -> tuple[dict, dict, torch.Tensor]:
    """A padded ``[B, L, D]`` case read in place as spans, and its packed jagged twin.

    Returns ``(spans, packed, mask)``: ``spans`` has ``values`` = the padded rows as
    ``[B * L, D]`` (random garbage in the padding) or ``row_ids`` ``[B * L]`` (ids far out
    of the table in the padding), with ``starts`` and the clamped ``lengths``; ``packed``
    the same behaviours under ``offsets``; ``mask`` the flat ``[B * L]`` valid positions.
    """
    clamped = [min(n, max_len) for n in lengths]
    packed = make_case(clamped, dim, hidden, dtype, table_rows=table_rows, seed=seed)
    batch = len(lengths)
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("pad", seed)).encode()))
    lens = torch.tensor(lengths, dtype=torch.int64).clamp(max=max_len)
    mask = (torch.arange(max_len)[None, :] < lens[:, None]).reshape(-1).to(DEVICE)
    spans = {
        "query": packed["query"],
        "layers": packed["layers"],
        "starts": (torch.arange(batch, dtype=torch.int64) * max_len).to(DEVICE),
        "lengths": lens.to(DEVICE),
    }
    if table_rows:
        ids = torch.full((batch * max_len,), 10**9, dtype=torch.int64).to(DEVICE)
        ids[mask] = packed["row_ids"]
        spans["table"], spans["row_ids"] = packed["table"], ids
    else:
        values = (100 * torch.randn(batch * max_len, dim, generator=gen)).to(dtype).to(DEVICE)
        values[mask] = packed["values"]
        spans["values"] = values
    return spans, packed, mask


def run_span_kernels(case: dict, grad_out: torch.Tensor, **options):
    sources = {k: case[k] for k in ("values", "table", "row_ids") if k in case}
    with kernels.use_backend("triton"):
        out, saved = target_attention_forward(
            case["query"], None, case["layers"], starts=case["starts"],
            lengths=case["lengths"], **sources, **options,
        )  # fmt: skip
        grads = target_attention_backward(
            grad_out, case["query"], None, case["layers"], saved, starts=case["starts"],
            lengths=case["lengths"], **sources, **options,
        )  # fmt: skip
    return out, [grads.query, grads.rows, *(t for pair in grads.layers for t in pair)]


def check_padded(spans: dict, packed: dict, mask: torch.Tensor, tol: float, **options) -> None:
    """Spans vs the packed twin, whose rows are the ``mask``ed positions in order."""
    check_spans(spans, packed, mask.nonzero().squeeze(1), tol, **options)


def check_spans(spans: dict, packed: dict, positions: torch.Tensor, tol: float, **options) -> None:
    """Spans vs the packed twin, whose row ``i`` sits at ``positions[i]`` of the spans'."""
    gen = torch.Generator().manual_seed(11)
    grad_out = torch.randn(packed["query"].shape, generator=gen).to(packed["query"].dtype)
    grad_out = grad_out.to(DEVICE)
    ref_out, ref_grads = reference_grads(packed, grad_out, **options)
    out, grads = run_span_kernels(spans, grad_out, **options)
    assert out.dtype == packed["query"].dtype
    assert_close(out, ref_out, tol, "out")
    d_rows = grads[1]
    covered = torch.zeros(d_rows.shape[0], dtype=torch.bool, device=d_rows.device)
    covered[positions] = True
    # The padding is never attended: exactly zero gradient, not garbage.
    assert torch.equal(d_rows[~covered], torch.zeros_like(d_rows[~covered]))
    grads[1] = d_rows.index_select(0, positions)
    names = GRAD_NAMES if len(grads) == 8 else [*GRAD_NAMES[:4], "w3", "b3"]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        assert_close(g, r, tol, f"d_{name}")


# Lengths 0, 1, exactly L, past L (clamped by the caller), and in between.
PADDED_LENGTHS = [0, 1, 19, 25, 3]
PADDED_L = 19


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["values", "table"])
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
@pytest.mark.parametrize("hidden", [(12,), (20, 12)], ids=["1layer", "2layers"])
def test_padded_spans_match_the_reference(hidden, softmax, mode, dtype):
    spans, packed, mask = make_padded_case(
        PADDED_LENGTHS, PADDED_L, 16, hidden, dtype, table_rows=7 if mode == "table" else 0,
        seed=("padded", hidden, softmax, mode, str(dtype)),
    )  # fmt: skip
    check_padded(spans, packed, mask, TOL[dtype], softmax=softmax)


@needs_kernels
@pytest.mark.parametrize("lengths", [[], [0, 0, 0]], ids=["empty-batch", "no-behaviours"])
def test_padded_spans_without_behaviours(lengths):
    spans, packed, mask = make_padded_case(lengths, 5, 16, (16,), torch.float32, seed="none")
    grad_out = torch.randn(len(lengths), 16).to(DEVICE)
    out, grads = run_span_kernels(spans, grad_out, softmax=True)
    assert torch.equal(out, torch.zeros_like(out))
    for name, g in zip(["query", "rows", "w1", "b1", "w3", "b3"], grads, strict=True):
        assert torch.equal(g, torch.zeros_like(g)), name
    assert grads[1].shape == (5 * len(lengths), 16)


@needs_kernels
def test_spans_in_any_order_with_gaps():
    # Rows in a shuffled order over one buffer, gaps between them, one empty span placed
    # inside another row's span (an empty span covers nothing).
    case = make_case([4, 0, 9, 2], 16, (20, 12), torch.float32, seed="shuffled")
    offsets = case["offsets"].cpu()
    gen = torch.Generator().manual_seed(3)
    buffer = 100 * torch.randn(40, 16, generator=gen)
    starts = torch.tensor([30, 14, 12, 24])
    lengths = torch.tensor([4, 0, 9, 2])
    for b in range(4):
        rows = case["values"].cpu()[int(offsets[b]) : int(offsets[b + 1])]
        buffer[int(starts[b]) : int(starts[b]) + int(lengths[b])] = rows
    positions = torch.cat(
        [torch.arange(s, s + n) for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)]
    )
    spans = {
        "query": case["query"], "layers": case["layers"], "values": buffer.to(DEVICE),
        "starts": starts.to(DEVICE), "lengths": lengths.to(DEVICE),
    }  # fmt: skip
    check_spans(spans, case, positions.to(DEVICE), 1e-4, softmax=True)


def test_the_references_agree_on_spans_offsets_and_padding():
    spans, packed, mask = make_padded_case(
        PADDED_LENGTHS, PADDED_L, 16, (20, 12), torch.float32, seed="refs"
    )
    for softmax in (False, True):
        jagged = target_attention_reference(
            packed["query"], packed["offsets"], packed["layers"], values=packed["values"],
            softmax=softmax,
        )  # fmt: skip
        by_spans = target_attention_reference(
            spans["query"], None, spans["layers"], values=spans["values"],
            starts=spans["starts"], lengths=spans["lengths"], softmax=softmax,
        )  # fmt: skip
        keys = spans["values"].reshape(len(PADDED_LENGTHS), PADDED_L, 16)
        padded = padded_target_attention_reference(
            spans["query"], keys, spans["lengths"], spans["layers"], softmax=softmax
        )
        assert_close(by_spans, jagged, 1e-5, "spans")
        assert_close(padded, jagged, 1e-5, "padded")


def test_padded_reference_gives_the_padding_no_gradient():
    spans, _, mask = make_padded_case([0, 3, 7], 5, 16, (8,), torch.float32, seed="pad-grad")
    keys = spans["values"].reshape(3, 5, 16).clone().requires_grad_()
    out = padded_target_attention_reference(
        spans["query"], keys, spans["lengths"], spans["layers"], softmax=True
    )
    out.sum().backward()
    grad = keys.grad.reshape(15, 16)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"starts": torch.tensor([0, 3])}, ValueError, "either offsets or starts and lengths"),
        ({"offsets": None, "starts": torch.tensor([0, 3])}, ValueError, "both starts and"),
        ({"offsets": None, "lengths": torch.tensor([3, 2])}, ValueError, "both starts and"),
        (
            {"offsets": None, "starts": torch.tensor([0, 3, 5]), "lengths": torch.tensor([3, 2])},
            ValueError, "starts has 3 entries",
        ),
        (
            {"offsets": None, "starts": torch.tensor([0, 3]), "lengths": torch.tensor([3, 2.0])},
            TypeError, "lengths must be a 1-D int64",
        ),
        (
            {"offsets": None, "starts": torch.tensor([0, 3]), "lengths": torch.tensor([3, -1])},
            ValueError, "lengths must be >= 0",
        ),
        (
            {"offsets": None, "starts": torch.tensor([-1, 3]), "lengths": torch.tensor([1, 2])},
            ValueError, "starts must be >= 0",
        ),
        (
            {"offsets": None, "starts": torch.tensor([0, 4]), "lengths": torch.tensor([3, 2])},
            ValueError, "at most the number of behaviour rows",
        ),
        (
            {"offsets": None, "starts": torch.tensor([0, 2]), "lengths": torch.tensor([3, 2])},
            ValueError, "must not overlap",
        ),
    ],
)  # fmt: skip
def test_bad_spans_name_the_argument(changes, error, match):
    case = make_case([3, 2], 16, (8,), torch.float32, seed="bad-spans")
    case = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    case["layers"] = [(w.cpu(), b.cpu()) for w, b in case["layers"]]
    args = {**case, **changes}
    query, offsets, layers = args.pop("query"), args.pop("offsets"), args.pop("layers")
    with pytest.raises(error, match=match), kernels.use_backend("torch"):
        target_attention_forward(query, offsets, layers, **args)


def test_span_bounds_check_ignores_uncovered_row_ids():
    # An empty span inside another row's, and padding ids far outside the table: only the
    # covered positions' ids are checked.
    case = make_case([3, 2], 16, (8,), torch.float32, table_rows=4, seed="span-ids")
    query, layers = case["query"].cpu(), [(w.cpu(), b.cpu()) for w, b in case["layers"]]
    table = case["table"].cpu()
    starts, lengths = torch.tensor([0, 4, 1]), torch.tensor([3, 2, 0])
    query3 = torch.cat([query, query[:1]])
    row_ids = torch.tensor([0, 1, 2, 10**9, 3, 1])
    with kernels.use_backend("torch"):
        out, _ = target_attention_forward(
            query3, None, layers, table=table, row_ids=row_ids, starts=starts, lengths=lengths
        )
        assert out.shape == (3, 16)
        with pytest.raises(IndexError, match="row_ids holds 7"):
            target_attention_forward(
                query3, None, layers, table=table, row_ids=torch.tensor([0, 1, 7, 0, 3, 1]),
                starts=starts, lengths=lengths,
            )  # fmt: skip


# ------------------------------------------------------------------------- paged tables


def paged_copy(table: torch.Tensor, page_rows: int = 8) -> PagedTensor:
    """``table``'s rows in a PagedTensor of ``page_rows``-row pages (several pages)."""
    paged = PagedTensor(
        table.shape[1], dtype=table.dtype, device=table.device, page_rows=page_rows,
        name="item_emb",
    )  # fmt: skip
    paged.scatter_rows(paged.append_rows(table.shape[0]), table)
    return paged


def with_unadmitted_ids(case: dict, every: int = 4) -> dict:
    """``case`` with every ``every``-th row id set to -1 (an id the admission filter left
    out: a zero row)."""
    row_ids = case["row_ids"].clone()
    row_ids[::every] = -1
    return {**case, "row_ids": row_ids}


# About 40 rows over 5 pages of 8; ids repeat and some are -1.
PAGED_ROWS = 37


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
@pytest.mark.parametrize("hidden", [(12,), (20, 12)], ids=["1layer", "2layers"])
def test_paged_table_reads_the_same_rows_as_the_plain_table(hidden, softmax, dtype):
    seed = ("paged", hidden, softmax, str(dtype))
    case = make_case(LENGTHS, 16, hidden, dtype, table_rows=PAGED_ROWS, seed=seed)
    case = with_unadmitted_ids(case)
    paged = paged_copy(case["table"])
    assert paged.num_pages == 5 and torch.equal(paged.to_dense(), case["table"])
    assert bool((case["row_ids"] == -1).any())
    # The plain-table kernels against the reference (which reads -1 as a zero row) ...
    check_case(case, TOL[dtype], softmax=softmax)
    # ... and the paged kernels read exactly the same numbers, forward and backward.
    grad_out = torch.randn(case["query"].shape, generator=torch.Generator().manual_seed(7))
    grad_out = grad_out.to(dtype).to(DEVICE)
    out, grads = run_kernels(case, grad_out, softmax=softmax)
    paged_out, paged_grads = run_kernels({**case, "table": paged}, grad_out, softmax=softmax)
    assert torch.equal(paged_out, out)
    for i, (a, b) in enumerate(zip(paged_grads, grads, strict=True)):
        assert torch.equal(a, b), f"gradient {i}"


@needs_kernels
def test_unadmitted_ids_are_scored_as_zero_rows():
    # A row of -1 ids only: each is scored from [q, 0, q, 0] and weighs a zero row, so the
    # output is zero, yet each still gets a row gradient (the score's w_l * g term).
    case = make_case([3, 2], 16, (12,), torch.float32, table_rows=PAGED_ROWS, seed="zeros")
    case["row_ids"] = torch.tensor([-1, -1, -1, 4, 9]).to(DEVICE)
    case["table"] = paged_copy(case["table"])
    grad_out = torch.randn(2, 16).to(DEVICE)
    for softmax in (False, True):
        out, grads = run_kernels(case, grad_out, softmax=softmax)
        assert torch.equal(out[0], torch.zeros(16, device=DEVICE))
        d_rows = grads[1]
        assert d_rows.shape == (5, 16) and bool((d_rows[:3] != 0).any())
        _, ref_grads = reference_grads(case, grad_out, softmax=softmax)
        for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
            assert_close(g, r, TOL[torch.float32], f"gradient {i}")


@needs_kernels
@pytest.mark.parametrize("lengths", [[], [0, 0, 0]], ids=["empty-batch", "no-behaviours"])
def test_paged_table_without_behaviours(lengths):
    case = make_case(lengths, 16, (16,), torch.float32, table_rows=PAGED_ROWS, seed="p-none")
    case["table"] = paged_copy(case["table"])
    grad_out = torch.randn(len(lengths), 16).to(DEVICE)
    out, grads = run_kernels(case, grad_out, softmax=True)
    assert out.shape == (len(lengths), 16) and torch.equal(out, torch.zeros_like(out))
    assert grads[1].shape == (0, 16)
    for name, g in zip(["query", "rows", "w1", "b1", "w3", "b3"], grads, strict=True):
        assert torch.equal(g, torch.zeros_like(g)), name


@needs_kernels
def test_paged_table_over_spans_reads_only_covered_ids():
    # Padded spans whose padding holds ids far past the table: never read through the
    # page table, and the covered -1 ids read zero rows.
    spans, packed, mask = make_padded_case(
        PADDED_LENGTHS, PADDED_L, 16, (20, 12), torch.float32, table_rows=PAGED_ROWS,
        seed="paged-spans",
    )  # fmt: skip
    positions = mask.nonzero().squeeze(1)
    packed = with_unadmitted_ids(packed, every=3)
    spans["row_ids"] = spans["row_ids"].index_put((positions,), packed["row_ids"])
    spans["table"] = paged_copy(spans["table"])
    check_spans(spans, packed, positions, 1e-4, softmax=True)


@needs_kernels
def test_wrapped_tensor_reads_like_the_plain_table():
    # PagedTensor.wrap: one page (page_shift 62), the same kernels.
    case = make_case([5, 0, 12], 24, (16,), torch.bfloat16, table_rows=9, seed="wrap")
    case = with_unadmitted_ids(case)
    grad_out = torch.randn(3, 24).to(torch.bfloat16).to(DEVICE)
    out, grads = run_kernels(case, grad_out)
    wrapped = {**case, "table": PagedTensor.wrap(case["table"], name="wrapped")}
    wrapped_out, wrapped_grads = run_kernels(wrapped, grad_out)
    assert torch.equal(wrapped_out, out)
    for a, b in zip(wrapped_grads, grads, strict=True):
        assert torch.equal(a, b)


def test_reference_gathers_a_paged_table_with_zero_rows_for_negative_ids():
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(PAGED_ROWS, 16, generator=gen)
    paged = paged_copy(table)
    ids = torch.tensor([3, -1, 36, 3, 8, -7, 0])
    expected = table[ids.clamp(min=0)] * (ids >= 0)[:, None]
    with kernels.use_backend("torch"):
        assert torch.equal(gather_table_rows(paged, ids), expected)
        assert torch.equal(gather_table_rows(table, ids), expected)
        empty = PagedTensor(16, page_rows=8)
        assert torch.equal(gather_table_rows(empty, torch.tensor([-1, -1])), torch.zeros(2, 16))
        case = make_case([4, 0, 3], 16, (12,), torch.float32, seed="ref-paged")
        layers = [(w.cpu(), b.cpu()) for w, b in case["layers"]]
        args = (case["query"].cpu(), case["offsets"].cpu(), layers)
        by_paged = target_attention_reference(*args, table=paged, row_ids=ids, softmax=True)
        by_values = target_attention_reference(*args, values=expected, softmax=True)
    assert torch.equal(by_paged, by_values)


def test_paged_table_checks():
    case = make_case([3, 2], 16, (8,), torch.float32, table_rows=PAGED_ROWS, seed="p-bad")
    case = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    case["layers"] = [(w.cpu(), b.cpu()) for w, b in case["layers"]]
    paged = paged_copy(case["table"])
    ok_ids = torch.tensor([0, -1, 36, -1, 8])
    out, _ = _forward(_bad(case, table=paged, row_ids=ok_ids))
    assert out.shape == (2, 16)
    with pytest.raises(IndexError, match="row_ids holds 37, past the table's rows"):
        _forward(_bad(case, table=paged, row_ids=torch.tensor([0, -1, 37, 2, 3])))
    bf16 = paged_copy(case["table"].to(torch.bfloat16))
    with pytest.raises(TypeError, match="table 'item_emb' has dtype torch.bfloat16 but query"):
        _forward(_bad(case, table=bf16, row_ids=ok_ids))
    narrow = paged_copy(case["table"][:, :8].contiguous())
    with pytest.raises(ValueError, match="rows of width 8 but query has D = 16"):
        _forward(_bad(case, table=narrow, row_ids=ok_ids))
    elsewhere = PagedTensor(16, device="meta", page_rows=8, name="item_emb")
    with pytest.raises(ValueError, match="table 'item_emb' is on device meta but query is on"):
        _forward(_bad(case, table=elsewhere, row_ids=ok_ids))
    with pytest.raises(TypeError, match="table must be a torch.Tensor or a PagedTensor"):
        _forward(_bad(case, table=[[0.0] * 16], row_ids=ok_ids))
