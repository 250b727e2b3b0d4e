"""recstack.saver.names: include/exclude globs and rename prefixes."""

from __future__ import annotations

from recstack.saver.names import NameFilter


def test_the_longest_rename_prefix_wins_at_dot_boundaries() -> None:
    names = NameFilter(None, None, {"model": "net", "model.ec": "net.tables"})
    assert names.renamed("model.ec.item") == "net.tables.item"
    assert names.renamed("model.tower.0.weight") == "net.tower.0.weight"
    assert names.renamed("models.x") == "models.x"  # not a prefix at a dot
    assert names.renamed("model") == "net"


def test_include_then_exclude() -> None:
    names = NameFilter(["model.*"], ["*.bias"], {})
    assert names.selected("model.linear.weight")
    assert not names.selected("model.linear.bias")
    assert not names.selected("opt")
    assert NameFilter(None, None, {}).selected("anything")
