"""hash64 (XXH64) and mix64 (fmix64) against independent implementations."""

from __future__ import annotations

import os
import random

import pytest
import torch
import xxhash

from recstack.core import kernels
from recstack.core.hashing import hash64, mix64
from recstack.core.jagged import JaggedTensor

M64 = (1 << 64) - 1
SEEDS = [0, 1, 42, 2**63, 2**64 - 1]


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _xxh64_id(v: int, seed: int) -> int:
    return _s64(xxhash.xxh64_intdigest(int(v).to_bytes(8, "little", signed=True), seed))


def _strings_jagged(strings: list[str | bytes], device: torch.device) -> JaggedTensor:
    raw = [s.encode("utf-8") if isinstance(s, str) else s for s in strings]
    values = torch.tensor(list(b"".join(raw)), dtype=torch.uint8, device=device)
    offsets = torch.zeros(len(raw) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(r) for r in raw], dtype=torch.int64), 0)
    return JaggedTensor(values, offsets.to(device))


# --- MurmurHash3 fmix64, written from the published constants --------------------------


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M64


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & M64
    return k ^ (k >> 33)


def _murmur3_x64_128(data: bytes, seed: int = 0) -> tuple[int, int]:
    """MurmurHash3_x64_128 (Austin Appleby's reference), built on ``_fmix64`` above."""
    c1, c2 = 0x87C37B91114253D5, 0x4CF5AD432745937F
    h1 = h2 = seed
    nblocks = len(data) // 16
    for i in range(nblocks):
        k1 = int.from_bytes(data[16 * i : 16 * i + 8], "little")
        k2 = int.from_bytes(data[16 * i + 8 : 16 * i + 16], "little")
        k1 = (_rotl((k1 * c1) & M64, 31) * c2) & M64
        h1 ^= k1
        h1 = (_rotl(h1, 27) + h2) & M64
        h1 = (h1 * 5 + 0x52DCE729) & M64
        k2 = (_rotl((k2 * c2) & M64, 33) * c1) & M64
        h2 ^= k2
        h2 = (_rotl(h2, 31) + h1) & M64
        h2 = (h2 * 5 + 0x38495AB5) & M64
    tail = data[16 * nblocks :]
    if len(tail) > 8:
        k2 = int.from_bytes(tail[8:], "little")
        h2 ^= (_rotl((k2 * c2) & M64, 33) * c1) & M64
    if tail:
        k1 = int.from_bytes(tail[:8], "little")
        h1 ^= (_rotl((k1 * c1) & M64, 31) * c2) & M64
    h1 ^= len(data)
    h2 ^= len(data)
    h1 = (h1 + h2) & M64
    h2 = (h2 + h1) & M64
    h1, h2 = _fmix64(h1), _fmix64(h2)
    h1 = (h1 + h2) & M64
    h2 = (h2 + h1) & M64
    return h1, h2


def test_python_fmix64_reproduces_published_murmur3_vectors():
    # mmh3's documented outputs: mmh3.hash64("foo") and mmh3.hash64("foo", 42) (x64_128).
    assert tuple(_s64(h) for h in _murmur3_x64_128(b"foo")) == (
        -2129773440516405919,
        9128664383759220103,
    )
    assert tuple(_s64(h) for h in _murmur3_x64_128(b"foo", 42)) == (
        -840311307571801102,
        -6739155424061121879,
    )
    h1, h2 = _murmur3_x64_128(b"foo", 42)
    assert (h2 << 64) | h1 == 215966891540331383248189432718888555506  # mmh3.hash128("foo", 42)


def test_mix64_matches_fmix64(backend, device):
    ids = [0, 1, -1, 2**63 - 1, -(2**63)] + [
        random.randint(-(2**63), 2**63 - 1) for _ in range(2000)
    ]
    out = mix64(torch.tensor(ids, device=device))
    assert out.dtype == torch.int64
    assert out.cpu().tolist() == [_s64(_fmix64(v & M64)) for v in ids]
    assert out[0].item() == 0  # fmix64 fixes 0


