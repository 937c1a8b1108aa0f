"""Our two layers under DistributedDataParallel: gradients equal a single-process run.

Two CPU processes (gloo backend, torch.multiprocessing spawn) each take half of the batch; DDP
averages their gradients, which for a mean loss over equal halves is the full-batch gradient.
Run with the eager path and with the Triton path (the interpreter on a CPU).
"""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from timellm_fast import PatchEmbedding, dispatch
from timellm_fast.reprogramming import ReprogrammingLayer
from timellm_original import InputStage

WORLD_SIZE = 2
BATCH, SEQ_LEN = 4, 32  # each rank gets BATCH // WORLD_SIZE series

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


class InputStageWithHead(InputStage):
    """Time-LLM's input stage with our layers, and a linear read-out so there is a loss."""

    def __init__(self, d_llm=24):
        super().__init__(d_llm=d_llm, patch_embedding_class=PatchEmbedding,
                         reprogramming_class=ReprogrammingLayer)
        self.head = nn.Linear(d_llm, 1)

    def forward(self, x):  # x: [B, T, N] -> [B*N, P]
        return self.head(super().forward(x)).squeeze(-1)


def make_model_and_data():
    torch.manual_seed(0)
    model = InputStageWithHead()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ_LEN, 1, generator=g)
    target = torch.randn(BATCH, (SEQ_LEN + 4 - 8) // 4 + 1, generator=g)  # [B*N, P]
    return model, x, target


def gradients(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, backend: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ[dispatch.BACKEND_ENV] = backend
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    try:
        model, x, target = make_model_and_data()
        ddp = nn.parallel.DistributedDataParallel(model)
        shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        with dispatch.record_paths() as seen:
            F.mse_loss(ddp(x[shard]), target[shard]).backward()
        torch.save({"grads": gradients(model), "paths": dict(seen)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# the ranks are CPU processes (gloo), so the Triton path runs only where Triton runs on CPU
# tensors, i.e. in the interpreter; on a GPU machine without TRITON_INTERPRET=1 it is skipped
TRITON_ON_CPU = dispatch.triton_device_problem(torch.device("cpu")) is None


@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_ON_CPU, reason="the DDP ranks are CPU processes and Triton runs on CPU tensors only "
                              "in its interpreter (TRITON_INTERPRET=1)"))])
def test_ddp_gradients_equal_single_process_full_batch(backend, tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
    model, x, target = make_model_and_data()
    F.mse_loss(model(x), target).backward()
    reference = gradients(model)

    mp.spawn(worker, args=(free_port(), backend, str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for r, result in enumerate(ranks):
        assert result["paths"] == {("patch_embedding", backend): 1, ("reprogramming_attention", backend): 1}, r
        grads = result["grads"]
        assert grads.keys() == reference.keys()
        for name, ref in reference.items():
            assert ref.abs().max() > 0, f"{name}: zero reference gradient proves nothing"
            err = (grads[name] - ref).abs().max().item()
            tol = 1e-4 * (1 + ref.abs().max().item())
            assert err <= tol, f"rank {r} d{name}: max abs err {err:.3e} > {tol:.3e}"
        # DDP all-reduced: every rank holds the same gradients
        for name in reference:
            assert torch.equal(grads[name], ranks[0]["grads"][name]), f"rank {r} d{name} differs from rank 0"
