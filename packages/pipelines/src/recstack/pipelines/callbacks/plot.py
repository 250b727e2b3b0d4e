"""A PNG of the training curves, written when training ends (needs matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recstack.pipelines.callbacks.base import Callback

if TYPE_CHECKING:
    from recstack.pipelines.trainer import Trainer

__all__ = ["PlotCurves"]


class PlotCurves(Callback):
    """Collect the training loss and the evaluation metrics, and at the end of
    :meth:`~recstack.pipelines.Trainer.fit` draw them into one PNG: the loss per task
    against the step on the left, each evaluation metric against the step on the right.

    Without matplotlib it warns once and writes nothing (``pip install
    'recstack-pipelines[plot]'``). The collected points are saved in checkpoints, so a
    resumed run's plot shows the whole run.

    Args:
        path: the PNG file to write.
        metrics: evaluation metrics to plot (``"<task>/<metric>"``); default every AUC,
            GAUC and log-loss.
    """

    def __init__(self, path: str | Path, metrics: list[str] | None = None) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.train: dict[str, list[tuple[int, float]]] = {}
        self.eval: dict[str, list[tuple[int, float]]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "eval": self.eval}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.train = {k: [tuple(p) for p in v] for k, v in state.get("train", {}).items()}
        self.eval = {k: [tuple(p) for p in v] for k, v in state.get("eval", {}).items()}

    def on_step_end(self, trainer: Trainer, step: int, logs: Mapping[str, float]) -> None:
        per_task = [k for k in logs if k.startswith("loss/")]
        for key, value in logs.items():
            if len(per_task) == 1 and key in per_task:
                continue  # one task: its loss is the total loss
            if key.startswith("loss") and math.isfinite(value):
                self.train.setdefault(key, []).append((step, float(value)))

    def on_eval_end(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            wanted = (
                key in self.metrics
                if self.metrics is not None
                else key.rsplit("/", 1)[-1] in ("auc", "gauc", "logloss")
            )
            if wanted and isinstance(value, float) and math.isfinite(value):
                self.eval.setdefault(key, []).append((step, float(value)))

    def on_fit_end(self, trainer: Trainer) -> None:
        self.draw()

    def draw(self) -> Path | None:
        """Write the PNG now; return its path (``None`` without matplotlib or points)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            import warnings

            warnings.warn(
                "PlotCurves: matplotlib is not installed, no plot written (pip install "
                "'recstack-pipelines[plot]')",
                stacklevel=2,
            )
            return None
        if not self.train and not self.eval:
            return None
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for key, points in sorted(self.train.items()):
            xs, ys = zip(*points, strict=True)
            axes[0].plot(xs, ys, label=key)
        axes[0].set(title="training loss", xlabel="step", ylabel="loss")
        for key, points in sorted(self.eval.items()):
            xs, ys = zip(*points, strict=True)
            axes[1].plot(xs, ys, marker="o", label=key)
        axes[1].set(title="evaluation", xlabel="step")
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.path, dpi=110)
        plt.close(fig)
        return self.path
