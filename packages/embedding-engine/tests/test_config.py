"""Table, feature, initializer, eviction and admission configs: validation and round trips."""

from __future__ import annotations

import json
import math
from typing import get_args

import pytest
import torch

from recstack.core.hashing import hash64
from recstack.core.jagged import JaggedTensor
from recstack.embedding_engine.config import (
    EVAL_DEFAULTS,
    EVICTION_POLICIES,
    INITIALIZER_KINDS,
    POOLINGS,
    TABLE_DTYPES,
    TRUNCATE_SIDES,
    Admission,
    ConfigError,
    EvalDefault,
    Eviction,
    EvictionPolicy,
    FeatureConfig,
    Initializer,
    InitializerKind,
    Pooling,
    TableConfig,
    TableDtypeName,
    TruncateSide,
    check_configs,
)

ALL_INITIALIZERS = [
    Initializer.zeros(),
    Initializer.constant(0.5),
    Initializer.uniform(-0.1, 0.2),
    Initializer.normal(0.1, 0.02),
    Initializer.truncated_normal(0.0, 0.5, -1.0, 3.0),
    Initializer.xavier_uniform(2.0),
    Initializer.xavier_normal(),
]


def _json_round_trip(cfg):
    data = json.loads(json.dumps(cfg.to_dict()))
    return type(cfg).from_dict(data)


# ---------------------------------------------------------------------------- Initializer


@pytest.mark.parametrize("init", ALL_INITIALIZERS, ids=lambda i: i.kind)
def test_initializer_round_trips_through_json(init: Initializer) -> None:
    back = _json_round_trip(init)
    assert back == init and hash(back) == hash(init)
    assert back.to_dict()["kind"] == init.kind


def test_initializer_constructors_match_kind_and_fill_defaults() -> None:
    assert Initializer("normal") == Initializer.normal()
    assert Initializer.normal().params == {"mean": 0.0, "std": 1.0}
    assert Initializer.truncated_normal(std=0.02).params == {
        "mean": 0.0,
        "std": 0.02,
        "a": -2.0,
        "b": 2.0,
    }
    assert Initializer("xavier_uniform").params == {"gain": 1.0}
    assert Initializer.zeros().params == {}
    assert repr(Initializer.uniform(-1, 1)) == "Initializer('uniform', low=-1.0, high=1.0)"
    assert set(INITIALIZER_KINDS) == {i.kind for i in ALL_INITIALIZERS}


@pytest.mark.parametrize(
    ("kind", "params", "match"),
    [
        ("gaussian", {}, "kind must be one of"),
        ("uniform", {"low": -1.0}, "'uniform'.*'high' is required"),
        ("uniform", {"low": 1.0, "high": 1.0}, "'uniform'.*low .* must be < high"),
        ("uniform", {"low": -1, "high": 1, "std": 2}, r"'uniform'.*unknown parameter.*\['std'\]"),
        ("zeros", {"value": 1}, r"'zeros'.*unknown parameter.*allowed: none"),
        ("constant", {}, "'constant'.*'value' is required"),
        ("constant", {"value": math.nan}, "'constant'.*value must be finite"),
        ("constant", {"value": True}, "'constant'.*value must be a number"),
        ("constant", {"value": "1"}, "'constant'.*value must be a number"),
        ("normal", {"std": 0.0}, "'normal'.*std must be > 0"),
        ("normal", {"mean": math.inf}, "'normal'.*mean must be finite"),
        ("truncated_normal", {"a": 1.0, "b": -1.0}, "'truncated_normal'.*a < b"),
        ("truncated_normal", {"a": -25.0}, "'truncated_normal'.*a < b"),
        ("xavier_normal", {"gain": -1.0}, "'xavier_normal'.*gain must be > 0"),
    ],
)
def test_initializer_errors_name_the_kind_and_parameter(kind, params, match) -> None:
    with pytest.raises(ConfigError, match=match):
        Initializer(kind, **params)


def test_initializer_from_dict_errors() -> None:
    with pytest.raises(ConfigError, match="missing 'kind'"):
        Initializer.from_dict({"low": 1.0})
    with pytest.raises(ConfigError, match=r"'normal'.*unknown parameter.*\['sd'\]"):
        Initializer.from_dict({"kind": "normal", "sd": 1.0})
    with pytest.raises(ConfigError, match="expected a mapping"):
        Initializer.from_dict(["uniform"])  # type: ignore[arg-type]


