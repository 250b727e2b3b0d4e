"""The Trainer's ``pipeline="ids"``: the next batch's ids travel to their owners while this
step's backward and optimizer step run; ``pipeline="semi-sync"`` also looks that batch up
before this step's sparse update.

A sharded collection's forward starts with a collective that depends on nothing but the
batch's ids: each rank sends its unique ids to the ranks that own them
(:meth:`~recstack.embedding_engine.ShardedEmbeddingCollection.prefetch`). :class:`IdPrefetch`
holds the next batch back from the data, runs the feature engine on it and starts that
exchange right after the current batch's forward, so the transfer overlaps the backward
and the optimizer step; the next forward then waits for it instead of starting it. The
lookups stay in that forward, after this step's updates: training is exactly what it is
without the pipeline.

Every rank must start the same exchanges: before each one the ranks agree that all of
them have a next batch (one small host all-reduce); at the end of the data none starts.

Tiered tables (``TableConfig(hbm_budget=...)``) take the next batch too, whatever the
pipeline: :meth:`EmbeddingCollection.prefetch
<recstack.embedding_engine.EmbeddingCollection.prefetch>` moves its rows that sit in host
memory to the GPU before its forward (results are unchanged; only where rows sit). A
sharded collection's ``prefetch`` does the same on each owner, for the rows it will serve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from recstack.core import KeyedJaggedTensor
from recstack.embedding_engine import EmbeddingCollection, ShardedEmbeddingCollection
from recstack.pipelines.rank_agreement import RankAgreement

__all__ = ["IdPrefetch", "Lookahead"]

_NOTHING = object()


class Lookahead(Iterator[Any]):
    """An iterator whose next item can be looked at (:meth:`peek`) before it is taken.

    Args:
        items: the underlying iterator.

    Examples:
        >>> it = Lookahead(iter([1, 2]))
        >>> it.peek(), next(it), next(it), it.peek()
        (1, 1, 2, None)
    """

    def __init__(self, items: Iterator[Any]) -> None:
        self._items = items
        self._held: Any = _NOTHING

    @property
    def holding(self) -> bool:
        """Whether :meth:`peek` took an item from the underlying iterator that
        ``next()`` has not handed out yet."""
        return self._held is not _NOTHING

    def peek(self) -> Any:
        """The next item, left in place (``None`` at the end)."""
        if self._held is _NOTHING:
            self._held = next(self._items, None)
        return self._held

    def __next__(self) -> Any:
        if self._held is _NOTHING:
            return next(self._items)
        held, self._held = self._held, _NOTHING
        if held is None:
            raise StopIteration
        return held


class IdPrefetch:
    """Featurizes the next batch and prefetches its ids into the sharded collections (and
    the collections with tiered tables).

    Args:
        collections: the model's sharded collections, and its collections with tiered
            tables (others have nothing to do ahead).
    """

    def __init__(self, collections: list[EmbeddingCollection | ShardedEmbeddingCollection]) -> None:
        self.collections = collections
        self._batches: Lookahead | None = None
        self._ready: tuple[Any, dict[str, Any]] | None = None
        # Sharded collections sent a batch ahead, which look_next looks up.
        self._sent: list[tuple[Any, KeyedJaggedTensor]] = []
        self._position: Callable[[], dict[str, Any]] | None = None
        self._held_position: dict[str, Any] | None = None
        #: Batches whose ids were sent ahead, and looked up ahead (for tests and logs).
        self.sent = 0
        self.looked = 0

    def wrap(
        self, batches: Iterator[Any], position: Callable[[], dict[str, Any]] | None = None
    ) -> Lookahead:
        """The epoch's batches, with the next one visible to :meth:`send_next`.

        Args:
            batches: the epoch's batches.
            position: the data position after the last batch taken (the stream's
                ``state_dict``), read before each look ahead for :meth:`position`.
        """
        self._batches = Lookahead(batches)
        self._ready = None
        self._position, self._held_position = position, None
        return self._batches

    def position(self) -> dict[str, Any] | None:
        """While a batch is held back for the next step, the data position before it (a
        checkpoint taken now must resume at that batch, which no step trained yet);
        otherwise ``None``: the stream's own position is right."""
        if self._batches is not None and self._batches.holding:
            return self._held_position
        return None

    def inputs(self, batch: Any, featurize: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        """``batch``'s inputs: those :meth:`send_next` made for it, else ``featurize``'s."""
        ready, self._ready = self._ready, None
        if ready is not None and ready[0] is batch:
            return ready[1]
        return featurize(batch)

    def send_next(
        self,
        featurize: Callable[[Any], dict[str, Any]],
        ranks: RankAgreement | None,
        step: int,
    ) -> bool:
        """Featurize the next batch and start its id exchanges, when every rank has one.

        Args:
            featurize: the Trainer's feature step.
            ranks: the run's rank agreement (``None``: one process).
            step: the step the next batch belongs to (for error messages).

        Returns:
            Whether the exchanges were started.
        """
        if self._batches is None or not self.collections:
            return False
        if not self._batches.holding and self._position is not None:
            self._held_position = self._position()
        batch = self._batches.peek()
        if ranks is not None:
            agreed = ranks.agree(batches=int(batch is not None), stop=False, step=step)
            if agreed.fewest == 0:
                return False
        elif batch is None:
            return False
        inputs = featurize(batch)
        self._ready = (batch, inputs)
        kjts = [v for v in inputs.values() if isinstance(v, KeyedJaggedTensor)]
        self._sent = []
        for c in self.collections:
            kjt = next((k for k in kjts if all(n in k for n in c.feature_names)), None)
            if kjt is None:
                # Every rank builds the same inputs, so every rank skips this one alike.
                continue
            c.prefetch(kjt)
            if hasattr(c, "lookahead"):  # a sharded collection: looked up ahead by look_next
                self._sent.append((c, kjt))
        self.sent += 1
        return True

    @property
    def sent_ahead(self) -> bool:
        """Whether :meth:`send_next` sent a batch that :meth:`look_next` has not looked
        up yet."""
        return bool(self._sent)

    def look_next(self) -> bool:
        """Look up the batch :meth:`send_next` sent ahead now, before this step's sparse
        update (``pipeline="semi-sync"``:
        :meth:`~recstack.embedding_engine.ShardedEmbeddingCollection.lookahead`). Every
        rank sent the same batches, so every rank looks ahead alike.

        Returns:
            Whether a batch was looked up (not at the end of the data).
        """
        sent, self._sent = self._sent, []
        for c, kjt in sent:
            c.lookahead(kjt)
        if sent:
            self.looked += 1
        return bool(sent)
