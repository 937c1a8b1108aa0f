"""Bitwise determinism on the Triton path: the same seed gives the same bits, outputs and ALL gradients.

Both ops, with and without dropout, including shapes whose backward splits the reduction over
rows into several chunks (reprogramming prototype side: `protos_rows_per_chunk`; patch embedding
dW: `dweight_chunks`). The chunk partials are summed in a fixed order and no float atomics are used,
so this must hold exactly — for the reprogramming layer in its deterministic mode
(`deterministic=True`, or `torch.use_deterministic_algorithms(True)`). Its default mode adds the
row side of the backward (d target) with fp32 atomics, whose order varies run to run on a GPU (in
the interpreter programs run one after another, so the CPU cannot show it).

Where bitwise reproducibility does NOT hold (documented, not tested here):

* Across GPU architectures: dispatch picks different tiles and dot dtypes on sm_75 / sm_80 / sm_90
  (e.g. bf16 has no MMA on sm_75), so the bits differ between GPU generations (results stay within
  docs/spec.md §4). The chunking depends only on the shapes, so the same GPU model gives the same bits.
* The GEMMs around the kernels (K/V, output and weight-gradient projections) are cuBLAS calls: they
  are deterministic run to run on one GPU, but bit-identity across GPUs / cuBLAS versions is not
  guaranteed.
* The eager fallback on CUDA (unsupported head widths, float64, forced eager): PyTorch's SDPA
  backward and the literal reference's index ops can use non-deterministic CUDA algorithms unless
  ``torch.use_deterministic_algorithms(True)`` is set. On the CPU the eager path is deterministic.
"""
import dataclasses

import pytest
import torch

from helpers import DEVICE, bench_module, requires_triton
from test_reprogramming import run_layer
from timellm_fast import PatchEmbedding, dispatch
from timellm_fast.reprogramming import ReprogrammingLayer
from timellm_fast.kernels import patch_embedding_tiles as pe_tiles
from timellm_fast.kernels import attention_backward
from timellm_fast.kernels import attention_tiles as tiles
from timellm_fast.kernels.attention_form import core_form

tile_overrides = bench_module("tile_overrides")  # the tuners' hooks: other tiles


def reprogramming_run(B, L, S, E, dropout, shared=True):
    torch.manual_seed(1234)
    layer = ReprogrammingLayer(16, 2, d_keys=E, d_llm=12, attention_dropout=dropout,
                               deterministic=True).to(DEVICE).train()
    target = torch.randn(B, L, 16, device=DEVICE, requires_grad=True)
    source = torch.randn(S, 12, device=DEVICE, requires_grad=True)
    value = source if shared else torch.randn(S, 12, device=DEVICE, requires_grad=True)
    upstream = torch.randn(B, L, 12, device=DEVICE)
    torch.manual_seed(99)  # the dropout seed is drawn from here
    with dispatch.record_paths() as seen:
        out, grads = run_layer(layer, target, source, value, upstream)
    assert seen == {("reprogramming_attention", "triton"): 1}, seen
    return out, grads


def assert_bitwise_equal(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    assert torch.equal(out_a, out_b), "output"
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@requires_triton
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("B,L,S,E,shared", [
    (2, 8, 37, 32, True),
    (3, 5, 37, 16, False),
    (16, 64, 37, 16, True),  # several row chunks in the prototype-stationary backward
], ids=["small", "separate-value", "protos-chunks"])
def test_reprogramming_same_seed_same_bits(B, L, S, E, shared, dropout, monkeypatch):

    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    if B * L >= 1024:
        cfg = tiles.select_config("bwd_protos", torch.float32, core_form(16, E), dropout > 0, DEVICE)
        per_chunk = attention_backward.protos_rows_per_chunk(B * L, -(-S // cfg.block_s), 2, cfg.block_r)
        assert -(-B * L // per_chunk) >= 2, "must use several row chunks"
    first = reprogramming_run(B, L, S, E, dropout, shared)
    second = reprogramming_run(B, L, S, E, dropout, shared)
    assert_bitwise_equal(first, second)
    if dropout:
        assert (first[0] != reprogramming_run_other_seed(B, L, S, E, dropout, shared)).any()


def reprogramming_run_other_seed(B, L, S, E, dropout, shared):
    torch.manual_seed(1234)
    layer = ReprogrammingLayer(16, 2, d_keys=E, d_llm=12, attention_dropout=dropout).to(DEVICE).train()
    target = torch.randn(B, L, 16, device=DEVICE)
    source = torch.randn(S, 12, device=DEVICE)
    value = source if shared else torch.randn(S, 12, device=DEVICE)
    torch.manual_seed(100)
    with torch.no_grad():
        return layer(target, source, value)


def patch_run(B, N, T, dropout, d_model=24, contiguous=False):
    torch.manual_seed(1234)
    layer = PatchEmbedding(d_model, 16, 8, dropout).to(DEVICE).train()
    x = torch.randn(B, T, N, device=DEVICE).permute(0, 2, 1)
    x = (x.contiguous() if contiguous else x).requires_grad_(True)
    torch.manual_seed(7)
    with dispatch.record_paths() as seen:
        y, _ = layer(x)
    assert seen == {("patch_embedding", "triton"): 1}, seen
    y.backward(torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y))
    return y.detach(), {"x": x.grad, "weight": layer.value_embedding.tokenConv.weight.grad}


@requires_triton
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("B,N,T", [(2, 3, 64), (2, 8, 256)], ids=["small", "dw-chunks"])
def test_patch_embedding_same_seed_same_bits(B, N, T, dropout, monkeypatch):

    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    M = B * N * ((T + 8 - 16) // 8 + 1)
    chunks, _ = pe_tiles.dweight_chunks(M)
    if T == 256:
        assert chunks >= 4, "must use several dW chunks"
    assert_bitwise_equal(patch_run(B, N, T, dropout), patch_run(B, N, T, dropout))


@requires_triton
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_patch_embedding_bits_do_not_depend_on_the_persistent_grid(dropout, monkeypatch):
    """The forward's grid is a multiple of the GPU's SM count: each row's arithmetic and dropout
    mask must not depend on it, so GPUs of one generation with different SM counts agree."""

    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    shipped = patch_run(2, 8, 256, dropout, contiguous=True)
    with tile_overrides.override_window_tile(dataclasses.replace(pe_tiles.WINDOW_FWD_TILES[torch.float32], programs_per_sm=3)):
        assert_bitwise_equal(patch_run(2, 8, 256, dropout, contiguous=True), shipped)
