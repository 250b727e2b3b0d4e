"""recstack.pipelines.callbacks.early_stopping (with the JSON-lines log it stops)."""

from __future__ import annotations

from pathlib import Path

from toys import make

from recstack.pipelines import (
    EarlyStopping,
    JSONLLogger,
)
from recstack.pipelines.callbacks import read_jsonl


def test_early_stopping_and_jsonl_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    stop = EarlyStopping("label/auc", patience=1, min_delta=1.0)  # nothing improves by 1.0
    _, trainer = make(
        tmp_path / "ck", eval_every=2, log_every=1, callbacks=[stop, JSONLLogger(log)]
    )
    result = trainer.fit()
    assert result.stopped_by == "callback" and result.step == 4
    events = read_jsonl(log)
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 4]
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]
    assert events[-1]["event"] == "checkpoint" and events[-1]["step"] == 4
    assert all(isinstance(e["loss"], float) for e in events if e["event"] == "train")
