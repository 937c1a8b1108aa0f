"""ReprogrammingLayer: fused Triton path and eager fallback against the float64 oracle (docs/spec.md §1.2, §4).

On a machine without CUDA these tests exercise the kernels through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py or in the environment before Python starts). Shapes are
docs/spec.md §2's with B'·L cut down, because the interpreter runs every program of the grid in numpy.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from helpers import (DEVICE, LaunchCounter, TRITON_PROBLEM, assert_close_to_oracle, bench_module, max_abs_err,
                     requires_triton)
from timellm_fast import dispatch, reuse_prototypes
from timellm_fast.reference import reprogramming_reference, reprogramming_sdpa_fold
from timellm_fast.reprogramming import ReprogrammingLayer
from timellm_fast.reprogramming_op import draw_seed_tensor, factorized_query_side
from timellm_original import ReprogrammingLayer as OriginalReprogrammingLayer
from timellm_fast.kernels import attention as kern
from timellm_fast.kernels import attention_backward
from timellm_fast.kernels import attention_tiles as tiles
from timellm_fast.kernels import attention_form
from timellm_fast.kernels.attention_form import core_form

OP = "reprogramming_attention"
tile_overrides = bench_module("tile_overrides")  # the tuners' hooks: other tiles, polynomial exponentials
core_from_keys = bench_module("common").core_from_keys
if TRITON_PROBLEM is None:  # @triton.jit test kernels below call them, and find them in this module's globals
    from timellm_fast.kernels.attention_device import dot_operand, exp2_poly
PARAM_NAMES = ("query_projection.weight", "query_projection.bias", "key_projection.weight",
               "key_projection.bias", "value_projection.weight", "value_projection.bias",
               "out_projection.weight", "out_projection.bias")


@pytest.fixture
def backend(monkeypatch):
    """Forces a path: with "triton" a silent fallback would raise instead of passing unnoticed."""
    def force(mode: str) -> None:
        monkeypatch.setenv(dispatch.BACKEND_ENV, mode)
    return force


def make_problem(batch, seq, d_model, n_heads, d_keys, protos, d_llm, dtype, shared, seed=0):
    """A layer and inputs in `dtype`, all leaves requiring grad, plus the upstream gradient."""
    torch.manual_seed(seed)
    layer = ReprogrammingLayer(d_model, n_heads, d_keys=d_keys, d_llm=d_llm, attention_dropout=0.0)
    layer = layer.to(device=DEVICE, dtype=dtype)
    # a target of scale 2 and a 4x query weight make the softmax far from uniform, so errors in P show
    with torch.no_grad():
        layer.query_projection.weight.mul_(4.0)
    target = (2 * torch.randn(batch, seq, d_model, device=DEVICE)).to(dtype).requires_grad_()
    source = torch.randn(protos, d_llm, device=DEVICE).to(dtype).requires_grad_()
    value = source if shared else torch.randn(protos, d_llm, device=DEVICE).to(dtype).requires_grad_()
    upstream = torch.randn(batch, seq, d_llm, device=DEVICE).to(dtype)
    return layer, target, source, value, upstream


def grads_of(out, upstream, named_leaves):
    """Output and {name: grad} for every leaf, by autograd."""
    leaves = list(named_leaves.values())
    grads = torch.autograd.grad(out, leaves, upstream, allow_unused=False)
    return {name: g for name, g in zip(named_leaves, grads)}


def run_layer(layer, target, source, value, upstream):
    out = layer(target, source, value)
    leaves = {"target": target, "source": source}
    if value is not source:
        leaves["value"] = value
    leaves.update(dict(layer.named_parameters()))
    return out.detach(), grads_of(out, upstream, leaves)


def run_reference(layer, target, source, value, upstream, dtype, mask=None):
    """The literal reference in `dtype` on the same values (float64: the oracle).

    `mask` ([B', H, L, S] of 0/1) replaces F.dropout, so a given dropout draw can be replayed.
    """
    def leaf(t):
        return t.detach().to(dtype).requires_grad_()

    params = {name: leaf(p) for name, p in layer.named_parameters()}
    t, s = leaf(target), leaf(source)
    v = s if value is source else leaf(value)
    wq, bq, wk, bk, wv, bv, wo, bo = (params[n] for n in PARAM_NAMES)
    if mask is None:
        out = reprogramming_reference(t, s, v, wq, bq, wk, bk, wv, bv, wo, bo, layer.n_heads)
    else:
        out = masked_reference(t, s, v, wq, bq, wk, bk, wv, bv, wo, bo, layer.n_heads, mask, layer.dropout.p)
    leaves = {"target": t, "source": s}
    if v is not s:
        leaves["value"] = v
    leaves.update(params)
    return out.detach(), grads_of(out, upstream.to(dtype), leaves)


def masked_reference(target, source, value, wq, bq, wk, bk, wv, bv, wo, bo, n_heads, mask, p):
    Bp, L, _ = target.shape
    S = source.shape[0]
    E = wq.shape[0] // n_heads
    q = (target @ wq.T + bq).view(Bp, L, n_heads, E)
    k = (source @ wk.T + bk).view(S, n_heads, E)
    v = (value @ wv.T + bv).view(S, n_heads, E)
    a = torch.softmax(torch.einsum("blhe,she->bhls", q, k) / math.sqrt(E), dim=-1)
    a = a * mask.to(a.dtype) / (1.0 - p)
    o = torch.einsum("bhls,she->blhe", a, v).reshape(Bp, L, n_heads * E)
    return o @ wo.T + bo


# ---------------------------------------------------------------------------------------------
# numerics of the fused path against the float64 oracle
# ---------------------------------------------------------------------------------------------

# (id, B', L, d_model, H, d_keys, S, d_llm, source is value); docs/spec.md §2 rows, B'·L cut to <= 128, plus the
# forms' edges: d_model < E (factorized, BLOCK_D 16 / 32 / 64), d_model = E, d_model > E (standard form),
# S = 37 and 1000, E not a power of two
SHAPES = [
    ("gpt2-example", 2, 16, 32, 4, 32, 1000, 768, True),  # d_model = E
    ("etth1-e128", 1, 32, 32, 2, 128, 1000, 96, True),
    ("ecl-dm16-s37", 2, 64, 16, 8, 32, 37, 64, False),
    ("m4-dm8", 1, 64, 8, 4, 32, 1000, 64, True),  # d_model padded to 16
    ("e48-unpadded", 3, 20, 16, 2, 48, 37, 64, False),
    ("protos-row-chunks", 8, 64, 16, 2, 16, 37, 64, True),  # d_model = E = 16
    ("dm32-e32-own-value", 2, 8, 32, 2, 32, 37, 64, False),  # factorized from K, value not source
    ("dm24-e100", 2, 16, 24, 2, 100, 37, 48, True),  # factorized, d_model padded to 32, E not a power of two
    ("standard-dm48-e32", 2, 16, 48, 2, 32, 37, 64, False),  # d_model > E: Q first
    ("standard-dm80-e64", 1, 16, 80, 2, 64, 37, 48, True),  # d_model > E: Q first, 64-wide logits
]
BACKWARD_MODES = ["default", "deterministic"]


@requires_triton
@pytest.mark.parametrize("mode", BACKWARD_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_fused_matches_oracle(shape, dtype, mode, backend):

    if dtype == torch.float32 and kern.core_form(shape[3], shape[5]).block_d > 32:
        pytest.skip("fp32 runs eager at 64-wide logits (test_fp32_wide_standard_form_falls_back)")
    backend("triton")
    check_fused_against_oracle(shape, dtype, deterministic=mode == "deterministic")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d_model,n_heads,d_keys,protos", [(16, 2, 16, 13), (8, 3, 17, 40), (32, 2, 33, 1000),
                                                           (20, 4, 32, 7)])
def test_prototype_logits_kernel_is_the_batched_gemm_of_the_padded_query_weight(dtype, d_model, n_heads, d_keys,
                                                                                protos):
    """The training forward's mc from K (one kernel) is the inference cache's (the batched GEMM of
    wqb_hᵀ = [Wq_h | 0 | bq_h]ᵀ by K_hᵀ, core_from_keys) to one rounding of the data dtype, with zero
    alignment columns, on K read through strides (a column slice of [K | V]); the wqb it writes
    for the backward is the concatenation, bit for bit; every factorized BLOCK_D, BLOCK_E <= 64,
    S padded and not."""
    g = torch.Generator().manual_seed(1)
    HE = n_heads * d_keys
    wq, bq = torch.randn(HE, d_model, generator=g), torch.randn(HE, generator=g)
    kv = torch.randn(protos, 2 * HE, generator=g)
    assert kern.core_form(d_model, d_keys).keys_first
    _, oracle, _, _ = core_from_keys(torch.zeros(1, d_model, dtype=torch.float64), wq.double(), bq.double(),
                                     kv.double(), n_heads)  # the GEMM in float64 on the same values
    wq, bq, kv = (t.to(DEVICE, dtype) for t in (wq, bq, kv))
    _, gemm, _, _ = core_from_keys(torch.zeros(1, d_model, device=DEVICE, dtype=dtype), wq, bq, kv, n_heads)
    mc, wqb = kern.prototype_logits(wq, bq, kv[:, :HE], n_heads, kern.core_form(d_model, d_keys))
    block_d = kern.core_form(d_model, d_keys).block_d
    padded_protos = protos + (-protos % kern.PROTOTYPE_ALIGN)
    assert mc.dtype == dtype and mc.shape == gemm.shape == (n_heads, block_d + 1, padded_protos)
    assert torch.equal(wqb, factorized_query_side(wq, bq, block_d))
    assert torch.equal(mc[:, :, protos:], torch.zeros_like(mc[:, :, protos:]))
    # the oracle's values in dtype, and the GEMM's own error: the kernel's may be as large
    rounding = (oracle.to(dtype).double() - oracle).abs().max().item() + 1e-6
    assert max_abs_err(mc.double().cpu(), oracle) <= max(2 * rounding, 1.5 * max_abs_err(gemm.double().cpu(), oracle))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d_model,n_heads,d_keys,protos", [(16, 2, 16, 13), (8, 3, 17, 40), (32, 2, 33, 1000),
                                                           (20, 4, 32, 7)])
def test_prototype_logits_backward_is_autograd_of_the_batched_gemm(dtype, d_model, n_heads, d_keys, protos):
    """d Kᵀ, d Wq, d bq and d bk (Σ_s d Kᵀ) from the kernel against autograd through the batched
    GEMM route (core_from_keys) in float64, on dmc rounded to the data dtype as the kernel takes
    it: each within the larger of twice the oracle's own rounding to the dtype, 1.5x the error of
    autograd through the same GEMMs in the dtype, and two units in the last place of its largest
    value (the sums over 1000 prototypes run in another order than PyTorch's)."""
    g = torch.Generator().manual_seed(2)
    HE = n_heads * d_keys
    leaves = (torch.randn(HE, d_model, generator=g), torch.randn(HE, generator=g), torch.randn(protos, 2 * HE, generator=g))
    wq, bq, kv = (t.to(DEVICE, dtype) for t in leaves)
    mc, wqb = kern.prototype_logits(wq, bq, kv[:, :HE], n_heads, kern.core_form(d_model, d_keys))
    dmc = torch.randn(mc.shape, generator=g).to(DEVICE)
    dmc[:, :, protos:] = float("nan")  # the alignment columns are not read

    def gemm_grads(dt):  # (dK^T, dWq, dbq, dbk) by autograd through core_from_keys in dt
        w, b, pairs = (t.detach().to(dt).requires_grad_() for t in (wq, bq, kv))
        _, mc_dt, _, _ = core_from_keys(torch.zeros(1, d_model, device=DEVICE, dtype=dt), w, b, pairs, n_heads)
        mc_dt.backward(dmc.nan_to_num(0.0).to(dtype).to(dt))  # mc_dt has the alignment columns too
        dk = pairs.grad[:, :HE]
        return dk.t(), w.grad, b.grad, dk.sum(0)

    oracle = [t.cpu() for t in gemm_grads(torch.float64)]
    same_dtype = gemm_grads(dtype)
    got = kern.prototype_logits_backward(dmc, wqb, kv[:, :HE], n_heads, kern.core_form(d_model, d_keys))
    for name, k_grad, o, ref in zip(("dKt", "dWq", "dbq", "dbk"), got, oracle, same_dtype):
        assert k_grad.dtype == dtype and k_grad.shape == o.shape, (name, k_grad.dtype, k_grad.shape)
        rounding = (o.to(dtype).double() - o).abs().max().item() + 1e-6
        ulps = 2 * torch.finfo(dtype).eps * o.abs().max().item()
        err = max_abs_err(k_grad.cpu(), o)
        assert err <= max(2 * rounding, 1.5 * max_abs_err(ref.cpu(), o), ulps), (name, err, rounding)


@requires_triton
def test_prototype_logits_rejects_what_it_has_no_kernel_for():
    wq, bq, k = (torch.randn(*shape, device=DEVICE) for shape in ((64, 16), (64,), (10, 64)))
    two_heads, four_heads = kern.core_form(16, 32), kern.core_form(16, 16)  # d_model 16, H*E 64
    with pytest.raises(ValueError, match="share a dtype"):
        kern.prototype_logits(wq, bq.double(), k, 2, two_heads)
    with pytest.raises(ValueError, match="must match"):
        kern.prototype_logits(wq, bq, k[:, :48], 2, two_heads)
    with pytest.raises(ValueError, match="unit stride"):
        kern.prototype_logits(wq.t().contiguous().t(), bq, k, 2, two_heads)
    with pytest.raises(ValueError, match="keys_first"):  # d_keys 32 > BLOCK_D + 1 = 17: mc comes from G there
        kern.prototype_logits(wq, bq, k, 2, two_heads)
    with pytest.raises(ValueError, match="keys_first"):  # a form of other widths than the operands'
        kern.prototype_logits(wq, bq, k, 4, kern.core_form(8, 16))
    mc, wqb = kern.prototype_logits(wq, bq, k, 4, four_heads)  # d_keys 16
    with pytest.raises(ValueError, match="float32"):
        kern.prototype_logits_backward(mc.double(), wqb, k, 4, four_heads)
    with pytest.raises(ValueError, match="must match"):
        kern.prototype_logits_backward(mc[:, :, :8], wqb, k, 4, four_heads)
    with pytest.raises(ValueError, match="keys_first"):
        kern.prototype_logits_backward(mc, wqb, k, 4, kern.core_form(24, 16))


def test_shapes_cover_both_forms_and_every_factorized_block_width():
    """...and both routes to the factorized prototype side: from the projected K (E <= BLOCK_D + 1) and
    from G without K (E wider), each of them on shapes where source is value and where it is not."""
    forms = {(kern.core_form(s[3], s[5]).factorized, kern.core_form(s[3], s[5]).block_d) for s in SHAPES}
    assert {(True, 16), (True, 32), (False, 32), (False, 64)} <= forms, forms
    routes = {(kern.core_form(s[3], s[5]).keys_first, s[8]) for s in SHAPES if kern.core_form(s[3], s[5]).factorized}
    assert routes == {(True, True), (True, False), (False, True), (False, False)}, routes


def test_fp32_wide_standard_form_falls_back(backend):
    """fp32 with d_model > d_keys >= 64 (no Time-LLM shape) has no kernel: the FMA kernels spill at
    64-wide logits. Automatic dispatch runs eager, and says why when the kernels are demanded."""
    backend("auto")
    layer, target, source, value, upstream = make_problem(1, 8, 80, 2, 64, 37, 48, torch.float32, True)
    with mocked_gpu((9, 0)):

        reason = kern.unsupported_reason(torch.float32, kern.core_form(80, 64), 37, False, CUDA0)
        assert "float32 with 64-wide logit dots (d_model=80, d_keys=64)" in reason, reason
        assert kern.unsupported_reason(torch.bfloat16, kern.core_form(80, 64), 37, False, CUDA0) is None
    with dispatch.record_paths() as seen:
        out, grads = run_layer(layer, target, source, value, upstream)
    assert seen == {(OP, "eager"): 1}, seen
    oracle_out, _ = run_reference(layer, target, source, value, upstream, torch.float64)
    assert_close_to_oracle("out", out, oracle_out)
    if TRITON_PROBLEM is None:
        backend("triton")
        with pytest.raises(RuntimeError, match=r"float32 with 64-wide logit dots \(d_model=80"):
            layer(target, source, value)


@requires_triton
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_backward_delta_is_exact_enough_for_the_zero_key_bias_gradient(seed, backend):
    """delta = rowsum(dout · out) from the stored bf16 output. Softmax ignores a shift of all keys, so
    the key-projection bias gradient is exactly zero and its computed value is pure rounding, the
    gradient where an inexact delta shows first (docs/spec.md §4 gives it 4x the eager layer's error). On the
    standard form's kernels this problem at seed 2 put it at 2.2x; the factorized form's measured
    ratios are in bench/ROOFLINE.md ("Delta"). Drawn on the CPU, where the interpreter rounds dot
    operands as a GPU's bf16 MMA does; a GPU draws another problem."""
    backend("triton")
    e48 = next(shape for shape in SHAPES if shape[0] == "e48-unpadded")
    check_fused_against_oracle(e48, torch.bfloat16, seed=seed)


def check_fused_against_oracle(shape, dtype, seed=0, deterministic=False):
    _, batch, seq, d_model, n_heads, d_keys, protos, d_llm, shared = shape
    layer, target, source, value, upstream = make_problem(batch, seq, d_model, n_heads, d_keys, protos, d_llm,
                                                          dtype, shared, seed=seed)
    layer.deterministic = deterministic
    with dispatch.record_paths() as seen:
        out, grads = run_layer(layer, target, source, value, upstream)
    assert seen[(OP, "triton")] == 1 and seen[(OP, "eager")] == 0
    assert out.dtype == dtype and out.shape == (batch, seq, d_llm)

    oracle_out, oracle_grads = run_reference(layer, target, source, value, upstream, torch.float64)
    eager_out, eager_grads = (None, {})
    if dtype != torch.float32:
        eager_out, eager_grads = run_reference(layer, target, source, value, upstream, dtype)
    assert_close_to_oracle("out", out, oracle_out, eager_out)
    assert set(grads) == set(oracle_grads)
    for name, grad in grads.items():
        assert grad.dtype == dtype
        assert_close_to_oracle(f"grad {name}", grad, oracle_grads[name], eager_grads.get(name))


@requires_triton
def test_protos_row_chunks_are_used_and_deterministic(backend):
    """The "protos-row-chunks" shape must really split the prototype-stationary backward over row
    chunks, and in deterministic mode the split sums must give the same bits on every run."""

    backend("triton")
    cfg = tiles.select_config("bwd_protos", torch.float32, core_form(16, 16), False, DEVICE)
    rows, protos, heads = 8 * 64, 37, 2
    per_chunk = attention_backward.protos_rows_per_chunk(rows, -(-protos // cfg.block_s), heads, cfg.block_r)
    assert -(-rows // per_chunk) > 1
    layer, target, source, value, upstream = make_problem(8, 64, 16, heads, 16, protos, 64, torch.float32, True)
    layer.deterministic = True
    first = run_layer(layer, target, source, value, upstream)[1]
    second = run_layer(layer, target, source, value, upstream)[1]
    for name in first:
        assert torch.equal(first[name], second[name]), name


@requires_triton
def test_torch_deterministic_switch_selects_the_fixed_order_backward(backend, monkeypatch):
    """torch.use_deterministic_algorithms(True) turns the layer's deterministic mode on: the row side
    then comes from the row-stationary kernel, not from atomics in the prototype-stationary one."""

    backend("triton")
    layer, target, source, value, upstream = make_problem(2, 8, 16, 2, 32, 37, 24, torch.float32, True)
    launches = {}
    for name in ("attention_bwd_protos_kernel", "attention_bwd_rows_kernel"):
        launches[name] = LaunchCounter(getattr(attention_backward, name))
        monkeypatch.setattr(attention_backward, name, launches[name])
    run_layer(layer, target, source, value, upstream)
    assert (launches["attention_bwd_protos_kernel"].launches, launches["attention_bwd_rows_kernel"].launches) == (1, 0)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        run_layer(layer, target, source, value, upstream)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert (launches["attention_bwd_protos_kernel"].launches, launches["attention_bwd_rows_kernel"].launches) == (2, 1)


@requires_triton
def test_noncontiguous_target(backend):
    backend("triton")
    layer, target, source, value, upstream = make_problem(2, 16, 32, 2, 32, 37, 64, torch.float32, False)
    strided = target.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not strided.is_contiguous()
    out, grads = run_layer(layer, strided, source, value, upstream)
    oracle_out, oracle_grads = run_reference(layer, strided, source, value, upstream, torch.float64)
    assert_close_to_oracle("out", out, oracle_out)
    assert_close_to_oracle("grad target", grads["target"], oracle_grads["target"])


def test_tf32_opt_in_is_close_and_runs_sdpa_on_a_gpu(backend):
    """allow_tf32 on a GPU sends fp32 to the eager path (PyTorch's SDPA runs fp32 on tensor cores;
    the kernels are IEEE-only): automatic dispatch takes it, and the result is TF32-close."""
    layer, target, source, value, upstream = make_problem(2, 16, 16, 2, 32, 37, 64, torch.float32, True)
    layer.allow_tf32 = True
    with dispatch.record_paths() as seen:
        out = layer(target, source, value).detach()
    expected = "eager" if DEVICE.type == "cuda" or TRITON_PROBLEM is not None else "triton"
    assert seen == {(OP, expected): 1}, seen
    oracle_out = run_reference(layer, target, source, value, upstream, torch.float64)[0]
    assert max_abs_err(out, oracle_out) <= 5e-3 * (1 + oracle_out.abs().max().item())
    with mocked_gpu((8, 0)):

        assert "allow_tf32" in kern.unsupported_reason(torch.float32, kern.core_form(16, 32), 37, False, CUDA0, allow_tf32=True)
        assert kern.unsupported_reason(torch.bfloat16, kern.core_form(16, 32), 37, False, CUDA0, allow_tf32=True) is None


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------


def dropout_problem(p=0.3):
    layer, target, source, value, upstream = make_problem(2, 24, 16, 2, 32, 37, 64, torch.float32, True)
    layer.dropout.p = p
    return layer.train(), target, source, value, upstream


@requires_triton
def test_dropout_same_seed_is_bit_identical(backend):
    backend("triton")
    layer, target, source, value, upstream = dropout_problem()
    torch.manual_seed(123)
    out_a, grads_a = run_layer(layer, target, source, value, upstream)
    torch.manual_seed(123)
    out_b, grads_b = run_layer(layer, target, source, value, upstream)
    out_c, _ = run_layer(layer, target, source, value, upstream)
    assert torch.equal(out_a, out_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    assert not torch.equal(out_a, out_c), "a new seed must draw a new mask"


@requires_triton
def test_dropout_forward_and_backward_use_the_kernel_mask(backend):
    """Replays the kernels' own mask (materialized by the debug kernel for the seed the layer draws)
    in the float64 oracle: output and every gradient must match, so both passes used that mask."""

    backend("triton")
    p = 0.3
    layer, target, source, value, upstream = dropout_problem(p)
    batch, seq = target.shape[:2]
    torch.manual_seed(7)
    seed = int(draw_seed_tensor(p, DEVICE).item())
    keep = kern.dropout_keep_mask(batch * seq, source.shape[0], layer.n_heads, p, seed, DEVICE)  # [H, R, S]
    mask = keep.view(layer.n_heads, batch, seq, -1).permute(1, 0, 2, 3)  # [B', H, L, S]
    assert 0.5 < keep.float().mean().item() < 0.9

    torch.manual_seed(7)
    out, grads = run_layer(layer, target, source, value, upstream)
    oracle_out, oracle_grads = run_reference(layer, target, source, value, upstream, torch.float64, mask=mask)
    assert_close_to_oracle("out", out, oracle_out)
    for name, grad in grads.items():
        assert_close_to_oracle(f"grad {name}", grad, oracle_grads[name])


@requires_triton
def test_dropout_kept_fraction_and_independence():

    p = 0.3
    keep = kern.dropout_keep_mask(256, 1000, 4, p, seed=2024, device=DEVICE).float()  # [H, R, S], 1M draws
    assert abs(keep.mean().item() - (1 - p)) < 0.01
    # streams of different heads, rows and prototypes must not repeat each other
    for a, b in ((keep[0], keep[1]), (keep[:, :128], keep[:, 128:]), (keep[..., :500], keep[..., 500:])):
        disagree = (a != b).float().mean().item()
        assert abs(disagree - 2 * p * (1 - p)) < 0.01


def test_config_table_is_complete_and_consistent():

    configs = bench_module("aot_configs").attention_configs()
    names = [c["name"] for c in configs]
    assert len(names) == len(set(names))
    for cfg in configs:
        assert set(cfg["signature"]) == set(cfg["fn"].arg_names), cfg["name"]
        assert {n for n, t in cfg["signature"].items() if t == "constexpr"} == set(cfg["constexprs"])
        assert len(cfg["archs"]) == 1 and cfg["archs"][0] in tiles.ARCHS, cfg["name"]  # tiles per generation
        config = cfg["config"]
        assert (config.data_dtype, config.dot_dtype, config.input_precision) in tiles.DOT_PATHS[config.arch] \
            or config.role in ("dropout_mask",)
    # every (head width, d_model) a layer can have, on every generation: the table's entry, or None
    # exactly where that generation runs the shape eager (Turing: bf16, fp32 and heads wider than 32;
    # fp32 everywhere: the standard form's 64- and 128-wide logits)
    table = set(tiles.CONFIG_TABLE.values())
    for capability, arch in (((7, 5), 75), ((8, 0), 80), ((8, 9), 80), ((9, 0), 90), ((10, 0), 90)):
        with mocked_gpu(capability):
            for role in ("fwd", "bwd_protos", "bwd_rows", "bwd_delta"):
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    for head_dim, d_model in ((16, 8), (24, 16), (32, 32), (48, 40), (64, 16), (100, 64),
                                              (128, 32), (128, 100), (32, 48), (16, 200)):
                        for has_dropout in (False, True):
                            cfg = tiles.select_config(role, dtype, core_form(d_model, head_dim), has_dropout, CUDA0)
                            tiled = role != "bwd_delta"  # delta has no E or D tile
                            too_wide = tiled and tiles.block_e_for(head_dim) > 32
                            fma_too_wide = tiled and dtype == torch.float32 and kern.core_form(d_model, head_dim).block_d > 32
                            reason = kern.unsupported_reason(dtype, kern.core_form(d_model, head_dim), 37, has_dropout, CUDA0)
                            if arch == 75 and (dtype != torch.float16 or too_wide):
                                assert cfg is None  # Turing: fp16 heads up to 32 wide only
                                assert "Turing (sm_75) runs eager" in reason, reason
                                continue
                            if fma_too_wide:
                                assert cfg is None and "-wide logit dots" in reason and reason.startswith("float32"), (cfg, reason)
                                continue
                            assert cfg in table and cfg.arch == arch, (capability, role, dtype, head_dim, cfg)
                            if role in ("fwd", "bwd_protos", "bwd_rows"):
                                assert cfg.block_e == tiles.block_e_for(head_dim)
                                assert cfg.block_d == kern.core_form(d_model, head_dim).block_d <= cfg.block_e


CUDA0 = torch.device("cuda", 0)


@contextlib.contextmanager
def mocked_gpu(capability):
    """select_config as it runs on a CUDA device of this compute capability (no GPU needed)."""

    tiles.forget_chosen_configs()  # select_config's memo: its choices for another capability
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tiles, "device_capability", lambda device: capability)
            patch.setattr(tiles, "interpreting", lambda: False)
            patch.setattr(attention_form, "interpreting", lambda: False)
            yield
    finally:
        tiles.forget_chosen_configs()


def test_each_gpu_generation_gets_its_own_tiles():
    """sm_90 and sm_80 entries are separate data: Hopper tiles are chosen for Hopper alone, and an
    sm_86 or sm_89 device takes the sm_80 ones."""

    chosen = {}
    for capability in ((8, 0), (8, 6), (9, 0)):
        with mocked_gpu(capability):
            for role in ("fwd", "bwd_protos", "bwd_rows"):
                for head_dim in (32, 128):
                    cfg = tiles.select_config(role, torch.bfloat16, core_form(32, head_dim), False, CUDA0)
                    chosen[capability, role, head_dim] = cfg
                    assert cfg.arch == (90 if capability == (9, 0) else 80)
    assert all(chosen[(8, 0), r, e] == chosen[(8, 6), r, e] for r in ("fwd", "bwd_protos") for e in (32, 128))
    assert any(chosen[(8, 0), r, e].tile != chosen[(9, 0), r, e].tile for r in ("fwd", "bwd_protos") for e in (32, 128))


@requires_triton
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter's stand-in for bf16 MMA; a GPU runs the real one")
def test_interpreter_rounds_bf16_dot_operands_like_the_gpu():
    """Under the interpreter bf16 dots run on fp32 operands; the kernels then round the operands
    they compute (P, dZ) to bf16 themselves, nearest-even like a GPU's cast, so the CPU tests
    measure the tensor-core path's rounding. Proven here: the rounding helper equals torch's
    fp32 -> bf16 cast bit for bit (ties both ways, subnormals, overflow to inf, inf, NaN), and
    exactly the bf16 launches turn it on."""
    import triton
    import triton.language as tl


    @triton.jit
    def round_through_helper(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, dot_operand(x, tl.float32, True), mask=offs < n)

    bits = torch.tensor([
        0x3F808000, 0x3F818000,  # halfway between two bf16 values: to the even one, down then up
        0x3F808001, 0x3F807FFF,  # just above / below halfway
        0x00008000, 0x00018000, 0x807F8000,  # subnormal ties, and a negative one rounding up in magnitude
        0x7F7FFFFF, 0x7F7F7FFF,  # the largest float rounds to inf; just below halfway stays finite
        0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,  # inf, -inf, NaN, a NaN whose payload is low bits
        0x00000000, 0x80000000,
    ], dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([bits, torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,))])
    y = torch.empty_like(x)
    round_through_helper[(1,)](x, y, x.numel(), BLOCK=1024)
    expected = x.to(torch.bfloat16).float()
    assert torch.equal(y.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(y[keep].view(torch.int32), expected[keep].view(torch.int32))

    for dtype, rounds in ((torch.bfloat16, True), (torch.float16, False), (torch.float32, False)):
        for role in ("fwd", "bwd_protos", "bwd_rows"):
            cfg = tiles.select_config(role, dtype, core_form(16, 32), False, DEVICE)
            assert tiles.launch_params(cfg)["ROUND_TO_BF16"] is rounds, (role, dtype)
            assert cfg.constexprs()["ROUND_TO_BF16"] is False  # what a GPU build compiles


@requires_triton
@pytest.mark.skipif(DEVICE.type != "cpu", reason="on a GPU the sm_90 tiles run natively in the bf16 tests")
@pytest.mark.parametrize("block_e", [32, 128])
def test_hopper_block_shapes_match_the_oracle(block_e):
    """The sm_90 bf16 tiles' block shapes (more prototypes per block than S = 37, so one partial
    block; 64-row warpgroup blocks) run here through the fp32 configuration's keys: the interpreter
    cannot run bf16 dots, and the block shapes are what the masks must handle."""

    with mocked_gpu((9, 0)):
        overrides = {}
        for role in ("fwd", "bwd_protos", "bwd_rows"):
            hopper = tiles.select_config(role, torch.bfloat16, core_form(16, block_e), False, CUDA0)
            overrides[(role, "fma", hopper.block_d, block_e, False)] = hopper.tile
    torch.manual_seed(0)
    layer = ReprogrammingLayer(16, 2, d_keys=block_e, d_llm=24, attention_dropout=0.0).to(DEVICE)
    target = torch.randn(3, 29, 16, device=DEVICE, requires_grad=True)
    protos = torch.randn(37, 24, device=DEVICE, requires_grad=True)
    for deterministic in (False, True):
        layer.deterministic = deterministic
        target.grad = protos.grad = None
        with tile_overrides.override_tiles(overrides), dispatch.record_paths() as paths:
            for (role, _, _, _, _), tile in overrides.items():
                assert tiles.select_config(role, torch.float32, core_form(16, block_e), False, DEVICE).tile == tile
            out = layer(target, protos, protos)
            out.square().sum().backward()
        assert paths == {("reprogramming_attention", "triton"): 1}
        params64 = [p.detach().double() for p in layer.parameters()]
        t64, p64 = target.detach().double().requires_grad_(True), protos.detach().double().requires_grad_(True)
        w = dict(zip([n for n, _ in layer.named_parameters()], params64))
        ref = reprogramming_reference(t64, p64, p64, w["query_projection.weight"], w["query_projection.bias"],
                                      w["key_projection.weight"], w["key_projection.bias"],
                                      w["value_projection.weight"], w["value_projection.bias"],
                                      w["out_projection.weight"], w["out_projection.bias"], 2)
        ref.square().sum().backward()
        assert_close_to_oracle("out", out, ref)
        assert_close_to_oracle("d target", target.grad, t64.grad)
        assert_close_to_oracle("d prototypes", protos.grad, p64.grad)


def test_philox_counters_fit_int32():

    for protos in (1, 37, 1000, 50_000, 2**20):
        rows = tiles.rows_per_philox_group(protos)
        assert rows % tiles.MAX_BLOCK_R == 0 and rows >= tiles.MAX_BLOCK_R
        # the largest counter any lane computes, padding lanes included
        assert (rows - 1) * protos + protos + tiles.MAX_BLOCK_R <= 2**31 - 1
    assert kern.unsupported_reason(torch.float32, kern.core_form(16, 32), 2**25, has_dropout=True) is not None


# ---------------------------------------------------------------------------------------------
# eager fallback
# ---------------------------------------------------------------------------------------------


def test_sdpa_fold_matches_reference():
    torch.manual_seed(0)
    Bp, L, DM, H, E, S, DL = 3, 5, 8, 2, 4, 7, 6
    f64 = dict(dtype=torch.float64)
    target, source, value = torch.randn(Bp, L, DM, **f64), torch.randn(S, DL, **f64), torch.randn(S, DL, **f64)
    weights = [torch.randn(H * E, DM, **f64), torch.randn(H * E, **f64), torch.randn(H * E, DL, **f64),
               torch.randn(H * E, **f64), torch.randn(H * E, DL, **f64), torch.randn(H * E, **f64),
               torch.randn(DL, H * E, **f64), torch.randn(DL, **f64)]
    expected = reprogramming_reference(target, source, value, *weights, H)
    got = reprogramming_sdpa_fold(target, source, value, *weights, H)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
    wq, bq, wk, bk, wv, bv, wo, bo = weights
    precomputed = (source @ wk.T + bk, value @ wv.T + bv)
    got = reprogramming_sdpa_fold(target, source, value, *weights, H, key_value=precomputed)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False], ids=["source-is-value", "separate"])
def test_gradcheck_eager_float64(shared, backend):
    backend("auto")  # float64 has no kernel: the op must fall back, and the fallback must be right
    torch.manual_seed(0)
    layer = ReprogrammingLayer(4, 2, d_keys=3, d_llm=5, attention_dropout=0.0).double().to(DEVICE)
    target = torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    source = torch.randn(6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    value = source if shared else torch.randn(6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def fn(target, source, value, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (target, source, value))

    inputs = (target, source, source if shared else value) + params
    with dispatch.record_paths() as seen:
        assert torch.autograd.gradcheck(fn, inputs)
    assert seen[(OP, "eager")] > 0 and seen[(OP, "triton")] == 0


def test_forced_eager_backend(backend):
    backend("eager")
    layer, target, source, value, upstream = make_problem(2, 8, 16, 2, 16, 11, 24, torch.float32, True)
    with dispatch.record_paths() as seen:
        out, grads = run_layer(layer, target, source, value, upstream)
    assert seen == {(OP, "eager"): 1}
    oracle_out, oracle_grads = run_reference(layer, target, source, value, upstream, torch.float64)
    assert_close_to_oracle("out", out, oracle_out)
    for name, grad in grads.items():
        assert_close_to_oracle(f"grad {name}", grad, oracle_grads[name])


def test_eager_training_dropout_uses_reference_semantics(backend):
    backend("eager")
    layer, target, source, value, _ = make_problem(2, 8, 16, 2, 16, 11, 24, torch.float32, True)
    layer.dropout.p = 0.5
    layer.train()
    torch.manual_seed(3)
    out_a = layer(target, source, value)
    torch.manual_seed(3)
    out_b = layer(target, source, value)
    assert torch.equal(out_a, out_b)
    layer.eval()
    assert not torch.allclose(out_a, layer(target, source, value))


@pytest.mark.parametrize("d_keys", [8, 136], ids=["e8", "e136"])
def test_unsupported_head_width_falls_back(d_keys, backend):
    layer, target, source, value, _ = make_problem(1, 4, 16, 2, d_keys, 9, 24, torch.float32, True)
    backend("auto")
    with dispatch.record_paths() as seen:
        layer(target, source, value)
    assert seen == {(OP, "eager"): 1}
    if TRITON_PROBLEM is None:
        backend("triton")
        with pytest.raises(RuntimeError, match="d_keys"):
            layer(target, source, value)


# ---------------------------------------------------------------------------------------------
# module contract
# ---------------------------------------------------------------------------------------------


def test_state_dict_round_trip_with_original():
    torch.manual_seed(0)
    original = OriginalReprogrammingLayer(16, 4, d_keys=16, d_llm=48, attention_dropout=0.1).to(DEVICE).eval()
    ours = ReprogrammingLayer(16, 4, d_keys=16, d_llm=48, attention_dropout=0.1).to(DEVICE).eval()
    assert list(ours.state_dict()) == list(original.state_dict())
    ours.load_state_dict(original.state_dict(), strict=True)
    original.load_state_dict(ours.state_dict(), strict=True)
    target, source = torch.randn(2, 8, 16, device=DEVICE), torch.randn(13, 48, device=DEVICE)
    with torch.no_grad():
        expected = original(target, source, source)
        got = ours(target, source, source)
    assert torch.allclose(got, expected, atol=1e-4 * (1 + expected.abs().max().item()), rtol=0)


@pytest.mark.parametrize("path", ["triton", "eager"])
def test_parametrized_weights_are_the_ones_used(path, monkeypatch):
    """The layer reads its projections from the modules' dicts (projection_tensors): a weight that
    lives elsewhere, as under torch.nn.utils.parametrize, must still be the one the math uses, with
    its gradient reaching the parametrization's own parameter."""
    if path == "triton" and TRITON_PROBLEM:
        pytest.skip(TRITON_PROBLEM)
    monkeypatch.setenv(dispatch.BACKEND_ENV, path)
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    layer = ReprogrammingLayer(16, 2, d_keys=16, d_llm=24, attention_dropout=0.0).to(DEVICE)
    plain = ReprogrammingLayer(16, 2, d_keys=16, d_llm=24, attention_dropout=0.0).to(DEVICE)
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        plain.key_projection.weight.mul_(2)
        plain.out_projection.bias.mul_(2)
    parametrize.register_parametrization(layer.key_projection, "weight", Doubled())
    parametrize.register_parametrization(layer.out_projection, "bias", Doubled())
    target = torch.randn(2, 5, 16, device=DEVICE)
    protos = torch.randn(37, 24, device=DEVICE)
    out = layer(target, protos, protos)
    torch.testing.assert_close(out, plain(target, protos, protos), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    original = layer.key_projection.parametrizations.weight.original
    assert original.grad is not None and original.grad.abs().sum() > 0


def test_prototype_side_reuse_hit_and_invalidation():
    layer, target, source, _, _ = make_problem(2, 8, 16, 2, 16, 11, 24, torch.float32, True)
    layer.eval()
    source = source.detach()
    with reuse_prototypes() as reuse:
        with torch.no_grad():
            first = layer(target, source, source)
            assert (reuse.hits, reuse.misses) == (0, 1)
            again = layer(target, source, source)
            assert (reuse.hits, reuse.misses) == (1, 1)
            assert torch.equal(first, again)

            layer.key_projection.weight.add_(0.25)  # in place: same tensor, new version
            changed = layer(target, source, source)
            assert reuse.misses == 2
            expected = reprogramming_sdpa_fold(target.double(), source.double(), source.double(),
                                               *(p.double() for p in layer.parameters()), layer.n_heads)
            assert max_abs_err(changed, expected) <= 1e-4 * (1 + expected.abs().max().item())

            source.mul_(2.0)
            layer(target, source, source)
            assert reuse.misses == 3
            layer(target, source.clone(), source.clone())  # new tensors: never trusted by address
            assert reuse.misses == 4
        # with autograd on, K/V must be part of the graph: nothing reused
        layer(target, source, source).sum().backward()
        assert (reuse.hits, reuse.misses) == (1, 4)


def test_autocast_computes_in_autocast_dtype():
    layer, target, source, value, _ = make_problem(2, 8, 16, 2, 16, 11, 24, torch.float32, False)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = layer(target, source, value)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.query_projection.weight.grad.dtype == torch.float32
    assert target.grad.dtype == torch.float32
    bf16_copy = ReprogrammingLayer(16, 2, d_keys=16, d_llm=24, attention_dropout=0.0).to(DEVICE, torch.bfloat16)
    bf16_copy.load_state_dict(layer.state_dict())
    expected = bf16_copy(target.bfloat16(), source.bfloat16(), value.bfloat16())
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=0, n_heads=2, d_llm=8), "d_model"),
    (dict(d_model=8, n_heads=-1, d_llm=8), "n_heads"),
    (dict(d_model=8, n_heads=2, d_keys=-1, d_llm=8), "d_keys"),
    (dict(d_model=8, n_heads=2), "d_llm"),
    (dict(d_model=8, n_heads=2, d_llm=8, attention_dropout=1.5), "attention_dropout"),
    (dict(d_model=8, n_heads=2, d_llm=8, attention_dropout=-0.1), "attention_dropout"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ReprogrammingLayer(**kwargs)


def test_forward_errors():
    layer = ReprogrammingLayer(8, 2, d_keys=16, d_llm=12).to(DEVICE)
    target, source = torch.randn(2, 3, 8, device=DEVICE), torch.randn(5, 12, device=DEVICE)
    cases = [
        ((target[0], source, source), "target"),
        ((torch.randn(2, 3, 7, device=DEVICE), source, source), "d_model=8"),
        ((target, torch.randn(5, 11, device=DEVICE), source), "source must have d_llm=12"),
        ((target, source, torch.randn(5, 13, device=DEVICE)), "value must have d_llm=12"),
        ((target, source, torch.randn(4, 12, device=DEVICE)), "value must have as many rows"),
        ((target, source, source[None]), "value"),
        ((target.double(), source, source), "target has dtype torch.float64"),
        ((target, source.half(), source.half()), "source has dtype"),
        ((target.long(), source, source), "target must be a floating tensor"),
        ((target, source[:0], source[:0]), "source must have at least one"),
        (("target", source, source), "target must be a torch.Tensor"),
    ]
    for args, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            layer(*args)


# ---------------------------------------------------------------------------------------------
# the softmax's exponentials: the polynomial share and the rescale threshold
# ---------------------------------------------------------------------------------------------


def test_softmax_override_nests_and_restores_on_exit():
    """Nested override_softmax blocks: the innermost setting wins, each exit brings back the one
    around it (the memoized configurations included), also when the block raises."""

    def softmax():
        cfg = tiles.select_config("fwd", torch.bfloat16, core_form(16, 32), False, DEVICE)
        return cfg.poly_eighths, cfg.rescale_threshold

    shipped = softmax()
    with tile_overrides.override_softmax(2, 8.0):
        assert softmax() == (2, 8.0)
        with tile_overrides.override_softmax(8, 0.0):
            assert softmax() == (8, 0.0)
        assert softmax() == (2, 8.0)
    assert softmax() == shipped
    with pytest.raises(RuntimeError, match="inside"):
        with tile_overrides.override_softmax(4, 0.0):
            raise RuntimeError("inside")
    assert softmax() == shipped


@requires_triton
def test_polynomial_exp2_error_over_the_softmax_range():
    """exp2_poly against float64 2^x: relative error <= 1.02e-4 (the cubic's minimax bound, 38x below
    bf16's 2^-8 rounding) wherever 2^x is a normal fp32, up to the forward's rescale threshold; exactly
    +0.0 at and below the clamp (-127, -inf: masked prototypes); below 2^-125 absolute in between."""
    import triton
    import triton.language as tl

    @triton.jit
    def poly_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, exp2_poly(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)

    g = torch.Generator().manual_seed(0)
    normal = torch.cat([-126 * torch.rand(200_000, generator=g), 8 * torch.rand(2_000, generator=g),
                        torch.tensor([0.0, -0.5, 0.5, -1.0, -125.5, -126.0, 8.0, -1e-7, 1e-7]),
                        -torch.arange(0, 127, dtype=torch.float32)])  # every integer: n with f = 0
    tiny = -126.0 - torch.rand(1000, generator=g)  # (-127, -126]: 2^x below the smallest normal
    zero = torch.tensor([-127.0, -127.5, -200.0, -1e30, float("-inf")])
    x = torch.cat([normal, tiny, zero]).to(DEVICE)
    y = torch.empty_like(x)
    poly_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    exact = torch.exp2(x.double())
    n_normal, n_tiny = normal.numel(), tiny.numel()
    rel = ((y[:n_normal].double() - exact[:n_normal]) / exact[:n_normal]).abs()
    assert rel.max().item() <= 1.03e-4, rel.max().item()
    assert rel.max().item() < 2.0 ** -8 / 30  # far below what bf16 rounds P to anyway
    assert ((y[n_normal:n_normal + n_tiny].double() - exact[n_normal:n_normal + n_tiny]).abs() < 2.0 ** -125).all()
    assert torch.equal(y[-zero.numel():], torch.zeros_like(zero, device=DEVICE))


SOFTMAX_SETTINGS = [(0, 0.0), (0, 8.0), (2, 0.0), (2, 8.0), (4, 8.0), (8, 0.0), (8, 8.0)]


@requires_triton
@pytest.mark.parametrize("mode", BACKWARD_MODES)
@pytest.mark.parametrize("eighths,threshold", SOFTMAX_SETTINGS, ids=[f"poly{e}of8-rescale{t:g}" for e, t in SOFTMAX_SETTINGS])
def test_exponential_share_and_rescale_threshold_match_oracle(eighths, threshold, mode, backend):
    """Shares 0, 1/4, 1/2 and all of the exponentials on the polynomial, rescale thresholds 0 and 8,
    both backward modes: bf16 against the float64 oracle by docs/spec.md §4. S = 1000 spans 8 groups of 128
    prototypes, so a share below 1 mixes the two exponentials in every row (and in the forward's and
    both backward kernels' blocks: they must give each element the same one)."""

    backend("triton")
    shape = ("softmax-split", 2, 16, 16, 2, 32, 1000, 48, True)
    with tile_overrides.override_softmax(eighths, threshold):
        cfg = tiles.select_config("fwd", torch.bfloat16, core_form(16, 32), False, DEVICE)
        assert (cfg.poly_eighths, cfg.rescale_threshold) == (eighths, threshold)
        assert tiles.select_config("bwd_protos", torch.bfloat16, core_form(16, 32), False, DEVICE).poly_eighths == eighths
        assert tiles.select_config("fwd", torch.float32, core_form(16, 32), False, DEVICE).poly_eighths == 0  # fp32: exact
        check_fused_against_oracle(shape, torch.bfloat16, seed=1, deterministic=mode == "deterministic")


@requires_triton
def test_polynomial_share_really_changes_the_exponentials(backend):
    """The share is live: the all-polynomial forward differs from the all-MUFU one (by far less than
    bf16's rounding), and in fp32 the override leaves the exact path alone (bit-identical)."""

    backend("triton")
    for dtype, differs in ((torch.bfloat16, True), (torch.float32, False)):
        layer, target, source, value, _ = make_problem(2, 16, 16, 2, 32, 300, 48, dtype, True)
        with torch.no_grad(), tile_overrides.override_softmax(0, 0.0):
            exact = layer(target, source, value).float()
        with torch.no_grad(), tile_overrides.override_softmax(8, 0.0):
            poly = layer(target, source, value).float()
        assert (not torch.equal(exact, poly)) == differs, dtype
        assert (exact - poly).abs().max().item() <= 2.0 ** -8 * (1 + exact.abs().max().item())


@requires_triton
@pytest.mark.parametrize("logit", [1e2, 1e4], ids=["1e2", "1e4"])
def test_rescale_threshold_keeps_huge_logits_finite_and_one_hot(logit, backend):
    """With a threshold the reference maximum lags a row's maximum by up to 2^8: the unnormalized P
    is then bounded by 2^8 (row sums by S·2^8, exact as bf16 MMA operands), so logits near ±1e4 must
    still give the oracle's one-hot output, no inf or NaN, and finite gradients."""
    from test_extremes import huge_logit_problem

    backend("triton")
    layer, target, source, upstream = huge_logit_problem(logit)
    layer, target, source, upstream = (layer.to(torch.bfloat16), target.detach().bfloat16().requires_grad_(),
                                       source.detach().bfloat16().requires_grad_(), upstream.bfloat16())
    with tile_overrides.override_softmax(2, 8.0):
        out, grads = run_layer(layer, target, source, source, upstream)
    oracle_out, _ = run_reference(layer, target, source, source, upstream, torch.float64)
    eager_out, _ = run_reference(layer, target, source, source, upstream, torch.bfloat16)
    assert torch.isfinite(out).all()
    assert_close_to_oracle("out", out, oracle_out, eager_out)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
