"""Property-based equivalence of the patch embedding against the float64 oracle (docs/spec.md §4).

Random shapes, strides (contiguous, Time-LLM's permuted view, strided slices) and dtypes go
through the Triton path (interpreter on CPU) and the eager fallback. Shrunk counterexamples that
hypothesis found are pinned below as explicit regression examples.
"""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import DEVICE, assert_close_to_oracle, requires_triton
from test_patch_embedding import eager_same_dtype, oracle
from timellm_fast import dispatch, patch_embedding

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ("contiguous", "permuted", "sliced")


@st.composite
def patch_problems(draw):
    patch_len = draw(st.integers(1, 20))
    stride = draw(st.integers(1, 12))
    T = draw(st.integers(patch_len, 80))
    return dict(
        B=draw(st.integers(1, 3)), N=draw(st.integers(1, 4)), T=T, patch_len=patch_len,
        stride=stride, d_model=draw(st.integers(1, 40)), dtype=draw(st.sampled_from(sorted(DTYPES))),
        layout=draw(st.sampled_from(LAYOUTS)), seed=draw(st.integers(0, 2**16)),
    )


def make_input(B, N, T, layout, dtype, gen):
    if layout == "contiguous":
        x = torch.randn(B, N, T, generator=gen)
    elif layout == "permuted":
        x = torch.randn(B, T, N, generator=gen).permute(0, 2, 1)
    else:  # every other step of a longer series, with the variables axis permuted too
        x = torch.randn(B, 2 * T, N, generator=gen).permute(0, 2, 1)[..., ::2]
    return x.to(DEVICE, dtype)


def check_problem(p):
    gen = torch.Generator().manual_seed(p["seed"])
    dtype = DTYPES[p["dtype"]]
    x = make_input(p["B"], p["N"], p["T"], p["layout"], dtype, gen)
    w = (torch.randn(p["d_model"], p["patch_len"], 3, generator=gen) / (3 * p["patch_len"]) ** 0.5)
    w = w.to(DEVICE, dtype)
    xg = x.detach().clone().requires_grad_(True)
    wg = w.detach().clone().requires_grad_(True)
    y = patch_embedding(xg, wg, p["patch_len"], p["stride"])
    grad = torch.randn(y.shape, generator=gen).to(DEVICE, y.dtype)
    y.backward(grad)
    y64, dx64, dw64 = oracle(x, w, p["patch_len"], p["stride"], grad)
    base = (eager_same_dtype(x, w, p["patch_len"], p["stride"], grad)
            if dtype != torch.float32 else (None,) * 3)
    assert_close_to_oracle("y", y, y64, base[0])
    assert_close_to_oracle("dx", xg.grad, dx64, base[1])
    assert_close_to_oracle("dW", wg.grad, dw64, base[2])


SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@requires_triton
@SETTINGS
@given(patch_problems())
@example(dict(B=1, N=1, T=1, patch_len=1, stride=1, d_model=1, dtype="fp32", layout="contiguous", seed=0))
@example(dict(B=1, N=1, T=20, patch_len=20, stride=12, d_model=17, dtype="fp16", layout="sliced", seed=1))
# beyond the windowed tiles: the forward's gather (patch_len > 32), dx by d(patches) + fold (stride > 16)
@example(dict(B=2, N=2, T=70, patch_len=40, stride=7, d_model=12, dtype="bf16", layout="permuted", seed=3))
@example(dict(B=1, N=3, T=64, patch_len=24, stride=20, d_model=9, dtype="fp32", layout="sliced", seed=4))
def test_triton_path_matches_oracle(p):
    with dispatch.record_paths() as seen:
        check_problem(p)
    assert seen[("patch_embedding", "triton")] == 1


@settings(max_examples=100, deadline=None, derandomize=True)
@given(patch_problems())
def test_eager_path_matches_oracle(p):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dispatch.BACKEND_ENV, "eager")
        with dispatch.record_paths() as seen:
            check_problem(p)
    assert seen[("patch_embedding", "eager")] == 1
