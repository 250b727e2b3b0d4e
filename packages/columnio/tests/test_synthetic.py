"""Synthetic CTR data: schema, distributions, determinism, the click model, AUC, files."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from recstack.columnio.errors import ColumnIOError
from recstack.columnio.synthetic import (
    METADATA_KEY,
    SyntheticCTRConfig,
    _fmix64,
    _permute,
    best_auc,
    iter_synthetic_ctr,
    roc_auc,
    synthetic_ctr_schema,
    synthetic_ctr_table,
    write_synthetic_ctr,
)
from recstack.core import kernels, mix64

BLOCK = 65_536


def small(num_rows: int, **kw) -> SyntheticCTRConfig:
    """A cheap config: few columns, small vocabularies, short histories."""
    base = dict(num_dense=3, num_sparse=4, vocab_size=1000, seq_mean_len=4.0, seq_max_len=20)
    base.update(kw)
    return SyntheticCTRConfig(num_rows=num_rows, **base)


# ---------------------------------------------------------------------------- schema


def test_default_schema_and_columns():
    config = SyntheticCTRConfig(num_rows=3000, seed=1)
    table = synthetic_ctr_table(config)
    assert table.num_rows == 3000
    names = table.column_names
    assert names[:2] == ["label", "label_prob"]
    assert names[2:15] == [f"dense_{i}" for i in range(13)]
    assert names[15:41] == [f"sparse_{i}" for i in range(26)]
    assert names[41:] == ["user_id", "history"]
    assert table.schema.equals(synthetic_ctr_schema(config))
    types = {f.name: f.type for f in table.schema}
    assert types["dense_0"] == pa.float32() and types["sparse_25"] == pa.int64()
    assert types["user_id"] == pa.string() and types["history"] == pa.list_(pa.int64())
    assert config.dense_columns == names[2:15] and config.sparse_columns == names[15:41]
    assert config.string_columns == ["user_id"]
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    assert meta["config"] == config.to_dict()
    assert meta["best_auc"] == pytest.approx(best_auc(table))
    assert meta["num_rows"] == 3000
    assert "never a feature" in meta["note"]
    # The default click model has real but imperfect signal.
    assert 0.7 < best_auc(table) < 0.9
    text = config.describe()
    assert "history" in text and "label_prob" in text and "sparse_25" in text


def test_string_columns_format():
    table = synthetic_ctr_table(small(500, string_ids=3, string_vocab_size=50))
    assert table.column_names[-4:] == ["user_id", "string_1", "string_2", "history"]
    assert all(re.fullmatch(r"u\d+", s) for s in table.column("user_id").to_pylist())
    assert all(re.fullmatch(r"s2_\d+", s) for s in table.column("string_2").to_pylist())
    ids = [int(s[1:]) for s in table.column("user_id").to_pylist()]
    assert min(ids) >= 0 and max(ids) < 50


@pytest.mark.parametrize("rows", [0, 1, 17])
def test_tiny_and_empty(rows):
    config = small(rows)
    table = synthetic_ctr_table(config)
    assert table.num_rows == rows
    assert table.schema.equals(synthetic_ctr_schema(config))
    assert list(iter_synthetic_ctr(config)) == (
        [] if rows == 0 else [table.replace_schema_metadata(None)]
    )
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    if rows < 2:
        assert meta["best_auc"] is None
        assert math.isnan(best_auc(table))


def test_no_optional_columns():
    config = SyntheticCTRConfig(
        num_rows=10, num_dense=0, num_sparse=0, string_ids=0, seq_mean_len=0, vocab_size=7
    )
    table = synthetic_ctr_table(config)
    assert table.column_names == ["label", "label_prob", "history"]
    assert pc.sum(pc.list_value_length(table.column("history"))).as_py() == 0


# ---------------------------------------------------------------------------- determinism


def test_same_config_same_bytes(tmp_path):
    config = small(3000, seed=5)
    a, b = synthetic_ctr_table(config), synthetic_ctr_table(config)
    assert a.equals(b, check_metadata=True)
    write_synthetic_ctr(tmp_path / "a.parquet", config)
    write_synthetic_ctr(tmp_path / "b.parquet", config)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    other = synthetic_ctr_table(small(3000, seed=6))
    assert not other.column("sparse_0").equals(a.column("sparse_0"))


def test_chunking_and_ranges_do_not_change_rows():
    # Crosses a generation block boundary.
    config = small(BLOCK + 300, num_dense=1, num_sparse=2, seq_mean_len=1.0, null_fraction=0.2)
    full = synthetic_ctr_table(config).replace_schema_metadata(None)
    for chunk in (BLOCK, 5000, 65_537):
        parts = list(iter_synthetic_ctr(config, chunk_rows=chunk))
        assert all(p.num_rows == chunk for p in parts[:-1])
        assert pa.concat_tables(parts).equals(full)
    for start, stop in [(BLOCK - 10, BLOCK + 10), (BLOCK, BLOCK + 300), (7, 8), (100, 100)]:
        got = list(iter_synthetic_ctr(config, chunk_rows=3, start=start, stop=stop))
        want = full.slice(start, stop - start)
        assert (pa.concat_tables(got) if got else want.slice(0, 0)).equals(want)
    with pytest.raises(ValueError, match="inside"):
        list(iter_synthetic_ctr(config, start=5, stop=BLOCK + 301))
    with pytest.raises(ValueError, match="chunk_rows"):
        list(iter_synthetic_ctr(config, chunk_rows=0))


# ---------------------------------------------------------------------------- distributions


def test_zipf_ids_follow_the_stated_law():
    vocab, a, n = 500, 1.2, 40_000
    config = small(n, num_sparse=1, vocab_size=vocab, zipf_a=a, seed=3)
    ids = synthetic_ctr_table(config).column("sparse_0").to_numpy()
    assert ids.min() >= 0 and ids.max() < vocab
    counts = np.bincount(ids, minlength=vocab)
    by_rank = np.sort(counts)[::-1]
    k = np.arange(1, vocab + 1, dtype=np.float64)
    p = (k ** (1 - a) - (k + 1) ** (1 - a)) / (1 - (vocab + 1) ** (1 - a))
    for rank in (0, 1, 4):
        expected = n * p[rank]
        assert abs(by_rank[rank] - expected) < 5 * math.sqrt(expected), rank
    # Popular ids are scattered over the vocabulary, not 0, 1, 2.
    top3 = set(np.argsort(counts)[::-1][:3].tolist())
    assert top3 != {0, 1, 2}


def test_per_column_vocab_sizes_and_nulls():
    config = small(5000, num_sparse=3, vocab_sizes=(1, 10, 2**40), null_fraction=0.25)
    table = synthetic_ctr_table(config)
    for name, vocab in zip(config.sparse_columns, (1, 10, 2**40), strict=True):
        col = table.column(name)
        assert abs(col.null_count / 5000 - 0.25) < 0.03
        values = col.drop_null().to_numpy()
        assert values.min() >= 0 and values.max() < vocab
    assert table.column("sparse_1").drop_null().to_numpy().max() > 0  # uses its vocabulary
    assert synthetic_ctr_table(small(500)).column("sparse_0").null_count == 0


def test_history_lengths():
    config = small(20_000, seq_mean_len=6.0, seq_max_len=15, seq_vocab_size=77)
    hist = synthetic_ctr_table(config).column("history")
    lengths = pc.list_value_length(hist).to_numpy()
    assert lengths.max() <= 15
    assert 5.0 < lengths.mean() < 6.1  # geometric(6) cut at 15 has mean ~5.6
    assert abs((lengths == 0).mean() - 1 / 7) < 0.02
    items = pc.list_flatten(hist).to_numpy()
    assert items.min() >= 0 and items.max() < 77


def test_dense_columns_are_standard_normal():
    dense = synthetic_ctr_table(small(20_000, num_dense=2)).column("dense_1").to_numpy()
    assert abs(dense.mean()) < 0.05 and abs(dense.std() - 1) < 0.05


# ---------------------------------------------------------------------------- click model


def test_labels_follow_label_prob():
    table = synthetic_ctr_table(small(20_000, seed=2))
    prob = table.column("label_prob").to_numpy()
    label = table.column("label").to_numpy()
    assert set(np.unique(label).tolist()) <= {0.0, 1.0}
    assert (prob > 0).all() and (prob < 1).all()
    assert abs(label.mean() - prob.mean()) < 4 * math.sqrt(0.25 / 20_000)
    # Calibrated: within probability deciles the click rate matches the mean probability.
    edges = np.quantile(prob, np.linspace(0, 1, 6))
    bins = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, 4)
    for b in range(5):
        sel = bins == b
        assert abs(label[sel].mean() - prob[sel].mean()) < 0.04


def test_id_effect_is_a_function_of_the_id():
    # Only sparse_0 carries signal: rows sharing an id share a probability.
    config = small(
        3000,
        num_sparse=1,
        signal_columns=1,
        vocab_size=40,
        dense_signal=0.0,
        pair_signal=0.0,
        user_signal=0.0,
        history_signal=0.0,
        id_signal=1.0,
    )
    table = synthetic_ctr_table(config)
    ids = table.column("sparse_0").to_numpy()
    prob = table.column("label_prob").to_numpy()
    for i in np.unique(ids):
        assert len(np.unique(prob[ids == i])) == 1
    assert len(np.unique(prob)) > 10


def test_no_signal_gives_auc_one_half():
    config = small(
        1000,
        dense_signal=0.0,
        id_signal=0.0,
        pair_signal=0.0,
        user_signal=0.0,
        history_signal=0.0,
        bias=-1.0,
    )
    table = synthetic_ctr_table(config)
    prob = table.column("label_prob").to_numpy()
    assert np.all(prob == np.float32(1 / (1 + math.exp(1.0))))
    assert best_auc(table) == 0.5  # every pair tied


def test_more_signal_more_auc():
    weak = best_auc(synthetic_ctr_table(small(5000, dense_signal=0.2, id_signal=0.1)))
    strong = best_auc(synthetic_ctr_table(small(5000, dense_signal=2.0, id_signal=1.0)))
    assert strong > weak + 0.1


def test_fmix64_is_recstack_mix64():
    x = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 1000, dtype=np.int64)
    x[:3] = [0, 1, -1]
    with kernels.use_backend("torch"):
        want = mix64(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(_fmix64(x.view(np.uint64)).view(np.int64), want)


@pytest.mark.parametrize("vocab", [1, 7, 2**32, 2**32 + 15, 2**47])
def test_rank_to_id_map_is_exact_modular_arithmetic(vocab):
    rng = np.random.default_rng(vocab % 1000)
    r0 = rng.integers(0, vocab, 500, dtype=np.uint64)
    r0[:2] = [0, vocab - 1]
    mult, add = int(rng.integers(1, vocab)) if vocab > 1 else 1, int(rng.integers(0, vocab))
    want = [(int(r) * mult + add) % vocab for r in r0]
    assert _permute(r0, mult, add, vocab).tolist() == want


# ---------------------------------------------------------------------------- AUC


def _pairwise_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("n", [2, 3, 50, 301])
def test_roc_auc_matches_pairwise_with_ties(n):
    rng = np.random.default_rng(n)
    scores = rng.integers(0, 5, n).astype(np.float32)  # many ties
    labels = rng.random(n) < 0.4
    labels[0], labels[1] = True, False
    assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)
    assert roc_auc(torch.from_numpy(scores), torch.from_numpy(labels)) == roc_auc(scores, labels)


def test_roc_auc_edges():
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0
    assert roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert math.isnan(roc_auc([0.3, 0.4], [1, 1]))
    assert math.isnan(roc_auc([], []))
    with pytest.raises(ValueError, match="labels"):
        roc_auc([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([float("nan"), 0.2], [1, 0])
    with pytest.raises(ColumnIOError, match="label_prob"):
        best_auc(pa.table({"label": [1.0]}))


# ---------------------------------------------------------------------------- files


def test_write_one_file(tmp_path):
    config = small(2500, seed=9)
    path = tmp_path / "one.parquet"
    info = write_synthetic_ctr(path, config, row_group_size=1000)
    assert info.paths == (str(path),) and info.num_rows == 2500 and info.rows_per_file == (2500,)
    back = pq.read_table(path)
    table = synthetic_ctr_table(config)
    assert back.replace_schema_metadata(None).equals(table.replace_schema_metadata(None))
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1000, 1000, 500]
    stored = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    assert stored["best_auc"] == pytest.approx(best_auc(table))
    assert stored["dataset"]["best_auc"] == pytest.approx(info.best_auc)
    assert info.positive_rate == pytest.approx(table.column("label").to_numpy().mean())
    assert SyntheticCTRConfig.from_dict(stored["config"]) == config
    with pytest.raises(FileExistsError):
        write_synthetic_ctr(path, config)


def test_write_directory_of_parts(tmp_path):
    config = small(2300, seed=4)
    root = tmp_path / "data"
    info = write_synthetic_ctr(root, config, rows_per_file=1000)
    assert [p.rsplit("/", 1)[1] for p in info.paths] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert info.rows_per_file == (1000, 1000, 300)
    table = synthetic_ctr_table(config).replace_schema_metadata(None)
    parts = [pq.read_table(p) for p in info.paths]
    assert pa.concat_tables([p.replace_schema_metadata(None) for p in parts]).equals(table)
    for i, part in enumerate(parts):
        meta = json.loads(part.schema.metadata[METADATA_KEY])
        assert meta["file_index"] == i and meta["row_offset"] == 1000 * i
        assert meta["num_rows"] == part.num_rows
        assert meta["best_auc"] == pytest.approx(best_auc(part))
        assert meta["dataset"] == {
            "best_auc": info.best_auc,
            "positive_rate": info.positive_rate,
            "num_rows": 2300,
            "num_files": 3,
        }
    assert info.best_auc == pytest.approx(best_auc(table))
    assert sorted(p.name for p in root.iterdir()) == [p.rsplit("/", 1)[1] for p in info.paths]

    # Rewriting with fewer files removes the stale part; without overwrite it refuses.
    with pytest.raises(FileExistsError):
        write_synthetic_ctr(root, config, rows_per_file=1000)
    info2 = write_synthetic_ctr(root, small(1500, seed=4), rows_per_file=1000, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert info2.rows_per_file == (1000, 500)


def test_worker_processes_write_the_same_bytes(tmp_path):
    config = small(2300, seed=5)
    one = write_synthetic_ctr(tmp_path / "one", config, rows_per_file=1000)
    many = write_synthetic_ctr(tmp_path / "many", config, rows_per_file=1000, workers=3)
    assert many.best_auc == one.best_auc and many.positive_rate == one.positive_rate
    for a, b in zip(one.paths, many.paths, strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    with pytest.raises(ValueError, match="workers"):
        write_synthetic_ctr(tmp_path / "bad", config, rows_per_file=1000, workers=0)


def test_write_empty_and_without_auc(tmp_path):
    info = write_synthetic_ctr(tmp_path / "d", small(0), rows_per_file=10)
    assert info.rows_per_file == (0,) and info.best_auc is None
    assert pq.read_table(info.paths[0]).num_rows == 0
    info = write_synthetic_ctr(tmp_path / "x.parquet", small(50), compute_best_auc=False)
    assert info.best_auc is None
    assert json.loads(pq.read_schema(info.paths[0]).metadata[METADATA_KEY])["best_auc"] is None
    with pytest.raises(ColumnIOError, match="is a file"):
        write_synthetic_ctr(tmp_path / "x.parquet", small(5), rows_per_file=2)


def test_config_validation_and_round_trip():
    config = small(10, vocab_sizes=[3, 4, 5, 6])
    assert config.vocab_sizes == (3, 4, 5, 6)
    assert SyntheticCTRConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    bad = [
        dict(num_rows=-1),
        dict(num_rows=1, zipf_a=0.0),
        dict(num_rows=1, vocab_size=0),
        dict(num_rows=1, num_sparse=2, vocab_sizes=(3,)),
        dict(num_rows=1, null_fraction=1.0),
        dict(num_rows=1, seq_mean_len=-1.0),
        dict(num_rows=1, seed=-3),
        dict(num_rows=1, bias=float("nan")),
        dict(num_rows=1, vocab_size=2**48),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            SyntheticCTRConfig(**kw)
    with pytest.raises(TypeError):
        SyntheticCTRConfig(num_rows=1.5)
    with pytest.raises(ValueError, match="unknown"):
        SyntheticCTRConfig.from_dict({"num_rows": 1, "colour": "red"})
