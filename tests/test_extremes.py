"""Numerical extremes of the reprogramming attention (and the patch embedding's long series).

* Logits up to ±1e4: the online softmax must not overflow (no NaN / inf) and must give the
  oracle's one-hot attention; gradients stay finite, and meet docs/spec.md §4 up to |logit| ~ 1e2 (beyond,
  a documented limitation pinned by strict xfails, see _GRAD_XFAIL).
* fp16 overflow (documented behaviour): a target row whose fp16 query projection would exceed
  65504 is NaN in the eager fp16 layer. The factorized form never forms Q (its logits are fp32
  accumulations of target·M), so that row stays finite and matches the oracle; the standard form
  (d_model > E) forms Q in fp16 and is NaN exactly where eager is. The other rows stay within
  docs/spec.md §4 of the oracle either way.
* Very long rows (S = 32768 prototypes, few query rows) and very many rows (enough for several
  row chunks of the prototype-side backward and several patch-embedding dW chunks) stay within docs/spec.md §4's fp32 bar.
"""
import math

import pytest
import torch

from helpers import DEVICE, assert_close_to_oracle, requires_triton
from test_reprogramming import run_layer, run_reference
from timellm_fast import dispatch, patch_embedding
from timellm_fast.reference import patch_embedding_reference
from timellm_fast.reprogramming import ReprogrammingLayer
from timellm_fast.kernels import patch_embedding_tiles as pe_tiles
from timellm_fast.kernels import attention_backward
from timellm_fast.kernels import attention_tiles as tiles
from timellm_fast.kernels.attention_form import core_form

OP = "reprogramming_attention"


def problem(B, L, d_model, H, E, S, d_llm, dtype=torch.float32, seed=0):
    # drawn on the CPU, then moved: the same numbers on every device (the huge-logit problems'
    # preconditions, e.g. a one-hot oracle, are properties of these numbers)
    torch.manual_seed(seed)
    layer = ReprogrammingLayer(d_model, H, d_keys=E, d_llm=d_llm, attention_dropout=0.0).to(DEVICE, dtype)
    target = torch.randn(B, L, d_model).to(DEVICE, dtype).requires_grad_()
    source = torch.randn(S, d_llm).to(DEVICE, dtype).requires_grad_()
    upstream = torch.randn(B, L, d_llm).to(DEVICE, dtype)
    return layer, target, source, upstream


def scores64(layer, target, source):
    """The scaled logits q·k/sqrt(E) in float64, [B', L, H, S]."""
    H, E = layer.n_heads, layer.d_keys
    q = torch.nn.functional.linear(target.double(), layer.query_projection.weight.double(),
                                   layer.query_projection.bias.double())
    k = torch.nn.functional.linear(source.double(), layer.key_projection.weight.double(),
                                   layer.key_projection.bias.double())
    q = q.view(*target.shape[:2], H, E)
    return torch.einsum("blhe,she->blhs", q, k.view(-1, H, E)) / math.sqrt(E)


def check_fp32(layer, target, source, upstream, path="triton"):
    with dispatch.record_paths() as seen:
        out, grads = run_layer(layer, target, source, source, upstream)
    assert seen == {(OP, path): 1}, seen
    oracle_out, oracle_grads = run_reference(layer, target, source, source, upstream, torch.float64)
    assert_close_to_oracle("out", out, oracle_out)
    for name, grad in grads.items():
        assert_close_to_oracle(f"grad {name}", grad, oracle_grads[name])
    return out, grads


def huge_logit_problem(logit):
    layer, target, source, upstream = problem(2, 8, 16, 2, 32, 77, 12)
    with torch.no_grad():  # rescale the query projection so that max |logit| is exactly `logit`
        factor = logit / scores64(layer, target, source).abs().max().item()
        layer.query_projection.weight.mul_(factor)
        layer.query_projection.bias.mul_(factor)
    s = scores64(layer, target, source)
    assert s.max().item() > 0.3 * logit and s.min().item() < -0.3 * logit  # both signs are large
    if logit >= 1e4:  # the oracle's attention is one-hot: runner-up weight < e^-15 ~ 3e-7
        top2 = s.topk(2, dim=-1).values
        assert (top2[..., 0] - top2[..., 1]).min().item() > 15
    return layer, target, source, upstream


