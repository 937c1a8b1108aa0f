"""The drop-in contract (docs/spec.md §4.1): in every situation below our PatchEmbedding and
ReprogrammingLayer give what Time-LLM's original layers give, or raise an error that names what is
unsupported; never a silent difference.

Each test sets up one situation a user can be in and compares our layer with the original
(tests/timellm_original.py) holding the same state dict, in float32, at docs/spec.md §4's fp32 bar
(helpers.assert_close_to_oracle: max abs error <= 1e-4 (1 + max|original|)). The layer-level tests
run on both paths (`path`): "eager" (TIMELLM_FAST_BACKEND=eager) and "triton", the default
automatic dispatch, which on a CPU runs the Triton kernels in the interpreter (tests/conftest.py);
"triton" is skipped where Triton cannot run. Shapes are tiny: the interpreter is slow.

Self-check: ``DROPIN_SELF_CHECK=1 python -m pytest tests/test_dropin.py`` replaces "our" classes by
the original classes themselves (and patch_model by `reference_patch_model` below, which swaps in
fresh original-class modules), runs each situation once (path "original") and skips the checks
that are about timellm_fast itself (which path ran, `dispatch.triton_device_problem`, our error
messages). Every test must pass in that mode: it shows that each test can pass when the behaviour
is right.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import dropin_fsdp_worker
import timellm_fast
import timellm_original as original
from helpers import TRITON_PROBLEM, TRITON_RUNS, assert_close_to_oracle
from timellm_fast import dispatch

SELF_CHECK = os.environ.get("DROPIN_SELF_CHECK") == "1"
TESTS = Path(__file__).resolve().parent


def reference_patch_model(model: nn.Module) -> list:
    """What patch_model must do, with the original classes standing in for ours (self-check only):
    every module that is exactly an original layer is replaced by a new module of that class built
    from its structure, holding its state and train/eval flag; a subclass that overrides forward is
    left alone with a warning naming it; nothing is replaced unless everything can be (the error
    names the module that cannot)."""
    plan = []
    for name, module in model.named_modules():
        for cls, arguments_of in ((original.ReprogrammingLayer, reprogramming_arguments),
                                  (original.PatchEmbedding, patch_embedding_arguments)):
            if not isinstance(module, cls):
                continue
            if type(module).forward is not cls.forward:
                warnings.warn(f"{name} ({type(module).__qualname__}) overrides forward; left unchanged")
                continue
            try:
                new = cls(**arguments_of(module))
                new.load_state_dict(module.state_dict())
            except Exception as exc:
                raise ValueError(f"cannot replace {name} ({type(module).__name__}): {exc}") from exc
            plan.append((name, new.train(module.training)))
    for name, new in plan:
        model.set_submodule(name, new)
    return plan


def reprogramming_arguments(module) -> dict:
    q = module.query_projection
    return dict(d_model=q.in_features, n_heads=module.n_heads, d_keys=q.out_features // module.n_heads,
                d_llm=module.key_projection.in_features, attention_dropout=module.dropout.p)


def patch_embedding_arguments(module) -> dict:
    conv = module.value_embedding.tokenConv
    return dict(d_model=conv.out_channels, patch_len=module.patch_len, stride=module.stride,
                dropout=module.dropout.p)


if SELF_CHECK:
    OurPatchEmbedding, OurReprogrammingLayer = original.PatchEmbedding, original.ReprogrammingLayer
    patch_model_under_test = reference_patch_model
    PATHS = ["original"]
else:
    OurPatchEmbedding, OurReprogrammingLayer = timellm_fast.PatchEmbedding, timellm_fast.ReprogrammingLayer
    patch_model_under_test = timellm_fast.patch_model
    PATHS = ["eager", pytest.param("triton", marks=pytest.mark.skipif(
        not TRITON_RUNS, reason=f"Triton cannot run here: {TRITON_PROBLEM}"))]

ours_only = pytest.mark.skipif(SELF_CHECK, reason="checks timellm_fast itself, not the contract's numbers")
silence_weight_norm_deprecation = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*:FutureWarning")

# the tiny shapes of the brief: E = d_keys >= 16 for the kernels
D_MODEL, N_HEADS, D_KEYS, D_LLM, PROTOTYPES = 16, 2, 16, 24, 37
PATCH_LEN, STRIDE = 8, 4
LAYER_KINDS = ["reprogramming", "patch_embedding"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The path: "eager" forces our eager path; "triton" is the default dispatch (the kernels where
    they can run); "original" in self-check mode."""
    if request.param == "eager":
        monkeypatch.setenv(dispatch.BACKEND_ENV, "eager")
    return request.param


# ------------------------------------------------------------------ layers, inputs, comparisons

def reprogramming_pair(d_model=D_MODEL, d_keys=D_KEYS, dropout=0.0, n_heads=N_HEADS, d_llm=D_LLM):
    """(original, ours) with the same state dict."""
    torch.manual_seed(0)
    orig = original.ReprogrammingLayer(d_model, n_heads, d_keys, d_llm, attention_dropout=dropout)
    ours = OurReprogrammingLayer(d_model, n_heads, d_keys, d_llm, attention_dropout=dropout)
    ours.load_state_dict(orig.state_dict())
    return orig, ours


def patch_embedding_pair(d_model=D_MODEL, patch_len=PATCH_LEN, stride=STRIDE, dropout=0.0):
    """(original, ours) with the same state dict."""
    torch.manual_seed(0)
    orig = original.PatchEmbedding(d_model, patch_len, stride, dropout)
    ours = OurPatchEmbedding(d_model, patch_len, stride, dropout)
    ours.load_state_dict(orig.state_dict())
    return orig, ours


