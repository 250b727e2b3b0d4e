"""compile_plan: every check of a feature graph against its schema, done at construction.

The engine compiles its plan when it is built (with a schema) or on the first batch, so
these tests build engines; the errors come from :mod:`recstack.feature_engine.graph`.
"""

from __future__ import annotations

import math

import pytest
import torch
from feature_testdata import SCHEMA

from recstack.feature_engine import Feature, FeatureEngine, FeatureError, load_features, ops
from recstack.feature_engine.graph import COLUMN_KINDS, compile_plan, schema_of


def test_errors_at_construction() -> None:
    with pytest.raises(FeatureError, match="'f'.*unknown source 'nope'"):
        FeatureEngine([Feature("f", "nope", [ops.Hash()])], SCHEMA)
    with pytest.raises(FeatureError, match="'f'.*float"):
        FeatureEngine([Feature("f", "price", [ops.Hash()])], SCHEMA)
    with pytest.raises(FeatureError, match="itself"):
        FeatureEngine([Feature("f", "user_id", [ops.Cross(["f"])])], SCHEMA)
    with pytest.raises(FeatureError, match="cycle"):
        FeatureEngine([Feature("a", "b", [ops.Mod(3)]), Feature("b", "a", [ops.Mod(3)])], SCHEMA)
    with pytest.raises(FeatureError, match="'s'.*Hash as its first op"):
        FeatureEngine([Feature("s", "query", [ops.Mod(3)])], SCHEMA)
    with pytest.raises(FeatureError, match="'d'.*dense op"):
        FeatureEngine([Feature("d", "user_id", [ops.Hash(), ops.Log1p()])], SCHEMA)
    with pytest.raises(FeatureError, match="'a'.*defined twice"):
        FeatureEngine([Feature("a", "cat"), Feature("a", "cat")], SCHEMA)


def test_a_multihash_output_cannot_take_another_features_name() -> None:
    mh = Feature("a", "i", [ops.MultiHash(2)])
    other = Feature("a/0", "i", [ops.Mod(3)])
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
    engine = FeatureEngine([mh, Feature("a/0_x", "i", [ops.Cross(["a/0"])])], schema)
    assert sorted(engine({"i": torch.tensor([1, 2])})["sparse"].keys()) == ["a/0", "a/0_x", "a/1"]


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
    clip = ops.Clip(max=1.0)
    object.__setattr__(clip, "min", math.nan)
    with pytest.raises(FeatureError, match=r"^feature 'p': op 0 \(Clip\) min is NaN"):
        FeatureEngine([Feature("p", "price", [clip])], SCHEMA)
    norm = ops.Normalize()
    object.__setattr__(norm, "mean", math.inf)
    with pytest.raises(FeatureError, match=r"^feature 'b': op 0 \(Normalize\) mean must be fin"):
        FeatureEngine([Feature("b", "price", [norm, ops.Bucketize([0.0])])], SCHEMA)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ops.Clip(max=1e39), r"op 0 \(Clip\) max 1e\+39 is beyond float32"),
        (lambda: ops.Clip(min=-(10**400)), r"op 0 \(Clip\) min -1000.* is beyond float32"),
        (lambda: ops.Normalize(mean=-1e300), r"op 0 \(Normalize\) mean -1e\+300 is beyond float32"),
        (
            lambda: ops.Normalize(std=1e-50),
            r"op 0 \(Normalize\) std 1e-50 is not above 0 in float32",
        ),
        (lambda: ops.Normalize(std=10**400), r"op 0 \(Normalize\) std 1000.* is beyond float32"),
        (lambda: ops.FillMissing(math.nan), r"op 0 \(FillMissing\) value is NaN"),
        (
            lambda: ops.FillMissing(2.0**200),
            r"op 0 \(FillMissing\) value 1.6.*e\+60 is beyond float32",
        ),
    ],
)
def test_dense_op_values_float32_cannot_hold_are_refused(make, message: str) -> None:
    op = make()
    with pytest.raises(FeatureError, match=rf"^feature 'p': {message}"):
        FeatureEngine([Feature("p", "price", [op])], SCHEMA)
    with pytest.raises(FeatureError, match=rf"^feature 'b': {message}"):
        FeatureEngine([Feature("b", "price", [op, ops.Bucketize([0.0])])], SCHEMA)


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
        first = {"hist": ops.Truncate(3), "query": ops.Hash(), "age": ops.Bucketize([18.0])}[source]
        with pytest.raises(
            FeatureError, match=rf"^feature 'h': op {index} \(FillMissing\) value {message}"
        ):
            FeatureEngine([Feature("h", source, [first, ops.FillMissing(value)])], SCHEMA)


def test_bucketize_boundaries_ids_or_float64_cannot_hold_are_refused() -> None:
    ids = {"i": "int"}
    with pytest.raises(
        FeatureError,
        match=r"^feature 'b': op 1 \(Bucketize\) boundary must be an integer on integer ids, "
        r"got 2.5",
    ):
        FeatureEngine([Feature("b", "i", [ops.Mod(7), ops.Bucketize([1, 2.5])])], ids)
    with pytest.raises(
        FeatureError,
        match=r"^feature 'b': op 0 \(Bucketize\) boundary 9223372036854775808 is outside int64",
    ):
        FeatureEngine([Feature("b", "i", [ops.Bucketize([0, 2**63])])], ids)
    floats = {"x": "float"}
    with pytest.raises(
        FeatureError,
        match=r"^feature 'b': op 0 \(Bucketize\) boundaries 9007199254740992 and "
        r"9007199254740993 are the same float64",
    ):
        FeatureEngine([Feature("b", "x", [ops.Bucketize([2**53, 2**53 + 1])])], floats)
    with pytest.raises(
        FeatureError, match=r"^feature 'b': op 1 \(Bucketize\) boundary 1000.* is beyond float64"
    ):
        FeatureEngine([Feature("b", "x", [ops.Log1p(), ops.Bucketize([0, 10**400])])], floats)


def test_schema_kinds_are_checked_and_named() -> None:
    assert COLUMN_KINDS == ("int", "float", "int_list", "float_list", "string", "string_list")
    with pytest.raises(
        FeatureError, match=r"column 'x' has unknown kind 'ints'; the kinds are 'int'"
    ):
        compile_plan([Feature("x", "x", [ops.Mod(3)])], {"x": "ints"})


def test_schema_of_a_batch() -> None:
    batch = {"i": torch.tensor([1, 2]), "f": torch.tensor([0.5, 1.0]), "n": torch.zeros(2, 2)}
    assert schema_of(batch) == {"i": "int", "f": "float"}


def test_plan_levels_steps_and_aliases() -> None:
    features = [
        Feature("a", "i", [ops.Hash(buckets=10), ops.Truncate(2)]),
        Feature("b", "i", [ops.Hash(buckets=10), ops.Truncate(2)]),  # the same as "a"
        Feature("x", "a", [ops.Cross(["c"])]),
        Feature("c", "i", [ops.Mod(7)]),
        Feature("p", "f", [ops.Log1p()]),
    ]
    plan = compile_plan(features, {"i": "int_list", "f": "float"})
    assert [[n.name for n in level] for level in plan.levels] == [["c", "a"], ["x"]]
    assert plan.aliases == {"b": "a"}
    assert [s.kind for s in plan.levels[0][1].steps] == ["program", "truncate"]
    assert [d.name for d in plan.dense] == ["p"] and plan.columns == {"i": "int_list", "f": "float"}
