"""Warm start: load part of a checkpoint into a changed model (include, exclude, rename),
with a report of what was loaded, skipped, missing, unexpected and mismatched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy_table import ToyTable, filled

from recstack.saver import Checkpointer, CheckpointError


class Old(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tower = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 1)


class New(torch.nn.Module):
    """The tower kept, the head widened (two tasks), a new layer."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(4, 4)  # was "tower"
        self.head = torch.nn.Linear(4, 2)
        self.extra = torch.nn.Linear(2, 2)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    Checkpointer(tmp_path).save(
        3, model=Old(), user=filled("u", range(10), 1), item=filled("i", range(5), 2)
    )
    return tmp_path


def test_strict_load_into_a_changed_model_lists_every_problem(root: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        Checkpointer(root).load(model=New(), user=ToyTable("u"), item=ToyTable("i"))
    text = str(err.value)
    for line in (
        "missing from the checkpoint: model.trunk.weight",
        "missing from the checkpoint: model.extra.bias",
        "in the checkpoint but not in the objects: model.tower.weight",
        "mismatched: model.head.weight: shape [1, 4] in the checkpoint, [2, 4]",
    ):
        assert line in text, line


def test_rename_include_exclude_and_the_report(root: Path) -> None:
    old = Old()
    Checkpointer(root).load(model=old, user=ToyTable("u"), item=ToyTable("i"))
    new, user, item = New(), ToyTable("u"), ToyTable("i")
    head = new.head.weight.detach().clone()
    report = Checkpointer(root).load(
        model=new,
        user=user,
        item=item,
        rename={"model.tower": "model.trunk"},
        exclude=["item", "model.head.*"],
        strict=False,
    )
    assert torch.equal(new.trunk.weight, old.tower.weight)
    assert torch.equal(new.head.weight, head)  # excluded: left as it was
    assert len(user.rows) == 10 and not item.rows
    assert sorted(report.loaded) == ["model.trunk.bias", "model.trunk.weight", "user"]
    assert sorted(report.skipped) == ["item", "model.head.bias", "model.head.weight"]
    assert sorted(report.missing) == ["model.extra.bias", "model.extra.weight"]
    assert report.unexpected == [] and report.mismatched == []


def test_include_loads_only_what_matches(root: Path) -> None:
    new, user, item = New(), ToyTable("u"), ToyTable("i")
    report = Checkpointer(root).load(
        model=new, user=user, item=item, include=["user"], strict=False
    )
    assert report.loaded == ["user"] and len(user.rows) == 10 and not item.rows


def test_a_renamed_table(root: Path) -> None:
    users = ToyTable("u")
    report = Checkpointer(root).load(
        people=users, rename={"user": "people"}, include=["people"], strict=False
    )
    assert report.loaded == ["people"] and len(users.rows) == 10


def test_non_strict_skips_a_mismatched_table_and_loads_the_rest(root: Path) -> None:
    user, item = ToyTable("u", dim=8), ToyTable("i")
    report = Checkpointer(root).load(model=Old(), user=user, item=item, strict=False)
    assert not user.rows and len(item.rows) == 5
    assert report.mismatched == [
        "user: slot 'values' has rows of shape [4] in the checkpoint but [8] in the table "
        "(dim mismatch)"
    ]
