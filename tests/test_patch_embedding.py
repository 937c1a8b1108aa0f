"""PatchEmbedding: equivalence with the float64 oracle (docs/spec.md §4), dropout, state dict, errors.

On a CPU-only machine the Triton path runs in Triton's interpreter (see conftest.py). There,
bf16 tl.dot operands are computed in fp32 (triton-lang/triton#11584), so the bf16 tensor-core
path itself is proven only by a native GPU run of this file.
"""
import math

import pytest
import torch
import torch.nn as nn

from helpers import DEVICE, LaunchCounter, assert_close_to_oracle, bench_module, requires_triton, swap_kernel
from timellm_fast import PatchEmbedding, dispatch, patch_embedding
from timellm_fast.kernels import _environment
from timellm_fast.reference import num_patches, patch_embedding_reference
from timellm_original import PatchEmbedding as OriginalPatchEmbedding
from timellm_fast.kernels import patch_embedding_tiles as pe_tiles

tile_overrides = bench_module("tile_overrides")  # the tuners' hooks: other tiles


# (name, B, N, T, patch_len, stride, d_model): docs/spec.md §2 shapes with B·N reduced, plus awkward ones.
SHAPES = [
    ("explained-gpt2-folded", 2, 7, 512, 16, 8, 32),
    ("etth1-independent", 6, 1, 512, 16, 8, 32),
    ("weather-folded", 1, 21, 96, 16, 8, 32),
    ("ecl-traffic-independent", 5, 1, 512, 16, 8, 16),
    ("m4-patch1", 4, 1, 36, 1, 1, 8),
    ("ragged-T", 2, 3, 37, 16, 8, 8),  # (T - patch_len) % stride != 0
    ("stride-gt-patch", 2, 2, 50, 4, 6, 24),  # gaps between patches
    ("wide-d_model", 1, 3, 64, 12, 5, 40),  # two column blocks, one partial
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_series(B, N, T, dtype, contiguous=False, seed=0):
    """x: [B, N, T]; by default the permuted (non-contiguous) view Time-LLM passes."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(B, T, N, generator=g).to(DEVICE)
    x = data.permute(0, 2, 1)
    if contiguous:
        x = x.contiguous()
    return x.to(dtype)


def make_weight(d_model, patch_len, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_model, patch_len, 3, generator=g) / math.sqrt(3 * patch_len)
    return w.to(DEVICE, dtype)


def run_layer(x, w, patch_len, stride):
    """(y, dx, dw) of our op for a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = patch_embedding(x, w, patch_len, stride)
    g = torch.Generator().manual_seed(7)
    grad = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
    y.backward(grad)
    return y, x.grad, w.grad, grad


def oracle(x, w, patch_len, stride, grad):
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y = patch_embedding_reference(x64, w64, patch_len, stride)
    y.backward(grad.double())
    return y, x64.grad, w64.grad


def eager_same_dtype(x, w, patch_len, stride, grad):
    """The original eager layer run entirely in x's dtype: the baseline bf16/fp16 is judged by."""
    layer = OriginalPatchEmbedding(w.shape[0], patch_len, stride, 0.0).to(DEVICE, x.dtype)
    with torch.no_grad():
        layer.value_embedding.tokenConv.weight.copy_(w)
    xe = x.detach().clone().requires_grad_(True)
    y, _ = layer(xe)
    y.backward(grad.to(y.dtype))
    return y, xe.grad, layer.value_embedding.tokenConv.weight.grad


def check_against_oracle(x, w, patch_len, stride):
    y, dx, dw, grad = run_layer(x, w, patch_len, stride)
    y64, dx64, dw64 = oracle(x, w, patch_len, stride, grad)
    B, N, T = x.shape
    assert y.shape == (B * N, num_patches(T, patch_len, stride), w.shape[0])
    assert y.dtype == w.dtype and dw.dtype == w.dtype and dx.dtype == x.dtype
    base = eager_same_dtype(x, w, patch_len, stride, grad) if x.dtype != torch.float32 else (None,) * 3
    assert_close_to_oracle("y", y, y64, base[0])
    assert_close_to_oracle("dx", dx, dx64, base[1])
    assert_close_to_oracle("dW", dw, dw64, base[2])


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_triton_matches_oracle(shape, dtype):
    _, B, N, T, patch_len, stride, d_model = shape
    x = make_series(B, N, T, dtype)
    w = make_weight(d_model, patch_len, dtype)
    with dispatch.record_paths() as seen:
        check_against_oracle(x, w, patch_len, stride)
    assert seen[("patch_embedding", "triton")] == 1 and seen[("patch_embedding", "eager")] == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[4:6], ids=lambda s: s[0])
