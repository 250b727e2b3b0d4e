"""A console progress bar for training: steps/s, samples/s, loss, ETA."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO

from recstack.pipelines.callbacks.base import Callback

if TYPE_CHECKING:
    from recstack.pipelines.trainer import Trainer

__all__ = ["ProgressBar"]


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar(Callback):
    """One line, redrawn at most every ``refresh`` seconds:
    ``epoch 1 [#####-----] 1200/2400 steps  38.1 it/s  78k samples/s  loss 0.4512  ETA 00:31``.

    The total is ``max_steps`` when set; otherwise the bar counts steps without an ETA
    (an epoch's length is not known before it ends). Evaluation results print on their
    own line.

    Args:
        refresh: seconds between redraws.
        stream: where to draw (default stderr); on a stream that is not a terminal the bar
            prints one line per redraw instead of redrawing in place.
        width: characters of the bar itself.
    """

    def __init__(self, refresh: float = 0.5, stream: TextIO | None = None, width: int = 24):
        self.refresh = refresh
        self.stream = stream or sys.stderr
        self.width = width
        self._t0 = 0.0
        self._step0 = 0
        self._samples0 = 0
        self._shown = 0.0
        self._loss: float | None = None
        self._tty = False

    def on_fit_start(self, trainer: Trainer) -> None:
        self._t0 = self._shown = time.monotonic()
        self._step0, self._samples0 = trainer.step, trainer.samples
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def on_step_end(self, trainer: Trainer, step: int, logs: Mapping[str, float]) -> None:
        if "loss" in logs:
            self._loss = logs["loss"]
        now = time.monotonic()
        if now - self._shown >= self.refresh:
            self._shown = now
            self._draw(trainer, now, final=False)

    def on_eval_end(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        shown = "  ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples" and isinstance(v, float)
        )
        self._write(f"eval @ step {step}: {shown}", newline=True)

    def on_fit_end(self, trainer: Trainer) -> None:
        self._draw(trainer, time.monotonic(), final=True)

    def line(self, trainer: Trainer, now: float) -> str:
        """The text of the bar at time ``now`` (``time.monotonic()``)."""
        dt = max(now - self._t0, 1e-9)
        steps = trainer.step - self._step0
        rate = steps / dt
        samples = (trainer.samples - self._samples0) / dt
        total = trainer.max_steps
        stage = trainer.stages[min(trainer.stage, len(trainer.stages) - 1)]
        epochs = stage.epochs
        parts = [f"stage {stage.name}"] if len(trainer.stages) > 1 else []
        parts.append(f"epoch {min(trainer.epoch + 1, epochs)}/{epochs}")
        if total:
            done = min(trainer.step / total, 1.0)
            filled = int(done * self.width)
            parts.append(f"[{'#' * filled}{'-' * (self.width - filled)}] {trainer.step}/{total}")
        else:
            parts.append(f"step {trainer.step}")
        parts.append(f"{rate:.1f} it/s")
        parts.append(f"{samples / 1e3:.1f}k samples/s")
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        if total and rate > 0:
            parts.append(f"ETA {_duration((total - trainer.step) / rate)}")
        parts.append(f"elapsed {_duration(dt)}")
        return "  ".join(parts)

    def _draw(self, trainer: Trainer, now: float, final: bool) -> None:
        self._write(self.line(trainer, now), newline=final or not self._tty)

    def _write(self, text: str, newline: bool) -> None:
        if self._tty:
            self.stream.write("\r" + text + " " * 4 + ("\n" if newline else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
