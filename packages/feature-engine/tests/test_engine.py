"""FeatureEngine: the fused graph gives what the plain per-feature loop gives, in O(1) launches."""

from __future__ import annotations

import math

import pytest
import torch

from recstack.core import JaggedTensor, KeyedJaggedTensor
from recstack.core import kernels as core_kernels
from recstack.feature_engine import (
    Bucketize,
    Clip,
    Cross,
    Feature,
    FeatureEngine,
    FeatureError,
    FillMissing,
    FilterIds,
    Hash,
    Log1p,
    Mod,
    MultiHash,
    Normalize,
    OpError,
    Pad,
    Truncate,
    load_features,
    run_per_feature,
    schema_of,
)

SCHEMA = {
    "user_id": "int",
    "item_id": "int",
    "price": "float",
    "age": "float",
    "hist": "int_list",
    "query": "string",
    "tags": "string_list",
    "cat": "int",
}


def make_batch(rows: int, seed: int = 0, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 6, (rows,), generator=g)
    words = ["red", "shoe", "", "lamp", "ünï", "x" * 20]
    queries = [words[int(i)] for i in torch.randint(0, len(words), (rows,), generator=g)]
    tag_rows = [
        [words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g)]
        for n in torch.randint(0, 4, (rows,), generator=g)
    ]
    price = torch.rand(rows, generator=g) * 100
    if rows:
        price[0] = float("nan")
    batch = {
        "user_id": torch.randint(-(2**62), 2**62, (rows,), generator=g),
        "item_id": torch.randint(0, 1000, (rows,), generator=g, dtype=torch.int32),
        "price": price,
        "age": torch.rand(rows, generator=g, dtype=torch.float64) * 90,
        "hist": JaggedTensor.from_lengths(
            torch.randint(0, 50, (int(lens.sum()),), generator=g), lens
        ),
        "query": JaggedTensor.from_strings(queries),
        "tags": JaggedTensor.from_string_lists(tag_rows),
        "cat": torch.randint(0, 10, (rows,), generator=g),
        "label": torch.rand(rows, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


FEATURES = [
    Feature("user", "user_id", [Hash(seed=3, buckets=1000)]),
    Feature("item", "item_id", [Mod(97)]),
    Feature("item_h", "item_id", [Hash(), Mod(1 << 20)]),
    Feature("price_b", "price", [Bucketize([1.5, 10, 50])]),
    Feature("age_b", "age", [Bucketize([18, 25, 35, 50, 65], right=True), Mod(4)]),
    Feature("hist_t", "hist", [Truncate(3), Hash(buckets=500)]),
    Feature("hist_r", "hist", [Truncate(2, side="right"), FilterIds([0, 1, 2, 3])]),
    Feature("hist_p", "hist", [Pad(4, value=-1, side="left")]),
    Feature("hist_keep", "hist", [FilterIds([5, 6, 7, 8, 9], keep=True), FillMissing(-7)]),
    Feature("q", "query", [Hash(seed=11)]),
    Feature("q2", "query", [Hash(buckets=77)]),
    Feature("tags_h", "tags", [Hash(buckets=1 << 16), Truncate(2)]),
    Feature("cat_b", "cat", [Bucketize([2, 5, 8])]),
    Feature("user_x_item", "user", [Cross(["item"], seed=5, buckets=10_000)]),
    Feature("u_i_c", "user", [Cross(["item", "cat_b"])]),
    Feature("tag_x_q", "tags_h", [Cross(["q"]), Truncate(3)]),
    Feature("user_mh", "user_id", [MultiHash(3, seed=1, buckets=100)]),
    Feature("of_feature", "user", [Mod(10)]),
    Feature("price_n", "price", [FillMissing(0.0), Clip(0, 80), Log1p(), Normalize(2.0, 0.5)]),
    Feature("age_d", "age", []),
    Feature("price_fb", "price", [FillMissing(-1.0), Clip(0, 60), Bucketize([0.0, 5.5, 50])]),
]


def check_against_loop(engine: FeatureEngine, batch: dict) -> dict:
    out = engine(batch)
    with core_kernels.use_backend("torch"):  # the oracle runs on the CPU whatever is forced
        want = run_per_feature(engine.features, {k: v.cpu() for k, v in batch.items()})
    kjt = out["sparse"]
    assert isinstance(kjt, KeyedJaggedTensor)
    for key in kjt:
        got = kjt[key]
        w = want[key]
        assert torch.equal(got.lengths().cpu(), w.lengths()), key
        assert torch.equal(got.values.cpu(), w.values), key
    dense_names = [d.name for d in engine.plan.dense]
    for j, name in enumerate(dense_names):
        torch.testing.assert_close(out["dense"][:, j].cpu(), want[name], equal_nan=True)
    return out


@pytest.mark.parametrize("rows", [0, 1, 7, 64])
def test_engine_matches_the_per_feature_loop(backend: str, device: str, rows: int) -> None:
    engine = FeatureEngine(FEATURES, SCHEMA)
    out = check_against_loop(engine, make_batch(rows, seed=rows, device=device))
    assert out["sparse"].stride() == rows
    assert set(out["sparse"].keys()) >= {"user", "user_x_item", "user_mh/0", "user_mh/2"}
    assert "user_mh" not in out["sparse"]
    assert out["dense"].shape == (rows, 2) and out["dense"].dtype == torch.float32
    assert "label" in out and "user_id" not in out  # unused columns pass through


def test_schema_from_the_first_batch_and_kjt_columns(backend: str, device: str) -> None:
    batch = make_batch(9, seed=3, device=device)
    hist = batch.pop("hist")
    batch["ids"] = KeyedJaggedTensor.from_jagged_dict({"hist": hist})
    engine = FeatureEngine([Feature("h", "hist", [Hash(buckets=10)])])
    out = engine(batch)
    with core_kernels.use_backend("torch"):
        want = run_per_feature(engine.features, batch)
    assert torch.equal(out["sparse"]["h"].values, want["h"].values)
    assert schema_of(batch)["hist"] == "int_list"


_VIEWS = {
    "aten::slice",
    "aten::select",
    "aten::as_strided",
    "aten::view",
    "aten::alias",
    "aten::narrow",
    "aten::expand",
    "aten::unsqueeze",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::detach",
    "aten::lift_fresh",
}


@pytest.mark.skipif(
    not (core_kernels.interpret_mode() or torch.cuda.is_available()),
    reason="the fused path is the Triton one: needs TRITON_INTERPRET=1 or a GPU",
)
def test_launches_do_not_grow_with_features(device: str) -> None:
    """A forward pass makes the same launches for 12 or 72 features (6x more)."""

    def graph(copies: int) -> list[Feature]:
        out = []
        for c in range(copies):
            out += [
                Feature(f"u{c}", "user_id", [Hash(seed=c, buckets=1000)]),
                Feature(f"i{c}", "item_id", [Mod(97 + c)]),
                Feature(f"p{c}", "price", [Bucketize([1.0, 10.0 + c])]),
                Feature(f"h{c}", "hist", [Truncate(2 + c % 3), Hash(buckets=50)]),
                Feature(f"f{c}", "hist", [FilterIds([c, c + 1]), FillMissing(0)]),
                Feature(f"q{c}", "query", [Hash(buckets=77)]),
                Feature(f"x{c}", f"u{c}", [Cross([f"i{c}"])]),
                Feature(f"n{c}", "price", [FillMissing(0.0), Log1p()]),
            ]
        return out

    batch = make_batch(16, seed=1, device=device)
    counts = []
    with core_kernels.use_backend("triton"):
        for copies in (2, 12):
            engine = FeatureEngine(graph(copies), SCHEMA)
            engine(batch)  # builds and caches the parameter tables
            cpu = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=cpu) as prof, core_kernels.count_launches() as k:
                engine(batch)
            ops = {
                e.key: e.count
                for e in prof.key_averages()
                if e.key.startswith("aten::") and e.key not in _VIEWS
            }
            counts.append((dict(k), ops))
    (kernels_small, ops_small), (kernels_big, ops_big) = counts
    assert kernels_small == kernels_big  # every Triton kernel: the same launches
    assert ops_small == ops_big  # and every other (non-view) torch op too


def test_dedupes_and_errors_at_construction() -> None:
    with pytest.raises(FeatureError, match="'f'.*unknown source 'nope'"):
        FeatureEngine([Feature("f", "nope", [Hash()])], SCHEMA)
    with pytest.raises(FeatureError, match="'f'.*float"):
        FeatureEngine([Feature("f", "price", [Hash()])], SCHEMA)
    with pytest.raises(FeatureError, match="itself"):
        FeatureEngine([Feature("f", "user_id", [Cross(["f"])])], SCHEMA)
    with pytest.raises(FeatureError, match="cycle"):
        FeatureEngine([Feature("a", "b", [Mod(3)]), Feature("b", "a", [Mod(3)])], SCHEMA)
    with pytest.raises(FeatureError, match="'s'.*Hash as its first op"):
        FeatureEngine([Feature("s", "query", [Mod(3)])], SCHEMA)
    with pytest.raises(FeatureError, match="'d'.*dense op"):
        FeatureEngine([Feature("d", "user_id", [Hash(), Log1p()])], SCHEMA)
    with pytest.raises(FeatureError, match="'a'.*defined twice"):
        FeatureEngine([Feature("a", "cat"), Feature("a", "cat")], SCHEMA)
    with pytest.raises(ValueError, match="strictly increasing"):
        Bucketize([3, 1])
    with pytest.raises(ValueError, match="empty"):
        Bucketize([])


def test_empty_sequences_and_batch(backend: str, device: str) -> None:
    batch = make_batch(5, seed=2, device=device)
    batch["hist"] = JaggedTensor.from_lengths(
        torch.empty(0, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
    ).to(device)
    engine = FeatureEngine(FEATURES, SCHEMA)
    check_against_loop(engine, batch)
    out = engine(make_batch(0, device=device))
    assert out["sparse"].values().numel() == 0


@pytest.mark.gpu
def test_cuda_is_bit_identical_to_cpu() -> None:
    engine = FeatureEngine(FEATURES, SCHEMA)
    cpu_batch = make_batch(257, seed=9)
    gpu = engine({k: v.cuda() for k, v in cpu_batch.items()})
    with core_kernels.use_backend("torch"):
        cpu = engine(cpu_batch)
    assert torch.equal(gpu["sparse"].values().cpu(), cpu["sparse"].values())
    assert torch.equal(gpu["sparse"].lengths().cpu(), cpu["sparse"].lengths())
    torch.testing.assert_close(gpu["dense"].cpu(), cpu["dense"], equal_nan=True)


def test_identical_features_are_computed_once(backend: str, device: str) -> None:
    features = [
        Feature("a", "user_id", [Hash(seed=4, buckets=100)]),
        Feature("b", "user_id", [Hash(seed=4, buckets=100)]),  # same as "a"
        Feature("c", "user_id", [Hash(seed=5, buckets=100)]),
        Feature("a_x_b", "a", [Cross(["b"])]),  # reads one buffer twice
        Feature("a_x_c", "a", [Cross(["c"])]),
        Feature("b_x_c", "b", [Cross(["c"])]),  # same as "a_x_c" once b is a
        Feature("t1", "hist", [Truncate(2), Mod(7)]),
        Feature("t2", "hist", [Truncate(2), Mod(7)]),
    ]
    engine = FeatureEngine(features, SCHEMA)
    computed = [n.name for level in engine.plan.levels for n in level]
    assert sorted(computed) == ["a", "a_x_b", "a_x_c", "c", "t1"]
    assert engine.plan.aliases == {"b": "a", "b_x_c": "a_x_c", "t2": "t1"}
    out = check_against_loop(engine, make_batch(11, seed=5, device=device))
    assert set(out["sparse"].keys()) == {f.name for f in features}


def test_a_batch_column_of_the_wrong_kind_is_named() -> None:
    engine = FeatureEngine(FEATURES, SCHEMA)
    batch = make_batch(4)
    batch["query"] = torch.arange(4)
    with pytest.raises(FeatureError, match="column 'query' should be string"):
        engine(batch)
    batch = make_batch(4)
    batch["user_id"] = torch.rand(4)
    with pytest.raises(FeatureError, match="column 'user_id' should be int"):
        engine(batch)


# --------------------------------------------------------------------------- names


def test_a_multihash_output_cannot_take_another_features_name() -> None:
    mh = Feature("a", "i", [MultiHash(2)])
    other = Feature("a/0", "i", [Mod(3)])
    schema = {"i": "int"}
    both = r"'a/0' is defined twice: as MultiHash output 'a/0' of feature 'a' \(features\[0\]\)"
    with pytest.raises(FeatureError, match=rf"^feature 'a/0': name {both} and as feature 'a/0'"):
        FeatureEngine([mh, other], schema)
    with pytest.raises(
        FeatureError,
        match=r"^feature 'a': name 'a/0' is defined twice: as feature 'a/0' \(features\[0\]\) "
        r"and as MultiHash output 'a/0' of feature 'a' \(features\[1\]\)",
    ):
        FeatureEngine([other, mh], schema)
    # Refused before any batch too, when the first batch supplies the schema.
    with pytest.raises(FeatureError, match="'a/1' is defined twice"):
        FeatureEngine([mh, Feature("a/1", "i", [])])
    # A MultiHash output may be read by name, as long as nothing else takes it.
    engine = FeatureEngine([mh, Feature("a/0_x", "i", [Cross(["a/0"])])], schema)
    assert sorted(engine({"i": torch.tensor([1, 2])})["sparse"].keys()) == ["a/0", "a/0_x", "a/1"]


def test_a_feature_named_like_a_hidden_cross_input_keeps_both(backend: str, device: str) -> None:
    features = [
        Feature("x", "user_id", [Hash(buckets=100), Cross(["y"])]),
        Feature("x@pre", "user_id", [Mod(3)]),  # the name the hidden Hash node used to take
        Feature("y", "cat", [Mod(5)]),
    ]
    out = check_against_loop(FeatureEngine(features, SCHEMA), make_batch(9, seed=4, device=device))
    assert out["sparse"]["x@pre"].values.max() < 3


# --------------------------------------------------------------------------- dense op values


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Clip(min=math.nan), "Clip min is NaN"),
        (lambda: Clip(max=math.nan), "Clip max is NaN"),
        (lambda: Clip(0.0, math.nan), "Clip max is NaN"),
        (lambda: Clip(min=math.inf), "Clip min=inf would turn every value into inf"),
        (lambda: Clip(max=-math.inf), "Clip max=-inf would turn every value into -inf"),
        (lambda: Normalize(mean=math.nan), "Normalize mean must be a finite number, got nan"),
        (lambda: Normalize(mean=math.inf), "Normalize mean must be a finite number, got inf"),
        (lambda: Normalize(mean=-math.inf), "Normalize mean must be a finite number, got -inf"),
        (lambda: Normalize(std=math.nan), "Normalize std must be a positive finite number"),
        (lambda: Normalize(std=math.inf), "Normalize std must be a positive finite number"),
        (lambda: Normalize(std=0), "Normalize std must be a positive finite number"),
    ],
)
def test_non_finite_dense_op_values_are_refused_by_the_op(make, message: str) -> None:
    with pytest.raises(OpError, match=f"^{message}"):
        make()


