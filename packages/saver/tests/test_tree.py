"""State dicts to JSON + tensors and back, types intact; what cannot be saved is named."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recstack.core import PagedTensor
from recstack.saver.tree import decode_tree, encode_tree


def round_trip(value: object) -> object:
    tree, tensors = encode_tree(value, "x")
    tree = json.loads(json.dumps(tree))  # it is plain JSON
    return decode_tree(tree, tensors, "test")


def test_python_types_survive() -> None:
    value = {
        "ints": {0: "a", 7: "b"},
        "tuple": (1, (2.5, None)),
        "list": [True, False, "s"],
        "floats": [float("inf"), -float("inf"), 1e-300],
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
        "looks_like_a_tag": {"__tensor__": "not one"},
    }
    back = round_trip(value)
    assert back == {**value, "size": (2, 3)}
    assert math.isnan(round_trip({"n": float("nan")})["n"])


def test_tensors_are_named_by_path_and_come_back_equal() -> None:
    t = torch.arange(6.0).reshape(2, 3)
    value = {"state": {0: {"exp_avg": t, "step": torch.tensor(3.0)}}, "w": t}
    tree, tensors = encode_tree(value, "opt")
    assert sorted(tensors) == ["opt/state/0/exp_avg", "opt/state/0/step", "opt/w"]
    back = decode_tree(tree, tensors, "test")
    assert torch.equal(back["state"][0]["exp_avg"], t) and torch.equal(back["w"], t)


def test_paged_tensors_and_companions() -> None:
    table = PagedTensor(2, page_rows=4, name="emb")
    table.append_rows(3)
    slot = PagedTensor(2, page_rows=4, name="emb.m")
    table.add_companion("m", slot)
    slot.scatter_rows(torch.arange(3), torch.ones(3, 2))
    plain = PagedTensor.wrap(torch.full((3, 2), 5.0), name="w.m")
    back = round_trip({"state": {0: {"step": 2, "m": slot}, 1: {"step": 1, "m": plain}}})
    # A companion travels with its table's keys: the state dict leaves it out.
    assert back["state"][0] == {"step": 2}
    assert torch.equal(back["state"][1]["m"], torch.full((3, 2), 5.0))


def test_what_cannot_be_saved_is_named() -> None:
    with pytest.raises(TypeError, match="x/fn: a function cannot be saved"):
        encode_tree({"fn": lambda: 1}, "x")
    with pytest.raises(ValueError, match="tensor 'x/gone' is missing"):
        decode_tree({"__tensor__": "x/gone"}, {}, "ckpt")
    with pytest.raises(ValueError, match="unknown tag '__new__'"):
        decode_tree({"__new__": 1}, {}, "ckpt")
