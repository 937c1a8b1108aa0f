"""What the layers keep for backward: never the attention matrix, never the unfolded patches.

The saved-tensor accounting (torch.autograd.graph.saved_tensors_hooks, each storage counted
once) holds on any device, so the CPU proves the structure: the fused reprogramming layer saves
O(B'·L·(d_model + H·E) + S·H·E) bytes where eager saves O(B'·H·L·S). On a GPU the Traffic-shape
test also measures the CUDA allocator (20688 rows forward + backward fit in 80 GB with
>= 10x less activation memory than eager).
"""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE, requires_triton
from timellm_fast import PatchEmbedding, ReprogrammingLayer, dispatch
from timellm_fast.models import EagerPatchEmbedding, EagerReprogrammingLayer


def saved_bytes(fn) -> tuple:
    """(bytes of the distinct storages autograd saved while fn() ran, largest saved numel)."""
    storages, largest = {}, [0]

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), largest[0], out


def _reprogramming_pair(d_model, n_heads, d_keys, d_llm, dtype):
    torch.manual_seed(0)
    ours = ReprogrammingLayer(d_model, n_heads, d_keys, d_llm, 0.0).to(DEVICE, dtype)
    eager = EagerReprogrammingLayer(d_model, n_heads, d_keys, d_llm, 0.0).to(DEVICE, dtype)
    eager.load_state_dict(ours.state_dict())
    return ours, eager


@requires_triton
def test_reprogramming_saves_no_attention_matrix_and_10x_less_per_row_than_eager():
    # docs/spec.md §2 head geometry (H 8, E 32, S 1000) with B'·L cut to 128 and 256 rows for the
    # interpreter; what grows with the rows is what grows at Traffic scale (the K/V and weights
    # are a fixed cost there)
    L, d_model, H, E, S, d_llm = 64, 16, 8, 32, 1000, 64
    ours, eager = _reprogramming_pair(d_model, H, E, d_llm, torch.float32)
    protos = torch.randn(S, d_llm, device=DEVICE, requires_grad=True)
    measured = {}
    for bp in (2, 4):
        target = torch.randn(bp, L, d_model, device=DEVICE, requires_grad=True)
        with dispatch.record_paths() as paths:
            measured["ours", bp] = saved_bytes(lambda: ours(target, protos, protos))
        assert paths == {("reprogramming_attention", "triton"): 1}
        measured["eager", bp] = saved_bytes(lambda: eager(target, protos, protos))
        rows = bp * L
        # the eager layer does keep [B', H, L, S]; ours keeps nothing larger than K/V, heads_out
        # or the prototypes
        assert measured["eager", bp][1] >= bp * H * L * S
        assert measured["ours", bp][1] <= max(S * 2 * H * E, rows * H * E, S * d_llm)
    ours_per_row = (measured["ours", 4][0] - measured["ours", 2][0]) / (2 * L)
    eager_per_row = (measured["eager", 4][0] - measured["eager", 2][0]) / (2 * L)
    # per row: target (d_model) and heads_out (H·E) and lse (H), fp32
    assert ours_per_row <= 4 * (d_model + H * E + H), ours_per_row
    assert eager_per_row >= 10 * ours_per_row, (eager_per_row, ours_per_row)
    out = measured["ours", 4][2]
    out.sum().backward()  # what was saved is enough for the backward
    assert target.grad is not None and protos.grad is not None


@requires_triton
def test_patch_embedding_saves_only_the_series_and_weight():
    x = torch.randn(3, 7, 96, device=DEVICE, requires_grad=True)
    ours = PatchEmbedding(32, 16, 8, 0.0).to(DEVICE)
    eager = EagerPatchEmbedding(32, 16, 8, 0.0).to(DEVICE)
    with dispatch.record_paths() as paths:
        ours_bytes, _, (y, _) = saved_bytes(lambda: ours(x))
    assert paths == {("patch_embedding", "triton"): 1}
    eager_bytes, _, _ = saved_bytes(lambda: eager(x))
    assert ours_bytes <= x.numel() * 4 + ours.value_embedding.tokenConv.weight.numel() * 4 + 64
    # eager keeps the padded, unfolded patches: P·patch_len = 2x the series at stride 8
    assert eager_bytes >= ours_bytes + x.numel() * 4
    y.sum().backward()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="measures the CUDA allocator at the Traffic shape")
def test_traffic_shape_forward_backward_fits_with_10x_less_activation_memory():
    # docs/spec.md §2 Traffic, folded: B' = 20688 series, L = 64 patches, d_model 16, H 8, E 32, d_llm 4096
    bp, L, d_model, H, E, S, d_llm = 20688, 64, 16, 8, 32, 1000, 4096
    dtype = torch.bfloat16
    ours, _ = _reprogramming_pair(d_model, H, E, d_llm, dtype)
    target = torch.randn(bp, L, d_model, device=DEVICE, dtype=dtype, requires_grad=True)
    protos = torch.randn(S, d_llm, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = ours(target, protos, protos)
    torch.cuda.synchronize()
    activations = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    eager_attention = bp * H * L * S * 2  # eager keeps at least the bf16 [B', H, L, S] softmax
    assert peak < 80 * 2**30, f"peak {peak / 2**30:.1f} GiB"
    assert activations * 10 <= eager_attention, (activations, eager_attention)
    assert torch.isfinite(target.grad.float()).all()