def test_non_finite_dense_op_values_name_the_feature_and_op() -> None:
    nan = {
        "name": "p",
        "source": "price",
        "ops": [{"op": "Log1p"}, {"op": "Clip", "max": math.nan}],
    }
    with pytest.raises(FeatureError, match=r"^feature 'p': op 1 \(Clip\): Clip max is NaN"):
        FeatureEngine([nan], SCHEMA)
    with pytest.raises(FeatureError, match=r"^feature 'p' \(features\[0\]\), op 1 \(Clip\)"):
        load_features([nan])
    # An op built around its own checks is still caught where the engine is built.
    clip = Clip(max=1.0)
    object.__setattr__(clip, "min", math.nan)
    with pytest.raises(FeatureError, match=r"^feature 'p': op 0 \(Clip\) min is NaN"):
        FeatureEngine([Feature("p", "price", [clip])], SCHEMA)
    norm = Normalize()
    object.__setattr__(norm, "mean", math.inf)
    with pytest.raises(FeatureError, match=r"^feature 'b': op 0 \(Normalize\) mean must be fin"):
        FeatureEngine([Feature("b", "price", [norm, Bucketize([0.0])])], SCHEMA)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Clip(max=1e39), r"op 0 \(Clip\) max 1e\+39 is beyond float32"),
        (lambda: Clip(min=-(10**400)), r"op 0 \(Clip\) min -1000.* is beyond float32"),
        (lambda: Normalize(mean=-1e300), r"op 0 \(Normalize\) mean -1e\+300 is beyond float32"),
        (lambda: Normalize(std=1e-50), r"op 0 \(Normalize\) std 1e-50 is not above 0 in float32"),
        (lambda: Normalize(std=10**400), r"op 0 \(Normalize\) std 1000.* is beyond float32"),
        (lambda: FillMissing(math.nan), r"op 0 \(FillMissing\) value is NaN"),
        (lambda: FillMissing(2.0**200), r"op 0 \(FillMissing\) value 1.6.*e\+60 is beyond float32"),
    ],
)
def test_dense_op_values_float32_cannot_hold_are_refused(make, message: str) -> None:
    op = make()
    with pytest.raises(FeatureError, match=rf"^feature 'p': {message}"):
        FeatureEngine([Feature("p", "price", [op])], SCHEMA)
    with pytest.raises(FeatureError, match=rf"^feature 'b': {message}"):
        FeatureEngine([Feature("b", "price", [op, Bucketize([0.0])])], SCHEMA)


