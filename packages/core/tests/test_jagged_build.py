"""KeyedJaggedTensor.from_dense / from_padded / from_features: equal to the KJT the syncing
constructors build (JaggedTensor.from_padded + from_jagged_dict) on fresh random inputs,
sync-free (fullgraph torch.compile on the CPU, sync debug mode on a GPU), with errors
that name the feature."""

from __future__ import annotations

import pytest
import torch

from recstack.core.capacity import padded_item_mask
from recstack.core.jagged import JaggedTensor
from recstack.core.jagged_build import DenseFeatures, PaddedFeatures
from recstack.core.keyed_jagged import KeyedJaggedTensor

SIDES = ["right", "left"]
ID_DTYPES = [torch.int32, torch.int64]


def random_lengths(gen: torch.Generator, batch: int, width: int, pattern: str) -> torch.Tensor:
    if pattern == "zeros":
        return torch.zeros(batch, dtype=torch.int64)
    if pattern == "full":
        return torch.full((batch,), width, dtype=torch.int64)
    return torch.randint(0, width + 1, (batch,), generator=gen)


def masked_jagged(ids: torch.Tensor, mask: torch.Tensor, w: torch.Tensor | None) -> JaggedTensor:
    """The rows ``ids[b][mask[b]]``, through boolean indexing (a syncing reference)."""
    values = ids[mask]
    return JaggedTensor.from_lengths(values, mask.sum(1), w[mask] if w is not None else None)


def assert_same_kjt(got: KeyedJaggedTensor, want: KeyedJaggedTensor) -> None:
    """``got`` (possibly a capacity layout) holds exactly ``want``'s rows."""
    assert got.validate() is got
    assert got.keys() == want.keys()
    assert got.stride() == want.stride()
    assert got.dtype == want.dtype
    assert torch.equal(got.lengths(), want.lengths())
    assert torch.equal(got.offsets(), want.offsets())
    assert got.length_per_key() == want.length_per_key()
    total = sum(want.length_per_key())
    assert torch.equal(got.values()[:total], want.values())
    assert (got.weights_or_none() is None) == (want.weights_or_none() is None)
    if want.weights_or_none() is not None:
        assert torch.equal(got.weights()[:total], want.weights())
    trimmed = got.compact()
    assert trimmed.is_compact and torch.equal(trimmed.values(), want.values())
    for key in want:
        g, w = got[key], want[key]
        assert torch.equal(g.values, w.values) and torch.equal(g.offsets, w.offsets)
        if w.weights is not None:
            assert torch.equal(g.weights, w.weights)


# ---------------------------------------------------------------------- from_dense


@pytest.mark.parametrize("batch", [0, 1, 7])
@pytest.mark.parametrize("dtype", ID_DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_from_dense_matches_syncing_constructors(device, batch, dtype, weighted):
    gen = torch.Generator().manual_seed(batch * 10 + len(str(dtype)) + weighted)
    widths = {"user": None, "tags": 3, "empty": 0, "pair": 2}  # None: a 1-D [B] tensor
    ids, weights, jts = {}, {}, {}
    for key, n in widths.items():
        shape = (batch,) if n is None else (batch, n)
        t = torch.randint(0, 2**31 - 1, shape, generator=gen).to(dtype).to(device)
        w = torch.rand(shape, generator=gen).to(device)
        per_row = 1 if n is None else n
        ids[key], weights[key] = t, w
        jts[key] = JaggedTensor.from_lengths(
            t.reshape(-1),
            torch.full((batch,), per_row, device=device),
            w.reshape(-1) if weighted else None,
        )
    got = KeyedJaggedTensor.from_dense(ids, weights if weighted else None)
    want = KeyedJaggedTensor.from_jagged_dict(jts)
    assert got.is_compact
    assert got.values().dtype == dtype
    assert_same_kjt(got, want)


def test_from_dense_example_layout():
    kjt = KeyedJaggedTensor.from_dense(
        {"user": torch.tensor([7, 8]), "tags": torch.tensor([[1, 2], [3, 4]])}
    )
    assert kjt.values().tolist() == [7, 8, 1, 2, 3, 4]
    assert kjt.lengths().tolist() == [1, 1, 2, 2]
    assert kjt.length_per_key() == [2, 4]
    assert kjt["tags"].to_list() == [[1, 2], [3, 4]]


def test_from_dense_trailing_dims(device):
    emb = torch.randn(3, 2, 4, device=device)
    kjt = KeyedJaggedTensor.from_dense({"e": emb})
    assert kjt.values().shape == (6, 4)
    assert torch.equal(kjt["e"].to_padded(max_len=2), emb)


# ---------------------------------------------------------------------- from_padded


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("batch", "widths"), [(0, (3, 2)), (1, (1, 0)), (6, (0, 0)), (9, (5, 8))])
@pytest.mark.parametrize("pattern", ["ragged", "zeros", "full"])
@pytest.mark.parametrize(("dtype", "weighted"), [(torch.int32, False), (torch.int64, True)])
def test_from_padded_lengths_match_syncing_constructors(
    device, side, batch, widths, pattern, dtype, weighted
):
    gen = torch.Generator().manual_seed(batch * 97 + sum(widths) + len(pattern) + len(side))
    ids, lengths, weights, jts = {}, {}, {}, {}
    for key, width in zip(("seq", "clicks"), widths, strict=True):
        t = torch.randint(-(2**31), 2**31 - 1, (batch, width), generator=gen).to(dtype)
        n = random_lengths(gen, batch, width, pattern).to(torch.int32)
        w = torch.rand((batch, width), generator=gen)
        ids[key], lengths[key], weights[key] = t.to(device), n.to(device), w.to(device)
        jts[key] = JaggedTensor.from_padded(
            ids[key], lengths[key], side=side, weights=weights[key] if weighted else None
        )
    got = KeyedJaggedTensor.from_padded(
        ids, lengths, side=side, weights=weights if weighted else None
    )
    want = KeyedJaggedTensor.from_jagged_dict(jts)
    capacity = batch * sum(widths)
    assert got.values().shape[0] == capacity
    assert got.is_compact == (capacity == 0)
    assert_same_kjt(got, want)
    # The capacity tail is the padding slots, key by key.
    pads = [
        ids[k][~padded_item_mask(lengths[k].long(), ids[k].shape[1], side)]
        for k in ("seq", "clicks")
    ]
    assert torch.equal(got.values()[want.values().shape[0] :], torch.cat(pads))


