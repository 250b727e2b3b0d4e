"""batch_tags: the logical table index of each id of a merged physical table's batch."""

from __future__ import annotations

import torch

from recstack.embedding_engine.merged import batch_tags


def test_blocks_in_table_order_need_no_permutation(device) -> None:
    bt = batch_tags([0, 0, 1, 2], [2, 0, 1, 3], device)
    assert bt.tags.tolist() == [0, 0, 1, 2, 2, 2] and bt.order is None
    assert bt.tags.dtype == torch.int32 and bt.tags.device.type == device.type


def test_blocks_out_of_order_get_a_stable_permutation(device) -> None:
    bt = batch_tags([2, 0, 1, 0], [1, 2, 1, 2], device)
    assert bt.tags.tolist() == [2, 0, 0, 1, 0, 0]
    assert bt.order is not None and bt.order.dtype == torch.int64
    # Positions by ascending tag, equal tags in position order.
    assert bt.order.tolist() == [1, 2, 4, 5, 3, 0]
    assert bt.tags[bt.order].tolist() == sorted(bt.tags.tolist())


def test_no_blocks_and_empty_blocks(device) -> None:
    assert batch_tags([], [], device).tags.numel() == 0
    bt = batch_tags([1, 0], [0, 0], device)
    assert bt.tags.numel() == 0 and bt.order is not None and bt.order.numel() == 0


def test_random_blocks_match_a_per_block_reference(device) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        k = int(torch.randint(1, 9, (1,), generator=gen))
        indices = torch.randint(0, 4, (k,), generator=gen).tolist()
        sizes = torch.randint(0, 5, (k,), generator=gen).tolist()
        bt = batch_tags(indices, sizes, device)
        want = [t for t, n in zip(indices, sizes, strict=True) for _ in range(n)]
        assert bt.tags.tolist() == want
        order = bt.order.tolist() if bt.order is not None else list(range(len(want)))
        assert order == sorted(range(len(want)), key=lambda p: (want[p], p))
