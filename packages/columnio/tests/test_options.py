"""ReadOptions: one checked set of options that ColumnReader and StreamingReader share."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from columnio_testdata import write_parts

from recstack.columnio import Column, ColumnReader, ReadOptions, StreamingReader
from recstack.columnio.options import resolve_options


def test_defaults_and_normalized_values() -> None:
    options = ReadOptions()
    assert (options.columns, options.batch_size, options.num_threads) == (None, 4096, 2)
    assert (options.rank, options.world_size, options.on_error) == (None, None, "raise")
    options = ReadOptions(columns=["a", Column("b")], format="ORC", keyed_jagged="a")
    assert options.columns == (Column("a"), Column("b"))
    assert options.format == "orc" and options.keyed_jagged == ("a",)
    assert ReadOptions(columns="a").columns == (Column("a"),)
    assert ReadOptions(keyed_jagged=[]).keyed_jagged is None
    assert ReadOptions(filesystem=pafs.LocalFileSystem()).filesystem is not None


def test_options_are_frozen_and_replace_checks_again() -> None:
    options = ReadOptions(batch_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch_size = 9  # type: ignore[misc]
    with pytest.raises(ValueError, match="ReadOptions.batch_size"):
        dataclasses.replace(options, batch_size=0)


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("batch_size", 0, ValueError, r"ReadOptions.batch_size must be an int >= 1, got 0"),
        ("batch_size", True, TypeError, r"ReadOptions.batch_size must be an int"),
        ("batch_size", 2.5, TypeError, r"ReadOptions.batch_size must be an int"),
        ("num_threads", 0, ValueError, r"ReadOptions.num_threads must be an int >= 1"),
        ("rank", -1, ValueError, r"ReadOptions.rank must be an int >= 0"),
        ("world_size", 0, ValueError, r"ReadOptions.world_size must be an int >= 1"),
        ("format", "csv", ValueError, r"ReadOptions.format must be one of"),
        ("filesystem", "/tmp", TypeError, r"ReadOptions.filesystem must be a pyarrow"),
        ("pin_memory", "yes", TypeError, r"ReadOptions.pin_memory must be a bool"),
        ("keyed_jagged", [1], TypeError, r"ReadOptions.keyed_jagged must hold column names"),
        ("keyed_jagged_key", "", ValueError, r"ReadOptions.keyed_jagged_key must be a non-empty"),
        ("on_error", "ignore", ValueError, r"ReadOptions.on_error must be 'raise' or 'skip'"),
        ("columns", [], ValueError, r"columns is empty"),
        ("columns", ["a", "a"], ValueError, r"column 'a' is selected twice"),
        ("columns", [3], TypeError, r"columns must be names or Column objects"),
    ],
)
def test_bad_values_name_the_option(field: str, value: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ReadOptions(**{field: value})


def test_rank_must_be_below_world_size() -> None:
    with pytest.raises(ValueError, match="rank 2 is out of range for world_size 2"):
        ReadOptions(rank=2, world_size=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only machine")
def test_pin_memory_needs_cuda() -> None:
    with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
        ReadOptions(pin_memory=True)


def test_shard_takes_what_is_missing_from_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert ReadOptions().shard() == (3, 4)
    assert ReadOptions(rank=1).shard() == (1, 4)
    assert ReadOptions(rank=0, world_size=1).shard() == (0, 1)
    assert ReadOptions().sharded() == ReadOptions(rank=3, world_size=4)
    with pytest.raises(ValueError, match="rank 5 is out of range for world_size 4"):
        ReadOptions(rank=5).shard()


def test_resolve_options_lets_keywords_that_are_not_none_win() -> None:
    base = ReadOptions(batch_size=8, num_threads=3)
    assert resolve_options("R", None) == ReadOptions()
    assert resolve_options("R", base) is base
    assert resolve_options("R", base, batch_size=None, format=None) is base
    assert resolve_options("R", base, batch_size=16) == ReadOptions(batch_size=16, num_threads=3)
    assert resolve_options("R", None, on_error="skip") == ReadOptions(on_error="skip")
    with pytest.raises(TypeError, match=r"R\(\) got an unexpected keyword argument 'colour'"):
        resolve_options("R", None, colour="red")
    with pytest.raises(TypeError, match="R: options must be a ReadOptions, got dict"):
        resolve_options("R", {"batch_size": 8})  # type: ignore[arg-type]


def _ids(items: list) -> list[list[int]]:
    return [item["id"].tolist() for item in items if isinstance(item, dict)]


def test_both_readers_take_options_or_keywords_alike(tmp_path: Path) -> None:
    paths = write_parts(tmp_path, [23, 9], row_group=10)
    options = ReadOptions(columns=["id", "tags"], batch_size=7, num_threads=1, rank=1, world_size=2)
    by_keywords = ColumnReader(paths, ["id", "tags"], 7, num_threads=1, rank=1, world_size=2)
    by_options = ColumnReader(paths, options=options)
    assert by_options.options == by_keywords.options == options
    assert _ids(list(by_options)) == _ids(list(by_keywords))
    assert (by_options.batch_size, by_options.rank, by_options.world_size) == (7, 1, 2)

    def stream(**kwargs: object) -> list:
        return list(StreamingReader(str(tmp_path), idle_timeout=0, poll_interval=0, **kwargs))

    assert _ids(stream(options=options)) == _ids(
        stream(columns=["id", "tags"], batch_size=7, num_threads=1, rank=1, world_size=2)
    )
    overridden = ColumnReader(paths, batch_size=5, options=options)
    assert overridden.batch_size == 5 and overridden.columns == ["id", "tags"]


@pytest.mark.parametrize("reader", [ColumnReader, StreamingReader])
def test_both_readers_reject_a_bad_option_the_same_way(tmp_path: Path, reader: type) -> None:
    path = str(tmp_path)
    with pytest.raises(ValueError, match=r"ReadOptions.batch_size must be an int >= 1, got 0"):
        reader(path, batch_size=0)
    with pytest.raises(ValueError, match=r"ReadOptions.on_error must be 'raise' or 'skip'"):
        reader(path, on_error="ignore")
    with pytest.raises(TypeError, match=r"got an unexpected keyword argument 'colour'"):
        reader(path, colour="red")
