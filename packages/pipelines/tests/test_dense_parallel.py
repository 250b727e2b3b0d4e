"""recstack.pipelines.dense_parallel: which submodules FSDP2 shards, and the errors that
stop a sharding that could not train (the two-rank runs are in test_trainer.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rank_processes import run_ranks
from torch import nn

from recstack.embedding_engine import EmbeddingCollection, FeatureConfig, TableConfig
from recstack.pipelines.dense_parallel import dense_blocks, shard_dense


class _Holder(nn.Module):
    """A module holding the tables next to a layer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.ec = EmbeddingCollection([TableConfig("t", dim=4)], [FeatureConfig("f", "t")])
        self.proj = nn.Linear(4, 4)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sparse = _Holder()
        self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.tower = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.act = nn.ReLU()  # no parameters: nothing to shard


def test_blocks_are_the_largest_parameter_holders_without_tables() -> None:
    m = _Model()
    blocks = dense_blocks(m, [m.sparse.ec])
    # Inside the tables' holder only its own layer; a ModuleList's members, not the list.
    assert blocks == [m.sparse.proj, m.experts[0], m.experts[1], m.tower]


def test_an_optimizer_with_state_or_foreign_tensors_is_refused() -> None:
    m = _Model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m.tower(torch.randn(2, 4)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="has state already"):
        shard_dense(m, [m.sparse.ec], torch.device("cpu"), 2, opt)
    stray = torch.optim.SGD([nn.Parameter(torch.zeros(3, 5))], lr=0.1)
    with pytest.raises(ValueError, match=r"shape \(3, 5\) that is not a parameter"):
        shard_dense(m, [m.sparse.ec], torch.device("cpu"), 2, stray)


def test_a_scalar_parameter_is_named() -> None:
    m = _Model()
    m.scale = nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match=r"\['scale'\].*1-D tensor of one element"):
        shard_dense(m, [m.sparse.ec], torch.device("cpu"), 2, None)


FSDP_GPU_WORKER = Path(__file__).with_name("fsdp_gpu_worker.py")


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.distributed.is_nccl_available()),
    reason="needs a CUDA device and NCCL",
)
def test_fsdp_on_a_gpu_trains_like_the_plain_model(tmp_path: Path) -> None:
    """DIN and HSTU with their Triton kernels under bf16 autocast: the FSDP2-sharded dense
    side (one NCCL rank) ends three steps where the plain model does."""
    from safetensors.torch import load_file

    out = tmp_path / "weights.safetensors"
    run_ranks(
        FSDP_GPU_WORKER,
        1,
        lambda r: [str(tmp_path / "init"), str(out)],
        env={"PYTHONPATH": str(FSDP_GPU_WORKER.parent)},
    )
    got = load_file(str(out))
    plain = {k.removeprefix("plain."): v for k, v in got.items() if k.startswith("plain.")}
    assert plain and any(k.startswith("hstu.") for k in plain)
    for key, value in plain.items():
        torch.testing.assert_close(got[f"fsdp.{key}"], value, rtol=1e-3, atol=1e-3, msg=key)
