"""Prediction tasks: which model output is trained against which label, and how.

A single-task model returns one tensor of logits; a multi-task model returns a dict of
them (or of probabilities, for ESMM-style products of probabilities), one per task. A
dict may also hold a scalar loss the model computed itself (a sampled softmax over a
user's next items, say): a task with ``output="loss"`` adds it to the total as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from recstack.core import JaggedTensor, KeyedJaggedTensor
from recstack.pipelines.choices import check_choice

__all__ = ["Task", "TaskOutput", "batch_rows", "compute_losses", "predictions_of"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: What a model returns for a task: logits, probabilities already in ``[0, 1]``, or a
#: scalar loss it computed itself.
TaskOutput = Literal["logits", "probability", "loss"]

# The default of Task.metrics, told apart by identity: a loss task drops it, but metrics
# given explicitly to a loss task are an error.
_BINARY_METRICS: tuple[str, ...] = ("auc", "logloss", "calibration", "ne")


@dataclass(frozen=True)
class Task:
    """One prediction task.

    Args:
        name: the task's name, and the key of its output when the model returns a dict.
        label: the batch column holding its 0/1 label (not read for a loss task).
        weight: the task loss's weight in the total loss.
        output: what the model returns for it: ``"logits"`` (trained with
            binary cross-entropy on logits, the stable choice), ``"probability"``
            (already in ``[0, 1]``, e.g. an ESMM pCTCVR = pCTR * pCVR product) or
            ``"loss"``: a scalar loss the model computed itself (0-dim or one element),
            added to the total as ``weight * value``. A loss task has no label, group,
            loss function or metrics; evaluation reports its row-weighted mean as
            ``"<name>/loss"``.
        loss: ``"bce"`` or a callable ``loss(output, label) -> scalar`` used instead.
        group: a batch column to group the GAUC by (e.g. ``"user_id"``), or ``None``.
        metrics: the metrics evaluated for this task (names understood by
            :class:`recstack.pipelines.metrics.MetricCollection`); ``()`` by default for
            a loss task.

    Raises:
        ValueError: an empty name, an unknown output, a negative or infinite weight, or
            a loss task given a loss callable, a group or metrics (each naming the task).
    """

    name: str
    label: str = "label"
    weight: float = 1.0
    output: TaskOutput = "logits"
    loss: Literal["bce"] | LossFn = "bce"
    group: str | None = None
    metrics: Sequence[str] = field(default=_BINARY_METRICS)

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
        if self.is_loss:
            self._check_loss_task()

    @property
    def is_loss(self) -> bool:
        """Whether the model computes this task's loss itself (``output="loss"``)."""
        return self.output == "loss"

    def _check_loss_task(self) -> None:
        where = f"Task {self.name!r} (output='loss', a loss the model computes)"
        if callable(self.loss):
            raise ValueError(f"{where}: takes no loss function; the model's value is the loss")
        if self.group is not None:
            raise ValueError(f"{where}: has no group (GAUC needs labels), got {self.group!r}")
        if self.metrics is _BINARY_METRICS:
            object.__setattr__(self, "metrics", ())  # frozen: the default, resolved once
        elif len(self.metrics):
            raise ValueError(
                f"{where}: has no metrics (its mean is reported as '{self.name}/loss'), got "
                f"metrics {list(self.metrics)}"
            )

    def probability(self, output: torch.Tensor) -> torch.Tensor:
        """The predicted probability (float32) from the model's output for this task.

        Args:
            output: the model's output for the task.

        Raises:
            ValueError: a loss task, whose output is a loss, not a prediction.
        """
        if self.is_loss:
            raise ValueError(
                f"Task {self.name!r}: output='loss' is a loss the model computed, not a "
                "prediction; it has no probability"
            )
        out = output.float()
        return torch.sigmoid(out) if self.output == "logits" else out

    def compute_loss(self, output: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        """The task's (unweighted) mean loss on a batch, in float32.

        Args:
            output: the model's output for the task.
            label: the task's labels (``None`` for a loss task, which reads none).

        Raises:
            ValueError: no labels for a task that needs them.
        """
        if self.is_loss:
            return output.float().reshape(())
        if label is None:
            raise ValueError(f"Task {self.name!r}: needs its labels (column {self.label!r})")
        out, y = output.float(), label.float()
        # In float32 under autocast too: autocast refuses binary_cross_entropy on
        # probabilities on CUDA, and a loss in bf16 would lose the small differences.
        with torch.autocast(out.device.type, enabled=False):
            if callable(self.loss):
                return self.loss(out, y)
            if self.output == "logits":
                return F.binary_cross_entropy_with_logits(out, y)
            return F.binary_cross_entropy(out.clamp(1e-7, 1 - 1e-7), y)


def predictions_of(
    outputs: torch.Tensor | Mapping[str, torch.Tensor], tasks: Sequence[Task]
) -> dict[str, torch.Tensor]:
    """The model's outputs by task name, each flattened to ``[B]``; a loss task's value
    (one element) as a 0-dim tensor.

    Args:
        outputs: what the model returned: one tensor (one task) or a dict by task name.
        tasks: the tasks.

    Raises:
        KeyError: a dict output lacks a task's key (named).
        ValueError: a tensor output for several tasks, an output not of one value a row,
            or a loss task's value not of one element.
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
        if task.is_loss:
            if value.numel() != 1:
                raise ValueError(
                    f"task {task.name!r}: output='loss' needs the model's loss as one value "
                    f"(a 0-dim tensor), got shape {tuple(value.shape)}"
                )
            out[task.name] = value.reshape(())
            continue
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

    A loss task's loss is the model's value for it, in float32; it reads no label.

    Args:
        preds: the model's outputs by task name (:func:`predictions_of`).
        batch: the batch, holding each task's label column (loss tasks need none).
        tasks: the tasks.

    Raises:
        KeyError: a task's label column is not in the batch (named).
    """
    total = None
    each = {}
    for task in tasks:
        if task.is_loss:
            loss = task.compute_loss(preds[task.name], None)
            each[task.name] = loss.detach()
            term = loss * float(task.weight)
            total = term if total is None else total + term
            continue
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


def batch_rows(
    preds: Mapping[str, torch.Tensor], inputs: Mapping[str, object], tasks: Sequence[Task]
) -> int:
    """How many rows a batch has: the length of the first prediction of a task that is
    not a loss task; when every task is a loss task (a loss is one value, whatever the
    rows), the first of the batch's columns that has rows: a ``KeyedJaggedTensor``'s
    ``stride()``, a ``JaggedTensor``'s number of rows, a tensor's first dim. No host sync.

    Args:
        preds: the model's outputs by task name (:func:`predictions_of`).
        inputs: the batch the model was given.
        tasks: the tasks.

    Raises:
        ValueError: every task is a loss task and no column of the batch has rows.
    """
    for task in tasks:
        if not task.is_loss:
            return int(preds[task.name].shape[0])
    for value in inputs.values():
        if isinstance(value, KeyedJaggedTensor):
            return value.stride()
        if isinstance(value, JaggedTensor):
            return len(value)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError(
        f"every task ({[t.name for t in tasks]}) is a loss task and no column of the batch "
        f"is a tensor, JaggedTensor or KeyedJaggedTensor to count its rows (its keys: "
        f"{sorted(inputs)})"
    )
