"""recstack.pipelines.id_prefetch: the next batch held back for the id exchange is read but
not trained, so a checkpoint taken meanwhile resumes at it."""

from __future__ import annotations

from typing import Any

import torch

from recstack.core import KeyedJaggedTensor
from recstack.pipelines.id_prefetch import IdPrefetch
from recstack.pipelines.stream import BatchStream


class _Collection:
    """Records the batches whose ids it was asked to send ahead."""

    feature_names = ("f",)

    def __init__(self) -> None:
        self.sent: list[KeyedJaggedTensor] = []
        self.looked: list[KeyedJaggedTensor] = []

    def prefetch(self, kjt: KeyedJaggedTensor) -> None:
        self.sent.append(kjt)

    def lookahead(self, kjt: KeyedJaggedTensor) -> None:
        self.looked.append(kjt)


def _batches(n: int) -> list[dict[str, Any]]:
    return [
        {"ids": torch.tensor([i, i + 1]), "lengths": torch.tensor([1, 1]), "n": i} for i in range(n)
    ]


def _featurize(batch: dict[str, Any]) -> dict[str, Any]:
    return {"sparse": KeyedJaggedTensor(["f"], batch["ids"], batch["lengths"]), "n": batch["n"]}


def test_a_held_batch_is_not_in_the_checkpoint_position() -> None:
    stream = BatchStream(_batches(3), torch.device("cpu"))
    ec = _Collection()
    prefetch = IdPrefetch([ec])  # type: ignore[list-item]
    batches = prefetch.wrap(iter(stream), stream.state_dict)
    first = next(batches)
    assert prefetch.position() is None and stream.state_dict()["batches"] == 1
    assert prefetch.send_next(_featurize, None, step=2)
    # The stream read batch 1 to send its ids; a checkpoint now must resume at batch 1.
    assert stream.state_dict()["batches"] == 2
    assert prefetch.position() == {**stream.state_dict(), "batches": 1}
    second = next(batches)
    assert second["n"] == 1 and prefetch.position() is None
    inputs = prefetch.inputs(second, _featurize)
    assert inputs["sparse"] is ec.sent[0]  # the very batch whose ids went ahead
    assert prefetch.inputs(first, _featurize)["n"] == 0  # any other batch: featurized anew
    assert prefetch.send_next(_featurize, None, step=3) and prefetch.position()["batches"] == 2
    # Semi-synchronous: the batch sent ahead is looked up once.
    assert prefetch.sent_ahead and prefetch.look_next() and ec.looked == [ec.sent[1]]
    assert not prefetch.sent_ahead and not prefetch.look_next() and prefetch.looked == 1
    next(batches)
    assert not prefetch.send_next(_featurize, None, step=4)  # the end: nothing to send
    assert prefetch.position() == stream.state_dict() and not prefetch.sent_ahead
