"""recstack.saver.serving_export: what has no serving form, and a directory that holds an
export or other files, are refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serving_testdata import IDS, trained
from toy_optimizer import SGD

from recstack.saver import (
    CheckpointError,
    export_for_serving,
)


def test_exporting_an_optimizer_is_refused(tmp_path: Path) -> None:
    model = trained(IDS)
    opt = SGD(model.linear.parameters())
    with pytest.raises(TypeError, match="'opt' is a SGD.*not optimizers"):
        export_for_serving(tmp_path / "s", model=model, opt=opt)
    with pytest.raises(TypeError, match="'extras' is a dict"):
        export_for_serving(tmp_path / "s", model=model, extras={"epoch": 1})
    assert not (tmp_path / "s").exists()  # refused before anything was written
    with pytest.raises(TypeError, match="dtype must be one of"):
        export_for_serving(tmp_path / "s", dtype=torch.float64, model=model)


def test_export_refuses_a_complete_or_foreign_directory(tmp_path: Path) -> None:
    model = trained(IDS)
    out = export_for_serving(tmp_path / "s", model=model)
    with pytest.raises(CheckpointError, match="complete export already"):
        export_for_serving(out, model=model)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an unfinished export"):
        export_for_serving(foreign, model=model)
    assert (foreign / "notes.txt").exists()
