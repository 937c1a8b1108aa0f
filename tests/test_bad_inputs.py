"""Bad-input matrix of every public entry point (docs/spec.md §1; README "Use").

The tables below ARE the documentation of what each bad input does. Every case either raises
(`RAISES`: the exception type and a regex that must name the argument and what was expected) or
is accepted and behaves like the reference (`ACCEPTED`, `EMPTY`, `NONFINITE`).

Decisions recorded here:

* Empty batch (B·N = 0 for the patch embedding, B'·L = 0 for the reprogramming layer) is not an
  error: forward returns an empty result of the right shape, backward returns empty input
  gradients and all-zero weight gradients, on every backend. S = 0 prototypes is an error (a
  softmax over nothing is undefined). T < patch_len (including T = 0) is an error.
* Mixed dtypes: the patch embedding accepts any float input with any float weight (docs/spec.md §1.1,
  computes in fp32, returns the weight's dtype); the reprogramming layer requires target, source
  and value in the weights' dtype (as nn.Linear does) unless autocast is on.
* NaN / inf in inputs never raise; they propagate to exactly the output / gradient entries where
  the float64 reference has NaN / inf (compared mask by mask, on the Triton path and eagerly).
* "meta" stands in for "another device" on a CPU-only machine.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

from helpers import DEVICE, TRITON_RUNS
from timellm_fast import PatchEmbedding, ReprogrammingLayer, dispatch, patch_embedding, patch_model, unpatch_model
from timellm_fast.reference import patch_embedding_reference, reprogramming_reference

D = DEVICE
DEV = str(torch.empty(0, device=D).device)  # as error messages print it: "cpu", "cuda:0"
F32 = torch.float32
PE_OP, RP_OP = "patch_embedding", "reprogramming_attention"


def x_(B=2, N=3, T=32, dtype=F32, device=D):
    return torch.randn(B, N, T, dtype=dtype, device=device) if dtype.is_floating_point else \
        torch.ones(B, N, T, dtype=dtype, device=device)


def w_(d_model=8, patch_len=8, dtype=F32, device=D):
    return torch.randn(d_model, patch_len, 3, dtype=dtype, device=device)


def layer_(d_model=8, n_heads=2, d_keys=16, d_llm=12, dtype=F32):
    return ReprogrammingLayer(d_model, n_heads, d_keys=d_keys, d_llm=d_llm, attention_dropout=0.0).to(D, dtype)


def t_(B=2, L=3, d_model=8, dtype=F32, device=D):
    return torch.randn(B, L, d_model, device=device).to(dtype)


def s_(S=5, d_llm=12, dtype=F32, device=D):
    return torch.randn(S, d_llm, device=device).to(dtype)


def rp(target, source, value=None, **layer_kwargs):
    return lambda: layer_(**layer_kwargs)(target, source, source if value is None else value)


def pe(x, w, patch_len=8, stride=4, **kw):
    return lambda: patch_embedding(x, w, patch_len, stride, **kw)


def tiny_timellm_config(**overrides):
    from timellm_fast.models import TimeLLMConfig

    fields = dict(seq_len=32, pred_len=8, patch_len=8, stride=4, d_model=8, d_ff=8, n_heads=2, num_tokens=10,
                  dropout=0.0, attention_dropout=0.0, backbone="gpt2", llm_layers=1, d_llm=16, llm_heads=2,
                  backbone_dropout=0.0)
    fields.update(overrides)
    return TimeLLMConfig(**fields)


def timellm(**overrides):
    from timellm_fast.models import TimeLLM

    return lambda: TimeLLM(tiny_timellm_config(**overrides))


_TIMELLM = {}


def timellm_forward(x_enc):
    def call():
        if "model" not in _TIMELLM:
            from timellm_fast.models import TimeLLM

            torch.manual_seed(0)
            _TIMELLM["model"] = TimeLLM(tiny_timellm_config()).to(D).eval()
        return _TIMELLM["model"](x_enc)
    return call


class NamedLikeTimeLLM(nn.Module):
    """Has Time-LLM's class name but not its structure: patch_model must leave it alone."""


NamedLikeTimeLLM.__name__ = "ReprogrammingLayer"


# ---------------------------------------------------------------------------------------------
# the table: (id, call, exception type, message regex naming the argument and the expectation)
# ---------------------------------------------------------------------------------------------

