"""recstack.pipelines.config.commands: `recstack train` and `recstack eval` end to end,
online runs, and errors reported without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from config_testdata import DEMO, SMALL_YAML, TINY, small_doc, write_yaml

from recstack.columnio import StreamingReader
from recstack.pipelines.callbacks.jsonl import read_jsonl
from recstack.pipelines.config import (
    ConfigError,
    build_run,
    eval_command,
    evaluate_checkpoint,
    format_table,
    load_config,
    parse_config,
    train_command,
)


def test_format_table() -> None:
    text = format_table([["auc", 0.712345], ["samples", 1000]], ["metric", "value"])
    assert text.splitlines() == [
        "| metric | value |",
        "| --- | ---: |",
        "| auc | 0.7123 |",
        "| samples | 1,000 |",
    ]


def test_online_config_runs_fit_online(small_data: Path, tmp_path: Path, capsys) -> None:
    doc = small_doc(small_data, tmp_path / "ck")
    doc["data"] = {
        "stream": {
            "source": str(small_data),
            "batch_size": 100,
            "window_files": 1,
            "poll_interval": 0.01,
            "idle_timeout": 0.3,
        },  # fmt: skip
    }
    doc["online"] = {"full_every": 2}
    write_yaml(tmp_path / "online.yaml", doc)
    assert isinstance(build_run(load_config(tmp_path / "online.yaml")).data.train, StreamingReader)
    assert train_command(tmp_path / "online.yaml", resume=False) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0]
        == "| window | rows | step | label/auc | label/calibration | label/logloss | label/ne |"
    )
    assert [line.split(" | ")[1:3] for line in out[2:5]] == [
        ["200", "2"],
        ["200", "4"],
        ["200", "6"],
    ]
    assert "3 window(s), 6 steps" in out[6]
    with pytest.raises(ConfigError, match="stages do not apply to online learning"):
        parse_config({**doc, "stages": [{"name": "a"}]})


def test_train_then_eval_gives_the_trainers_auc(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert train_command(DEMO, TINY, resume=False) == 0
    out = capsys.readouterr().out
    assert "| steps | 8 |" in out and "| ctr/auc |" in out
    final = [r for r in read_jsonl("runs/demo_din/log.jsonl") if r["event"] == "eval"][-1]
    assert final["step"] == 8
    checkpoint = tmp_path / "runs/demo_din/checkpoints/step-000000000008"
    assert f"checkpoint: runs/demo_din/checkpoints/{checkpoint.name}" in out

    # The checkpoint reloaded into a model built from the config scores exactly the same.
    ev = evaluate_checkpoint(load_config(DEMO, TINY), checkpoint)
    assert ev.step == 8 and ev.metrics["ctr/auc"] == final["ctr/auc"]
    assert ev.metrics["ctr/logloss"] == final["ctr/logloss"]
    assert eval_command(DEMO, "runs/demo_din/checkpoints", TINY) == 0  # the root: latest
    out = capsys.readouterr().out
    assert out.startswith(f"checkpoint: {checkpoint.relative_to(tmp_path)} (step 8)")
    assert f"| ctr/auc | {final['ctr/auc']:.4f} |" in out

    # Training again resumes from the checkpoint: nothing left to do.
    assert train_command(DEMO, TINY) == 0
    assert "| resumed from step | 8 |" in capsys.readouterr().out


def test_commands_take_no_overrides_as_none(tmp_path: Path, capsys) -> None:
    (tmp_path / "run.yaml").write_text(SMALL_YAML.replace("type: deepfm", "type: dfm"))
    assert train_command(tmp_path / "run.yaml", None) == 2  # argparse's append default
    assert "model.type: unknown model 'dfm' (did you mean" in capsys.readouterr().err


def test_commands_report_errors(tmp_path: Path, capsys) -> None:
    assert train_command(DEMO, ["trainer.epoch=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {DEMO}: trainer.epoch: unknown key (did you mean 'epochs'?)")
    assert eval_command(DEMO, tmp_path / "nowhere", TINY) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert eval_command(DEMO, tmp_path / "empty", TINY) == 1
    assert "not a checkpoint nor a root" in capsys.readouterr().err