def test_initializer_support() -> None:
    assert Initializer.uniform(-1, 2).support(8) == (-1.0, 2.0)
    assert Initializer.xavier_uniform(2.0).support(12) == (-1.0, 1.0)  # 2 * sqrt(3 / 12)
    assert Initializer.truncated_normal(1.0, 0.5, -2.0, 1.0).support(4) == (0.0, 1.5)
    assert Initializer.constant(3).support(4) == (3.0, 3.0)
    assert Initializer.zeros().support(4) == (0.0, 0.0)
    assert Initializer.normal().support(4) == (-math.inf, math.inf)


# ---------------------------------------------------------------------------- Eviction / Admission


def test_eviction_valid_configs_and_round_trip() -> None:
    assert not Eviction().enabled
    for ev in (
        Eviction("lru", max_rows=100),
        Eviction("lfu", max_rows=1, ttl_steps=5, min_count=2),
        Eviction(ttl_steps=10),
        Eviction(min_count=3),
    ):
        assert ev.enabled
        assert _json_round_trip(ev) == ev


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "fifo"}, "Eviction: policy must be one of"),
        ({"policy": "none", "max_rows": 10}, "max_rows=10 needs policy 'lru' or 'lfu'"),
        ({"policy": "lru"}, "policy 'lru' needs max_rows"),
        ({"policy": "lfu", "max_rows": 0}, "max_rows must be an int >= 1, got 0"),
        ({"ttl_steps": 0}, "ttl_steps must be an int >= 1, got 0"),
        ({"ttl_steps": 2.5}, "ttl_steps must be an int"),
        ({"min_count": 1}, "min_count must be an int >= 2, got 1"),
        ({"min_count": True}, "min_count must be an int"),
    ],
)
def test_eviction_errors(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        Eviction(**kwargs)


def test_eviction_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"Eviction: unknown key\(s\) \['max'\]"):
        Eviction.from_dict({"policy": "lru", "max": 3})


def test_admission_validation_and_round_trip() -> None:
    assert not Admission().enabled
    adm = Admission(min_count=3, counter_slots=1 << 16)
    assert adm.enabled and _json_round_trip(adm) == adm
    with pytest.raises(
        ConfigError, match="Admission: min_count must be an int >= 1 and <= 2147483647"
    ):
        Admission(min_count=0)
    with pytest.raises(ConfigError, match="Admission: counter_slots must be an int >= 1 and <="):
        Admission(min_count=2, counter_slots=0)
    with pytest.raises(ConfigError, match=r"Admission: unknown key\(s\) \['slots'\]"):
        Admission.from_dict({"slots": 4})


# ---------------------------------------------------------------------------- TableConfig


def test_table_defaults() -> None:
    t = TableConfig("user", dim=16)
    assert t.dtype == torch.float32
    assert t.initializer == Initializer.uniform(-0.25, 0.25) == Initializer.default_for(16)
    assert t.eviction == Eviction() and t.admission == Admission()
    assert t.capacity is None and t.fixed_size is None and not t.is_fixed_size
    assert t.eval_default == "initializer"


def test_table_default_init_seed_is_xxh64_of_the_name() -> None:
    t = TableConfig("user", dim=4)
    expected = int(hash64(JaggedTensor.from_strings(["user"]))[0]) & (2**64 - 1)
    assert t.init_seed == expected
    assert TableConfig("item", dim=4).init_seed != t.init_seed
    assert TableConfig("user", dim=4, init_seed=7).init_seed == 7


def test_table_round_trips_through_json() -> None:
    t = TableConfig(
        "item",
        dim=8,
        dtype="bfloat16",
        initializer=Initializer.truncated_normal(std=0.01),
        eviction=Eviction("lfu", max_rows=1000, ttl_steps=50),
        admission=Admission(min_count=2, counter_slots=4096),
        capacity=1 << 20,
        eval_default="zeros",
    )
    assert t.dtype == torch.bfloat16
    back = _json_round_trip(t)
    assert back == t and hash(back) == hash(t)
    fixed = TableConfig("country", dim=4, dtype=torch.float16, fixed_size=300)
    assert fixed.is_fixed_size and _json_round_trip(fixed) == fixed


