"""The fused attention core alone against SDPA on the same folded problem: Q projection +
softmax(QKᵀ/√E)·V over all B'·L rows, given projected K and V. SDPA's row includes the Q
projection and the head-merge copy it needs; ours builds the factorized operands from K (one small
batched GEMM) and never forms Q; eager materializes [H, R, S] as Time-LLM does. TFLOP/s are of the
standard form's FLOPs for every row (so they compare as speed); `factorized_flops` is what our
kernels execute, for the tensor-core-bound target."""

from cases import kernel_grid, run_case, skip_without_triton
from common import (attention_core_cost, attention_core_factorized_flops, attention_core_impls, attention_core_inputs,
                    dtype_name)
from conftest import RESULTS

IMPLS = ["eager", "sdpa-fold", "ours"]


def priority(params) -> int:
    """Run order under a time budget: the two target shapes (E = 32 and E = 128) in bf16 first."""
    first = params["shape"].name in ("weather-folded", "etth1-folded") and dtype_name(params["dtype"]) == "bfloat16"
    return 0 if first else 2


@kernel_grid(IMPLS)
def test_attention_core(benchmark, shape, dtype, impl, mode):
    if impl.startswith("ours"):
        skip_without_triton(impl, "the fused attention core alone is a Triton kernel with no eager path")
    core = attention_core_impls(shape)[impl]
    training = mode != "fwd"
    rows, wq, bq, kv = attention_core_inputs(shape, dtype, requires_grad=training)

    def forward():
        return core(rows, wq, bq, kv)

    def forward_backward():
        out = core(rows, wq, bq, kv)
        out.backward(out.detach())

    row = run_case(benchmark, RESULTS, op="attention-core", shape=shape, dtype=dtype, mode=mode, impl=impl,
                   step=forward_backward if training else forward,
                   cost=attention_core_cost(shape, dtype, training),
                   extra=dict(factorized_flops=attention_core_factorized_flops(shape, training)))
    assert row["status"] in ("ok", "OOM")