def test_infinite_clip_bounds_on_the_open_side_still_work(backend: str, device: str) -> None:
    features = [
        Feature("p", "price", [Clip(-math.inf, math.inf)]),
        Feature("q", "price", [Clip(max=math.inf)]),
        Feature("u", "user_id", [Mod(3)]),
    ]
    batch = make_batch(6, device=device)
    out = check_against_loop(FeatureEngine(features, SCHEMA), batch)
    price = batch["price"].float().cpu()
    torch.testing.assert_close(out["dense"].cpu(), torch.stack([price, price], 1), equal_nan=True)


# --------------------------------------------------------------------------- FillMissing on ids


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, "must be an integer on integer ids, got nan"),
        (math.inf, "must be an integer on integer ids, got inf"),
        (-math.inf, "must be an integer on integer ids, got -inf"),
        (2.5, "must be an integer on integer ids, got 2.5"),
        (2**70, "1180591620717411303424 is outside int64"),
        (2**63, "9223372036854775808 is outside int64"),
        (2.0**63, "9223372036854775808 is outside int64"),
        (-(2**63) - 1, "-9223372036854775809 is outside int64"),
    ],
)
def test_fill_missing_on_ids_needs_an_int64_value(value: float, message: str) -> None:
    for source, index in (("hist", 1), ("query", 1), ("age", 1)):
        first = {"hist": Truncate(3), "query": Hash(), "age": Bucketize([18.0])}[source]
        with pytest.raises(
            FeatureError, match=rf"^feature 'h': op {index} \(FillMissing\) value {message}"
        ):
            FeatureEngine([Feature("h", source, [first, FillMissing(value)])], SCHEMA)


