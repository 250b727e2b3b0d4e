"""One gloo rank of the FSDP2 test over every reference model (run as a script, not
collected).

``python dense_models_worker.py RANK WORLD INIT_FILE OUT_DIR DENSE``: for each model of
``model_testdata.MODELS``, trains it three steps under the Trainer (tables sharded, the
dense side in ``DENSE``: ``ddp`` or ``fsdp``) on this rank's rows of every global batch,
then writes its dense weights, whole, to ``OUT_DIR/<DENSE>-rank<R>.safetensors``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from model_testdata import MODELS, make_batch, synthetic_rows
from rank_exit import end_rank
from safetensors.torch import save_file

from recstack.pipelines import Trainer
from recstack.sparse_optim import SparseAdam

GLOBAL_BATCH, STEPS = 16, 3


def main() -> None:
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    dense = sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    tensors = {}
    for name, (build, tasks) in MODELS.items():
        torch.manual_seed(0)
        model = build()
        rows = synthetic_rows(GLOBAL_BATCH * STEPS, seed=1)
        share = [
            make_batch(rows[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH][rank::world], seed=s)
            for s in range(STEPS)
        ]
        trainer = Trainer(
            model,
            share,
            tasks=tasks,
            sparse_optimizer=SparseAdam(model.embeddings.sparse_parameters(), lr=0.05),
            dense_optimizer=torch.optim.AdamW(model.parameters(), lr=0.05),
            device="cpu",
            precision="fp32",
            progress=False,
            dense_parallel=dense,
        )
        assert trainer.fit().step == STEPS, name
        for key, value in model.state_dict().items():
            if isinstance(value, torch.Tensor):
                whole = value.full_tensor() if hasattr(value, "full_tensor") else value
                tensors[f"{name}.{key}"] = whole.contiguous()
    save_file(tensors, str(out / f"{dense}-rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
    end_rank()  # after main returns: its trainers and models are gone
