"""The feature engine's output fed straight into a default EmbeddingCollection.

``Hash()`` without buckets gives full-range int64 ids; the default collection merges tables
of one ``(dim, dtype)``. The two compose: no error, no collision between tables, and
behaviour histories truncated and padded the way the feature engine's ``Truncate`` names
its sides, with their lengths.
"""

from __future__ import annotations

import torch

from recstack.core import JaggedTensor
from recstack.embedding_engine import (
    EmbeddingCollection,
    FeatureConfig,
    PaddedSequence,
    TableConfig,
)
from recstack.feature_engine import FeatureEngine

FEATURES = [
    {"name": "user", "source": "user_id", "ops": [{"op": "Hash"}]},
    {"name": "item", "source": "item_id", "ops": [{"op": "Hash"}]},
    {"name": "city", "source": "city_name", "ops": [{"op": "Hash", "seed": 3}]},
    {"name": "clicks", "source": "click_seq", "ops": [{"op": "Hash"}]},
]
SCHEMA = {"user_id": "int", "item_id": "int", "city_name": "string", "click_seq": "int_list"}


def test_hashed_ids_into_default_collection() -> None:
    engine = FeatureEngine(FEATURES, SCHEMA)
    batch = {
        # One raw id as a user, an item and a click: the same hashed value in three tables.
        "user_id": torch.tensor([5, 2**62, -1]),
        "item_id": torch.tensor([5, 7, 8]),
        "city_name": JaggedTensor.from_strings(["Hangzhou", "Lyon", "Hangzhou"]),
        "click_seq": JaggedTensor.from_list([[5, 7, 8, 9, 10], [], [11]]),
    }
    kjt = engine(batch)["sparse"]
    ids = kjt.values()
    assert bool((ids < 0).any()) and bool((ids >= 2**61).any())  # the full int64 range
    ec = EmbeddingCollection(
        [TableConfig("user", dim=8), TableConfig("item", dim=8), TableConfig("city", dim=8)],
        [
            FeatureConfig("user", "user"),
            FeatureConfig("item", "item"),
            FeatureConfig("city", "city"),
            FeatureConfig("clicks", "item", pooling="none", max_len=3, with_lengths=True),
        ],
    )
    assert list(ec.physical_tables) == ["user+item+city"]  # merged by default
    out = ec(kjt)
    assert out["user"].shape == out["item"].shape == out["city"].shape == (3, 8)
    # The hashed id of 5 is a user, an item and a click: two tables, two rows, and the
    # click shares the item's row.
    hashed5 = kjt["user"].values[:1]
    user_row = ec.find_rows("user", hashed5)
    item_row = ec.find_rows("item", hashed5)
    assert int(user_row) >= 0 and int(item_row) >= 0 and int(user_row) != int(item_row)
    assert not torch.equal(out["user"][0], out["item"][0])
    clicks = out["clicks"]
    assert isinstance(clicks, PaddedSequence)
    assert clicks.lengths.tolist() == [3, 0, 1]
    # Truncate's default side: the 3 most recent clicks (8, 9, 10) of the first user.
    recent = kjt["clicks"].values[2:5]
    rows = ec.find_rows("item", recent)
    values = ec.physical_tables["user+item+city"].values.gather_rows(rows)
    assert torch.equal(clicks.values[0], values)
    assert clicks.mask.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    n = ec.num_ids("user") + ec.num_ids("item") + ec.num_ids("city")
    assert n == len(ec.physical_tables["user+item+city"].hash_table) == 3 + 6 + 2
