"""One rank of tests/test_distributed.py: a patched Time-LLM input stage under FSDP2 or DeepSpeed.

The model is tests/dropin_fsdp_worker.py's (Time-LLM's input stage with a linear read-out, built
from the original layers), patched with ``patch_model`` as a user would, then wrapped:

* ``fsdp2-root``: FSDP2 ``fully_shard`` on the root only;
* ``fsdp2-per-layer``: ``fully_shard`` on each of our two layers, then on the root;
* ``deepspeed-zero2`` / ``deepspeed-zero3``: ``deepspeed.initialize`` with ZeRO stage 2 or 3 on
  DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``, gloo), fp32, a client SGD optimizer.

Each rank runs one forward/backward on its half of the batch (the wrappers average gradients
over the ranks, which for a mean loss over equal halves is the full-batch gradient) and saves
the whole gradients, which of our ops ran on which path, and what patch_model replaced.
"""
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import timellm_original as original
from dropin_fsdp_worker import BATCH, WORLD_SIZE, batch, build_model, full_gradients
from timellm_fast import dispatch, patch_model

FSDP_MODES = ("fsdp2-root", "fsdp2-per-layer")
DEEPSPEED_STAGES = {"deepspeed-zero2": 2, "deepspeed-zero3": 3}
MODES = FSDP_MODES + tuple(DEEPSPEED_STAGES)


def original_model():
    """The input stage with Time-LLM's original layers (seeded): the single-process reference."""
    return build_model(original.PatchEmbedding, original.ReprogrammingLayer)


def _fsdp_step(model, mode: str, x, target) -> dict:
    from torch.distributed.fsdp import fully_shard

    if mode == "fsdp2-per-layer":
        fully_shard(model.patch_embedding)
        fully_shard(model.reprogramming_layer)
    fully_shard(model)
    F.mse_loss(model(x), target).backward()
    return full_gradients(model)


def _deepspeed_step(model, stage: int, x, target) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    config = {"train_micro_batch_size_per_gpu": BATCH // WORLD_SIZE, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage},
              # a plain torch optimizer: DeepSpeed's own (FusedAdam, CPUAdam) compile C++ ops first
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=config)
    engine.backward(F.mse_loss(engine(x), target))
    # ZeRO holds the gradients in partitions (and ZeRO-3 the parameters too): gathered whole here
    return {name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.named_parameters()}


def run_rank(rank: int, port: int, mode: str, out_dir: str) -> None:
    """One rank: patch, wrap per `mode`, one step on this rank's half of the batch, save the results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE))
    if mode in DEEPSPEED_STAGES:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported: it picks its accelerator then
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    try:
        model = original_model()
        replaced = [r.name for r in patch_model(model)]
        x, target = batch()
        shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        with dispatch.record_paths() as seen:
            if mode in DEEPSPEED_STAGES:
                grads = _deepspeed_step(model, DEEPSPEED_STAGES[mode], x[shard], target[shard])
            else:
                grads = _fsdp_step(model, mode, x[shard], target[shard])
        torch.save({"grads": grads, "paths": dict(seen), "replaced": replaced},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