def test_fill_missing_on_ids_takes_the_int64_extremes_exactly(backend: str, device: str) -> None:
    features = [
        Feature("lo", "hist", [FillMissing(-(2**63))]),
        Feature("hi", "hist", [FillMissing(2**63 - 1)]),
        Feature("f", "hist", [FillMissing(-7.0)]),
    ]
    batch = {"hist": JaggedTensor.from_list([[5], []]).to(device)}
    out = FeatureEngine(features, {"hist": "int_list"})(batch)["sparse"]
    assert out["lo"].to_list() == [[5], [-(2**63)]]
    assert out["hi"].to_list() == [[5], [2**63 - 1]]
    assert out["f"].to_list() == [[5], [-7]]


# --------------------------------------------------------------------------- Bucketize exactness


def test_integer_boundaries_past_2_53_bucketize_ids_exactly(backend: str, device: str) -> None:
    big = 2**53
    bounds = (big, big + 1, big + 2)
    features = [
        Feature("one", "i", [Bucketize([big + 1])]),
        Feature("left", "i", [Bucketize(bounds)]),
        Feature("right", "i", [Bucketize(bounds, right=True)]),
        Feature("mixed", "i", [Bucketize([2.0, big + 1])]),  # an integral float is fine
    ]
    ids = torch.tensor([big - 1, big, big + 1, big + 2, big + 3], device=device)
    out = FeatureEngine(features, {"i": "int"})({"i": ids})["sparse"]
    assert out["one"].values.tolist() == [0, 0, 0, 1, 1]
    assert out["left"].values.tolist() == [0, 0, 1, 2, 3]
    assert out["right"].values.tolist() == [0, 1, 2, 3, 3]
    assert out["mixed"].values.tolist() == [1, 1, 1, 2, 2]


