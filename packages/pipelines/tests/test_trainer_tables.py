"""The Trainer with dynamic embedding tables: sparse and dense steps, exact resume from a
shuffled ColumnReader, accumulation, eviction, frozen tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from recstack.columnio import ColumnReader, SyntheticCTRConfig, write_synthetic_ctr
from recstack.core import kernels
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.feature_engine import Feature, FeatureEngine, Hash
from recstack.pipelines import Stage, Trainer
from recstack.saver import Checkpointer
from recstack.sparse_optim import SparseAdam

SCHEMA = {"sparse_0": "int", "sparse_1": "int", "user_id": "string", "dense_0": "float"}


@pytest.fixture(autouse=True)
def torch_kernels():
    # The kernels have their own tests; the loop here only needs them to be right.
    with kernels.use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("ctr")
    cfg = SyntheticCTRConfig(num_rows=3_000, seed=5, num_dense=1, num_sparse=2,
                             vocab_size=300, seq_mean_len=0, string_ids=1,
                             string_vocab_size=200, signal_columns=2)  # fmt: skip
    info = write_synthetic_ctr(root / "d", cfg, rows_per_file=1_000)
    return [str(p) for p in info.paths]


def engine() -> FeatureEngine:
    return FeatureEngine(
        [Feature("a", "sparse_0"), Feature("b", "sparse_1"),
         Feature("user", "user_id", [Hash()]), Feature("dense_0", "dense_0")],
        SCHEMA,
    )  # fmt: skip


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embeddings = EmbeddingCollection(
            [TableConfig("a", dim=4), TableConfig("b", dim=4), TableConfig("user", dim=4)],
            [FeatureConfig("a", "a"), FeatureConfig("b", "b"), FeatureConfig("user", "user")],
        )
        self.head = nn.Sequential(nn.Linear(13, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 1))

    def forward(self, inputs: dict) -> torch.Tensor:
        out = self.embeddings(inputs["sparse"])
        x = torch.cat([out["a"], out["b"], out["user"], inputs["dense"]], dim=1)
        return self.head(x)


def build(files: list[str], root: Path | None, **kw) -> tuple[Small, Trainer]:
    model = Small()
    cols = [*SCHEMA, "label"]
    kw.setdefault("epochs", 2)
    trainer = Trainer(
        model,
        ColumnReader(files[:2], cols, batch_size=128, shuffle="window", seed=3,
                     shuffle_buffer=700),
        ColumnReader(files[2:], cols, batch_size=500),
        features=engine(),
        sparse_optimizer=SparseAdam(model.embeddings.sparse_parameters(), lr=0.05),
        dense_optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
        checkpointer=Checkpointer(root, progress=False) if root is not None else None,
        device="cpu", progress=False, **kw,
    )  # fmt: skip
    return model, trainer


def snapshot(model: Small) -> dict[str, torch.Tensor]:
    """Dense weights and every table's rows by id."""
    out = {
        f"dense.{k}": v.clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    for name, state in model.embeddings.keyed_states().items():
        keys, rows = [], []
        for k, slots in state.export_chunks(1 << 20):
            keys.append(k)
            rows.append(slots["values"])
        k, r = torch.cat(keys), torch.cat(rows)
        order = torch.argsort(k)
        out[f"{name}.keys"], out[f"{name}.values"] = k[order], r[order]
    return out


def test_tables_train_and_the_model_learns(data: list[str]) -> None:
    model, trainer = build(data, None, eval_every=10)
    before = trainer.evaluate()["label/auc"]
    result = trainer.fit()
    assert result.step == 2 * 16 and result.metrics["label/auc"] > before + 0.05
    assert model.embeddings.num_ids("a") > 0 and model.embeddings.num_ids("user") > 0


@pytest.mark.parametrize("stop_at", [5, 16, 21])
def test_kill_and_resume_is_exact_with_tables(
    data: list[str], tmp_path: Path, stop_at: int
) -> None:
    full, trainer = build(data, tmp_path / "a")
    trainer.fit()
    _, first = build(data, tmp_path / "b", max_steps=stop_at)
    assert first.fit().step == stop_at
    resumed, second = build(data, tmp_path / "b")
    assert second.fit().resumed_from == stop_at
    a, b = snapshot(full), snapshot(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_accumulation_matches_one_big_batch_for_the_tables(data: list[str]) -> None:
    big, t_big = build(data, None, epochs=1, max_steps=4)
    t_big.train_stream.source.batch_size = 256
    small, t_small = build(data, None, epochs=1, max_steps=4, grad_accumulation=2)
    for m in (big, small):
        m.head[2].p = 0.0
    t_big.train_stream.source.shuffle = t_small.train_stream.source.shuffle = False
    t_big.fit()
    t_small.fit()
    a, b = snapshot(big), snapshot(small)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_eviction_runs_every_n_steps(data: list[str]) -> None:
    model, trainer = build(data, None, epochs=1, evict_every=4, evict_older_than=2)
    seen = []
    orig = trainer.evict

    def spy():
        got = orig()
        seen.append((trainer.step, sum(got.values())))
        return got

    trainer.evict = spy  # type: ignore[method-assign]
    trainer.fit()
    assert [s for s, _ in seen] == [4, 8, 12, 16] and any(n > 0 for _, n in seen)


def test_frozen_tables_do_not_change(data: list[str]) -> None:
    model = Small()
    cols = [*SCHEMA, "label"]
    reader = ColumnReader(data[:1], cols, batch_size=128)
    trainer = Trainer(
        model, stages=[Stage("warm", reader), Stage("head only", reader, train_embeddings=False)],
        features=engine(),
        sparse_optimizer=SparseAdam(model.embeddings.sparse_parameters(), lr=0.05),
        dense_optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
        device="cpu", progress=False,
    )  # fmt: skip
    trainer.stages = trainer.stages[:1]
    trainer.fit()
    after_warm = snapshot(model)
    trainer.stages = [trainer.stages[0], Stage("head only", reader, train_embeddings=False)]
    trainer.fit()
    after = snapshot(model)
    for k in after_warm:
        if not k.startswith("dense."):
            assert torch.equal(after_warm[k], after[k]), k
    assert not torch.equal(after_warm["dense.head.0.weight"], after["dense.head.0.weight"])
