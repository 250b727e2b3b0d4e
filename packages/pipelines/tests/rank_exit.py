"""The end of a worker rank's script: every rank done, then out without interpreter teardown."""

from __future__ import annotations

import gc
import os
import sys

import torch.distributed as dist


def end_rank() -> None:
    """Wait for every rank, release the process group, and exit with 0.

    The barrier keeps a rank from closing its sockets while a peer still reads its last
    collective. Gloo's worker threads can still hold work objects (and through them Python
    tensors) when the interpreter tears down, and freeing those then aborts the process
    after the script has passed; so the references go while Python is alive, and the process
    leaves with ``os._exit``. A failure before this point still exits non-zero.
    """
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