@pytest.mark.parametrize("batch", [0, 1, 8])
@pytest.mark.parametrize("how", ["mask", "pad"])
def test_from_padded_mask_and_pad_match_boolean_indexing(device, batch, how):
    gen = torch.Generator().manual_seed(batch + len(how))
    ids, masks, weights = {}, {}, {}
    for key, width in (("a", 4), ("b", 1), ("c", 6)):
        t = torch.randint(0, 5, (batch, width), generator=gen)  # 0 is the padding id
        ids[key] = t.to(device)
        masks[key] = (t != 0).to(device) if how == "pad" else (torch.rand(batch, width) < 0.5)
        masks[key] = masks[key].to(device)
        weights[key] = torch.rand((batch, width), generator=gen).to(device)
    if how == "pad":
        got = KeyedJaggedTensor.from_padded(ids, pad=0, weights=weights)
    else:
        got = KeyedJaggedTensor.from_padded(ids, mask=masks, weights=weights)
    want = KeyedJaggedTensor.from_jagged_dict(
        {k: masked_jagged(ids[k], masks[k], weights[k]) for k in ids}
    )
    assert_same_kjt(got, want)


def test_from_padded_without_lengths_is_every_slot(device):
    ids = {"a": torch.arange(6, device=device).view(2, 3)}
    kjt = KeyedJaggedTensor.from_padded(ids)
    assert kjt.is_compact and kjt.length_per_key() == [6]
    assert kjt["a"].to_list() == [[0, 1, 2], [3, 4, 5]]


def test_from_padded_example():
    kjt = KeyedJaggedTensor.from_padded(
        {"seq": torch.tensor([[5, 6, 0], [7, 0, 0]])}, {"seq": torch.tensor([2, 1])}
    )
    assert not kjt.is_compact
    assert kjt.values().tolist() == [5, 6, 7, 0, 0, 0]
    assert kjt["seq"].to_list() == [[5, 6], [7]]
    assert kjt.compact().values().tolist() == [5, 6, 7]


def test_capacity_kjt_split_permute_concat_and_move(device):
    gen = torch.Generator().manual_seed(11)
    ids = {k: torch.randint(1, 50, (5, 4), generator=gen).to(device) for k in "abc"}
    lengths = {k: torch.randint(0, 5, (5,), generator=gen).to(device) for k in "abc"}
    got = KeyedJaggedTensor.from_padded(ids, lengths, side="left")
    want = KeyedJaggedTensor.from_jagged_dict(
        {k: JaggedTensor.from_padded(ids[k], lengths[k], side="left") for k in "abc"}
    )
    for g, w in zip(got.split([1, 2]), want.split([1, 2]), strict=True):
        assert g.is_compact and torch.equal(g.values(), w.values())
    assert torch.equal(got.permute([2, 0]).values(), want.permute([2, 0]).values())
    dense = KeyedJaggedTensor.from_dense({"d": torch.arange(5, device=device)})
    both = KeyedJaggedTensor.concat([dense, got])
    assert not both.is_compact
    assert_same_kjt(both, KeyedJaggedTensor.concat([dense, want]))
    assert_same_kjt(got.to(device), want)
    assert "capacity layout" in repr(got)


