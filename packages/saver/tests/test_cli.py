"""``recstack-saver inspect|verify`` and the library functions behind them, on real
checkpoints (a module holding an embedding collection and a linear tower, Adam, a
per-rank reader position), intact and damaged."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.saver import (
    Checkpointer,
    CheckpointError,
    PerRank,
    describe_checkpoint,
    verify_checkpoint,
)
from recstack.saver.cli import human_bytes, main
from recstack.saver.errors import NotACheckpointError

FULL, DELTA = "step-000000000010", "step-000000000020"
TABLE = "model.ec.item"
PART = f"sparse/t0000-{TABLE}/r00000-p00000.safetensors"
REMOVED = f"sparse/t0000-{TABLE}/r00000-removed.safetensors"
DENSE = "dense/d00000.safetensors"


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ec = EmbeddingCollection([TableConfig("item", dim=4)], [FeatureConfig("f", "item")])
        self.tower = nn.Linear(4, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.tower(self.ec(kjt)["f"])


def train(model: Model, opt: torch.optim.Optimizer, ids: list[int], lengths: list[int]) -> None:
    model.train()
    kjt = KeyedJaggedTensor(["f"], torch.tensor(ids), lengths=torch.tensor(lengths))
    opt.zero_grad()
    model(kjt).sum().backward()
    opt.step()
    model.ec.zero_grad_sparse()  # the rows are not trained here: drop their gradients


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with a full checkpoint (step 10, ids 1-5) and a delta on it (step 20: ids 6,
    7 and 1 seen, the ids not seen since step 10 evicted)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("template") / "ckpts"
    model = Model()
    opt = torch.optim.Adam(model.tower.parameters())
    with Checkpointer(root, progress=False) as ckpt:
        train(model, opt, [1, 2, 3, 4, 5], [2, 3])
        reader = {"offset": 128}
        ckpt.save(10, model=model, opt=opt, reader=PerRank(reader), extras={"epoch": 0})
        train(model, opt, [6, 7, 1], [1, 2])
        evicted = model.ec.evict(older_than_step=model.ec.step - 1)
        assert evicted["item"] > 0
        reader["offset"] = 256
        ckpt.save(20, delta=True, model=model, opt=opt, reader=PerRank(reader), extras={})
    return root


@pytest.fixture
def root(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template, free to damage."""
    return Path(shutil.copytree(template, tmp_path / "ckpts"))


def run(*argv: str | Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / "manifest.json").read_text())


def edit_manifest(ckpt: Path, change) -> None:  # type: ignore[no-untyped-def]
    m = manifest(ckpt)
    change(m)
    (ckpt / "manifest.json").write_text(json.dumps(m, indent=1))


# ---------------------------------------------------------------------------- inspect


