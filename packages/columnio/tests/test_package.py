"""The package imports on its own and reports its metadata."""

import importlib.metadata

import recstack.columnio as pkg


def test_version_matches_distribution() -> None:
    assert pkg.__version__ == importlib.metadata.version("recstack-columnio")


def test_public_api_is_declared() -> None:
    assert "__version__" in pkg.__all__
    for name in pkg.__all__:
        assert hasattr(pkg, name), name
