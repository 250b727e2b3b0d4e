"""Tensor files: plain safetensors, written whole or not at all, checksummed as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recstack.saver.files import crc32_file, read_header, write_tensor_file


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_written_files_read_back_with_safetensors(tmp_path: Path, n: int) -> None:
    tensors = {
        "f32": torch.randn(n, 3),
        "bf16": torch.randn(n, 2).to(torch.bfloat16),
        "i64": torch.arange(n),
        "flag": torch.ones(n, dtype=torch.bool),
        "scalar": torch.tensor(2.5),
    }
    rec = write_tensor_file(tmp_path, "a/b.safetensors", tensors, {"table": "t"})
    assert rec.path == "a/b.safetensors"
    assert crc32_file(tmp_path / rec.path) == (rec.bytes, rec.crc32)
    back = load_file(tmp_path / rec.path)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    header, meta = read_header((tmp_path / rec.path).read_bytes(), "f")
    assert meta == {"table": "t"} and header["f32"]["shape"] == [n, 3]
    assert not list(tmp_path.rglob(".*.tmp"))  # nothing left aside


def test_refused_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'t' must be a contiguous CPU tensor"):
        write_tensor_file(tmp_path, "x.safetensors", {"t": torch.randn(3, 4).t()})
    with pytest.raises(TypeError, match="complex64 has no safetensors name"):
        write_tensor_file(tmp_path, "x.safetensors", {"t": torch.zeros(2, dtype=torch.complex64)})
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match="f: truncated"):
        read_header(b"\x10\x00", "f")
