"""One gloo rank of the Trainer's sharded-tables test (run as a script, not collected).

``python sharded_worker.py RANK WORLD INIT_FILE OUT_DIR PIPELINE``: trains the sharded toy
model (``PIPELINE`` the Trainer's ``pipeline``) on
this rank's share of every global batch under the Trainer (dense data parallel, tables
sharded), checkpointing under OUT_DIR, then writes its dense weights and its shard's rows
to ``OUT_DIR/rank<R>.safetensors``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from sharded_toys import SparseToy, rows_of, sparse_data, trainer_for

from recstack.pipelines import Callback
from recstack.saver import Checkpointer


def main() -> None:
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    pipeline = sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model = SparseToy(sharded=True)
    share = sparse_data(rank=rank, world=world)
    if rank == 1:  # one batch more than rank 0: the epoch ends on both when rank 0's does
        share += sparse_data(seed=9, rank=rank, world=world, batches=1)
    evals = sparse_data(seed=5, rank=rank, world=world, batches=3 + rank)  # uneven on purpose
    ckpt = Checkpointer(out / "ckpt", progress=False)
    trainer = trainer_for(model, share, evals, ckpt, pipeline=pipeline)
    seen: list[dict[str, float]] = []

    class Loads(Callback):
        def on_step_end(self, trainer, step, logs) -> None:  # noqa: ANN001
            seen.append(dict(logs))

    trainer.callbacks.append(Loads())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.fit()
    assert result.step == 8, result
    if pipeline == "ids":
        # Ahead of every step but each epoch's first; none past the shorter share's end.
        assert trainer._prefetch is not None and trainer._prefetch.sent == 6
    assert len(seen) == 8 and all(s["exchange/keys_sent"] > 0 for s in seen)
    assert all(s["exchange/bytes_sent"] > 0 and s["exchange/keys_served"] > 0 for s in seen)
    if rank == 1:
        assert any("leaves its remaining batches" in str(w.message) for w in caught)
    tensors = {f"dense.{k}": v.contiguous() for k, v in model.tower.state_dict().items()}
    tensors.update(rows_of(model.ec))
    tensors["auc"] = torch.tensor(result.metrics["label/auc"])
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