def test_eager_fallback_matches_oracle(shape, dtype, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "eager")
    _, B, N, T, patch_len, stride, d_model = shape
    x = make_series(B, N, T, dtype)
    w = make_weight(d_model, patch_len, dtype)
    with dispatch.record_paths() as seen:
        check_against_oracle(x, w, patch_len, stride)
    assert seen[("patch_embedding", "eager")] == 1 and seen[("patch_embedding", "triton")] == 0


@requires_triton
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16)],
                         ids=["bf16-data-fp32-weight", "fp16-data-fp32-weight", "fp32-data-bf16-weight"])
def test_mixed_dtypes_compute_in_fp32(x_dtype, w_dtype):
    """Time-LLM casts the series to bf16 while the weight is fp32: eager raises, we convert on load."""
    x = make_series(3, 2, 64, x_dtype)
    w = make_weight(16, 16, w_dtype)
    y, dx, dw, grad = run_layer(x, w, 16, 8)
    y64, dx64, dw64 = oracle(x, w, 16, 8, grad)
    assert y.dtype == w_dtype and dx.dtype == x_dtype and dw.dtype == w_dtype
    if w_dtype == torch.float32:  # fp32 output: every operand was exact, so fp32 accuracy holds
        assert_close_to_oracle("y", y, y64)
        assert_close_to_oracle("dW", dw, dw64)
    else:  # bf16 output: one rounding of an fp32 result, no worse than eager bf16
        xe = x.to(w_dtype)
        base = eager_same_dtype(xe, w, 16, 8, grad)
        assert_close_to_oracle("y", y, y64, base[0])
        assert_close_to_oracle("dW", dw, dw64, base[2])


@requires_triton
def test_autocast_returns_autocast_dtype():
    x = make_series(2, 3, 64, torch.float32)
    w = make_weight(16, 16, torch.float32)
    autocast_dtype = torch.bfloat16
    with torch.autocast(DEVICE.type, dtype=autocast_dtype):
        y = patch_embedding(x, w, 16, 8)
    assert y.dtype == autocast_dtype
    y64 = patch_embedding_reference(x.double(), w.double(), 16, 8)
    # a single rounding of an fp32-accurate result to bf16
    assert (y.double() - y64).abs().max() <= 2 ** -8 * (1 + y64.abs().max())


@requires_triton
def test_non_contiguous_sliced_input():
    """A strided slice (every other step of a longer series) is read in place."""
    long = make_series(2, 3, 130, torch.float32, contiguous=True)
    x = long[..., ::2]
    assert not x.is_contiguous()
    w = make_weight(32, 16, torch.float32)
    check_against_oracle(x, w, 16, 8)


# ---- dropout (docs/spec.md §4) -------------------------------------------------------------------------

def dropout_run(seed, p=0.3, shape=(2, 3, 64), d_model=16):
    torch.manual_seed(1234)
    layer = PatchEmbedding(d_model, 16, 8, p).to(DEVICE)
    layer.train()
    x = make_series(*shape, torch.float32).requires_grad_(True)
    torch.manual_seed(seed)
    y, _ = layer(x)
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(y.shape, generator=g).to(DEVICE)
    y.backward(grad)
    return y.detach(), x.grad, layer.value_embedding.tokenConv.weight.grad, layer, grad