RAISES = [
    # --- patch_embedding(x, weight, patch_len, stride, dropout_p, training) -------------------
    ("pe/x-ndim-2", pe(torch.randn(2, 32), w_()), ValueError, r"x must have 3 dims \[B, N, T\], got shape \(2, 32\)"),
    ("pe/x-ndim-4", pe(torch.randn(1, 2, 3, 32), w_()), ValueError, r"x must have 3 dims \[B, N, T\]"),
    ("pe/x-not-tensor", pe([[[1.0] * 32]], w_()), TypeError, r"x must be a torch.Tensor of shape \[B, N, T\], got list"),
    ("pe/x-int64", pe(x_(dtype=torch.int64), w_()), TypeError, r"x must be a floating tensor .*got torch.int64"),
    ("pe/x-bool", pe(x_(dtype=torch.bool), w_()), TypeError, r"x must be a floating tensor .*got torch.bool"),
    ("pe/x-complex", pe(torch.randn(2, 3, 32, dtype=torch.complex64), w_()), TypeError, r"x must be a floating tensor"),
    ("pe/w-int", pe(x_(), torch.ones(8, 8, 3, dtype=torch.int32)), TypeError, r"weight must be a floating tensor"),
    ("pe/w-ndim", pe(x_(), torch.randn(8, 24)), ValueError, r"weight must have 3 dims \[d_model, patch_len, 3\]"),
    ("pe/w-patch_len-mismatch", pe(x_(), w_(patch_len=6)), ValueError, r"weight must have shape \[d_model, 8, 3\] \(patch_len=8\), got \(8, 6, 3\)"),
    ("pe/w-kernel-2", pe(x_(), torch.randn(8, 8, 2)), ValueError, r"weight must have shape \[d_model, 8, 3\]"),
    ("pe/w-d_model-0", pe(x_(), torch.randn(0, 8, 3)), ValueError, r"weight must have shape \[d_model, 8, 3\].*got \(0, 8, 3\)"),
    ("pe/w-other-device", pe(x_(), w_(device="meta")), ValueError, fr"weight is on meta but x is on {DEV}"),
    ("pe/x-other-device", pe(x_(device="meta"), w_()), ValueError, fr"weight is on {DEV} but x is on meta"),
    ("pe/T+stride<patch_len", pe(x_(T=3), w_()), ValueError, r"x has T=3 time steps \(last dim\): padded by stride=4 that is fewer than patch_len=8"),
    ("pe/T=0", pe(x_(T=0), w_()), ValueError, r"x has T=0 time steps .*patch_len=8"),
    ("pe/patch_len-0", pe(x_(), w_(), patch_len=0), ValueError, r"patch_len must be a positive int, got 0"),
    ("pe/patch_len-float", pe(x_(), w_(), patch_len=8.0), ValueError, r"patch_len must be a positive int, got 8.0"),
    ("pe/stride-negative", pe(x_(), w_(), stride=-2), ValueError, r"stride must be a positive int, got -2"),
    ("pe/stride-bool", pe(x_(), w_(), stride=True), ValueError, r"stride must be a positive int, got True"),
    ("pe/dropout-above-1", pe(x_(), w_(), dropout_p=1.5), ValueError, r"dropout must be a finite float in \[0, 1\], got 1.5"),
    ("pe/dropout-nan", pe(x_(), w_(), dropout_p=math.nan), ValueError, r"dropout must be a finite float in \[0, 1\], got nan"),
    ("pe/dropout-str", pe(x_(), w_(), dropout_p="0.1"), TypeError, r"dropout must be a float in \[0, 1\], got '0.1'"),
    # --- PatchEmbedding(d_model, patch_len, stride, dropout) and its forward -------------------
    ("PE/d_model-0", lambda: PatchEmbedding(0, 8, 4, 0.1), ValueError, r"d_model must be a positive int, got 0"),
    ("PE/d_model-negative", lambda: PatchEmbedding(-8, 8, 4, 0.1), ValueError, r"d_model must be a positive int, got -8"),
    ("PE/patch_len-0", lambda: PatchEmbedding(8, 0, 4, 0.1), ValueError, r"patch_len must be a positive int, got 0"),
    ("PE/stride-0", lambda: PatchEmbedding(8, 8, 0, 0.1), ValueError, r"stride must be a positive int, got 0"),
    ("PE/stride-float", lambda: PatchEmbedding(8, 8, 2.5, 0.1), ValueError, r"stride must be a positive int, got 2.5"),
    ("PE/dropout-negative", lambda: PatchEmbedding(8, 8, 4, -0.1), ValueError, r"dropout must be a finite float in \[0, 1\], got -0.1"),
    ("PE/dropout-inf", lambda: PatchEmbedding(8, 8, 4, math.inf), ValueError, r"dropout must be a finite float in \[0, 1\], got inf"),
    ("PE/dropout-None", lambda: PatchEmbedding(8, 8, 4, None), TypeError, r"dropout must be a float in \[0, 1\], got None"),
    ("PE.forward/x-ndim", lambda: PatchEmbedding(8, 8, 4, 0.0).to(D)(torch.randn(3, 32, device=D)), ValueError, r"x must have 3 dims \[B, N, T\]"),
    ("PE.forward/x-int", lambda: PatchEmbedding(8, 8, 4, 0.0).to(D)(x_(dtype=torch.int32)), TypeError, r"x must be a floating tensor"),
    ("PE.forward/T+stride<patch_len", lambda: PatchEmbedding(8, 8, 4, 0.0).to(D)(x_(T=3)), ValueError, r"T=3 .*fewer than patch_len=8"),
    ("PE.forward/x-other-device", lambda: PatchEmbedding(8, 8, 4, 0.0).to(D)(x_(device="meta")), ValueError, fr"weight is on {DEV} but x is on meta"),
    # --- ReprogrammingLayer(d_model, n_heads, d_keys, d_llm, attention_dropout) ----------------
    ("RP/d_model-0", lambda: ReprogrammingLayer(0, 2, d_llm=8), ValueError, r"d_model must be a positive int, got 0"),
    ("RP/n_heads-0", lambda: ReprogrammingLayer(8, 0, d_llm=8), ValueError, r"n_heads must be a positive int, got 0"),
    ("RP/n_heads-negative", lambda: ReprogrammingLayer(8, -2, d_llm=8), ValueError, r"n_heads must be a positive int, got -2"),
    ("RP/d_keys-0-default-0", lambda: ReprogrammingLayer(2, 4, d_keys=0, d_llm=8), ValueError, r"d_keys defaults to d_model // n_heads = 2 // 4 = 0"),
    ("RP/d_keys-negative", lambda: ReprogrammingLayer(8, 2, d_keys=-16, d_llm=8), ValueError, r"d_keys must be a positive int, got -16"),
    ("RP/d_keys-default-0", lambda: ReprogrammingLayer(2, 4, d_llm=8), ValueError, r"d_keys defaults to d_model // n_heads = 2 // 4 = 0"),
    ("RP/d_llm-missing", lambda: ReprogrammingLayer(8, 2), ValueError, r"d_llm .* is required"),
    ("RP/d_llm-0", lambda: ReprogrammingLayer(8, 2, d_llm=0), ValueError, r"d_llm must be a positive int, got 0"),
    ("RP/d_llm-float", lambda: ReprogrammingLayer(8, 2, d_llm=768.0), ValueError, r"d_llm must be a positive int, got 768.0"),
    ("RP/dropout-above-1", lambda: ReprogrammingLayer(8, 2, d_llm=8, attention_dropout=1.5), ValueError, r"attention_dropout must be a finite float in \[0, 1\], got 1.5"),
    ("RP/dropout-nan", lambda: ReprogrammingLayer(8, 2, d_llm=8, attention_dropout=math.nan), ValueError, r"attention_dropout must be a finite float .*got nan"),
    # --- ReprogrammingLayer.forward(target, source, value) -------------------------------------
    ("RP.forward/target-ndim-2", rp(torch.randn(3, 8), s_()), ValueError, r"target must have 3 dims \[B', L, d_model\], got shape \(3, 8\)"),
    ("RP.forward/target-ndim-4", rp(torch.randn(1, 2, 3, 8), s_()), ValueError, r"target must have 3 dims \[B', L, d_model\]"),
    ("RP.forward/source-ndim-3", rp(t_(), s_()[None]), ValueError, r"source must have 2 dims \[S, d_llm\]"),
    ("RP.forward/value-ndim-1", rp(t_(), s_(), torch.randn(12)), ValueError, r"value must have 2 dims \[S, d_llm\]"),
    ("RP.forward/target-not-tensor", rp("target", s_()), TypeError, r"target must be a torch.Tensor of shape \[B', L, d_model\], got str"),
    ("RP.forward/d_model-mismatch", rp(t_(d_model=7), s_()), ValueError, r"target must have d_model=8 features in its last dim, got shape \(2, 3, 7\)"),
    ("RP.forward/source-d_llm-mismatch", rp(t_(), s_(d_llm=11)), ValueError, r"source must have d_llm=12 features in its last dim, got shape \(5, 11\)"),
    ("RP.forward/value-d_llm-mismatch", rp(t_(), s_(), s_(d_llm=13)), ValueError, r"value must have d_llm=12 features in its last dim"),
    ("RP.forward/S-mismatch", rp(t_(), s_(S=5), s_(S=4)), ValueError, r"value must have as many rows \(prototypes S\) as source: source has 5, value has 4"),
    ("RP.forward/S=0", rp(t_(), s_(S=0)), ValueError, r"source must have at least one prototype row \(S >= 1\), got S = 0"),
    ("RP.forward/target-dtype", rp(t_(dtype=torch.bfloat16), s_()), TypeError, r"target has dtype torch.bfloat16 but the layer's weights are torch.float32"),
    ("RP.forward/source-dtype", rp(t_(), s_(dtype=torch.float16), s_()), TypeError, r"source has dtype torch.float16 but the layer's weights are torch.float32"),
    ("RP.forward/value-dtype", rp(t_(), s_(), s_(dtype=torch.float64)), TypeError, r"value has dtype torch.float64 but the layer's weights are torch.float32"),
    ("RP.forward/weights-dtype", rp(t_(), s_(), dtype=torch.bfloat16), TypeError, r"target has dtype torch.float32 but the layer's weights are torch.bfloat16"),
    ("RP.forward/target-int", rp(t_(dtype=torch.int64), s_()), TypeError, r"target must be a floating tensor .*got torch.int64"),
    ("RP.forward/source-bool", rp(t_(), s_(dtype=torch.bool)), TypeError, r"source must be a floating tensor .*got torch.bool"),
    ("RP.forward/source-other-device", rp(t_(), s_(device="meta")), ValueError, fr"source is on meta but target is on {DEV}"),
    ("RP.forward/value-other-device", rp(t_(), s_(), s_(device="meta")), ValueError, fr"value is on meta but target is on {DEV}"),
    ("RP.forward/all-inputs-other-device", rp(t_(device="meta"), s_(device="meta")), ValueError, fr"target is on meta but the layer's weights is on {DEV}"),
    # --- patch_model / unpatch_model ------------------------------------------------------------
    ("patch_model/not-a-module", lambda: patch_model("model"), TypeError, r"model must be a torch.nn.Module, got str"),
    ("patch_model/layer-itself", lambda: patch_model(NamedLikeTimeLLM()), ValueError, r"model is itself a ReprogrammingLayer; .*pass the model that contains it"),
    ("unpatch_model/not-a-module", lambda: unpatch_model(None), TypeError, r"model must be a torch.nn.Module, got NoneType"),
    # --- TimeLLM(config) and its forward ---------------------------------------------------------
    ("TimeLLM/seq_len-0", timellm(seq_len=0), ValueError, r"seq_len must be a positive int, got 0"),
    ("TimeLLM/patch_len>seq_len", timellm(seq_len=4), ValueError, r"seq_len=4 must be >= patch_len=8"),
    ("TimeLLM/n_heads-negative", timellm(n_heads=-1), ValueError, r"n_heads must be a positive int, got -1"),
    ("TimeLLM/num_tokens-0", timellm(num_tokens=0), ValueError, r"num_tokens must be a positive int, got 0"),
    ("TimeLLM/dropout-above-1", timellm(dropout=1.5), ValueError, r"dropout must be a finite float in \[0, 1\], got 1.5"),
    ("TimeLLM/backbone-unknown", timellm(backbone="t5"), ValueError, r"backbone must be one of gpt2, llama, bert, minilm, got 't5'"),
    ("TimeLLM/d_ff>d_llm", timellm(d_ff=32), ValueError, r"d_ff=32 must be <= the backbone width d_llm=16"),
    ("TimeLLM/d_llm-not-multiple-of-heads", timellm(d_llm=15, llm_heads=2), ValueError, r"d_llm=15 must be a multiple of llm_heads=2"),
    ("TimeLLM.forward/x-ndim", timellm_forward(torch.randn(2, 32)), ValueError, r"x_enc must have 3 dims \[B, seq_len, N\]"),
    ("TimeLLM.forward/seq_len-mismatch", timellm_forward(torch.randn(1, 31, 2)), ValueError, r"x_enc must have seq_len=32 time steps in dim 1, got shape \(1, 31, 2\)"),
    ("TimeLLM.forward/x-int", timellm_forward(torch.ones(1, 32, 2, dtype=torch.int64)), TypeError, r"x_enc must be a floating tensor"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in RAISES], ids=[c[0] for c in RAISES])
