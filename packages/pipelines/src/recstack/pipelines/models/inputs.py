"""What a model reads: its embedding collection's feature configs (checked against the
model config's fields) and, per batch, the sparse and dense inputs, the embedding outputs
(alone, pooled features side by side as an MLP's input, or a jagged sequence's rows) and
the history mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

from recstack.core import JaggedTensor, KeyedJaggedTensor
from recstack.embedding_engine import (
    EmbeddingCollection,
    FeatureConfig,
    ShardedEmbeddingCollection,
    TableConfig,
    TableRows,
)
from recstack.pipelines.models.fields import ModelConfigError

__all__ = [
    "Sharding",
    "ModelFeatures",
    "PooledInputs",
    "build_embeddings",
    "dense_input",
    "embedded_output",
    "jagged_output",
    "sequence_lengths",
    "sequence_mask",
    "sparse_input",
    "table_rows_output",
]

POOLED = ("sum", "mean")


class ModelFeatures:
    """The tables and features of a model's collection, looked up by config field.

    Args:
        owner: the model config's class name, for errors (``"DINConfig"``).
        tables: the collection's tables.
        features: the collection's features.
    """

    def __init__(
        self, owner: str, tables: Sequence[TableConfig], features: Sequence[FeatureConfig]
    ) -> None:
        self.owner = owner
        self.tables = {t.name: t for t in tables}
        self.features = {f.name: f for f in features}

    def _get(self, field: str, name: str) -> FeatureConfig:
        if name not in self.features:
            raise ModelConfigError(
                f"{self.owner}.{field}: no feature {name!r} in the embedding collection "
                f"(its features: {', '.join(self.features) or 'none'})"
            )
        return self.features[name]

    def table_of(self, name: str) -> TableConfig:
        """The table feature ``name`` reads.

        Args:
            name: a feature the collection has.
        """
        return self.tables[self.features[name].table]

    def pooled(self, field: str, name: str, *, allow_tile: bool = True) -> int:
        """The output width of ``name``, which must give one ``[B, width]`` row per sample.

        Args:
            field: the config field naming it, for errors.
            name: the feature.
            allow_tile: accept ``pooling="tile"`` (width ``max_len * dim``) as well as
                ``"sum"``/``"mean"``; interaction layers that pair feature vectors pass
                ``False``.

        Raises:
            ModelConfigError: no such feature, or it is an unpadded or padded sequence.
        """
        f = self._get(field, name)
        ok = POOLED + (("tile",) if allow_tile else ())
        if f.pooling not in ok:
            raise ModelConfigError(
                f"{self.owner}.{field}: feature {name!r} has pooling {f.pooling!r}; this "
                f"field needs one vector per row: pooling {' or '.join(map(repr, ok))}"
            )
        return f.output_dim(self.table_of(name).dim)

    def common_dim(self, field: str, names: Sequence[str]) -> int:
        """The one dim of pooled (``"sum"``/``"mean"``) features ``names``, which
        interaction layers pair with each other.

        Args:
            field: the config field listing them, for errors.
            names: the features (at least one).

        Raises:
            ModelConfigError: a feature is missing or not pooled, or the dims differ.
        """
        dims = {n: self.pooled(f"{field}[{i}]", n, allow_tile=False) for i, n in enumerate(names)}
        if len(set(dims.values())) > 1:
            raise ModelConfigError(
                f"{self.owner}.{field}: the features must share one embedding dim to "
                f"interact, got {dims}"
            )
        return next(iter(dims.values()))

    def sequence(
        self, field: str, name: str, *, allow_jagged: bool = False
    ) -> tuple[int, int | None]:
        """``(dim, max_len)`` of sequence ``name``: a padded sequence (``pooling="none"``
        with ``max_len``, a ``[B, max_len, dim]`` output), or with ``allow_jagged`` also a
        jagged one (``pooling="none"`` without ``max_len``, a ``JaggedTensor`` of
        ``[N, dim]`` rows), whose ``max_len`` is then ``None``.

        Args:
            field: the config field naming it, for errors.
            name: the feature.
            allow_jagged: accept a jagged sequence (the model reads the rows and offsets
                itself, e.g. through :func:`jagged_output`).

        Raises:
            ModelConfigError: no such feature, or not a sequence of an accepted kind.
        """
        f = self._get(field, name)
        if f.pooling == "none" and (f.max_len is not None or allow_jagged):
            return self.table_of(name).dim, f.max_len
        got = f"pooling {f.pooling!r}" + (f", max_len={f.max_len}" if f.max_len else "")
        if f.pooling == "none":
            got += " and no max_len (a jagged sequence)"
        needs = (
            "a jagged or padded sequence: pooling='none', without or with max_len"
            if allow_jagged
            else "a padded sequence: pooling='none' with max_len"
        )
        raise ModelConfigError(
            f"{self.owner}.{field}: feature {name!r} has {got}; this field needs {needs}"
        )


def _parse(items: object, cls: type[Any], what: str) -> list[Any]:
    if items is None or isinstance(items, (str, Mapping)) or not isinstance(items, Sequence):
        raise ModelConfigError(f"{what} must be a list of {cls.__name__}, got {items!r}")
    return [cls.from_dict(x) if isinstance(x, Mapping) else x for x in items]


#: How a model's tables are placed: ``"auto"`` shards them row-wise when
#: ``torch.distributed`` is initialized with more than one rank (``torchrun``), ``"row"``
#: always shards them, ``"none"`` keeps the whole tables in this process.
Sharding = Literal["auto", "none", "row"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def build_embeddings(
    owner: str,
    tables: Sequence[TableConfig | Mapping[str, Any]] | None,
    features: Sequence[FeatureConfig | Mapping[str, Any]] | None,
    embeddings: EmbeddingCollection | ShardedEmbeddingCollection | None,
    device: torch.device | str | None,
    sharding: Sharding = "auto",
) -> tuple[EmbeddingCollection | ShardedEmbeddingCollection, ModelFeatures]:
    """A model's collection (``embeddings``, or one built from the configs) and its
    features.

    Args:
        owner: the model config's class name, for errors.
        tables: the tables (configs or their dicts); optional with ``embeddings``, whose
            tables are then read from it.
        features: the features (configs or their dicts) the collection was or will be
            built from. Required: the collection does not list them.
        embeddings: a ready-made collection, or ``None`` to build one on ``device``.
        device: where to build the collection (default CPU); with ``embeddings`` it must
            be ``None`` or the collection's device.
        sharding: how a built collection places its tables (:data:`Sharding`): sharded
            row-wise across the ranks (a
            :class:`~recstack.embedding_engine.ShardedEmbeddingCollection`) or whole.

    Raises:
        ModelConfigError: a missing argument, or tables that differ from the collection's.
    """
    if features is None:
        raise ModelConfigError(
            f"{owner}: pass the FeatureConfigs of the model's embedding collection as "
            "features= (also with a ready-made collection)"
        )
    feats = _parse(features, FeatureConfig, f"{owner}: features")
    if embeddings is None:
        if tables is None:
            raise ModelConfigError(
                f"{owner}: pass tables= (the TableConfigs) or a ready-made embeddings= collection"
            )
        tabs = _parse(tables, TableConfig, f"{owner}: tables")
        if sharding not in ("auto", "none", "row"):
            raise ModelConfigError(
                f"{owner}: sharding must be 'auto', 'none' or 'row', got {sharding!r}"
            )
        if sharding == "row" or (sharding == "auto" and _distributed()):
            ec: EmbeddingCollection | ShardedEmbeddingCollection = ShardedEmbeddingCollection(
                tabs, feats, device=device
            )
        else:
            ec = EmbeddingCollection(tabs, feats, device=device)
        return ec, ModelFeatures(owner, tabs, feats)
    if not isinstance(embeddings, (EmbeddingCollection, ShardedEmbeddingCollection)):
        raise ModelConfigError(
            f"{owner}: embeddings must be an EmbeddingCollection or a "
            f"ShardedEmbeddingCollection, got {type(embeddings).__name__}"
        )
    if device is not None and torch.empty(0, device=device).device != embeddings.device:
        raise ModelConfigError(
            f"{owner}: device={device} but the embeddings live on {embeddings.device}"
        )
    local = embeddings.shard if isinstance(embeddings, ShardedEmbeddingCollection) else embeddings
    held = {t.name: t for p in local.physical_tables.values() for t in p.tables}
    if tables is not None:
        for t in _parse(tables, TableConfig, f"{owner}: tables"):
            have = held.get(t.name)
            if have is None or (have.dim, have.dtype) != (t.dim, t.dtype):
                found = "no such table" if have is None else f"dim {have.dim}, {have.dtype}"
                raise ModelConfigError(
                    f"{owner}: table {t.name!r} (dim {t.dim}, {t.dtype}) is not the "
                    f"collection's ({found})"
                )
    for f in feats:
        if f.table not in held:
            raise ModelConfigError(
                f"{owner}: feature {f.name!r} reads table {f.table!r}, which the collection "
                f"does not hold (its tables: {', '.join(held)})"
            )
    return embeddings, ModelFeatures(owner, list(held.values()), feats)


def sparse_input(owner: str, inputs: object, key: str) -> KeyedJaggedTensor:
    """The batch's sparse features (``inputs[key]``).

    Args:
        owner: the model's name, for errors.
        inputs: the batch dict after the feature engine.
        key: the column holding the ``KeyedJaggedTensor``.

    Raises:
        TypeError: ``inputs`` is not a mapping or ``inputs[key]`` is not a
            ``KeyedJaggedTensor``.
    """
    if not isinstance(inputs, Mapping):
        raise TypeError(f"{owner}: inputs must be a batch dict, got {type(inputs).__name__}")
    kjt = inputs.get(key)
    if not isinstance(kjt, KeyedJaggedTensor):
        raise TypeError(
            f"{owner}: inputs[{key!r}] must be the KeyedJaggedTensor of sparse features, got "
            f"{type(kjt).__name__} (batch keys: {sorted(map(str, inputs))})"
        )
    return kjt


def dense_input(
    owner: str, inputs: Mapping[str, Any], key: str, dense_dim: int, batch: int
) -> torch.Tensor | None:
    """The batch's dense features as float32 ``[B, dense_dim]``; ``None`` when
    ``dense_dim`` is 0 (the model uses none; the column is then not read).

    Args:
        owner: the model's name, for errors.
        inputs: the batch dict.
        key: the dense column.
        dense_dim: the width the model was built for.
        batch: the batch size ``B``.

    Raises:
        KeyError: the column is missing.
        ValueError: it is not ``[B, dense_dim]``.
    """
    if dense_dim == 0:
        return None
    dense = inputs.get(key)
    if not isinstance(dense, torch.Tensor):
        raise KeyError(
            f"{owner}: dense_dim={dense_dim} but inputs[{key!r}] is not a tensor "
            f"(batch keys: {sorted(map(str, inputs))})"
        )
    if tuple(dense.shape) != (batch, dense_dim):
        raise ValueError(
            f"{owner}: inputs[{key!r}] must be [B, dense_dim] = [{batch}, {dense_dim}], got "
            f"{list(dense.shape)}"
        )
    return dense.float()


class PooledInputs:
    """Pooled features side by side with the dense features: the input of an MLP.

    Args:
        model: the model's name, for errors in the forward.
        features: the model's features.
        field: the config field listing ``names``, for errors.
        names: the pooled features (``"sum"``, ``"mean"`` or ``"tile"``), in order.
        dense_dim: the width of the dense features after them (0: none).

    Raises:
        ModelConfigError: a feature is missing or not pooled.

    Attributes:
        widths: each feature's width.
        width: the concatenated width (the features' and ``dense_dim``).
    """

    def __init__(
        self,
        model: str,
        features: ModelFeatures,
        field: str,
        names: Sequence[str],
        dense_dim: int,
    ) -> None:
        self.model = model
        self.names = tuple(names)
        self.widths = [features.pooled(f"{field}[{i}]", n) for i, n in enumerate(self.names)]
        self.width = sum(self.widths) + dense_dim

    def parts(
        self, out: Mapping[str, Any], batch: int, dense: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """The float32 ``[B, width]`` embeddings of the features, then the dense features
        if any.

        Args:
            out: the collection's output.
            batch: the batch size ``B``.
            dense: the dense features, or ``None``.
        """
        parts = [
            embedded_output(self.model, out, n, (batch, w)).float()
            for n, w in zip(self.names, self.widths, strict=True)
        ]
        if dense is not None:
            parts.append(dense)
        return parts

    def concat(
        self, out: Mapping[str, Any], batch: int, dense: torch.Tensor | None
    ) -> torch.Tensor:
        """:meth:`parts` concatenated: ``[B, width]`` float32.

        Args:
            out: the collection's output.
            batch: the batch size ``B``.
            dense: the dense features, or ``None``.
        """
        return torch.cat(self.parts(out, batch, dense), dim=-1)


def embedded_output(
    owner: str, out: Mapping[str, Any], name: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """Feature ``name``'s embeddings from the collection's output: ``[B, width]`` for a
    pooled feature, ``[B, max_len, dim]`` for a padded sequence.

    Args:
        owner: the model's name, for errors.
        out: the collection's output.
        name: the feature.
        shape: the shape the model was built for.

    Raises:
        ValueError: the output is missing or of another shape (the features given to the
            model differ from the collection's).
    """
    value = out.get(name)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
        got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"{owner}: feature {name!r} should embed to {list(shape)} but the collection gave "
            f"{got}; the FeatureConfigs given to the model differ from the collection's"
        )
    return value


def jagged_output(
    owner: str, out: Mapping[str, Any], name: str, batch: int, dim: int
) -> JaggedTensor:
    """Jagged sequence ``name``'s rows from the collection's output: a ``JaggedTensor`` of
    ``[N, dim]`` rows with ``B + 1`` offsets. Checks shapes only, no host sync.

    Args:
        owner: the model's name, for errors.
        out: the collection's output.
        name: the feature (``pooling="none"`` without ``max_len``).
        batch: the batch size ``B``.
        dim: the row width the model was built for.

    Raises:
        ValueError: the output is missing or not such rows (the features given to the
            model differ from the collection's).
    """
    value = out.get(name)
    if (
        isinstance(value, JaggedTensor)
        and isinstance(value.values, torch.Tensor)
        and value.values.dim() == 2
        and value.values.shape[1] == dim
        and value.offsets.numel() == batch + 1
    ):
        return value
    if isinstance(value, JaggedTensor):
        rows = value.values
        shape = list(rows.shape) if isinstance(rows, torch.Tensor) else "nested rows"
        got = f"a JaggedTensor of {shape} rows with {value.offsets.numel()} offsets"
    else:
        got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    raise ValueError(
        f"{owner}: feature {name!r} should embed to a JaggedTensor of [N, {dim}] rows with "
        f"{batch + 1} offsets but the collection gave {got}; the FeatureConfigs given to the "
        "model differ from the collection's"
    )


def table_rows_output(
    owner: str, out: Mapping[str, Any], name: str, batch: int, dim: int
) -> JaggedTensor | TableRows:
    """Jagged sequence ``name``'s output: its gathered rows (:func:`jagged_output`), or,
    for a feature left in its table (``FeatureConfig(gather=False)``), the
    :class:`~recstack.embedding_engine.TableRows` as they are. Checks shapes only, no host
    sync.

    Args:
        owner: the model's name, for errors.
        out: the collection's output.
        name: the feature (``pooling="none"`` without ``max_len``).
        batch: the batch size ``B``.
        dim: the row width the model was built for.

    Raises:
        ValueError: the output is missing or of another shape.
    """
    value = out.get(name)
    if isinstance(value, TableRows):
        if value.dim != dim or value.offsets.numel() != batch + 1:
            raise ValueError(
                f"{owner}: feature {name!r} should give rows of dim {dim} with {batch + 1} "
                f"offsets but the collection gave dim {value.dim} with "
                f"{value.offsets.numel()}; the FeatureConfigs given to the model differ from "
                "the collection's"
            )
        return value
    return jagged_output(owner, out, name, batch, dim)


def sequence_lengths(kjt: KeyedJaggedTensor, name: str, max_len: int) -> torch.Tensor:
    """int64 ``[B]``: how many ids row ``b`` of the collection's padded output of sequence
    ``name`` holds, ``min(length_b, max_len)``. Read from the KJT's lengths without a
    host sync.

    Args:
        kjt: the batch's sparse features.
        name: the sequence feature.
        max_len: its padded length.
    """
    keys = kjt.keys()
    # The key-major lengths buffer, not kjt[name], which reads per-key totals from the
    # device to slice the values.
    lengths = kjt.lengths().view(len(keys), kjt.stride())[keys.index(name)]
    return lengths.clamp(max=max_len)


def sequence_mask(kjt: KeyedJaggedTensor, name: str, max_len: int) -> torch.Tensor:
    """Bool ``[B, max_len]``: True where the collection's padded output of sequence
    ``name`` holds an id, False on padding.

    Row ``b`` holds ``min(length_b, max_len)`` ids at the front (the collection pads on
    the right), :func:`sequence_lengths`. No host sync.

    Args:
        kjt: the batch's sparse features.
        name: the sequence feature.
        max_len: its padded length.
    """
    lengths = sequence_lengths(kjt, name, max_len)
    positions = torch.arange(max_len, device=lengths.device)
    return positions < lengths.unsqueeze(1)