@requires_triton
def test_dropout_same_seed_bit_identical_and_new_seed_differs():
    y1, dx1, dw1, *_ = dropout_run(seed=5)
    y2, dx2, dw2, *_ = dropout_run(seed=5)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2) and torch.equal(dw1, dw2)
    y3, *_ = dropout_run(seed=6)
    assert not torch.equal(y1, y3)


@requires_triton
def test_dropout_backward_uses_forward_mask():
    p = 0.3
    y, dx, dw, layer, grad = dropout_run(seed=11, p=p)
    kept = y != 0  # a kept output is exactly zero with probability ~0 for Gaussian inputs
    x = make_series(2, 3, 64, torch.float32)
    x64 = x.double().requires_grad_(True)
    w64 = layer.value_embedding.tokenConv.weight.detach().double().requires_grad_(True)
    y64 = patch_embedding_reference(x64, w64, 16, 8) * kept.double() / (1 - p)
    y64.backward(grad.double())
    assert_close_to_oracle("y (masked)", y, y64)
    assert_close_to_oracle("dx (masked)", dx, x64.grad)
    assert_close_to_oracle("dW (masked)", dw, w64.grad)


@requires_triton
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction(p):
    layer = PatchEmbedding(32, 16, 8, p).to(DEVICE).train()
    x = make_series(8, 7, 512, torch.float32)  # 56 * 64 * 32 = 114688 outputs
    torch.manual_seed(0)
    with torch.no_grad():
        y, _ = layer(x)
    kept = (y != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.01
    layer.eval()
    with torch.no_grad():
        y_eval, _ = layer(x)
    y64 = patch_embedding_reference(x.double(), layer.value_embedding.tokenConv.weight.double(), 16, 8)
    assert_close_to_oracle("eval-mode y", y_eval, y64)


# ---- module: drop-in behaviour -----------------------------------------------------------------

def test_state_dict_round_trips_with_original_layer():
    original = OriginalPatchEmbedding(32, 16, 8, 0.1).to(DEVICE)
    ours = PatchEmbedding(32, 16, 8, 0.1).to(DEVICE)
    assert list(ours.state_dict()) == ["value_embedding.tokenConv.weight"]
    ours.load_state_dict(original.state_dict(), strict=True)
    original.load_state_dict(ours.state_dict(), strict=True)
    original.eval(), ours.eval()
    x = make_series(2, 7, 512, torch.float32)
    with torch.no_grad():
        y_ref, n_ref = original(x)
        y, n = ours(x)
    assert n == n_ref == 7
    assert_close_to_oracle("y vs original layer", y, y_ref.double())


def test_initialization_is_kaiming_normal_fan_in_leaky_relu():
    torch.manual_seed(0)
    w = PatchEmbedding(512, 16, 8, 0.0).value_embedding.tokenConv.weight
    assert w.shape == (512, 16, 3)
    expected_std = nn.init.calculate_gain("leaky_relu") / math.sqrt(16 * 3)
    assert abs(w.std().item() / expected_std - 1) < 0.03
    assert abs(w.mean().item()) < 0.05 * expected_std


def test_forward_returns_n_vars_and_shape():
    layer = PatchEmbedding(8, 4, 2, 0.0).to(DEVICE).eval()
    y, n = layer(make_series(3, 5, 20, torch.float32))
    assert n == 5 and y.shape == (15, num_patches(20, 4, 2), 8)


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_call,exc,match", [
    (lambda: patch_embedding(torch.randn(2, 64), torch.randn(8, 16, 3), 16, 8), ValueError, "x must have 3 dims"),
    (lambda: patch_embedding(torch.randn(2, 1, 7), torch.randn(8, 16, 3), 16, 8), ValueError, "fewer than patch_len"),
    (lambda: patch_embedding(torch.ones(2, 1, 64, dtype=torch.int64), torch.randn(8, 16, 3), 16, 8), TypeError, "x must be a floating"),
    (lambda: patch_embedding(torch.randn(2, 1, 64), torch.randn(8, 16, 3, device="meta"), 16, 8), ValueError, "weight is on meta"),
    (lambda: patch_embedding(torch.randn(2, 1, 64), torch.randn(8, 12, 3), 16, 8), ValueError, r"weight must have shape \[d_model, 16, 3\]"),
    (lambda: patch_embedding(torch.randn(2, 1, 64), torch.randn(8, 16, 3), 16, 0), ValueError, "stride must be a positive int"),
    (lambda: patch_embedding(torch.randn(2, 1, 64), torch.randn(8, 16, 3), 16, 8, dropout_p=float("nan")), ValueError, "dropout must be a finite float"),
    (lambda: PatchEmbedding(32, 16, -1, 0.1), ValueError, "stride must be a positive int"),
    (lambda: PatchEmbedding(0, 16, 8, 0.1), ValueError, "d_model must be a positive int"),
    (lambda: PatchEmbedding(32, 16, 8, 1.5), ValueError, "dropout must be a finite float"),
    (lambda: PatchEmbedding(32, 2.5, 8, 0.1), ValueError, "patch_len must be a positive int"),
], ids=["ndim", "T+stride<patch_len", "int-dtype", "weight-device", "weight-shape", "stride=0",
        "nan-dropout", "ctor-stride", "ctor-d_model", "ctor-dropout>1", "ctor-float-patch_len"])
