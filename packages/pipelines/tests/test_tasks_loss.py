"""Loss tasks (``Task(output="loss")``): a scalar loss the model computes itself, trained next
to click tasks by the Trainer, reported by evaluation, online windows and across ranks as
its row-weighted mean, and checked against the model's outputs by the run configuration.

Run as a script (``python test_tasks_loss.py RANK WORLD INIT_FILE OUT``) this file is one
gloo rank of the multi-process test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import Toy, toy_data

from recstack.core import JaggedTensor, KeyedJaggedTensor
from recstack.pipelines import Callback, Task, Trainer
from recstack.pipelines.evaluation import evaluate_model, task_metrics
from recstack.pipelines.tasks import batch_rows, compute_losses, predictions_of

TASKS = [Task("label"), Task("aux", output="loss", weight=0.5)]


class WithAux(nn.Module):
    """Click logits, and an auxiliary loss of its own: rebuild ``x`` through ``proj``."""

    def __init__(self, logits: bool = True) -> None:
        super().__init__()
        self.toy = Toy() if logits else None
        self.proj = nn.Linear(4, 4)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["x"]
        out = {"aux": F.mse_loss(self.proj(x), x)}
        if self.toy is not None:
            out["label"] = self.toy(batch)
        return out


def trainer_of(model: nn.Module, data, tasks, **kw) -> Trainer:
    return Trainer(
        model,
        data,
        kw.pop("eval_data", toy_data(seed=5)),
        tasks=tasks,
        dense_optimizer=torch.optim.AdamW(model.parameters(), lr=0.05),
        device="cpu",
        progress=False,
        **kw,
    )


# ------------------------------------------------------------------ Task


def test_a_loss_task_has_no_label_metrics_group_or_loss_function() -> None:
    assert Task("aux", output="loss").metrics == ()
    assert Task("aux", output="loss", metrics=[]).metrics == []
    assert Task("ctr").metrics == ("auc", "logloss", "calibration", "ne")
    assert dataclasses.replace(Task("ctr"), output="loss").metrics == ()
    assert Task("aux", output="loss").is_loss and not Task("ctr").is_loss
    with pytest.raises(ValueError, match=r"Task 'aux' .*has no metrics.*\['auc'\]"):
        Task("aux", output="loss", metrics=["auc"])
    with pytest.raises(ValueError, match="Task 'aux' .*no metrics"):
        Task("aux", output="loss", metrics=("auc", "logloss", "calibration", "ne"))
    with pytest.raises(ValueError, match="Task 'aux' .*takes no loss function"):
        Task("aux", output="loss", loss=lambda out, y: out.mean())
    with pytest.raises(ValueError, match="Task 'aux' .*has no group.*'user_id'"):
        Task("aux", output="loss", group="user_id")
    with pytest.raises(ValueError, match="Task 'aux': output='loss' .*no probability"):
        Task("aux", output="loss").probability(torch.tensor(0.5))
    with pytest.raises(ValueError, match="'logits', 'probability' or 'loss', got 'los'"):
        Task("aux", output="los")


# ------------------------------------------------------------------ predictions and losses


def test_predictions_and_losses_of_a_logits_task_and_a_loss_task() -> None:
    logits = torch.tensor([[0.5], [-1.0], [2.0]])
    aux = torch.tensor([0.75], requires_grad=True)
    preds = predictions_of({"label": logits, "aux": aux}, TASKS)
    assert preds["label"].shape == (3,) and preds["aux"].shape == ()
    y = torch.tensor([1.0, 0.0, 0.0])
    total, each = compute_losses(preds, {"label": y}, TASKS)  # no column for "aux"
    bce = F.binary_cross_entropy_with_logits(logits.reshape(-1), y)
    assert torch.allclose(each["label"], bce) and each["aux"].item() == 0.75
    assert torch.allclose(total, bce + 0.5 * 0.75)
    total.backward()
    assert aux.grad.tolist() == [0.5]  # the task's weight

    only = [Task("aux", output="loss")]
    half = torch.tensor(1.5, dtype=torch.bfloat16)
    value = predictions_of(half.reshape(1, 1), only)["aux"]  # one tensor, one task
    loss, each = compute_losses({"aux": value}, {}, only)
    assert loss.dtype == torch.float32 and loss.shape == () and loss.item() == 1.5
    with pytest.raises(ValueError, match=r"task 'aux': output='loss' .*got shape \(2,\)"):
        predictions_of({"label": logits, "aux": torch.ones(2)}, TASKS)
    with pytest.raises(ValueError, match=r"task 'aux'.*got shape \(0,\)"):
        predictions_of({"label": logits, "aux": torch.ones(0)}, TASKS)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_losses_are_float32_under_autocast(device: str) -> None:
    # CUDA autocast refuses binary_cross_entropy on probabilities; every loss runs outside it.
    seen = []

    def custom(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_autocast_enabled(device))
        return (out - y).square().mean()

    tasks = [
        Task("click", label="click"),
        Task("buy", label="buy", output="probability"),
        Task("dwell", label="dwell", loss=custom),
    ]
    gen = torch.Generator().manual_seed(0)
    preds = {
        "click": torch.randn(6, generator=gen),
        "buy": torch.rand(6, generator=gen),
        "dwell": torch.randn(6, generator=gen),
    }
    labels = {name: (torch.rand(6, generator=gen) > 0.5).float() for name in preds}
    preds = {k: v.to(device) for k, v in preds.items()}
    labels = {k: v.to(device) for k, v in labels.items()}
    plain, plain_each = compute_losses(preds, labels, tasks)
    with torch.autocast(device, dtype=torch.bfloat16):
        total, each = compute_losses(preds, labels, tasks)
    assert seen == [False, False]
    assert total.dtype == torch.float32 and torch.equal(total, plain)
    for name, value in each.items():
        assert value.dtype == torch.float32 and torch.equal(value, plain_each[name]), name


def test_batch_rows_from_the_first_prediction_else_the_inputs() -> None:
    preds = {"aux": torch.tensor(1.0), "label": torch.zeros(7)}
    assert batch_rows(preds, {}, [TASKS[1], TASKS[0]]) == 7
    only = [Task("aux", output="loss")]
    kjt = KeyedJaggedTensor(["a", "b"], torch.arange(6), lengths=torch.ones(6, dtype=torch.int64))
    jt = JaggedTensor(torch.arange(4), torch.tensor([0, 1, 1, 4, 4, 4]))
    scalar = torch.tensor(3.0)
    assert batch_rows(preds, {"step": scalar, "sparse": kjt, "x": torch.zeros(9)}, only) == 3
    assert batch_rows(preds, {"step": scalar, "history": jt}, only) == 5
    assert batch_rows(preds, {"step": scalar, "x": torch.zeros(9, 2)}, only) == 9
    with pytest.raises(ValueError, match=r"every task \(\['aux'\]\) is a loss task.*\['step'\]"):
        batch_rows(preds, {"step": scalar}, only)


# ------------------------------------------------------------------ Trainer


class Logs(Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_step_end(self, trainer, step, logs) -> None:
        self.steps.append(dict(logs))


def test_the_trainer_trains_a_loss_task_next_to_a_click_task() -> None:
    torch.manual_seed(1)
    model = WithAux()
    grads: list[float] = []
    model.proj.weight.register_hook(lambda g: grads.append(float(g.abs().sum())))
    logs = Logs()
    data = toy_data(n=600)  # the last batch has 24 rows
    trainer = trainer_of(model, data, TASKS, epochs=2, log_every=1, callbacks=[logs])
    before = trainer.evaluate()
    result = trainer.fit()
    assert len(grads) == result.step == 20 and all(g > 0 for g in grads)
    assert result.samples == 2 * 600
    assert result.metrics["aux/loss"] < before["aux/loss"] / 4
    assert result.metrics["label/auc"] > 0.8 and result.metrics["samples"] == 640
    assert {"label/logloss", "label/calibration", "label/ne"} <= set(result.metrics)
    last = logs.steps[-1]
    assert last["loss"] == pytest.approx(last["loss/label"] + 0.5 * last["loss/aux"])


def test_a_model_with_only_a_loss_task_trains_and_counts_its_rows() -> None:
    torch.manual_seed(1)
    model = WithAux(logits=False)
    data = [{"x": b["x"]} for b in toy_data(n=600)]  # no label column anywhere
    only = [Task("aux", output="loss")]
    trainer = trainer_of(model, data, only, epochs=3, eval_data=data[:3])
    before = trainer.evaluate()["aux/loss"]
    result = trainer.fit()
    assert result.step == 30 and result.samples == 3 * 600
    assert set(result.metrics) == {"aux/loss", "samples"}
    assert result.metrics["aux/loss"] < before / 4 and result.metrics["samples"] == 3 * 64
    assert task_metrics(only).collection is None


# ------------------------------------------------------------------ evaluation


def batches(sizes: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, 4, generator=g)
        out.append({"x": x, "label": (x[:, 0] > 0).float()})
    return out


def row_weighted_mean(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        values = [(float(model(b)["aux"]), b["x"].shape[0]) for b in data]
    return sum(v * n for v, n in values) / sum(n for _, n in values)


def test_evaluation_reports_the_row_weighted_mean_of_a_loss_task() -> None:
    torch.manual_seed(0)
    model = WithAux()
    data = batches([3, 5])
    got = evaluate_model(model, data, TASKS)
    assert model.training  # the mode is restored
    want = row_weighted_mean(model, data)
    with torch.no_grad():
        plain = sum(float(model(b)["aux"]) for b in data) / 2
    assert got["aux/loss"] == pytest.approx(want, rel=1e-6) and want != pytest.approx(plain)
    assert got["samples"] == 8 and 0 <= got["label/auc"] <= 1
    assert set(got) == {
        "label/auc",
        "label/logloss",
        "label/calibration",
        "label/ne",
        "aux/loss",
        "samples",
    }
    empty = evaluate_model(model, [], TASKS)
    assert math.isnan(empty["aux/loss"]) and math.isnan(empty["label/auc"])
    assert empty["samples"] == 0


# ------------------------------------------------------------------ online


def write_windows(root: Path, files: int = 4, rows: int = 192) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        x = torch.randn(rows, 4, generator=torch.Generator().manual_seed(i))
        y = (x[:, 0] - x[:, 1] > 0).float()
        cols = {f"x{j}": pa.array(x[:, j].numpy()) for j in range(4)}
        cols["label"] = pa.array(y.numpy())
        pq.write_table(pa.table(cols), root / f"part-{i:03d}.parquet")


class Columns(WithAux):
    def forward(self, batch):
        return super().forward({"x": torch.stack([batch[f"x{j}"] for j in range(4)], dim=1)})


def test_online_windows_report_the_loss_task(tmp_path: Path) -> None:
    from recstack.columnio import StreamingReader

    write_windows(tmp_path / "data")
    torch.manual_seed(3)
    model = Columns()
    reader = StreamingReader(
        str(tmp_path / "data"), batch_size=64, window_files=1, poll_interval=0.01,
        idle_timeout=0.3,
    )  # fmt: skip
    trainer = trainer_of(model, reader, TASKS, eval_data=None)
    result = trainer.fit_online()
    assert [w.rows for w in result.windows] == [192] * 4 and result.step == 12
    assert trainer.samples == 4 * 192
    for w in result.windows:
        assert math.isfinite(w.metrics["aux/loss"]) and 0 <= w.metrics["label/auc"] <= 1
    assert result.windows[-1].metrics["aux/loss"] < result.windows[0].metrics["aux/loss"]


# ------------------------------------------------------------------ run configuration

AUX_CONFIG = [
    {"name": "ctr", "label": "label"},
    {"name": "aux", "label": "no_such_column", "output": "loss", "weight": 0.5},
]


def with_tasks(tasks):
    return lambda d: d.update(tasks=[dict(t) for t in tasks])


@pytest.fixture
def logits_and_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's model as a model returning logits under ``ctr``, its own loss under
    ``aux``."""
    from recstack.pipelines.config import ModelConfig

    monkeypatch.setattr(ModelConfig, "outputs", lambda self: {"ctr": "logits", "aux": "loss"})


