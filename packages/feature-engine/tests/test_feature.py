"""Feature: a named chain of ops over a source, and its dict form."""

from __future__ import annotations

import pytest

from recstack.feature_engine import ops
from recstack.feature_engine.feature import Feature, FeatureError, output_names


def test_source_defaults_to_the_name_and_ops_become_a_tuple() -> None:
    f = Feature("age", ops=[ops.Bucketize([18, 65])])
    assert f.source == "age" and f.ops == (ops.Bucketize((18, 65)),)
    assert Feature("h", "hist", ops.Truncate(3)).ops == (ops.Truncate(3),)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Feature(""), "name must be a non-empty string"),
        (lambda: Feature("a", ""), "feature 'a': source must be a column or feature name"),
        (lambda: Feature("a", "b", [ops.Mod(3), "Hash"]), "feature 'a': op 1 is a str, not an Op"),
    ],
)
def test_bad_features_are_refused(make, message: str) -> None:
    with pytest.raises(FeatureError, match=f"^{message}"):
        make()


def test_dict_round_trip_and_errors() -> None:
    f = Feature("q", "query", [ops.Hash(seed=3, buckets=100), ops.Truncate(2, "right")])
    assert Feature.from_dict(f.to_dict()) == f
    with pytest.raises(FeatureError, match=r"feature 'q': unknown field\(s\) \['sorce'\]"):
        Feature.from_dict({"name": "q", "sorce": "query"})
    with pytest.raises(FeatureError, match=r"feature 'q': op 0 \(Truncate\): side must be"):
        Feature.from_dict({"name": "q", "ops": [{"op": "Truncate", "side": "up"}]})
    with pytest.raises(FeatureError, match="ops must be a list"):
        Feature.from_dict({"name": "q", "ops": "Hash"})


def test_output_names() -> None:
    assert output_names(Feature("a", "i", [ops.Mod(3)])) == ["a"]
    assert output_names(Feature("a", "i", [ops.MultiHash(2)])) == ["a", "a/0", "a/1"]
