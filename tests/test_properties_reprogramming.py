"""Property-based equivalence of the ReprogrammingLayer against the float64 oracle (docs/spec.md §4).

Random B', L, d_model, n_heads, d_keys, S (including values that are not multiples of any block
size, and S = 1), d_llm, dtypes (fp32 / bf16 / fp16), target layouts (contiguous, Time-LLM-like
permuted view, strided slice), source layouts and source-is-value vs separate tensors go through
the Triton path (interpreter on CPU) and the eager fallback; output and every gradient (target,
source, value and all eight weights) are compared with the oracle. Head widths outside the
kernel's 16..128 must take the eager path even in automatic dispatch, and the test asserts which
path ran. Shrunk counterexamples that hypothesis found are pinned below as explicit examples.
"""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import DEVICE, assert_close_to_oracle, max_abs_err, requires_triton
from test_reprogramming import run_layer, run_reference
from timellm_fast import dispatch
from timellm_fast.reprogramming import ReprogrammingLayer

OP = "reprogramming_attention"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_LAYOUTS = ("contiguous", "permuted", "sliced")
SOURCE_LAYOUTS = ("contiguous", "transposed")
KERNEL_HEAD_DIMS = (16, 128)  # kernels/attention_tiles.py MIN_HEAD_DIM, MAX_HEAD_DIM
#: Half precision (docs/spec.md §4: no worse than 2x the eager layer's error in the same dtype), plus a floor
#: of one unit roundoff of the result's scale, u·(1 + max|oracle|) (u = 2^-8 bf16, 2^-11 fp16), where
#: tests/helpers.py uses 1e-6·scale. Why: on tiny problems the 2x bar compares two rounding-noise
#: patterns over a handful of short, cancelling dot products, and hypothesis shrinks straight to them.
#: Found (all at B'·L <= 4, S <= 16 or d_llm <= 3; random problems of ordinary size never hit them):
#:   * bf16 B'·L = 1, S = 2, d_llm = 2: fused d value 5.1e-4 vs eager 6.1e-5 (ratio 8). The fused dV
#:     matches the float64 dV of its own bf16 K/V/dO to 1e-8; the excess is the rounding of K, V and
#:     dV to bf16, which the tensor-core path cannot avoid, amplified by d value = dV·Wv cancelling.
#:     The eager error is small by structure: with one row and A rounding to exactly 0.5 its dV rows
#:     are exact multiples of dO.
#:   * bf16 d_llm = 1, S = 175: fused d source 2.3e-3 vs eager 6.3e-4; float64 math on the
#:     bf16-rounded K and V alone reproduces 1.9e-3 of it.
#:   * eager fallback, d key_projection.bias (exactly 0: bk shifts all scores of a row equally): SDPA
#:     rounds each dK element once and their sum is noise up to 2.7x the literal eager's (1 in 5 random
#:     half problems), 1.3e-3 vs 1e-6 at E = 1.
#:   * found by the first clean CI run (same tiny regime): bf16 d_llm = 1, S = 17, E = 3 (eager
#:     fallback), d key_projection.bias 1.2e-2 = 3u at scale 1; fp16 d_llm = 3, S = 151, eager
#:     fallback, d target 9.5e-4 = 1.7u·scale. Both are eager-vs-eager differences.
#: Every one is below two ulps (4 unit roundoffs) of its scale; a real defect (wrong row, head,
#: block or mask) is off by O(scale). fp32 keeps docs/spec.md §4's 1e-4·scale bar with no floor.
def assert_half_close(what, got, oracle, eager):
    assert got.shape == oracle.shape and torch.isfinite(got).all(), what
    scale = 1.0 + oracle.abs().max().item()
    err, eager_err = max_abs_err(got, oracle), max_abs_err(eager, oracle)
    unit_roundoff = torch.finfo(got.dtype).eps / 2
    tol = 2.0 * eager_err + 4.0 * unit_roundoff * scale
    assert err <= tol, f"{what}: max abs err {err:.3e} > 2x eager {got.dtype} error {eager_err:.3e} + 4u·scale"


@st.composite
def reprogramming_problems(draw):
    # mostly head widths the kernel takes; ~1 in 6 outside, which must fall back to eager
    d_keys = draw(st.one_of(st.integers(16, 128), st.integers(16, 128), st.integers(16, 128),
                            st.integers(16, 128), st.integers(16, 128),
                            st.integers(1, 15) | st.integers(129, 160)))
    dtype = draw(st.sampled_from(sorted(DTYPES)))

    return dict(
        B=draw(st.integers(1, 3)), L=draw(st.integers(1, 8)), d_model=draw(st.integers(8, 64)),
        n_heads=draw(st.integers(1, 4)), d_keys=d_keys, S=draw(st.integers(1, 300)),
        d_llm=draw(st.integers(1, 16)), dtype=dtype,
        target_layout=draw(st.sampled_from(TARGET_LAYOUTS)),
        source_layout=draw(st.sampled_from(SOURCE_LAYOUTS)), shared=draw(st.booleans()),
        sharpness=draw(st.sampled_from((0.5, 1.0, 4.0))), seed=draw(st.integers(0, 2**16)),
    )


def make_target(B, L, d_model, layout, dtype, gen):
    """target [B', L, d_model] in `dtype`; the view is taken after the cast (a cast of a
    non-dense view would make it contiguous)."""
    if layout == "contiguous":
        return torch.randn(B, L, d_model, generator=gen).to(DEVICE, dtype)
    if layout == "permuted":  # [L, B', d_model] storage seen as [B', L, d_model]
        return torch.randn(L, B, d_model, generator=gen).to(DEVICE, dtype).transpose(0, 1)
    return torch.randn(B, L, 2 * d_model, generator=gen).to(DEVICE, dtype)[..., ::2]  # every other feature