# ---------------------------------------------------------------------- from_features


@pytest.mark.parametrize("batch", [0, 1, 6])
def test_from_features_mixed_groups_match_syncing_constructors(device, batch):
    gen = torch.Generator().manual_seed(40 + batch)
    user = torch.randint(0, 100, (batch,), generator=gen).to(device)
    tags = torch.randint(0, 100, (batch, 3), generator=gen).to(device)
    seq = torch.randint(1, 100, (batch, 5), generator=gen).to(device)
    seq_len = torch.randint(0, 6, (batch,), generator=gen).to(device)
    query = torch.randint(0, 3, (batch, 4), generator=gen).to(device)
    hist = JaggedTensor.from_padded(seq, seq_len.flip(0), compact=False)
    city = JaggedTensor.from_lengths(
        torch.arange(batch, device=device), torch.ones(batch, dtype=torch.int64)
    )
    got = KeyedJaggedTensor.from_features(
        [
            DenseFeatures({"user": user, "tags": tags}),
            PaddedFeatures({"seq": seq}, {"seq": seq_len}, side="left"),
            {"hist": hist, "city": city},
            PaddedFeatures({"query": query}, pad=0),
        ]
    )
    want = KeyedJaggedTensor.from_jagged_dict(
        {
            "user": JaggedTensor.from_lengths(user, torch.ones(batch, dtype=torch.int64)),
            "tags": JaggedTensor.from_lengths(tags.reshape(-1), torch.full((batch,), 3)),
            "seq": JaggedTensor.from_padded(seq, seq_len, side="left"),
            "hist": hist.compact(),
            "city": city,
            "query": masked_jagged(query, query != 0, None),
        }
    )
    assert_same_kjt(got, want)


def test_from_features_all_dense_is_compact(device):
    kjt = KeyedJaggedTensor.from_features(
        [
            DenseFeatures({"a": torch.ones(3, 2, dtype=torch.int64, device=device)}),
            PaddedFeatures({"b": torch.zeros(3, 4, dtype=torch.int64, device=device)}),
        ]
    )
    assert kjt.is_compact and kjt.length_per_key() == [6, 12]


# ---------------------------------------------------------------------- bad lengths


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([2, 9], "feature 'seq': a length of 9 exceeds the padded width L=3"),
        ([-2, 1], "feature 'seq': lengths must be >= 0, got a length of -2"),
    ],
)
def test_bad_lengths_name_the_feature_at_the_next_sync(device, bad, match):
    ids = {
        "ok": torch.zeros(2, 4, dtype=torch.int64, device=device),
        "seq": torch.zeros(2, 3, dtype=torch.int64, device=device),
    }
    lengths = {"ok": torch.tensor([4, 0], device=device), "seq": torch.tensor(bad, device=device)}
    with pytest.raises(ValueError, match="KeyedJaggedTensor.from_padded: " + match):
        KeyedJaggedTensor.from_padded(ids, lengths, validate=True)
    for use in (
        lambda k: k["seq"],
        lambda k: k["ok"],
        lambda k: k.validate(),
        lambda k: k.compact(),
        lambda k: k.length_per_key(),
        lambda k: k.to(device).split([1, 1]),
        lambda k: KeyedJaggedTensor.concat([k, KeyedJaggedTensor.from_dense({"d": ids["ok"]})])[
            "d"
        ],
    ):
        kjt = KeyedJaggedTensor.from_padded(ids, lengths)  # no sync, no error yet
        with pytest.raises(ValueError, match=match):
            use(kjt)


def test_good_lengths_are_checked_once():
    ids = {"seq": torch.zeros(2, 3, dtype=torch.int64)}
    kjt = KeyedJaggedTensor.from_padded(ids, {"seq": torch.tensor([3, 0])})
    assert kjt.length_per_key() == [3]
    assert kjt._pending is None  # the check rode along with that one read
    assert KeyedJaggedTensor.from_padded(ids, {"seq": torch.tensor([1, 2])}, validate=True)