def test_bad_input_raises_naming_argument(make_call, exc, match):
    with pytest.raises(exc, match=match):
        make_call()


# ---- dispatch ----------------------------------------------------------------------------------

def test_forced_triton_without_a_runnable_backend_raises(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    x = make_series(1, 1, 32, torch.float64)  # float64 has no kernel: it is the oracle's dtype
    with pytest.raises(RuntimeError, match="patch_embedding cannot run in Triton: float64"):
        patch_embedding(x, make_weight(8, 16, torch.float64), 16, 8)


def test_float64_falls_back_to_eager_in_auto_mode():
    x = make_series(1, 2, 32, torch.float64)
    w = make_weight(8, 16, torch.float64)
    with dispatch.record_paths() as seen:
        y = patch_embedding(x, w, 16, 8)
    assert seen == {("patch_embedding", "eager"): 1}
    assert torch.equal(y, patch_embedding_reference(x, w, 16, 8))


def test_unknown_backend_value_is_rejected(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match="TIMELLM_FAST_BACKEND"):
        patch_embedding(make_series(1, 1, 32, torch.float32), make_weight(8, 16, torch.float32), 16, 8)


def test_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setattr(_environment, "INTERPRETING", False)
    x = make_series(1, 2, 32, torch.float32).cpu()
    w = make_weight(8, 16, torch.float32).cpu()
    with dispatch.record_paths() as seen:
        patch_embedding(x, w, 16, 8)
    assert seen == {("patch_embedding", "eager"): 1}
    assert "TRITON_INTERPRET" in dispatch.triton_device_problem(torch.device("cpu"))


@requires_triton
def test_empty_batch_gives_empty_output_and_zero_weight_grad():
    x = torch.zeros(0, 3, 64, device=DEVICE, requires_grad=True)
    w = make_weight(16, 16, torch.float32).requires_grad_(True)
    y = patch_embedding(x, w, 16, 8)
    assert y.shape == (0, 8, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and x.grad.shape == x.shape


@requires_triton
def test_eval_mode_does_not_advance_the_rng():
    layer = PatchEmbedding(16, 16, 8, 0.5).to(DEVICE).eval()
    torch.manual_seed(0)
    layer(make_series(2, 3, 64, torch.float32))
    after_eval = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after_eval)


@requires_triton
@pytest.mark.parametrize("tile", [(32, 2, 1, 1), (128, 8, 2, 1), (16, 1, 3, 2)],
                         ids=["bm32-w2-1prog", "bm128-w8-pipelined", "bm16-w1-2prog"])
def test_window_tile_override_for_tuning_keeps_the_numbers(tile):
    """bench/tune_patch_embedding.py launches other tiles through override_window_tile: blocks that
    straddle series boundaries (P = 9 patches), a persistent grid of one or two programs looping
    over every row block, and pipelined (L1-cached asynchronous) loads must give the same output,
    and the shipped tile must come back after."""

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 41, generator=g).to(DEVICE)
    w = torch.randn(16, 8, 3, generator=g).to(DEVICE)
    shipped = patch_embedding(x, w, 8, 4)
    override = pe_tiles.WindowTile(*tile)
    with tile_overrides.override_window_tile(override):
        assert pe_tiles.select_window_fwd_config(8, 16, torch.float32, False).tile == override
        tuned = patch_embedding(x, w, 8, 4)
    assert pe_tiles.select_window_fwd_config(8, 16, torch.float32, False).tile == pe_tiles.WINDOW_FWD_TILES[torch.float32]
    torch.testing.assert_close(tuned, shipped, rtol=1e-5, atol=1e-5)
    assert_close_to_oracle("y", tuned, patch_embedding_reference(x.double(), w.double(), 8, 4))
    with pytest.raises(ValueError, match="block_m"):
        with tile_overrides.override_window_tile(pe_tiles.WindowTile(48, 4, 1, 1)):
            pass


