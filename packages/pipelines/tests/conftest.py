"""Pipelines test set-up: shared helpers (toys.py, *_testdata.py) import by name, and every
test runs with one intra-op thread, on the torch kernels under the Triton interpreter."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from recstack.core import kernels

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def torch_kernels() -> Iterator[None]:
    """The runs, models and metrics are under test here, not the kernels (their own tests
    check each Triton kernel against its torch reference); under ``TRITON_INTERPRET=1`` the
    interpreter would make every step seconds long. On a GPU the Triton kernels run, so the
    runs are also checked on the kernels users train with. Tensors this small gain nothing
    from intra-op threads, which only wait on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with kernels.use_backend("torch" if kernels.interpret_mode() else "auto"):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic click data set (3 files of 200 rows: 3 id and 2 dense columns)
    the config tests build runs on."""
    from recstack.columnio import SyntheticCTRConfig, write_synthetic_ctr

    root = tmp_path_factory.mktemp("small")
    cfg = SyntheticCTRConfig(
        num_rows=600, num_dense=2, num_sparse=3, vocab_size=50, seq_mean_len=0, string_ids=0
    )
    write_synthetic_ctr(root, cfg, rows_per_file=200, compute_best_auc=False)
    return root
