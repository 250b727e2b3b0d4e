"""recstack.pipelines.config.errors: a ConfigError's parts."""

from __future__ import annotations

import pytest
from config_testdata import demo_doc

from recstack.pipelines.config import (
    ConfigError,
    parse_config,
)


def test_error_attributes() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**demo_doc(), "trainer": {"epochs": 0}}, file="x.yaml")
    e = info.value
    assert (e.file, e.key, e.reason) == ("x.yaml", "trainer.epochs", "must be >= 1, got 0")
    assert str(e) == "x.yaml: trainer.epochs: must be >= 1, got 0"