# ---------------------------------------------------------------------- input errors


def _i(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


ERRORS = [
    (lambda: KeyedJaggedTensor.from_dense({}), ValueError, "needs at least one feature"),
    (lambda: KeyedJaggedTensor.from_dense({"a": _i()}), ValueError, "feature 'a'.*scalar"),
    (
        lambda: KeyedJaggedTensor.from_dense({"a": _i(2), "b": _i(3)}),
        ValueError,
        "feature 'b' has batch size 3, feature 'a' has 2",
    ),
    (
        lambda: KeyedJaggedTensor.from_dense({"a": _i(2), "b": _i(2, dtype=torch.int32)}),
        ValueError,
        "feature 'b' is torch.int32",
    ),
    (
        lambda: KeyedJaggedTensor.from_dense({"a": _i(2)}, {"b": torch.ones(2)}),
        ValueError,
        r"weights must have exactly the keys of ids; missing \['a'\], unexpected \['b'\]",
    ),
    (
        lambda: KeyedJaggedTensor.from_dense({"a": _i(2, 3)}, {"a": torch.ones(2)}),
        ValueError,
        r"feature 'a': weights must have shape \(2, 3\)",
    ),
    (
        lambda: KeyedJaggedTensor.from_dense({"a": _i(2)}, {"a": _i(2)}),
        TypeError,
        "feature 'a': weights must be floating point",
    ),
    (
        lambda: KeyedJaggedTensor.from_dense({"a": [1, 2]}),
        TypeError,
        r"ids\['a'\] must be a torch.Tensor",
    ),
    (
        lambda: KeyedJaggedTensor.from_padded({"s": _i(3)}),
        ValueError,
        r"feature 's': padded ids must be \[B, L\]",
    ),
    (
        lambda: KeyedJaggedTensor.from_padded({"s": _i(2, 3)}, {"s": _i(3)}),
        ValueError,
        r"feature 's': lengths must have shape \(2,\)",
    ),
    (
        lambda: KeyedJaggedTensor.from_padded({"s": _i(2, 3)}, {"s": torch.ones(2)}),
        TypeError,
        "feature 's': lengths must be integers",
    ),
    (
        lambda: KeyedJaggedTensor.from_padded({"s": _i(2, 3), "t": _i(2, 1)}, {"s": _i(2)}),
        ValueError,
        r"lengths must have exactly the keys of ids; missing \['t'\]",
    ),
    (
        lambda: KeyedJaggedTensor.from_padded({"s": _i(2, 3)}, mask={"s": _i(2, 3)}),
        ValueError,
        r"feature 's': mask must be bool \[B, L\]",
    ),
    (
        lambda: KeyedJaggedTensor.from_padded({"s": _i(2, 3)}, {"s": _i(2)}, pad=0),
        ValueError,
        "at most one of lengths, mask and pad",
    ),
    (
        lambda: KeyedJaggedTensor.from_padded({"s": _i(2, 3, 4)}, pad=0),
        ValueError,
        "feature 's': pad= needs",
    ),
    (
        lambda: KeyedJaggedTensor.from_padded({"s": _i(2, 3)}, {"s": _i(2)}, side="up"),
        ValueError,
        "side must be",
    ),
    (
        lambda: KeyedJaggedTensor.from_padded(
            {"s": _i(2, 3), "t": _i(2, 3)},
            weights={"s": torch.ones(2, 3), "t": torch.ones(2, 3, dtype=torch.float64)},
        ),
        ValueError,
        "feature 't' has torch.float64 weights",
    ),
    (
        lambda: KeyedJaggedTensor.from_features(
            [DenseFeatures({"a": _i(2)}), PaddedFeatures({"a": _i(2, 2)})]
        ),
        ValueError,
        r"feature\(s\) \['a'\] given more than once",
    ),
    (
        lambda: KeyedJaggedTensor.from_features(
            [DenseFeatures({"a": _i(2)}, {"a": torch.ones(2)}), DenseFeatures({"b": _i(2)})]
        ),
        ValueError,
        "feature 'a' has weights but feature 'b' has none",
    ),
    (
        lambda: KeyedJaggedTensor.from_features([DenseFeatures({"a": _i(2)}), {"j": _i(2)}]),
        TypeError,
        "feature 'j' is a Tensor, not a JaggedTensor",
    ),
    (
        lambda: KeyedJaggedTensor.from_features([{"a": _i(2)}.items()]),
        TypeError,
        "each group must be",
    ),
    (
        lambda: KeyedJaggedTensor.from_features(DenseFeatures({"a": _i(2)})),
        TypeError,
        "takes a list of feature groups",
    ),
]


@pytest.mark.parametrize(("build", "exc", "match"), ERRORS)
def test_errors_name_the_feature(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_devices_must_agree():
    meta = torch.zeros(2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="feature 'b' is on meta, feature 'a' on cpu"):
        KeyedJaggedTensor.from_dense({"a": _i(2), "b": meta})


def test_constructor_accepts_capacity_length_per_key():
    values = torch.arange(6)
    lengths = torch.tensor([1, 2])
    kjt = KeyedJaggedTensor(["a"], values, lengths, length_per_key=[3], compact=False)
    assert kjt["a"].to_list() == [[0], [1, 2]] and kjt.validate() is kjt
    with pytest.raises(ValueError, match="length_per_key sums to 3 but values has 6 items"):
        KeyedJaggedTensor(["a"], values, lengths, length_per_key=[3])
    with pytest.raises(ValueError, match="lengths sum to 3 but values has 6 items"):
        KeyedJaggedTensor(["a"], values, lengths).validate()
    with pytest.raises(ValueError, match="lengths sum to 9 but values has 6 items"):
        KeyedJaggedTensor(["a"], values, torch.tensor([4, 5]), compact=False).validate()


# ---------------------------------------------------------------------- no host sync


def _build_all(user, tags, seq, seq_len, query, weights):
    kjt = KeyedJaggedTensor.from_features(
        [
            DenseFeatures({"user": user, "tags": tags}),
            PaddedFeatures({"seq": seq}, {"seq": seq_len}, side="left"),
            PaddedFeatures({"query": query}, pad=0),
        ]
    )
    jt = JaggedTensor.from_padded(seq, seq_len, weights=weights, compact=False)
    return kjt, jt


def _inputs(device: torch.device, batch: int = 6):
    gen = torch.Generator().manual_seed(5)
    return (
        torch.randint(0, 9, (batch,), generator=gen).to(device),
        torch.randint(0, 9, (batch, 2), generator=gen).to(device),
        torch.randint(1, 9, (batch, 5), generator=gen).to(device),
        torch.randint(0, 6, (batch,), generator=gen).to(device),
        torch.randint(0, 3, (batch, 4), generator=gen).to(device),
        torch.rand(batch, 5, generator=gen).to(device),
    )


@pytest.mark.slow
def test_constructors_compile_into_one_graph():
    """fullgraph=True fails on any host read (.tolist(), .item(), data-dependent sizes)."""

    def tensors(*args):
        kjt, jt = _build_all(*args)
        return kjt.values(), kjt.lengths(), kjt.offsets(), jt.values, jt.offsets, jt.weights

    def dense(user, tags):
        kjt = KeyedJaggedTensor.from_dense({"user": user, "tags": tags})
        return kjt.values(), kjt.lengths(), kjt["tags"].values, kjt["tags"].offsets

    args = _inputs(torch.device("cpu"))
    compiled = torch.compile(tensors, fullgraph=True, backend="eager")
    for got, want in zip(compiled(*args), tensors(*args), strict=True):
        assert torch.equal(got, want)
    compiled_dense = torch.compile(dense, fullgraph=True, backend="eager")
    for got, want in zip(compiled_dense(*args[:2]), dense(*args[:2]), strict=True):
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_constructors_never_sync():
    device = torch.device("cuda")
    args = _inputs(device)
    cap = JaggedTensor.from_padded(args[2], args[3], weights=args[5], compact=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kjt, jt = _build_all(*args)
        kjt.offsets()
        dense = KeyedJaggedTensor.from_dense({"u": args[0], "t": args[1]})
        dense["t"].to_padded(max_len=2)  # per-key totals are known: views never sync
        KeyedJaggedTensor.concat([dense, kjt])
        KeyedJaggedTensor.from_jagged_dict({"cap": cap, "jt": jt})
        KeyedJaggedTensor.from_padded({"q": args[4]}, mask={"q": args[4] > 0})
        kjt.to(device)
        jt.to_padded(max_len=5, side="left")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same_kjt(
        kjt,
        KeyedJaggedTensor.from_jagged_dict(
            {
                "user": JaggedTensor.from_lengths(
                    args[0], torch.ones(6, dtype=torch.int64, device=device)
                ),
                "tags": JaggedTensor.from_lengths(args[1].reshape(-1), torch.full((6,), 2)),
                "seq": JaggedTensor.from_padded(args[2], args[3], side="left"),
                "query": masked_jagged(args[4], args[4] != 0, None),
            }
        ),
    )