def reprogramming_inputs(d_model=D_MODEL, batch=2, length=4, prototypes=PROTOTYPES, seed=1):
    """(target [B', L, d_model], source [S, d_llm], value [S, d_llm])."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, d_model, generator=g), torch.randn(prototypes, D_LLM, generator=g),
            torch.randn(prototypes, D_LLM, generator=g))


def series(batch=2, n_vars=3, length=24, seed=2):
    """x [B, N, T] as PatchEmbedding takes it."""
    return (torch.randn(batch, n_vars, length, generator=torch.Generator().manual_seed(seed)),)


def layer_pair(kind, **kwargs):
    return reprogramming_pair(**kwargs) if kind == "reprogramming" else patch_embedding_pair(**kwargs)


def layer_inputs(kind):
    return reprogramming_inputs() if kind == "reprogramming" else series()


def output_of(layer, inputs):
    """The layer's tensor output (PatchEmbedding's y, after checking its n_vars)."""
    out = layer(*inputs)
    if isinstance(out, tuple):
        y, n_vars = out
        assert n_vars == inputs[0].shape[1]
        return y
    return out


def leaves(inputs):
    """Fresh leaf copies of the inputs that require grad; one copy per distinct tensor, so that a
    tensor passed twice (Time-LLM's source and value) stays one tensor."""
    copies = {}
    return [copies.setdefault(id(t), t.detach().clone().requires_grad_(True)) for t in inputs]


def forward_backward(layer, inputs, seed=3):
    """(output, {name: gradient}) of sum(output * a seeded random cotangent), for the inputs
    ("input 0", ...) and every parameter; None where a tensor is not reached."""
    inputs = leaves(inputs)
    out = output_of(layer, inputs)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    names, params = zip(*layer.named_parameters())
    grads = torch.autograd.grad((out * cotangent).sum(), inputs + list(params), allow_unused=True)
    named = [f"input {i}" for i in range(len(inputs))] + list(names)
    return out.detach(), dict(zip(named, grads))


def assert_matches(what, got, ref):
    """Our result against the original's at the fp32 bar of docs/spec.md §4."""
    assert got is not None, f"{what}: missing (the original has it)"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != the original's {ref.dtype}"
    assert_close_to_oracle(what, got.detach(), ref.detach())


def assert_same_gradients(got: dict, ref: dict, what=""):
    assert got.keys() == ref.keys(), f"{what}gradient names {sorted(got)} != the original's {sorted(ref)}"
    for name, r in ref.items():
        g = got[name]
        if r is None:  # not reached in the original: ours may say None or zeros
            assert g is None or not g.any(), f"{what}d {name}: nonzero where the original has none"
        else:
            assert_matches(f"{what}d {name}", g, r)


def assert_same_results(got, ref, what=""):
    (out, grads), (ref_out, ref_grads) = got, ref
    assert_matches(f"{what}output", out, ref_out)
    assert_same_gradients(grads, ref_grads, what)


def assert_samples_dropout(first, second, without_dropout, p, elementwise):
    """Two outputs with dropout active: different masks, both unlike the dropout-free output; for a
    dropout applied to the output itself (elementwise), every element is 0 or kept and scaled."""
    assert not torch.allclose(first, second), "two calls with active dropout gave the same output"
    assert not torch.allclose(first, without_dropout), "active dropout gave the dropout-free output"
    if elementwise:
        for out in (first, second):
            kept = out != 0
            torch.testing.assert_close(out[kept], without_dropout[kept] / (1 - p), atol=1e-5, rtol=1e-4)
            fraction = kept.double().mean().item()
            assert abs(fraction - (1 - p)) < 0.15, f"kept fraction {fraction:.3f}, expected about {1 - p}"


# ------------------------------------------------------------------ plain calls

@ours_only
@pytest.mark.skipif(not TRITON_RUNS, reason=f"Triton cannot run here: {TRITON_PROBLEM}")
def test_triton_parametrization_runs_the_kernels_on_plain_calls():
    """The "triton" runs below exercise the kernels: a plain training call of either layer takes
    the Triton path (else every other test would only be testing the eager path twice)."""
    for kind, op in (("reprogramming", "reprogramming_attention"), ("patch_embedding", "patch_embedding")):
        orig, ours = layer_pair(kind)
        with dispatch.record_paths() as seen:
            got = forward_backward(ours, layer_inputs(kind))
        assert seen == {(op, "triton"): 1}, (kind, dict(seen))
        assert_same_results(got, forward_backward(orig, layer_inputs(kind)), f"{kind}: ")


# ------------------------------------------------------------------ 1. dropout follows the nn.Dropout modules

@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_monte_carlo_dropout_in_an_eval_layer_samples(kind, path):
    """Monte-Carlo dropout: I call model.eval() and then put the Dropout modules back in train();
    two forward passes sample different masks and differ from the eval output."""
    orig, ours = layer_pair(kind, dropout=0.5)
    inputs = layer_inputs(kind)
    orig.eval()
    ours.eval()
    with torch.no_grad():
        deterministic = output_of(orig, inputs)
        assert_matches("eval output", output_of(ours, inputs), deterministic)
        ours.dropout.train()
        torch.manual_seed(10)
        first = output_of(ours, inputs)
        torch.manual_seed(11)
        second = output_of(ours, inputs)
    assert_samples_dropout(first, second, deterministic, 0.5, elementwise=kind == "patch_embedding")


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_dropout_module_in_eval_inside_a_training_layer_is_off(kind, path):
    """I train the model but put a layer's Dropout module in eval(): that layer is deterministic and
    equals the original's eval output (and its gradients)."""
    orig, ours = layer_pair(kind, dropout=0.5)
    inputs = layer_inputs(kind)
    ours.train()
    ours.dropout.eval()
    got = forward_backward(ours, inputs)
    assert_same_results(got, forward_backward(orig.eval(), inputs))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_dropout_probability_one_drops_everything_like_the_original(kind, path):
    """I build the layer with dropout 1.0 (the original accepts it) and train: everything is
    dropped, as in the original (the reprogramming output is the out_projection bias; the patch
    embedding output is all zeros), with the original's gradients."""
    orig, ours = layer_pair(kind, dropout=1.0)
    inputs = layer_inputs(kind)
    got = forward_backward(ours.train(), inputs)
    ref = forward_backward(orig.train(), inputs)
    assert_same_results(got, ref)
    if kind == "reprogramming":
        expected = orig.out_projection.bias.detach().expand_as(ref[0])
    else:
        expected = torch.zeros_like(ref[0])
    torch.testing.assert_close(got[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("change", ["half_to_zero", "zero_to_one", "zero_to_half"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_dropout_probability_changed_after_construction_is_honoured(kind, change, path):
    """I change layer.dropout.p after building the layer (a schedule, or a config loaded later):
    training uses the new probability."""
    built, changed = {"half_to_zero": (0.5, 0.0), "zero_to_one": (0.0, 1.0), "zero_to_half": (0.0, 0.5)}[change]
    orig, ours = layer_pair(kind, dropout=built)
    inputs = layer_inputs(kind)
    orig.dropout.p = changed
    ours.dropout.p = changed
    orig.train()
    ours.train()
    if changed in (0.0, 1.0):  # deterministic: the same numbers as the original
        assert_same_results(forward_backward(ours, inputs), forward_backward(orig, inputs))
        return
    with torch.no_grad():
        without_dropout = output_of(orig.eval(), inputs)
        torch.manual_seed(10)
        first = output_of(ours, inputs)
        torch.manual_seed(11)
        second = output_of(ours, inputs)
    assert_samples_dropout(first, second, without_dropout, changed, elementwise=kind == "patch_embedding")


# ------------------------------------------------------------------ 2. what lives on the submodules counts

class CountingHook:
    """A forward hook (output * 1.5 + 0.25) or forward pre-hook (input * 0.5) that counts its calls."""

    def __init__(self, kind):
        self.kind, self.calls = kind, 0

    def __call__(self, module, args, output=None):
        self.calls += 1
        if self.kind == "forward_hook":
            return output * 1.5 + 0.25
        return (args[0] * 0.5,) + tuple(args[1:])

    def register(self, module):
        if self.kind == "forward_hook":
            return module.register_forward_hook(self)
        return module.register_forward_pre_hook(self)


HOOK_KINDS = ["forward_hook", "forward_pre_hook"]


def assert_hooked_layers_agree(orig, ours, submodule, hook_kind, inputs):
    hooks = {}
    for name, layer in (("original", orig), ("ours", ours)):
        hooks[name] = CountingHook(hook_kind)
        hooks[name].register(layer.get_submodule(submodule))
    got = forward_backward(ours, inputs)
    ref = forward_backward(orig, inputs)
    assert hooks["original"].calls == 1
    assert hooks["ours"].calls == hooks["original"].calls, (
        f"the {hook_kind} on {submodule} fired {hooks['ours'].calls} times, the original's once")
    assert_same_results(got, ref)


@pytest.mark.parametrize("hook_kind", HOOK_KINDS)
@pytest.mark.parametrize("submodule", ["query_projection", "key_projection", "value_projection", "out_projection"])
def test_reprogramming_hooks_on_projections_count(submodule, hook_kind, path):
    """I register a forward hook that changes a projection's output (or a pre-hook that scales its
    input): the layer's output and gradients change exactly as the original's, and the hook fires
    as often."""
    orig, ours = reprogramming_pair()
    assert_hooked_layers_agree(orig, ours, submodule, hook_kind, reprogramming_inputs())


@pytest.mark.parametrize("hook_kind", HOOK_KINDS)
@pytest.mark.parametrize("submodule", ["value_embedding.tokenConv", "value_embedding", "padding_patch_layer"])
def test_patch_embedding_hooks_on_submodules_count(submodule, hook_kind, path):
    """I register a forward hook (or pre-hook) on the patch embedding's conv, its value embedding or
    its padding layer: output and gradients change exactly as the original's, and the hook fires
    as often."""
    orig, ours = patch_embedding_pair()
    if submodule == "padding_patch_layer" and not hasattr(ours, "padding_patch_layer"):
        pytest.skip("our PatchEmbedding has no padding_patch_layer submodule (the original's ReplicationPad1d)")
    assert_hooked_layers_agree(orig, ours, submodule, hook_kind, series())


REPARAMETRIZATIONS = {
    "weight_norm": torch.nn.utils.weight_norm,  # hook-based
    "spectral_norm": torch.nn.utils.spectral_norm,  # hook-based, power iteration in training
    "parametrized_weight_norm": torch.nn.utils.parametrizations.weight_norm,
}


def training_steps(layer, inputs, steps=2, lr=0.1):
    """[(output, {name: gradient}, {name: parameter after the step})] over `steps` SGD steps."""
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    records = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out, grads = forward_backward(layer, inputs, seed=20 + step)
        for name, p in layer.named_parameters():
            p.grad = grads[name]
        optimizer.step()
        records.append((out, grads, {name: p.detach().clone() for name, p in layer.named_parameters()}))
    return records


def assert_same_training(ours, orig, inputs):
    for step, (got, ref) in enumerate(zip(training_steps(ours, inputs), training_steps(orig, inputs))):
        assert_same_results(got[:2], ref[:2], f"step {step}: ")
        assert got[2].keys() == ref[2].keys()
        for name in ref[2]:
            assert_matches(f"step {step}: {name} after the step", got[2][name], ref[2][name])


@silence_weight_norm_deprecation
@pytest.mark.parametrize("reparametrization", list(REPARAMETRIZATIONS))
@pytest.mark.parametrize("kind,submodule", [("reprogramming", "query_projection"),
                                            ("reprogramming", "value_projection"),
                                            ("patch_embedding", "value_embedding.tokenConv")])
def test_weight_reparametrizations_train_like_the_original(kind, submodule, reparametrization, path):
    """I apply weight_norm / spectral_norm (hook-based) or the parametrization-based weight_norm to
    a projection (or the conv) and train two SGD steps: outputs, gradients and parameters equal the
    original's at every step (the second backward included)."""
    orig, ours = layer_pair(kind)
    for layer in (orig, ours):
        REPARAMETRIZATIONS[reparametrization](layer.get_submodule(submodule))
    ours.load_state_dict(orig.state_dict())  # the same g/v, or the same u/v buffers
    assert_same_training(ours, orig, layer_inputs(kind))


class LowRankAdaptedLinear(nn.Linear):
    """An nn.Linear with a trainable low-rank update added in forward, as PEFT's LoRA layers do:
    y = x Wᵀ + b + (x Aᵀ) Bᵀ · scale, B nonzero."""

    def __init__(self, base: nn.Linear, rank=4, scale=0.5, seed=5):
        super().__init__(base.in_features, base.out_features, bias=True)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            self.bias.copy_(base.bias)
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, generator=g) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank, generator=g) * 0.3)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale


@pytest.mark.parametrize("submodule", ["query_projection", "value_projection"])
def test_lora_adapted_projection_counts(submodule, path):
    """I replace a projection by a LoRA-style nn.Linear subclass whose forward adds a low-rank term:
    the layer's output and gradients (the adapter's included) equal the original's."""
    orig, ours = reprogramming_pair()
    for layer in (orig, ours):
        setattr(layer, submodule, LowRankAdaptedLinear(getattr(layer, submodule)))
    assert_same_results(forward_backward(ours, reprogramming_inputs()),
                        forward_backward(orig, reprogramming_inputs()))


class ShiftedConv1d(nn.Conv1d):
    """An nn.Conv1d subclass whose forward adds a constant to the convolution."""

    def forward(self, x):
        return super().forward(x) + 0.25


def shifted_copy(conv: nn.Conv1d) -> ShiftedConv1d:
    new = ShiftedConv1d(conv.in_channels, conv.out_channels, kernel_size=3, padding=1, padding_mode="circular",
                        bias=False)
    with torch.no_grad():
        new.weight.copy_(conv.weight)
    return new


def test_patch_embedding_conv_subclass_with_its_own_forward_counts(path):
    """I replace the token conv by an nn.Conv1d subclass that overrides forward (adds a constant):
    output and gradients equal the original's."""
    orig, ours = patch_embedding_pair()
    for layer in (orig, ours):
        layer.value_embedding.tokenConv = shifted_copy(layer.value_embedding.tokenConv)
    assert_same_results(forward_backward(ours, series()), forward_backward(orig, series()))


# ------------------------------------------------------------------ 3. no stale results

def add_to_key_weight_data(layer, step):
    layer.key_projection.weight.data.add_(0.5)


def add_to_value_bias_data(layer, step):
    layer.value_projection.bias.data.add_(0.5)


def copy_into_weight_data(projection):
    def change(layer, step):
        weight = getattr(layer, projection).weight
        weight.data.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(100 + step)))
    return change


