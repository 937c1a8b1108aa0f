"""Launches per call: at the small official shapes launch latency dominates, so an
eval forward must be as few device operations as the math allows.

A TorchDispatchMode sees every operator the modules call on tensors (not what runs inside our
custom ops, whose kernels are counted by wrapping the Triton launchers). On a GPU each listed
compute operator is at least one kernel launch; views and empty allocations are none.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DEVICE, LaunchCounter, requires_triton, swap_kernel
from timellm_fast import PatchEmbedding, ReprogrammingLayer, reuse_prototypes
from timellm_fast.reprogramming_op import launch_layer_forward

NO_LAUNCH = {"aten.view", "aten._unsafe_view", "aten.reshape", "aten.t", "aten.transpose", "aten.split",
             "aten.empty", "aten.new_empty", "aten.detach", "aten.alias", "aten.as_strided", "aten.slice", "aten.unsqueeze",
             "aten.squeeze", "aten.expand", "aten.permute", "aten._to_copy_noop"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket).replace("::", "."))
        return func(*args, **(kwargs or {}))


def compute_ops(fn) -> list:
    with OpLog() as log:
        fn()
    return [op for op in log.ops if op not in NO_LAUNCH]


@requires_triton
def test_patch_embedding_eval_forward_is_one_kernel_launch(monkeypatch):
    # docs/spec.md §2 explained example: B·N = 28 series of T = 512, d_model 32
    layer = PatchEmbedding(32, 16, 8, 0.1).to(DEVICE).eval()
    x = torch.randn(4, 7, 512, device=DEVICE)
    layer(x)  # first call: the cached seed placeholder is made here
    counter = swap_kernel(monkeypatch, "patch_window_fwd", LaunchCounter)
    with torch.no_grad():
        ops = compute_ops(lambda: layer(x))
    assert ops == ["timellm_fast.patch_embedding_fwd"], ops
    assert counter.launches == 1


@requires_triton
def test_reprogramming_inference_is_the_core_and_the_output_gemm(monkeypatch):
    layer = ReprogrammingLayer(32, 8, 32, 96, 0.1).to(DEVICE).eval()
    target = torch.randn(4, 64, 32, device=DEVICE)
    protos = torch.randn(104, 96, device=DEVICE)  # a multiple of 8, as Time-LLM's 1000: mc needs no padding
    with torch.no_grad():
        # outside a reuse block the prototype side is formed on every call (V's and K's GEMMs and
        # the factorized mc: the padded query weight and its batched GEMM), then the core and the
        # output GEMM
        ops = compute_ops(lambda: layer(target, protos, protos))
        assert ops == ["aten.addmm", "aten.addmm", "aten.cat", "aten.bmm",
                       "timellm_fast.reprogramming_attention_core_fwd", "aten.addmm"], ops
        with reuse_prototypes():
            layer(target, protos, protos)  # forms the prototype side of this block
            counter = swap_kernel(monkeypatch, "attention_fwd_kernel", LaunchCounter)
            ops = compute_ops(lambda: layer(target, protos, protos))
    assert counter.launches == 1
    # the reused prototype side: the attention core, then the output GEMM
    assert ops == ["timellm_fast.reprogramming_attention_core_fwd", "aten.addmm"], ops


# (d_model, the device operations of the training forward's launcher, its Triton launches): the
# factorized prototype side at E = 32 from the projected K where d_model = 32 (W = 33 >= E: V's
# GEMM, K's GEMM, then mc from Wq, bq and K in one Triton launch), from G where d_model = 16 (W = 17:
# V's GEMM, the padded query weight, G and its bias by two small bmm, mc's GEMM); then the attention
# (a Triton launch, not an aten operation) and the output GEMM
FORWARD_LAUNCHER_OPS = [
    (32, ["aten.addmm", "aten.addmm", "aten.addmm"], ["prototype_logits", "attention"]),
    (16, ["aten.addmm", "aten.cat", "aten.bmm", "aten.bmm", "aten.addmm", "aten.addmm"], ["attention"]),
]


@requires_triton
@pytest.mark.parametrize("d_model,expected,kernels", FORWARD_LAUNCHER_OPS, ids=["from-keys", "from-g"])
def test_reprogramming_forward_with_autograd_is_one_op_and_its_launcher_a_few_gemms(d_model, expected, kernels,
                                                                                 monkeypatch):
    layer = ReprogrammingLayer(d_model, 8, 32, 96, 0.1).to(DEVICE).eval()
    target = torch.randn(4, 64, d_model, device=DEVICE, requires_grad=True)
    protos = torch.randn(104, 96, device=DEVICE)
    layer(target, protos, protos)  # the seed placeholder
    assert compute_ops(lambda: layer(target, protos, protos)) == ["timellm_fast.reprogramming_attention_fwd"]
    # inside the op (its launcher); the kernels counted, not run (under the
    # interpreter their own tensor operations would be in the log)
    launches = []
    for name, attr in (("prototype_logits", "prototype_logits_kernel"), ("attention", "attention_fwd_kernel")):
        swap_kernel(monkeypatch, attr, lambda kernel, name=name: type("NoLaunch", (), {
            "__getitem__": lambda self, grid: lambda *a, **k: launches.append(name)})())
    weights = [t.detach() for m in (layer.query_projection, layer.key_projection, layer.value_projection,
                                    layer.out_projection) for t in (m.weight, m.bias)]
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    ops = compute_ops(lambda: launch_layer_forward(target.detach().view(-1, d_model), protos, protos, *weights, 8,
                                                   0.0, seed, False, False))
    assert ops == expected, ops
    assert launches == kernels, launches


@requires_triton
@pytest.mark.parametrize("d_model,from_keys", [(32, True), (16, False)], ids=["from-keys", "from-g"])
def test_training_step_forms_and_differentiates_mc_from_keys_in_one_launch_each_way(d_model, from_keys, monkeypatch):
    """At E = 32 the factorized prototype side comes from K where W = d_model padded + 1 >= E: one
    prototype_logits launch forward, one prototype_logits_bwd launch backward; from G neither."""
    layer = ReprogrammingLayer(d_model, 8, 32, 96, 0.0).to(DEVICE).train()
    target = torch.randn(2, 16, d_model, device=DEVICE, requires_grad=True)
    protos = torch.randn(100, 96, device=DEVICE, requires_grad=True)
    counters = {}
    for name in ("prototype_logits_kernel", "prototype_logits_bwd_kernel", "attention_fwd_kernel"):
        counters[name] = swap_kernel(monkeypatch, name, LaunchCounter)
    layer(target, protos, protos).sum().backward()
    assert {name: c.launches for name, c in counters.items()} == {
        "prototype_logits_kernel": int(from_keys), "prototype_logits_bwd_kernel": int(from_keys),
        "attention_fwd_kernel": 1}
    assert all(p.grad is not None for p in layer.parameters()) and protos.grad is not None


@requires_triton
def test_training_steps_launch_no_fills_and_one_op_each_way():
    """Forward + backward in training: each layer is one op each way, and nothing around them
    but the dropout seed and the accumulation into existing .grad tensors (no zero-filled
    gradients for the op's residual outputs)."""
    layer = ReprogrammingLayer(32, 8, 32, 96, 0.1).to(DEVICE).train()
    target = torch.randn(2, 16, 32, device=DEVICE, requires_grad=True)
    protos = torch.randn(100, 96, device=DEVICE, requires_grad=True)
    upstream = torch.randn(2, 16, 96, device=DEVICE)
    layer(target, protos, protos).backward(upstream)  # .grad tensors exist from here on
    ops = compute_ops(lambda: layer(target, protos, protos).backward(upstream))
    # protos is source and value: its two gradients are summed (aten.add) before accumulating
    assert ops == (["aten.randint", "timellm_fast.reprogramming_attention_fwd", "timellm_fast.reprogramming_attention_bwd",
                    "aten.add"] + ["aten.add_"] * 10), ops

    patch = PatchEmbedding(32, 16, 8, 0.1).to(DEVICE).train()
    x = torch.randn(4, 7, 512, device=DEVICE)
    grad = torch.randn(28, 64, 32, device=DEVICE)
    patch(x)[0].backward(grad)
    ops = compute_ops(lambda: patch(x)[0].backward(grad))
    # the dropout seed drawn on the device, the fused forward, the fused backward (dW), and the
    # accumulation into the existing .grad
    assert ops == ["aten.randint", "timellm_fast.patch_embedding_fwd", "timellm_fast.patch_embedding_bwd",
                   "aten.add_"], ops
