"""sparse_program: Triton vs torch reference vs a plain-Python oracle (xxhash, bisect)."""

from __future__ import annotations

import bisect
import random

import pytest
import torch
import xxhash
from feature_testdata import I64_MAX, I64_MIN, M64, offsets_of, on_both_backends, s64, with_arg

from recstack.core import hash64, kernels
from recstack.feature_engine.kernels import sparse_program as sparse_module
from recstack.feature_engine.kernels.sparse_program import (
    OP_BUCKETIZE,
    OP_HASH,
    OP_MOD,
    OP_NOP,
    OP_UMOD,
    compile_sparse_program,
    sparse_program,
)

EXTREMES = [I64_MAX, -I64_MAX, I64_MIN, -1, 0, 1]


# ----------------------------------------------------------------------------------------
# plain-Python oracle (xxhash for HASH, bisect for BUCKETIZE)
# ----------------------------------------------------------------------------------------


def _oracle(values: list[int], offsets: list[int], program, boundaries: list[int]) -> list[int]:
    out = []
    for f in range(len(offsets) - 1):
        for v in values[offsets[f] : offsets[f + 1]]:
            for code, p0, p1, p2 in program[f]:
                if code == OP_HASH:
                    v = s64(xxhash.xxh64_intdigest((v & M64).to_bytes(8, "little"), p0 & M64))
                elif code == OP_MOD:
                    v = v % p0  # Python's % on a positive modulus == torch.remainder
                elif code == OP_UMOD:
                    v = (v & M64) % p0
                elif code == OP_BUCKETIZE:
                    b = boundaries[p0 : p0 + p1]
                    v = bisect.bisect_right(b, v) if p2 else bisect.bisect_left(b, v)
            out.append(v)
    return out


def _run_sparse(values, lengths, ops_per_feature, device, *, slots=None):
    """Compile, run, and compare with the oracle; return the result tensor."""
    prog, bounds = compile_sparse_program(ops_per_feature, slots=slots)
    x = torch.tensor(values, dtype=torch.int64, device=device)
    off = offsets_of(lengths, device)
    got = sparse_program(x, off, prog.to(device), bounds.to(device))
    assert got.dtype == torch.int64 and got.device == x.device and got.shape == x.shape
    want = _oracle(values, off.tolist(), prog.tolist(), bounds.tolist())
    assert got.cpu().tolist() == want
    return got


def _random_values(rng: random.Random, n: int) -> list[int]:
    vals = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            vals.append(rng.randint(-60, 60))  # lands between bucketize boundaries
        elif r < 0.9:
            vals.append(rng.randint(I64_MIN, I64_MAX))
        else:
            vals.append(rng.choice(EXTREMES))
    return vals


def _random_op(rng: random.Random):
    kind = rng.randrange(6)
    if kind == 0:
        return (OP_NOP,)
    if kind == 1:
        return (OP_HASH, rng.choice([0, 1, M64, rng.randrange(1 << 64)]))
    if kind == 2:
        return (OP_MOD, rng.choice([1, 2, 7, 1000, I64_MAX, rng.randint(1, I64_MAX)]))
    if kind == 3:
        return (
            OP_UMOD,
            rng.choice([1, 3, 1 << 20, (1 << 62) + 1, I64_MAX, rng.randint(1, I64_MAX)]),
        )
    bounds = sorted(rng.randint(-50, 50) for _ in range(rng.randint(1, 12)))
    return (OP_BUCKETIZE, bounds, rng.random() < 0.5)


