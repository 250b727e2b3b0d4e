"""recstack.pipelines.data.taobao: histories against a slow reference, labels, bad lines."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from convert_testdata import (
    check_user_order,
    reference_histories,
    rows_of,
    taobao_rows,
    write_taobao,
)

from recstack.columnio import ColumnReader
from recstack.pipelines.data import (
    ConvertError,
    convert_taobao,
    taobao_schema,
)

TB_ORDER = lambda r: (  # noqa: E731
    r["user_id"],
    r["timestamp"],
    r["item_id"],
    r["category_id"],
    r["behavior"],
)


def tb_expected(rows: list[dict], max_history: int, positive: set[int]) -> list[dict]:
    labelled = [{**r, "label": float(r["behavior"] in positive)} for r in rows]
    fields = {"hist_items": "item_id", "hist_categories": "category_id"}
    return reference_histories(labelled, TB_ORDER, fields, max_history)


@pytest.mark.parametrize(("max_history", "buckets"), [(3, 1), (3, 4), (100, 2)])
def test_taobao_histories_match_reference(tmp_path: Path, max_history: int, buckets: int) -> None:
    rows = taobao_rows(200, seed=11)
    src = write_taobao(tmp_path / "UserBehavior.csv", rows)
    report = convert_taobao(tmp_path, tmp_path / "out", max_history=max_history, buckets=buckets)
    got = sorted(rows_of(tmp_path / "out"), key=lambda r: (TB_ORDER(r), r["hist_items"]))
    assert got == tb_expected(rows, max_history, positive={1, 2, 3})
    check_user_order(tmp_path / "out", TB_ORDER)
    assert pq.read_schema(report.files[0]).remove_metadata() == taobao_schema()
    assert report.sources == [str(src)]
    assert (report.rows_in, report.rows_written) == (202, 202)


def test_taobao_label_options_and_compressed_input(tmp_path: Path) -> None:
    rows = taobao_rows(60, seed=12)
    plain = write_taobao(tmp_path / "UserBehavior.csv", rows)
    src = tmp_path / "UserBehavior.csv.gz"
    src.write_bytes(gzip.compress(plain.read_bytes()))
    convert_taobao(src, tmp_path / "a", positive_behaviors="buy", max_history=2)
    assert sorted(rows_of(tmp_path / "a"), key=TB_ORDER) == tb_expected(rows, 2, positive={1})
    convert_taobao(src, tmp_path / "b", positive_behaviors=["pv", "fav"], max_history=2)
    assert sorted(rows_of(tmp_path / "b"), key=TB_ORDER) == tb_expected(rows, 2, positive={0, 3})
    with pytest.raises(ValueError, match="unknown \\['click'\\]"):
        convert_taobao(src, tmp_path / "c", positive_behaviors=["click"])


def test_taobao_reads_back_with_column_reader(tmp_path: Path) -> None:
    rows = taobao_rows(40, seed=13)
    write_taobao(tmp_path / "UserBehavior.csv", rows)
    convert_taobao(tmp_path, tmp_path / "out", max_history=4, buckets=1)
    expected = sorted(tb_expected(rows, 4, {1, 2, 3}), key=TB_ORDER)
    names = ["behavior", "hist_items", "hist_categories", "label"]
    with ColumnReader(tmp_path / "out", names, batch_size=1000) as reader:
        (batch,) = list(reader)
    got = list(zip(*(batch[n].tolist() for n in ["behavior", "label"]), strict=True))
    assert got == [(r["behavior"], r["label"]) for r in expected]
    items = batch["hist_items"]
    assert (
        items.offsets.tolist()[1:]
        == torch.tensor([len(r["hist_items"]) for r in expected]).cumsum(0).tolist()
    )
    assert items.values.tolist() == [i for r in expected for i in r["hist_items"]]
    assert batch["hist_categories"].values.tolist() == [
        c for r in expected for c in r["hist_categories"]
    ]


def test_taobao_bad_lines(tmp_path: Path) -> None:
    src = tmp_path / "UserBehavior.csv"
    src.write_text("1,2,3,pv,10\n1,2,3,click,11\n1,2,3,buy\n1,4,3,cart,12\n")
    with pytest.raises(ConvertError, match=r"line 2: behavior 'click' is not one of"):
        convert_taobao(src, tmp_path / "out")
    report = convert_taobao(src, tmp_path / "out", on_error="skip")
    assert [(r["item_id"], r["hist_items"]) for r in rows_of(tmp_path / "out")] == [
        (2, []),
        (4, [2]),
    ]
    assert report.rows_skipped == 2
    assert [e.split(", line ")[1][:1] for e in report.skipped_examples] == ["2", "3"]
