"""KeyedJaggedTensor: layout accessors, zero-copy per-key views, split/permute/concat,
dict round trips, validation and device movement, checked against per-key Python rows."""

from __future__ import annotations

import pytest
import torch

from recstack.core.jagged import JaggedTensor
from recstack.core.keyed_jagged import KeyedJaggedTensor

HAS_CUDA = torch.cuda.is_available()


def make_features(
    gen: torch.Generator,
    keys: list[str],
    batch: int,
    max_len: int = 5,
    trailing: tuple[int, ...] = (),
) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per key: CPU rows of random lengths (zeros common) and their weights."""
    out = {}
    for key in keys:
        lengths = torch.randint(0, max_len + 1, (batch,), generator=gen).tolist()
        rows = [torch.randint(0, 10_000, (n, *trailing), generator=gen) for n in lengths]
        weights = [torch.rand(n, generator=gen) for n in lengths]
        out[key] = (rows, weights)
    return out


def pack(
    features: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]],
    device: torch.device,
    batch: int,
    weighted: bool = True,
    trailing: tuple[int, ...] = (),
) -> KeyedJaggedTensor:
    """Key-major packing written out by hand (the layout under test)."""
    rows = [r for key_rows, _ in features.values() for r in key_rows]
    ws = [w for _, key_w in features.values() for w in key_w]
    values = torch.cat(rows) if rows else torch.empty((0, *trailing), dtype=torch.int64)
    weights = torch.cat(ws) if ws else torch.empty(0)
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.int64)
    return KeyedJaggedTensor(
        list(features),
        values.to(device),
        lengths.to(device),
        weights=weights.to(device) if weighted else None,
        stride=batch,
    )


def assert_feature(jt: JaggedTensor, rows: list[torch.Tensor], weights: list[torch.Tensor] | None):
    jt.validate()
    assert len(jt) == len(rows)
    assert jt.lengths().tolist() == [r.shape[0] for r in rows]
    for b, row in enumerate(rows):
        assert torch.equal(jt[b].cpu(), row)
    if weights is None:
        assert jt.weights is None
    else:
        want = torch.cat(weights) if weights else torch.empty(0)
        assert torch.equal(jt.weights.cpu(), want)


def assert_kjt(kjt: KeyedJaggedTensor, features, weighted: bool = True) -> None:
    kjt.validate()
    assert kjt.keys() == list(features)
    for key, (rows, weights) in features.items():
        assert_feature(kjt[key], rows, weights if weighted else None)


KEYS = ["user_seq", "item_tags", "city", "query"]


# ---------------------------------------------------------------------- layout


def test_layout_and_accessors(device):
    kjt = KeyedJaggedTensor(
        ["a", "b", "c"],
        values=torch.tensor([1, 2, 3, 4, 5, 6], device=device),
        lengths=torch.tensor([2, 0, 1, 3, 0, 0], dtype=torch.int32, device=device),
        weights=torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], device=device),
    )
    assert kjt.keys() == ["a", "b", "c"]
    assert kjt.stride() == 2
    assert kjt.lengths().dtype == torch.int64
    assert kjt.offsets().tolist() == [0, 2, 2, 3, 6, 6, 6]
    assert kjt.offsets() is kjt.offsets()  # cached
    assert kjt.length_per_key() == [2, 4, 0]
    assert kjt.offset_per_key() == [0, 2, 6, 6]
    assert kjt.weights() is kjt.weights_or_none()
    assert kjt.device == kjt.values().device and kjt.dtype == torch.int64
    assert "a" in kjt and "z" not in kjt
    assert list(kjt) == ["a", "b", "c"]
    assert kjt["a"].to_list() == [[1, 2], []]
    assert kjt["b"].to_list() == [[3], [4, 5, 6]]
    assert kjt["c"].to_list() == [[], []]
    assert kjt["b"].weights.cpu().tolist() == pytest.approx([0.3, 0.4, 0.5, 0.6])
    r = repr(kjt)
    assert r.startswith("KeyedJaggedTensor(keys=['a', 'b', 'c'], stride=2") and "weighted" in r
    many = KeyedJaggedTensor(
        [f"k{i}" for i in range(50)], torch.empty(0), torch.zeros(50, dtype=torch.int64)
    )
    assert len(repr(many)) < 120


def test_unweighted_weights_raises():
    kjt = KeyedJaggedTensor(["a"], torch.tensor([1]), torch.tensor([1]))
    assert kjt.weights_or_none() is None
    with pytest.raises(ValueError, match="no weights"):
        kjt.weights()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch", [0, 1, 7])
@pytest.mark.parametrize("weighted", [True, False])
def test_getitem_matches_rows(device, seed, batch, weighted):
    gen = torch.Generator().manual_seed(seed * 100 + batch)
    features = make_features(gen, KEYS, batch)
    kjt = pack(features, device, batch, weighted)
    assert kjt.stride() == batch
    assert kjt.offsets().shape == (len(KEYS) * batch + 1,)
    assert kjt.length_per_key() == [sum(r.shape[0] for r in features[k][0]) for k in KEYS]
    assert_kjt(kjt, features, weighted)
    as_dict = kjt.to_dict()
    assert list(as_dict) == KEYS
    for key, (rows, weights) in features.items():
        assert_feature(as_dict[key], rows, weights if weighted else None)


def test_getitem_is_zero_copy(device):
    gen = torch.Generator().manual_seed(11)
    features = make_features(gen, KEYS, 6, trailing=(3,))
    kjt = pack(features, device, 6, trailing=(3,))
    base = kjt.values()
    opk = kjt.offset_per_key()
    row_bytes = base.element_size() * base[0].numel()
    for k, key in enumerate(KEYS):
        jt = kjt[key]
        assert jt.values.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        assert jt.values.data_ptr() == base.data_ptr() + opk[k] * row_bytes
        assert jt.weights.untyped_storage().data_ptr() == kjt.weights().untyped_storage().data_ptr()
        # writes through the view land in the packed buffer
        if jt.numel():
            jt.values[0, 0] = -1
            assert base[opk[k], 0].item() == -1


def test_unknown_key(device):
    kjt = KeyedJaggedTensor(
        ["a", "b"], torch.tensor([1], device=device), torch.tensor([1, 0], device=device)
    )
    with pytest.raises(KeyError, match=r"unknown feature 'zz'; available keys: \['a', 'b'\]"):
        kjt["zz"]
    with pytest.raises(KeyError, match="unknown feature"):
        kjt[["a"]]


def test_empty_shapes(device):
    # keys but no rows
    kjt = KeyedJaggedTensor(
        ["a", "b"], torch.empty(0, device=device), torch.empty(0, dtype=torch.int64, device=device)
    )
    assert kjt.stride() == 0 and kjt.length_per_key() == [0, 0]
    assert kjt.offsets().tolist() == [0]
    assert len(kjt["b"]) == 0 and kjt["b"].to_padded().shape == (0, 0)
    kjt.validate()
    # rows but every one empty
    kjt = KeyedJaggedTensor(
        ["a"], torch.empty(0, device=device), torch.zeros(5, dtype=torch.int64, device=device)
    )
    assert kjt.stride() == 5 and kjt["a"].to_list() == [[]] * 5
    # no keys at all
    kjt = KeyedJaggedTensor(
        [],
        torch.empty(0, device=device),
        torch.empty(0, dtype=torch.int64, device=device),
        stride=4,
    )
    assert kjt.stride() == 4 and kjt.length_per_key() == [] and kjt.to_dict() == {}
    kjt.validate()
    assert KeyedJaggedTensor([], torch.empty(0), torch.empty(0, dtype=torch.int64)).stride() == 0


def test_from_offsets_only(device):
    kjt = KeyedJaggedTensor(
        ["a", "b"],
        torch.arange(5, device=device),
        offsets=torch.tensor([0, 1, 1, 4, 5], device=device),
    )
    assert kjt.lengths().tolist() == [1, 0, 3, 1]
    assert kjt.stride() == 2
    assert kjt["b"].to_list() == [[1, 2, 3], [4]]
    kjt.validate()


def test_length_per_key_given(device):
    kjt = KeyedJaggedTensor(
        ["a", "b"],
        torch.arange(5, device=device),
        torch.tensor([1, 0, 3, 1], device=device),
        length_per_key=[1, 4],
    )
    assert kjt.length_per_key() == [1, 4]
    assert kjt["b"].to_list() == [[1, 2, 3], [4]]
    kjt.validate()
    wrong = KeyedJaggedTensor(
        ["a", "b"],
        torch.arange(5, device=device),
        torch.tensor([1, 0, 3, 1], device=device),
        length_per_key=[2, 3],
    )
    with pytest.raises(ValueError, match=r"length_per_key \[2, 3\] does not match.*\[1, 4\]"):
        wrong.validate()


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        (
            (["a", "a"], torch.ones(1), torch.tensor([1, 0])),
            {},
            ValueError,
            r"duplicate keys \['a'\]",
        ),
        (("ab", torch.ones(1), torch.tensor([1])), {}, TypeError, "single str"),
        (([1], torch.ones(1), torch.tensor([1])), {}, TypeError, "keys must be str"),
        ((["a"], [1.0], torch.tensor([1])), {}, TypeError, "values"),
        ((["a"], torch.tensor(1.0), torch.tensor([1])), {}, ValueError, "at least 1 dim"),
        ((["a"], torch.ones(1)), {}, ValueError, "give lengths or offsets"),
        ((["a"], torch.ones(1), torch.tensor([1.0])), {}, TypeError, "lengths.*integer"),
        ((["a"], torch.ones(1), torch.tensor([[1]])), {}, ValueError, "lengths.*1-D"),
        (
            (["a", "b"], torch.ones(1), torch.tensor([1, 0, 0])),
            {},
            ValueError,
            r"lengths has 3 entries, expected len\(keys\) \* stride = 2 \* 1",
        ),
        (
            (["a", "b"], torch.ones(1), torch.tensor([1, 0])),
            {"stride": 2},
            ValueError,
            "lengths has 2 entries",
        ),
        ((["a"], torch.ones(1), torch.tensor([1])), {"stride": -1}, ValueError, "stride"),
        (([], torch.ones(0), torch.tensor([1])), {}, ValueError, "no keys but lengths"),
        (
            (["a"], torch.ones(2), torch.tensor([2])),
            {"weights": torch.ones(3)},
            ValueError,
            "weights.*one entry per item",
        ),
        (
            (["a"], torch.ones(2), torch.tensor([2])),
            {"offsets": torch.tensor([0, 1, 2])},
            ValueError,
            r"offsets has 3 entries, expected len\(lengths\) \+ 1 = 2",
        ),
        (
            (["a"], torch.ones(2, device="meta"), torch.tensor([2])),
            {},
            ValueError,
            "one device.*values on meta.*lengths on cpu",
        ),
        (
            (["a", "b"], torch.ones(2), torch.tensor([2, 0])),
            {"length_per_key": [2]},
            ValueError,
            "length_per_key has 1 entries for 2 keys",
        ),
        (
            (["a", "b"], torch.ones(2), torch.tensor([2, 0])),
            {"length_per_key": [2, 1]},
            ValueError,
            "length_per_key sums to 3 but values has 2 items",
        ),
    ],
)
def test_constructor_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        KeyedJaggedTensor(*args, **kwargs)


@pytest.mark.parametrize(
    ("lengths", "offsets", "match"),
    [
        ([2, -1, 2], None, "lengths must be >= 0"),
        ([2, 1, 4], None, "lengths sum to 7 but values has 3 items"),
        ([1, 1, 0], None, "lengths sum to 2 but values has 3 items"),
        ([1, 1, 1], [0, 1, 3, 3], r"offsets do not match cumsum\(lengths\)"),
    ],
)
def test_validate_errors(device, lengths, offsets, match):
    kw = {"offsets": torch.tensor(offsets, device=device)} if offsets is not None else {}
    kjt = KeyedJaggedTensor(
        ["a", "b", "c"], torch.arange(3, device=device), torch.tensor(lengths, device=device), **kw
    )
    with pytest.raises(ValueError, match=match):
        kjt.validate()


@pytest.mark.gpu
def test_views_with_known_lengths_never_sync():
    """With length_per_key given, views, splits and offsets must not wait on the GPU."""
    device = torch.device("cuda")
    kjt = KeyedJaggedTensor(
        ["a", "b", "c"],
        torch.arange(6, device=device),
        torch.tensor([2, 0, 1, 3, 0, 0], device=device),
        weights=torch.rand(6, device=device),
        length_per_key=[2, 4, 0],
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kjt.offsets()
        kjt["b"]
        kjt.to_dict()
        kjt.split([1, 2])
        KeyedJaggedTensor.concat(kjt.split([2, 1]))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------- split / permute / concat


@pytest.mark.parametrize("segments", [[4], [1, 3], [2, 2], [0, 1, 0, 3], [1, 1, 1, 1, 0]])
@pytest.mark.parametrize("with_offsets", [False, True])
def test_split(device, segments, with_offsets):
    gen = torch.Generator().manual_seed(sum(segments) * 13 + len(segments))
    features = make_features(gen, KEYS, 5)
    kjt = pack(features, device, 5)
    if with_offsets:
        kjt.offsets()
    pieces = kjt.split(segments)
    assert [len(p.keys()) for p in pieces] == segments
    first = 0
    for piece, size in zip(pieces, segments, strict=True):
        names = KEYS[first : first + size]
        first += size
        assert piece.stride() == 5
        assert_kjt(piece, {k: features[k] for k in names})
        if piece.values().numel():
            ptr = piece.values().untyped_storage().data_ptr()
            assert ptr == kjt.values().untyped_storage().data_ptr()
    back = KeyedJaggedTensor.concat(pieces)
    assert back.keys() == KEYS
    assert torch.equal(back.values(), kjt.values())
    assert torch.equal(back.lengths(), kjt.lengths())
    assert torch.equal(back.weights(), kjt.weights())


def test_split_errors():
    kjt = KeyedJaggedTensor(["a", "b"], torch.ones(1), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"segments \[1\] sum to 1, expected 2 keys"):
        kjt.split([1])
    with pytest.raises(ValueError, match="non-negative ints"):
        kjt.split([3, -1])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("weighted", [True, False])
def test_permute(device, seed, weighted):
    gen = torch.Generator().manual_seed(900 + seed)
    batch = [0, 1, 4, 9][seed]
    features = make_features(gen, KEYS, batch, trailing=(2,) if seed == 3 else ())
    kjt = pack(features, device, batch, weighted, trailing=(2,) if seed == 3 else ())
    orders = [
        torch.randperm(len(KEYS), generator=gen).tolist(),
        [2, 0],  # a subset
        [3],
        [],
        list(range(len(KEYS))),
    ]
    for order in orders:
        out = kjt.permute(order)
        names = [KEYS[i] for i in order]
        assert out.keys() == names and out.stride() == batch
        assert_kjt(out, {k: features[k] for k in names}, weighted)
        assert out.length_per_key() == [kjt.length_per_key()[i] for i in order]


def test_permute_errors():
    kjt = KeyedJaggedTensor(["a", "b"], torch.ones(1), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"indices \[2\] out of range for 2 keys"):
        kjt.permute([0, 2])
    with pytest.raises(ValueError, match="repeats a key"):
        kjt.permute([1, 1])


def test_concat(device):
    gen = torch.Generator().manual_seed(5)
    f1 = make_features(gen, ["a", "b"], 3)
    f2 = make_features(gen, ["c"], 3)
    k1, k2 = pack(f1, device, 3), pack(f2, device, 3)
    out = KeyedJaggedTensor.concat([k1, k2])
    assert_kjt(out, {**f1, **f2})
    assert out.stride() == 3


def test_concat_errors(device):
    a = KeyedJaggedTensor(["a"], torch.ones(1, device=device), torch.tensor([1, 0], device=device))
    b = KeyedJaggedTensor(["b"], torch.ones(1, device=device), torch.tensor([1], device=device))
    with pytest.raises(ValueError, match="input 1 has stride 1, input 0 has 2"):
        KeyedJaggedTensor.concat([a, b])
    with pytest.raises(ValueError, match=r"duplicate keys \['a'\]"):
        KeyedJaggedTensor.concat([a, a])
    c = KeyedJaggedTensor(
        ["c"], torch.ones(1, 2, device=device), torch.tensor([1, 0], device=device)
    )
    with pytest.raises(ValueError, match="input 1 values are"):
        KeyedJaggedTensor.concat([a, c])
    d = KeyedJaggedTensor(
        ["d"],
        torch.ones(1, device=device),
        torch.tensor([0, 1], device=device),
        weights=torch.ones(1, device=device),
    )
    with pytest.raises(ValueError, match="input 1 and input 0 differ in having weights"):
        KeyedJaggedTensor.concat([a, d])
    with pytest.raises(ValueError, match="at least one"):
        KeyedJaggedTensor.concat([])


# ---------------------------------------------------------------------- dict round trips


@pytest.mark.parametrize("batch", [0, 1, 6])
def test_from_jagged_dict_round_trip(device, batch):
    gen = torch.Generator().manual_seed(40 + batch)
    features = make_features(gen, KEYS, batch)
    kjt = pack(features, device, batch)
    rebuilt = KeyedJaggedTensor.from_jagged_dict(kjt.to_dict())
    assert rebuilt.keys() == KEYS and rebuilt.stride() == batch
    assert torch.equal(rebuilt.values(), kjt.values())
    assert torch.equal(rebuilt.lengths(), kjt.lengths())
    assert torch.equal(rebuilt.weights(), kjt.weights())
    assert rebuilt.length_per_key() == kjt.length_per_key()
    assert_kjt(rebuilt, features)


def test_from_jagged_dict_errors(device):
    a = JaggedTensor.from_list([[1, 2], [3]], dtype=torch.int64, device=device)
    b3 = JaggedTensor.from_list([[1], [], [2]], dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="feature 'b' has batch size 3, feature 'a' has 2"):
        KeyedJaggedTensor.from_jagged_dict({"a": a, "b": b3})
    f = JaggedTensor.from_list([[1.0], []], device=device)
    with pytest.raises(ValueError, match="feature 'f' values are torch.float32"):
        KeyedJaggedTensor.from_jagged_dict({"a": a, "f": f})
    w = JaggedTensor.from_lengths(a.values, a.lengths(), torch.ones(3, device=device))
    with pytest.raises(ValueError, match="feature 'w' and feature 'a' differ in having weights"):
        KeyedJaggedTensor.from_jagged_dict({"a": a, "w": w})
    with pytest.raises(TypeError, match="feature 't' is a Tensor"):
        KeyedJaggedTensor.from_jagged_dict({"a": a, "t": torch.ones(2)})
    with pytest.raises(ValueError, match="at least one feature"):
        KeyedJaggedTensor.from_jagged_dict({})


def test_strings_in_a_kjt(device):
    names = JaggedTensor.from_strings(["anna", "", "bo"], device=device)
    cities = JaggedTensor.from_strings(["oslo", "rome", "日本"], device=device)
    kjt = KeyedJaggedTensor.from_jagged_dict({"name": names, "city": cities})
    assert kjt["city"].to_strings() == ["oslo", "rome", "日本"]
    assert kjt.permute([1, 0])["name"].to_strings() == ["anna", "", "bo"]


# ---------------------------------------------------------------------- device movement


def test_to_and_cpu(device):
    gen = torch.Generator().manual_seed(8)
    features = make_features(gen, KEYS, 3)
    kjt = pack(features, torch.device("cpu"), 3)
    kjt.offsets()
    kjt.length_per_key()
    moved = kjt.to(device, non_blocking=False)
    assert moved.values().device.type == device.type
    assert moved.lengths().device == moved.weights().device == moved.offsets().device
    assert moved.length_per_key() == kjt.length_per_key()
    assert_kjt(moved, features)
    back = moved.cpu()
    assert torch.equal(back.values(), kjt.values()) and torch.equal(back.offsets(), kjt.offsets())
    assert not back.is_pinned()
    back.record_stream(None)  # CPU: nothing to record


@pytest.mark.skipif(not HAS_CUDA, reason="pinning memory needs CUDA")
def test_pin_memory_and_record_stream():
    gen = torch.Generator().manual_seed(9)
    features = make_features(gen, KEYS, 4)
    kjt = pack(features, torch.device("cpu"), 4)
    pinned = kjt.pin_memory()
    assert pinned.is_pinned() and not kjt.is_pinned()
    on_gpu = pinned.to("cuda", non_blocking=True)
    on_gpu.record_stream(torch.cuda.Stream())
    torch.cuda.synchronize()
    assert on_gpu.values().is_cuda and on_gpu.lengths().is_cuda and on_gpu.weights().is_cuda
    assert_kjt(on_gpu, features)
    assert on_gpu.cuda().device == on_gpu.device