# ----------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op",
    [
        (OP_HASH, 0),
        (OP_HASH, M64),
        (OP_HASH, 0x9E3779B97F4A7C15),
        (OP_MOD, 1),
        (OP_MOD, 7),
        (OP_MOD, I64_MAX),
        (OP_UMOD, 1),
        (OP_UMOD, 1000),
        (OP_UMOD, (1 << 62) + 1),
        (OP_UMOD, I64_MAX),
        (OP_BUCKETIZE, [-10, 0, 0, 25], False),
        (OP_BUCKETIZE, [-10, 0, 0, 25], True),
        (OP_BUCKETIZE, [I64_MIN, I64_MAX], False),
        (OP_BUCKETIZE, [I64_MIN, I64_MAX], True),
        (OP_NOP,),
    ],
)
def test_each_opcode_alone(backend, device, op):
    rng = random.Random(hash(repr(op)) & 0xFFFF)
    lengths = [0, 1, 37, 0, 300, 5]
    vals = EXTREMES + [-10, 0, 25, 24, 26, -11] + _random_values(rng, sum(lengths) - 12)
    _run_sparse(vals, lengths, [[op]] * len(lengths), device)


@pytest.mark.parametrize(
    "chain",
    [
        [(OP_HASH, 42), (OP_UMOD, 1000), (OP_NOP,)],
        [(OP_BUCKETIZE, [-20, -5, 0, 5, 20], False), (OP_MOD, 3)],
        [(OP_MOD, 100), (OP_BUCKETIZE, [10, 50, 90], True)],
        [(OP_HASH, 1), (OP_HASH, 2), (OP_UMOD, 97)],
        [(OP_NOP,), (OP_NOP,), (OP_UMOD, 5), (OP_MOD, 3)],
        [(OP_UMOD, 7), (OP_HASH, M64), (OP_MOD, (1 << 62) + 3)],
    ],
)
def test_chains(backend, device, chain):
    rng = random.Random(len(chain))
    lengths = [3, 0, 129, 1]
    _run_sparse(EXTREMES + _random_values(rng, sum(lengths) - 6), lengths, [chain] * 4, device)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_features_with_different_programs(backend, device, seed):
    rng = random.Random(seed)
    num_features = rng.choice([1, 9, 57])
    lengths = [rng.choice([0, 0, 1, 2, 17, 40]) for _ in range(num_features)]
    programs = [[_random_op(rng) for _ in range(rng.randint(0, 4))] for _ in range(num_features)]
    _run_sparse(_random_values(rng, sum(lengths)), lengths, programs, device)


def test_thousands_of_features(backend, device):
    # Deep binary search over value_offsets: mostly empty features, a few with values.
    rng = random.Random(7)
    num_features = 3001
    lengths = [0] * num_features
    for f in rng.sample(range(num_features), 40) + [0, num_features - 1]:
        lengths[f] = rng.randint(1, 9)
    programs = [[(OP_MOD, f + 1)] for f in range(num_features)]
    _run_sparse(_random_values(rng, sum(lengths)), lengths, programs, device)


def test_empty_inputs(backend, device):
    e = torch.empty(0, dtype=torch.int64, device=device)
    # F = 0
    out = sparse_program(e, offsets_of([], device), e.view(0, 2, 4), e)
    assert out.shape == (0,) and out.dtype == torch.int64
    # F > 0, N = 0 (every feature empty), with BUCKETIZE tables present
    prog, bounds = compile_sparse_program([[(OP_HASH, 3)], [(OP_BUCKETIZE, [1, 2])]])
    out = sparse_program(e, offsets_of([0, 0], device), prog.to(device), bounds.to(device))
    assert out.numel() == 0
    # K = 0: a copy, not the same tensor
    x = torch.tensor([5, -5], device=device)
    out = sparse_program(x, offsets_of([2], device), e.view(1, 0, 4), e)
    assert out.tolist() == [5, -5] and out.data_ptr() != x.data_ptr()


def test_length_one_and_ragged(backend, device):
    _run_sparse([I64_MIN], [1], [[(OP_UMOD, 10)]], device)
    _run_sparse([-7], [1], [[(OP_MOD, 10)]], device)
    rng = random.Random(3)
    lengths = [1, 1023, 1, 0, 1025]
    programs = [[(OP_HASH, f), (OP_UMOD, 10 + f)] for f in range(5)]
    _run_sparse(_random_values(rng, sum(lengths)), lengths, programs, device)


def test_input_is_not_modified(backend, device):
    x = torch.tensor([1, 2, 3], device=device)
    prog, bounds = compile_sparse_program([[(OP_HASH, 1), (OP_MOD, 5)]])
    sparse_program(x, offsets_of([3], device), prog.to(device), bounds.to(device))
    assert x.tolist() == [1, 2, 3]