def test_bucketize_boundaries_ids_or_float64_cannot_hold_are_refused() -> None:
    with pytest.raises(OpError, match=r"^boundaries must be strictly increasing"):
        Bucketize([2**53 + 1, 2.0**53])  # 2**53 + 1 > 2.0**53, compared exactly
    ids = {"i": "int"}
    with pytest.raises(
        FeatureError,
        match=r"^feature 'b': op 1 \(Bucketize\) boundary must be an integer on integer ids, "
        r"got 2.5",
    ):
        FeatureEngine([Feature("b", "i", [Mod(7), Bucketize([1, 2.5])])], ids)
    with pytest.raises(
        FeatureError,
        match=r"^feature 'b': op 0 \(Bucketize\) boundary 9223372036854775808 is outside int64",
    ):
        FeatureEngine([Feature("b", "i", [Bucketize([0, 2**63])])], ids)
    floats = {"x": "float"}
    with pytest.raises(
        FeatureError,
        match=r"^feature 'b': op 0 \(Bucketize\) boundaries 9007199254740992 and "
        r"9007199254740993 are the same float64",
    ):
        FeatureEngine([Feature("b", "x", [Bucketize([2**53, 2**53 + 1])])], floats)
    with pytest.raises(
        FeatureError, match=r"^feature 'b': op 1 \(Bucketize\) boundary 1000.* is beyond float64"
    ):
        FeatureEngine([Feature("b", "x", [Log1p(), Bucketize([0, 10**400])])], floats)


