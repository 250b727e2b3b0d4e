"""Each optimizer's named step fills core's tile-function slots in the order it declares."""

from __future__ import annotations

import typing

import pytest

from recstack.sparse_optim.kernels.optimizer_tile import (
    OPT_ADAGRAD,
    OPT_ADAM,
    OPT_FTRL,
    OPT_ROWWISE,
    OPT_SGD,
    AdagradTile,
    AdamTile,
    FtrlTile,
    RowWiseAdagradTile,
    SgdTile,
    tile_slots,
)

TILES = [SgdTile, AdagradTile, RowWiseAdagradTile, AdamTile, FtrlTile]


@pytest.mark.parametrize("tile", TILES)
def test_fields_are_lr_then_scalars_then_flags(tile) -> None:
    hints = typing.get_type_hints(tile)
    names = tile._fields
    assert names[0] == "lr"
    scalars, flags = names[1 : 1 + tile.SCALARS], names[1 + tile.SCALARS :]
    # Core's convention: at most six scalars and three flags.
    assert len(scalars) <= 6 and len(flags) <= 3
    assert all(hints[n] is float for n in ("lr", *scalars))
    assert all(hints[n] is bool for n in flags)


def test_variants_are_distinct() -> None:
    assert [t.VARIANT for t in TILES] == [OPT_SGD, OPT_ADAGRAD, OPT_ROWWISE, OPT_ADAM, OPT_FTRL]
    assert len({t.VARIANT for t in TILES}) == len(TILES)


def test_tile_slots_by_name() -> None:
    step = AdamTile(
        lr=0.1,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.01,
        correction1=0.1,
        correction2=0.01,
        decoupled=True,
        tf_compat=False,
        per_row_steps=False,
    )
    assert tile_slots(step) == (
        OPT_ADAM,
        0.1,
        (0.9, 0.99, 1e-8, 0.01, 0.1, 0.01),
        (True, False, False),
    )
    sgd = SgdTile(lr=0.5, momentum=0.9, weight_decay=0.0, has_momentum=True, nesterov=True)
    assert tile_slots(sgd) == (OPT_SGD, 0.5, (0.9, 0.0), (True, True))
