"""The package imports on its own and reports its metadata."""

import importlib
import importlib.metadata
import pkgutil

import pytest

import recstack.feature_engine as pkg
import recstack.feature_engine.kernels as kernels_pkg

KERNEL_MODULES = {m.name for m in pkgutil.iter_modules(kernels_pkg.__path__)}


def test_version_matches_distribution() -> None:
    assert pkg.__version__ == importlib.metadata.version("recstack-feature-engine")


def test_public_api_is_declared() -> None:
    assert "__version__" in pkg.__all__
    for name in pkg.__all__:
        assert hasattr(pkg, name), name


@pytest.mark.parametrize("module", sorted(KERNEL_MODULES))
def test_kernel_modules_declare_their_api(module: str) -> None:
    mod = importlib.import_module(f"recstack.feature_engine.kernels.{module}")
    assert mod.__all__, module
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"