@requires_triton
def test_tuner_asks_the_launcher_for_the_compiled_forward():
    """bench/tune_patch_embedding.py reads registers and spills of each tile from its
    compiled_window_fwd, which launches the forward as patch_embedding_fwd does. Only a GPU has a
    compiled kernel (the interpreter returns None): the register and spill counts are checked there."""

    tuner = bench_module("tune_patch_embedding")
    x = torch.randn(2, 3, 64, device=DEVICE)
    w = torch.randn(16, 16, 3, device=DEVICE)
    seed = torch.zeros((1,), dtype=torch.int64, device=DEVICE)
    with tile_overrides.override_window_tile(pe_tiles.WindowTile(32, 2, 1, 1)):
        compiled = tuner.compiled_window_fwd(x, w, w.dtype, 16, 8, 8, seed)
    if DEVICE.type == "cuda":
        assert compiled.n_regs > 0 and compiled.n_spills == 0
    else:
        assert compiled is None
    with pytest.raises(ValueError, match="gather"):
        tuner.compiled_window_fwd(torch.randn(2, 3, 128, device=DEVICE), torch.randn(16, 48, 3, device=DEVICE),
                               torch.float32, 48, 8, 11, seed)


def test_window_tile_override_nests_and_restores_on_exit():
    """Nested override_window_tile blocks: the innermost tile wins, each exit brings back the tile
    around it, also when the block raises."""

    def tile():
        return pe_tiles.select_window_fwd_config(16, 16, torch.bfloat16, False).tile

    shipped = pe_tiles.WINDOW_FWD_TILES[torch.bfloat16]
    outer, inner = pe_tiles.WindowTile(32, 2, 1, 1), pe_tiles.WindowTile(128, 8, 2, 4)
    assert tile() == shipped
    with tile_overrides.override_window_tile(outer):
        assert tile() == outer
        with tile_overrides.override_window_tile(inner):
            assert tile() == inner
        assert tile() == outer
    assert tile() == shipped
    with pytest.raises(RuntimeError, match="inside"):
        with tile_overrides.override_window_tile(outer):
            raise RuntimeError("inside")
    assert tile() == shipped


# ---- which kernels run: the windowed kernels and the gather fallback ---------------------------

