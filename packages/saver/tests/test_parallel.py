"""recstack.saver.parallel: ranks given or from torch.distributed, checked by name."""

from __future__ import annotations

import pytest

from recstack.saver.parallel import default_threads, resolve_ranks


def test_ranks_given_or_a_single_process() -> None:
    assert resolve_ranks(None, None, "Checkpointer") == (0, 1, False)
    assert resolve_ranks(2, 3, "Checkpointer") == (2, 3, False)
    assert 1 <= default_threads() <= 16


def test_bad_ranks_are_named() -> None:
    with pytest.raises(ValueError, match="Checkpointer: give both rank and world_size"):
        resolve_ranks(0, None, "Checkpointer")
    with pytest.raises(ValueError, match=r"Checkpointer: rank must be an int >= 0 and <= 1, got 2"):
        resolve_ranks(2, 2, "Checkpointer")
    with pytest.raises(ValueError, match="Checkpointer: world_size must be an int >= 1, got 0"):
        resolve_ranks(0, 0, "Checkpointer")
    with pytest.raises(TypeError, match="Checkpointer: rank must be an int, got '0'"):
        resolve_ranks("0", 2, "Checkpointer")  # type: ignore[arg-type]
