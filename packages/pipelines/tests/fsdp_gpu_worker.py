"""One NCCL rank (world size 1, one GPU) of the FSDP2-on-GPU test (run as a script, not
collected).

``python fsdp_gpu_worker.py 0 1 INIT_FILE OUT_FILE``: trains DIN and HSTU three steps on
the GPU under the Trainer (bf16 autocast, the Triton kernels), once plain and once with
the dense side sharded by FSDP2 (``shard_dense``: on one rank each gather is the whole
tensor), and writes both runs' dense weights to OUT_FILE.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from model_testdata import FEATURES, FEATURES_OF, MODELS, TABLES, make_batch, synthetic_rows
from rank_exit import end_rank
from safetensors.torch import save_file

from recstack.pipelines import Trainer
from recstack.pipelines.dense_parallel import shard_dense
from recstack.sparse_optim import SparseAdam

STEPS = 3


def main() -> None:
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=rank, world_size=world)
    device = torch.device("cuda", 0)
    rows = synthetic_rows(64 * STEPS, seed=1)
    batches = [make_batch(rows[s * 64 : (s + 1) * 64], seed=s, device=device) for s in range(3)]
    tensors = {}
    for name in ("din", "din-softmax", "hstu"):
        _, tasks = MODELS[name]
        cls = type(MODELS[name][0]())
        for mode in ("plain", "fsdp"):
            torch.manual_seed(0)
            model = cls(
                MODELS[name][0]().config, TABLES, FEATURES_OF.get(name, FEATURES), device=device
            )
            dense = torch.optim.AdamW(model.parameters(), lr=0.01)
            if mode == "fsdp":
                shard_dense(model, [model.embeddings], device, world, dense)
                assert type(next(model.parameters())).__name__ == "DTensor"
            trainer = Trainer(
                model,
                batches,
                tasks=tasks,
                sparse_optimizer=SparseAdam(model.embeddings.sparse_parameters(), lr=0.01),
                dense_optimizer=dense,
                device=device,
                precision="bf16",
                progress=False,
            )
            assert trainer.fit().step == STEPS
            for key, value in model.state_dict().items():
                if isinstance(value, torch.Tensor):
                    whole = value.full_tensor() if hasattr(value, "full_tensor") else value
                    tensors[f"{mode}.{name}.{key}"] = whole.float().cpu().contiguous()
    save_file(tensors, out)


if __name__ == "__main__":
    main()
    end_rank()  # after main returns: its trainers and models are gone
