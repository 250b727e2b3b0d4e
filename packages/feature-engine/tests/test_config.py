"""Feature config files: loading every format, defaults, round trips and clear errors."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from recstack.feature_engine import ops
from recstack.feature_engine.config import (
    FeatureConfigError,
    dump_features,
    dumps_features,
    load_features,
    loads_features,
)
from recstack.feature_engine.feature import Feature, FeatureError

CONFIGS = Path(__file__).parent / "configs"
GOOD = CONFIGS / "good"
BAD = CONFIGS / "bad"
FORMATS = ("yaml", "json", "toml")

#: What configs/good/ctr.{yaml,json,toml} describe (their defaults give Hash seed 7).
CTR = [
    Feature("user", "user_id", [ops.Hash(seed=7, buckets=1_000_000)]),
    Feature("item", "item_id", [ops.Hash(seed=11, buckets=2_000_000)]),
    Feature("city", "city_name", [ops.Hash(seed=7, buckets=50_000)]),
    Feature("device", "device_type", [ops.Mod(16)]),
    Feature("item_multi", "item_id", [ops.MultiHash(k=3, seed=100, buckets=500_000)]),
    Feature("age_bucket", "age", [ops.FillMissing(30), ops.Bucketize((18, 25, 35, 50, 65))]),
    Feature("price_bucket", "price", [ops.Bucketize((0.99, 9.99, 99.99, 999.99), right=True)]),
    Feature("user_x_item", "user", [ops.Cross(("item",), buckets=100_000)]),
    Feature("user_x_city_x_device", "user", [ops.Cross(("city", "device"), 3, 100_000)]),
    Feature(
        "click_history",
        "click_seq",
        [ops.FilterIds((0, -1)), ops.Hash(7, 2_000_000), ops.Truncate(50), ops.Pad(50, 0)],
    ),
    Feature(
        "category_history",
        "category_seq",
        [ops.FilterIds((3, 5, 8), keep=True), ops.Truncate(20, "right"), ops.FillMissing(0)],
    ),
    Feature("query_terms", "query_tokens", [ops.Hash(7, 1_000_000), ops.FillMissing(0)]),
    Feature(
        "log_price",
        "price",
        [ops.FillMissing(0.0), ops.Clip(min=0.0), ops.Log1p(), ops.Normalize(2.3, 1.1)],
    ),
    Feature("dwell_time", "dwell_ms", [ops.Clip(0, 600_000), ops.Log1p()]),
    Feature("ctr_7d", None, [ops.FillMissing(0.0), ops.Clip(max=1.0), ops.Normalize(0.05, 0.02)]),
    Feature("is_weekend", "weekend", []),
]

# Names that trip up a careless writer: YAML scalars, TOML/JSON escapes, unicode.
AWKWARD = [
    "user",
    "yes",
    "null",
    "1e3",
    "0x10",
    "a b",
    'quo"te',
    "back\\slash",
    "tab\tname",
    "new\nline",
    "ctl\x01\x7f",
    "用户",
    "emoji😀",
    "-dash",
    "a.b",
    "#hash",
    "[x]",
    "key = v",
    "'single'",
    "~",
]


# --------------------------------------------------------------------------- helpers


def _random_op(rng: random.Random, name: str, names: list[str]) -> ops.Op:
    def seed() -> int:
        return rng.choice([0, rng.randrange(1 << 64), (1 << 64) - 1])

    def buckets() -> int | None:
        return rng.choice([None, rng.randrange(1, 1 << 63)])

    def number() -> float | int:
        return rng.choice(
            [rng.randrange(-1000, 1000), rng.uniform(-1e6, 1e6), rng.uniform(-1, 1) * 1e300]
        )

    kind = rng.choice(sorted(ops.OPS))
    if kind == "Hash":
        return ops.Hash(seed(), buckets())
    if kind == "Mod":
        return ops.Mod(rng.randrange(1, 1 << 63))
    if kind == "Bucketize":
        bounds = sorted({number() for _ in range(rng.randint(1, 6))})
        return ops.Bucketize(tuple(bounds), rng.random() < 0.5)
    if kind == "MultiHash":
        k = rng.randint(1, 64)
        return ops.MultiHash(k, rng.randrange((1 << 64) - k + 1), buckets())
    if kind == "Cross":
        others = rng.sample([n for n in names if n != name], rng.randint(1, 3))
        return ops.Cross(tuple(others), seed(), buckets())
    if kind == "Truncate":
        return ops.Truncate(rng.randint(0, 1000), rng.choice(["left", "right"]))
    if kind == "Pad":
        return ops.Pad(
            rng.randint(0, 100),
            rng.randrange(-(1 << 63), 1 << 63),
            rng.choice(["left", "right"]),
            rng.choice(["left", "right"]),
        )
    if kind == "FilterIds":
        ids = [rng.randrange(-(1 << 63), 1 << 63) for _ in range(rng.randint(0, 5))]
        return ops.FilterIds(tuple(ids), rng.random() < 0.5)
    if kind == "FillMissing":
        return ops.FillMissing(rng.choice([number(), math.inf, -math.inf, 0, -0.0]))
    if kind == "Log1p":
        return ops.Log1p()
    if kind == "Clip":
        lo, hi = sorted([number(), number()])
        return rng.choice(
            [ops.Clip(lo, hi), ops.Clip(min=lo), ops.Clip(max=hi), ops.Clip(-math.inf, math.inf)]
        )
    assert kind == "Normalize"
    return ops.Normalize(number(), rng.uniform(1e-6, 1e6))


def _random_features(seed: int, n: int) -> list[Feature]:
    rng = random.Random(seed)
    names = rng.sample(AWKWARD, n) if n <= len(AWKWARD) else [f"f{i}" for i in range(n)]
    features = []
    for name in names:
        source = rng.choice([None, rng.choice(AWKWARD), f"col_{rng.randrange(100)}"])
        chain = [_random_op(rng, name, names) for _ in range(rng.randint(0, 4))]
        features.append(Feature(name, source, chain))
    return features


def _load_error(path: Path, **kwargs) -> FeatureConfigError:
    with pytest.raises(FeatureConfigError) as info:
        load_features(path, **kwargs)
    return info.value


# --------------------------------------------------------------------------- good files


@pytest.mark.parametrize("name", ["ctr.yaml", "ctr.json", "ctr.toml"])
def test_realistic_config_loads_in_every_format(name: str) -> None:
    features = load_features(GOOD / name)
    assert features == CTR
    # The example exercises every op, sparse and dense.
    assert {type(op).__name__ for f in features for op in f.ops} == set(ops.OPS)
    assert features[14].source == "ctr_7d"  # no source: the feature's own name


def test_path_may_be_str_or_pathlike() -> None:
    assert load_features(str(GOOD / "ctr.yaml")) == load_features(GOOD / "ctr.yaml")


def test_yml_extension_and_optional_fields() -> None:
    assert load_features(GOOD / "minimal.yml") == [
        Feature("user_id", None, [ops.Hash()]),
        Feature("hour", None, [ops.Mod(24)]),
        Feature("raw_score", None, []),
    ]


def test_toml_ops_as_array_of_tables_and_infinite_floats() -> None:
    assert load_features(GOOD / "tables.toml") == [
        Feature("tags", "tag_list", [ops.Hash(5, 4096), ops.Truncate(8, "right")]),
        Feature("score", None, [ops.Clip(-math.inf, math.inf)]),
    ]


def test_defaults_are_merged_and_the_op_wins() -> None:
    assert load_features(GOOD / "defaults.yaml") == [
        Feature("a", None, [ops.Hash(7, 1000)]),
        Feature("b", None, [ops.Hash(1, 1000)]),
        Feature("c", None, [ops.Hash(7, None)]),
        Feature(
            "d", None, [ops.FilterIds((1,), True), ops.FilterIds((2,), False), ops.Truncate(3)]
        ),
        Feature("e", None, [ops.MultiHash(2)]),
    ]


def test_yaml_anchors_and_merge_keys_are_not_duplicates() -> None:
    text = """