PATCH_KERNELS = ("patch_window_fwd", "patch_window_dweight", "patch_dweight_reduce", "patch_window_dx",
                 "patch_conv_gemm", "patch_fold")


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of every patch-embedding kernel: {kernel name: count}."""

    counters = {name: swap_kernel(monkeypatch, name, LaunchCounter) for name in PATCH_KERNELS}

    def counts():
        return {name: c.launches for name, c in counters.items() if c.launches}
    return counts


# (name, B, N, T, patch_len, stride, d_model): the windowed kernels' cases, contiguous [B, N, T]
# as Time-LLM passes it
WINDOW_SHAPES = [
    ("stride-divides-16-8", 2, 3, 64, 16, 8, 16),
    ("stride-divides-8-4", 1, 2, 30, 8, 4, 8),
    ("stride-equals-patch", 2, 2, 48, 16, 16, 16),
    ("stride-not-dividing-12-5", 2, 2, 47, 12, 5, 24),
    ("stride-not-dividing-16-6", 1, 3, 40, 16, 6, 16),
    ("m4-patch1-stride1", 3, 1, 24, 1, 1, 8),
    ("ragged-T-37", 2, 2, 37, 16, 8, 16),  # (T - patch_len) % stride != 0
    ("last-patch-all-pad", 2, 1, 52, 4, 6, 8),  # stride > patch_len: patch P-1 starts past T
    ("patch-longer-than-T", 1, 2, 5, 5, 3, 8),  # T = patch_len: every later patch is pad
    ("patch32-stride16", 1, 2, 70, 32, 16, 40),  # widest windowed patch, widest dx chunk, 2 column blocks
    ("d_model-1", 1, 1, 33, 16, 8, 1),
]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", WINDOW_SHAPES, ids=[s[0] for s in WINDOW_SHAPES])
def test_windowed_kernels_match_oracle(shape, dtype, launches):
    _, B, N, T, patch_len, stride, d_model = shape
    x = make_series(B, N, T, dtype, contiguous=True)
    w = make_weight(d_model, patch_len, dtype)
    check_against_oracle(x, w, patch_len, stride)
    # forward one launch; backward dW (partials + fixed-order sum) and dx, one launch each
    assert launches() == {"patch_window_fwd": 1, "patch_window_dweight": 1, "patch_dweight_reduce": 1,
                          "patch_window_dx": 1}


class ArgumentsSeen:
    """Stands in for a Triton kernel: records the first argument of each launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.first_args = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.first_args.append(args[0])
            return self.kernel[grid](*args, **kwargs)
        return launch


@requires_triton
@pytest.mark.parametrize("layout", ["permuted", "sliced", "offset-by-one"])
def test_windowed_kernels_read_non_contiguous_input_in_place(layout, monkeypatch):
    """Other strides (Time-LLM's permuted [B, T, N] view, every other step, a start that is not
    16-byte aligned) take the same kernels, which read x itself through its strides."""

    g = torch.Generator().manual_seed(5)
    if layout == "permuted":
        x = torch.randn(2, 45, 3, generator=g).permute(0, 2, 1)
    elif layout == "sliced":
        x = torch.randn(2, 3, 90, generator=g)[..., ::2]
    else:
        x = torch.randn(2, 3, 46, generator=g)[..., 1:]
    x = x.to(DEVICE)
    assert not x.is_contiguous()
    seen = {name: swap_kernel(monkeypatch, name, ArgumentsSeen)
            for name in ("patch_window_fwd", "patch_window_dweight")}
    xg = x.detach().requires_grad_(True)  # the same storage
    w = make_weight(16, 16, torch.float32).requires_grad_(True)
    y = patch_embedding(xg, w, 16, 8)
    grad = torch.randn(y.shape, generator=g).to(DEVICE)
    y.backward(grad)
    for wrapper in seen.values():
        (arg,) = wrapper.first_args
        assert (arg.data_ptr(), arg.stride()) == (x.data_ptr(), x.stride()), "x was copied"
    y64, dx64, dw64 = oracle(x, w, 16, 8, grad)
    assert_close_to_oracle("y", y, y64)
    assert_close_to_oracle("dx", xg.grad, dx64)
    assert_close_to_oracle("dW", w.grad, dw64)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wide_patch_forward_takes_the_gather_fallback(dtype, launches):
    """patch_len > 32 has no windowed forward tile: the gather kernel computes it."""
    x = make_series(2, 2, 100, dtype, contiguous=True)
    w = make_weight(16, 40, dtype)
    check_against_oracle(x, w, 40, 8)
    assert launches() == {"patch_conv_gemm": 1, "patch_window_dweight": 1, "patch_dweight_reduce": 1,
                          "patch_window_dx": 1}