def test_inspect_full_checkpoint(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run("inspect", root / FULL, capsys=capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert f"checkpoint  {root / FULL}" in lines
    assert "step        10" in lines
    assert "kind        full" in lines
    assert "world size  1" in lines
    assert any(line.startswith("created     20") for line in lines)
    assert not any(line.startswith(("base", "chain")) for line in lines)
    m = manifest(root / FULL)
    size = (
        sum(f["bytes"] for f in m["files"].values())
        + (root / FULL / "manifest.json").stat().st_size
    )
    assert f"size        {human_bytes(size)} in {len(m['files']) + 1} files" in lines
    # The table: 5 keys on rank 0, dim 4, the slots of the manifest, one part.
    row = next(line.split() for line in lines if line.strip().startswith(TABLE))
    assert row[:5] == [TABLE, "5", "5", "4", "1"]
    assert " ".join(row[5:7]) == human_bytes(m["files"][PART]["bytes"])
    assert "values float32[4], last_seen int64, hit_count int64" in out
    assert "removed" not in out  # a full checkpoint has no tombstones
    dense = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    assert dense["model"][:2] == ["module", "2"]  # tower.weight, tower.bias
    assert dense["opt"][:2] == ["object", "6"]  # step, exp_avg, exp_avg_sq for 2 params
    assert dense["extras"] == ["dict", "0", "0", "B"]
    assert dense["model"][2:] == ["20", "B"]  # 4 + 1 float32
    assert dense["0"][2:] == ["yes", "reader"]  # rank 0: rng states and the reader


def test_inspect_delta_shows_base_chain_and_removed_keys(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run("inspect", root / DELTA, capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert "kind        delta" in lines
    assert f"base        {FULL} (step 10)" in lines
    chain = next(line for line in lines if line.startswith("chain"))
    assert f"{FULL} (full) -> {DELTA} (delta)" in chain
    header = next(line.split() for line in lines if line.strip().startswith("name  "))
    assert header[:5] == ["name", "keys", "per", "rank", "removed"]
    removed = manifest(root / DELTA)["tables"][TABLE]["ranks"][0]["removed_keys"]
    assert removed > 0
    row = next(line.split() for line in lines if line.strip().startswith(TABLE))
    assert row[1:4] == ["3", "3", str(removed)]  # ids 6, 7, 1 changed


def test_inspect_root_lists_checkpoints_and_partial_dirs(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (root / "step-000000000030" / "sparse").mkdir(parents=True)  # a save that died
    (root / "notes.txt").write_text("not a checkpoint")
    code, out, err = run("inspect", root, capsys=capsys)
    assert code == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if "step-" in line}
    assert rows[FULL][:4] == ["10", "full", "-", "1"]
    assert rows[DELTA][:4] == ["20", "delta", "10", "1"]
    for name in (FULL, DELTA):
        info = describe_checkpoint(root / name)
        assert rows[name][4:] == [*human_bytes(info["bytes"]).split(), str(info["files"])]
    assert rows["step-000000000030"] == ["incomplete", "(ignored)"]
    assert "2 complete checkpoints, 1 incomplete (ignored); latest step 20" in out


def test_inspect_json_matches_the_manifest(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run("inspect", "--json", root / DELTA, capsys=capsys)
    assert code == 0
    info = json.loads(out)
    assert info == describe_checkpoint(root / DELTA)
    assert info == describe_checkpoint(root / DELTA / "manifest.json")
    m = manifest(root / DELTA)
    assert (info["type"], info["step"], info["kind"], info["world_size"]) == (
        "checkpoint",
        20,
        "delta",
        1,
    )
    assert info["created"] == m["created"]
    assert info["base"] == {"name": FULL, "step": 10}
    assert [(c["name"], c["kind"]) for c in info["chain"]] == [(FULL, "full"), (DELTA, "delta")]
    assert info["chain_error"] is None
    assert info["files"] == len(m["files"]) + 1
    (table,) = info["tables"]
    saved = m["tables"][TABLE]
    assert table["name"] == TABLE
    assert table["slots"] == saved["slots"]
    assert table["keys_per_rank"] == [r["keys"] for r in saved["ranks"]] == [3]
    assert table["removed_keys"] == saved["ranks"][0]["removed_keys"]
    assert table["dim"] == 4
    assert table["parts"] == 1
    assert table["bytes"] == m["files"][PART]["bytes"] + m["files"][REMOVED]["bytes"]
    assert [(d["name"], d["kind"], d["tensors"]) for d in info["dense"]] == [
        ("model", "module", 2),
        ("opt", "object", 6),
        ("extras", "dict", 0),
    ]
    assert info["per_rank"] == [
        {
            "rank": 0,
            "states": ["reader"],
            "rng": True,
            "tensor_file": False,
            "bytes": m["files"]["rank/r00000.json"]["bytes"],
        }
    ]


def test_inspect_root_json(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (root / "step-000000000030").mkdir()
    code, out, _ = run("inspect", root, "--json", capsys=capsys)
    assert code == 0
    info = json.loads(out)
    assert info["type"] == "root"
    assert info["latest"] == 20
    assert info["incomplete"] == ["step-000000000030"]
    assert [(c["step"], c["kind"], c["base"]) for c in info["checkpoints"]] == [
        (10, "full", None),
        (20, "delta", {"name": FULL, "step": 10}),
    ]
    assert info["checkpoints"][1]["bytes"] == describe_checkpoint(root / DELTA)["bytes"]


def test_inspect_errors(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run("inspect", tmp_path / "missing", capsys=capsys)
    assert code == 2 and f"{tmp_path / 'missing'}: no such file or directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run("inspect", tmp_path / "empty", capsys=capsys)
    assert code == 2 and "not a checkpoint" in err
    partial = root / "step-000000000030"
    partial.mkdir()
    code, _, err = run("inspect", partial, capsys=capsys)
    assert code == 1 and f"{partial}: no manifest.json" in err
    (root / FULL / "manifest.json").write_text("{not json")
    code, _, err = run("inspect", root / FULL, capsys=capsys)
    assert code == 1 and f"{root / FULL / 'manifest.json'}: the manifest is not valid JSON" in err
    # A root still lists the others, and says which manifest is unreadable.
    code, out, _ = run("inspect", root, capsys=capsys)
    assert code == 0
    line = next(line for line in out.splitlines() if FULL in line)
    assert "unreadable" in line and "not valid JSON" in line
    with pytest.raises(NotACheckpointError):
        describe_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no manifest"):
        describe_checkpoint(partial)


# ---------------------------------------------------------------------------- verify


def test_verify_ok(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run("verify", root / FULL, capsys=capsys)
    assert code == 0, out
    n = len(manifest(root / FULL)["files"])
    assert out.splitlines() == [out.splitlines()[-1]]
    assert out.startswith(f"OK: {n} files (") and out.rstrip().endswith(f"of {FULL} verified")
    assert err == ""  # not a terminal: no progress line
    assert verify_checkpoint(root / FULL) == []
    assert verify_checkpoint(root, threads=1) == []


def test_verify_truncated_part(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    part = root / FULL / PART
    part.write_bytes(part.read_bytes()[:100])
    code, out, _ = run("verify", root / FULL, capsys=capsys)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"{part}: 100 bytes, the manifest says")
    assert "truncated" in lines[0]
    assert lines[-1].startswith("FAILED: 1 problem in ")
    assert len(lines) == 2


def test_verify_flipped_byte(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = root / FULL / DENSE
    data = bytearray(dense.read_bytes())
    data[-3] ^= 0x40  # a bit of a tensor's value: still well-formed safetensors
    dense.write_bytes(bytes(data))
    code, out, _ = run("verify", root / FULL, capsys=capsys)
    assert code == 1
    assert out.splitlines()[0].startswith(f"{dense}: checksum mismatch (CRC-32 ")
    assert verify_checkpoint(root / FULL) == [out.splitlines()[0]]


def test_verify_deleted_file(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (root / FULL / "rank" / "r00000.json").unlink()
    code, out, _ = run("verify", root / FULL, capsys=capsys)
    assert code == 1
    assert (
        out.splitlines()[0]
        == f"{root / FULL / 'rank' / 'r00000.json'}: missing (the manifest lists it)"
    )


def test_verify_reports_every_problem(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (root / FULL / PART).write_bytes(b"")
    (root / FULL / DENSE).unlink()
    problems = verify_checkpoint(root / FULL, threads=4)
    assert [p.split(":")[0] for p in problems] == [
        str(root / FULL / DENSE),
        str(root / FULL / PART),
    ]
    code, out, _ = run("verify", root / FULL, "--threads", "2", capsys=capsys)
    assert code == 1
    assert out.splitlines()[:2] == problems
    assert out.splitlines()[-1].startswith("FAILED: 2 problems in ")


@pytest.mark.parametrize("where", ["files", "parts", "dense"])
def test_verify_refuses_paths_leaving_the_directory(
    root: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    (root / "x").write_bytes(b"outside")

    def change(m: dict) -> None:
        if where == "files":
            m["files"]["../x"] = {"bytes": 7, "crc32": "00000000"}
        elif where == "parts":
            m["tables"][TABLE]["ranks"][0]["parts"] = ["../x"]
        else:
            m["dense"]["tensors"]["model/tower.bias"] = "../x"

    edit_manifest(root / FULL, change)
    code, out, _ = run("verify", root / FULL, capsys=capsys)
    assert code == 1
    assert f"{root / FULL / 'manifest.json'}" in out.splitlines()[0]
    assert "'../x' would leave the checkpoint directory; refused" in out
    assert len(verify_checkpoint(root / FULL)) == 1


def test_verify_checks_key_counts(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_manifest(root / FULL, lambda m: m["tables"][TABLE]["ranks"][0].update(keys=9))
    code, out, _ = run("verify", root / FULL, capsys=capsys)
    assert code == 1
    where = root / FULL / "manifest.json"
    assert out.splitlines()[0] == (
        f"{where}: table '{TABLE}' rank 0: the manifest says 9 keys, its files hold 5"
    )


def test_verify_checks_references(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def change(m: dict) -> None:
        m["dense"]["tensors"]["model/tower.bias"] = "dense/d00001.safetensors"

    edit_manifest(root / FULL, change)
    code, out, _ = run("verify", root / FULL, capsys=capsys)
    assert code == 1
    where = root / FULL / "manifest.json"
    assert out.splitlines()[0] == (
        f"{where}: names 'dense/d00001.safetensors' but not among its files"
    )


def replace_file(ckpt: Path, rel: str, data: bytes) -> None:
    """Rewrite a file and its manifest entry: only the content checks can catch it."""
    (ckpt / rel).write_bytes(data)
    entry = {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    edit_manifest(ckpt, lambda m: m["files"].update({rel: entry}))


def test_verify_checks_tensor_headers(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = root / FULL
    part = safetensors.torch.load((ckpt / PART).read_bytes())
    assert sorted(part) == ["keys", "slot/hit_count", "slot/last_seen", "slot/values"]
    wrong = {**part, "slot/values": part["slot/values"].double()[:4]}
    del wrong["slot/hit_count"]
    replace_file(ckpt, PART, safetensors.torch.save(wrong))
    header = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    replace_file(ckpt, DENSE, len(header).to_bytes(8, "little") + header + bytes(4))
    code, out, _ = run("verify", ckpt, capsys=capsys)
    assert code == 1
    part_path, dense_path = ckpt / PART, ckpt / DENSE
    assert out.splitlines()[:-1] == [
        f"{dense_path}: tensor 'x' is F32 [3] but spans 4 bytes",
        f"{part_path}: tensor 'slot/values' is F64, the manifest says F32",
        f"{part_path}: tensor 'slot/hit_count' is missing (the manifest names it)",
        f"{part_path}: tensor 'slot/values' has 4 rows for 5 keys",
    ]
    assert out.splitlines()[-1].startswith("FAILED: 4 problems in ")


def test_verify_delta_checks_its_chain(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run("verify", root / DELTA, capsys=capsys)
    assert code == 0, out
    n = len(manifest(root / FULL)["files"]) + len(manifest(root / DELTA)["files"])
    assert out.startswith(f"OK: {n} files (")
    assert f"of {DELTA} and its chain (2 checkpoints) verified" in out
    # Damage in the base is damage in the delta.
    base_part = root / FULL / PART
    base_part.write_bytes(base_part.read_bytes()[:-1])
    code, out, _ = run("verify", root / DELTA, capsys=capsys)
    assert code == 1
    assert out.splitlines()[0].startswith(f"{base_part}: ")


def test_verify_delta_with_a_foreign_or_missing_base(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_manifest(root / FULL, lambda m: m["extra"].update(note="rewritten"))
    assert verify_checkpoint(root / FULL) == []  # the base itself is whole
    code, out, _ = run("verify", root / DELTA, capsys=capsys)
    assert code == 1
    assert out.splitlines()[0].startswith(f"{root / DELTA / 'manifest.json'}: its base {FULL}")
    assert "foreign delta" in out.splitlines()[0]
    shutil.rmtree(root / FULL)
    code, out, _ = run("verify", root / DELTA, capsys=capsys)
    assert code == 1
    assert "the delta chain has a gap" in out.splitlines()[0]


def test_verify_root(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (root / "step-000000000030").mkdir()  # ignored, as loading ignores it
    code, out, err = run("verify", root, capsys=capsys)
    assert code == 0, out
    assert f"of 2 checkpoints under {root} verified" in out
    assert "note: step-000000000030: incomplete (ignored)" in err
    (root / DELTA / REMOVED).unlink()
    code, out, _ = run("verify", root, "--json", capsys=capsys)
    assert code == 1
    result = json.loads(out)
    assert result["ok"] is False
    assert result["problems"] == [f"{root / DELTA / REMOVED}: missing (the manifest lists it)"]
    assert result["checkpoints"] == [FULL, DELTA]
    assert result["incomplete"] == ["step-000000000030"]


def test_verify_exit_codes(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("verify", tmp_path / "missing", capsys=capsys)[0] == 2
    (tmp_path / "plain").mkdir()
    code, _, err = run("verify", tmp_path / "plain", capsys=capsys)
    assert code == 2 and f"{tmp_path / 'plain'}: not a checkpoint" in err
    assert run("verify", capsys=capsys)[0] == 2  # DIR missing
    assert run(capsys=capsys)[0] == 2  # no command
    assert run("frobnicate", root, capsys=capsys)[0] == 2
    code, _, err = run("verify", root, "--threads", "0", capsys=capsys)
    assert code == 2 and "--threads: must be at least 1" in err
    partial = root / "step-000000000030"
    partial.mkdir()
    code, out, _ = run("verify", partial, capsys=capsys)
    assert code == 1 and out.startswith(f"{partial}: no manifest.json")
    (root / FULL / "manifest.json").write_text('{"format": "something else"}')
    code, out, _ = run("verify", root / FULL, capsys=capsys)
    assert code == 1 and "not a RecStack checkpoint manifest" in out
    with pytest.raises(NotACheckpointError):
        verify_checkpoint(tmp_path / "plain")
    with pytest.raises(ValueError, match="threads"):
        verify_checkpoint(root, threads=0)


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run("--help", capsys=capsys)
    assert code == 0 and "inspect" in out and "verify" in out and "Exit status" in out
    code, out, _ = run("verify", "--help", capsys=capsys)
    assert code == 0 and "--threads N" in out and "CRC-32" in out


def test_verify_shows_progress_on_a_terminal(
    root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["verify", str(root)]) == 0
    assert "verifying 2 checkpoints:" in term.getvalue()
    term.seek(0)
    term.truncate()
    assert main(["verify", "--no-progress", str(root)]) == 0
    assert term.getvalue() == ""


def test_multi_rank_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Two ranks of one job, run one after another (no process group).
    for rank in (0, 1):
        model = Model()
        opt = torch.optim.Adam(model.tower.parameters())
        train(model, opt, [1, 2, 3] if rank == 0 else [4, 5, 6, 7], [1, 2 + rank])
        with Checkpointer(tmp_path, rank=rank, world_size=2, progress=False) as ckpt:
            ckpt.save(3, model=model, opt=opt)
    info = describe_checkpoint(tmp_path / "step-000000000003")
    assert info["world_size"] == 2
    assert info["tables"][0]["keys_per_rank"] == [3, 4]
    assert [r["rank"] for r in info["per_rank"]] == [0, 1]
    code, out, _ = run("inspect", tmp_path / "step-000000000003", capsys=capsys)
    row = next(line.split() for line in out.splitlines() if line.strip().startswith(TABLE))
    assert row[:4] == [TABLE, "7", "3", "4"]
    assert verify_checkpoint(tmp_path) == []


# ---------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_console_script_and_module(root: Path) -> None:
    script = Path(sys.executable).with_name("recstack-saver")
    assert script.is_file(), "the recstack-saver console script is not installed"
    done = subprocess.run(
        [str(script), "inspect", str(root)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "2 complete checkpoints" in done.stdout
    (root / FULL / DENSE).unlink()
    done = subprocess.run(
        [sys.executable, "-m", "recstack.saver.cli", "verify", str(root / DELTA)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[0] == f"{root / FULL / DENSE}: missing (the manifest lists it)"
