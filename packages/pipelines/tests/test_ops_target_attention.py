"""target_attention / FusedTargetAttention through autograd: the Triton path and the CPU
reference path against the unfused models.din.TargetAttention on the padded equivalent, the
padded mode (padded_target_attention / forward_padded) that reads [B, L, D] in place, and
rows read from a PagedTensor with a grad sink, negative (unadmitted) row ids and depends_on
ordering the lookup's backward after the sink."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import pytest
import torch
from backends import BACKENDS, DEVICE, ON_GPU, RUNNABLE

from recstack.core import PagedTensor, kernels
from recstack.pipelines.kernels.target_attention import (
    gather_table_rows,
    padded_target_attention_reference,
)
from recstack.pipelines.models.din import TargetAttention
from recstack.pipelines.ops.target_attention import (
    FusedTargetAttention,
    padded_target_attention,
    target_attention,
)

LENGTHS = [3, 0, 1, 21, 5]  # ragged, an empty row, a single behaviour


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


def same(a: torch.Tensor, b: torch.Tensor, backend: str, what: str) -> None:
    """Bitwise equal; within rounding for the torch reference on CUDA, whose ``index_add``
    sums run in the order of the atomics."""
    if backend == "triton" or not ON_GPU:
        assert torch.equal(a, b), what
    else:
        close(a, b, 1e-5 if a.dtype == torch.float32 else 1e-2, what)


def generator(*seed: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(seed).encode()))


def padded(lengths: list[int], dim: int, gen: torch.Generator):
    """``[B, L, D]`` keys with their mask (random numbers in the padding too) and the
    jagged equivalent."""
    batch, max_len = len(lengths), max(lengths, default=0)
    keys = torch.randn(batch, max_len, dim, generator=gen)
    mask = torch.arange(max_len)[None, :] < torch.tensor(lengths, dtype=torch.int64)[:, None]
    offsets = torch.zeros(batch + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return keys, mask, keys[mask], offsets


def modules(dim, hidden, activation, softmax, gen):
    unfused = TargetAttention(dim, hidden, activation, softmax)
    with torch.no_grad():
        for p in unfused.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
    fused = FusedTargetAttention(dim, hidden, activation, softmax)
    fused.load_state_dict(unfused.state_dict())
    return unfused.to(DEVICE), fused.to(DEVICE)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, name
    scale = max(float(e.abs().max()) if e.numel() else 0.0, 1.0)
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def test_state_dicts_are_interchangeable():
    for hidden in ((80, 40), (16,)):
        unfused = TargetAttention(8, hidden, "sigmoid", False)
        fused = FusedTargetAttention(8, hidden, "sigmoid", False)
        assert list(unfused.state_dict()) == list(fused.state_dict())
        unfused.load_state_dict(fused.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
@pytest.mark.parametrize("hidden", [(12,), (20, 12)], ids=["1layer", "2layers"])
def test_matches_the_unfused_module_on_padded_input(hidden, softmax, backend):
    gen = generator(hidden, softmax)
    dim = 16
    unfused, fused = modules(dim, hidden, "sigmoid", softmax, gen)
    keys, mask, values, offsets = padded(LENGTHS, dim, gen)
    query = torch.randn(len(LENGTHS), dim, generator=gen)
    grad_out = torch.randn(len(LENGTHS), dim, generator=gen).to(DEVICE)

    q1 = query.to(DEVICE).requires_grad_()
    k1 = keys.to(DEVICE).requires_grad_()
    expected = unfused(q1, k1, mask.to(DEVICE))
    expected.backward(grad_out)

    q2 = query.to(DEVICE).requires_grad_()
    v2 = values.to(DEVICE).requires_grad_()
    with kernels.use_backend(backend), kernels.count_launches() as launches:
        out = fused(q2, offsets.to(DEVICE), v2)
        out.backward(grad_out)
    if backend == "triton":
        assert launches == {"target_attention_fwd": 1, "target_attention_bwd": 1}
    else:
        assert set(launches) == {"target_attention_reference"}

    close(out, expected, 1e-4, "out")
    close(q2.grad, q1.grad, 1e-4, "d_query")
    close(v2.grad, k1.grad[mask.to(DEVICE)], 1e-4, "d_values")
    assert torch.equal(k1.grad[~mask.to(DEVICE)], torch.zeros_like(k1.grad[~mask.to(DEVICE)]))
    for (name, p1), p2 in zip(unfused.named_parameters(), fused.parameters(), strict=True):
        close(p2.grad, p1.grad, 1e-4, f"d_{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_padded_takes_a_prefix_mask(backend):
    gen = generator("padded-call")
    unfused, fused = modules(16, (20, 12), "relu", True, gen)
    keys, mask, _, _ = padded(LENGTHS, 16, gen)
    query = torch.randn(len(LENGTHS), 16, generator=gen).to(DEVICE)
    keys, mask = keys.to(DEVICE), mask.to(DEVICE)
    with kernels.use_backend(backend):
        out = fused.forward_padded(query, keys, mask)
        checked = fused.forward_padded(query, keys, mask, check_bounds=True)
    close(out, unfused(query, keys, mask), 1e-4, "out")
    assert torch.equal(out, checked)
    with pytest.raises(ValueError, match="mask must be"):
        fused.forward_padded(query, keys, mask[:, :2])
    holes = mask.clone()
    holes[3, 0] = False  # row 3's valid positions no longer come first
    with pytest.raises(ValueError, match="True on its first positions"):
        fused.forward_padded(query, keys, holes, check_bounds=True)


# Lengths 0, 1, exactly L, past L (clamped to L), in between; L not a multiple of a block.
PADDED_LENGTHS = [2, 0, 1, 19, 40, 7]
PADDED_L = 19


def padded_inputs(dtype: torch.dtype, gen: torch.Generator):
    """``[B, L, D]`` keys with garbage in the padding, the query, lengths, the mask and a
    gradient of the output."""
    batch, dim = len(PADDED_LENGTHS), 16
    lengths = torch.tensor(PADDED_LENGTHS, dtype=torch.int64)
    mask = torch.arange(PADDED_L)[None, :] < lengths.clamp(max=PADDED_L)[:, None]
    keys = torch.randn(batch, PADDED_L, dim, generator=gen)
    keys = torch.where(mask[..., None], keys, 100 * torch.randn(keys.shape, generator=gen))
    query = torch.randn(batch, dim, generator=gen)
    grad_out = torch.randn(batch, dim, generator=gen)
    return [t.to(dtype).to(DEVICE) for t in (keys, query, grad_out)] + [
        lengths.to(DEVICE),
        mask.to(DEVICE),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
@pytest.mark.parametrize("hidden", [(12,), (20, 12)], ids=["1layer", "2layers"])
def test_padded_mode_matches_the_unfused_module(hidden, softmax, backend):
    gen = generator("padded", hidden, softmax)
    unfused, fused = modules(16, hidden, "sigmoid", softmax, gen)
    keys, query, grad_out, lengths, mask = padded_inputs(torch.float32, gen)

    k1, q1 = keys.clone().requires_grad_(), query.clone().requires_grad_()
    expected = unfused(q1, k1, mask)
    expected.backward(grad_out)

    k2, q2 = keys.clone().requires_grad_(), query.clone().requires_grad_()
    with kernels.use_backend(backend), kernels.count_launches() as launches:
        out = fused.forward_padded(q2, k2, lengths)
        out.backward(grad_out)
    if backend == "triton":
        assert launches == {"target_attention_fwd": 1, "target_attention_bwd": 1}
    else:  # CUDA tensors take the padded computation, CPU ones the jagged reference
        reference = "padded_reference" if ON_GPU else "reference"
        assert set(launches) == {f"target_attention_{reference}"}
    close(out, expected, 1e-4, "out")
    close(q2.grad, q1.grad, 1e-4, "d_query")
    close(k2.grad, k1.grad, 1e-4, "d_keys")
    assert torch.equal(k2.grad[~mask], torch.zeros_like(k2.grad[~mask]))  # the padding
    for (name, p1), p2 in zip(unfused.named_parameters(), fused.parameters(), strict=True):
        close(p2.grad, p1.grad, 1e-4, f"d_{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_mode_in_bfloat16(backend):
    gen = generator("padded-bf16")
    unfused, fused = modules(16, (20, 12), "sigmoid", True, gen)
    keys, query, grad_out, lengths, mask = padded_inputs(torch.bfloat16, gen)
    k1, q1 = keys.float().requires_grad_(), query.float().requires_grad_()
    expected = unfused(q1, k1, mask)
    expected.backward(grad_out.float())
    k2, q2 = keys.clone().requires_grad_(), query.clone().requires_grad_()
    with kernels.use_backend(backend):
        out = padded_target_attention(q2, k2, lengths, fused.layers(), softmax=True)
        out.backward(grad_out)
    assert out.dtype == torch.bfloat16 and k2.grad.dtype == torch.bfloat16
    close(out, expected, 5e-2, "out")
    close(q2.grad, q1.grad, 5e-2, "d_query")
    close(k2.grad, k1.grad, 5e-2, "d_keys")
    assert torch.equal(k2.grad[~mask], torch.zeros_like(k2.grad[~mask]))


def test_padded_reference_is_the_unfused_computation():
    # The path of CUDA tensors under a forced torch backend: no host sync, same numbers.
    gen = generator("padded-reference")
    unfused, fused = modules(16, (20, 12), "gelu", True, gen)
    keys, query, grad_out, lengths, mask = padded_inputs(torch.float32, gen)
    k1, k2 = keys.clone().requires_grad_(), keys.clone().requires_grad_()
    expected = unfused(query, k1, mask)
    expected.backward(grad_out)
    out = padded_target_attention_reference(
        query, k2, lengths.clamp(max=PADDED_L), fused.layers(), activation="gelu", softmax=True
    )
    out.backward(grad_out)
    close(out, expected, 1e-5, "out")
    close(k2.grad, k1.grad, 1e-5, "d_keys")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_mode_edge_shapes(backend):
    fused = FusedTargetAttention(16, (8,), "sigmoid", True).to(DEVICE)
    with kernels.use_backend(backend):
        for batch, max_len in ((0, 4), (3, 0)):
            keys = torch.randn(batch, max_len, 16, device=DEVICE, requires_grad=True)
            query = torch.randn(batch, 16, device=DEVICE, requires_grad=True)
            lengths = torch.full((batch,), 5, dtype=torch.int32, device=DEVICE)
            out = fused.forward_padded(query, keys, lengths)
            out.sum().backward()
            assert out.shape == (batch, 16) and torch.equal(out, torch.zeros_like(out))
            assert keys.grad.shape == keys.shape and query.grad.shape == query.shape


def test_padded_mode_refuses_bad_input():
    fused = FusedTargetAttention(16, (8,), "sigmoid", False)
    query, keys = torch.zeros(2, 16), torch.zeros(2, 3, 16)
    with pytest.raises(ValueError, match="keys must be 3-D"):
        fused.forward_padded(query, keys[0], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"lengths must be \[B\] = \[2\]"):
        fused.forward_padded(query, keys, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        fused.forward_padded(query, keys, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="query has B = 1 rows"):
        fused.forward_padded(query[:1], keys, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="values has dtype"):
        fused.forward_padded(query, keys.to(torch.bfloat16), torch.tensor([1, 2]))


@pytest.mark.skipif(not RUNNABLE, reason="needs a GPU or TRITON_INTERPRET=1")
def test_bf16_autocast_multiplies_in_bf16_and_rounds_nothing_else():
    # Under bf16 autocast the kernels' dots take bf16 operands on a GPU (fp32 rows rounded
    # in registers); the host-side matmuls around them stay fp32, and the output stays
    # fp32. The interpreter always multiplies in fp32, so there the results are identical.
    gen = generator("autocast")
    _, fused = modules(16, (20, 12), "sigmoid", True, gen)
    keys, query, grad_out, lengths, _ = padded_inputs(torch.float32, gen)
    results = []
    for enabled in (False, True):
        fused.zero_grad()
        k, q = keys.clone().requires_grad_(), query.clone().requires_grad_()
        with kernels.use_backend("triton"):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=enabled):
                out = fused.forward_padded(q, k, lengths)
            out.backward(grad_out)
        results.append([out, q.grad, k.grad, *(p.grad for p in fused.parameters())])
    assert results[1][0].dtype == torch.float32
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        if ON_GPU:
            close(b, a, 5e-2, f"result {i}")
        else:
            assert torch.equal(a, b)


def test_torch_path_under_cpu_autocast():
    # The reference's MLP runs in bf16 under autocast; its segment softmax stays fp32.
    gen = generator("cpu-autocast")
    _, fused = modules(16, (20, 12), "sigmoid", True, gen)
    keys, query, _, lengths, _ = padded_inputs(torch.float32, gen)
    keys, query, lengths = keys.cpu(), query.cpu(), lengths.cpu()
    fused = fused.cpu()
    with kernels.use_backend("torch"):
        expected = fused.forward_padded(query, keys, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused.forward_padded(query, keys, lengths)
    assert out.dtype == torch.float32
    close(out, expected, 5e-2, "out")


@pytest.mark.skipif(not ON_GPU, reason="host syncs are only visible on a CUDA device")
def test_padded_mode_does_not_sync_on_cuda():
    gen = generator("no-sync")
    _, fused = modules(16, (20, 12), "sigmoid", True, gen)
    keys, query, grad_out, lengths, _ = padded_inputs(torch.float32, gen)
    keys.requires_grad_()
    fused.forward_padded(query, keys, lengths).backward(grad_out)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused.forward_padded(query, keys, lengths).backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_table_rows_with_repeated_ids_accumulate_a_dense_gradient(dtype, backend):
    gen = generator("table", str(dtype))
    dim, rows = 16, 6
    _, fused = modules(dim, (20, 12), "sigmoid", True, gen)
    _, _, _, offsets = padded(LENGTHS, dim, gen)
    n = int(offsets[-1])
    row_ids = torch.randint(0, rows, (n,), generator=gen).to(DEVICE)
    table = torch.randn(rows, dim, generator=gen).to(dtype).to(DEVICE)
    query = torch.randn(len(LENGTHS), dim, generator=gen).to(dtype).to(DEVICE)
    grad_out = torch.randn(len(LENGTHS), dim, generator=gen).to(dtype).to(DEVICE)

    t1 = table.clone().requires_grad_()
    q1 = query.clone().requires_grad_()
    with kernels.use_backend(backend):
        out = fused(q1, offsets.to(DEVICE), table=t1, row_ids=row_ids)
    out.backward(grad_out)
    grads = [p.grad.clone() for p in fused.parameters()]
    fused.zero_grad()

    t2 = table.clone().requires_grad_()
    q2 = query.clone().requires_grad_()
    with kernels.use_backend("torch"):
        expected = fused(q2, offsets.to(DEVICE), t2.index_select(0, row_ids))
    expected.backward(grad_out)

    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert out.dtype == dtype and t1.grad.dtype == dtype
    close(out, expected, tol, "out")
    close(t1.grad, t2.grad, tol, "d_table")
    close(q1.grad, q2.grad, tol, "d_query")
    for g, p in zip(grads, fused.parameters(), strict=True):
        close(g, p.grad, tol, "d_weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_sink_gets_the_row_gradients_instead_of_the_table(backend):
    gen = generator("sink")
    dim, rows = 16, 5
    _, fused = modules(dim, (12,), "sigmoid", False, gen)
    _, _, _, offsets = padded(LENGTHS, dim, gen)
    n = int(offsets[-1])
    row_ids = torch.randint(0, rows, (n,), generator=gen).to(DEVICE)
    table = torch.randn(rows, dim, generator=gen).to(DEVICE).requires_grad_()
    query = torch.randn(len(LENGTHS), dim, generator=gen).to(DEVICE)
    grad_out = torch.randn(len(LENGTHS), dim, generator=gen).to(DEVICE)
    received = []

    def sink(ids: torch.Tensor, d_rows: torch.Tensor) -> None:
        received.append((ids, d_rows))

    with kernels.use_backend(backend):
        out = fused(query, offsets.to(DEVICE), table=table, row_ids=row_ids, grad_sink=sink)
    out.backward(grad_out)
    assert table.grad is None
    ((ids, d_rows),) = received
    assert torch.equal(ids, row_ids) and d_rows.dtype == torch.float32 and d_rows.shape == (n, dim)

    values = table.detach().index_select(0, row_ids).requires_grad_()
    with kernels.use_backend("torch"):
        fused(query, offsets.to(DEVICE), values).backward(grad_out)
    close(d_rows, values.grad, 1e-4, "d_rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    fused = FusedTargetAttention(16, (8, 8), "sigmoid", True).to(DEVICE)
    query = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    values = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    with kernels.use_backend(backend):
        out = fused(query, torch.zeros(1, dtype=torch.int64, device=DEVICE), values)
        out.sum().backward()
    assert out.shape == (0, 16)
    assert query.grad.shape == (0, 16)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in fused.parameters())


def test_unsupported_configurations_are_refused():
    with pytest.raises(ValueError, match="activation 'dice' is not supported.*TargetAttention"):
        FusedTargetAttention(16, (8,), "dice", False)
    with pytest.raises(ValueError, match="activation 'prelu' is not supported"):
        FusedTargetAttention(16, (8,), "prelu", False)
    with pytest.raises(ValueError, match="hidden must have 1 or 2 sizes"):
        FusedTargetAttention(16, (8, 8, 8), "relu", False)
    fused = FusedTargetAttention(16, (8,), "ReLU", False)
    assert fused.activation == "relu"
    query, values = torch.zeros(2, 16), torch.zeros(3, 16)
    offsets = torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="grad_sink goes with table"):
        target_attention(query, offsets, fused.layers(), values=values, grad_sink=print)
    with pytest.raises(TypeError, match="grad_sink must be callable"):
        fused(query, offsets, table=values, row_ids=torch.tensor([0, 1, 2]), grad_sink=3)
    with pytest.raises(IndexError, match="row_ids holds 3"):
        fused(query, offsets, table=values, row_ids=torch.tensor([0, 1, 3]))
    with pytest.raises(TypeError, match="depends_on must be a torch.Tensor or None"):
        fused(query, offsets, values, depends_on=[])


# ------------------------------------------------------- paged tables, sinks, depends_on

PAGED_ROWS = 41  # 6 pages of 8 rows


def paged_case(dtype: torch.dtype, *seed: object):
    """A PagedTensor of ``PAGED_ROWS`` rows in 8-row pages, its dense copy, row ids with
    repeats and -1 entries over ``LENGTHS`` (an empty row, a single behaviour), the query
    and a gradient of the output."""
    gen = generator("paged", str(dtype), *seed)
    _, _, _, offsets = padded(LENGTHS, 16, gen)
    n = int(offsets[-1])
    dense = torch.randn(PAGED_ROWS, 16, generator=gen).to(dtype).to(DEVICE)
    table = PagedTensor(16, dtype=dtype, device=DEVICE, page_rows=8, name="item_emb")
    table.scatter_rows(table.append_rows(PAGED_ROWS), dense)
    row_ids = torch.randint(0, PAGED_ROWS, (n,), generator=gen)
    row_ids[::5] = -1
    row_ids[1] = row_ids[2] = 7  # a repeat within a row
    query = torch.randn(len(LENGTHS), 16, generator=gen).to(dtype).to(DEVICE)
    grad_out = torch.randn(len(LENGTHS), 16, generator=gen).to(dtype).to(DEVICE)
    return table, dense, offsets.to(DEVICE), row_ids.to(DEVICE), query, grad_out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
def test_paged_table_with_a_sink_matches_the_plain_gather(softmax, dtype, backend):
    gen = generator("paged-sink", softmax, str(dtype))
    _, fused = modules(16, (20, 12), "sigmoid", softmax, gen)
    table, dense, offsets, row_ids, query, grad_out = paged_case(dtype, softmax)
    assert table.num_pages == 6 and torch.equal(table.to_dense(), dense)
    tol = 1e-4 if dtype == torch.float32 else 5e-2

    # The reference: the rows gathered from the dense copy (zeros for -1), as values.
    q1 = query.clone().requires_grad_()
    values = gather_table_rows(dense, row_ids).requires_grad_()
    with kernels.use_backend("torch"):
        expected = fused(q1, offsets, values)
    expected.backward(grad_out)
    expected_layers = [p.grad.clone() for p in fused.parameters()]
    fused.zero_grad()

    results = {}
    for name, source in (("paged", table), ("plain", dense)):
        received = []

        def sink(ids: torch.Tensor, d_rows: torch.Tensor, received: list = received) -> None:
            received.append((ids, d_rows))

        q2 = query.clone().requires_grad_()
        with kernels.use_backend(backend), kernels.count_launches() as launches:
            out = fused(q2, offsets, table=source, row_ids=row_ids, grad_sink=sink)
            out.backward(grad_out)
        if backend == "triton":
            assert launches == {"target_attention_fwd": 1, "target_attention_bwd": 1}
        ((ids, d_rows),) = received
        assert torch.equal(ids, row_ids)
        assert d_rows.dtype == torch.float32 and d_rows.shape == (row_ids.numel(), 16)
        assert out.dtype == dtype
        close(out, expected, tol, f"{name} out")
        close(q2.grad, q1.grad, tol, f"{name} d_query")
        close(d_rows, values.grad, tol, f"{name} d_rows")  # -1 positions included
        for g, p in zip(expected_layers, fused.parameters(), strict=True):
            close(p.grad, g, tol, f"{name} d_weight")
        results[name] = [out, q2.grad, d_rows, *(p.grad.clone() for p in fused.parameters())]
        fused.zero_grad()
    # Paged and plain tables read the same numbers: identical results, but for the order
    # of the CUDA atomics in the torch reference's index_add sums.
    for i, (a, b) in enumerate(zip(results["paged"], results["plain"], strict=True)):
        same(a, b, backend, f"result {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_table_over_spans_with_garbage_padding_ids(backend):
    # Spans over a padded [B, L] id layout: the padding holds ids far past the table, which
    # neither path may read; their d_rows are zero, the covered ones the jagged call's.
    gen = generator("paged-spans")
    _, fused = modules(16, (20, 12), "sigmoid", True, gen)
    table, _, offsets, row_ids, query, grad_out = paged_case(torch.float32, "spans")
    batch, max_len = len(LENGTHS), max(LENGTHS)
    lengths = torch.tensor(LENGTHS, dtype=torch.int64).to(DEVICE)
    covered = torch.arange(max_len, device=DEVICE)[None, :] < lengths[:, None]
    padded_ids = torch.full((batch, max_len), 10**9, dtype=torch.int64, device=DEVICE)
    padded_ids[covered] = row_ids
    starts = torch.arange(batch, dtype=torch.int64, device=DEVICE) * max_len
    results = []
    for layout in ("spans", "offsets"):
        received = []
        ids = padded_ids.reshape(-1) if layout == "spans" else row_ids
        where = {"starts": starts, "lengths": lengths} if layout == "spans" else {}
        with kernels.use_backend(backend):
            out = target_attention(
                query, offsets if layout == "offsets" else None, fused.layers(), table=table,
                row_ids=ids, softmax=True, grad_sink=lambda i, d, r=received: r.append(d), **where,
            )  # fmt: skip
        out.backward(grad_out)
        results.append((out, received[0]))
    (out, d_rows), (expected, expected_d_rows) = results
    close(out, expected, 1e-4, "out")
    d_rows = d_rows.reshape(batch, max_len, 16)
    close(d_rows[covered], expected_d_rows, 1e-4, "d_rows")
    assert torch.equal(d_rows[~covered], torch.zeros_like(d_rows[~covered]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_ids_give_a_plain_table_no_dense_gradient(backend):
    gen = generator("dense-negative")
    _, fused = modules(16, (12,), "sigmoid", True, gen)
    _, dense, offsets, row_ids, query, grad_out = paged_case(torch.float32, "dense")
    t1 = dense.clone().requires_grad_()
    with kernels.use_backend(backend):
        fused(query, offsets, table=t1, row_ids=row_ids).backward(grad_out)
    values = gather_table_rows(dense, row_ids).requires_grad_()
    with kernels.use_backend("torch"):
        fused(query, offsets, values).backward(grad_out)
    valid = row_ids >= 0
    expected = torch.zeros_like(dense).index_add_(0, row_ids[valid], values.grad[valid])
    close(t1.grad, expected, 1e-4, "d_table")


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_table_without_a_sink_gets_no_gradient(backend):
    gen = generator("paged-no-sink")
    _, fused = modules(16, (12,), "sigmoid", False, gen)
    table, dense, offsets, row_ids, query, grad_out = paged_case(torch.float32, "no-sink")
    q1, q2 = query.clone().requires_grad_(), query.clone().requires_grad_()
    with kernels.use_backend(backend):
        out = fused(q1, offsets, table=table, row_ids=row_ids)
        out.backward(grad_out)
        expected = fused(q2, offsets, table=dense, row_ids=row_ids)
        expected.backward(grad_out)
    same(out, expected, backend, "out")
    same(q1.grad, q2.grad, backend, "d_query")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["paged", "plain"])
def test_the_sink_is_called_when_nothing_else_needs_a_gradient(source, backend):
    # A frozen scorer, a query without gradient and a table that needs none: the sink is
    # still the table's gradient, so backward reaches it.
    gen = generator("frozen", source)
    _, fused = modules(16, (12,), "sigmoid", False, gen)
    fused.requires_grad_(False)
    table, dense, offsets, row_ids, query, grad_out = paged_case(torch.float32, "frozen")
    received = []
    with kernels.use_backend(backend):
        out = fused(
            query, offsets, table=table if source == "paged" else dense, row_ids=row_ids,
            grad_sink=lambda ids, d_rows: received.append(d_rows),
        )  # fmt: skip
        assert out.requires_grad
        out.backward(grad_out)
        with torch.no_grad():
            fused(query, offsets, table=table, row_ids=row_ids, grad_sink=received.append)
    assert [d.shape for d in received] == [(row_ids.numel(), 16)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_on_a_paged_table(backend):
    fused = FusedTargetAttention(16, (8, 8), "sigmoid", True).to(DEVICE)
    table, *_ = paged_case(torch.float32, "empty")
    query = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    received = []
    with kernels.use_backend(backend):
        out = fused(
            query, torch.zeros(1, dtype=torch.int64, device=DEVICE), table=table,
            row_ids=torch.zeros(0, dtype=torch.int64, device=DEVICE),
            grad_sink=lambda ids, d_rows: received.append(d_rows),
        )  # fmt: skip
        out.sum().backward()
    assert out.shape == (0, 16) and query.grad.shape == (0, 16)
    assert [d.shape for d in received] == [(0, 16)]


class _Lookup(torch.autograd.Function):
    """Stands for the embedding lookup: makes the zero-size ``depends_on`` from a leaf, and
    its backward reads what the sink received."""

    @staticmethod
    def forward(ctx, leaf: torch.Tensor, events: list) -> torch.Tensor:  # type: ignore[override]
        ctx.events = events
        return leaf.new_zeros(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        assert ctx.events == ["sink"], "the lookup's backward ran before the sink was called"
        assert grad.shape == (0,) and not bool(grad.any())
        ctx.events.append("lookup")
        return torch.zeros_like(grad), None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["paged", "plain"])
def test_depends_on_runs_the_lookup_backward_after_the_sink(source, backend):
    gen = generator("depends-on", source)
    _, fused = modules(16, (20, 12), "sigmoid", True, gen)
    table, dense, offsets, row_ids, query, grad_out = paged_case(torch.float32, "dep")
    events: list[str] = []
    leaf = torch.zeros(0, device=DEVICE, requires_grad=True)
    depends_on = _Lookup.apply(leaf, events)
    # The query needs no gradient: depends_on alone ties the op to the lookup's graph.
    query = query.detach()
    with kernels.use_backend(backend):
        out = fused(
            query, offsets, table=table if source == "paged" else dense, row_ids=row_ids,
            grad_sink=lambda ids, d_rows: events.append("sink"), depends_on=depends_on,
        )  # fmt: skip
        # Some more work after the op, so the lookup's node is not simply the last one.
        (out * 2).sum().backward()
    assert events == ["sink", "lookup"]
    assert leaf.grad is not None and leaf.grad.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_depends_on_gets_zeros_with_values(backend):
    gen = generator("depends-on-values")
    _, fused = modules(16, (12,), "sigmoid", False, gen)
    _, _, values, offsets = padded(LENGTHS, 16, gen)
    values = values.to(DEVICE).requires_grad_()
    depends_on = torch.ones(3, device=DEVICE, requires_grad=True)
    query = torch.randn(len(LENGTHS), 16, generator=gen).to(DEVICE)
    with kernels.use_backend(backend):
        out = fused(query, offsets.to(DEVICE), values, depends_on=depends_on)
        out.sum().backward()
    assert torch.equal(depends_on.grad, torch.zeros(3, device=DEVICE))
    assert values.grad is not None and values.grad.shape == values.shape


def test_check_bounds_on_a_paged_table():
    table, _, offsets, row_ids, query, _ = paged_case(torch.float32, "bounds")
    fused = FusedTargetAttention(16, (8,), "sigmoid", False).to(DEVICE)
    out = fused(query, offsets, table=table, row_ids=row_ids)  # -1 entries pass
    assert out.shape == (len(LENGTHS), 16)
    bad = row_ids.clone()
    bad[4] = PAGED_ROWS
    with pytest.raises(IndexError, match=f"row_ids holds {PAGED_ROWS}, past the table"):
        fused(query, offsets, table=table, row_ids=bad)
    with pytest.raises(TypeError, match="table 'item_emb' has dtype torch.float32 but query"):
        fused(query.to(torch.bfloat16), offsets, table=table, row_ids=row_ids)