@pytest.mark.parametrize("seed", [0, 1, M64, 0x9E3779B97F4A7C15])
def test_hash_equals_core_hash64(backend, device, seed):
    g = torch.Generator().manual_seed(seed & 0xFFFF)
    x = torch.randint(I64_MIN, I64_MAX, (2500,), generator=g)
    x[: len(EXTREMES)] = torch.tensor(EXTREMES)
    x = x.to(device)
    prog, bounds = compile_sparse_program([[(OP_HASH, seed)]])
    got = sparse_program(x, offsets_of([2500], device), prog.to(device), bounds.to(device))
    assert torch.equal(got, hash64(x, seed))


def test_umod_equals_python_unsigned_mod(backend, device):
    rng = random.Random(11)
    vals = EXTREMES + [rng.randint(I64_MIN, I64_MAX) for _ in range(300)]
    mods = [1, 2, 3, 10, 1 << 32, (1 << 62) - 1, (1 << 62) + 1, I64_MAX - 1, I64_MAX]
    mods += [rng.randint(1, I64_MAX) for _ in range(6)]
    lengths = [len(vals)] * len(mods)
    x = torch.tensor(vals * len(mods), device=device)
    prog, bounds = compile_sparse_program([[(OP_UMOD, m)] for m in mods])
    got = sparse_program(x, offsets_of(lengths, device), prog.to(device), bounds.to(device))
    want = [(v & M64) % m for m in mods for v in vals]
    assert got.cpu().tolist() == want
    # A shared modulus takes the reference's scalar path; per-feature moduli the tensor one.
    prog1, _ = compile_sparse_program([[(OP_UMOD, mods[-1])]] * len(mods))
    got1 = sparse_program(x, offsets_of(lengths, device), prog1.to(device), bounds.to(device))
    assert got1.cpu().tolist() == [(v & M64) % mods[-1] for _ in mods for v in vals]


def test_mod_equals_torch_remainder(backend, device):
    rng = random.Random(5)
    vals = EXTREMES + [rng.randint(I64_MIN, I64_MAX) for _ in range(200)]
    vals += [rng.randint(-100, 100) for _ in range(200)]
    x = torch.tensor(vals, device=device)
    for mods in ([7] * 3, [1, 1000, I64_MAX]):
        lens = [100, 150, len(vals) - 250]
        prog, bounds = compile_sparse_program([[(OP_MOD, m)] for m in mods])
        got = sparse_program(x, offsets_of(lens, device), prog.to(device), bounds.to(device))
        want = torch.cat([torch.remainder(s, m) for s, m in zip(x.split(lens), mods, strict=True)])
        assert torch.equal(got, want)
        assert bool((got >= 0).all())


@pytest.mark.parametrize("right", [False, True])
def test_bucketize_values_on_boundaries(backend, device, right):
    bounds = [-5, 0, 0, 3, 10]
    vals = [-6, -5, -4, -1, 0, 1, 2, 3, 4, 9, 10, 11, I64_MIN, I64_MAX]
    got = _run_sparse(vals, [len(vals)], [[(OP_BUCKETIZE, bounds, right)]], device)
    b = torch.tensor(bounds, device=device)
    assert torch.equal(got, torch.bucketize(torch.tensor(vals, device=device), b, right=right))


def test_bucketize_slices_and_shared_lists(backend, device):
    # Each feature its own list; two features share one list (one slice, deduplicated).
    ops = [
        [(OP_BUCKETIZE, [0], False)],
        [(OP_BUCKETIZE, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], True)],
        [(OP_BUCKETIZE, [0], False)],
        [(OP_BUCKETIZE, [-3, 3], True), (OP_BUCKETIZE, [1], False)],
    ]
    prog, bounds = compile_sparse_program(ops)
    assert bounds.numel() == 1 + 17 + 2 + 1
    rng = random.Random(2)
    _run_sparse([rng.randint(-20, 20) for _ in range(120)], [30] * 4, ops, device)


