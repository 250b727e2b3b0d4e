"""The trainer's side of ``ColumnReader(worker="process")``.

A reader process (:mod:`recstack.columnio._worker`) decodes and assembles batches into
shared-memory slots. Here the trainer maps those slots and rebuilds each batch as views
from its JSON layout. With a CUDA device, the slot is registered with the driver
(``cudaHostRegister``), so the whole batch reaches the GPU in one asynchronous copy; the
slot is handed back once that copy has run. The trainer's process runs no reader thread
at all, so its training thread never waits for the GIL on account of data loading.
"""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from recstack.columnio.device import hand_over
from recstack.columnio.errors import ColumnIOError, ReadStats
from recstack.columnio.procio import MessageReader, MessageWriter, WorkerGone
from recstack.columnio.shm import Slot, decode_layout, shm_dir

__all__ = ["ProcessRun", "ReaderProcess"]


def _raise_remote(err: dict[str, Any]) -> None:
    if err.get("type") == "ColumnIOError":
        raise ColumnIOError(err["reason"], file=err.get("file"), column=err.get("column"))
    raise RuntimeError(
        f"the reader process failed: {err.get('type')}: {err.get('message')}\n"
        f"{err.get('trace', '')}"
    )


class _Mapped:
    """The trainer's mapping of one slot file, registered with CUDA when it can be."""

    def __init__(self, path: str, capacity: int, cuda: bool) -> None:
        self.slot = Slot(path, capacity, create=False)
        self.registered = False
        if cuda and capacity:
            rc = torch.cuda.cudart().cudaHostRegister(self.slot.tensor.data_ptr(), capacity, 0)
            self.registered = int(rc) == 0

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.slot.tensor.data_ptr())
        self.slot.close()


class ReaderProcess:
    """A reader process and the slots it shares with this one (one per ColumnReader)."""

    def __init__(
        self, config: dict[str, Any], device: torch.device | None, pin_memory: bool = False
    ) -> None:
        self.device = device
        self.pin_memory = pin_memory
        self.cuda = device is not None and device.type == "cuda"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recstack.columnio._worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.out = MessageWriter(self.proc.stdin.fileno())
        self.inp = MessageReader(self.proc.stdout.fileno())
        self.maps: dict[int, _Mapped] = {}
        self.stream: torch.cuda.Stream | None = None
        self.out.send(config)
        reply = self._recv()
        if "error" in reply:
            self.close()
            _raise_remote(reply["error"])

    def _gone(self, error: WorkerGone) -> RuntimeError:
        code = self.proc.poll()
        return RuntimeError(
            f"the ColumnIO reader process exited (code {code}); its stderr says why"
        )

    def _recv(self) -> dict[str, Any]:
        try:
            return self.inp.recv()
        except WorkerGone as e:
            raise self._gone(e) from e

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.out.send(msg)
        except WorkerGone as e:
            raise self._gone(e) from e

    def mapped(self, i: int, path: str, capacity: int) -> _Mapped:
        m = self.maps.get(i)
        if m is None or m.slot.path != path:
            if m is not None:
                m.close()
            m = self.maps[i] = _Mapped(path, capacity, self.cuda)
        return m

    def run(self, epoch: int, position: int, stats: ReadStats) -> ProcessRun:
        return ProcessRun(self, epoch, position, stats)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(WorkerGone, OSError):
                self.out.send({"cmd": "exit"})
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for m in self.maps.values():
            m.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(m.slot.path)  # in case the reader process died before it could
        self.maps.clear()
        # Slots the reader process made but this side never mapped (it died mid-batch).
        for path in glob.glob(os.path.join(shm_dir(), f"recstack-columnio-{self.proc.pid}-*")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


class _InFlight:
    def __init__(self, batch: Any, slot: int, event: torch.cuda.Event, owner: torch.Tensor):
        self.batch, self.slot, self.event, self.owner = batch, slot, event, owner


class ProcessRun:
    """One epoch's pass, driven from the trainer: same protocol as the threaded run.

    Iterating yields ``(batch, position after it, rows)``; :meth:`deliver` hands a batch
    to the consumer and :meth:`close` stops the pass.

    Args:
        proc: the reader process that reads the pass.
        epoch: the epoch to read.
        position: rows of the rank's epoch stream already yielded.
        stats: the reader's counters so far (the reader process continues them).
    """

    def __init__(self, proc: ReaderProcess, epoch: int, position: int, stats: ReadStats):
        self.p = proc
        self.done = False
        self.stats = stats
        self.copying: deque[tuple[torch.cuda.Event, int]] = deque()
        proc.send({"cmd": "run", "epoch": epoch, "position": position, "stats": stats.to_dict()})

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        while True:
            msg = self.p._recv()
            self._release_copied()
            if "batch" in msg:
                b = msg["batch"]
                self.stats = ReadStats.from_dict(b["stats"])
                yield self._take(b), int(b["position"]), int(b["rows"])
            elif "end" in msg:
                self.stats = ReadStats.from_dict(msg["stats"])
                self.done = True
                return
            elif "error" in msg:
                self.done = True
                _raise_remote(msg["error"])

    def _take(self, b: dict[str, Any]) -> Any:
        p = self.p
        m = p.mapped(int(b["slot"]), b["path"], int(b["capacity"]))
        host = m.slot.tensor[: int(b["size"])]
        if not p.cuda:
            # The slot is reused as soon as it is handed back: the batch gets its own copy.
            block = torch.empty(host.numel(), dtype=torch.uint8, pin_memory=p.pin_memory)
            block.copy_(host)
            p.send({"cmd": "free", "slot": int(b["slot"])})
            return decode_layout(b["layout"], block)
        if p.stream is None:
            p.stream = torch.cuda.Stream(device=p.device)
        with torch.cuda.stream(p.stream):
            if m.registered:
                dev = host.to(p.device, non_blocking=True)
            else:  # pageable memory: stage through pinned memory to keep the copy async
                dev = host.pin_memory().to(p.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(p.stream)
        self.copying.append((event, int(b["slot"])))
        return _InFlight(decode_layout(b["layout"], dev), int(b["slot"]), event, dev)

    def _release_copied(self) -> None:
        while self.copying and self.copying[0][0].query():
            _, slot = self.copying.popleft()
            self.p.send({"cmd": "free", "slot": slot})

    def deliver(self, item: Any) -> Any:
        if not isinstance(item, _InFlight):
            return item
        hand_over(item.event, [item.owner], self.p.device)
        return item.batch

    def close(self) -> None:
        if not self.done:
            with contextlib.suppress(WorkerGone, OSError):
                self.p.out.send({"cmd": "stop"})
                while True:  # drop what was sent before the stop arrived
                    msg = self.p.inp.recv()
                    if "stopped" in msg:
                        break
        for event, _ in self.copying:
            event.synchronize()  # the reader process may reuse every slot from now on
        self.copying.clear()
        self.done = True
