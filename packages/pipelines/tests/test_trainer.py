"""recstack.pipelines.Trainer: it learns and reports, resumes exactly after a kill or a
SIGTERM, accumulates gradients, clips them, trains several tasks and names bad
arguments; with embedding tables it trains them, resumes them exactly, evicts and
freezes them; under torchrun two ranks train like one process."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from rank_processes import run_ranks
from safetensors.torch import load_file
from torch import nn
from toys import Toy, make, same, toy_data

from recstack.columnio import ColumnReader, SyntheticCTRConfig, write_synthetic_ctr
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.feature_engine import Feature, FeatureEngine, Hash
from recstack.pipelines import (
    Callback,
    Stage,
    Task,
    Trainer,
)
from recstack.saver import Checkpointer
from recstack.sparse_optim import SparseAdam


def test_training_learns_and_reports(tmp_path: Path) -> None:
    model, trainer = make(tmp_path, eval_every=10, log_every=5)
    before = trainer.evaluate()["label/auc"]
    result = trainer.fit()
    assert result.step == 30 and result.epoch == 3 and result.samples == 3 * 640
    assert result.stopped_by is None and result.resumed_from is None
    assert result.metrics["label/auc"] > max(before, 0.8)
    assert {"label/logloss", "label/calibration", "label/ne"} <= set(result.metrics)
    assert result.checkpoint == tmp_path / "step-000000000030"
    assert Checkpointer(tmp_path).latest() == 30
    assert model.training  # evaluation restored the mode


@pytest.mark.parametrize("stop_at", [1, 7, 10, 23])
def test_killed_and_resumed_equals_uninterrupted(tmp_path: Path, stop_at: int) -> None:
    full, trainer = make(tmp_path / "a", checkpoint_every=5)
    trainer.fit()
    _, first = make(tmp_path / "b", max_steps=stop_at, checkpoint_every=5)
    assert first.fit().step == stop_at
    resumed, second = make(tmp_path / "b", checkpoint_every=5)
    result = second.fit()
    assert result.resumed_from == stop_at and result.step == 30
    assert same(full, resumed)
    assert second.lr_scheduler.get_last_lr() == trainer.lr_scheduler.get_last_lr()


def test_resume_from_a_periodic_checkpoint_after_a_crash(tmp_path: Path) -> None:
    class Crash(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 17:
                raise RuntimeError("boom")

    full, trainer = make(tmp_path / "a")
    trainer.fit()
    _, crashing = make(tmp_path / "b", checkpoint_every=5, callbacks=[Crash()])
    with pytest.raises(RuntimeError, match="boom"):
        crashing.fit()
    assert Checkpointer(tmp_path / "b").latest() == 15
    resumed, again = make(tmp_path / "b", checkpoint_every=5)
    assert again.fit().resumed_from == 15
    assert same(full, resumed)


def test_sigterm_checkpoints_and_stops(tmp_path: Path) -> None:
    class Kill(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    old = signal.getsignal(signal.SIGTERM)
    _, trainer = make(tmp_path, callbacks=[Kill()])
    result = trainer.fit()
    assert result.stopped_by == "SIGTERM" and result.step == 6
    assert Checkpointer(tmp_path).latest() == 6
    assert signal.getsignal(signal.SIGTERM) == old  # handlers restored


def test_gradient_accumulation_averages_batches() -> None:
    data = toy_data(n=256, batch=64)
    merged = [
        {k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(data[::2], data[1::2], strict=True)
    ]
    big, t_big = make(None, data=merged, epochs=1)
    small, t_small = make(None, data=data, epochs=1, grad_accumulation=2)
    for m in (big, small):
        m.net[2].p = 0.0  # no dropout: the two runs see the same function
    t_big.fit()
    r = t_small.fit()
    assert r.step == 2 and r.samples == 256
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_bounds_the_update() -> None:
    model, trainer = make(None, epochs=1, max_steps=1, clip_grad_norm=1e-3)
    trainer.dense_optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer.lr_scheduler = None
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit()
    with torch.no_grad():
        moved = torch.sqrt(
            sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), before, strict=True))
        )
    assert float(moved) <= 1e-3 * (1 + 1e-4)


def test_multi_task_losses_and_metrics() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)

        def forward(self, batch):
            return {"ctr": self.a(batch["x"]), "cvr": torch.sigmoid(self.b(batch["x"]))}

    data = [dict(d, conv=d["label"].flip(0)) for d in toy_data()]
    model = Two()
    tasks = [Task("ctr"), Task("cvr", label="conv", output="probability", weight=0.5)]
    trainer = Trainer(
        model, data, data, tasks=tasks, device="cpu", progress=False, log_every=1,
        dense_optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
    )  # fmt: skip
    result = trainer.fit()
    assert {"ctr/auc", "cvr/auc", "ctr/logloss", "cvr/logloss"} <= set(result.metrics)
    assert result.metrics["ctr/auc"] > 0.8


def test_bad_arguments_are_named() -> None:
    model = Toy()
    with pytest.raises(ValueError, match="Trainer: grad_accumulation must be an int >= 1, got 0"):
        Trainer(model, toy_data(), grad_accumulation=0, device="cpu")
    with pytest.raises(TypeError, match="Trainer: epochs must be an int, got 1.5"):
        Trainer(model, toy_data(), epochs=1.5, device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpointer"):
        Trainer(model, toy_data(), checkpoint_every=3, device="cpu")
    with pytest.raises(ValueError, match="precision"):
        Trainer(model, toy_data(), precision="int8", device="cpu")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="'click'"):
        Trainer(
            model, toy_data(), tasks=[Task("ctr", label="click")], device="cpu", progress=False
        ).fit()


SCHEMA = {"sparse_0": "int", "sparse_1": "int", "user_id": "string", "dense_0": "float"}


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
    def __init__(self, hbm_budget: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        tiered = {"hbm_budget": hbm_budget}
        self.embeddings = EmbeddingCollection(
            [
                TableConfig("a", dim=4, **tiered),
                TableConfig("b", dim=4),
                TableConfig("user", dim=4, **tiered),
            ],  # fmt: skip
            [FeatureConfig("a", "a"), FeatureConfig("b", "b"), FeatureConfig("user", "user")],
        )
        self.head = nn.Sequential(nn.Linear(13, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 1))

    def forward(self, inputs: dict) -> torch.Tensor:
        out = self.embeddings(inputs["sparse"])
        x = torch.cat([out["a"], out["b"], out["user"], inputs["dense"]], dim=1)
        return self.head(x)


def build(
    files: list[str],
    root: Path | None,
    *,
    batch_size: int = 128,
    shuffle: bool | str = "window",
    hbm_budget: int | None = None,
    **kw,
) -> tuple[Small, Trainer]:
    model = Small(hbm_budget)
    cols = [*SCHEMA, "label"]
    kw.setdefault("epochs", 2)
    trainer = Trainer(
        model,
        ColumnReader(files[:2], cols, batch_size=batch_size, shuffle=shuffle, seed=3,
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


def test_tiered_tables_train_and_resume_exactly_as_all_gpu_ones(
    data: list[str], tmp_path: Path
) -> None:
    """Tables with a tenth of their rows in the GPU tier: the Trainer hands them each next
    batch (prefetch), and training, its checkpoints and a resume are unchanged."""
    full, t_full = build(data, None, hbm_budget=10**9)
    t_full.fit()
    tiered, t_tiered = build(data, None, hbm_budget=24, log_every=4)
    logged: list[dict[str, float]] = []

    class Logs(Callback):
        def on_step_end(self, trainer, step, logs) -> None:  # noqa: ANN001
            logged.append(dict(logs))

    t_tiered.callbacks.append(Logs())
    assert t_tiered.fit().step == 32
    assert t_tiered._prefetch is not None and t_tiered._prefetch.sent > 0
    stats = tiered.embeddings.tier_stats()
    assert stats["a"].rows > 9 * stats["a"].device_rows and stats["a"].promoted > 0
    # Every 4th step logs what each tiered table did since the previous log step.
    tier = [x for x in logged if "tier/a/hit_rate" in x]
    assert [int(x["step"]) for x in tier] == list(range(4, 33, 4))
    assert "tier/b/hit_rate" not in logged[-1]  # b has no budget
    for name in ("a", "user"):
        assert all(0.0 <= x[f"tier/{name}/hit_rate"] <= 1.0 for x in tier)
        assert sum(x[f"tier/{name}/promoted"] for x in tier) == stats[name].promoted
        assert sum(x[f"tier/{name}/host_bytes"] for x in tier) == stats[name].host_bytes
    a, b = snapshot(full), snapshot(tiered)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, first = build(data, tmp_path, hbm_budget=24, max_steps=11, checkpoint_every=100)
    first.fit()
    resumed, second = build(data, tmp_path, hbm_budget=24, checkpoint_every=100)
    assert second.fit().resumed_from == 11
    c = snapshot(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_accumulation_matches_one_big_batch_for_the_tables(data: list[str]) -> None:
    big, t_big = build(data, None, batch_size=256, shuffle=False, epochs=1, max_steps=4)
    small, t_small = build(data, None, shuffle=False, epochs=1, max_steps=4, grad_accumulation=2)
    for m in (big, small):
        m.head[2].p = 0.0
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


WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_two_ranks_train_like_one_process_on_the_whole_batches(tmp_path: Path) -> None:
    world = 2
    run_ranks(
        WORKER,
        world,
        lambda r: [str(tmp_path / "init"), str(tmp_path)],
        env={"PYTHONPATH": str(WORKER.parent)},
    )
    torch.manual_seed(1)
    single = Toy()
    single.net[2].p = 0.0
    Trainer(
        single, toy_data(), device="cpu", progress=False, epochs=2,
        dense_optimizer=torch.optim.AdamW(single.parameters(), lr=0.05),
    ).fit()  # fmt: skip
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]
    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the replicas agree
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ckpt" / "step-000000000020" / "manifest.json").is_file()


SHARDED_WORKER = Path(__file__).with_name("sharded_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pipeline", "dense"),
    [("off", "ddp"), ("ids", "ddp"), ("semi-sync", "ddp"), ("off", "fsdp"), ("ids", "fsdp")],
)
def test_two_ranks_with_sharded_tables_train_like_one_process(
    tmp_path: Path, pipeline: str, dense: str
) -> None:
    """``pipeline="ids"`` (the next batch's ids sent during each step) and
    ``dense_parallel="fsdp"`` (FSDP2: each rank holds half of every dense parameter and
    its AdamW moments) train the same; the FSDP2 checkpoint holds whole tensors that load
    into one process as into two ranks. ``"semi-sync"`` (the next batch looked up before
    each sparse update) trains the same too where consecutive batches share no id, as
    here: no row is read before an update it would have seen."""
    from safetensors.torch import load_file
    from sharded_toys import SparseToy, rows_of, sparse_data, trainer_for

    world = 2
    run_ranks(
        SHARDED_WORKER,
        world,
        lambda r: [str(tmp_path / "init"), str(tmp_path), pipeline, dense],
        env={"PYTHONPATH": str(SHARDED_WORKER.parent)},
    )
    single = SparseToy(sharded=False)
    # The ranks evaluated 3 batches each: the shorter share ends the evaluation on both.
    disjoint = pipeline == "semi-sync"
    result = trainer_for(
        single, sparse_data(disjoint=disjoint), sparse_data(seed=5, batches=3)
    ).fit()
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]
    for name, value in single.tower.state_dict().items():
        assert torch.equal(ranks[0][f"dense.{name}"], ranks[1][f"dense.{name}"]), name
        torch.testing.assert_close(ranks[0][f"dense.{name}"], value, rtol=1e-4, atol=1e-5)
    want = rows_of(single.ec)
    for table in ("item", "user"):
        got = {}
        for r in ranks:
            for i, k in enumerate(r[f"{table}.keys"].tolist()):
                got[k] = torch.cat(
                    [r[f"{table}.{s}"][i] for s in ("values", "exp_avg", "exp_avg_sq")]
                )
        keys = want[f"{table}.keys"].tolist()
        assert sorted(got) == sorted(keys), table
        for i, k in enumerate(keys):
            row = torch.cat([want[f"{table}.{s}"][i] for s in ("values", "exp_avg", "exp_avg_sq")])
            torch.testing.assert_close(got[k], row, rtol=1e-4, atol=1e-5, msg=f"{table} {k}")
    for r in ranks:
        assert float(r["auc"]) == pytest.approx(result.metrics["label/auc"], abs=1e-6)
    assert (tmp_path / "ckpt" / "step-000000000008" / "manifest.json").is_file()
    # The ranks' checkpoint, loaded by one process: whole dense tensors, every table row.
    loaded = SparseToy(sharded=False)
    one = trainer_for(loaded, [], [], Checkpointer(tmp_path / "ckpt", progress=False))
    one.checkpointer.load(**one.checkpoint_objects({}))
    for name, value in loaded.tower.state_dict().items():
        assert torch.equal(value, ranks[0][f"dense.{name}"]), name
    assert sorted(rows_of(loaded.ec)["item.keys"].tolist()) == sorted(
        k for r in ranks for k in r["item.keys"].tolist()
    )


def test_pipeline_without_sharded_tables_changes_nothing() -> None:
    """One process, no sharded tables: ``pipeline="ids"`` has nothing to send ahead and
    trains exactly as without it."""
    plain, t_plain = make(None)
    t_plain.fit()
    ahead, t_ahead = make(None, pipeline="ids")  # seeds dropout alike
    t_ahead.fit()
    assert same(plain, ahead) and t_ahead.step == t_plain.step
    assert t_ahead._prefetch is not None and t_ahead._prefetch.sent == 0
    with pytest.raises(ValueError, match="Trainer: pipeline"):
        make(None, pipeline="always")


DENSE_MODELS_WORKER = Path(__file__).with_name("dense_models_worker.py")


@pytest.mark.slow
def test_every_reference_model_trains_alike_in_ddp_and_fsdp(tmp_path: Path) -> None:
    """FSDP2 gathers every block's weights where the model reads them (the DIN's padded
    attention calls ``forward_padded``): two ranks train each reference model as DDP does."""
    from safetensors.torch import load_file

    for dense in ("ddp", "fsdp"):
        run_ranks(
            DENSE_MODELS_WORKER,
            2,
            lambda r, d=dense: [str(tmp_path / f"init-{d}"), str(tmp_path), d],
            env={"PYTHONPATH": str(DENSE_MODELS_WORKER.parent)},
        )
    ddp, fsdp = (load_file(str(tmp_path / f"{d}-rank0.safetensors")) for d in ("ddp", "fsdp"))
    assert set(ddp) == set(fsdp) and any(k.startswith("hstu.") for k in ddp)
    for key, value in ddp.items():
        torch.testing.assert_close(fsdp[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_sharded_tiered_tables_get_each_next_batch(tmp_path: Path) -> None:
    """A sharded collection with tiered tables takes each next batch from the Trainer
    (whatever the pipeline), each owner promoting the rows it will serve; training is
    exactly that of all-GPU tables."""
    import torch.distributed as dist
    from sharded_toys import SparseToy, rows_of, sparse_data, trainer_for

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        rows = []
        for budget in (8, 10**9):
            model = SparseToy(sharded=True, hbm_budget=budget)
            trainer = trainer_for(model, sparse_data(batches=6), None)
            assert trainer.fit().step == 12
            assert trainer._prefetch is not None and trainer._prefetch.collections == [model.ec]
            assert trainer._prefetch.sent == 10  # ahead of every step but each epoch's first
            stats = model.ec.tier_stats()["item"]
            if budget == 8:
                assert stats.rows > stats.device_rows == 8 and stats.promoted > 0
            rows.append(rows_of(model.ec))
    finally:
        dist.destroy_process_group()
    assert rows[0].keys() == rows[1].keys()
    for k in rows[0]:
        assert torch.equal(rows[0][k], rows[1][k]), k
