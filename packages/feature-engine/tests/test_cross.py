"""cross: hashed per-row Cartesian products vs a Python oracle built on ``xxhash``."""

from __future__ import annotations

import itertools
import struct

import pytest
import torch
import xxhash
from feature_testdata import M64, s64

from recstack.core import kernels
from recstack.feature_engine.kernels import cross as cross_module
from recstack.feature_engine.kernels.cross import cross, cross_reference, xxh64_pair_reference

EDGE_IDS = [0, 1, -1, 2**63 - 1, -(2**63), 0x0123456789ABCDEF]


def _pair(a: int, b: int, seed: int) -> int:
    return s64(xxhash.xxh64_intdigest(struct.pack("<QQ", a & M64, b & M64), seed & M64))


def _oracle(values, row_offsets, batch_size, components, seeds):
    """Per cross and row: itertools.product (last component fastest) of the rows, fold-hashed."""
    vals, ro = values.tolist(), row_offsets.tolist()
    out, lens = [], []
    for slots, seed in zip(components.tolist(), seeds.tolist(), strict=True):
        feats = [f for f in slots if f >= 0]
        for b in range(batch_size):
            rows = [vals[ro[f * batch_size + b] : ro[f * batch_size + b + 1]] for f in feats]
            items = list(itertools.product(*rows))
            lens.append(len(items))
            for item in items:
                h = _pair(item[0], item[1], seed)
                for v in item[2:]:
                    h = _pair(h, v, seed)
                out.append(h)
    return out, lens


def _batch(gen: torch.Generator, num_features: int, batch_size: int, max_len: int, device):
    """Random key-major buffer: ragged rows (some empty), full-range ids plus edge ids."""
    lengths = torch.randint(0, max_len + 1, (num_features * batch_size,), generator=gen)
    row_offsets = torch.zeros(num_features * batch_size + 1, dtype=torch.int64)
    row_offsets[1:] = torch.cumsum(lengths, 0)
    n = int(row_offsets[-1])
    values = torch.randint(-(2**63), 2**63 - 1, (n,), generator=gen, dtype=torch.int64)
    values[: min(n, len(EDGE_IDS))] = torch.tensor(EDGE_IDS[: min(n, len(EDGE_IDS))])
    return values.to(device), row_offsets.to(device)


def _crosses(gen: torch.Generator, num_features: int, counts: list[int]):
    comps = torch.full((len(counts), 4), -1, dtype=torch.int64)
    for c, k in enumerate(counts):
        comps[c, :k] = torch.randperm(num_features, generator=gen)[:k]
    seeds = torch.randint(-(2**63), 2**63 - 1, (len(counts),), generator=gen, dtype=torch.int64)
    seeds[0] = 0
    return comps, seeds


def _check(device, values, row_offsets, batch_size, comps, seeds, **kw):
    out, lens = cross(values, row_offsets, batch_size, comps, seeds, **kw)
    exp_out, exp_lens = _oracle(values.cpu(), row_offsets.cpu(), batch_size, comps, seeds)
    assert out.dtype == lens.dtype == torch.int64
    assert out.device == lens.device == values.device
    assert lens.shape == (comps.shape[0] * batch_size,)
    assert lens.tolist() == exp_lens
    assert out.tolist() == exp_out
    return out, lens


@pytest.mark.parametrize("ncomp", [2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 7])
def test_matches_xxhash_oracle(backend, device, ncomp, batch_size):
    gen = torch.Generator().manual_seed(10 * ncomp + batch_size)
    values, row_offsets = _batch(gen, 5, batch_size, 3, device)
    comps, seeds = _crosses(gen, 5, [ncomp] * 3)
    _check(device, values, row_offsets, batch_size, comps, seeds)


def test_mixed_component_counts_ragged_rows(backend, device):
    gen = torch.Generator().manual_seed(5)
    values, row_offsets = _batch(gen, 6, 23, 4, device)  # lengths 0..4: many empty rows
    comps, seeds = _crosses(gen, 6, [2, 4, 3, 2, 4])
    _, lens = _check(device, values, row_offsets, 23, comps, seeds)
    assert (lens == 0).any() and lens.sum() > 512  # empty rows and several kernel tiles


def test_enumeration_order_last_component_fastest(backend, device):
    # F=3, B=2. Row 0: f0=[1, 2], f1=[10, 20, 30], f2=[7]; row 1: f0=[3], f1=[], f2=[8, 9].
    values = torch.tensor([1, 2, 3, 10, 20, 30, 7, 8, 9], device=device)
    row_offsets = torch.tensor([0, 2, 3, 6, 6, 7, 9], device=device)
    comps = torch.tensor([[0, 1, -1, -1], [2, 0, -1, -1], [0, 2, 1, -1]])
    seeds = torch.tensor([11, 12, 13])
    out, lens = cross(values, row_offsets, 2, comps, seeds)
    assert lens.tolist() == [6, 0, 2, 2, 6, 0]
    expected = [_pair(a, b, 11) for a in (1, 2) for b in (10, 20, 30)]
    expected += [_pair(7, a, 12) for a in (1, 2)] + [_pair(b, 3, 12) for b in (8, 9)]
    expected += [_pair(_pair(a, 7, 13), b, 13) for a in (1, 2) for b in (10, 20, 30)]
    assert out.tolist() == expected


