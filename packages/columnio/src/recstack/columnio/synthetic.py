"""Seeded synthetic CTR data with a known click model, for tests, examples and benchmarks.

A row holds ``label``, ``label_prob``, ``num_dense`` float32 features ``dense_<i>``,
``num_sparse`` int64 categorical ids ``sparse_<i>``, ``string_ids`` string ids (``user_id``
first) and ``history``, a variable-length ``list<int64>`` of item ids.

Distributions (all drawn from the config's seed; see :meth:`SyntheticCTRConfig.describe`):

* ``dense_<i>``: independent N(0, 1), float32.
* ids (``sparse_<i>``, ``history`` items, string ids): a rank ``r`` in ``[1, V]`` from a
  discretized power law, ``P(r = k) = (k**(1-a) - (k+1)**(1-a)) / (1 - (V+1)**(1-a))``
  (Zipf-like with exponent ``a = zipf_a``; ``log((k+1)/k) / log(V+1)`` for ``a == 1``),
  sampled by exact inversion of its CDF. Ranks map to ids in ``[0, V)`` by a fixed per-column
  bijection ``id = ((r - 1) * m + c) mod V`` so popular ids are scattered, not 0, 1, 2.
* ``sparse_<i>`` is null with probability ``null_fraction``.
* ``history`` length: geometric on ``{0, 1, ...}`` with mean ``seq_mean_len`` (so about
  ``1 / (1 + seq_mean_len)`` of rows are empty), cut at ``seq_max_len``.
* string ids: ``"u<id>"`` for ``user_id``, ``"s<i>_<id>"`` for ``string_<i>``.

Click model: ``logit = bias + w . dense + id_signal * sum_{c < signal_columns} e_c(sparse_c)
+ pair_signal * e(sparse_0, sparse_1) + user_signal * e(user_id)
+ history_signal * sum_j e_h(history_j) / sqrt(len)``, ``label_prob = sigmoid(logit)``
(float32) and ``label ~ Bernoulli(label_prob)``. Each ``e_c(id)`` is a fixed N(0, 1) value
(float32) computed from ``fmix64(id ^ salt_c)`` (RecStack's ``mix64``) by Box-Muller, so an
id's effect is the same in every row and every chunk; null ids contribute 0. ``w`` has norm
``dense_signal``. ``label_prob`` is the Bayes-optimal prediction from the row's features:
:func:`best_auc` is the AUC no model can beat on average. **Never use ``label_prob`` (or
``label``) as a feature.**

Determinism: rows are generated in fixed blocks of 65,536 rows, each block's random streams
seeded by ``(seed, stream, block)``, so the same config gives byte-identical data whatever
the chunking, and any row range can be generated on its own (:func:`iter_synthetic_ctr`).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import torch

from recstack.columnio.errors import ColumnIOError, logger
from recstack.columnio.host_hash import host_mix64
from recstack.columnio.writer import resolve_path, write_parquet
from recstack.core.checks import check_int

__all__ = [
    "METADATA_KEY",
    "SyntheticCTRConfig",
    "SyntheticCTRInfo",
    "best_auc",
    "iter_synthetic_ctr",
    "roc_auc",
    "synthetic_ctr_schema",
    "synthetic_ctr_table",
    "write_synthetic_ctr",
]

#: Schema metadata key holding the generator's JSON (config, best AUC, row range).
METADATA_KEY = b"recstack.synthetic"

_BLOCK_ROWS = 65_536  # part of the data's definition: changing it changes every row
_MAX_VOCAB = 2**47  # ids are permuted with 64-bit modular arithmetic (see _permute)
_TABLE_VOCAB = 2**22  # effects of smaller vocabularies are tabulated once, then gathered

# Stream ids of the per-block random generators.
_DENSE, _SPARSE, _NULLS, _SEQ_LEN, _SEQ_ITEMS, _STRINGS, _LABEL = range(1, 8)


# ---------------------------------------------------------------------------- config


def _field(name: str) -> str:
    return f"SyntheticCTRConfig.{name}"


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"SyntheticCTRConfig.{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class SyntheticCTRConfig:
    """What to generate; see the module docstring for the distributions.

    Attributes:
        num_rows: rows in the data set.
        seed: any int >= 0; the same config always gives the same bytes.
        num_dense: float32 columns ``dense_0`` ...
        num_sparse: int64 id columns ``sparse_0`` ...
        vocab_size: ids per sparse column (``[0, vocab_size)``), unless ``vocab_sizes``.
        vocab_sizes: one vocabulary size per sparse column.
        zipf_a: power-law exponent of id popularity (> 0; larger = more skewed).
        seq_mean_len: mean ``history`` length (geometric); 0 gives empty histories.
        seq_max_len: longest ``history`` (at most 32768); longer draws are cut.
        seq_vocab_size: item ids of ``history``; default ``vocab_size``.
        string_ids: string id columns, ``user_id`` then ``string_1`` ...
        string_vocab_size: ids behind the string columns; default ``vocab_size``.
        null_fraction: probability that a sparse id is null, in ``[0, 1)``.
        bias: the click model's intercept (sets the positive rate, about 0.3 by default).
        dense_signal: std of the dense term ``w . dense``.
        id_signal: std of each per-id effect of the first ``signal_columns`` sparse columns.
        signal_columns: how many sparse columns carry an effect (capped at ``num_sparse``).
        pair_signal: std of a ``(sparse_0, sparse_1)`` cross effect (not additive: only a
            model of feature interactions can learn it).
        user_signal: std of the ``user_id`` effect.
        history_signal: std of the history term (sum of item effects / sqrt(length)).
    """

    num_rows: int
    seed: int = 0
    num_dense: int = 13
    num_sparse: int = 26
    vocab_size: int = 1_000_000
    vocab_sizes: tuple[int, ...] | None = None
    zipf_a: float = 1.2
    seq_mean_len: float = 50.0
    seq_max_len: int = 1000
    seq_vocab_size: int | None = None
    string_ids: int = 1
    string_vocab_size: int | None = None
    null_fraction: float = 0.0
    bias: float = -1.2
    dense_signal: float = 0.5
    id_signal: float = 0.3
    signal_columns: int = 8
    pair_signal: float = 0.4
    user_signal: float = 0.4
    history_signal: float = 0.6

    def __post_init__(self) -> None:
        check_int(self.num_rows, _field("num_rows"), minimum=0)
        check_int(self.seed, _field("seed"), minimum=0, maximum=2**63 - 1)
        check_int(self.num_dense, _field("num_dense"), minimum=0)
        check_int(self.num_sparse, _field("num_sparse"), minimum=0)
        check_int(self.vocab_size, _field("vocab_size"), minimum=1, maximum=_MAX_VOCAB)
        if self.vocab_sizes is not None:
            object.__setattr__(self, "vocab_sizes", tuple(self.vocab_sizes))
            if len(self.vocab_sizes) != self.num_sparse:
                raise ValueError(
                    f"SyntheticCTRConfig.vocab_sizes has {len(self.vocab_sizes)} entries for "
                    f"num_sparse={self.num_sparse} columns"
                )
            for i, v in enumerate(self.vocab_sizes):
                check_int(v, _field(f"vocab_sizes[{i}]"), minimum=1, maximum=_MAX_VOCAB)
        _check_float("zipf_a", self.zipf_a)
        if self.zipf_a <= 0:
            raise ValueError(f"SyntheticCTRConfig.zipf_a must be > 0, got {self.zipf_a}")
        _check_float("seq_mean_len", self.seq_mean_len)
        if self.seq_mean_len < 0:
            raise ValueError(
                f"SyntheticCTRConfig.seq_mean_len must be >= 0, got {self.seq_mean_len}"
            )
        check_int(self.seq_max_len, _field("seq_max_len"), minimum=0, maximum=2**15)
        for name in ("seq_vocab_size", "string_vocab_size"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), _field(name), minimum=1, maximum=_MAX_VOCAB)
        check_int(self.string_ids, _field("string_ids"), minimum=0)
        _check_float("null_fraction", self.null_fraction)
        if not 0 <= self.null_fraction < 1:
            raise ValueError(
                f"SyntheticCTRConfig.null_fraction must be in [0, 1), got {self.null_fraction}"
            )
        for name in ("bias", "dense_signal", "id_signal", "pair_signal", "user_signal"):
            _check_float(name, getattr(self, name))
        _check_float("history_signal", self.history_signal)
        check_int(self.signal_columns, _field("signal_columns"), minimum=0)

    # -- column names ------------------------------------------------------------------

    @property
    def dense_columns(self) -> list[str]:
        return [f"dense_{i}" for i in range(self.num_dense)]

    @property
    def sparse_columns(self) -> list[str]:
        return [f"sparse_{i}" for i in range(self.num_sparse)]

    @property
    def string_columns(self) -> list[str]:
        return ["user_id" if i == 0 else f"string_{i}" for i in range(self.string_ids)]

    @property
    def sparse_vocab_sizes(self) -> tuple[int, ...]:
        return self.vocab_sizes or (self.vocab_size,) * self.num_sparse

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (``vocab_sizes`` as a list)."""
        d = asdict(self)
        if d["vocab_sizes"] is not None:
            d["vocab_sizes"] = list(d["vocab_sizes"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyntheticCTRConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"SyntheticCTRConfig: unknown fields {sorted(unknown)}")
        return cls(**data)

    def describe(self) -> str:
        """A human-readable account of the columns and distributions this config generates."""
        signal = min(self.signal_columns, self.num_sparse)
        seq_vocab = self.seq_vocab_size or self.vocab_size
        lines = [
            f"{self.num_rows} rows, seed {self.seed}",
            "label (float32 0/1) ~ Bernoulli(label_prob); label_prob (float32) = sigmoid(logit),"
            " the true click probability: never a feature",
            f"dense_0..dense_{self.num_dense - 1}: float32 N(0, 1)",
            f"sparse_0..sparse_{self.num_sparse - 1}: int64 ids in [0, V) with V = "
            f"{sorted(set(self.sparse_vocab_sizes))}, power-law ranks (a = {self.zipf_a}) "
            f"scattered by a fixed bijection, null with probability {self.null_fraction}",
            f"{', '.join(self.string_columns) or 'no string columns'}: string ids over "
            f"{self.string_vocab_size or self.vocab_size} values, same power law",
            f"history: list<int64> item ids over {seq_vocab} values, geometric length with mean "
            f"{self.seq_mean_len} (P(empty) = {1 / (1 + self.seq_mean_len):.3f}), "
            f"cut at {self.seq_max_len}",
            f"logit = {self.bias} + w.dense (|w| = {self.dense_signal})"
            f" + {self.id_signal} * sum of N(0,1) id effects of sparse_0..sparse_{signal - 1}"
            f" + {self.pair_signal} * e(sparse_0, sparse_1) + {self.user_signal} * e(user_id)"
            f" + {self.history_signal} * sum_j e(history_j) / sqrt(len(history))",
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class SyntheticCTRInfo:
    """What :func:`write_synthetic_ctr` wrote.

    ``best_auc`` and ``positive_rate`` cover the whole data set (``None`` when undefined,
    e.g. no rows or one class only, or when not computed).
    """

    paths: tuple[str, ...]
    rows_per_file: tuple[int, ...]
    num_rows: int
    best_auc: float | None
    positive_rate: float | None
    config: SyntheticCTRConfig


# ---------------------------------------------------------------------------- primitives


def _fmix64(x: np.ndarray) -> np.ndarray:
    """``recstack.core.mix64`` of uint64 values (through int64 views, no copies)."""
    bits = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint64).view(np.int64))
    return host_mix64(bits).numpy().view(np.uint64)


