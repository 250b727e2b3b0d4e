"""The base of the reference models: a typed config, an owned embedding collection, and
the batch-dict calling convention the Trainer uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, Self, TypeVar

import torch
from torch import nn

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import (
    EmbeddingCollection,
    FeatureConfig,
    ShardedEmbeddingCollection,
    TableConfig,
)
from recstack.pipelines.models.fields import CheckedConfig, ModelConfigError, config_from_mapping
from recstack.pipelines.models.inputs import (
    ModelFeatures,
    Sharding,
    build_embeddings,
    dense_input,
    sparse_input,
)

__all__ = ["EmbeddingModel"]

Tables = Sequence[TableConfig | Mapping[str, Any]]
Features = Sequence[FeatureConfig | Mapping[str, Any]]
ConfigT = TypeVar("ConfigT", bound=CheckedConfig)


class EmbeddingModel(nn.Module, Generic[ConfigT]):
    """A model that owns an :class:`~recstack.embedding_engine.EmbeddingCollection`
    (``self.embeddings``) and is called as ``model(inputs)`` on a batch dict: the
    feature engine's output, with the ``KeyedJaggedTensor`` of sparse features at
    ``inputs[config.sparse_key]`` and, when ``config.dense_dim > 0``, the dense features
    ``[B, dense_dim]`` at ``inputs[config.dense_key]``.

    Subclasses set ``config_class`` (a :class:`~recstack.pipelines.models.fields.CheckedConfig`
    dataclass), build their dense layers in ``_build(config)``, which runs once the
    collection and :attr:`features` are ready (the model is then moved to the
    collection's device), and compute their outputs in ``_outputs(kjt, embedded, dense)``
    from the batch :meth:`forward` read.

    Args:
        config: the model's config (a ``config_class`` instance).
        tables: the collection's tables; optional with ``embeddings``.
        features: the collection's features (always needed: the model checks its config
            against them, and a collection does not list them).
        embeddings: a ready-made collection built from these configs (e.g. to build it
            with other options); ``None`` builds one on ``device``.
        device: where the collection and the dense layers live (default: the
            collection's device, else CPU). A collection does not follow ``.to()``, so
            build the model on its device.
        sharding: ``"auto"`` (default) shards the tables row-wise across the ranks when
            ``torch.distributed`` is initialized with more than one rank (``torchrun``),
            ``"row"`` always, ``"none"`` never (see
            :class:`~recstack.embedding_engine.ShardedEmbeddingCollection`).

    Raises:
        ModelConfigError: a config of another class, or one that does not fit the
            features (a field names a missing feature, or one of the wrong kind or dim).

    Attributes:
        config: the config.
        embeddings: the collection (its rows are trained by a sparse optimizer).
    """

    config_class: ClassVar[type]

    def __init__(
        self,
        config: ConfigT,
        tables: Tables | None = None,
        features: Features | None = None,
        *,
        embeddings: EmbeddingCollection | ShardedEmbeddingCollection | None = None,
        device: torch.device | str | None = None,
        sharding: Sharding = "auto",
    ) -> None:
        super().__init__()
        owner = self.config_class.__name__
        if not isinstance(config, self.config_class):
            raise ModelConfigError(
                f"{type(self).__name__}: config must be a {owner} (use from_config for a "
                f"mapping), got {type(config).__name__}"
            )
        self.config: ConfigT = config
        self.embeddings, self._features = build_embeddings(
            owner, tables, features, embeddings, device, sharding
        )
        self._build(config)
        self._place()

    @property
    def features(self) -> ModelFeatures:
        """The collection's tables and features, as the model checked them."""
        return self._features

    @classmethod
    def from_config(
        cls,
        config: Any,
        tables: Tables | None = None,
        features: Features | None = None,
        *,
        embeddings: EmbeddingCollection | ShardedEmbeddingCollection | None = None,
        device: torch.device | str | None = None,
        sharding: Sharding = "auto",
    ) -> Self:
        """The model from a config given as a mapping (e.g. read from YAML or TOML) or
        as its config class, and tables/features as configs or their dicts.

        Args:
            config: the model config or its fields by name.
            tables: the collection's tables (see the class docs).
            features: the collection's features (see the class docs).
            embeddings: a ready-made collection (see the class docs).
            device: where the model lives (see the class docs).
            sharding: how the tables are placed (see the class docs).

        Raises:
            ModelConfigError: an invalid config, or one that does not fit the features.
        """
        return cls(
            config_from_mapping(cls.config_class, config),
            tables,
            features,
            embeddings=embeddings,
            device=device,
            sharding=sharding,
        )

    def forward(self, inputs: Mapping[str, Any]) -> Any:
        """The model's outputs for a batch dict: logits ``[B]`` (float32), or a dict of
        them by task (see the model's class).

        Args:
            inputs: the feature engine's batch dict (see the class).
        """
        return self._outputs(*self._read(inputs))

    def _build(self, config: ConfigT) -> None:
        """Build the dense layers (a subclass's own); nothing by default."""

    def _outputs(
        self, kjt: KeyedJaggedTensor, out: Mapping[str, Any], dense: torch.Tensor | None
    ) -> Any:
        """The outputs from the batch's sparse features, their embeddings (the
        collection's output) and the dense features (``None`` without them)."""
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def _place(self) -> None:
        """Move the dense layers to the collection's device."""
        self.to(self.embeddings.device)

    def _read(
        self, inputs: Mapping[str, Any]
    ) -> tuple[KeyedJaggedTensor, dict[str, Any], torch.Tensor | None]:
        """The batch's sparse features, their embeddings and the dense features (``None``
        for a model without them)."""
        name, c = type(self).__name__, self.config
        kjt = sparse_input(name, inputs, c.sparse_key)
        out = self.embeddings(kjt)
        dense = dense_input(name, inputs, c.dense_key, c.dense_dim, kjt.stride())
        return kjt, out, dense
