"""recstack.pipelines.data.registry: each converter described for a command line."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from convert_testdata import write_ml_dat

from recstack.pipelines.data import (
    CONVERTERS,
)


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_registry_describes_each_converter(name: str) -> None:
    converter = CONVERTERS[name]
    assert converter.name == name and converter.description and converter.source
    parameters = inspect.signature(converter.convert).parameters
    assert list(parameters)[:2] == ["src", "dst"]
    keywords = {k: p.default for k, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert {o.name: o.default for o in converter.options} == keywords
    for option in converter.options:
        assert option.help
        if option.choices and not option.multiple and option.default is not None:
            assert option.default in option.choices


def test_registry_converts(tmp_path: Path) -> None:
    src = write_ml_dat(tmp_path / "ml")
    report = CONVERTERS["movielens"].convert(src, tmp_path / "out", max_history=2)
    assert report.dataset == "movielens" and report.rows_written == 10
    assert report.to_dict()["rows_written"] == 10