@requires_triton
@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("logit", [1e2, 1e4], ids=["1e2", "1e4"])
def test_huge_logits_one_hot_output_no_nan(logit, backend, monkeypatch):
    monkeypatch.setenv("TIMELLM_FAST_BACKEND", backend)
    layer, target, source, upstream = huge_logit_problem(logit)
    with dispatch.record_paths() as seen:
        out, grads = run_layer(layer, target, source, source, upstream)
    assert seen == {(OP, "triton" if backend == "auto" else "eager"): 1}, seen
    oracle_out, oracle_grads = run_reference(layer, target, source, source, upstream, torch.float64)
    assert_close_to_oracle("out", out, oracle_out)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name


#: KNOWN LIMITATION (fused kernels and the SDPA fallback alike; the literal fp32 softmax meets the bar):
#: with logits of magnitude ~1e4 the gradients miss docs/spec.md §4's fp32 bar by up to ~20x (key weight); at
#: 1e2 every gradient meets it (the fused kernels with 10x margin). Cause in the fused kernels: the
#: backward rebuilds P = exp2(s·log2e/sqrt(E) - lse) from one fp32 lse of magnitude ~1.4e4, whose
#: rounding (ulp 1e-3) scales every P by up to 2^(5e-4), so the rebuilt row no longer sums to 1 and
#: dZ = P·(dP - delta) leaves a residue ~3e-4·dP on the one-hot entry, multiplied into dK by |q| ~ 1e3.
#: Fix (not done here): keep the row max and the log-sum separately ([2, H, R] statistics) and form
#: P = exp2((s - m) - log2(l)) in the backward. These cases are strict xfails: they start failing
#: (XPASS) the day the limitation is fixed, so the marker is removed then.
_GRAD_XFAIL = pytest.mark.xfail(strict=True, reason="one fp32 lse loses ~1e-3 at |logit| 1e4; see comment")


@requires_triton
@pytest.mark.parametrize("backend,logit", [
    ("eager", 1e2),
    ("auto", 1e2),
    pytest.param("auto", 1e4, marks=_GRAD_XFAIL),
    # the eager path's training on a CPU is Time-LLM's materialized softmax (exact); on CUDA it is SDPA
    pytest.param("eager", 1e4, marks=_GRAD_XFAIL if DEVICE.type == "cuda" else ()),
], ids=["eager-1e2", "fused-1e2", "fused-1e4", "eager-1e4"])
def test_huge_logit_gradients_meet_spec(backend, logit, monkeypatch):
    monkeypatch.setenv("TIMELLM_FAST_BACKEND", backend)
    check_fp32(*huge_logit_problem(logit), path="triton" if backend == "auto" else "eager")


@requires_triton
@pytest.mark.parametrize("d_model,form", [(16, "factorized"), (24, "standard")], ids=["factorized", "standard"])
def test_fp16_query_overflow(d_model, form, monkeypatch):
    """A target row whose fp16 query projection overflows: NaN in the eager fp16 layer. The factorized
    kernels never form Q, so that row is finite and right; the standard form forms Q in fp16 and is
    NaN exactly where eager is. The other rows meet docs/spec.md §4 either way."""
    from timellm_fast.reference import reprogramming_reference

    monkeypatch.setenv("TIMELLM_FAST_BACKEND", "triton")
    layer, target, source, upstream = problem(2, 4, d_model, 2, 16, 37, 8, dtype=torch.float16)
    assert core_form(d_model, 16).factorized == (form == "factorized")
    with torch.no_grad():
        target[0, 1, :] = 6.0e4  # |q| far above 65504 for this row
        out = layer(target, source, source)
        params = [p for p in layer.parameters()]
        eager = reprogramming_reference(target, source, source, *params, layer.n_heads)
        oracle = reprogramming_reference(target.double(), source.double(), source.double(),
                                         *(p.double() for p in params), layer.n_heads)
    assert torch.isfinite(oracle).all()
    bad = ~torch.isfinite(eager)
    assert bad[0, 1].all() and bad.sum() == out.shape[-1], "eager fp16 overflows exactly that row"
    assert not torch.isinf(out).any()
    keep = torch.ones(out.shape[:2], dtype=torch.bool)
    keep[0, 1] = False
    assert_close_to_oracle("finite rows", out[keep], oracle[keep], eager[keep])
    if form == "standard":
        assert torch.equal(torch.isnan(out), torch.isnan(eager))
    else:  # no eager fp16 value to judge it by: no worse than eager fp16 on its finite rows
        assert torch.isfinite(out).all()
        row_err = (out[0, 1].double() - oracle[0, 1]).abs().max().item()
        assert row_err <= 2 * (eager[keep].double() - oracle[keep]).abs().max().item(), row_err


