"""A JSON-lines log of every logged step, evaluation and checkpoint."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recstack.pipelines.callbacks.base import Callback

if TYPE_CHECKING:
    from recstack.pipelines.trainer import Trainer

__all__ = ["JSONLLogger"]


def _clean(values: Mapping[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/Inf: write them as null so every line parses with any JSON reader.
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()
    }


class JSONLLogger(Callback):
    """Append one JSON object a line to ``path``: ``{"event": "train", "step": ...,
    "loss": ...}`` on the steps where the loss was read back, ``{"event": "eval", ...}``
    after each evaluation and ``{"event": "checkpoint", "path": ...}`` after each save.
    Every line carries ``time`` (seconds since the epoch). A resumed run appends.

    Args:
        path: the log file (its directory is created).
        every_step: also log the steps without a loss reading.
    """

    def __init__(self, path: str | Path, every_step: bool = False) -> None:
        self.path = Path(path)
        self.every_step = every_step

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean({**record, "time": time.time()})) + "\n")

    def on_step_end(self, trainer: Trainer, step: int, logs: Mapping[str, float]) -> None:
        if self.every_step or "loss" in logs:
            self._write({"event": "train", **logs})

    def on_eval_end(self, trainer: Trainer, step: int, metrics: Mapping[str, float]) -> None:
        self._write({"event": "eval", "step": step, **metrics})

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        self._write({"event": "checkpoint", "step": step, "path": str(path)})


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a :class:`JSONLLogger` file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
