"""Conversion to and from TorchRec's KeyedJaggedTensor.

Tests against the real torchrec skip where it is not installed; the conversion logic is also
checked against a stand-in module exposing the same constructor and accessors, and the
missing-torchrec error is checked by making the import fail.
"""

from __future__ import annotations

import builtins
import sys
import types

import pytest
import torch

from recstack.core.keyed_jagged import KeyedJaggedTensor
from recstack.core.torchrec_interop import from_torchrec, to_torchrec

TORCHREC_MODULES = ("torchrec", "torchrec.sparse", "torchrec.sparse.jagged_tensor")


def random_kjt(device: torch.device, seed: int, batch: int, weighted: bool) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    keys = ["user_seq", "item_tags", "city"]
    lengths = torch.randint(0, 5, (len(keys) * batch,), generator=gen)
    total = int(lengths.sum())
    values = torch.randint(0, 1 << 40, (total,), generator=gen)
    weights = torch.rand(total, generator=gen) if weighted else None
    return KeyedJaggedTensor(
        keys,
        values.to(device),
        lengths.to(device),
        weights=weights.to(device) if weighted else None,
        stride=batch,
    )


def assert_same_kjt(a: KeyedJaggedTensor, b: KeyedJaggedTensor) -> None:
    assert a.keys() == b.keys() and a.stride() == b.stride()
    assert torch.equal(a.values(), b.values())
    assert torch.equal(a.lengths(), b.lengths())
    aw, bw = a.weights_or_none(), b.weights_or_none()
    assert (aw is None) == (bw is None)
    if aw is not None:
        assert torch.equal(aw, bw)


# ---------------------------------------------------------------------- real torchrec


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("batch", [0, 1, 5])
def test_round_trip_with_torchrec(device, weighted, batch):
    pytest.importorskip("torchrec")
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor as TorchRecKJT

    kjt = random_kjt(device, 10 + batch, batch, weighted)
    trec = to_torchrec(kjt)
    assert isinstance(trec, TorchRecKJT)
    assert trec.keys() == kjt.keys() and trec.stride() == kjt.stride()
    assert torch.equal(trec.values(), kjt.values())
    assert torch.equal(trec.lengths().to(torch.int64), kjt.lengths())
    for key in kjt:
        theirs, ours = trec[key], kjt[key]
        assert torch.equal(theirs.values(), ours.values)
        assert torch.equal(theirs.lengths().to(torch.int64), ours.lengths())
        if weighted:
            assert torch.equal(theirs.weights(), ours.weights)
    assert_same_kjt(from_torchrec(trec), kjt)
    assert_same_kjt(KeyedJaggedTensor.from_torchrec(kjt.to_torchrec()), kjt)


def test_from_torchrec_built_by_torchrec(device):
    pytest.importorskip("torchrec")
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor as TorchRecKJT

    trec = TorchRecKJT.from_lengths_sync(
        keys=["a", "b"],
        values=torch.tensor([1, 2, 3, 4], device=device),
        lengths=torch.tensor([2, 0, 1, 1], dtype=torch.int32, device=device),
    )
    kjt = from_torchrec(trec)
    assert kjt.lengths().dtype == torch.int64
    assert kjt["a"].to_list() == [[1, 2], []]
    assert kjt["b"].to_list() == [[3], [4]]


# ---------------------------------------------------------------------- stand-in torchrec


class StandInTorchRecKJT:
    """The slice of TorchRec's KeyedJaggedTensor API the conversion relies on."""

    def __init__(self, keys, values, weights=None, lengths=None, stride=None, variable=False):
        self._keys, self._values, self._weights = keys, values, weights
        self._lengths, self._stride, self._variable = lengths, stride, variable

    def keys(self):
        return self._keys

    def values(self):
        return self._values

    def lengths(self):
        return self._lengths

    def weights_or_none(self):
        return self._weights

    def stride(self):
        return self._stride

    def variable_stride_per_key(self):
        return self._variable