@requires_triton
def test_fp16_large_but_representable_logits_are_finite(monkeypatch):
    """Scores near the fp16 limit (the kernel keeps them in fp32): finite and as good as eager fp16."""
    monkeypatch.setenv("TIMELLM_FAST_BACKEND", "triton")
    layer, target, source, upstream = problem(2, 4, 16, 2, 16, 37, 8, dtype=torch.float16)
    with torch.no_grad():
        factor = 3e3 / scores64(layer, target, source).abs().max().item()
        layer.query_projection.weight.mul_(factor)
        layer.query_projection.bias.mul_(factor)
    out, grads = run_layer(layer, target, source, source, upstream)
    oracle_out, oracle_grads = run_reference(layer, target, source, source, upstream, torch.float64)
    eager_out, eager_grads = run_reference(layer, target, source, source, upstream, torch.float16)
    assert_close_to_oracle("out", out, oracle_out, eager_out)
    for name in ("target", "source", "out_projection.weight", "value_projection.weight"):
        assert torch.isfinite(grads[name]).all(), name


@requires_triton
def test_very_long_rows_s32768():
    """S = 32768 prototypes (33x Time-LLM's 1000): the online softmax streams 1000+ blocks."""
    layer, target, source, upstream = problem(1, 3, 8, 1, 16, 32768, 4)
    check_fp32(layer, target, source, upstream)


@requires_triton
def test_many_rows_use_several_prototype_side_chunks():

    B, L, H, E, S = 16, 64, 1, 16, 37
    cfg = tiles.select_config("bwd_protos", torch.float32, core_form(8, E), False, DEVICE)
    per_chunk = attention_backward.protos_rows_per_chunk(B * L, -(-S // cfg.block_s), H, cfg.block_r)
    assert -(-B * L // per_chunk) >= 4, "the shape must split the prototype side over several row chunks"
    layer, target, source, upstream = problem(B, L, 8, H, E, S, 4)
    check_fp32(layer, target, source, upstream)


@requires_triton
def test_patch_embedding_long_series_and_many_dw_chunks():

    g = torch.Generator().manual_seed(0)
    B, N, T, patch_len, stride = 4, 8, 2048, 16, 8
    x = torch.randn(B, T, N, generator=g).permute(0, 2, 1).to(DEVICE).requires_grad_()
    w = (torch.randn(8, patch_len, 3, generator=g) / 7).to(DEVICE).requires_grad_()
    y = patch_embedding(x, w, patch_len, stride)
    M = y.shape[0] * y.shape[1]
    assert M > pe_tiles.DWEIGHT_BLOCK_M * 4 * 8  # several dW chunks
    grad = torch.randn(y.shape, generator=g).to(DEVICE)
    y.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = patch_embedding_reference(x64, w64, patch_len, stride)
    y64.backward(grad.double())
    assert_close_to_oracle("y", y, y64)
    assert_close_to_oracle("dx", x.grad, x64.grad)
    assert_close_to_oracle("dW", w.grad, w64.grad)
