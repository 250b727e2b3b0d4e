"""recstack.saver.serving: serving exports read back as read-only lookups equal to what the
collection returns in eval; ids and rows only, in one dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from serving_testdata import IDS, TABLE, Model, eval_rows, trained
from torch import nn

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.saver import (
    CheckpointError,
    ServingModel,
    ServingTable,
    export_for_serving,
    load_for_inference,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_and_load_give_the_eval_rows(tmp_path: Path, dtype: torch.dtype) -> None:
    model = trained(IDS)
    out = export_for_serving(tmp_path / "serve", dtype=dtype, step=7, model=model)
    served = load_for_inference(out)
    assert isinstance(served, ServingModel)
    assert served.step == 7 and served.dtype == dtype
    assert list(served.tables) == [TABLE]
    table = served.tables[TABLE]
    assert len(table) == len(IDS) and table.dim == 4 and table.dtype == dtype
    query = [42, 3, 99, 1_000_003, -1]
    values, found = table.lookup(torch.tensor(query))
    assert found.tolist() == [True, True, False, True, False]
    known = [i for i in query if i in IDS]
    expected = eval_rows(model, known).to(dtype)
    assert torch.equal(values[found], expected)
    assert torch.equal(values[~found], torch.zeros(2, 4, dtype=dtype))
    assert torch.equal(table(torch.tensor(query)), values)  # the module's forward
    # Only ids and values were written: no optimizer or metadata slots.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "serving" and manifest["extra"]["dtype"] == str(dtype)[6:]
    assert set(manifest["tables"][TABLE]["slots"]) == {"values"}


def test_bf16_rows_are_the_fp32_rows_rounded(tmp_path: Path) -> None:
    model = trained(IDS)
    fp32 = load_for_inference(export_for_serving(tmp_path / "a", model=model)).tables[TABLE]
    bf16 = load_for_inference(
        export_for_serving(tmp_path / "b", dtype=torch.bfloat16, model=model)
    ).tables[TABLE]
    ids = torch.tensor(IDS)
    assert torch.equal(bf16(ids), fp32(ids).to(torch.bfloat16))


def test_default_row_for_unknown_ids(tmp_path: Path) -> None:
    model = trained(IDS)
    table = load_for_inference(export_for_serving(tmp_path / "s", model=model)).tables[TABLE]
    default = torch.tensor([1.0, 2.0, 3.0, 4.0])
    values, found = table.lookup(torch.tensor([[3, 8], [9, 17]]), default=default)
    assert values.shape == (2, 2, 4) and found.tolist() == [[True, False], [False, True]]
    assert torch.equal(values[0, 1], default) and torch.equal(values[1, 0], default)
    table.default = default  # the table's own default, used by forward
    assert torch.equal(table(torch.tensor([8]))[0], default)
    with pytest.raises(ValueError, match="default row has shape"):
        table.lookup(torch.tensor([8]), default=torch.zeros(3))
    with pytest.raises(TypeError, match="must be integers"):
        table.lookup(torch.tensor([1.0]))


def test_lookup_pooled_sum_and_mean(tmp_path: Path) -> None:
    model = trained(IDS)
    table = load_for_inference(export_for_serving(tmp_path / "s", model=model)).tables[TABLE]
    ids = torch.tensor([3, 17, 5, 99, 42])
    offsets = torch.tensor([0, 2, 2, 5])  # bags [3, 17], [], [5, 99, 42]
    rows = table(ids)
    summed = table.lookup_pooled(ids, offsets)
    assert torch.allclose(summed[0], rows[0] + rows[1])
    assert torch.equal(summed[1], torch.zeros(4))
    assert torch.allclose(summed[2], rows[2] + rows[4])  # 99 is unknown: zeros
    mean = table.lookup_pooled(ids, offsets, mode="mean")
    assert torch.allclose(mean[2], (rows[2] + rows[4]) / 3)  # unknown ids count
    weighted = table.lookup_pooled(ids, offsets, weights=torch.tensor([2.0, 1, 1, 1, 0]))
    assert torch.allclose(weighted[0], 2 * rows[0] + rows[1])
    assert torch.allclose(weighted[2], rows[2])
    with pytest.raises(ValueError, match="mode must be"):
        table.lookup_pooled(ids, offsets, mode="max")
    with pytest.raises(TypeError, match="offsets must be a 1-D int64"):
        table.lookup_pooled(ids, offsets.int())


def test_dense_state_dict_loads_into_a_fresh_linear(tmp_path: Path) -> None:
    model = trained(IDS)
    served = load_for_inference(
        export_for_serving(tmp_path / "s", dtype=torch.bfloat16, model=model)
    )
    assert served.dense_names == ["model"]
    state = served.dense_state_dict("model")
    assert set(state) == {"linear.weight", "linear.bias"}  # no step counters, no rows
    fresh = nn.Linear(4, 2).to(torch.bfloat16)
    fresh.load_state_dict(served.dense_state_dict("model.linear"))
    assert torch.equal(fresh.weight, model.linear.weight.detach().to(torch.bfloat16))
    assert torch.equal(fresh.bias, model.linear.bias.detach().to(torch.bfloat16))
    with pytest.raises(KeyError, match="no dense weights under 'model.tower'"):
        served.dense_state_dict("model.tower")


def test_a_serving_model_loads_dense_weights_around_its_tables(tmp_path: Path) -> None:
    model = trained(IDS)
    served = load_for_inference(export_for_serving(tmp_path / "s", model=model))

    class Server(nn.Module):
        def __init__(self, item: ServingTable) -> None:
            super().__init__()
            self.ec = item
            self.linear = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.linear(self.ec(ids))

    server = Server(served.tables[TABLE]).eval()
    server.load_state_dict(served.dense_state_dict("model"))  # strict: the rows are buffers
    ids = [17, 42]
    with torch.no_grad():
        assert torch.allclose(server(torch.tensor(ids)), model.linear(eval_rows(model, ids)))


def test_two_rank_export_loads_as_one_table(tmp_path: Path) -> None:
    ids = [[1, 2, 3, 10], [4, 5, 6, 11, 12]]
    models = [trained(part) for part in ids]
    out = tmp_path / "s"
    for rank, model in enumerate(models):
        export_for_serving(out, dtype=torch.float16, rank=rank, world_size=2, model=model)
        assert (out / "manifest.json").exists() == (rank == 1)
    served = load_for_inference(out)
    table = served.tables[TABLE]
    assert len(table) == 9 and table.dtype == torch.float16
    for part, model in zip(ids, models, strict=True):
        values, found = table.lookup(torch.tensor(part))
        assert bool(found.all())
        assert torch.equal(values, eval_rows(model, part).to(torch.float16))
    # The dense weights come from rank 0.
    assert torch.equal(
        served.dense_state_dict("model.linear")["weight"],
        models[0].linear.weight.detach().to(torch.float16),
    )


def test_an_id_on_two_ranks_is_refused_at_load(tmp_path: Path) -> None:
    out = tmp_path / "s"
    for rank in range(2):
        export_for_serving(out, rank=rank, world_size=2, model=trained([1, 2]))
    with pytest.raises(CheckpointError, match="appears more than once"):
        load_for_inference(out)


def test_corrupt_file_is_refused_naming_it(tmp_path: Path) -> None:
    out = export_for_serving(tmp_path / "s", model=trained(IDS))
    part = next((out / "sparse").rglob("*.safetensors"))
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{part.name}.*checksum mismatch"):
        load_for_inference(out)


def test_load_refuses_a_training_checkpoint(tmp_path: Path) -> None:
    from recstack.saver import Checkpointer

    ckpt = Checkpointer(tmp_path, rng=False)
    path = ckpt.save(1, model=trained(IDS))
    ckpt.close()
    with pytest.raises(CheckpointError, match="not a serving export"):
        load_for_inference(path)


def test_small_parts_and_an_empty_table(tmp_path: Path) -> None:
    model = trained(list(range(50)))
    empty = Model()
    out = export_for_serving(tmp_path / "s", part_bytes=200, model=model, other=empty)
    parts = list((out / "sparse").rglob("*.safetensors"))
    assert len(parts) > 5  # 200 bytes hold 8 rows of 4 floats and an id
    served = load_for_inference(out)
    assert len(served.tables[TABLE]) == 50 and len(served.tables["other.ec.item"]) == 0
    assert served.tables["other.ec.item"].dim == 4
    values, found = served.tables["other.ec.item"].lookup(torch.tensor([1]))
    assert not bool(found.any()) and torch.equal(values, torch.zeros(1, 4))
    assert torch.equal(served.tables[TABLE](torch.arange(50)), eval_rows(model, list(range(50))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_export_from_cuda_and_load_onto_cuda(tmp_path: Path) -> None:
    model = Model()
    model.ec = EmbeddingCollection(
        [TableConfig("item", dim=4)], [FeatureConfig("f", "item")], device="cuda"
    )
    model.linear.cuda()
    ids = torch.tensor(IDS, device="cuda")
    model.ec(
        KeyedJaggedTensor(
            ["f"], ids, lengths=torch.ones(len(IDS), dtype=torch.int64, device="cuda")
        )
    )
    out = export_for_serving(tmp_path / "s", dtype=torch.bfloat16, model=model)
    served = load_for_inference(out, device="cuda")
    table = served.tables[TABLE]
    values, found = table.lookup(torch.tensor([3, 99], device="cuda"))
    assert values.device.type == "cuda" and found.tolist() == [True, False]
    model.ec.eval()
    expected = model.ec(
        KeyedJaggedTensor(
            ["f"], ids, lengths=torch.ones(len(IDS), dtype=torch.int64, device="cuda")
        )
    )["f"]
    assert torch.equal(table(ids), expected.to(torch.bfloat16))
    pooled = table.lookup_pooled(ids[:2], torch.tensor([0, 2], device="cuda"))
    assert torch.allclose(pooled.float()[0], expected[:2].sum(0), atol=1e-2)
    assert served.dense_state_dict("model.linear")["weight"].device.type == "cuda"
