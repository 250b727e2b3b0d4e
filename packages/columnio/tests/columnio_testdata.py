"""Small Parquet data sets shared by the ColumnIO tests."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recstack.core import KeyedJaggedTensor


def make_table(n: int, start: int = 0, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    ids = list(range(start, start + n))
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "x": pa.array([rng.random() for _ in ids], pa.float32()),
            "small": pa.array([i % 100 for i in ids], pa.int8()),
            "flag": pa.array([i % 3 == 0 for i in ids], pa.bool_()),
            "name": pa.array([f"n{i}" * (i % 4) for i in ids], pa.string()),
            "hist": pa.array([list(range(i, i + i % 5)) for i in ids], pa.list_(pa.int64())),
            "w": pa.array([[0.5] * (i % 3) for i in ids], pa.list_(pa.float32())),
            "tags": pa.array([[f"t{j}" for j in range(i % 3)] for i in ids], pa.list_(pa.string())),
            "vec": pa.array([[i, -i] for i in ids], pa.list_(pa.int32(), 2)),
        }
    )


def write_parts(tmp: Path, sizes: list[int], row_group: int, name: str = "part") -> list[str]:
    paths, start = [], 0
    for k, n in enumerate(sizes):
        p = tmp / f"{name}-{k:03d}.parquet"
        pq.write_table(make_table(n, start, seed=k), p, row_group_size=row_group)
        paths.append(str(p))
        start += n
    return paths


def flat_batch(batch: dict) -> dict:
    """A batch as plain lists (JaggedTensors of strings as strings), to compare batches."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.tolist()
        elif isinstance(v, KeyedJaggedTensor):
            out[k] = {key: v[key].to_list() for key in v}
        elif v.is_nested:
            out[k] = v.to_strings()
        else:
            out[k] = v.to_list()
    return out