def load_vector_into_parameters(layer, step):
    vector = parameters_to_vector(layer.parameters())
    noise = torch.randn(vector.shape, generator=torch.Generator().manual_seed(200 + step))
    vector_to_parameters(vector + 0.3 * noise, layer.parameters())


def edit_the_loaded_vector_in_place(layer, step):
    """The parameters are views of one flat vector (vector_to_parameters, with their own version
    counters); the vector is then edited in place."""
    if not hasattr(layer, "flat_parameters"):
        layer.flat_parameters = parameters_to_vector(layer.parameters()).detach().clone()
        vector_to_parameters(layer.flat_parameters, layer.parameters())
    noise = torch.randn(layer.flat_parameters.shape, generator=torch.Generator().manual_seed(250 + step))
    layer.flat_parameters.add_(0.3 * noise)


def change_prototype_array(array, step):
    rng = np.random.default_rng(300 + step)
    array += rng.standard_normal(array.shape).astype(np.float32)  # in place, through NumPy


WEIGHT_CHANGES = {"key_weight_data_add": add_to_key_weight_data, "value_bias_data_add": add_to_value_bias_data,
                  "key_weight_data_copy": copy_into_weight_data("key_projection"),
                  "query_weight_data_copy": copy_into_weight_data("query_projection"),
                  "vector_to_parameters": load_vector_into_parameters,
                  "vector_to_parameters_then_vector_edited": edit_the_loaded_vector_in_place}