def test_table_accepts_nested_dicts() -> None:
    t = TableConfig(
        "item",
        dim=4,
        initializer={"kind": "normal", "std": 0.1},  # type: ignore[arg-type]
        eviction={"policy": "lru", "max_rows": 10},  # type: ignore[arg-type]
        admission={"min_count": 2},  # type: ignore[arg-type]
    )
    assert t.initializer == Initializer.normal(std=0.1)
    assert t.eviction == Eviction("lru", max_rows=10)
    assert t.admission == Admission(min_count=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "TableConfig: name must be a non-empty identifier"),
        ({"name": "user id"}, "TableConfig: name must be a non-empty identifier"),
        ({"name": 3}, "TableConfig: name must be a non-empty identifier"),
        ({"dim": 0}, "TableConfig 'user': dim must be an int >= 1, got 0"),
        ({"dim": 2.0}, "TableConfig 'user': dim must be an int"),
        ({"dim": True}, "TableConfig 'user': dim must be an int"),
        ({"dtype": torch.float64}, "TableConfig 'user': dtype must be one of"),
        ({"dtype": "fp8"}, "TableConfig 'user': dtype must be one of"),
        ({"initializer": "normal"}, "TableConfig 'user': initializer must be a Initializer"),
        (
            {"initializer": {"kind": "normal", "std": -1}},
            "TableConfig 'user': initializer: Initializer 'normal': std must be > 0",
        ),
        (
            {"eviction": {"policy": "lru"}},
            "TableConfig 'user': eviction: Eviction: policy 'lru' needs max_rows",
        ),
        ({"capacity": 0}, "TableConfig 'user': capacity must be an int >= 1"),
        ({"fixed_size": -3}, "TableConfig 'user': fixed_size must be an int >= 1"),
        ({"eval_default": "random"}, "TableConfig 'user': eval_default must be one of"),
        ({"init_seed": -1}, "TableConfig 'user': init_seed must be an int >= 0 and <= "),
        ({"init_seed": 2**64}, "TableConfig 'user': init_seed must be an int >= 0 and <= "),
        (
            {"fixed_size": 10, "eviction": Eviction(ttl_steps=3)},
            "TableConfig 'user': a fixed-size table .* does not evict",
        ),
        (
            {"fixed_size": 10, "admission": Admission(min_count=2)},
            "TableConfig 'user': a fixed-size table .* has no admission filter",
        ),
        ({"fixed_size": 10, "capacity": 64}, "TableConfig 'user': capacity is a hint"),
    ],
)
def test_table_errors_name_the_table_and_field(kwargs, match) -> None:
    args = {"name": "user", "dim": 8, **kwargs}
    with pytest.raises(ConfigError, match=match):
        TableConfig(**args)


def test_fixed_table_configs_reject_dynamic_features() -> None:
    with pytest.raises(ConfigError, match="does not evict"):
        TableConfig("t", dim=4, fixed_size=4, eviction=Eviction("lru", max_rows=2))
    with pytest.raises(ConfigError, match="no admission"):
        TableConfig("t", dim=4, fixed_size=4, admission=Admission(min_count=2))
    with pytest.raises(ConfigError, match="capacity"):
        TableConfig("t", dim=4, fixed_size=4, capacity=8)


def test_table_from_dict_errors_name_the_table() -> None:
    with pytest.raises(ConfigError, match=r"TableConfig 'user': unknown key\(s\) \['dims'\]"):
        TableConfig.from_dict({"name": "user", "dims": 8})
    with pytest.raises(ConfigError, match="TableConfig 'user': missing required key 'dim'"):
        TableConfig.from_dict({"name": "user"})
    with pytest.raises(ConfigError, match="TableConfig: missing required key 'name'"):
        TableConfig.from_dict({"dim": 4})
    with pytest.raises(ConfigError, match="TableConfig: expected a mapping"):
        TableConfig.from_dict([("name", "user")])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- FeatureConfig