def _effect(ids: np.ndarray, salt: np.uint64) -> np.ndarray:
    """A fixed N(0, 1) draw per id (float32): Box-Muller on the two halves of a hash."""
    h = _fmix64(ids.astype(np.uint64, copy=False) ^ salt)
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * 2.0**-32
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0**-32
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def _zipf_rank0(u: np.ndarray, vocab: int, a: float) -> np.ndarray:
    """Power-law rank minus one, in ``[0, vocab)``, by inverting the CDF at uniforms ``u``."""
    log_v = math.log(vocab + 1.0)
    if a == 1.0:
        x = np.exp(u * log_v)
    else:
        c = -math.expm1((1.0 - a) * log_v)  # 1 - (V + 1)**(1 - a)
        x = np.log1p(u * -c)
        x *= 1.0 / (1.0 - a)
        np.exp(x, out=x)
    r = x.astype(np.int64)
    r -= 1
    np.clip(r, 0, vocab - 1, out=r)  # float rounding at u -> 1
    return r.astype(np.uint64)


def _permute(r0: np.ndarray, mult: int, add: int, vocab: int) -> np.ndarray:
    """``(r0 * mult + add) mod vocab`` in uint64 without overflow, for vocab <= 2**47."""
    v = np.uint64(vocab)
    if vocab <= 2**32:  # r0 * mult < 2**64
        out = r0 * np.uint64(mult)
        out += np.uint64(add)
        out %= v
        return out.astype(np.int64)
    # Horner over 16-bit limbs of mult: every partial product stays below 2**63.
    out = np.zeros_like(r0)
    for shift in (32, 16, 0):
        limb = np.uint64((mult >> shift) & 0xFFFF)
        out = (out * np.uint64(1 << 16) + r0 * limb) % v
    return ((out + np.uint64(add)) % v).astype(np.int64)


