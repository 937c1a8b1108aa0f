"""A patched Time-LLM under FSDP2 and DeepSpeed ZeRO: gradients equal the single-process original.

Two CPU processes (gloo, torch.multiprocessing spawn) run tests/distributed_worker.py: the input
stage built from Time-LLM's original layers, ``patch_model``, then FSDP2 ``fully_shard`` at the
root or per layer, or DeepSpeed ZeRO-2 / ZeRO-3 on its CPU accelerator. Every rank's whole
gradients must equal those of the unpatched model run on the full batch in one process
(docs/spec.md §4's fp32 bar). FSDP2 per ``nn.Linear`` / ``nn.Conv1d`` and DDP are tested in tests/test_dropin.py
and tests/test_ddp.py.

The DeepSpeed rows need the ``integrations`` extra (DeepSpeed 0.19.8) and are skipped, with the
install command, without it. On first use DeepSpeed compiles its shared-memory collective op
(about 1.5 minutes on a 2-core machine, then cached under ~/.cache/torch_extensions).
"""
import importlib.util

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_worker import DEEPSPEED_STAGES, MODES, original_model, run_rank
from dropin_fsdp_worker import WORLD_SIZE, batch, free_port

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

NO_DEEPSPEED = importlib.util.find_spec("deepspeed") is None
needs_deepspeed = pytest.mark.skipif(
    NO_DEEPSPEED, reason="DeepSpeed is not installed: pip install -e '.[integrations]' in a venv of its own "
                         "(PyPOTS in that extra pins transformers <= 4.57.6)")


def single_process_gradients() -> dict:
    model = original_model()
    x, target = batch()
    torch.nn.functional.mse_loss(model(x), target).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", [pytest.param(m, marks=needs_deepspeed) if m in DEEPSPEED_STAGES else m
                                  for m in MODES])
def test_patched_model_gradients_equal_the_single_process_original(mode, tmp_path):
    reference = single_process_gradients()

    mp.spawn(run_rank, args=(free_port(), mode, str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    for r, result in enumerate(ranks):
        assert result["replaced"] == ["patch_embedding", "reprogramming_layer"], r
        # our two ops ran once each (on the path the wrapper leaves them: fused, or through the
        # wrapped submodules' own calls)
        calls = {}
        for (op, _), count in result["paths"].items():
            calls[op] = calls.get(op, 0) + count
        assert calls == {"patch_embedding": 1, "reprogramming_attention": 1}, (r, result["paths"])
        grads = result["grads"]
        assert grads.keys() == reference.keys(), r
        for name, ref in reference.items():
            assert ref.abs().max() > 0, f"{name}: zero reference gradient proves nothing"
            assert grads[name] is not None, f"rank {r}: no gradient for {name}"
            err = (grads[name] - ref).abs().max().item()
            tol = 1e-4 * (1 + ref.abs().max().item())
            assert err <= tol, f"{mode} rank {r} d{name}: max abs err {err:.3e} > {tol:.3e}"
