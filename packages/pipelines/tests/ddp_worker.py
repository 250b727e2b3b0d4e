"""One gloo rank of the Trainer's data-parallel test (run as a script, not collected).

``python ddp_worker.py RANK WORLD INIT_FILE OUT_DIR``: trains the toy model on this rank's
half of every global batch with a checkpointer under OUT_DIR, then writes its final
weights to ``OUT_DIR/rank<R>.safetensors``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from rank_exit import end_rank
from safetensors.torch import save_file
from toys import Toy, toy_data

from recstack.pipelines import Trainer
from recstack.saver import Checkpointer


def main() -> None:
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(1)
    model = Toy()
    model.net[2].p = 0.0  # no dropout: the ranks' and the single process's runs compare
    share = [{k: v[rank::world] for k, v in b.items()} for b in toy_data()]
    trainer = Trainer(
        model, share, toy_data(seed=5), device="cpu", progress=False, epochs=2,
        dense_optimizer=torch.optim.AdamW(model.parameters(), lr=0.05),
        checkpointer=Checkpointer(out / "ckpt", progress=False),
    )  # fmt: skip
    result = trainer.fit()
    assert result.step == 20, result
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / f"rank{rank}.safetensors"))  # fmt: skip


if __name__ == "__main__":
    main()
    end_rank()  # after main returns: its trainers and models are gone
