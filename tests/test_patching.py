"""patch_model / unpatch_model on hand-written copies of Time-LLM's original classes.

The classes below are written from docs/spec.md §1 with Time-LLM's class names, attributes and
submodules (including its own right-only ReplicationPad1d); timellm_fast never imports them and
must recognize them by structure alone.
"""
import copy

import pytest
import torch
import torch.nn as nn

import timellm_fast
from helpers import DEVICE, TRITON_RUNS
from timellm_fast import Replacement, dispatch, patch_model, unpatch_model
from timellm_fast.models import TimeLLM, TimeLLMConfig
from timellm_original import InputStage, PatchEmbedding, ReprogrammingLayer

OurPatchEmbedding = timellm_fast.PatchEmbedding
OurReprogrammingLayer = timellm_fast.patching.ReprogrammingLayer


def series(B=2, T=32, N=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, N, generator=g).to(DEVICE, dtype)


def output_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    g = torch.Generator().manual_seed(9)
    out.backward(torch.randn(out.shape, generator=g).to(out.device, out.dtype))
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_close(what, got, ref):
    err = (got.double() - ref.double()).abs().max().item()
    tol = 1e-4 * (1 + ref.abs().max().item())
    assert err <= tol, f"{what}: max abs err {err:.3e} > {tol:.3e}"


# ------------------------------------------------------------------ replacement and numbers

def test_patched_original_layers_give_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    original = InputStage().to(DEVICE)
    patched = copy.deepcopy(original)
    summary = patch_model(patched)
    assert [r.name for r in summary] == ["patch_embedding", "reprogramming_layer"]
    x = series()
    ref_out, ref_grads = output_and_grads(original, x)
    with dispatch.record_paths() as seen:
        out, grads = output_and_grads(patched, x)
    expected = "triton" if TRITON_RUNS else "eager"
    assert seen[("patch_embedding", expected)] == 1 and seen[("reprogramming_attention", expected)] == 1
    assert_close("output", out, ref_out)
    assert grads.keys() == ref_grads.keys() and len(grads) == 12
    for name in ref_grads:
        assert_close(f"d {name}", grads[name], ref_grads[name])


def test_summary_names_and_classes():
    torch.manual_seed(0)
    model = nn.ModuleDict({"blocks": nn.ModuleList([InputStage(), InputStage()]), "head": nn.Linear(4, 4)})
    summary = patch_model(model)
    assert summary == [
        Replacement("blocks.0.patch_embedding", PatchEmbedding, OurPatchEmbedding),
        Replacement("blocks.0.reprogramming_layer", ReprogrammingLayer, OurReprogrammingLayer),
        Replacement("blocks.1.patch_embedding", PatchEmbedding, OurPatchEmbedding),
        Replacement("blocks.1.reprogramming_layer", ReprogrammingLayer, OurReprogrammingLayer),
    ]
    assert isinstance(model["blocks"][1].reprogramming_layer, OurReprogrammingLayer)
    assert isinstance(model["head"], nn.Linear)


def test_same_parameter_objects_state_dict_keys_and_optimizer_keeps_working():
    torch.manual_seed(0)
    model = InputStage().to(DEVICE)
    keys_before = list(model.state_dict().keys())
    params_before = dict(model.named_parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    patch_model(model)
    assert list(model.state_dict().keys()) == keys_before
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[name] is params_before[name] for name in params_before)
    # the optimizer made before patching still updates the weights the new modules use
    weight = model.reprogramming_layer.query_projection.weight
    before = weight.detach().clone()
    model(series()).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(weight, before)
    assert weight is optimizer.param_groups[0]["params"][params_list_index(model, weight)]


