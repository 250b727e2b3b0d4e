"""EmbeddingCollection.sparse_parameters(): core SparseParameters over the stored gradients,
and when a training forward drops, keeps or refuses to drop them."""

from __future__ import annotations

import gc

import pytest
from embedding_testdata import kjt
from torch import nn

from recstack.core import SparseParameter
from recstack.embedding_engine import (
    DynamicEmbedding,
    EmbeddingCollection,
    EmbeddingSparseParameter,
    FeatureConfig,
    TableConfig,
    sparse_parameters,
)


def two_tables() -> EmbeddingCollection:
    return EmbeddingCollection(
        [TableConfig("a", dim=4), TableConfig("b", dim=2)],
        [FeatureConfig("fa", "a"), FeatureConfig("fb", "b")],
    )


def test_one_sparse_parameter_per_physical_table() -> None:
    ec = two_tables()
    params = list(ec.sparse_parameters())
    assert [p.name for p in params] == ["a", "b"]
    assert all(isinstance(p, SparseParameter) for p in params)
    assert [p.table for p in params] == [t.values for t in ec.physical_tables.values()]
    assert [n for n, _ in ec.named_sparse_parameters()] == ["a", "b"]
    assert list(ec.parameters()) == []  # rows are no nn.Parameters
    merged = EmbeddingCollection(
        [TableConfig("x", dim=4), TableConfig("y", dim=4)],
        [FeatureConfig("fx", "x"), FeatureConfig("fy", "y")],
    )
    assert [p.name for p in merged.sparse_parameters()] == ["x+y"]
    with pytest.raises(KeyError, match="no physical table 'x'"):
        EmbeddingSparseParameter(merged, "x")


def test_pending_grad_is_the_stored_one_and_clear_grad_drops_it() -> None:
    ec = two_tables()
    pa, pb = ec.sparse_parameters()
    assert pa.pending_grad() is None
    out = ec(kjt(ec.device, fa=[3, 4, 3], fb=[9]))
    (out["fa"].sum() + out["fb"].sum()).backward()
    ga = pa.pending_grad()
    assert ga is not None and ga.rows.tolist() == [0, 1]
    assert ga.values[:, 0].tolist() == [2.0, 1.0]
    pa.clear_grad()
    assert pa.pending_grad() is None and "a" not in ec.sparse_grads()
    assert pb.pending_grad() is not None  # other tables keep theirs


def test_training_forward_refuses_to_drop_unread_gradients() -> None:
    ec = two_tables()
    batch = kjt(ec.device, fa=[1, 2], fb=[])
    ec(batch)["fa"].sum().backward()
    with pytest.raises(RuntimeError, match=r"\['a'\] were never read.*accumulate"):
        ec(batch)
    assert "a" in ec.sparse_grads()  # the refused forward changed nothing
    ec(batch)  # read now: this forward drops it
    assert ec.sparse_grads() == {}


@pytest.mark.parametrize("how", ["sparse_grads", "pending_grad", "clear_grad", "zero_grad"])
def test_reading_or_clearing_lets_the_next_forward_start(how: str) -> None:
    ec = two_tables()
    (param,) = [p for p in ec.sparse_parameters() if p.name == "a"]
    batch = kjt(ec.device, fa=[1, 2], fb=[5])
    out = ec(batch)
    (out["fa"].sum() + out["fb"].sum()).backward()
    if how == "sparse_grads":
        ec.sparse_grads()
    elif how == "zero_grad":
        ec.zero_grad_sparse()
    else:
        getattr(param, how)()
        ec.sparse_grads()["b"]  # table b is read the classic way
    ec(batch)["fa"].sum().backward()
    assert ec.sparse_grads()["a"].values[:, 0].tolist() == [1.0, 1.0]  # not summed


def test_gradients_with_no_rows_do_not_block_and_eval_keeps_gradients() -> None:
    ec = two_tables()
    out = ec(kjt(ec.device, fa=[7], fb=[]))  # table b reads no ids: an empty gradient
    (out["fa"].sum() + out["fb"].sum()).backward()
    assert ec.sparse_grads()["b"].rows.numel() == 0
    ec.zero_grad_sparse()
    ec(kjt(ec.device, fa=[], fb=[]))["fa"].sum().backward()
    ec(kjt(ec.device, fa=[7], fb=[]))  # only empty gradients were pending
    ec(kjt(ec.device, fa=[7], fb=[]))["fa"].sum().backward()
    ec.eval()
    ec(kjt(ec.device, fa=[7, 8], fb=[1]))  # validation between backward and step
    assert next(ec.sparse_parameters()).pending_grad().rows.tolist() == [0]


def test_retain_graph_backwards_still_accumulate() -> None:
    ec = two_tables()
    out = ec(kjt(ec.device, fa=[2], fb=[]))["fa"].sum()
    out.backward(retain_graph=True)
    out.backward()
    (param, _) = ec.sparse_parameters()
    assert param.pending_grad().values[0].tolist() == [2.0] * 4


def test_sparse_parameters_of_a_model() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ec = two_tables()
            self.emb = DynamicEmbedding(TableConfig("c", dim=3))
            self.dense = nn.Linear(3, 1)

    model = Model()
    assert [p.name for p in sparse_parameters(model)] == ["a", "b", "c"]
    assert [p.name for p in model.emb.sparse_parameters()] == ["c"]
    assert list(sparse_parameters(nn.Linear(2, 2))) == []
    assert len(list(model.parameters())) == 2  # the dense weight and bias only


def test_a_parameter_outliving_its_collection_has_no_gradient() -> None:
    ec = two_tables()
    (param, _) = ec.sparse_parameters()
    ec(kjt(ec.device, fa=[1], fb=[]))["fa"].sum().backward()
    del ec
    gc.collect()
    assert param.pending_grad() is None
    param.clear_grad()  # nothing to clear: no error
    assert param.table.num_rows == 1  # the rows live on with whoever holds them
