"""Prediction tasks: which model output is trained against which label, and how.

A single-task model returns one tensor of logits; a multi-task model returns a dict of
them (or of probabilities, for ESMM-style products of probabilities), one per task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from recstack.pipelines.choices import check_choice

__all__ = ["Task", "TaskOutput", "compute_losses", "predictions_of"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: What a model returns for a task: logits, or probabilities already in ``[0, 1]``.
TaskOutput = Literal["logits", "probability"]


@dataclass(frozen=True)
class Task:
    """One prediction task.

    Args:
        name: the task's name, and the key of its output when the model returns a dict.
        label: the batch column holding its 0/1 label.
        weight: the task loss's weight in the total loss.
        output: what the model returns for it: ``"logits"`` (trained with
            binary cross-entropy on logits, the stable choice) or ``"probability"``
            (already in ``[0, 1]``, e.g. an ESMM pCTCVR = pCTR * pCVR product).
        loss: ``"bce"`` or a callable ``loss(output, label) -> scalar`` used instead.
        group: a batch column to group the GAUC by (e.g. ``"user_id"``), or ``None``.
        metrics: the metrics evaluated for this task (names understood by
            :class:`recstack.pipelines.metrics.MetricCollection`).
    """

    name: str
    label: str = "label"
    weight: float = 1.0
    output: TaskOutput = "logits"
    loss: Literal["bce"] | LossFn = "bce"
    group: str | None = None
    metrics: Sequence[str] = field(default=("auc", "logloss", "calibration", "ne"))

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task: name must be a non-empty string, got {self.name!r}")
        check_choice(self.output, f"Task {self.name!r}: output", TaskOutput)
        if not (isinstance(self.loss, str) and self.loss == "bce") and not callable(self.loss):
            raise ValueError(f"Task {self.name!r}: loss must be 'bce' or a callable")
        w = self.weight
        if (
            isinstance(w, bool)
            or not isinstance(w, (int, float))
            or not w >= 0
            or w == float("inf")
        ):
            raise ValueError(f"Task {self.name!r}: weight must be a finite number >= 0, got {w!r}")

    def probability(self, output: torch.Tensor) -> torch.Tensor:
        """The predicted probability (float32) from the model's output for this task.

        Args:
            output: the model's output for the task.
        """
        out = output.float()
        return torch.sigmoid(out) if self.output == "logits" else out

    def compute_loss(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The task's (unweighted) mean loss on a batch, in float32.

        Args:
            output: the model's output for the task.
            label: the task's labels.
        """
        out, y = output.float(), label.float()
        if callable(self.loss):
            return self.loss(out, y)
        if self.output == "logits":
            return F.binary_cross_entropy_with_logits(out, y)
        return F.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), y)


def predictions_of(
    outputs: torch.Tensor | Mapping[str, torch.Tensor], tasks: Sequence[Task]
) -> dict[str, torch.Tensor]:
    """The model's outputs by task name, each flattened to ``[B]``.

    Args:
        outputs: what the model returned: one tensor (one task) or a dict by task name.
        tasks: the tasks.

    Raises:
        KeyError: a dict output lacks a task's key (named).
        ValueError: a tensor output for several tasks, or an output not of one value a row.
    """
    if isinstance(outputs, torch.Tensor):
        if len(tasks) != 1:
            raise ValueError(
                f"the model returned one tensor but there are {len(tasks)} tasks "
                f"({[t.name for t in tasks]}): return a dict keyed by task name"
            )
        outputs = {tasks[0].name: outputs}
    elif not isinstance(outputs, Mapping):
        raise TypeError(
            f"the model must return a tensor or a dict of tensors, got {type(outputs).__name__}"
        )
    out = {}
    for task in tasks:
        if task.name not in outputs:
            raise KeyError(
                f"task {task.name!r}: the model's outputs have no such key (it returned "
                f"{sorted(outputs)})"
            )
        value = outputs[task.name]
        if value.dim() == 2 and value.shape[1] == 1:
            value = value.squeeze(1)
        if value.dim() != 1:
            raise ValueError(
                f"task {task.name!r}: the model's output must be [B] or [B, 1], got "
                f"{tuple(value.shape)}"
            )
        out[task.name] = value
    return out


def compute_losses(
    preds: Mapping[str, torch.Tensor], batch: Mapping[str, object], tasks: Sequence[Task]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total loss and each task's loss (detached) for one batch.

    Args:
        preds: the model's outputs by task name (:func:`predictions_of`).
        batch: the batch, holding each task's label column.
        tasks: the tasks.

    Raises:
        KeyError: a task's label column is not in the batch (named).
    """
    total = None
    each = {}
    for task in tasks:
        label = batch.get(task.label)
        if not isinstance(label, torch.Tensor):
            raise KeyError(
                f"task {task.name!r}: label column {task.label!r} is not a tensor in the "
                f"batch (its keys: {sorted(batch)})"
            )
        pred = preds[task.name]
        label = label.reshape(-1).to(pred.device)
        if label.shape[0] != pred.shape[0]:
            raise ValueError(
                f"task {task.name!r}: {pred.shape[0]} predictions but {label.shape[0]} labels"
            )
        loss = task.compute_loss(pred, label)
        each[task.name] = loss.detach()
        term = loss * float(task.weight)
        total = term if total is None else total + term
    assert total is not None
    return total, each
