"""One rank of tests/test_dropin.py's FSDP2 test, and what the test and its ranks share.

The model is Time-LLM's input stage (timellm_original.InputStage) with a linear read-out, built
from the original layers and, for our run, rebuilt with our layers holding the original's state
dict. Each rank runs one training step on its half of the batch with FSDP2's ``fully_shard``
applied to every ``nn.Linear`` and ``nn.Conv1d`` and then to the root (which holds the word
embeddings); FSDP averages the gradients over the ranks, which for a mean loss over equal halves
is the full-batch gradient of a single process.
"""
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import timellm_original as original
from timellm_fast import dispatch

WORLD_SIZE = 2
BATCH, SEQ_LEN = 4, 32  # each rank gets BATCH // WORLD_SIZE series
D_LLM = 24


class InputStageWithHead(original.InputStage):
    """Time-LLM's input stage and a linear read-out, so that there is a loss."""

    def __init__(self, patch_embedding_class, reprogramming_class):
        super().__init__(d_llm=D_LLM, patch_embedding_class=patch_embedding_class,
                         reprogramming_class=reprogramming_class)
        self.head = nn.Linear(D_LLM, 1)

    def forward(self, x):  # x: [B, T, N] -> [B*N, P]
        return self.head(super().forward(x)).squeeze(-1)


def build_model(patch_embedding_class, reprogramming_class) -> nn.Module:
    """The model with the given layer classes, holding the weights of the original-layer model."""
    torch.manual_seed(0)
    reference = InputStageWithHead(original.PatchEmbedding, original.ReprogrammingLayer)
    model = InputStageWithHead(patch_embedding_class, reprogramming_class)
    model.load_state_dict(reference.state_dict())
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ_LEN, 1, generator=g)
    target = torch.randn(BATCH, (SEQ_LEN + 4 - 8) // 4 + 1, generator=g)  # [B*N, P]
    return x, target


def full_gradients(model: nn.Module) -> dict:
    """name -> the whole gradient (a sharded DTensor gradient gathered with .full_tensor())."""
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad
        if grad is not None and hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        grads[name] = None if grad is None else grad.detach().clone()
    return grads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, port: int, backend: str, use_ours: bool, out_dir: str) -> None:
    """One rank: shard, one forward/backward on this rank's half of the batch, save the gradients."""
    from torch.distributed.fsdp import fully_shard

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if backend == "eager":
        os.environ[dispatch.BACKEND_ENV] = "eager"
    else:
        os.environ.pop(dispatch.BACKEND_ENV, None)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    try:
        if use_ours:
            import timellm_fast
            model = build_model(timellm_fast.PatchEmbedding, timellm_fast.ReprogrammingLayer)
        else:
            model = build_model(original.PatchEmbedding, original.ReprogrammingLayer)
        for module in list(model.modules()):
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                fully_shard(module)
        fully_shard(model)
        x, target = batch()
        shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        with dispatch.record_paths() as seen:
            F.mse_loss(model(x[shard]), target[shard]).backward()
        torch.save({"grads": full_gradients(model), "paths": dict(seen)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