def params_list_index(model, parameter):
    return [id(p) for p in model.parameters()].index(id(parameter))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_device_and_dtype_are_kept(dtype):
    torch.manual_seed(0)
    model = InputStage().to(DEVICE, dtype)
    x = series(dtype=dtype)
    with torch.no_grad():
        ref = model(x)
    patch_model(model)
    for name, p in model.named_parameters():
        assert p.dtype == dtype and p.device.type == DEVICE.type, name
    with torch.no_grad():
        out = model(x)
    assert out.dtype == dtype and out.device.type == DEVICE.type
    if dtype == torch.bfloat16:  # a few bf16 roundings apart; the kernel's bf16 accuracy is tested elsewhere
        assert (out.float() - ref.float()).abs().max() <= 0.05 * (1 + ref.float().abs().max())
    else:
        assert_close("output", out, ref)


@pytest.mark.parametrize("training", [True, False])
def test_train_eval_flag_is_kept(training):
    model = InputStage().train(training)
    model.patch_embedding.train(not training)  # one layer set apart from its parent
    patch_model(model)
    assert model.training == training
    assert model.patch_embedding.training == (not training)
    assert model.reprogramming_layer.training == training
    assert model.reprogramming_layer.dropout.training == training


def test_dropout_and_sizes_are_read_from_the_original():
    model = nn.Sequential(PatchEmbedding(24, 12, 5, 0.25), ReprogrammingLayer(16, 4, 6, 20, attention_dropout=0.3))
    patch_model(model)
    pe, rp = model[0], model[1]
    assert (pe.d_model, pe.patch_len, pe.stride, pe.dropout.p) == (24, 12, 5, 0.25)
    assert (rp.d_model, rp.n_heads, rp.d_keys, rp.d_llm, rp.dropout.p) == (16, 4, 6, 20, 0.3)


# ------------------------------------------------------------------ idempotence and undo

def test_patch_is_idempotent():
    model = InputStage()
    patch_model(model)
    layers = (model.patch_embedding, model.reprogramming_layer)
    assert patch_model(model) == []
    assert (model.patch_embedding, model.reprogramming_layer) == layers


def test_unpatch_restores_the_original_objects():
    torch.manual_seed(0)
    model = InputStage().to(DEVICE)
    originals = (model.patch_embedding, model.reprogramming_layer)
    x = series()
    with torch.no_grad():
        ref = model(x)
    patch_model(model)
    model.eval()  # a change made while patched is carried back
    summary = unpatch_model(model)
    assert summary == [Replacement("patch_embedding", OurPatchEmbedding, PatchEmbedding),
                       Replacement("reprogramming_layer", OurReprogrammingLayer, ReprogrammingLayer)]
    assert model.patch_embedding is originals[0] and model.reprogramming_layer is originals[1]
    assert not model.patch_embedding.training and not model.reprogramming_layer.training
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert unpatch_model(model) == []
    assert len(patch_model(model)) == 2  # and it can be patched again


def test_a_module_shared_by_two_parents_becomes_one_shared_replacement():
    shared = PatchEmbedding(8, 4, 2, 0.0)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    summary = patch_model(model)
    assert [r.name for r in summary] == ["a.0", "b.0"]
    assert model["a"][0] is model["b"][0] and isinstance(model["a"][0], OurPatchEmbedding)
    unpatch_model(model)
    assert model["a"][0] is shared and model["b"][0] is shared


def test_deepcopy_of_a_patched_model_can_be_unpatched():
    model = InputStage()
    patch_model(model)
    clone = copy.deepcopy(model)
    unpatch_model(clone)
    assert type(clone.patch_embedding) is PatchEmbedding
    assert clone.patch_embedding.value_embedding.tokenConv.weight is dict(clone.named_parameters())[
        "patch_embedding.value_embedding.tokenConv.weight"]
    assert isinstance(model.patch_embedding, OurPatchEmbedding)  # the source is untouched


# ------------------------------------------------------------------ what is not replaced

class PatchTSTStylePatchEmbedding(nn.Module):
    """Same class name elsewhere (Time-Series-Library's PatchTST): a Linear plus positions."""

    def __init__(self):
        super().__init__()
        self.patch_len, self.stride = 8, 4
        self.value_embedding = nn.Linear(8, 16, bias=False)
        self.position_embedding = nn.Identity()
        self.dropout = nn.Dropout(0.0)