@pytest.mark.parametrize("calls", [1, 3], ids=["one_call_between_changes", "three_calls_between_changes"])
@pytest.mark.parametrize("change", list(WEIGHT_CHANGES) + ["numpy_prototypes_changed_in_place"])
def test_changes_that_bypass_version_counters_are_seen(change, calls, path):
    """In eval mode under no_grad I call the layer, then change a weight through .data,
    vector_to_parameters, or the prototypes' NumPy array in place, and call again: the result
    reflects the change, as the original's does (also after several calls in a row)."""
    orig, ours = reprogramming_pair()
    orig.eval()
    ours.eval()
    target, source, _ = reprogramming_inputs()
    array = source.numpy().copy()
    prototypes = torch.from_numpy(array)  # the same tensor object on every call
    if change == "vector_to_parameters_then_vector_edited":  # the parameters become views of one vector
        for layer in (orig, ours):
            edit_the_loaded_vector_in_place(layer, -1)
    with torch.no_grad(), dispatch.record_paths() as seen:
        for step in range(3):
            for call in range(calls):
                assert_matches(f"after {step} changes, call {call}", ours(target, prototypes, prototypes),
                               orig(target, prototypes, prototypes))
            if change in WEIGHT_CHANGES:
                WEIGHT_CHANGES[change](orig, step)
                WEIGHT_CHANGES[change](ours, step)
            else:
                change_prototype_array(array, step)
    if path == "triton":
        assert seen[("reprogramming_attention", "triton")] == 3 * calls, dict(seen)


# ------------------------------------------------------------------ 4. threads

def test_threads_sharing_an_eval_layer_get_their_own_prototypes(path):
    """Two threads share one layer in eval mode, each with its own prototypes, and call it over and
    over under no_grad: every result is that thread's own single-threaded result."""
    orig, ours = reprogramming_pair()
    orig.eval()
    ours.eval()
    target, _, _ = reprogramming_inputs()
    prototypes = [reprogramming_inputs(seed=40 + i)[1] for i in range(2)]
    with torch.no_grad():
        expected = [orig(target, p, p) for p in prototypes]
    calls = 20 if path == "triton" else 200
    start = threading.Barrier(2)

    def run(i):
        with torch.no_grad():
            start.wait()
            return [ours(target, prototypes[i], prototypes[i]) for _ in range(calls)]

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: a shared one-slot cache shows its races
    try:
        with dispatch.record_paths() as seen, concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = [f.result() for f in [pool.submit(run, i) for i in range(2)]]
    finally:
        sys.setswitchinterval(switch_interval)
    for i in range(2):
        for call, got in enumerate(results[i]):
            assert_matches(f"thread {i}, call {call}", got, expected[i])
    if path == "triton":
        assert seen[("reprogramming_attention", "triton")] > 0, dict(seen)


# ------------------------------------------------------------------ 5. forward-mode AD

def reprogramming_function(layer, wrt, target, source, value):
    """The layer as a function of one argument: target, source (value fixed), or the prototypes
    passed as both source and value (Time-LLM's call)."""
    if wrt == "target":
        return lambda t: layer(t, source, value), target
    if wrt == "source":
        return lambda s: layer(target, s, value), source
    return lambda p: layer(target, p, p), source


def tangent_like(t, seed=50):
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("wrt", ["target", "source", "prototypes"])
def test_reprogramming_jvp(wrt, path):
    """torch.func.jvp of the layer with respect to the target, source or prototypes: the tangent equals
    the original's (never zeros, never missing)."""
    orig, ours = reprogramming_pair()
    inputs = reprogramming_inputs()
    results = {}
    for name, layer in (("original", orig.eval()), ("ours", ours.eval())):
        fn, primal = reprogramming_function(layer, wrt, *inputs)
        results[name] = torch.func.jvp(fn, (primal,), (tangent_like(primal),))
    assert results["original"][1].abs().max() > 0
    assert_matches("primal", results["ours"][0], results["original"][0])
    assert_matches("tangent", results["ours"][1], results["original"][1])