def test_program_table_changed_in_place_is_revalidated(backend, device):
    x = torch.tensor([10, -3, 7], device=device)
    off = offsets_of([3], device)
    prog, bounds = compile_sparse_program([[(OP_MOD, 4)]])
    prog, bounds = prog.to(device), bounds.to(device)
    assert sparse_program(x, off, prog, bounds).tolist() == [2, 1, 3]
    prog[0, 0] = torch.tensor([OP_UMOD, 4, 0, 0])  # cached slot-op mask must not go stale
    assert sparse_program(x, off, prog, bounds).tolist() == [2, (-3 & M64) % 4, 3]
    prog[0, 0, 1] = 0
    with pytest.raises(ValueError, match=r"program\[0, 0\].*modulus"):
        sparse_program(x, off, prog, bounds)


def test_inference_mode_tables(backend, device):
    # Inference tensors keep no version counter: validation then runs uncached.
    with torch.inference_mode():
        prog, bounds = compile_sparse_program([[(OP_UMOD, 3)]])
        x = torch.tensor([-1, 4], device=device)
        for _ in range(2):
            got = sparse_program(x, offsets_of([2], device), prog.to(device), bounds.to(device))
            assert got.tolist() == [M64 % 3, 1]


def test_launch_counts(backend, device):
    prog, bounds = compile_sparse_program([[(OP_HASH, 1), (OP_BUCKETIZE, [0], False)]] * 2)
    x = torch.arange(-50, 50, device=device)
    suffix = "" if backend == "triton" else "_reference"
    with kernels.count_launches() as c:
        sparse_program(x, offsets_of([40, 60], device), prog.to(device), bounds.to(device))
    assert dict(c) == {"sparse_program" + suffix: 1}


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_triton_equals_torch(device, seed):
    rng = random.Random(100 + seed)
    num_features = 23
    lengths = [rng.choice([0, 1, 3, 64, 200]) for _ in range(num_features)]
    programs = [[_random_op(rng) for _ in range(rng.randint(1, 5))] for _ in range(num_features)]
    prog, bounds = compile_sparse_program(programs)
    x = torch.tensor(_random_values(rng, sum(lengths)), device=device)
    outs = on_both_backends(
        lambda: sparse_program(x, offsets_of(lengths, device), prog.to(device), bounds.to(device))
    )
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_in_place(backend, device, seed):
    # Long features (several tiles each) next to short and empty ones, some all-NOP: in
    # place, the NOP features' tiles are skipped and must come out unchanged.
    rng = random.Random(300 + seed)
    num_features = 9
    lengths = [rng.choice([0, 1, 5, 1500, 2300]) for _ in range(num_features)]
    programs = [
        [(OP_NOP,)] if rng.random() < 0.4 else [_random_op(rng) for _ in range(rng.randint(1, 3))]
        for _ in range(num_features)
    ]
    prog, bounds = compile_sparse_program(programs)
    args = (offsets_of(lengths, device), prog.to(device), bounds.to(device))
    x = torch.tensor(_random_values(rng, sum(lengths)), device=device)
    want = sparse_program(x, *args)
    y = x.clone()
    got = sparse_program(y, *args, out=y)
    assert got is y and torch.equal(y, want)
    z = torch.full_like(x, 7)
    assert torch.equal(sparse_program(x, *args, out=z), want)


@pytest.mark.parametrize("in_place", [True, False])
def test_sparse_spare_room_past_the_last_feature(backend, device, in_place):
    rng = random.Random(77)
    lengths = [3, 0, 1100, 7]
    programs = [[_random_op(rng), (OP_HASH, 5)] for _ in lengths]
    prog, bounds = compile_sparse_program(programs)
    args = (offsets_of(lengths, device), prog.to(device), bounds.to(device))
    x = torch.tensor(_random_values(rng, sum(lengths)), device=device)
    spare = torch.tensor(_random_values(rng, 1500), device=device)  # ids past the end
    want = torch.cat([sparse_program(x, *args), spare])
    buf = torch.cat([x, spare])
    got = sparse_program(buf, *args, check_offsets=False, out=buf if in_place else None)
    assert torch.equal(got, want)


