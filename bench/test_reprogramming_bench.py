"""Reprogramming layer, forward and forward + backward, against eager, torch.compile and SDPA-fold."""

from cases import kernel_grid, pick, run_case
from common import dtype_name, reprogramming_cost, reprogramming_impls, reprogramming_inputs
from conftest import RESULTS

IMPLS = ["eager", "compile", "compile-max-autotune", "sdpa-fold", "ours"]


def priority(params) -> int:
    """Run order under a time budget: the target shape (ETTh1-folded, bf16), then Traffic's
    memory target (ours and eager, after the whole-model rows), then the rest."""
    name, bf16 = params["shape"].name, dtype_name(params["dtype"]) == "bfloat16"
    if name == "etth1-folded" and bf16:
        return 0
    if name == "traffic-folded" and bf16 and params["impl"] in ("ours", "eager"):
        return 1.5
    return 2


@kernel_grid(IMPLS)
def test_reprogramming(benchmark, shape, dtype, impl, mode):
    impls = reprogramming_impls(shape, dtype)
    layer = pick(impls, impl)
    training = mode != "fwd"
    target, protos = reprogramming_inputs(shape, dtype, requires_grad=training)
    layer.train(training)

    def forward():  # grad mode on for every peer: our eval K/V cache would skip the K/V GEMMs
        return layer(target, protos, protos)

    def forward_backward():
        out = layer(target, protos, protos)
        out.backward(out.detach())

    step = forward_backward if training else forward
    row = run_case(benchmark, RESULTS, op="reprogramming", shape=shape, dtype=dtype, mode=mode, impl=impl,
                   step=step, cost=reprogramming_cost(shape, dtype, training))
    assert row["status"] in ("ok", "OOM")