def test_patch_embedding_jvp(path):
    """torch.func.jvp of the patch embedding with respect to the series: the tangent equals the
    original's."""
    orig, ours = patch_embedding_pair()
    (x,) = series()
    results = {name: torch.func.jvp(lambda x: layer(x)[0], (x,), (tangent_like(x),))
               for name, layer in (("original", orig.eval()), ("ours", ours.eval()))}
    assert_matches("primal", results["ours"][0], results["original"][0])
    assert_matches("tangent", results["ours"][1], results["original"][1])


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_jacfwd_on_a_tiny_input(kind, path):
    """torch.func.jacfwd of the layer with respect to a tiny target (or series): the Jacobian
    equals the original's."""
    orig, ours = layer_pair(kind)
    if kind == "reprogramming":
        target, source, value = reprogramming_inputs(batch=1, length=2, prototypes=5)
        jacobians = {name: torch.func.jacfwd(lambda t: layer(t, source, value))(target)
                     for name, layer in (("original", orig.eval()), ("ours", ours.eval()))}
    else:
        (x,) = series(batch=1, n_vars=1, length=12)
        jacobians = {name: torch.func.jacfwd(lambda x: layer(x)[0])(x)
                     for name, layer in (("original", orig.eval()), ("ours", ours.eval()))}
    assert_matches("Jacobian", jacobians["ours"], jacobians["original"])


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_forward_ad_dual_tensors(kind, path):
    """torch.autograd.forward_ad: a dual target (or series) through the layer gives the original's
    tangent."""
    orig, ours = layer_pair(kind)
    inputs = layer_inputs(kind)
    tangents = {}
    for name, layer in (("original", orig.eval()), ("ours", ours.eval())):
        with fwAD.dual_level():
            dual = fwAD.make_dual(inputs[0], tangent_like(inputs[0]))
            out = fwAD.unpack_dual(output_of(layer, (dual,) + inputs[1:]))
            tangents[name] = (out.primal.detach().clone(),
                              None if out.tangent is None else out.tangent.detach().clone())
    assert tangents["original"][1] is not None and tangents["original"][1].abs().max() > 0
    assert tangents["ours"][1] is not None, "forward AD: our output has no tangent"
    assert_matches("primal", tangents["ours"][0], tangents["original"][0])
    assert_matches("tangent", tangents["ours"][1], tangents["original"][1])


# ------------------------------------------------------------------ 6. double backward

def double_backward(layer, inputs, seed=60):
    """{name: gradient of |d loss / d input 0|² w.r.t. input 0 and every parameter} (None: unused)."""
    inputs = leaves(inputs)
    out = output_of(layer, inputs)
    loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))).sum()
    (g,) = torch.autograd.grad(loss, inputs[0], create_graph=True)
    names, params = zip(*layer.named_parameters())
    second = torch.autograd.grad(g.square().sum(), [inputs[0]] + list(params), allow_unused=True)
    return g.detach(), dict(zip(("input 0",) + names, second))


@pytest.mark.parametrize("kind,d_model,d_keys", [("reprogramming", 16, 16), ("reprogramming", 32, 16),
                                                 ("patch_embedding", 16, None)],
                         ids=["reprogramming-d_model16-d_keys16", "reprogramming-d_model32-d_keys16",
                              "patch_embedding"])
def test_double_backward(kind, d_model, d_keys, path):
    """Gradient penalty: the gradient of |d loss / d target|² (create_graph=True) with respect to
    the target (or series) and every parameter equals the original's."""
    if kind == "reprogramming":
        orig, ours = reprogramming_pair(d_model=d_model, d_keys=d_keys)
        inputs = reprogramming_inputs(d_model=d_model)
    else:
        orig, ours = patch_embedding_pair()
        inputs = series()
    got, ref = double_backward(ours, inputs), double_backward(orig, inputs)
    assert_matches("first gradient", got[0], ref[0])
    assert_same_gradients(got[1], ref[1], "second order: ")


# ------------------------------------------------------------------ 7. tracing modes and functorch

GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_torch_compile_fullgraph_in_eval(kind, grad_mode, path):
    """torch.compile(layer, fullgraph=True, backend="aot_eager") of an eval layer, called under
    torch.no_grad() or torch.inference_mode(): the original's result."""
    orig, ours = layer_pair(kind)
    orig.eval()
    ours.eval()
    inputs = layer_inputs(kind)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with GRAD_MODES[grad_mode]():
        got = output_of(compiled, inputs)
        ref = output_of(orig, inputs)
    assert_matches("compiled output", got, ref)


def run_script(script: str, args: list, **env_updates: str) -> dict:
    """`script` in a fresh Python process (argv: the self-check flag, then `args`), importing the
    timellm_fast this process imported, with this process's environment but for `env_updates`
    (TIMELLM_FAST_BACKEND dropped unless given); returns the JSON it printed after "RESULT "."""
    library_root = Path(timellm_fast.__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in (dispatch.BACKEND_ENV, "PYTHONPATH")}
    env.update(env_updates, PYTHONPATH=os.pathsep.join([str(TESTS), str(library_root)]))
    proc = subprocess.run([sys.executable, "-c", script, "1" if SELF_CHECK else "0", *args], cwd=TESTS, env=env,
                          capture_output=True, text=True, timeout=300)
    last_line = (proc.stderr.strip().splitlines() or [""])[-1]
    assert proc.returncode == 0, f"{env_updates}: the child failed: {last_line}\n{proc.stderr[-3000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def meta_or_fake_inputs(kind, make):
    if kind == "reprogramming":
        return (make(2, 4, D_MODEL), make(PROTOTYPES, D_LLM), make(PROTOTYPES, D_LLM))
    return (make(2, 3, 24),)


