"""Kernel-level tests for kernels/hash.py: Triton kernels vs torch references vs ``xxhash``."""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
import xxhash

from recstack.core import kernels
from recstack.core.kernels import hash as hk

M64 = (1 << 64) - 1


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _xxh64_ids(ids: list[int], seed: int) -> list[int]:
    return [_s64(xxhash.xxh64_intdigest(v.to_bytes(8, "little", signed=True), seed)) for v in ids]


def _fmix64_py(k: int) -> int:
    k &= M64
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & M64
    k ^= k >> 33
    return _s64(k)


def _random_ids(n: int) -> list[int]:
    return [random.randint(-(2**63), 2**63 - 1) for _ in range(n)]


def _pack(strings: list[bytes], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor(list(b"".join(strings)), dtype=torch.uint8, device=device)
    lengths = torch.tensor([len(s) for s in strings], dtype=torch.int64)
    offsets = torch.zeros(len(strings) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return values, offsets.to(device)


# Sizes: empty, one, and not multiples of the 1024-id / 64-string blocks.
@pytest.mark.parametrize("n", [0, 1, 1023, 1025, 2500])
@pytest.mark.parametrize("seed", [0, 2**64 - 1, 0x9E3779B97F4A7C15])
def test_xxh64_int_matches_xxhash(backend, device, n, seed):
    ids = _random_ids(n)
    if n > 8:
        ids[:4] = [0, -1, 2**63 - 1, -(2**63)]
    x = torch.tensor(ids, dtype=torch.int64, device=device)
    out = hk.xxh64_int(x, seed)
    assert out.dtype == torch.int64 and out.device == x.device and out.shape == x.shape
    assert out.cpu().tolist() == _xxh64_ids(ids, seed)


@pytest.mark.parametrize("n", [0, 1, 1023, 2049])
def test_fmix64_matches_python(backend, device, n):
    ids = _random_ids(n)
    x = torch.tensor(ids, dtype=torch.int64, device=device)
    out = hk.fmix64(x)
    assert out.shape == x.shape and out.dtype == torch.int64
    assert out.cpu().tolist() == [_fmix64_py(v) for v in ids]


@pytest.mark.parametrize("world_size", [1, 3, 8, 1000, 2**31 - 1])
def test_shard_owner_matches_formula(backend, device, world_size):
    seed = 0x0123456789ABCDEF
    ids = _random_ids(1500) + [0, -1, 2**63 - 1, -(2**63)]
    out = hk.shard_owner(torch.tensor(ids, device=device), seed, world_size).cpu().tolist()
    expected = [((h & M64) >> 32) * world_size >> 32 for h in _xxh64_ids(ids, seed)]
    assert out == expected


def _strings() -> list[bytes]:
    # Every length class of the spec: empty, bytes only, a 4-byte lane, 8-byte lanes, exact
    # stripes and stripes plus every kind of tail; plus random lengths in 0..200.
    fixed = [0, 1, 3, 4, 5, 7, 8, 11, 12, 15, 31, 32, 33, 36, 39, 40, 63, 64, 65, 100, 127, 128]
    lengths = fixed + [random.randint(0, 200) for _ in range(100)]
    random.shuffle(lengths)
    return [os.urandom(n) for n in lengths]


@pytest.mark.parametrize("seed", [0, 2**64 - 1, 123456789])
def test_xxh64_bytes_matches_xxhash(backend, device, seed):
    strings = _strings()
    values, offsets = _pack(strings, device)
    out = hk.xxh64_bytes(values, offsets, seed)
    assert out.dtype == torch.int64 and out.device == offsets.device
    assert out.cpu().tolist() == [_s64(xxhash.xxh64_intdigest(s, seed)) for s in strings]


def test_xxh64_bytes_short_and_long_mixed(backend, device):
    # One long string keeps its block looping for 150+ stripes while its neighbours idle.
    strings = [os.urandom(random.randint(0, 9)) for _ in range(70)]
    strings[5] = os.urandom(5000)
    strings[66] = os.urandom(4099)
    values, offsets = _pack(strings, device)
    out = hk.xxh64_bytes(values, offsets, 7).cpu().tolist()
    assert out == [_s64(xxhash.xxh64_intdigest(s, 7)) for s in strings]


def test_xxh64_bytes_unaligned_and_offset_start(backend, device):
    # Offsets need not start at 0 and rows start at odd byte positions.
    blob = os.urandom(301)
    values = torch.tensor(list(blob), dtype=torch.uint8, device=device)
    cuts = [3, 3, 4, 41, 42, 75, 140, 141, 299]
    offsets = torch.tensor(cuts, dtype=torch.int64, device=device)
    out = hk.xxh64_bytes(values, offsets, 0).cpu().tolist()
    expected = [
        _s64(xxhash.xxh64_intdigest(blob[a:b])) for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    assert out == expected


@pytest.mark.parametrize("shift", [1, 3, 5, 7])
def test_xxh64_bytes_misaligned_buffer(backend, device, shift):
    # A values view whose data pointer is not 8-byte aligned, with rows running to the very
    # last byte of the storage: word-wise reads must not shift or overrun.
    blob = os.urandom(shift + 257)
    storage = torch.tensor(list(blob), dtype=torch.uint8, device=device)
    values = storage[shift:]
    assert values.data_ptr() % 8 != 0  # allocations are aligned, so the view is not
    body = blob[shift:]
    cuts = [0, 1, 9, 40, 41, 77, 120, 200, 257]
    offsets = torch.tensor(cuts, dtype=torch.int64, device=device)
    out = hk.xxh64_bytes(values, offsets, 11).cpu().tolist()
    expected = [
        _s64(xxhash.xxh64_intdigest(body[a:b], 11))
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    assert out == expected


def test_xxh64_bytes_empty_batch_and_all_empty_rows(backend, device):
    values = torch.empty(0, dtype=torch.uint8, device=device)
    out = hk.xxh64_bytes(values, torch.zeros(1, dtype=torch.int64, device=device), 0)
    assert out.shape == (0,) and out.dtype == torch.int64
    out = hk.xxh64_bytes(values, torch.zeros(3, dtype=torch.int64, device=device), 5)
    assert out.cpu().tolist() == [_s64(xxhash.xxh64_intdigest(b"", 5))] * 2


def test_triton_and_reference_bit_identical(device):
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    ids = torch.tensor(_random_ids(3000), device=device)
    strings = _strings()
    values, offsets = _pack(strings, device)
    results = {}
    for name in ("torch", "triton"):
        with kernels.use_backend(name):
            results[name] = (
                hk.xxh64_int(ids, 99),
                hk.fmix64(ids),
                hk.shard_owner(ids, 99, 13),
                hk.xxh64_bytes(values, offsets, 99),
            )
    for a, b in zip(results["torch"], results["triton"], strict=True):
        assert torch.equal(a, b)


def test_one_launch_per_call(backend, device):
    ids = torch.arange(5000, device=device)
    values, offsets = _pack([b"abc", b"d" * 40], device)
    with kernels.count_launches() as launches:
        hk.xxh64_int(ids, 1)
        hk.fmix64(ids)
        hk.xxh64_bytes(values, offsets, 1)
    assert sum(launches.values()) == 3


def test_launcher_errors(device):
    with pytest.raises(TypeError, match="x must be int64"):
        hk.xxh64_int(torch.zeros(3, dtype=torch.int32, device=device), 0)
    with pytest.raises(TypeError, match="x must be int64"):
        hk.fmix64(torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="seed"):
        hk.xxh64_int(torch.zeros(3, dtype=torch.int64, device=device), -1)
    with pytest.raises(ValueError, match="world_size"):
        hk.shard_owner(torch.zeros(3, dtype=torch.int64, device=device), 0, 0)
    values = torch.zeros(4, dtype=torch.uint8, device=device)
    with pytest.raises(TypeError, match="uint8"):
        hk.xxh64_bytes(values.to(torch.int32), torch.tensor([0, 4], device=device), 0)
    with pytest.raises(TypeError, match="offsets must be int64"):
        hk.xxh64_bytes(values, torch.tensor([0, 4], dtype=torch.int32, device=device), 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        hk.xxh64_bytes(values, torch.tensor([0, 3, 2], device=device), 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        hk.xxh64_bytes(values, torch.tensor([0, 5], device=device), 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        hk.xxh64_bytes(values, torch.tensor([-1, 2], device=device), 0)
    with pytest.raises(ValueError, match="B \\+ 1"):
        hk.xxh64_bytes(values, torch.empty(0, dtype=torch.int64, device=device), 0)


@pytest.mark.parametrize("rows", [0, 1, 5, 70])
def test_xxh64_bytes_per_row_seeds(backend, device, rows):
    rng = random.Random(rows)
    strings = [
        bytes(rng.randrange(256) for _ in range(rng.choice([0, 3, 8, 31, 32, 77])))
        for _ in range(rows)
    ]
    seeds_py = [rng.choice([0, 7, 2**63 + 5, 2**64 - 1]) for _ in range(rows)]
    values = torch.tensor(list(b"".join(strings)), dtype=torch.uint8, device=device)
    offsets = torch.tensor([0, *itertools.accumulate(len(s) for s in strings)], device=device)
    seeds = torch.tensor(
        [s - 2**64 if s >= 2**63 else s for s in seeds_py], dtype=torch.int64, device=device
    )
    with kernels.count_launches() as launches:
        got = hk.xxh64_bytes(values, offsets, seeds=seeds).cpu().tolist()
    want = [xxhash.xxh64_intdigest(s, seed) for s, seed in zip(strings, seeds_py, strict=True)]
    assert [g & (2**64 - 1) for g in got] == want
    assert sum(launches.values()) <= 1
    with pytest.raises(ValueError, match="seeds must be"):
        hk.xxh64_bytes(
            values, offsets, seeds=seeds[:0] if rows else torch.zeros(1, dtype=torch.int64)
        )