def make_source(S, d_llm, layout, dtype, gen):
    if layout == "contiguous":
        return torch.randn(S, d_llm, generator=gen).to(DEVICE, dtype)
    return torch.randn(d_llm, S, generator=gen).to(DEVICE, dtype).t()


def build(p):
    """(layer, target, source, value, upstream) in the problem's dtype, leaves requiring grad."""
    dtype = DTYPES[p["dtype"]]
    torch.manual_seed(p["seed"])
    layer = ReprogrammingLayer(p["d_model"], p["n_heads"], d_keys=p["d_keys"], d_llm=p["d_llm"],
                               attention_dropout=0.0).to(DEVICE, dtype)
    with torch.no_grad():  # a sharper softmax shows errors in P
        layer.query_projection.weight.mul_(p["sharpness"])
    gen = torch.Generator().manual_seed(p["seed"])
    target = make_target(p["B"], p["L"], p["d_model"], p["target_layout"], dtype, gen).requires_grad_()
    source = make_source(p["S"], p["d_llm"], p["source_layout"], dtype, gen).requires_grad_()
    value = source
    if not p["shared"]:
        value = make_source(p["S"], p["d_llm"], p["source_layout"], dtype, gen).requires_grad_()
    upstream = torch.randn(p["B"], p["L"], p["d_llm"], generator=gen).to(DEVICE, dtype)
    if p["target_layout"] == "sliced" or (p["target_layout"] == "permuted" and p["B"] > 1 and p["L"] > 1):
        assert not target.is_contiguous()
    return layer, target, source, value, upstream




def check_problem(p):
    dtype = DTYPES[p["dtype"]]
    layer, target, source, value, upstream = build(p)
    out, grads = run_layer(layer, target, source, value, upstream)
    assert out.dtype == dtype and out.shape == (p["B"], p["L"], p["d_llm"])
    oracle_out, oracle_grads = run_reference(layer, target, source, value, upstream, torch.float64)
    eager_out, eager_grads = None, {}
    if dtype != torch.float32:  # docs/spec.md §4: half results are judged against the eager layer's error
        eager_out, eager_grads = run_reference(layer, target, source, value, upstream, dtype)
    judge = assert_close_to_oracle if dtype == torch.float32 else assert_half_close
    judge("out", out, oracle_out, eager_out)
    expected = {"target", "source"} | ({"value"} if not p["shared"] else set())
    expected |= {name for name, _ in layer.named_parameters()}
    assert set(grads) == expected == set(oracle_grads)
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        judge(f"grad {name}", grad, oracle_grads[name], eager_grads.get(name))


def kernel_takes(p) -> bool:
    """The documented rule: head widths 16..128; fp32 only where its logit dots are at most 32 wide
    (d_model <= 32, or the standard form's d_keys <= 32)."""
    if not KERNEL_HEAD_DIMS[0] <= p["d_keys"] <= KERNEL_HEAD_DIMS[1]:
        return False
    return p["dtype"] != "fp32" or p["d_model"] <= 32 or p["d_keys"] <= 32


SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def problem(**overrides):
    p = dict(B=1, L=1, d_model=8, n_heads=1, d_keys=16, S=1, d_llm=1, dtype="fp32", target_layout="contiguous",
             source_layout="contiguous", shared=True, sharpness=1.0, seed=0)
    p.update(overrides)
    return p


@requires_triton
@settings(max_examples=130, **SETTINGS)
@given(reprogramming_problems())
@example(problem())  # the smallest problem: one row, one prototype, one output feature
@example(problem(S=2, d_llm=2, dtype="bf16", shared=False, sharpness=0.5))  # shrunk, see assert_half_close
@example(problem(S=2, d_llm=4, dtype="bf16", shared=False, source_layout="transposed", seed=6))  # idem
@example(problem(L=2, S=2, d_llm=4, dtype="bf16", shared=False, sharpness=0.5))  # idem, d target
@example(problem(L=4, S=16, d_llm=8, dtype="fp16", shared=False, sharpness=0.5))  # idem, d bk
@example(problem(B=3, L=6, d_model=51, d_keys=116, S=175, dtype="bf16", target_layout="sliced",
                 sharpness=4.0, seed=6410))  # idem, d source at d_llm = 1
@example(problem(L=4, d_keys=128, S=300, d_llm=8, n_heads=4, dtype="fp16", target_layout="sliced", shared=False))
@example(problem(L=4, d_keys=15, S=16, d_llm=8, dtype="bf16"))  # just below the kernel's range: eager
@example(problem(d_keys=129, S=17, target_layout="permuted"))  # just above: eager
@example(problem(L=3, d_model=53, d_keys=3, S=17, d_llm=1, dtype="bf16", shared=False, sharpness=4.0,
                 seed=353))  # found by CI, see assert_half_close
def test_auto_dispatch_matches_oracle(p):
    """Automatic dispatch: the kernel where it takes the head width, eager otherwise."""
    path = "triton" if kernel_takes(p) else "eager"
    with dispatch.record_paths() as seen:
        check_problem(p)
    assert seen == {(OP, path): 1}, seen


@settings(max_examples=100, **SETTINGS)
@given(reprogramming_problems())
@example(problem(L=4, d_keys=1, S=16, d_llm=8, dtype="bf16", shared=False, sharpness=0.5))  # shrunk, d bk
@example(problem(L=3, S=151, d_llm=3, dtype="fp16", source_layout="transposed", sharpness=4.0,
                 seed=3))  # found by CI, see assert_half_close
def test_eager_path_matches_oracle(p):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dispatch.BACKEND_ENV, "eager")
        with dispatch.record_paths() as seen:
            check_problem(p)
    assert seen == {(OP, "eager"): 1}, seen