MODES = {"train": (True, torch.enable_grad), "eval_no_grad": (False, torch.no_grad)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_meta_device_forward(kind, mode, path):
    """I build the layer under torch.device("meta") (to size a model without memory) and call it
    on meta tensors: the output has the original's shape, dtype and device."""
    training, grad_mode = MODES[mode]
    shapes = {}
    for name, classes in (("original", (original.ReprogrammingLayer, original.PatchEmbedding)),
                          ("ours", (OurReprogrammingLayer, OurPatchEmbedding))):
        with torch.device("meta"):
            if kind == "reprogramming":
                layer = classes[0](D_MODEL, N_HEADS, D_KEYS, D_LLM)
            else:
                layer = classes[1](D_MODEL, PATCH_LEN, STRIDE, 0.1)
            inputs = meta_or_fake_inputs(kind, torch.empty)
        with grad_mode():
            out = output_of(layer.train(training), inputs)
        shapes[name] = (out.shape, out.dtype, out.device)
    assert shapes["ours"] == shapes["original"]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_fake_tensor_mode_forward(kind, mode, path):
    """Under FakeTensorMode (allow_non_fake_inputs, as shape propagation uses it) the layer with real
    weights on fake inputs gives the original's output shape and dtype."""
    training, grad_mode = MODES[mode]
    orig, ours = layer_pair(kind)
    shapes = {}
    for name, layer in (("original", orig), ("ours", ours)):
        with FakeTensorMode(allow_non_fake_inputs=True), grad_mode():
            out = output_of(layer.train(training), meta_or_fake_inputs(kind, torch.randn))
        shapes[name] = (out.shape, out.dtype)
    assert shapes["ours"] == shapes["original"]


FAKE_FIRST_CHILD = r"""
import json, sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import timellm_fast
import timellm_original as original
ours_classes = ((original.PatchEmbedding, original.ReprogrammingLayer) if sys.argv[1] == "1"
                else (timellm_fast.PatchEmbedding, timellm_fast.ReprogrammingLayer))
torch.manual_seed(0)
layers = {"patch_embedding": (original.PatchEmbedding(16, 8, 4, 0.0), ours_classes[0](16, 8, 4, 0.0),
                              lambda: (torch.randn(2, 3, 24),)),
          "reprogramming": (original.ReprogrammingLayer(16, 2, 16, 24, 0.0), ours_classes[1](16, 2, 16, 24, 0.0),
                            lambda: (torch.randn(2, 4, 16), torch.randn(37, 24), torch.randn(37, 24)))}
errors = {}
for kind, (orig, ours, make) in layers.items():
    ours.load_state_dict(orig.state_dict())
    for training in (False, True):
        orig.train(training)
        ours.train(training)
        with FakeTensorMode(allow_non_fake_inputs=True), torch.set_grad_enabled(training):
            ours(*make())  # in eval, the first call of the process: nothing real has run before it
        inputs = make()
        with torch.set_grad_enabled(training):
            got, ref = ours(*inputs), orig(*inputs)
        got, ref = (got[0], ref[0]) if isinstance(got, tuple) else (got, ref)
        errors[f"{kind} {'train' if training else 'eval'}"] = ((got - ref).abs().max() / (1 + ref.abs().max())).item()
print("RESULT " + json.dumps(errors))
"""


def test_fake_tensor_mode_first_then_real_calls_give_the_original_results(path):
    """In a fresh process, a layer's first call runs under FakeTensorMode (shape propagation before
    anything real ran), then real calls: they give the original's results (nothing a fake call made
    is kept for later calls)."""
    env = {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "")}
    if path == "eager":
        env[dispatch.BACKEND_ENV] = "eager"
    for name, err in run_script(FAKE_FIRST_CHILD, [], **env).items():
        assert err <= 1e-4, f"{name}: relative max abs error {err:.3e} against the original"


@pytest.mark.parametrize("grad_mode", ["grad_enabled", "no_grad"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_torch_export_gives_the_original_results(kind, grad_mode, path):
    """torch.export.export of the eval layer (with grad enabled, or under torch.no_grad() as for
    inference): the exported program's output equals the original's, on the example inputs and on
    new ones."""
    orig, ours = layer_pair(kind)
    orig.eval()
    ours.eval()
    inputs = layer_inputs(kind)
    with torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad():
        exported = torch.export.export(ours, inputs).module()
    new_inputs = tuple(t + 0.5 * tangent_like(t, seed=70 + i) for i, t in enumerate(inputs))
    for what, args in (("example inputs", inputs), ("new inputs", new_inputs)):
        assert_matches(f"exported program, {what}", output_of(exported, args), output_of(orig, args))


def weighted_sum(out, seed=80):
    return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))).sum()


@pytest.mark.parametrize("wrt", ["source", "prototypes"])
def test_func_grad_over_the_prototypes(wrt, path):
    """torch.func.grad of a weighted sum of the output with respect to source (value fixed) or the
    prototypes (passed as source and value, as Time-LLM does): the original's gradient."""
    orig, ours = reprogramming_pair()
    inputs = reprogramming_inputs()
    grads = {}
    for name, layer in (("original", orig.eval()), ("ours", ours.eval())):
        fn, primal = reprogramming_function(layer, wrt, *inputs)
        grads[name] = torch.func.grad(lambda p: weighted_sum(fn(p)))(primal)
    assert grads["original"].abs().max() > 0
    assert_matches(f"d {wrt}", grads["ours"], grads["original"])


def test_func_jacrev_over_the_prototypes(path):
    """torch.func.jacrev of the output of a tiny problem with respect to the prototypes: the
    original's Jacobian."""
    orig, ours = reprogramming_pair()
    target, source, _ = reprogramming_inputs(batch=1, length=1, prototypes=5)
    jacobians = {name: torch.func.jacrev(lambda p: layer(target, p, p))(source)
                 for name, layer in (("original", orig.eval()), ("ours", ours.eval()))}
    assert_matches("Jacobian", jacobians["ours"], jacobians["original"])


def test_func_vmap_over_prototype_sets(path):
    """torch.func.vmap of the layer over a batch of 3 prototype sets (in_dims=(None, 0, 0)): each
    slice equals the original's result for that set."""
    orig, ours = reprogramming_pair()
    target, _, _ = reprogramming_inputs()
    sources = torch.stack([reprogramming_inputs(seed=90 + i)[1] for i in range(3)])
    values = torch.stack([reprogramming_inputs(seed=90 + i)[2] for i in range(3)])
    got = torch.func.vmap(ours.eval(), in_dims=(None, 0, 0))(target, sources, values)
    ref = torch.stack([orig.eval()(target, s, v) for s, v in zip(sources, values)])
    assert_matches("vmapped output", got, ref)


# ------------------------------------------------------------------ 8. FSDP2

def fsdp_unavailable_reason():
    if not (dist.is_available() and dist.is_gloo_available()):
        return "torch.distributed with gloo is not available"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"FSDP2 (torch.distributed.fsdp.fully_shard) is not available: {exc}"
    return None