def test_large_and_negative_ids_and_seeds(backend, device):
    ids = EDGE_IDS + [-2, 2**62]
    values = torch.tensor(ids + ids[::-1], device=device)
    row_offsets = torch.tensor([0, len(ids), 2 * len(ids)], device=device)
    comps = torch.tensor([[0, 1, -1, -1], [1, 0, -1, -1], [0, 1, -1, -1]])
    seeds = torch.tensor([-1, 2**63 - 1, -(2**63)])
    _check(device, values, row_offsets, 1, comps, seeds)


def test_row_offsets_into_a_larger_buffer(backend, device):
    # Rows need not start at 0 nor cover the whole buffer; components may be 2 or 3 wide.
    values = torch.arange(100, 120, device=device)
    row_offsets = torch.tensor([3, 5, 5, 8, 9, 12, 12], device=device)  # F=3, B=2
    for comps in (torch.tensor([[0, 1], [2, 1]]), torch.tensor([[0, 1, 2], [2, 0, -1]])):
        _check(device, values, row_offsets, 2, comps, torch.tensor([4, 5]))


def test_non_contiguous_values(backend, device):
    gen = torch.Generator().manual_seed(8)
    values, row_offsets = _batch(gen, 3, 9, 3, device)
    strided = torch.stack([values, -values], dim=1).reshape(-1)[::2]
    comps, seeds = _crosses(gen, 3, [2, 3])
    _check(device, strided, row_offsets, 9, comps, seeds)


def test_batch_size_zero(backend, device):
    values = torch.zeros(0, dtype=torch.int64, device=device)
    row_offsets = torch.zeros(1, dtype=torch.int64, device=device)
    comps = torch.tensor([[0, 2, -1, -1]])
    for kw in ({}, {"num_features": 3}):
        out, lens = cross(values, row_offsets, 0, comps, torch.tensor([1]), **kw)
        assert out.shape == (0,) and lens.shape == (0,)
    with pytest.raises(ValueError, match=r"feature 2, out of range \[0, 2\)"):
        cross(values, row_offsets, 0, comps, torch.tensor([1]), num_features=2)


def test_no_crosses(backend, device):
    gen = torch.Generator().manual_seed(2)
    values, row_offsets = _batch(gen, 2, 4, 2, device)
    comps = torch.zeros((0, 4), dtype=torch.int64)
    out, lens = cross(values, row_offsets, 4, comps, torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0,) and lens.shape == (0,)


def test_all_rows_empty(backend, device):
    values = torch.zeros(0, dtype=torch.int64, device=device)
    row_offsets = torch.zeros(2 * 5 + 1, dtype=torch.int64, device=device)
    out, lens = cross(values, row_offsets, 5, torch.tensor([[0, 1, -1, -1]]), torch.tensor([0]))
    assert out.shape == (0,) and lens.tolist() == [0] * 5


def test_one_launch(backend, device):
    gen = torch.Generator().manual_seed(4)
    values, row_offsets = _batch(gen, 4, 31, 3, device)
    comps, seeds = _crosses(gen, 4, [2, 3, 4, 2])
    with kernels.count_launches() as launches:
        cross(values, row_offsets, 31, comps, seeds)
    assert dict(launches) == {"cross" if backend == "triton" else "cross_reference": 1}


def test_triton_matches_torch_bit_for_bit(device):
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    gen = torch.Generator().manual_seed(9)
    for batch_size, max_len in ((1, 5), (17, 3), (64, 2)):
        values, row_offsets = _batch(gen, 7, batch_size, max_len, device)
        comps, seeds = _crosses(gen, 7, [2, 3, 4, 2, 3, 4])
        with kernels.use_backend("triton"):
            got = cross(values, row_offsets, batch_size, comps, seeds)
        with kernels.use_backend("torch"):
            ref = cross(values, row_offsets, batch_size, comps, seeds)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_reference_in_small_chunks(device, monkeypatch):
    # The reference walks items in chunks; chunk edges must not change a thing.
    gen = torch.Generator().manual_seed(6)
    values, row_offsets = _batch(gen, 4, 13, 3, device)
    comps, seeds = _crosses(gen, 4, [2, 4, 3])
    # The reference takes its tables on the values' device (cross() moves them there).
    c_dev, s_dev = comps.to(device), seeds.to(device)
    whole = cross_reference(values, row_offsets, 13, c_dev, s_dev)
    monkeypatch.setattr(cross_module, "_REF_CHUNK_CPU", 7)
    monkeypatch.setattr(cross_module, "_REF_CHUNK", 7)
    chunked = cross_reference(values, row_offsets, 13, c_dev, s_dev)
    assert whole[0].numel() > 7 * 5
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    exp_out, _ = _oracle(values.cpu(), row_offsets.cpu(), 13, comps, seeds)
    assert chunked[0].tolist() == exp_out


