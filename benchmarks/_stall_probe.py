"""What happened during each training step, to explain the slow ones.

A step far above the median after warm-up has few possible causes on a GPU: a Triton
kernel compiled (a new specialization of its arguments), the caching allocator asking
the driver for memory (a new segment, or a retry after freeing its cache), or work that
only some steps do (a hash table growing, a rehash). :class:`StallProbe` records, per
step, the Triton compilations (by wrapping Triton's compile step), the allocator's
segment and retry counts, and RecStack's kernel launches by name
(:func:`recstack.core.kernels.count_launches`); :meth:`StallProbe.explain` lists, for
each step above a multiple of the median, what it did that a typical step does not.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from recstack.core.kernels import count_launches


@dataclass
class StepEvents:
    """One step's events."""

    compiled: list[str] = field(default_factory=list)
    new_segments: int = 0
    alloc_retries: int = 0
    launches: Counter[str] = field(default_factory=Counter)


def _alloc_counts(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return 0, 0
    stats = torch.cuda.memory_stats(device)
    return int(stats.get("segment.all.allocated", 0)), int(stats.get("num_alloc_retries", 0))


class StallProbe:
    """Per-step events of a run: call :meth:`step_end` after each step, :meth:`close`
    at the end (it restores Triton's compile step).

    Args:
        device: the training device (the allocator counts are read for CUDA only).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[StepEvents] = []
        self._current = StepEvents()
        self._segments, self._retries = _alloc_counts(device)
        self._stack = contextlib.ExitStack()
        self._launches = self._stack.enter_context(count_launches())
        self._seen: Counter[str] = Counter()
        # Compiles are seen by wrapping JITFunction._do_compile, not through Triton's
        # post-compile hook: on Triton 3.6 the hook's argument serialization fails on
        # kernels that take a jit function as a constexpr, and any hook set sends
        # FastKernel launches down Triton's slow path, which would skew the timings.
        self._jit: Any = None
        self._do_compile: Any = None
        try:
            from triton.runtime.jit import JITFunction

            original = JITFunction._do_compile
        except (ImportError, AttributeError):  # no Triton, or another one: no compile events
            return
        probe = self

        def do_compile(jit: Any, *args: Any, **kwargs: Any) -> Any:
            probe._current.compiled.append(str(getattr(jit, "__name__", None) or jit))
            return original(jit, *args, **kwargs)

        self._jit, self._do_compile = JITFunction, original
        JITFunction._do_compile = do_compile

    def step_end(self) -> None:
        """Close the current step's record."""
        segments, retries = _alloc_counts(self.device)
        self._current.new_segments = segments - self._segments
        self._current.alloc_retries = retries - self._retries
        self._segments, self._retries = segments, retries
        self._current.launches = self._launches - self._seen
        self._seen = Counter(self._launches)
        self.steps.append(self._current)
        self._current = StepEvents()

    def close(self) -> None:
        """Stop recording."""
        if self._jit is not None:
            self._jit._do_compile = self._do_compile
            self._jit = None
        self._stack.close()

    def explain(self, step_times: list[float], first: int, factor: float = 2.0) -> list[str]:
        """One line per step slower than ``factor`` x the median of ``step_times``.

        Args:
            step_times: seconds of the steps ``first, first + 1, ...``.
            first: the index in :attr:`steps` of ``step_times[0]``.
            factor: how many medians make a step slow.
        """
        if not step_times:
            return []
        median = statistics.median(step_times)
        window = self.steps[first : first + len(step_times)]
        # A launch name is unusual when fewer than a fifth of the steps make it.
        usual = Counter(name for s in window for name in s.launches)
        rare = {name for name, n in usual.items() if n < max(len(window) // 5, 1)}
        lines = []
        for i, t in enumerate(step_times):
            if t <= factor * median or first + i >= len(self.steps):
                continue
            ev = self.steps[first + i]
            what = []
            if ev.compiled:
                what.append(f"Triton compiled {', '.join(sorted(set(ev.compiled)))}")
            if ev.new_segments:
                what.append(f"{ev.new_segments} new allocator segment(s)")
            if ev.alloc_retries:
                what.append(f"{ev.alloc_retries} allocation retry(ies)")
            odd = sorted(name for name in ev.launches if name in rare)
            if odd:
                what.append(f"rare launches: {', '.join(odd)}")
            lines.append(
                f"step {i} of the window: {t * 1e3:.1f} ms ({t / median:.1f}x the median): "
                + ("; ".join(what) or "no compile, allocation or rare launch: host or data")
            )
        return lines