def _rng(seed: int, stream: int, block: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, block])))


class _IdSpace:
    """One id column's vocabulary: sampling, the rank -> id bijection, and id effects."""

    def __init__(self, vocab: int, a: float, rng: np.random.Generator) -> None:
        self.vocab = vocab
        self.a = a
        mult = int(rng.integers(1, vocab)) if vocab > 1 else 1
        while math.gcd(mult, vocab) != 1:
            mult = mult % (vocab - 1) + 1
        self.mult = mult
        self.add = int(rng.integers(0, vocab))
        self.salt = np.uint64(int(rng.integers(0, 2**63)))
        self._table: np.ndarray | None = None

    def ids(self, u: np.ndarray) -> np.ndarray:
        return _permute(_zipf_rank0(u, self.vocab, self.a), self.mult, self.add, self.vocab)

    def effects(self, ids: np.ndarray) -> np.ndarray:
        if self.vocab > _TABLE_VOCAB:
            return _effect(ids, self.salt)
        if self._table is None:
            self._table = _effect(np.arange(self.vocab, dtype=np.uint64), self.salt)
        return self._table[ids]


class _Generator:
    """Per-config constants (weights, id spaces, salts) and block generation."""

    def __init__(self, config: SyntheticCTRConfig) -> None:
        self.config = c = config
        rng = _rng(c.seed, 0, 0)
        w = rng.standard_normal(c.num_dense)
        norm = float(np.linalg.norm(w))
        self.w = w * (c.dense_signal / norm) if norm > 0 else w
        self.sparse = [_IdSpace(v, c.zipf_a, rng) for v in c.sparse_vocab_sizes]
        self.seq = _IdSpace(c.seq_vocab_size or c.vocab_size, c.zipf_a, rng)
        self.strings = [
            _IdSpace(c.string_vocab_size or c.vocab_size, c.zipf_a, rng)
            for _ in range(c.string_ids)
        ]
        self.pair_salts = (
            np.uint64(int(rng.integers(0, 2**63))),
            np.uint64(int(rng.integers(0, 2**63))),
        )
        self.signal_columns = min(c.signal_columns, c.num_sparse)
        self.schema = synthetic_ctr_schema(c)

    def _history(self, block: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Lengths of rows [lo, hi) and their items."""
        c = self.config
        u = _rng(c.seed, _SEQ_LEN, block).random(hi)
        if c.seq_mean_len > 0:
            p = 1.0 / (1.0 + c.seq_mean_len)
            lengths = np.floor(np.log1p(-u) / math.log1p(-p))
            np.clip(lengths, 0, c.seq_max_len, out=lengths)
            lengths = lengths.astype(np.int64)
        else:
            lengths = np.zeros(hi, dtype=np.int64)
        skip = int(lengths[:lo].sum())
        total = int(lengths.sum())
        items_u = _rng(c.seed, _SEQ_ITEMS, block).random(total)[skip:]
        return lengths[lo:], self.seq.ids(items_u)

    def block(self, block: int, lo: int, hi: int, labels_only: bool = False) -> Any:
        """Rows ``[lo, hi)`` of block ``block``: a table, or ``(label_prob, label)`` arrays.

        Every stream draws the block's first ``hi`` rows and keeps ``[lo, hi)``, so a row's
        values never depend on which range was asked for.
        """
        c = self.config
        n = hi - lo
        dense = _rng(c.seed, _DENSE, block).standard_normal((hi, c.num_dense), np.float32)[lo:]
        logit = np.full(n, c.bias, dtype=np.float64)
        if c.num_dense:
            logit += dense.astype(np.float64) @ self.w

        # Sparse ids, drawn row-major and kept column by column.
        need = c.num_sparse if not labels_only else max(self.signal_columns, min(2, c.num_sparse))
        u_sparse = _rng(c.seed, _SPARSE, block).random((hi, c.num_sparse))[lo:, :need].T
        valid = None
        if c.null_fraction > 0:
            nulls = _rng(c.seed, _NULLS, block).random((hi, c.num_sparse))[lo:, :need].T
            valid = nulls >= c.null_fraction
        sparse = [self.sparse[j].ids(np.ascontiguousarray(u_sparse[j])) for j in range(need)]
        for j in range(self.signal_columns):
            e = self.sparse[j].effects(sparse[j]).astype(np.float64)
            if valid is not None:
                e *= valid[j]
            logit += c.id_signal * e
        if c.num_sparse >= 2 and c.pair_signal != 0:
            key = _fmix64(sparse[0].astype(np.uint64) ^ self.pair_salts[0])
            key ^= sparse[1].astype(np.uint64)
            e = _effect(key, self.pair_salts[1]).astype(np.float64)
            if valid is not None:
                e *= valid[0] & valid[1]
            logit += c.pair_signal * e

        u_str = _rng(c.seed, _STRINGS, block).random((hi, c.string_ids))[lo:].T
        string_ids = [
            self.strings[j].ids(np.ascontiguousarray(u_str[j])) for j in range(c.string_ids)
        ]
        if string_ids and c.user_signal != 0:
            logit += c.user_signal * self.strings[0].effects(string_ids[0]).astype(np.float64)

        lengths, items = self._history(block, lo, hi)
        if c.history_signal != 0 and items.size:
            csum = np.zeros(items.size + 1, dtype=np.float64)
            np.cumsum(self.seq.effects(items), dtype=np.float64, out=csum[1:])
            ends = np.cumsum(lengths)
            sums = csum[ends] - csum[ends - lengths]
            logit += c.history_signal * sums / np.sqrt(np.maximum(lengths, 1))

        prob = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        u_label = _rng(c.seed, _LABEL, block).random(hi)[lo:]
        label = u_label < prob  # the stored float32 probability is exactly the one used
        if labels_only:
            return prob, label

        arrays: list[pa.Array] = [pa.array(label.astype(np.float32)), pa.array(prob)]
        dense_t = np.ascontiguousarray(dense.T)
        arrays += [pa.array(dense_t[j]) for j in range(c.num_dense)]
        for j in range(c.num_sparse):
            mask = None if valid is None else ~valid[j]
            arrays.append(pa.array(sparse[j], mask=mask))
        for j, ids in enumerate(string_ids):
            prefix = "u" if j == 0 else f"s{j}_"
            arrays.append(
                pc.binary_join_element_wise(prefix, pc.cast(pa.array(ids), pa.string()), "")
            )
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(items)))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def ranges(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """``(block, lo, hi)`` pieces covering global rows ``[start, stop)``."""
        row = start
        while row < stop:
            block, lo = divmod(row, _BLOCK_ROWS)
            hi = min(_BLOCK_ROWS, lo + stop - row)
            yield block, lo, hi
            row += hi - lo


# ---------------------------------------------------------------------------- tables


def synthetic_ctr_schema(config: SyntheticCTRConfig) -> pa.Schema:
    """The columns :func:`synthetic_ctr_table` produces, in order (no metadata)."""
    fields_ = [pa.field("label", pa.float32()), pa.field("label_prob", pa.float32())]
    fields_ += [pa.field(name, pa.float32()) for name in config.dense_columns]
    fields_ += [pa.field(name, pa.int64()) for name in config.sparse_columns]
    fields_ += [pa.field(name, pa.string()) for name in config.string_columns]
    fields_.append(pa.field("history", pa.list_(pa.int64())))
    return pa.schema(fields_)


def _check_range(config: SyntheticCTRConfig, start: int, stop: int | None) -> int:
    stop = config.num_rows if stop is None else stop
    if not 0 <= start <= stop <= config.num_rows:
        raise ValueError(
            f"rows [{start}, {stop}) are not inside the data set's [0, {config.num_rows})"
        )
    return stop


def iter_synthetic_ctr(
    config: SyntheticCTRConfig,
    chunk_rows: int = _BLOCK_ROWS,
    *,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[pa.Table]:
    """Rows ``[start, stop)`` of the data set as tables of ``chunk_rows`` rows (the last may
    be shorter), generated lazily: memory stays at about one chunk whatever ``num_rows``.

    Concatenated, the chunks equal ``synthetic_ctr_table(config)[start:stop]`` (without the
    schema metadata) for any ``chunk_rows``.
    """
    check_int(chunk_rows, "iter_synthetic_ctr: chunk_rows", minimum=1)
    stop = _check_range(config, start, stop)
    gen = _Generator(config)
    pending: list[pa.Table] = []
    pending_rows = 0
    for block, lo, hi in gen.ranges(start, stop):
        piece = gen.block(block, lo, hi)
        while piece.num_rows:
            take = min(chunk_rows - pending_rows, piece.num_rows)
            pending.append(piece.slice(0, take))
            pending_rows += take
            piece = piece.slice(take)
            if pending_rows == chunk_rows:
                yield _join(pending)
                pending, pending_rows = [], 0
    if pending_rows:
        yield _join(pending)


def _join(tables: list[pa.Table]) -> pa.Table:
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables).combine_chunks()


def _labels(gen: _Generator, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [gen.block(b, lo, hi, labels_only=True) for b, lo, hi in gen.ranges(start, stop)]
    if not parts:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    return np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts])


def _stats(prob: np.ndarray, label: np.ndarray) -> dict[str, float | None]:
    auc = roc_auc(prob, label)
    return {
        "best_auc": None if math.isnan(auc) else auc,
        "positive_rate": float(label.mean()) if label.size else None,
    }


def _metadata_json(
    config: SyntheticCTRConfig, row_offset: int, file_stats: dict, dataset_stats: dict, **extra
) -> bytes:
    payload = {
        "generator": "recstack.columnio.synthetic",
        "version": 1,
        "note": "label_prob is the true click probability that drew label: never a feature",
        "config": config.to_dict(),
        "row_offset": row_offset,
        **file_stats,
        "dataset": dataset_stats,
        **extra,
    }
    return json.dumps(payload, sort_keys=True).encode()


def synthetic_ctr_table(config: SyntheticCTRConfig) -> pa.Table:
    """The whole data set as one table, with the generator's JSON under :data:`METADATA_KEY`
    in its schema metadata (config, ``best_auc``, ``positive_rate``)."""
    parts = list(iter_synthetic_ctr(config))
    gen_schema = synthetic_ctr_schema(config)
    table = pa.concat_tables(parts) if parts else gen_schema.empty_table()
    prob = table.column("label_prob").to_numpy()
    label = table.column("label").to_numpy() > 0.5
    stats = _stats(prob, label)
    meta = _metadata_json(
        config, 0, {"num_rows": table.num_rows, **stats}, {"num_rows": table.num_rows, **stats}
    )
    return table.replace_schema_metadata({METADATA_KEY: meta})


def roc_auc(scores: Any, labels: Any) -> float:
    """Exact ROC AUC of ``scores`` against binary ``labels`` (Mann-Whitney, tied scores get
    their average rank, so a tie counts one half). ``nan`` when a class is missing.

    A host-side helper for scoring the synthetic data's click model (:func:`best_auc`).
    To evaluate models, use ``recstack.pipelines.metrics``: AUC, GAUC, log-loss,
    calibration and NE on the device, accumulated over batches, per task and across ranks.

    Args:
        scores: 1-D array-like of numbers (NumPy, torch on CPU, Arrow, list).
        labels: 1-D array-like of 0/1 or bools, same length.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: {s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("roc_auc: scores contain NaN")
    pos = int(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    new_group = np.empty(s.size, dtype=bool)
    new_group[0] = True
    np.not_equal(sorted_s[1:], sorted_s[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], s.size)
    avg_rank = (starts + ends + 1) / 2.0  # 1-based ranks starts+1 .. ends
    group = np.cumsum(new_group) - 1
    rank_pos = avg_rank[group][y[order]].sum()
    return float((rank_pos - pos * (pos + 1) / 2.0) / (pos * neg))


def best_auc(table: pa.Table) -> float:
    """AUC of the Bayes-optimal predictor (``label_prob``) against ``label`` on ``table``."""
    for name in ("label", "label_prob"):
        if name not in table.column_names:
            raise ColumnIOError("best_auc needs the synthetic label columns", column=name)
        if table.column(name).null_count:
            raise ColumnIOError("has nulls", column=name)
    return roc_auc(table.column("label_prob").to_numpy(), table.column("label").to_numpy() > 0.5)


# ---------------------------------------------------------------------------- files


def write_synthetic_ctr(
    path: str | os.PathLike[str],
    config: SyntheticCTRConfig,
    *,
    rows_per_file: int | None = None,
    row_group_size: int = 65_536,
    compression: str = "snappy",
    filesystem: pafs.FileSystem | None = None,
    overwrite: bool = False,
    compute_best_auc: bool = True,
    workers: int = 1,
) -> SyntheticCTRInfo:
    """Write the data set as Parquet: one file at ``path``, or with ``rows_per_file`` a
    directory ``path`` of ``part-00000.parquet``, ``part-00001.parquet``, ...

    Each file is written atomically (:func:`write_parquet`) with generation streamed in
    chunks, and carries the generator's JSON under :data:`METADATA_KEY` in its schema
    metadata: the config, the file's ``row_offset`` and ``num_rows``, the file's own
    ``best_auc`` / ``positive_rate`` and the whole data set's under ``"dataset"``.

    Args:
        path: a file path (or URI), or a directory with ``rows_per_file``.
        config: what to generate.
        rows_per_file: split into files of this many rows (the last may be shorter).
            A zero-row data set still writes one (empty) file.
        row_group_size: Parquet row group size.
        compression: Parquet codec.
        filesystem: a ``pyarrow.fs.FileSystem`` for ``path``.
        overwrite: replace existing files; also removes stale ``part-*.parquet`` files past
            the new last part. Without it an existing target raises ``FileExistsError``.
        compute_best_auc: compute the AUCs first (a labels-only pass over the data, and
            5 bytes per row held in memory); ``False`` writes ``null`` instead.
        workers: processes generating in parallel, one file (and one file's labels) each
            at a time; the files are byte-identical whatever the count (generation is
            seeded per block of rows). Only the config, paths and row ranges travel to
            the workers (the config as its JSON dict), and the labels come back as
            arrays. ``1`` generates in this process.

    Progress is logged per file on the ``recstack.columnio`` logger at INFO level.
    """
    workers = check_int(workers, "write_synthetic_ctr: workers", minimum=1)
    fs, root = resolve_path(path, filesystem)
    uri = os.fspath(path)
    n = config.num_rows
    if rows_per_file is None:
        targets = [root]
        ranges = [(0, n)]
    else:
        rows_per_file = check_int(rows_per_file, "write_synthetic_ctr: rows_per_file", minimum=1)
        ranges = [(s, min(s + rows_per_file, n)) for s in range(0, n, rows_per_file)] or [(0, 0)]
        targets = [f"{root.rstrip('/')}/part-{i:05d}.parquet" for i in range(len(ranges))]
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            raise ColumnIOError("is a file; rows_per_file writes a directory", file=uri)
    for target in targets:
        if fs.get_file_info(target).type != pafs.FileType.NotFound and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")

    gen = _Generator(config)
    pool = _pool(workers, len(ranges))
    try:
        empty_stats: dict[str, float | None] = {"best_auc": None, "positive_rate": None}
        file_stats = [dict(empty_stats) for _ in ranges]
        dataset_stats = dict(empty_stats)
        if compute_best_auc:
            if pool is None:
                prob, label = _labels(gen, 0, n)
            else:
                cfg = config.to_dict()
                parts = list(pool.map(_range_labels, [cfg] * len(ranges), ranges))
                prob = np.concatenate([p for p, _ in parts])
                label = np.concatenate([y for _, y in parts])
            dataset_stats = _stats(prob, label)
            file_stats = [_stats(prob[s:e], label[s:e]) for s, e in ranges]
        dataset_stats = {"num_rows": n, "num_files": len(targets), **dataset_stats}

        jobs = [
            _FileJob(
                target,
                s,
                e,
                _metadata_json(
                    config, s, {"num_rows": e - s, **file_stats[i]}, dataset_stats, file_index=i
                ),
                row_group_size,
                compression,
            )
            for i, (target, (s, e)) in enumerate(zip(targets, ranges, strict=True))
        ]
        if pool is None:
            done: Iterator[_FileJob] = (_write_file(config, job, fs) for job in jobs)
        else:
            cfgs = [config.to_dict()] * len(jobs)
            done = pool.map(_write_file_in_worker, cfgs, jobs, [fs] * len(jobs))
        for i, job in enumerate(done):
            logger.info(
                "write_synthetic_ctr: wrote %s (%d/%d files, %d/%d rows)",
                job.target,
                i + 1,
                len(targets),
                job.stop,
                n,
            )
    finally:
        if pool is not None:
            pool.shutdown()

    if rows_per_file is not None and overwrite:
        _remove_stale_parts(fs, root, len(targets))
    return SyntheticCTRInfo(
        paths=tuple(targets),
        rows_per_file=tuple(e - s for s, e in ranges),
        num_rows=n,
        best_auc=dataset_stats["best_auc"],
        positive_rate=dataset_stats["positive_rate"],
        config=config,
    )


@dataclass(frozen=True)
class _FileJob:
    """One file to write: where, which rows, its metadata and Parquet options."""

    target: str
    start: int
    stop: int
    metadata: bytes
    row_group_size: int
    compression: str


def _pool(workers: int, files: int) -> ProcessPoolExecutor | None:
    """Worker processes (spawned: a forked copy of a process running threads or CUDA may
    hang), or ``None`` to generate here."""
    if workers == 1 or files <= 1:
        return None
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(min(workers, files), mp_context=context)


def _write_file(config: SyntheticCTRConfig, job: _FileJob, fs: pafs.FileSystem) -> _FileJob:
    write_parquet(
        iter_synthetic_ctr(config, start=job.start, stop=job.stop),
        job.target,
        row_group_size=job.row_group_size,
        compression=job.compression,
        filesystem=fs,
        schema=_Generator(config).schema,
        metadata={METADATA_KEY: job.metadata},
    )
    return job


def _write_file_in_worker(config: dict[str, Any], job: _FileJob, fs: pafs.FileSystem) -> _FileJob:
    return _write_file(SyntheticCTRConfig.from_dict(config), job, fs)


def _range_labels(config: dict[str, Any], rows: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return _labels(_Generator(SyntheticCTRConfig.from_dict(config)), *rows)


def _remove_stale_parts(fs: pafs.FileSystem, root: str, keep: int) -> None:
    selector = pafs.FileSelector(root, allow_not_found=True)
    for info in fs.get_file_info(selector):
        name = info.base_name
        if name.startswith("part-") and name.endswith(".parquet"):
            index = name[len("part-") : -len(".parquet")]
            if index.isdigit() and int(index) >= keep:
                fs.delete_file(info.path)
                logger.info("write_synthetic_ctr: removed stale %s", info.path)