def test_cross_reference_direct(device):
    values = torch.tensor([1, 2, 3], device=device)
    row_offsets = torch.tensor([0, 1, 3], device=device)
    comps = torch.tensor([[1, 0, -1, -1]], device=device)
    out, lens = cross_reference(values, row_offsets, 1, comps, torch.tensor([5], device=device))
    assert lens.tolist() == [2]
    assert out.tolist() == [_pair(2, 1, 5), _pair(3, 1, 5)]


def test_xxh64_pair_reference_matches_xxhash(device):
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(-(2**63), 2**63 - 1, (300,), generator=gen, dtype=torch.int64)
    b = torch.randint(-(2**63), 2**63 - 1, (300,), generator=gen, dtype=torch.int64)
    a[: len(EDGE_IDS)] = torch.tensor(EDGE_IDS)
    b[: len(EDGE_IDS)] = torch.tensor(EDGE_IDS[::-1])
    for seed in (0, 1, 2**64 - 1, -1, 2**63, 0x9E3779B97F4A7C15):
        h = xxh64_pair_reference(a.to(device), b.to(device), seed)
        assert h.dtype == torch.int64 and h.shape == a.shape
        pairs = zip(a.tolist(), b.tolist(), strict=True)
        assert h.tolist() == [_pair(x, y, seed) for x, y in pairs]
    assert xxh64_pair_reference(a[:0], b[:0], 3).shape == (0,)
    # Narrower integer ids hash as their int64 value.
    small = torch.tensor([-5, 0, 7], dtype=torch.int32, device=device)
    got = xxh64_pair_reference(small, small.to(torch.uint8), 9).tolist()
    assert got == [_pair(-5, 251, 9), _pair(0, 0, 9), _pair(7, 7, 9)]


def test_xxh64_pair_reference_errors():
    a = torch.tensor([1])
    with pytest.raises(TypeError, match="b must be an integer tensor, got torch.float32"):
        xxh64_pair_reference(a, a.to(torch.float32), 0)
    with pytest.raises(TypeError, match="a must be an integer tensor, got list"):
        xxh64_pair_reference([1], a, 0)
    with pytest.raises(TypeError, match="seed must be an int"):
        xxh64_pair_reference(a, a, 1.5)
    with pytest.raises(ValueError, match="seed must be an int >= -9223372036854775808 and <= "):
        xxh64_pair_reference(a, a, 2**64)


def _ok():
    """A valid F=3, B=2 input for the error tests."""
    values = torch.arange(6)
    row_offsets = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    return values, row_offsets, 2, torch.tensor([[0, 1, -1, -1]]), torch.tensor([0])


@pytest.mark.parametrize(
    ("comps", "match"),
    [
        ([[0, 3, -1, -1]], r"components\[0\] = \[0, 3, -1, -1\] names feature 3, out of range"),
        ([[0, -2, -1, -1]], "names feature -2, out of range"),
        ([[0, 1, 1, -1]], "crosses feature 1 with itself"),
        ([[2, 2, -1, -1]], "crosses feature 2 with itself"),
        ([[0, 1, -1, -1], [1, -1, -1, -1]], r"components\[1\].*uses 1 feature\(s\)"),
        ([[-1, -1, -1, -1]], "uses 0 feature"),
        ([[0, -1, 1, -1]], r"unused slots \(-1\) must come after"),
        ([[0, 1, 2, 0, 1]], r"must have shape \[C, 4\]"),
        ([[0], [1]], r"must have shape \[C, 4\]"),
    ],
)
def test_component_errors(backend, comps, match):
    values, row_offsets, batch_size, _, _ = _ok()
    comps = torch.tensor(comps)
    with pytest.raises(ValueError, match=match):
        cross(values, row_offsets, batch_size, comps, torch.zeros(len(comps), dtype=torch.int64))


