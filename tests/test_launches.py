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

from helpers import DEVICE, LaunchCounter, requires_triton
from timellm_fast import PatchEmbedding, ReprogrammingLayer
from timellm_fast.kernels import patch_embedding as pe_kernels
from timellm_fast.kernels import reprogramming_attention as attn_kernels

NO_LAUNCH = {"aten.view", "aten._unsafe_view", "aten.reshape", "aten.t", "aten.transpose", "aten.split",
             "aten.empty", "aten.detach", "aten.alias", "aten.as_strided", "aten.slice", "aten.unsqueeze",
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
    # SPEC §2 explained example: B·N = 28 series of T = 512, d_model 32
    layer = PatchEmbedding(32, 16, 8, 0.1).to(DEVICE).eval()
    x = torch.randn(4, 7, 512, device=DEVICE)
    layer(x)  # first call: the cached seed placeholder is made here
    counter = LaunchCounter(pe_kernels.patch_window_fwd)
    monkeypatch.setattr(pe_kernels, "patch_window_fwd", counter)
    with torch.no_grad():
        ops = compute_ops(lambda: layer(x))
    assert ops == ["timellm_fast.patch_embedding_fwd"], ops
    assert counter.launches == 1


@requires_triton
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_reprogramming_eval_forward_launches(monkeypatch, grad):
    layer = ReprogrammingLayer(32, 8, 32, 96, 0.1).to(DEVICE).eval()
    target = torch.randn(4, 64, 32, device=DEVICE)
    protos = torch.randn(104, 96, device=DEVICE)  # a multiple of 8, as Time-LLM's 1000: mc needs no padding
    with torch.set_grad_enabled(grad):
        layer(target, protos, protos)  # fills the K/V cache (no_grad) and the seed placeholder
        counter = LaunchCounter(attn_kernels.attention_fwd_kernel)
        monkeypatch.setattr(attn_kernels, "attention_fwd_kernel", counter)
        ops = compute_ops(lambda: layer(target, protos, protos))
    assert counter.launches == 1
    attention = ["timellm_fast.reprogramming_attention_fwd"]
    if grad:
        # the factorized prototype side: V's GEMM, the padded query weight (one cat), G and its
        # bias (two small bmm), mc's GEMM; the attention; the output GEMM
        prototype_side = ["aten.addmm", "aten.cat", "aten.bmm", "aten.bmm", "aten.addmm"]
        assert ops == prototype_side + attention + ["aten.addmm"], ops
    else:  # eval without autograd reuses the cached prototype side: attention, then the output GEMM
        assert ops == attention + ["aten.addmm"], ops


@requires_triton
def test_training_steps_launch_no_fills_and_one_op_each_way():
    """Forward + backward in training: our custom ops once each way, no zero-fills (autograd
    would materialize a zero gradient for the attention's unused lse output)."""
    layer = ReprogrammingLayer(32, 8, 32, 96, 0.1).to(DEVICE).train()
    target = torch.randn(2, 16, 32, device=DEVICE, requires_grad=True)
    protos = torch.randn(100, 96, device=DEVICE, requires_grad=True)
    upstream = torch.randn(2, 16, 96, device=DEVICE)
    layer(target, protos, protos).backward(upstream)  # .grad tensors exist from here on
    ops = compute_ops(lambda: layer(target, protos, protos).backward(upstream))
    assert ops.count("timellm_fast.reprogramming_attention_fwd") == 1
    assert ops.count("timellm_fast.reprogramming_attention_bwd") == 1
    assert not [op for op in ops if op in ("aten.zeros", "aten.zero_", "aten.fill_", "aten.new_zeros")], ops
    # the padded query weight of the forward only: the attention backward hands back whole
    # gradients for mc and V, the outputs of their own GEMMs, so autograd concatenates nothing
    assert ops.count("aten.cat") == 1, ops

    patch = PatchEmbedding(32, 16, 8, 0.1).to(DEVICE).train()
    x = torch.randn(4, 7, 512, device=DEVICE)
    grad = torch.randn(28, 64, 32, device=DEVICE)
    patch(x)[0].backward(grad)
    ops = compute_ops(lambda: patch(x)[0].backward(grad))
    # the dropout seed drawn on the device, the fused forward, the fused backward (dW), and the
    # accumulation into the existing .grad
    assert ops == ["aten.randint", "timellm_fast.patch_embedding_fwd", "timellm_fast.patch_embedding_bwd",
                   "aten.add_"], ops