@pytest.mark.skipif(fsdp_unavailable_reason() is not None, reason=str(fsdp_unavailable_reason()))
def test_fsdp2_sharded_projections_give_single_process_gradients(path, tmp_path):
    """FSDP2: fully_shard on every nn.Linear and the conv of Time-LLM's input stage, two gloo
    processes on half a batch each, one training step: the gradients (gathered) equal a single
    process's with the original layers."""
    model = dropin_fsdp_worker.build_model(original.PatchEmbedding, original.ReprogrammingLayer)
    x, target = dropin_fsdp_worker.batch()
    F.mse_loss(model(x), target).backward()
    reference = dropin_fsdp_worker.full_gradients(model)

    mp.spawn(dropin_fsdp_worker.run_rank, args=(dropin_fsdp_worker.free_port(), path, not SELF_CHECK, str(tmp_path)),
             nprocs=dropin_fsdp_worker.WORLD_SIZE, join=True)

    for rank in range(dropin_fsdp_worker.WORLD_SIZE):
        grads = torch.load(tmp_path / f"rank{rank}.pt")["grads"]
        assert grads.keys() == reference.keys()
        for name, ref in reference.items():
            assert ref.abs().max() > 0, f"{name}: a zero reference gradient proves nothing"
            assert_matches(f"rank {rank} d {name}", grads[name], ref)


# ------------------------------------------------------------------ 9. environment and inputs

CHILD = r"""
import json, sys
import torch, triton
self_check = sys.argv[1] == "1"
import timellm_fast
import timellm_original as original
from timellm_fast import dispatch
result = {"triton_interprets": bool(triton.knobs.runtime.interpret),
          "ours_runs_triton_on_cpu": dispatch.triton_device_problem(torch.device("cpu")) is None}
if sys.argv[2] == "run":
    ours_classes = ((original.PatchEmbedding, original.ReprogrammingLayer) if self_check
                    else (timellm_fast.PatchEmbedding, timellm_fast.ReprogrammingLayer))
    errors = {}
    torch.manual_seed(0)
    pairs = [(original.PatchEmbedding(16, 8, 4, 0.0), ours_classes[0](16, 8, 4, 0.0), (torch.randn(2, 3, 24),)),
             (original.ReprogrammingLayer(16, 2, 16, 24, 0.0), ours_classes[1](16, 2, 16, 24, 0.0),
              (torch.randn(2, 4, 16), torch.randn(37, 24), torch.randn(37, 24)))]
    with dispatch.record_paths() as seen:
        for orig, ours, inputs in pairs:
            ours.load_state_dict(orig.state_dict())
            outs = []
            for layer in (orig, ours):
                leaves = [t.clone().requires_grad_(True) for t in inputs]
                out = layer(*leaves)
                out = out[0] if isinstance(out, tuple) else out
                out.square().sum().backward()
                outs.append([out.detach()] + [t.grad for t in leaves])
            name = type(orig).__name__
            errors[name] = max(((a - b).abs().max() / (1 + b.abs().max())).item() for a, b in zip(*reversed(outs)))
    result.update(errors=errors, paths=sorted(f"{op}:{path}" for (op, path) in seen))
print("RESULT " + json.dumps(result))
"""


def run_child(interpret_value: str, action: str) -> dict:
    """The CHILD script in a fresh process with TRITON_INTERPRET=interpret_value (read at import)."""
    return run_script(CHILD, [action], TRITON_INTERPRET=interpret_value)


@pytest.mark.parametrize("value", ["false", "off", "no", "0", ""], ids=lambda v: repr(v))
def test_triton_interpret_off_values_run_the_layers(value):
    """TRITON_INTERPRET set to a value Triton reads as "off" ("false", "off", "no", "0", ""): the
    layers run on CPU tensors without error (our eager path) and give the original's results."""
    result = run_child(value, "run")
    assert result["triton_interprets"] is False, f"Triton itself reads {value!r} as on: {result}"
    for name, err in result["errors"].items():
        assert err <= 1e-4, f"{name}: relative max abs error {err:.3e} against the original"
    if not SELF_CHECK:
        assert result["ours_runs_triton_on_cpu"] == result["triton_interprets"], result
        assert all(p.endswith(":eager") for p in result["paths"]) and result["paths"], result


@ours_only
@pytest.mark.parametrize("value", ["1", "true", "on", "yes"], ids=lambda v: repr(v))
def test_triton_interpret_on_values_agree_with_triton(value):
    """TRITON_INTERPRET set to a value Triton reads as "on": our dispatch agrees that Triton runs
    on CPU tensors (triton_device_problem(cpu) is None), as triton.knobs.runtime.interpret says."""
    result = run_child(value, "check")
    assert result["triton_interprets"] is True, f"Triton itself reads {value!r} as off: {result}"
    assert result["ours_runs_triton_on_cpu"] is True, result


def test_series_shorter_than_patch_len_gives_the_original_single_patch(path):
    """A series shorter than patch_len that padding makes long enough (T=10, patch_len=16,
    stride=8; T + stride >= patch_len): one patch, the original's numbers."""
    orig, ours = patch_embedding_pair(patch_len=16, stride=8)
    inputs = series(length=10)
    got, ref = forward_backward(ours, inputs), forward_backward(orig, inputs)
    assert ref[0].shape[1] == 1
    assert_same_results(got, ref)


def test_series_too_short_even_with_padding_raises(path):
    """T + stride < patch_len (T=5, patch_len=16, stride=8): the original raises, and so do we,
    naming patch_len."""
    orig, ours = patch_embedding_pair(patch_len=16, stride=8)
    inputs = series(length=5)
    with pytest.raises(RuntimeError):
        orig(*inputs)
    with pytest.raises(Exception) as raised:
        ours(*inputs)
    if not SELF_CHECK:
        assert "patch_len" in str(raised.value), f"the error does not name patch_len: {raised.value}"


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_numpy_integer_sizes(kind, path):
    """I pass sizes read from a NumPy config (np.int64) to the constructor: the layer builds and
    computes what the original built with the same values does."""
    n = np.int64
    if kind == "reprogramming":
        orig, ours = reprogramming_pair(d_model=n(D_MODEL), d_keys=n(D_KEYS), n_heads=n(N_HEADS), d_llm=n(D_LLM))
    else:
        orig, ours = patch_embedding_pair(d_model=n(D_MODEL), patch_len=n(PATCH_LEN), stride=n(STRIDE))
    inputs = layer_inputs(kind)
    assert_same_results(forward_backward(ours, inputs), forward_backward(orig, inputs))