# --------------------------------------------------------------------------- output keys


def test_an_input_column_named_like_an_output_key_is_refused() -> None:
    features = [Feature("p", "price", []), Feature("u", "user_id", [Mod(3)])]
    schema = {"price": "float", "user_id": "int", "dense": "float"}
    batch = {
        "price": torch.tensor([1.0]),
        "user_id": torch.tensor([4]),
        "dense": torch.tensor([5.0]),
    }
    clash = (
        r"^input column 'dense' would pass through \(passthrough='unused'\) under the key 'dense'"
    )
    with pytest.raises(FeatureError, match=clash + ".*dense_key='dense'"):
        FeatureEngine(features, schema)
    engine = FeatureEngine(features)  # no schema: the first batch is checked
    with pytest.raises(FeatureError, match=clash):
        engine(batch)
    with pytest.raises(FeatureError, match=r"^input column 'sparse' .*sparse_key='sparse'"):
        FeatureEngine(features, {**schema, "dense": "int"}, dense_key="d")(
            {**batch, "sparse": torch.tensor([1])}
        )
    with pytest.raises(FeatureError, match=r"^input column 'price' .*passthrough='all'"):
        FeatureEngine(features, schema, dense_key="price", passthrough="all")
    with pytest.raises(ValueError, match="sparse_key and dense_key are both 'out'"):
        FeatureEngine(features, schema, sparse_key="out", dense_key="out")

    # Each way out keeps both.
    out = FeatureEngine(features, schema, dense_key="dense_out")(batch)
    assert out["dense"] is batch["dense"] and out["dense_out"].tolist() == [[1.0]]
    out = FeatureEngine(features, schema, passthrough="none")(batch)
    assert sorted(out) == ["dense", "sparse"] and out["dense"].tolist() == [[1.0]]
    reads = [*features, Feature("d", "dense", [Bucketize([0.0])])]
    assert FeatureEngine(reads, schema)(batch)["dense"].tolist() == [[1.0]]  # read, not kept
    out = FeatureEngine(features[1:], schema)(batch)  # no dense features: no dense output
    assert out["dense"] is batch["dense"]
