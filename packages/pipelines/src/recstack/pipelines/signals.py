"""Turning SIGTERM / SIGINT into a request to stop after the current step."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

__all__ = ["StopSignals"]


class StopSignals:
    """While active, SIGTERM and SIGINT set :attr:`received` instead of killing the run,
    so the trainer can finish its step, write a checkpoint and return. A second SIGINT
    (Ctrl-C twice) raises ``KeyboardInterrupt`` at once, as users expect.

    Handlers can only be installed from the main thread; elsewhere this does nothing and
    the signals keep their usual effect.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._old: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = sig

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
