"""Patch embedding, forward and forward + backward (dW; the series has no gradient in Time-LLM)."""
import torch

from cases import kernel_grid, pick, run_case
from common import dtype_name, patch_embedding_cost, patch_embedding_impls, patch_embedding_input
from conftest import RESULTS

IMPLS = ["eager", "compile", "compile-max-autotune", "ours"]


def priority(params) -> int:
    """Run order under a time budget: the targets (HBM fraction at 20688 rows, launches at the
    small official shape) first, bf16 forward."""
    first = (params["shape"].name in ("traffic-folded", "explained-gpt2") and params["mode"] == "fwd"
             and dtype_name(params["dtype"]) == "bfloat16")
    return 0 if first else 2


@kernel_grid(IMPLS)
def test_patch_embedding(benchmark, shape, dtype, impl, mode):
    impls = patch_embedding_impls(shape, dtype)
    layer = pick(impls, impl)
    x = patch_embedding_input(shape, dtype)

    def forward():
        with torch.no_grad():
            return layer(x)[0]

    def forward_backward():
        y, _ = layer(x)
        y.backward(torch.ones_like(y))

    step = forward if mode == "fwd" else forward_backward
    row = run_case(benchmark, RESULTS, op="patch_embedding", shape=shape, dtype=dtype, mode=mode, impl=impl,
                   step=step, cost=patch_embedding_cost(shape, dtype, mode != "fwd"))
    assert row["status"] in ("ok", "OOM")
