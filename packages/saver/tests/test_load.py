"""recstack.saver.load: a broken checkpoint, or one that does not fit the objects, is
refused by name before anything changes; warm starts load what matches (include,
exclude, rename, non-strict) and report the rest."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from toy_table import ToyTable, filled

from recstack.saver import Checkpointer, CheckpointError
from recstack.saver.manifest import MANIFEST

STEP = "step-000000000001"


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    Checkpointer(tmp_path, part_bytes=256).save(
        1, model=model, opt=opt, emb=filled("t", range(40), seed=1)
    )
    return tmp_path


def part(root: Path) -> Path:
    return sorted((root / STEP / "sparse").rglob("*-p00001.safetensors"))[0]


def edit_manifest(root: Path, fn: Callable[[dict], None]) -> None:
    path = root / STEP / MANIFEST
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def truncate(root: Path) -> None:
    p = part(root)
    p.write_bytes(p.read_bytes()[:-10])


def flip_byte(root: Path) -> None:
    p = part(root)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x40
    p.write_bytes(bytes(data))


def delete_part(root: Path) -> None:
    part(root).unlink()


def future_version(root: Path) -> None:
    edit_manifest(root, lambda m: m.update(version=99))


def escaping_path(root: Path) -> None:
    def fn(m: dict) -> None:
        ranks = m["tables"]["emb"]["ranks"][0]
        ranks["parts"][0] = "../../outside.safetensors"
        m["files"]["../../outside.safetensors"] = {"bytes": 1, "crc32": "00000000"}

    edit_manifest(root, fn)


def bad_header(root: Path) -> None:
    # A rewritten header whose size and checksum are recorded again: only the header's
    # contents disagree with the manifest.
    import zlib

    p = part(root)
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].replace(b'"F32"', b'"I32"')
    data = data[:8] + header + data[8 + n :]
    p.write_bytes(data)
    rel = str(p.relative_to(root / STEP))
    edit_manifest(root, lambda m: m["files"][rel].update(crc32=f"{zlib.crc32(data):08x}"))


def not_json(root: Path) -> None:
    (root / STEP / MANIFEST).write_text("{oops")


BROKEN = [
    (truncate, r"sparse/t0000-emb/r00000-p00001.safetensors: \d+ bytes, the manifest says"),
    (flip_byte, r"r00000-p00001.safetensors: checksum mismatch"),
    (delete_part, r"r00000-p00001.safetensors: missing"),
    (future_version, r"manifest.json: format version 99 is not supported"),
    (escaping_path, r"'../../outside.safetensors' would leave the checkpoint directory"),
    (bad_header, r"r00000-p00001.safetensors: tensor 'slot/values' is I32, the manifest says F32"),
    (not_json, r"manifest.json: the manifest is not valid JSON"),
]


# None: checked files kept in memory; 0: checked in blocks, read again to import.
@pytest.mark.parametrize("keep", [None, 0])
@pytest.mark.parametrize(("breakage", "match"), BROKEN)
def test_a_broken_checkpoint_is_refused_and_nothing_loads(
    saved: Path, breakage, match, keep: int | None
) -> None:
    breakage(saved)
    model = torch.nn.Linear(3, 2)
    weight = model.weight.detach().clone()
    table = filled("t", [500], seed=2)
    before = table.as_dict()
    with pytest.raises(CheckpointError, match=match):
        Checkpointer(saved, load_buffer_bytes=keep).load(
            1, model=model, opt=torch.optim.Adam(model.parameters()), emb=table
        )
    assert torch.equal(model.weight, weight) and table.as_dict() == before


@pytest.mark.parametrize("keep", ["all", "one part", "none"])
def test_checked_files_kept_in_memory_are_read_once(
    saved: Path, monkeypatch: pytest.MonkeyPatch, keep: str
) -> None:
    from recstack.saver import read

    reads: list[str] = []
    block_checks: list[str] = []
    read_buffer, crc32_file = read.CheckedFile.read_buffer, read.crc32_file

    def counted_read(self, *, crc: bool = True):
        reads.append(Path(self.where).name)
        return read_buffer(self, crc=crc)

    def counted_check(path):
        block_checks.append(Path(path).name)
        return crc32_file(path)

    monkeypatch.setattr(read.CheckedFile, "read_buffer", counted_read)
    monkeypatch.setattr(read, "crc32_file", counted_check)
    files = list((saved / STEP / "sparse").rglob("*-p*.safetensors"))  # the part files
    parts = sorted(p.name for p in files)
    sizes = sorted(p.stat().st_size for p in files)
    budget = {"all": None, "one part": sizes[-1], "none": 0}[keep]
    model = torch.nn.Linear(3, 2)
    table = filled("t", [], seed=2)
    Checkpointer(saved, load_buffer_bytes=budget).load(
        1, model=model, opt=torch.optim.Adam(model.parameters()), emb=table
    )
    assert table.as_dict() == filled("t", range(40), seed=1).as_dict()
    part_reads = [n for n in reads if n in parts]
    checked = [n for n in block_checks if n in parts]
    assert sorted(set(part_reads)) == parts  # every part imported
    if keep == "all":
        assert checked == [] and sorted(part_reads) == parts
    elif keep == "none":
        assert sorted(checked) == parts and sorted(part_reads) == parts
    else:  # each part read once or checked in blocks then read: never both ways twice
        assert len(checked) == len(parts) - 1 and len(part_reads) == len(parts)


def test_a_table_of_another_dim_is_refused_naming_it(saved: Path) -> None:
    table = ToyTable("t", dim=5)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"emb: slot 'values' has rows of shape \[4\].*\[5\]"):
        Checkpointer(saved).load(model=model, opt=torch.optim.Adam(model.parameters()), emb=table)
    assert not table.rows


def test_a_table_of_another_dtype_is_refused_naming_it(saved: Path) -> None:
    table = ToyTable("t", dtype=torch.bfloat16)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"emb: slot 'values' is float32 .* bfloat16"):
        Checkpointer(saved).load(model=model, opt=torch.optim.Adam(model.parameters()), emb=table)


def test_a_module_entry_of_another_shape_is_refused_naming_it(saved: Path) -> None:
    model = torch.nn.Linear(3, 5)
    weight = model.weight.detach().clone()
    table = ToyTable("t")
    with pytest.raises(CheckpointError, match=r"model.weight: shape \[2, 3\] in the checkpoint"):
        Checkpointer(saved).load(model=model, opt=torch.optim.Adam(model.parameters()), emb=table)
    assert torch.equal(model.weight, weight) and not table.rows


def test_an_optimizer_of_another_size_is_refused_before_anything_loads(saved: Path) -> None:
    model = torch.nn.Linear(3, 2)
    extra = torch.nn.Parameter(torch.zeros(1))
    table = ToyTable("t")
    with pytest.raises(CheckpointError, match=r"'opt' has \[2\] parameters per group.*\[3\]"):
        Checkpointer(saved).load(
            model=model, opt=torch.optim.Adam([*model.parameters(), extra]), emb=table
        )
    assert not table.rows


def test_missing_and_unexpected_objects(saved: Path) -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="missing from the checkpoint: other") as err:
        Checkpointer(saved).load(model=model, other=ToyTable("x"), extras={})
    assert "in the checkpoint but not in the objects: emb" in str(err.value)
    assert "missing from the checkpoint: extras" in str(err.value)


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
