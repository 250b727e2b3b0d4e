"""recstack.saver.manifest: a delta chain with a gap, out of order or foreign is refused
by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from toy_table import ToyTable, evolve, filled

from recstack.saver import Checkpointer, CheckpointError
from recstack.saver.manifest import MANIFEST


def chain(tmp_path: Path) -> Checkpointer:
    table = filled("t", range(30), seed=5)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, emb=table)
    for step in (2, 3):
        evolve(table, seed=step)
        ckpt.save(step, delta=True, emb=table)
    return ckpt


def test_a_chain_with_a_gap_is_refused_naming_it(tmp_path: Path) -> None:
    ckpt = chain(tmp_path)
    shutil.rmtree(tmp_path / "step-000000000002")
    with pytest.raises(CheckpointError, match="step-000000000003.*base step-000000000002.*gap"):
        ckpt.load(emb=ToyTable("t"))


def test_a_foreign_delta_is_refused(tmp_path: Path) -> None:
    ckpt = chain(tmp_path)
    shutil.rmtree(tmp_path / "step-000000000002")
    # Another run's checkpoint of the same step takes the base's place.
    other = Checkpointer(tmp_path)
    other.save(2, emb=filled("t", range(3), seed=9))
    with pytest.raises(CheckpointError, match="step-000000000003.*foreign delta"):
        ckpt.load(emb=ToyTable("t"))


def test_an_out_of_order_chain_is_refused(tmp_path: Path) -> None:
    chain(tmp_path)
    path = tmp_path / "step-000000000003" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["step"] = 2
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="base step 2 is not before its own step 2"):
        Checkpointer(tmp_path).load(3, emb=ToyTable("t"))