@pytest.fixture
def stand_in_torchrec(monkeypatch):
    leaf = types.ModuleType("torchrec.sparse.jagged_tensor")
    leaf.KeyedJaggedTensor = StandInTorchRecKJT
    sparse = types.ModuleType("torchrec.sparse")
    sparse.jagged_tensor = leaf
    root = types.ModuleType("torchrec")
    root.sparse = sparse
    for name, module in zip(TORCHREC_MODULES, (root, sparse, leaf), strict=True):
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("batch", [0, 4])
def test_conversion_hands_over_the_tensors(device, stand_in_torchrec, weighted, batch):
    kjt = random_kjt(device, 20 + batch, batch, weighted)
    trec = to_torchrec(kjt)
    assert isinstance(trec, StandInTorchRecKJT)
    assert trec.keys() == kjt.keys() and trec.stride() == batch
    assert trec.values() is kjt.values() and trec.lengths() is kjt.lengths()
    assert trec.weights_or_none() is kjt.weights_or_none()
    back = from_torchrec(trec)
    assert_same_kjt(back, kjt)
    assert back.values() is kjt.values()  # no copy either way
    assert_same_kjt(KeyedJaggedTensor.from_torchrec(kjt.to_torchrec()), kjt)


def test_from_torchrec_converts_int32_lengths(device, stand_in_torchrec):
    trec = StandInTorchRecKJT(
        keys=["a", "b"],
        values=torch.tensor([1, 2, 3], device=device),
        lengths=torch.tensor([1, 0, 0, 2], dtype=torch.int32, device=device),
        stride=2,
    )
    kjt = from_torchrec(trec)
    assert kjt.lengths().dtype == torch.int64
    assert kjt["b"].to_list() == [[], [2, 3]]


def test_variable_stride_rejected(stand_in_torchrec):
    trec = StandInTorchRecKJT(
        keys=["a"], values=torch.tensor([1]), lengths=torch.tensor([1]), stride=1, variable=True
    )
    with pytest.raises(ValueError, match="variable stride per key"):
        from_torchrec(trec)


def test_to_torchrec_needs_1d_values(stand_in_torchrec):
    kjt = KeyedJaggedTensor(["seq"], torch.ones(3, 4), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"TorchRec needs 1-D values, got shape \(3, 4\)"):
        to_torchrec(kjt)
    with pytest.raises(TypeError, match="recstack KeyedJaggedTensor"):
        to_torchrec({"seq": torch.ones(3)})


# ---------------------------------------------------------------------- torchrec missing


@pytest.fixture
def no_torchrec(monkeypatch):
    # A None entry in sys.modules makes `import torchrec...` raise ModuleNotFoundError.
    for name in TORCHREC_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


def test_clear_error_without_torchrec(no_torchrec):
    kjt = KeyedJaggedTensor(["a"], torch.tensor([1, 2]), torch.tensor([2]))
    with pytest.raises(ImportError, match="needs the optional `torchrec` package.*pip install"):
        to_torchrec(kjt)
    with pytest.raises(ImportError, match="torchrec"):
        kjt.to_torchrec()
    with pytest.raises(ImportError, match="torchrec"):
        from_torchrec(object())
    with pytest.raises(ImportError, match="torchrec"):
        KeyedJaggedTensor.from_torchrec(object())


@pytest.fixture
def torchrec_fails_to_load(monkeypatch):
    """torchrec present but unloadable: its import raises OSError, as on a driverless host."""
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "torchrec" or name.startswith("torchrec."):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    for name in TORCHREC_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(builtins, "__import__", failing_import)


def test_clear_error_when_torchrec_fails_to_load(torchrec_fails_to_load):
    kjt = KeyedJaggedTensor(["a"], torch.tensor([1, 2]), torch.tensor([2]))
    expected = (
        r"needs the optional `torchrec` package, which is installed but failed to load "
        r"\(OSError: libnvidia-ml\.so\.1: cannot open shared object file\)"
    )
    for convert in (
        lambda: to_torchrec(kjt),
        kjt.to_torchrec,
        lambda: from_torchrec(object()),
        lambda: KeyedJaggedTensor.from_torchrec(object()),
    ):
        with pytest.raises(ImportError, match=expected) as info:
            convert()
        assert isinstance(info.value.__cause__, OSError)