features:
  - name: a
    ops: [&h {op: Hash, seed: 3, buckets: 10}]
  - name: b
    ops: [*h, {<<: *h, buckets: 20}]
"""
    assert loads_features(text, "yaml") == [
        Feature("a", None, [ops.Hash(3, 10)]),
        Feature("b", None, [ops.Hash(3, 10), ops.Hash(3, 20)]),
    ]


def test_parsed_mapping_and_plain_list() -> None:
    doc = json.loads((GOOD / "ctr.json").read_text())
    assert load_features(doc) == CTR
    entries = [f.to_dict() for f in CTR]
    assert load_features(entries) == CTR
    assert load_features([]) == []
    assert load_features({"features": []}) == []
    with pytest.raises(TypeError, match="files only"):
        load_features(doc, format="json")
    with pytest.raises(TypeError, match="path, a config mapping or a list"):
        load_features(42)  # type: ignore[arg-type]


def test_format_override_and_unknown_extension(tmp_path: Path) -> None:
    conf = tmp_path / "features.conf"
    shutil.copy(GOOD / "ctr.toml", conf)
    assert load_features(conf, format="toml") == CTR
    assert load_features(GOOD / "minimal.yml", format="YML") == load_features(GOOD / "minimal.yml")
    err = _load_error(conf)
    assert "features.conf" in str(err) and ".conf" in str(err) and "format=" in str(err)
    with pytest.raises(FeatureConfigError, match="unknown config format 'xml'"):
        load_features(conf, format="xml")
    with pytest.raises(FeatureConfigError, match="unknown config format"):
        loads_features("features: []", "ini")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_through_a_file(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"out.{fmt}"
    dump_features(CTR, path)
    assert load_features(path) == CTR
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    dump_features(CTR[:2], path)  # overwrites in place
    assert load_features(path) == CTR[:2]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_round_trip_of_random_features(fmt: str, seed: int) -> None:
    features = _random_features(seed, n=12 + seed)
    assert loads_features(dumps_features(features, fmt), fmt) == features


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_of_awkward_names(fmt: str) -> None:
    features = [
        Feature(name, AWKWARD[-1 - i], [ops.Cross((AWKWARD[i - 1],)), ops.Hash(buckets=i + 1)])
        for i, name in enumerate(AWKWARD)
    ]
    assert loads_features(dumps_features(features, fmt), fmt) == features


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [0, 1])
def test_round_trip_of_empty_and_one_feature(tmp_path: Path, fmt: str, n: int) -> None:
    features = [Feature("only", "col", [ops.Hash(buckets=10)])][:n]
    path = tmp_path / f"f.{fmt}"
    dump_features(features, path, format=fmt)
    assert load_features(path) == features


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_keeps_nan(fmt: str) -> None:
    features = [Feature("x", None, [ops.FillMissing(math.nan), ops.Clip(max=math.inf)])]
    (back,) = loads_features(dumps_features(features, fmt), fmt)
    assert math.isnan(back.ops[0].value) and back.ops[1] == ops.Clip(max=math.inf)


def test_dumped_text_in_each_format() -> None:
    features = [
        Feature("user", "user_id", [ops.Hash(buckets=1000)]),
        Feature("age", None, [ops.Bucketize((18, 25.5))]),
    ]
    text = dumps_features(features, "toml")
    assert "[[features]]" in text
    assert '{op = "Hash", seed = 0, buckets = 1000}' in text  # an inline table, no null
    assert 'source = "user_id"' in text and text.count("source") == 1  # source == name: omitted
    assert tomllib.loads(text)["version"] == 1

    text = dumps_features(features, "yaml")
    assert "null" not in text and text.count("source") == 1
    assert yaml.safe_load(text)["features"][1] == {
        "name": "age",
        "ops": [{"op": "Bucketize", "boundaries": [18, 25.5], "right": False}],
    }

    doc = json.loads(dumps_features(features, "json"))
    assert doc["features"][0] == {
        "name": "user",
        "source": "user_id",
        "ops": [{"op": "Hash", "seed": 0, "buckets": 1000}],
    }


def test_seeds_beyond_int64_round_trip_in_every_format() -> None:
    features = [
        Feature("big", None, [ops.Mod(3), ops.Hash(seed=(1 << 64) - 1), ops.MultiHash(2, 1 << 63)])
    ]
    for fmt in FORMATS:
        assert loads_features(dumps_features(features, fmt), fmt) == features
    assert "seed = 18446744073709551615" in dumps_features(features, "toml")


def test_dump_refuses_what_a_load_would_reject(tmp_path: Path) -> None:
    with pytest.raises(FeatureConfigError, match="feature 'a' .*duplicate feature name"):
        dumps_features([Feature("a"), Feature("a", "b")], "json")
    with pytest.raises(FeatureConfigError, match="itself"):
        dumps_features([Feature("a", "b", [ops.Cross(("a",))])], "yaml")
    with pytest.raises(TypeError, match=r"features\[1\] is a dict"):
        dumps_features([Feature("a"), {"name": "b"}], "json")  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list of Feature"):
        dumps_features(Feature("a"), "json")  # type: ignore[arg-type]
    with pytest.raises(FeatureConfigError, match="extension"):
        dump_features([Feature("a")], tmp_path / "f.txt")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad files

# file -> fragments its error message must contain (besides the file name).
BAD_CASES = {
    "syntax.yaml": ["invalid YAML at line 5, column 3"],
    "syntax.json": ["invalid JSON at line 5, column 5"],
    "syntax.toml": ["invalid TOML", "line 5"],
    "empty.yaml": ["is empty"],
    "top_level_list.yaml": ["expected a mapping", "got a list"],
    "missing_features.yaml": ["missing 'features'"],
    "unknown_top_key.json": ["unknown top-level key(s) ['options']"],
    "bad_version.toml": ["unsupported version 2", "only version 1"],
    "no_name.yaml": ["features[1]: missing 'name'"],
    "name_is_bool.yaml": ["features[0]: name must be a non-empty string", "quote it"],
    "duplicate_names.yaml": ["feature 'user' (features[2])", "duplicate", "features[0]"],
    "unknown_feature_field.yaml": ["feature 'item'", "'sorce'", "did you mean 'source'"],
    "unknown_op.yaml": ["feature 'user' (features[0]), op 1", "unknown op 'Hsh'", "'Hash'"],
    "unknown_param.toml": ["feature 'item'", "op 0 (Hash)", "'bukets'", "'buckets'"],
    "op_not_mapping.yaml": ["feature 'user'", "op 0", "must be a mapping"],
    "wrong_type.yaml": ["feature 'age_bucket' (features[1]), op 0 (Bucketize)", "'abc'"],
    "unsorted_boundaries.json": ["feature 'price_bucket'", "op 1 (Bucketize)", "increasing"],
    "empty_boundaries.yaml": ["feature 'age_bucket'", "op 0 (Bucketize)", "boundaries is empty"],
    "mod_zero.toml": ["feature 'hour' (features[1]), op 0 (Mod)", "m must be an int >= 1"],
    "cross_itself.yaml": ["feature 'user_x_item'", "op 0 (Cross)", "itself"],
    "duplicate_key.yaml": ["duplicate key 'buckets' at line 6 (first at line 5)"],
    "duplicate_key.json": ["feature 'user'", "op 0 (Hash)", "duplicate key(s) ['seed']"],
    "bad_default.yaml": ["feature 'item'", "op 0 (Hash)", "seed must be an int", "defaults"],
    "unknown_default_op.yaml": ["defaults: unknown op 'Hashh'", "'Hash'"],
    "unsafe_tag.yaml": ["invalid YAML at line 2", "python/object/apply"],
}


def test_every_bad_file_has_a_case() -> None:
    assert sorted(p.name for p in BAD.iterdir()) == sorted(BAD_CASES)


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_file_error_names_file_feature_and_op(name: str) -> None:
    err = _load_error(BAD / name)
    message = str(err)
    assert isinstance(err, FeatureError) and isinstance(err, ValueError)
    assert message.startswith(str(BAD / name) + ": "), message
    assert err.file == str(BAD / name)
    for fragment in BAD_CASES[name]:
        assert fragment in message, (fragment, message)


def test_error_attributes_locate_the_problem() -> None:
    err = _load_error(BAD / "unsorted_boundaries.json")
    assert (err.feature, err.index, err.op_index) == ("price_bucket", 0, 1)
    err = _load_error(BAD / "no_name.yaml")
    assert (err.feature, err.index, err.op_index) == (None, 1, None)
    err = _load_error(BAD / "bad_version.toml")
    assert (err.feature, err.index, err.op_index) == (None, None, None)


def test_syntax_errors_keep_the_parser_error_as_cause() -> None:
    assert isinstance(_load_error(BAD / "syntax.json").__cause__, json.JSONDecodeError)
    assert isinstance(_load_error(BAD / "syntax.toml").__cause__, tomllib.TOMLDecodeError)
    assert isinstance(_load_error(BAD / "syntax.yaml").__cause__, yaml.YAMLError)


def test_in_memory_errors_name_the_feature_without_a_file() -> None:
    entries = [{"name": "a", "ops": [{"op": "Hash"}]}, {"name": "b", "ops": [{"op": "Mod"}, 5]}]
    with pytest.raises(FeatureConfigError) as info:
        load_features(entries)
    assert str(info.value).startswith("feature 'b' (features[1]), op 1: an op must be a mapping")
    assert info.value.file is None


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"version": True, "features": []}, "unsupported version True"),
        ({"version": "1", "features": []}, "unsupported version '1'"),
        ({"features": None}, "'features' must be a list"),
        ({"features": {"user": {}}}, "'features' must be a list"),
        ({"features": ["user"]}, "features[0]: a feature entry must be a mapping"),
        ({"features": [{"name": ""}]}, "features[0]: name must be a non-empty string"),
        ({"features": [{"name": "a", "source": 3}]}, "feature 'a' (features[0]): source must"),
        ({"features": [{"name": "a", "ops": {"op": "Hash"}}]}, "ops must be a list"),
        ({"features": [{"name": "a", "ops": [{"buckets": 3}]}]}, "op 0: missing 'op'"),
        ({"features": [{"name": "a", "ops": [{"op": ["Hash"]}]}]}, "unknown op ['Hash']"),
        ({"features": [{"name": "a", "ops": [{"op": "Mask", "ids": "x"}]}]}, "op 0 (Mask)"),
        ({"defaults": [], "features": []}, "defaults: must map op names to params"),
        ({"defaults": {"Hash": {"sed": 1}}, "features": []}, "did you mean 'seed'"),
        ({"defaults": {"Hash": 7}, "features": []}, "defaults: Hash: params must be a mapping"),
        ({"defaults": {"Mask": {}, "FilterIds": {}}, "features": []}, "given twice"),
    ],
)
def test_bad_in_memory_configs(doc: dict, fragment: str) -> None:
    with pytest.raises(FeatureConfigError) as info:
        load_features(doc)
    assert fragment in str(info.value), str(info.value)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("features: [{name: caf\xe9}]".encode("latin-1"))
    err = _load_error(path)
    assert "latin1.yaml" in str(err) and "UTF-8" in str(err)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_features(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- PyYAML missing


def test_yaml_without_pyyaml_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    hint = r"pip install recstack-feature-engine\[yaml\]"
    with pytest.raises(ImportError, match=hint):
        load_features(GOOD / "ctr.yaml")
    with pytest.raises(ImportError, match=hint):
        loads_features("features: []", "yaml")
    with pytest.raises(ImportError, match="JSON or TOML"):
        dump_features(CTR, tmp_path / "out.yml")
    # JSON and TOML need nothing beyond the standard library.
    assert load_features(GOOD / "ctr.json") == load_features(GOOD / "ctr.toml") == CTR
    dump_features(CTR, tmp_path / "out.toml")
    assert load_features(tmp_path / "out.toml") == CTR


def test_a_multihash_output_named_like_a_feature_is_a_duplicate_name() -> None:
    mh = {"name": "a", "source": "i", "ops": [{"op": "MultiHash", "k": 2}]}
    plain = {"name": "a/1", "source": "i", "ops": [{"op": "Mod", "m": 3}]}
    with pytest.raises(
        FeatureConfigError,
        match=r"^feature 'a/1' \(features\[1\]\): duplicate feature name 'a/1': MultiHash "
        r"output of feature 'a' \(features\[0\]\)",
    ):
        load_features([mh, plain])
    with pytest.raises(
        FeatureConfigError,
        match=r"^feature 'a' \(features\[1\]\): its MultiHash output 'a/1' is a duplicate "
        r"feature name \(first defined at features\[0\]\)",
    ):
        load_features([plain, mh])
    # What a load would refuse is not written either.
    with pytest.raises(FeatureConfigError, match="duplicate feature name 'a/1'"):
        dumps_features([Feature("a", "i", [ops.MultiHash(2)]), Feature("a/1", "i")], "json")
