"""FeatureEngine: the fused graph gives what the plain per-feature loop gives, in O(1) launches."""

from __future__ import annotations

import math

import pytest
import torch
from feature_testdata import SCHEMA

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
    Pad,
    Truncate,
    run_per_feature,
    schema_of,
)


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


def test_a_feature_named_like_a_hidden_cross_input_keeps_both(backend: str, device: str) -> None:
    features = [
        Feature("x", "user_id", [Hash(buckets=100), Cross(["y"])]),
        Feature("x@pre", "user_id", [Mod(3)]),  # the name the hidden Hash node used to take
        Feature("y", "cat", [Mod(5)]),
    ]
    out = check_against_loop(FeatureEngine(features, SCHEMA), make_batch(9, seed=4, device=device))
    assert out["sparse"]["x@pre"].values.max() < 3


# --------------------------------------------------------------------------- dense op values


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
