"""One gloo rank of the Trainer's sharded-tables test (run as a script, not collected).

``python sharded_worker.py RANK WORLD INIT_FILE OUT_DIR PIPELINE DENSE``: trains the
sharded toy model (``PIPELINE`` the Trainer's ``pipeline``, ``DENSE`` its
``dense_parallel``) on this rank's share of every global batch under the Trainer (tables
sharded), checkpointing under OUT_DIR, then writes its dense weights and its shard's rows
to ``OUT_DIR/rank<R>.safetensors``. It then loads the checkpoint into a new model and
trainer of the same kind and checks the dense weights and optimizer state came back.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from rank_exit import end_rank
from safetensors.torch import save_file
from sharded_toys import SparseToy, dense_state, rows_of, sparse_data, trainer_for

from recstack.pipelines import Callback
from recstack.saver import Checkpointer


def main() -> None:
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    pipeline, dense = sys.argv[5], sys.argv[6]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model = SparseToy(sharded=True)
    disjoint = pipeline == "semi-sync"
    share = sparse_data(rank=rank, world=world, disjoint=disjoint)
    if rank == 1:  # one batch more than rank 0: the epoch ends on both when rank 0's does
        share += sparse_data(seed=9, rank=rank, world=world, batches=1)
    evals = sparse_data(seed=5, rank=rank, world=world, batches=3 + rank)  # uneven on purpose
    ckpt = Checkpointer(out / "ckpt", progress=False)
    trainer = trainer_for(model, share, evals, ckpt, pipeline=pipeline, dense_parallel=dense)
    seen: list[dict[str, float]] = []

    class Loads(Callback):
        def on_step_end(self, trainer, step, logs) -> None:  # noqa: ANN001
            seen.append(dict(logs))

    trainer.callbacks.append(Loads())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.fit()
    assert result.step == 8, result
    if pipeline != "off":
        # Ahead of every step but each epoch's first; none past the shorter share's end.
        assert trainer._prefetch is not None and trainer._prefetch.sent == 6
        assert trainer._prefetch.looked == (6 if pipeline == "semi-sync" else 0)
    assert len(seen) == 8 and all(s["exchange/keys_sent"] > 0 for s in seen)
    assert all(s["exchange/bytes_sent"] > 0 and s["exchange/keys_served"] > 0 for s in seen)
    if rank == 1:
        assert any("leaves its remaining batches" in str(w.message) for w in caught)
    if dense == "fsdp":  # each rank holds half of the first layer and its moments
        weight = model.tower[0].weight
        assert type(weight).__name__ == "DTensor" and weight.to_local().shape[0] == 8 // world
        assert trainer.dense_optimizer.param_groups[0]["params"][0] is weight
        assert type(trainer.dense_optimizer.state[weight]["exp_avg"]).__name__ == "DTensor"
    trained = dense_state(model.tower)
    tensors = {f"dense.{k}": v for k, v in trained.items()}
    tensors.update(rows_of(model.ec))
    tensors["auc"] = torch.tensor(result.metrics["label/auc"])
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    moments = _moments(trainer.dense_optimizer)
    again = SparseToy(sharded=True)
    resumed = trainer_for(again, share, evals, ckpt, pipeline=pipeline, dense_parallel=dense)
    resumed.checkpointer.load(**resumed.checkpoint_objects({}))
    for k, v in dense_state(again.tower).items():
        assert torch.equal(v, trained[k]), k
    for a, b in zip(_moments(resumed.dense_optimizer), moments, strict=True):
        assert torch.equal(a, b)


def _moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every per-parameter tensor of the optimizer's state, whole, in parameter order."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            for v in optimizer.state[p].values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    out.append(v.full_tensor() if hasattr(v, "full_tensor") else v)
    return out


if __name__ == "__main__":
    main()
    end_rank()  # after main returns: its trainers and models are gone