def test_bad_input_raises_naming_argument_and_expectation(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# accepted inputs that look suspicious: mixed dtypes, odd layouts (they must give the reference)
# ---------------------------------------------------------------------------------------------

ACCEPTED = [  # (id, x dtype, weight dtype) for the patch embedding: computes in fp32, returns weight's dtype
    ("pe/bf16-x-fp32-weight", torch.bfloat16, F32),
    ("pe/fp16-x-fp32-weight", torch.float16, F32),
    ("pe/fp32-x-fp16-weight", F32, torch.float16),
    ("pe/fp64-x-fp32-weight", torch.float64, F32),
]


@pytest.mark.parametrize("x_dtype,w_dtype", [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_patch_embedding_mixed_dtypes_are_accepted(x_dtype, w_dtype):
    x, w = x_(dtype=x_dtype), w_(dtype=w_dtype)
    y = patch_embedding(x, w, 8, 4)
    assert y.dtype == w_dtype
    y64 = patch_embedding_reference(x.double(), w.double(), 8, 4)
    tol = (1e-4 if w_dtype == F32 else 2 ** -9) * (1 + y64.abs().max().item())
    assert (y.double() - y64).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------
# empty batches: an empty result of the right shape, forward and backward, on every backend
# ---------------------------------------------------------------------------------------------

EMPTY = [  # (id, op, dims): patch embedding dims (B, N, T); reprogramming dims (B', L)
    ("pe/B=0", "pe", (0, 3, 32)),
    ("pe/N=0", "pe", (2, 0, 32)),
    ("rp/B'=0", "rp", (0, 4)),
    ("rp/L=0", "rp", (2, 0)),
]
BACKENDS = ["auto", "eager"] + (["triton"] if TRITON_RUNS else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,dims", [c[1:] for c in EMPTY], ids=[c[0] for c in EMPTY])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
def test_empty_batch_gives_empty_result_and_zero_weight_grads(op, dims, backend, training, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
    torch.manual_seed(0)
    if op == "pe":
        module = PatchEmbedding(8, 8, 4, 0.2).to(D).train(training)
        x = torch.randn(*dims, device=D, requires_grad=True)
        y, n_vars = module(x)
        assert n_vars == dims[1]
        assert y.shape == (dims[0] * dims[1], (32 + 4 - 8) // 4 + 1, 8)
        inputs = [x]
    else:
        module = ReprogrammingLayer(8, 2, d_keys=16, d_llm=12, attention_dropout=0.2).to(D).train(training)
        target = torch.randn(*dims, 8, device=D, requires_grad=True)
        source = torch.randn(5, 12, device=D, requires_grad=True)
        y = module(target, source, source)
        assert y.shape == (*dims, 12)
        inputs = [target, source]
    y.sum().backward()
    for t in inputs:
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.abs().sum()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


# ---------------------------------------------------------------------------------------------
# NaN / inf: propagate exactly where the float64 reference has them, never raise
# ---------------------------------------------------------------------------------------------

NONFINITE = [  # (id, op, tensor that gets the bad value, value)
    ("pe/nan-in-x", "pe", "x", math.nan),
    ("pe/inf-in-x", "pe", "x", math.inf),
    ("pe/-inf-at-last-step", "pe", "x_last", -math.inf),  # replicated into the padding
    ("pe/nan-in-weight", "pe", "weight", math.nan),
    ("rp/nan-in-target", "rp", "target", math.nan),
    ("rp/inf-in-target", "rp", "target", math.inf),
    ("rp/nan-in-source", "rp", "source", math.nan),
    ("rp/inf-in-source", "rp", "source", math.inf),
    ("rp/-inf-in-value", "rp", "value", -math.inf),
    ("rp/nan-in-query-weight", "rp", "query_projection.weight", math.nan),
    ("rp/inf-in-out-bias", "rp", "out_projection.bias", math.inf),
]


def assert_same_nonfinite(what, got, ref):
    assert got.shape == ref.shape, what
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{what}: NaN mask differs from the reference"
    assert torch.equal(torch.isposinf(got), torch.isposinf(ref)), f"{what}: +inf mask differs"
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), f"{what}: -inf mask differs"


def _pe_nonfinite(where, value):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 29, generator=g).to(D)
    w = (torch.randn(8, 8, 3, generator=g) / 5).to(D)
    if where == "x":
        x[1, 2, 10] = value
    elif where == "x_last":
        x[0, 1, -1] = value
    else:
        w[3, 2, 1] = value
    upstream = torch.randn(6, (29 + 4 - 8) // 4 + 1, 8, generator=g).to(D)
    results = []
    for fn, dt in ((lambda a, b: patch_embedding(a, b, 8, 4), F32),
                   (lambda a, b: patch_embedding_reference(a, b, 8, 4), torch.float64)):
        a, b = x.detach().to(dt).requires_grad_(), w.detach().to(dt).requires_grad_()
        y = fn(a, b)
        y.backward(upstream.to(dt))
        results.append({"y": y.detach(), "grad x": a.grad, "grad weight": b.grad})
    return results


def _rp_nonfinite(where, value):
    torch.manual_seed(0)
    layer = ReprogrammingLayer(16, 2, d_keys=16, d_llm=12, attention_dropout=0.0).to(D)
    target, source, value_t = torch.randn(2, 5, 16, device=D), torch.randn(37, 12, device=D), torch.randn(37, 12, device=D)
    params = dict(layer.named_parameters())
    with torch.no_grad():
        if where == "target":
            target[1, 3, 4] = value
        elif where == "source":
            source[7, 5] = value
        elif where == "value":
            value_t[11, 2] = value
        else:
            params[where].view(-1)[3] = value
    upstream = torch.randn(2, 5, 12, device=D)
    out = {}
    t, s, v = (a.clone().requires_grad_() for a in (target, source, value_t))
    y = layer(t, s, v)
    y.backward(upstream)
    out["ours"] = {"y": y.detach(), "grad target": t.grad, "grad source": s.grad, "grad value": v.grad,
                   **{f"grad {n}": p.grad for n, p in layer.named_parameters()}}
    leaves = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    t, s, v = (a.double().requires_grad_() for a in (target, source, value_t))
    y = reprogramming_reference(t, s, v, *leaves.values(), 2)
    y.backward(upstream.double())
    out["ref"] = {"y": y.detach(), "grad target": t.grad, "grad source": s.grad, "grad value": v.grad,
                  **{f"grad {n}": p.grad for n, p in leaves.items()}}
    return out["ours"], out["ref"]


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("op,where,value", [c[1:] for c in NONFINITE], ids=[c[0] for c in NONFINITE])
def test_nonfinite_inputs_propagate_like_the_reference(op, where, value, backend, monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend)
    op_name = PE_OP if op == "pe" else RP_OP
    with dispatch.record_paths() as seen, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's in Triton's interpreter
        ours, ref = (_pe_nonfinite if op == "pe" else _rp_nonfinite)(where, value)
    expected_path = "triton" if backend == "auto" and TRITON_RUNS else "eager"
    assert seen == {(op_name, expected_path): 1}, seen
    assert set(ours) == set(ref)
    assert (~torch.isfinite(ref["y"])).any(), "the case must put a non-finite value in the output"
    for name in ours:
        assert_same_nonfinite(name, ours[name], ref[name])
        finite = torch.isfinite(ref[name])
        scale = 1 + ref[name][finite].abs().max().item() if finite.any() else 1.0
        err = (ours[name][finite].double() - ref[name][finite]).abs().max().item() if finite.any() else 0.0
        assert err <= 1e-4 * scale, f"{name}: finite entries off by {err:.3e}"
