"""Migration in: nn.Embedding / nn.EmbeddingBag weights and TorchRec state dicts into the
dynamic tables of an embedding collection (torchrec itself is not needed: its state dict
layout is built by hand)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recstack.core import KeyedJaggedTensor, ShardSpec, owner
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.saver import import_embedding_weight, import_torchrec_state_dict


def collection(**dims: int) -> EmbeddingCollection:
    dims = dims or {"item": 4}
    return EmbeddingCollection(
        [TableConfig(t, dim=d) for t, d in dims.items()],
        [FeatureConfig(f"f_{t}", t) for t in dims],
    )


def eval_rows(ec: EmbeddingCollection, table: str, ids: list[int]) -> torch.Tensor:
    """Eval lookups of ``ids`` in ``table`` (one id per bag, sum pooling: the id's row)."""
    ec.eval()
    lengths = torch.ones(len(ids), dtype=torch.int64)
    feats = [f"f_{t}" for t in ec.keyed_states()]
    values = torch.cat(
        [
            torch.tensor(ids) if f == f"f_{table}" else torch.zeros(len(ids), dtype=torch.int64)
            for f in feats
        ]
    )
    kjt = KeyedJaggedTensor(feats, values, lengths=lengths.repeat(len(feats)))
    return ec(kjt)[f"f_{table}"].detach()


def held_ids(ec: EmbeddingCollection, table: str) -> list[int]:
    chunks = ec.keyed_states()[table].export_chunks(1 << 10)
    return sorted(k for keys, _ in chunks for k in keys.tolist())


def test_nn_embedding_weight_into_a_fresh_collection() -> None:
    emb = nn.Embedding(10, 4)
    ec = collection()
    assert import_embedding_weight(ec.keyed_states()["item"], emb.weight, chunk_rows=3) == 10
    assert held_ids(ec, "item") == list(range(10))
    ids = [7, 0, 9, 3]
    assert torch.equal(eval_rows(ec, "item", ids), emb.weight.detach()[ids])


def test_explicit_ids_and_an_embedding_bag_module() -> None:
    bag = nn.EmbeddingBag(3, 4)
    ids = torch.tensor([100, 7, 55])
    ec = collection()
    assert import_embedding_weight(ec.keyed_states()["item"], bag, ids=ids) == 3
    assert held_ids(ec, "item") == [7, 55, 100]
    assert torch.equal(eval_rows(ec, "item", [55, 100, 7]), bag.weight.detach()[[2, 0, 1]])


def test_sharded_import_keeps_only_owned_ids() -> None:
    weight = torch.randn(20, 4)
    ids = torch.arange(20) * 1_000 + 1
    kept = []
    for rank in range(2):
        ec = collection()
        n = import_embedding_weight(
            ec.keyed_states()["item"], weight, ids=ids, shard=ShardSpec(2, rank), chunk_rows=6
        )
        mine = owner(ids, 2) == rank
        assert n == int(mine.sum())
        assert held_ids(ec, "item") == sorted(ids[mine].tolist())
        assert torch.equal(eval_rows(ec, "item", ids[mine].tolist()), weight[mine])
        kept.append(n)
    assert sum(kept) == 20 and all(kept)


def test_torchrec_ebc_state_dict_with_a_prefix() -> None:
    w1, w2 = torch.randn(6, 4), torch.randn(5, 3)
    prefix = "sparse_arch.embedding_bag_collection.embedding_bags"
    state_dict = {f"{prefix}.t1.weight": w1, f"{prefix}.t2.weight": w2}
    ec = collection(t1=4, t2=3)
    assert import_torchrec_state_dict(ec.keyed_states(), state_dict) == {"t1": 6, "t2": 5}
    assert torch.equal(eval_rows(ec, "t1", [5, 0, 2]), w1[[5, 0, 2]])
    assert torch.equal(eval_rows(ec, "t2", [4, 1]), w2[[4, 1]])


def test_torchrec_ec_state_dict_with_renamed_tables() -> None:
    w = torch.randn(4, 4)
    ec = collection(product=4)
    result = import_torchrec_state_dict(
        ec,  # an object with keyed_states() works too
        {"model.sparse.ec.embeddings.item.weight": w},
        table_names={"item": "product"},
        shard=ShardSpec(2, 1),
    )
    mine = owner(torch.arange(4), 2) == 1
    assert result == {"product": int(mine.sum())}
    assert held_ids(ec, "product") == torch.arange(4)[mine].tolist()


def test_torchrec_unknown_keys_and_tables() -> None:
    ec = collection()
    state_dict = {
        "embedding_bags.item.weight": torch.randn(3, 4),
        "embedding_bags.user.weight": torch.randn(3, 4),
        "over_arch.linear.weight": torch.randn(2, 2),
    }
    with pytest.raises(ValueError, match=r"not TorchRec embedding weights.*over_arch\.linear"):
        import_torchrec_state_dict(ec.keyed_states(), state_dict)
    with pytest.raises(
        ValueError,
        match=r"tables the states lack: user \(key embedding_bags\.user\.weight\)\. "
        r"Found tables: item, user; the states have: item\.",
    ):
        import_torchrec_state_dict(ec.keyed_states(), state_dict)
    assert held_ids(ec, "item") == []  # refused before importing anything
    assert import_torchrec_state_dict(ec.keyed_states(), state_dict, strict=False) == {"item": 3}
    assert held_ids(ec, "item") == [0, 1, 2]
    with pytest.raises(ValueError, match="table_names entries for tables the state dict lacks"):
        import_torchrec_state_dict(
            ec.keyed_states(),
            {"embeddings.item.weight": torch.randn(1, 4)},
            table_names={"x": "item"},
        )


def test_torchrec_ambiguous_tables() -> None:
    ec = collection(a=4, b=4)
    twice = {
        "x.embedding_bags.a.weight": torch.randn(2, 4),
        "y.embeddings.a.weight": torch.randn(2, 4),
    }
    with pytest.raises(ValueError, match="table 'a' appears under two keys"):
        import_torchrec_state_dict(ec.keyed_states(), twice)
    onto_one = {
        "embedding_bags.a.weight": torch.randn(2, 4),
        "embedding_bags.c.weight": torch.randn(2, 4),
    }
    with pytest.raises(ValueError, match="both map onto table 'a'"):
        import_torchrec_state_dict(ec.keyed_states(), onto_one, table_names={"c": "a"})


def test_torchrec_bad_weight_imports_nothing() -> None:
    ec = collection(a=4, b=4)
    state_dict = {
        "embedding_bags.a.weight": torch.randn(3, 4),
        "embedding_bags.b.weight": torch.randn(3, 5),
    }
    with pytest.raises(
        ValueError, match=r"'embedding_bags\.b\.weight' -> table 'b'.*width 5.*dim 4"
    ):
        import_torchrec_state_dict(ec.keyed_states(), state_dict)
    assert held_ids(ec, "a") == [] and held_ids(ec, "b") == []


def test_bad_shapes_and_ids_name_the_table() -> None:
    state = collection().keyed_states()["item"]
    with pytest.raises(ValueError, match=r"table 'item'.*must be 2-D"):
        import_embedding_weight(state, torch.randn(4))
    with pytest.raises(ValueError, match=r"table 'item'.*width 3 but the table has dim 4"):
        import_embedding_weight(state, torch.randn(5, 3))
    with pytest.raises(TypeError, match=r"table 'item'.*floating point"):
        import_embedding_weight(state, torch.ones(5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"table 'item'.*one id per weight row \(3\)"):
        import_embedding_weight(state, torch.randn(3, 4), ids=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match=r"table 'item'.*ids must be int64"):
        import_embedding_weight(
            state, torch.randn(2, 4), ids=torch.tensor([1, 2], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match=r"table 'item'.*id 7 appears more than once"):
        import_embedding_weight(state, torch.randn(3, 4), ids=torch.tensor([7, 1, 7]))
    with pytest.raises(ValueError, match="chunk_rows must be an int >= 1"):
        import_embedding_weight(state, torch.randn(3, 4), chunk_rows=0)
    assert state.state_metadata()["num_keys"] == 0  # nothing was imported