def test_mix64_is_a_bijection_on_samples(backend, device):
    x = torch.unique(torch.randint(-(2**63), 2**63 - 1, (20000,), device=device))
    x = torch.cat([x, torch.arange(-2000, 2000, device=device)]).unique()
    assert mix64(x).unique().numel() == x.numel()


# --- hash64 on integer ids ---------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_hash64_ids_match_xxhash(backend, device, seed):
    ids = [0, -1, 1, 2**63 - 1, -(2**63)] + [
        random.randint(-(2**63), 2**63 - 1) for _ in range(1500)
    ]
    out = hash64(torch.tensor(ids, device=device), seed=seed)
    assert out.dtype == torch.int64 and out.device.type == device.type
    assert out.cpu().tolist() == [_xxh64_id(v, seed) for v in ids]


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.uint16, torch.uint32]
)
def test_hash64_any_int_dtype_hashes_its_int64_value(backend, device, dtype):
    info = torch.iinfo(dtype)
    ids = sorted({info.min, info.max, 0, 1, info.max // 3, info.min // 2})
    x = torch.tensor(ids, dtype=dtype, device=device)
    assert hash64(x, seed=5).cpu().tolist() == [_xxh64_id(v, 5) for v in ids]


def test_hash64_uint64_hashes_its_bytes(backend, device):
    if not hasattr(torch, "uint64"):
        pytest.skip("torch without uint64")
    x = torch.tensor([0, 2**63, 2**64 - 1], dtype=torch.uint64, device=device)
    expected = [
        _s64(xxhash.xxh64_intdigest(v.to_bytes(8, "little"), 3)) for v in (0, 2**63, 2**64 - 1)
    ]
    assert hash64(x, seed=3).cpu().tolist() == expected


def test_hash64_keeps_shape_and_handles_empty_and_strided(backend, device):
    x = torch.randint(-(2**40), 2**40, (3, 5, 7), device=device)
    out = hash64(x, seed=9)
    assert out.shape == x.shape
    assert torch.equal(out.flatten(), hash64(x.flatten(), seed=9))
    strided = x.transpose(0, 2)
    assert torch.equal(hash64(strided, seed=9), out.transpose(0, 2))
    assert hash64(torch.empty(0, dtype=torch.int64, device=device)).shape == (0,)
    assert hash64(torch.tensor(7, device=device)).item() == _xxh64_id(7, 0)


def test_hash64_distinct_ids_never_collide(backend, device):
    # XXH64 of an 8-byte input is a bijection for a fixed seed: distinct ids, distinct hashes.
    random_ids = torch.randint(-(2**63), 2**63 - 1, (30000,), device=device)
    x = torch.cat([torch.arange(-10000, 10000, device=device), random_ids]).unique()
    for seed in (0, 2**64 - 1):
        assert hash64(x, seed=seed).unique().numel() == x.numel()


def test_hash64_pinned_values(backend, device):
    # Frozen: XXH64("") = 0xEF46DB3751D8E999 and XXH64("abc") = 0x44BC2CF5AD770999 are the
    # published xxHash64 values; the ids' values were computed once and must never change.
    strings = hash64(_strings_jagged(["", "abc"], device)).cpu().tolist()
    assert [h & M64 for h in strings] == [0xEF46DB3751D8E999, 0x44BC2CF5AD770999]
    ids = hash64(torch.tensor([0, 1], device=device)).cpu().tolist()
    assert [h & M64 for h in ids] == [0x34C96ACDCADB1BBB, 0x9F29CB17A2A49995]


def test_hash64_seeds_differ(device):
    x = torch.arange(100, device=device)
    assert not torch.equal(hash64(x, seed=0), hash64(x, seed=1))


# --- hash64 on strings --------------------------------------------------------------------


def _random_text(n: int) -> str:
    alphabet = "abcxyz019 _-éüß中文日本語🙂🚀Ωж"
    return "".join(random.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("seed", [0, 2**64 - 1, 77])
def test_hash64_strings_match_xxhash(backend, device, seed):
    lengths = [0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 100]
    strings: list[str | bytes] = [os.urandom(n) for n in lengths]
    strings += [os.urandom(random.randint(0, 200)) for _ in range(40)]
    strings += ["", "a", "hello", "naïve café", "中文字符串", "emoji 🙂🚀", _random_text(50)]
    random.shuffle(strings)
    out = hash64(_strings_jagged(strings, device), seed=seed)
    raw = [s.encode("utf-8") if isinstance(s, str) else s for s in strings]
    assert out.dtype == torch.int64 and out.shape == (len(strings),)
    assert out.cpu().tolist() == [_s64(xxhash.xxh64_intdigest(r, seed)) for r in raw]


def test_hash64_strings_empty_batch(backend, device):
    out = hash64(_strings_jagged([], device))
    assert out.shape == (0,) and out.dtype == torch.int64


def test_hash64_strings_short_and_long(backend, device):
    strings: list[str | bytes] = ["", "x", "yz", os.urandom(5000), "abcd", os.urandom(3)]
    out = hash64(_strings_jagged(strings, device), seed=11).cpu().tolist()
    raw = [s.encode() if isinstance(s, str) else s for s in strings]
    assert out == [_s64(xxhash.xxh64_intdigest(r, 11)) for r in raw]


def test_hash64_backends_bit_identical(device):
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("Triton cannot run here")
    ids = torch.randint(-(2**63), 2**63 - 1, (3000,), device=device)
    strings = _strings_jagged([_random_text(random.randint(0, 90)) for _ in range(150)], device)
    got = {}
    for name in ("torch", "triton"):
        with kernels.use_backend(name):
            got[name] = (hash64(ids, seed=2**64 - 1), mix64(ids), hash64(strings, seed=3))
    for a, b in zip(got["torch"], got["triton"], strict=True):
        assert torch.equal(a, b)


# --- errors -------------------------------------------------------------------------------


def test_hash64_rejects_floats_and_bools(device):
    with pytest.raises(TypeError, match="integer dtype"):
        hash64(torch.zeros(3, device=device))
    with pytest.raises(TypeError, match="integer dtype"):
        hash64(torch.zeros(3, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="integer dtype"):
        mix64(torch.zeros(3, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="torch.Tensor"):
        hash64([1, 2, 3])  # type: ignore[arg-type]


def test_hash64_rejects_non_uint8_string_values(device):
    jt = JaggedTensor(
        torch.zeros(4, dtype=torch.int64, device=device), torch.tensor([0, 4], device=device)
    )
    with pytest.raises(TypeError, match="must be uint8"):
        hash64(jt)


@pytest.mark.parametrize("seed", [-1, 2**64, -(2**63)])
def test_hash64_rejects_out_of_range_seed(device, seed):
    with pytest.raises(ValueError, match="seed"):
        hash64(torch.arange(3, device=device), seed=seed)
    with pytest.raises(ValueError, match="seed"):
        hash64(_strings_jagged(["a"], device), seed=seed)


@pytest.mark.parametrize("seed", [1.0, "1", None, True])
def test_hash64_rejects_non_int_seed(device, seed):
    with pytest.raises(TypeError, match="seed"):
        hash64(torch.arange(3, device=device), seed=seed)  # type: ignore[arg-type]


def test_hash64_strings_unchecked_offsets_same_result(backend, device):
    strings = JaggedTensor.from_strings(["", "a", "recstack", "x" * 70, "ü"]).to(device)
    checked = hash64(strings, seed=9)
    unchecked = hash64(strings, seed=9, check_offsets=False)
    assert torch.equal(checked, unchecked)