def test_feature_configs_and_output_dims() -> None:
    assert FeatureConfig("f", "t").pooling == "sum"
    assert FeatureConfig("f", "t", pooling="mean", weighted=True).output_dim(8) == 8
    tile = FeatureConfig("hist", "item", pooling="tile", max_len=5)
    assert tile.output_dim(8) == 40 and tile.is_sequence
    seq = FeatureConfig("hist", "item", pooling="none")
    assert seq.max_len is None and seq.is_sequence and seq.output_dim(8) == 8
    assert FeatureConfig("hist", "item", pooling="none", max_len=3).max_len == 3
    # Long bags keep their most recent ids by default, as the feature engine's Truncate.
    assert seq.truncate == tile.truncate == "left" and not seq.with_lengths
    recent = FeatureConfig("hist", "item", pooling="none", max_len=3, with_lengths=True)
    first = FeatureConfig("hist", "item", pooling="tile", max_len=3, truncate="right")
    for f in (tile, seq, FeatureConfig("user.age", "t", weighted=True), recent, first):
        assert _json_round_trip(f) == f
    # A dict written before truncate/with_lengths existed loads with the defaults.
    old = {"name": "h", "table": "t", "pooling": "none", "max_len": 3, "weighted": False}
    assert FeatureConfig.from_dict(old).truncate == "left"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "FeatureConfig: name must be a non-empty string"),
        ({"table": "user table"}, "FeatureConfig 'f': table must be a non-empty identifier"),
        ({"pooling": "max"}, "FeatureConfig 'f': pooling must be one of"),
        ({"pooling": "tile"}, "FeatureConfig 'f': pooling 'tile' needs max_len"),
        ({"pooling": "sum", "max_len": 4}, "FeatureConfig 'f': max_len is only used by"),
        ({"pooling": "none", "max_len": 0}, "FeatureConfig 'f': max_len must be an int >= 1"),
        ({"pooling": "none", "weighted": True}, "FeatureConfig 'f': weighted needs pooling"),
        ({"weighted": 1}, "FeatureConfig 'f': weighted must be a bool"),
        (
            {"pooling": "none", "max_len": 3, "truncate": "end"},
            r"FeatureConfig 'f': truncate must be 'left' \(cut the start, keep the last",
        ),
        ({"truncate": None}, "FeatureConfig 'f': truncate must be 'left'"),
        ({"pooling": "none", "max_len": 3, "with_lengths": 1}, "with_lengths must be a bool"),
        (
            {"pooling": "none", "with_lengths": True},
            "with_lengths needs pooling 'none' with max_len.*already carries its offsets",
        ),
        ({"pooling": "tile", "max_len": 2, "with_lengths": True}, "with_lengths needs pooling"),
        ({"with_lengths": True}, r"with_lengths needs pooling 'none' with max_len \(a padded"),
    ],
)
def test_feature_errors_name_the_feature_and_field(kwargs, match) -> None:
    args = {"name": "f", "table": "t", **kwargs}
    with pytest.raises(ConfigError, match=match):
        FeatureConfig(**args)


def test_feature_from_dict_errors() -> None:
    with pytest.raises(ConfigError, match=r"FeatureConfig 'f': unknown key\(s\) \['pool'\]"):
        FeatureConfig.from_dict({"name": "f", "table": "t", "pool": "sum"})
    with pytest.raises(ConfigError, match="FeatureConfig 'f': missing required key 'table'"):
        FeatureConfig.from_dict({"name": "f"})


# ---------------------------------------------------------------------------- check_configs


def test_check_configs_accepts_shared_tables() -> None:
    tables = [TableConfig("user", 8), TableConfig("item", 16)]
    features = [
        FeatureConfig("user_id", "user"),
        FeatureConfig("item_id", "item"),
        FeatureConfig("clicks", "item", pooling="none"),
    ]
    by_name = check_configs(tables, features)
    assert list(by_name) == ["user", "item"] and by_name["item"] is tables[1]


@pytest.mark.parametrize(
    ("tables", "features", "match"),
    [
        ([], [], "at least one TableConfig"),
        (
            [TableConfig("a", 4), TableConfig("a", 8)],
            [FeatureConfig("f", "a")],
            "TableConfig 'a': duplicate table name",
        ),
        (
            [TableConfig("a", 4)],
            [FeatureConfig("f", "a"), FeatureConfig("f", "a", pooling="mean")],
            "FeatureConfig 'f': duplicate feature name",
        ),
        (
            [TableConfig("a", 4), TableConfig("b", 4)],
            [FeatureConfig("f", "a"), FeatureConfig("g", "c")],
            r"FeatureConfig 'g': table 'c' is not defined \(tables: a, b\)",
        ),
        (
            [TableConfig("a", 4), TableConfig("b", 4)],
            [FeatureConfig("f", "a")],
            "TableConfig 'b': no feature reads this table",
        ),
        (TableConfig("a", 4), [], "tables must be a list of TableConfig"),
        ([TableConfig("a", 4)], FeatureConfig("f", "a"), "features must be a list"),
        ([{"name": "a", "dim": 4}], [], r"tables\[0\] must be a TableConfig"),
        ([TableConfig("a", 4)], ["f"], r"features\[0\] must be a FeatureConfig"),
    ],
)
def test_check_configs_errors_name_the_table_or_feature(tables, features, match) -> None:
    with pytest.raises(ConfigError, match=match):
        check_configs(tables, features)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_literal_types_list_the_checked_values() -> None:
    assert get_args(Pooling) == POOLINGS == ("sum", "mean", "none", "tile")
    assert get_args(TruncateSide) == TRUNCATE_SIDES
    assert get_args(EvalDefault) == EVAL_DEFAULTS
    assert get_args(EvictionPolicy) == EVICTION_POLICIES
    assert set(get_args(InitializerKind)) == set(INITIALIZER_KINDS)
    assert set(get_args(TableDtypeName)) == set(TABLE_DTYPES)