@requires_triton
def test_wide_stride_dx_takes_the_gather_and_fold_fallback(launches):
    """stride > 16 has no windowed dx tile: d(patches) by the gather kernel, then patch_fold."""
    x = make_series(2, 2, 90, torch.float32, contiguous=True)
    w = make_weight(16, 24, torch.float32)
    check_against_oracle(x, w, 24, 20)
    assert launches() == {"patch_window_fwd": 1, "patch_window_dweight": 1, "patch_dweight_reduce": 1,
                          "patch_conv_gemm": 1, "patch_fold": 1}


@requires_triton
@pytest.mark.parametrize("need", ["dw", "dx", "dx-dropout"])
def test_backward_launches_only_what_is_needed(need, launches):
    """dW alone (Time-LLM: the series has no gradient) is two launches; dx alone one, or two under
    dropout (the dW kernel regenerates the mask and keeps the masked gradient, without summing)."""
    p = 0.3 if need == "dx-dropout" else 0.0
    x = make_series(2, 3, 64, torch.float32, contiguous=True).requires_grad_(need != "dw")
    w = make_weight(16, 16, torch.float32).requires_grad_(need == "dw")
    y = patch_embedding(x, w, 16, 8, dropout_p=p, training=True)
    fwd = launches()
    y.sum().backward()
    bwd = {k: v - fwd.get(k, 0) for k, v in launches().items() if v - fwd.get(k, 0)}
    expected = {"dw": {"patch_window_dweight": 1, "patch_dweight_reduce": 1},
                "dx": {"patch_window_dx": 1},
                "dx-dropout": {"patch_window_dweight": 1, "patch_window_dx": 1}}[need]
    assert bwd == expected


@requires_triton
@pytest.mark.parametrize("series", [1, 3, 13, 26], ids=lambda n: f"{n}-series")
def test_persistent_forward_covers_awkward_row_counts(series):
    """B·N·P rows (5, 15, 65, 130) not a multiple of the 16-row block, a grid of at most 3
    programs looping over the blocks: every row is computed (uninitialized rows would fail the
    oracle), and the dropout mask is the element's, whichever program computes it."""

    T, patch_len, stride = 9, 4, 2  # P = 5
    x = make_series(series, 1, T, torch.float32, contiguous=True)
    w = make_weight(8, patch_len, torch.float32)
    few_programs = pe_tiles.WindowTile(16, 1, 1, 3)
    with tile_overrides.override_window_tile(few_programs):
        y = patch_embedding(x, w, patch_len, stride)
        torch.manual_seed(4)
        y_drop = patch_embedding(x, w, patch_len, stride, dropout_p=0.5, training=True)
    assert_close_to_oracle("y", y, patch_embedding_reference(x.double(), w.double(), patch_len, stride))
    torch.manual_seed(4)
    y_drop_default_tile = patch_embedding(x, w, patch_len, stride, dropout_p=0.5, training=True)
    # the same mask bit for bit; the values to rounding (the interpreter's matmul may round a
    # 16-row block and a 64-row block differently)
    assert torch.equal(y_drop == 0, y_drop_default_tile == 0)
    torch.testing.assert_close(y_drop, y_drop_default_tile, rtol=1e-6, atol=1e-6)
    kept = y_drop != 0
    torch.testing.assert_close(y_drop[kept], (y * 2)[kept], rtol=1e-5, atol=1e-6)