def test_sparse_out_must_fit():
    x = torch.arange(4)
    args = (
        torch.tensor([0, 4]),
        torch.tensor([[[OP_MOD, 3, 0, 0]]]),
        torch.empty(0, dtype=torch.int64),
    )
    with pytest.raises(ValueError, match="out must be like values"):
        sparse_program(x, *args, out=torch.empty(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous"):
        sparse_program(x, *args, out=torch.empty(8, dtype=torch.int64)[::2])


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def _sparse_args():
    prog, bounds = compile_sparse_program([[(OP_MOD, 3)], [(OP_BUCKETIZE, [1, 2], True)]])
    return [torch.arange(5), torch.tensor([0, 2, 5]), prog, bounds]


@pytest.mark.parametrize(
    "i,value,exc,match",
    [
        (0, [1, 2], TypeError, "values must be a torch.Tensor"),
        (0, torch.arange(5, dtype=torch.int32), TypeError, "values must be torch.int64"),
        (0, torch.arange(6).view(2, 3), ValueError, "values must be 1-D"),
        (1, torch.tensor([0.0, 2.0, 5.0]), TypeError, "value_offsets must be torch.int64"),
        (1, torch.tensor([0, 5]), ValueError, "program must have shape"),
        (1, torch.empty(0, dtype=torch.int64), ValueError, "value_offsets must have F"),
        (1, torch.tensor([1, 2, 5]), ValueError, "value_offsets must be non-decreasing"),
        (1, torch.tensor([0, 2, 4]), ValueError, r"len\(values\)=5"),
        (
            1,
            torch.tensor([0, 3, 2]),
            ValueError,
            r"feature 1 would have a negative length \(value_offsets\[1\]=3",
        ),
        (2, torch.zeros(2, 1, 3, dtype=torch.int64), ValueError, "program must have shape"),
        (2, torch.zeros(2, 13, 4, dtype=torch.int64), ValueError, "at most 12"),
        (
            2,
            torch.tensor([[[5, 0, 0, 0]], [[0, 0, 0, 0]]]),
            ValueError,
            r"program\[0, 0\].*unknown",
        ),
        (2, torch.tensor([[[0, 0, 0, 0]], [[-1, 0, 0, 0]]]), ValueError, r"program\[1, 0\]"),
        (2, torch.tensor([[[OP_MOD, 0, 0, 0]], [[0] * 4]]), ValueError, "modulus"),
        (2, torch.tensor([[[OP_UMOD, -5, 0, 0]], [[0] * 4]]), ValueError, "modulus"),
        (2, torch.tensor([[[OP_BUCKETIZE, 0, 0, 0]], [[0] * 4]]), ValueError, "BUCKETIZE"),
        (2, torch.tensor([[[OP_BUCKETIZE, -1, 1, 0]], [[0] * 4]]), ValueError, "BUCKETIZE"),
        (
            2,
            torch.tensor([[[OP_BUCKETIZE, 1, 2, 0]], [[0] * 4]]),
            ValueError,
            "len\\(boundaries\\)=2",
        ),
        (2, torch.tensor([[[OP_BUCKETIZE, 1, I64_MAX, 0]], [[0] * 4]]), ValueError, "BUCKETIZE"),
        (2, torch.tensor([[[OP_BUCKETIZE, 0, 1, 2]], [[0] * 4]]), ValueError, "right flag"),
        (3, torch.tensor([1.0, 2.0]), TypeError, "boundaries must be torch.int64"),
        (3, torch.tensor([2, 1]), ValueError, "non-decreasing"),
        (3, torch.empty(0, dtype=torch.int64, device="meta"), ValueError, "one device"),
    ],
)
def test_sparse_validation(i, value, exc, match):
    with pytest.raises(exc, match=match):
        sparse_program(*with_arg(_sparse_args(), i, value))


def test_sparse_check_offsets_false_skips_offset_checks(device):
    if not (kernels.HAS_TRITON and (device.type == "cuda" or kernels.interpret_mode())):
        pytest.skip("the unchecked path is the Triton kernel's")
    args = [a.to(device) for a in with_arg(_sparse_args(), 1, torch.tensor([0, 2, 4]))]
    with kernels.use_backend("triton"):
        out = sparse_program(*args, check_offsets=False)  # trusted: no error, no host sync
    assert out.shape == (5,)


# ----------------------------------------------------------------------------------------
# compile_sparse_program
# ----------------------------------------------------------------------------------------


def test_compile_sparse_program_layout():
    prog, bounds = compile_sparse_program(
        [
            [(OP_HASH, M64), (OP_UMOD, 10)],
            [(OP_BUCKETIZE, [1, 5], True)],
            [],
            [(OP_NOP,), (OP_BUCKETIZE, [1, 5])],
            [(OP_BUCKETIZE, [7])],
        ],
        slots=3,
    )
    assert prog.dtype == torch.int64 and prog.shape == (5, 3, 4)
    assert bounds.tolist() == [1, 5, 7]
    assert prog[0].tolist() == [[OP_HASH, -1, 0, 0], [OP_UMOD, 10, 0, 0], [0, 0, 0, 0]]
    assert prog[1, 0].tolist() == [OP_BUCKETIZE, 0, 2, 1]
    assert prog[3, 1].tolist() == [OP_BUCKETIZE, 0, 2, 0]
    assert prog[4, 0].tolist() == [OP_BUCKETIZE, 2, 1, 0]
    assert prog[2].abs().sum() == 0
    empty_prog, empty_bounds = compile_sparse_program([])
    assert empty_prog.shape == (0, 0, 4) and empty_bounds.numel() == 0


@pytest.mark.parametrize(
    "ops,exc,match",
    [
        ([(OP_HASH, 1 << 64)], ValueError, "seed"),
        ([(OP_HASH, -1)], ValueError, "seed"),
        ([(OP_HASH, 1.5)], TypeError, "seed"),
        ([(OP_MOD, 0)], ValueError, "modulus"),
        ([(OP_UMOD, 1 << 63)], ValueError, "modulus"),
        ([(OP_MOD,)], ValueError, "takes 1 parameter"),
        ([(OP_BUCKETIZE, [])], ValueError, "at least one boundary"),
        ([(OP_BUCKETIZE, [3, 1])], ValueError, "non-decreasing"),
        ([(OP_BUCKETIZE, [1 << 63])], ValueError, "int64"),
        ([(OP_BUCKETIZE, [1.5])], TypeError, "ints"),
        ([(OP_BUCKETIZE, [1], 2)], ValueError, "right"),
        ([(9, 1)], ValueError, "unknown sparse opcode 9"),
        ([()], TypeError, "tuple"),
        ([(OP_NOP,)] * 13, ValueError, "at most 12"),
    ],
)
def test_compile_sparse_program_errors(ops, exc, match):
    with pytest.raises(exc, match=match):
        compile_sparse_program([[(OP_NOP,)], ops], names=["a", "price"])
    with pytest.raises(exc, match="price"):
        compile_sparse_program([[(OP_NOP,)], ops], names=["a", "price"])


# ----------------------------------------------------------------------------------------
# CUDA: bigger sizes through the compiled kernel (skipped without a GPU)
# ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_kernel_matches_cpu_reference():
    rng = random.Random(0)
    num_features = 1500
    lengths = [rng.choice([0, 1, 7, 100, 1000]) for _ in range(num_features)]
    programs = [[_random_op(rng) for _ in range(rng.randint(1, 6))] for _ in range(num_features)]
    prog, bounds = compile_sparse_program(programs)
    x = torch.tensor(_random_values(rng, sum(lengths)))
    off = offsets_of(lengths, "cpu")
    with kernels.use_backend("torch"):
        want = sparse_program(x, off, prog, bounds)
    got = sparse_program(x.cuda(), off.cuda(), prog.cuda(), bounds.cuda())
    assert torch.equal(got.cpu(), want)


def test_module_exports():
    for name in sparse_module.__all__:
        assert hasattr(sparse_module, name), name