def config_error(tmp_path: Path, change) -> str:
    from config_testdata import load_changed

    from recstack.pipelines.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_changed(tmp_path, change)
    return str(info.value)


@pytest.mark.usefixtures("logits_and_loss")
def test_the_config_checks_each_output_key_against_its_task(tmp_path: Path) -> None:
    from config_testdata import load_changed

    from recstack.pipelines.config.readers import default_columns

    config = load_changed(tmp_path, with_tasks(AUX_CONFIG))
    assert [t.output for t in config.task_list] == ["logits", "loss"]
    assert config.task_list[1].metrics == () and config.task_list[1].weight == 0.5
    assert "no_such_column" not in default_columns(config)  # a loss task reads no label

    no_output = [AUX_CONFIG[0], {"name": "aux"}]
    assert "run.yaml: tasks[1].output: the din model's output 'aux' is loss: set output: loss" in (
        config_error(tmp_path, with_tasks(no_output))
    )
    swapped = [{**AUX_CONFIG[0], "output": "loss"}, AUX_CONFIG[1]]
    assert "tasks[0].output: the din model's output 'ctr' is logits: set output: logits" in (
        config_error(tmp_path, with_tasks(swapped))
    )
    metrics = [AUX_CONFIG[0], {**AUX_CONFIG[1], "metrics": ["auc"]}]
    message = config_error(tmp_path, with_tasks(metrics))
    assert "run.yaml: tasks[1]: Task 'aux'" in message and "has no metrics" in message
    unknown = [*AUX_CONFIG, {"name": "cvr"}]
    assert "tasks[2].name: the din model has no output 'cvr' (its outputs: ctr, aux)" in (
        config_error(tmp_path, with_tasks(unknown))
    )