def test_d_keys_zero_means_the_default(path):
    """d_keys=0 means d_model // n_heads, as in the original (`d_keys or d_model // n_heads`)."""
    orig, ours = reprogramming_pair(d_model=32, d_keys=0)
    assert ours.query_projection.out_features == orig.query_projection.out_features == 32
    inputs = reprogramming_inputs(d_model=32)
    assert_same_results(forward_backward(ours, inputs), forward_backward(orig, inputs))


# ------------------------------------------------------------------ 10. patch_model

class InputStageOf(nn.Module):
    """Time-LLM's input stage around given layer objects (any classes, any constructor arguments)."""

    def __init__(self, patch_embedding, reprogramming_layer, vocab=40, num_tokens=30):
        super().__init__()
        d_llm = reprogramming_layer.key_projection.in_features
        self.patch_embedding = patch_embedding
        self.word_embeddings = nn.Parameter(torch.randn(vocab, d_llm))
        self.mapping_layer = nn.Linear(vocab, num_tokens)
        self.reprogramming_layer = reprogramming_layer

    def forward(self, x):  # x: [B, T, N] -> [B*N, P, d_llm]
        source = self.mapping_layer(self.word_embeddings.t()).t()
        enc, _ = self.patch_embedding(x.permute(0, 2, 1))
        return self.reprogramming_layer(enc, source, source)


class Wrapper(nn.Module):
    """A model holding the input stage one level down, so qualified names have a dot."""

    def __init__(self, stage):
        super().__init__()
        self.stage = stage

    def forward(self, x):
        return self.stage(x)


class ReprogrammingLayer(original.ReprogrammingLayer):
    """A user's subclass of Time-LLM's layer under the same class name, with its own forward."""

    def forward(self, target_embedding, source_embedding, value_embedding):
        return super().forward(target_embedding, source_embedding, value_embedding) + 1.0


class ShiftedReprogrammingLayer(original.ReprogrammingLayer):
    """A user's subclass of Time-LLM's layer under another name, with its own forward."""

    def forward(self, target_embedding, source_embedding, value_embedding):
        return super().forward(target_embedding, source_embedding, value_embedding) + 1.0


def model_input(length=32, n_vars=1):
    return torch.randn(2, length, n_vars, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("subclass", [ReprogrammingLayer, ShiftedReprogrammingLayer],
                         ids=["same_class_name", "other_class_name"])
def test_patch_model_leaves_a_subclass_with_its_own_forward_alone(subclass, path):
    """My model uses a subclass of Time-LLM's ReprogrammingLayer that overrides forward:
    patch_model does not replace it, warns naming it, and the model's output is unchanged."""
    torch.manual_seed(0)
    layer = subclass(D_MODEL, N_HEADS, D_KEYS, D_LLM, attention_dropout=0.0)
    model = Wrapper(InputStageOf(original.PatchEmbedding(D_MODEL, PATCH_LEN, STRIDE, 0.0), layer)).eval()
    x = model_input()
    with torch.no_grad():
        before = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch_model_under_test(model)
    assert model.stage.reprogramming_layer is layer, "the subclass was replaced"
    messages = [str(w.message) for w in caught]
    assert any("stage.reprogramming_layer" in m for m in messages), f"no warning names it: {messages}"
    with torch.no_grad():
        assert_matches("output after patch_model", model(x), before)


def test_patch_model_is_all_or_nothing(path):
    """My model has two recognizable layers and the second cannot be replaced (its dropout.p was
    set to 1.5, which no Dropout accepts): patch_model raises naming it, and swaps nothing."""
    torch.manual_seed(0)
    first = original.PatchEmbedding(D_MODEL, PATCH_LEN, STRIDE, 0.0)
    second = original.ReprogrammingLayer(D_MODEL, N_HEADS, D_KEYS, D_LLM, attention_dropout=0.0)
    second.dropout.p = 1.5
    model = Wrapper(InputStageOf(first, second))
    with pytest.raises(Exception) as raised:
        patch_model_under_test(model)
    assert "stage.reprogramming_layer" in str(raised.value), f"the error does not name the module: {raised.value}"
    assert model.stage.patch_embedding is first, "the first layer was swapped before the error"
    assert model.stage.reprogramming_layer is second


ODD_ARGUMENTS = {
    "dropout_one": (dict(d_model=D_MODEL, patch_len=PATCH_LEN, stride=STRIDE, dropout=1.0),
                    dict(d_model=D_MODEL, n_heads=N_HEADS, d_keys=D_KEYS, d_llm=D_LLM, attention_dropout=1.0)),
    "numpy_ints": (dict(d_model=np.int64(D_MODEL), patch_len=np.int64(PATCH_LEN), stride=np.int64(STRIDE), dropout=0.0),
                   dict(d_model=np.int64(D_MODEL), n_heads=np.int64(N_HEADS), d_keys=np.int64(D_KEYS),
                        d_llm=np.int64(D_LLM), attention_dropout=0.0)),
    "d_keys_zero": (dict(d_model=32, patch_len=PATCH_LEN, stride=STRIDE, dropout=0.0),
                    dict(d_model=32, n_heads=N_HEADS, d_keys=0, d_llm=D_LLM, attention_dropout=0.0)),
}


@pytest.mark.parametrize("arguments", list(ODD_ARGUMENTS))
def test_patch_model_replaces_layers_built_with_inputs_the_original_accepts(arguments, path):
    """Layers built with inputs the original accepts (dropout 1.0, NumPy int sizes, d_keys=0) are
    replaced by patch_model, and the patched model computes what the unpatched one does."""
    pe_arguments, rl_arguments = ODD_ARGUMENTS[arguments]
    torch.manual_seed(0)
    stage = InputStageOf(original.PatchEmbedding(**pe_arguments), original.ReprogrammingLayer(**rl_arguments))
    model = Wrapper(stage).train()
    old = (stage.patch_embedding, stage.reprogramming_layer)
    x = model_input()
    ref = forward_backward(model, (x,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch_model_under_test(model)
    new = (stage.patch_embedding, stage.reprogramming_layer)
    messages = [str(w.message) for w in caught]
    assert new[0] is not old[0] and isinstance(new[0], OurPatchEmbedding), (type(new[0]), messages)
    assert new[1] is not old[1] and isinstance(new[1], OurReprogrammingLayer), (type(new[1]), messages)
    assert_same_results(forward_backward(model, (x,)), ref)
