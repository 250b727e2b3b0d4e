"""The reader process behind ``ColumnReader(worker="process")``.

Run as ``python -m recstack.columnio._worker``. It reads JSON messages on stdin and
writes JSON messages on the original stdout (``print`` output goes to stderr, so it
cannot corrupt the protocol). Decoding and batch assembly happen here, out of the
trainer's process, so they never hold the trainer's GIL. Each batch is written into a
shared-memory slot and announced with its layout.

Messages in: the config first; then ``{"cmd": "run", "epoch", "position", "stats"}``,
``{"cmd": "free", "slot"}``, ``{"cmd": "stop"}`` and ``{"cmd": "exit"}``.
Messages out: ``{"ready"}``, ``{"batch": {...}}``, ``{"end"}``, ``{"stopped"}`` and
``{"error"}``.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import traceback
from typing import Any

import torch

from recstack.columnio.columns import MISSING, Column
from recstack.columnio.errors import ColumnIOError, ReadStats
from recstack.columnio.procio import MessageReader, MessageWriter, WorkerGone
from recstack.columnio.shm import Slot, encode_layout


def column_from_json(spec: dict[str, Any]) -> Column:
    dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
    return Column(
        spec["name"],
        default=spec.get("default", MISSING),
        element_default=spec.get("element_default", MISSING),
        dtype=dtype,
    )


def error_to_json(e: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(e).__name__, "message": str(e)}
    if isinstance(e, ColumnIOError):
        out.update(reason=e.reason, file=e.file, column=e.column)
    else:
        out["trace"] = "".join(traceback.format_exception(e))
    return out


class _Worker:
    def __init__(self, out: MessageWriter, config: dict[str, Any]) -> None:
        from recstack.columnio.reader import ColumnReader

        self.out = out
        kwargs = dict(config["reader"])
        kwargs["columns"] = [column_from_json(c) for c in kwargs["columns"]]
        self.reader = ColumnReader(**kwargs)
        if self.reader.fingerprint != config["fingerprint"]:
            raise ColumnIOError(
                "the reader process sees other files (or row groups) than the trainer did; "
                "were files added or rewritten while starting?"
            )
        self.slots: list[Slot | None] = [None] * int(config["slots"])
        self.free: queue.Queue[int] = queue.Queue()
        self._reset_free()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _reset_free(self) -> None:
        while not self.free.empty():
            self.free.get_nowait()
        for i in range(len(self.slots)):
            self.free.put(i)

    def _acquire(self) -> int | None:
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.05)
            except queue.Empty:
                continue
        return None

    def _buffer(self, i: int, nbytes: int) -> torch.Tensor:
        slot = self.slots[i]
        if slot is None or slot.capacity < nbytes:
            if slot is not None:
                slot.close(unlink=True)  # the trainer keeps its own mapping until it re-maps
            want = nbytes if slot is None else max(nbytes, 2 * slot.capacity)
            slot = self.slots[i] = Slot.create(want + want // 4, f"s{i}")
        return slot.tensor[:nbytes]

    def run(self, msg: dict[str, Any]) -> None:
        from recstack.columnio.reader import EpochRun

        r = self.reader
        r.stats = ReadStats.from_dict(msg.get("stats") or {})
        run = EpochRun(r, int(msg["epoch"]), int(msg["position"]), start_thread=False)
        try:
            for parts in run.batch_parts():
                i = self._acquire()
                if i is None:
                    break
                holder: dict[str, torch.Tensor] = {}

                def into(nbytes: int, i: int = i, holder: dict = holder) -> torch.Tensor:
                    holder["block"] = self._buffer(i, max(nbytes, 1))
                    return holder["block"]

                batch = run.assemble(parts, into=into)
                slot = self.slots[i]
                assert slot is not None
                rows = sum(p.rows for p in parts)
                r.stats.rows_yielded += rows
                r.stats.batches_yielded += 1
                self.out.send(
                    {
                        "batch": {
                            "slot": i,
                            "path": slot.path,
                            "capacity": slot.capacity,
                            "size": int(holder["block"].numel()),
                            "layout": encode_layout(batch, slot.tensor),
                            "position": parts[-1].last_pos + 1,
                            "rows": rows,
                            "stats": r.stats.to_dict(),
                        }
                    }
                )
                del batch
            else:
                self.out.send({"end": True, "stats": r.stats.to_dict()})
        except BaseException as e:  # noqa: BLE001 - reported to the trainer
            self.out.send({"error": error_to_json(e)})
        finally:
            run.close()

    def start(self, msg: dict[str, Any]) -> None:
        self.halt()
        self.stop = threading.Event()
        self._reset_free()
        self.thread = threading.Thread(target=self.run, args=(msg,), daemon=True)
        self.thread.start()

    def halt(self) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None

    def close(self) -> None:
        self.halt()
        for slot in self.slots:
            if slot is not None:
                slot.close(unlink=True)


def main() -> None:
    inp = MessageReader(sys.stdin.fileno())
    out = MessageWriter(os.dup(sys.stdout.fileno()))
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not hit the pipe
    torch.set_num_threads(1)  # decoding is parallel across units; ops here are small
    try:
        worker = _Worker(out, inp.recv())
    except BaseException as e:  # noqa: BLE001
        out.send({"error": error_to_json(e)})
        return
    out.send({"ready": True})
    try:
        while True:
            msg = inp.recv()
            cmd = msg.get("cmd")
            if cmd == "free":
                worker.free.put(int(msg["slot"]))
            elif cmd == "run":
                worker.start(msg)
            elif cmd == "stop":
                worker.halt()
                out.send({"stopped": True})
            elif cmd == "exit":
                break
    except WorkerGone:
        pass  # the trainer went away: clean up and leave
    finally:
        worker.close()


if __name__ == "__main__":
    main()
