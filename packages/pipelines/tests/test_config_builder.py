"""recstack.pipelines.config.builder: a config builds the objects of its run (the demo's,
the Criteo example's, stages), and what an optimizer or the model refuses fails the
build before any data is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from config_testdata import CRITEO, DEMO, TINY, load_changed, small_doc

from recstack.columnio import ColumnReader
from recstack.pipelines.config import (
    ConfigError,
    build_model,
    build_run,
    load_config,
    parse_config,
)
from recstack.pipelines.config.readers import SYNTHETIC_MARKER
from recstack.pipelines.models import DIN, DLRM
from recstack.sparse_optim import SparseAdam


def test_the_demo_config_builds_the_demo_pipeline(tmp_path: Path, monkeypatch) -> None:
    from recstack.pipelines.demo import DemoConfig, build_model

    monkeypatch.chdir(tmp_path)
    run = build_run(load_config(DEMO, TINY))
    try:
        assert isinstance(run.model, DIN)
        torch.manual_seed(0)  # as run_demo does before building
        reference = build_model(DemoConfig(), torch.device("cpu"))

        def shapes(model: torch.nn.Module) -> dict[str, Any]:
            return {k: v.shape for k, v in model.state_dict().items() if torch.is_tensor(v)}

        assert shapes(run.model) == shapes(reference)
        for a, b in zip(run.model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(a, b)  # built under the same seed
        assert type(run.sparse_optimizer) is SparseAdam
        assert run.sparse_optimizer.param_groups[0]["lr"] == 0.01
        assert type(run.dense_optimizer) is torch.optim.AdamW
        assert run.dense_optimizer.param_groups[0]["lr"] == 0.002
        assert run.trainer.log_every == 2 and run.trainer.epochs == 1
        assert [t.name for t in run.trainer.tasks] == ["ctr"]
        train, evaluation = run.data.train, run.data.eval
        assert isinstance(train, ColumnReader) and isinstance(evaluation, ColumnReader)
        assert train.batch_size == 250 and evaluation.batch_size == 8192
        assert (tmp_path / "runs/demo_din/data" / SYNTHETIC_MARKER).is_file()
        assert run.checkpointer is not None and run.checkpointer.keep_last == 2
        assert [type(c).__name__ for c in run.callbacks] == ["JSONLLogger"]
    finally:
        run.close()


def test_the_criteo_config_trains_on_converter_output(tmp_path: Path, monkeypatch) -> None:
    from recstack.pipelines.data import convert_criteo

    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(200):
        ints = [str(int(v)) if i % 7 else "" for v in torch.randint(-2, 50, (13,), generator=g)]
        cats = [f"{int(v):08x}" if i % 5 else "" for v in torch.randint(0, 300, (26,), generator=g)]
        lines.append("\t".join([str(i % 2), *ints, *cats]))
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    convert_criteo(tmp_path / "train.txt", tmp_path / "data/criteo", rows_per_file=40)
    small = [
        "data.train.batch_size=16",
        "trainer.device=cpu",
        "trainer.max_steps=3",
        "trainer.eval_every=null",
        "model.bottom_hidden=[8]",
        "model.top_hidden=[8]",
        "checkpoint.every=null",
        "logging.progress=false",
    ]
    config = load_config(CRITEO, small)
    run = build_run(config)
    try:
        result = run.fit(resume=False)
    finally:
        run.close()
    assert result.step == 3 and result.metrics["samples"] == 40
    assert 0.0 <= result.metrics["ctr/auc"] <= 1.0
    # The warmup schedule ran: 3 of 500 warmup steps.
    assert run.dense_optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * 4 / 500)


def test_values_an_optimizer_refuses_fail_the_build(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_changed(tmp_path, lambda d: d["optimizers"]["sparse"].update(lr=-1))
    with pytest.raises(ConfigError, match=r"run.yaml: optimizers.sparse: SparseAdam: lr must"):
        build_run(config)
    assert not (tmp_path / "runs").exists()  # checked before any data is written


def test_a_model_that_does_not_fit_its_features_fails_the_build(tmp_path: Path) -> None:
    config = load_changed(
        tmp_path, lambda d: d["model"].update(other_features=["user", "ctx_1", "ctx_9"])
    )
    with pytest.raises(ConfigError) as info:
        build_model(config, "cpu")
    assert str(info.value).startswith(
        f"{tmp_path / 'run.yaml'}: model: DINConfig.other_features[2]: no feature 'ctx_9'"
    )


def test_stages_inherit_the_training_reader(small_data: Path, tmp_path: Path) -> None:
    doc = small_doc(small_data, tmp_path / "ck")
    doc["data"]["eval"] = {"paths": str(small_data / "part-00002.parquet")}
    doc["stages"] = [
        {"name": "warmup", "max_steps": 2, "freeze": "top.*", "train_embeddings": False},
        {"name": "main", "train": {"batch_size": 25}, "dense_lr": 0.001, "sparse_lr": 0.1},
    ]
    config = parse_config(doc)
    run = build_run(config)
    try:
        stages = run.trainer.stages
        assert [s.name for s in stages] == ["warmup", "main"]
        assert stages[0].train_data.batch_size == 50 and stages[1].train_data.batch_size == 25
        assert stages[0].freeze == ("top.*",) and not stages[0].train_embeddings
        assert stages[1].dense_lr == 0.001 and stages[1].sparse_lr == 0.1
        result = run.fit(resume=False)
    finally:
        run.close()
    assert result.step == 2 + 600 // 25 and "label/auc" in result.metrics
    assert isinstance(run.model, DLRM)