def test_input_errors(backend):
    values, row_offsets, batch_size, comps, seeds = _ok()
    with pytest.raises(TypeError, match="values must be torch.int64"):
        cross(values.to(torch.int32), row_offsets, batch_size, comps, seeds)
    with pytest.raises(TypeError, match="row_offsets must be a torch.Tensor"):
        cross(values, row_offsets.tolist(), batch_size, comps, seeds)
    with pytest.raises(ValueError, match="components must be 2-D"):
        cross(values, row_offsets, batch_size, comps[0], seeds)
    with pytest.raises(ValueError, match="seeds has 2 entries but components has 1"):
        cross(values, row_offsets, batch_size, comps, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="batch_size must be an int"):
        cross(values, row_offsets, True, comps, seeds)
    with pytest.raises(ValueError, match="batch_size must be an int >= 0"):
        cross(values, row_offsets, -1, comps, seeds)
    with pytest.raises(ValueError, match=r"7 entries, which is not F \* B \+ 1 for batch_size=4"):
        cross(values, row_offsets, 4, comps, seeds)
    with pytest.raises(ValueError, match="num_features=2 and batch_size=2 need"):
        cross(values, row_offsets, batch_size, comps, seeds, num_features=2)
    with pytest.raises(ValueError, match="batch_size is 0 but row_offsets has 7 entries"):
        cross(values, row_offsets, 0, comps, seeds)
    with pytest.raises(ValueError, match="row_offsets must have F"):
        cross(values, row_offsets[:0], batch_size, comps, seeds)
    with pytest.raises(ValueError, match="row_offsets is on meta"):
        cross(values, row_offsets.to("meta"), batch_size, comps, seeds)
    with pytest.raises(ValueError, match="components is on meta"):
        cross(values, row_offsets, batch_size, comps.to("meta"), seeds)


@pytest.mark.parametrize(
    "row_offsets",
    [[0, 1, 2, 3, 4, 5, 7], [0, 2, 1, 3, 4, 5, 6], [-1, 1, 2, 3, 4, 5, 6]],
    ids=["past_end", "decreasing", "negative"],
)
def test_bad_row_offsets(backend, device, row_offsets):
    values, _, batch_size, comps, seeds = _ok()
    with pytest.raises(ValueError, match="row_offsets must be non-decreasing within"):
        cross(values.to(device), torch.tensor(row_offsets, device=device), 2, comps, seeds)


@pytest.mark.gpu
def test_gpu_large_batch_cpu_config(backend):
    gen = torch.Generator().manual_seed(12)
    values, row_offsets = _batch(gen, 8, 4096, 3, "cuda")
    comps, seeds = _crosses(gen, 8, [2, 3, 4, 2] * 5)  # CPU config, CUDA data
    out, lens = cross(values, row_offsets, 4096, comps, seeds)
    with kernels.use_backend("torch"):
        ref = cross(values, row_offsets, 4096, comps, seeds)
    assert torch.equal(out, ref[0]) and torch.equal(lens, ref[1])
    exp_out, exp_lens = _oracle(values.cpu(), row_offsets.cpu(), 4096, comps[:2], seeds[:2])
    assert lens[: 2 * 4096].tolist() == exp_lens
    assert out[: len(exp_out)].tolist() == exp_out


@pytest.mark.parametrize("batch_size", [0, 1, 9])
def test_cross_checked_with_repeated_components(backend, device, batch_size):
    # The engine's path: tables checked once, a component may repeat (a feature computed
    # once for two identical names), and each cross's item count comes back too.
    from recstack.feature_engine.kernels.cross import cross_checked, cross_tables

    gen = torch.Generator().manual_seed(11 + batch_size)
    values, row_offsets = _batch(gen, 5, batch_size, 4, device)
    comps = [[0, 1], [2, 2], [3, 0, 4], [1, 1, 2, 3]]
    seeds = [0, 7, 2**64 - 1, -5]
    tables = cross_tables(comps, seeds, device)
    out, lens, counts = cross_checked(values, row_offsets, batch_size, tables, 5)
    padded = torch.tensor([c + [-1] * (4 - len(c)) for c in comps])
    exp_out, exp_lens = _oracle(
        values.cpu(),
        row_offsets.cpu(),
        batch_size,
        padded,
        torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds]),
    )
    assert out.cpu().tolist() == exp_out and lens.cpu().tolist() == exp_lens
    per = [sum(exp_lens[c * batch_size : (c + 1) * batch_size]) for c in range(len(comps))]
    assert counts == per
    with pytest.raises(ValueError, match="out of range"):
        cross_checked(values, row_offsets, batch_size, tables, 4)
    with pytest.raises(ValueError, match="2 to 4"):
        cross_tables([[0]], [0], device)


def test_cross_checked_overflow_is_an_error(backend, device):
    from recstack.feature_engine.kernels.cross import cross_checked, cross_tables

    values = torch.zeros(4, dtype=torch.int64, device=device)
    row_offsets = torch.tensor([0, 2**40], device=device)  # one row of 2**40 ids (not read)
    tables = cross_tables([[0, 0]], [0], device)
    with pytest.raises(ValueError, match="cross:"):
        cross_checked(values, row_offsets, 1, tables, 1)