def test_the_config_keeps_the_multi_task_models_messages(tmp_path: Path) -> None:
    pooled = ["item", "user", "ctx_1", "ctx_2", "ctx_3"]

    def model(kind: str, **extra):
        return lambda d: d.update(
            model={"type": kind, "sparse_features": pooled, "dense_dim": 4, **extra}
        )

    def both(*changes):
        return lambda d: [c(d) for c in changes]

    esmm = model("esmm")
    tasks = with_tasks([{"name": "ctr"}, {"name": "ctcvr", "output": "probability"}])
    assert "tasks[0].output: the esmm model's outputs are probability: set output: " in (
        config_error(tmp_path, both(esmm, tasks))
    )
    mmoe = model("mmoe", tasks=["ctr", "like"])
    tasks = with_tasks([{"name": "ctr"}, {"name": "like", "output": "loss"}])
    assert "tasks[1].output: the mmoe model's outputs are logits: set output: logits" in (
        config_error(tmp_path, both(mmoe, tasks))
    )


# ------------------------------------------------------------------ across ranks

RANK_SIZES = {"uneven": [[3, 5], [4]], "empty_rank": [[3, 5], []]}


@pytest.mark.slow
def test_two_gloo_ranks_report_the_global_row_weighted_mean(tmp_path: Path) -> None:
    from rank_processes import run_ranks

    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    run_ranks(Path(__file__), 2, lambda r: [str(tmp_path / "init"), str(outs[r])], timeout=120)
    per_rank = [json.loads(o.read_text()) for o in outs]
    torch.manual_seed(0)
    model = WithAux()
    for case, sizes in RANK_SIZES.items():
        everything = [b for r, s in enumerate(sizes) for b in batches(s, seed=r)]
        want = row_weighted_mean(model, everything)
        for got in (ranks[case] for ranks in per_rank):
            assert got["aux/loss"] == pytest.approx(want, rel=1e-6), case
            assert got["label/auc"] == per_rank[0][case]["label/auc"], case
        # Every rank reports the rows of all ranks, as its metrics cover them.
        total = sum(sum(s) for s in sizes)
        assert [ranks[case]["samples"] for ranks in per_rank] == [total, total]


def _rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = WithAux()
        results = {
            case: evaluate_model(model, batches(sizes[rank], seed=rank), TASKS)
            for case, sizes in RANK_SIZES.items()
        }
        Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