PatchTSTStylePatchEmbedding.__name__ = "PatchEmbedding"


def linear_value_embedding():
    """PyPOTS's TimeLLM form (PatchTST's layer without positions): the patches go through a Linear."""
    layer = PatchEmbedding(16, 8, 4, 0.0)
    layer.value_embedding = nn.Linear(8, 16, bias=False)
    return layer


def zero_padded():
    layer = PatchEmbedding(16, 8, 4, 0.0)
    layer.padding_patch_layer = nn.ConstantPad1d((0, 4), 0.0)
    return layer


def no_bias():
    layer = ReprogrammingLayer(16, 2, 8, 24)
    layer.key_projection = nn.Linear(24, 16, bias=False)
    return layer


def wrong_heads():
    layer = ReprogrammingLayer(16, 2, 8, 24)
    layer.n_heads = 3
    return layer


def conv_with_bias():
    layer = PatchEmbedding(16, 8, 4, 0.0)
    layer.value_embedding.tokenConv = nn.Conv1d(8, 16, 3, padding=1, padding_mode="circular", bias=True)
    return layer


@pytest.mark.parametrize("make,reason", [
    (PatchTSTStylePatchEmbedding, "submodules"),
    (linear_value_embedding, "value_embedding is Linear, not Time-LLM's TokenEmbedding"),
    (zero_padded, "replication"),
    (conv_with_bias, "parameters"),
    (no_bias, "parameters"),
    (wrong_heads, "n_heads=3"),
])
def test_lookalikes_are_left_alone_with_a_warning(make, reason):
    layer = make()
    model = nn.Sequential(layer)
    with pytest.warns(UserWarning, match=reason) as caught:
        assert patch_model(model) == []
    assert model[0] is layer
    assert [w.filename for w in caught] == [__file__]  # the warning points at the caller of patch_model


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        patch_model("not a module")
    with pytest.raises(TypeError, match="model"):
        unpatch_model(None)
    with pytest.raises(ValueError, match="pass the model that contains it"):
        patch_model(PatchEmbedding(8, 4, 2, 0.0))


# ------------------------------------------------------------------ on the whole model

def tiny_config():
    return TimeLLMConfig(seq_len=32, pred_len=8, patch_len=8, stride=4, d_model=16, d_ff=16, n_heads=2,
                         num_tokens=50, dropout=0.0, attention_dropout=0.0, llm_layers=1, d_llm=32, llm_heads=2,
                         backbone_dropout=0.0)


def test_patching_an_original_built_timellm_matches_the_fast_built_one():
    config = tiny_config()
    torch.manual_seed(0)
    original = TimeLLM(config, patch_embedding_class=PatchEmbedding, reprogramming_class=ReprogrammingLayer)
    fast = TimeLLM(config, fast=True)
    fast.load_state_dict(original.state_dict(), strict=True)
    original.to(DEVICE).eval()
    fast.to(DEVICE).eval()
    x = series(B=2, T=32, N=2)
    with torch.no_grad():
        before = original(x)
        summary = patch_model(original)
        after = original(x)
        reference = fast(x)
    assert [(r.name, r.old_class, r.new_class) for r in summary] == [
        ("patch_embedding", PatchEmbedding, OurPatchEmbedding),
        ("reprogramming_layer", ReprogrammingLayer, OurReprogrammingLayer)]
    assert torch.equal(after, reference)  # the same modules on the same weights: bit for bit
    assert_close("patched vs original", after, before)


def test_our_eager_copies_are_recognized_too():
    model = TimeLLM(tiny_config(), fast=False)
    summary = patch_model(model)
    assert [(r.name, r.old_class.__name__, r.new_class) for r in summary] == [
        ("patch_embedding", "EagerPatchEmbedding", OurPatchEmbedding),
        ("reprogramming_layer", "EagerReprogrammingLayer", OurReprogrammingLayer)]
