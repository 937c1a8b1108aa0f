"""Reuse of prototype-side results and module state under copy.deepcopy, state_dict round trips,
.to(dtype / device), torch.no_grad, torch.inference_mode and pickling (torch.save / torch.load of
whole modules).

Reuse happens only inside a `timellm_fast.reuse_prototypes()` block (the ReprogrammingLayer's
prototype side, TimeLLM's prototypes); outside one every call recomputes. Inside, a value is never
served once a change autograd sees (an in-place op, load_state_dict, an optimizer step, a new
Parameter, .to()) has happened to what it was computed from. Every check compares against a fresh
computation (a new module with the same weights), bit for bit where the computation is the same.
"""
import copy
import io

import numpy as np
import pytest
import torch

from helpers import DEVICE
from timellm_fast import PatchEmbedding, dispatch, reuse_prototypes
from timellm_fast.reprogramming import ReprogrammingLayer


def layer_and_inputs(dtype=torch.float32):
    torch.manual_seed(0)
    layer = ReprogrammingLayer(16, 2, d_keys=16, d_llm=12, attention_dropout=0.1).to(DEVICE, dtype).eval()
    target = torch.randn(2, 4, 16, device=DEVICE).to(dtype)
    source = torch.randn(37, 12, device=DEVICE).to(dtype)
    return layer, target, source


def fresh(layer):
    """A new layer with the same weights and no cache history."""
    clone = ReprogrammingLayer(layer.d_model, layer.n_heads, d_keys=layer.d_keys, d_llm=layer.d_llm,
                               attention_dropout=layer.dropout.p)
    p = next(layer.parameters())
    clone = clone.to(p.device, p.dtype).eval()
    clone.load_state_dict(layer.state_dict())
    return clone


def warm(layer, target, source, reuse):
    with torch.no_grad():
        first = layer(target, source, source)
        hits = reuse.hits
        again = layer(target, source, source)
    assert reuse.hits == hits + 1, "the block must reuse for this test to mean anything"
    assert torch.equal(first, again)
    return first


def check_not_stale(layer, target, source, what):
    with torch.no_grad():
        got = layer(target, source, source)
        expected = fresh(layer)(target, source, source)
    assert torch.equal(got, expected), f"{what}: the layer served stale K/V"
    return got


def test_deepcopy_then_in_place_edit_of_the_copy():
    layer, target, source = layer_and_inputs()
    with reuse_prototypes() as reuse:
        before = warm(layer, target, source, reuse)
        twin = copy.deepcopy(layer)
        with torch.no_grad():
            twin.key_projection.weight.mul_(-1.5)
            twin.value_projection.bias.add_(1.0)
        changed = check_not_stale(twin, target, source, "deepcopy + in-place edit")
        assert not torch.allclose(changed, before)
        hits = reuse.hits
        with torch.no_grad():
            assert torch.equal(layer(target, source, source), before), "the original must be untouched"
        assert reuse.hits == hits + 1


def test_a_deepcopy_is_another_owner_and_is_correct():
    layer, target, source = layer_and_inputs()
    with reuse_prototypes() as reuse:
        warm(layer, target, source, reuse)
        twin = copy.deepcopy(layer)
        misses = reuse.misses
        check_not_stale(twin, target, source, "deepcopy")
        assert reuse.misses >= misses + 1


@pytest.mark.parametrize("how", ["load_state_dict", "assign_parameter", "optimizer_step"])
def test_weight_changes_invalidate_the_cache(how):
    layer, target, source = layer_and_inputs()
    with reuse_prototypes() as reuse:
        before = warm(layer, target, source, reuse)
        torch.manual_seed(1)
        other = ReprogrammingLayer(16, 2, d_keys=16, d_llm=12).to(DEVICE)
        if how == "load_state_dict":
            layer.load_state_dict(other.state_dict())
        elif how == "assign_parameter":
            layer.key_projection.weight = torch.nn.Parameter(other.key_projection.weight.detach().clone())
        else:
            optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
            layer(target.requires_grad_(), source, source).square().sum().backward()  # grad mode: no reuse
            optimizer.step()
        after = check_not_stale(layer, target.detach(), source, how)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_to_dtype_invalidates_the_cache(dtype):
    layer, target, source = layer_and_inputs()
    with reuse_prototypes() as reuse:
        warm(layer, target, source, reuse)
        layer.to(dtype)
        out = check_not_stale(layer, target.to(dtype), source.to(dtype), f".to({dtype})")
    assert out.dtype == dtype


def test_to_device_round_trip_invalidates_the_cache():
    """.to(another device) and back: new storages, so recomputed (meta stands in on a CPU machine)."""
    layer, target, source = layer_and_inputs()
    with reuse_prototypes() as reuse:
        warm(layer, target, source, reuse)
        state = copy.deepcopy(layer.state_dict())
        if DEVICE.type == "cpu":  # weights on meta lose their values: back with to_empty, then reload
            layer.to("meta").to_empty(device=DEVICE)
            layer.load_state_dict(state)
        else:
            layer.to("cpu").to(DEVICE)
        check_not_stale(layer, target, source, ".to(device) and back")


def test_source_changes_invalidate_the_cache():
    layer, target, source = layer_and_inputs()
    with reuse_prototypes() as reuse, torch.no_grad():
        before = warm(layer, target, source, reuse)
        source[3].mul_(4.0)  # in place
        changed = check_not_stale(layer, target, source, "in-place source edit")
        assert not torch.equal(changed, before)
        other = source.clone()  # a new tensor with the same values: recomputed, same result
        assert torch.equal(layer(target, other, other), changed)
        flipped = source.flip(0)  # a view with other strides
        check_not_stale(layer, target, flipped, "strided view of the source")
        value = torch.randn_like(source)  # same source, another value tensor
        assert torch.equal(layer(target, source, value), fresh(layer)(target, source, value))


def test_inference_mode_bypasses_the_cache_and_matches_no_grad():
    layer, target, source = layer_and_inputs()
    with reuse_prototypes() as reuse:
        expected = warm(layer, target, source, reuse)
        misses, hits = reuse.misses, reuse.hits
        with torch.inference_mode():
            inf_source = source.clone()  # an inference tensor: no version counter, never reused
            assert torch.equal(layer(target, inf_source, inf_source), expected)
            inf_source.mul_(2.0)
            again = layer(target, inf_source, inf_source)
        assert (reuse.misses, reuse.hits) == (misses, hits)  # not even looked up
    with torch.no_grad():
        assert torch.equal(again, fresh(layer)(target, source * 2.0, source * 2.0))


def test_grad_mode_never_uses_the_cache_and_trains_through_k_v():
    layer, target, source = layer_and_inputs()
    with reuse_prototypes() as reuse:
        warm(layer, target, source, reuse)
        hits = reuse.hits
        source = source.clone().requires_grad_()
        layer(target, source, source).sum().backward()
        assert reuse.hits == hits
    assert source.grad is not None and layer.key_projection.weight.grad is not None


def test_outside_a_reuse_block_every_call_recomputes():
    """Writes no version counter sees (.data, vector_to_parameters, NumPy memory) are seen outside a
    reuse block: nothing is reused there."""
    layer, target, _ = layer_and_inputs()
    array = np.random.default_rng(0).standard_normal((37, 12)).astype(np.float32)
    source = torch.from_numpy(array).to(DEVICE)
    with torch.no_grad():
        layer(target, source, source)
        layer.key_projection.weight.data.add_(0.5)
        check_not_stale(layer, target, source, ".data write")
        vector = torch.nn.utils.parameters_to_vector(layer.parameters())
        torch.nn.utils.vector_to_parameters(vector * 0.9, layer.parameters())
        check_not_stale(layer, target, source, "vector_to_parameters")
        if source.device.type == "cpu":  # shares the array's memory
            array *= 2.0
            check_not_stale(layer, target, source, "a NumPy write")


def _roundtrip(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_torch_save_load_whole_reprogramming_layer():
    layer, target, source = layer_and_inputs()
    with reuse_prototypes() as reuse:
        expected = warm(layer, target, source, reuse)
        loaded = _roundtrip(layer)
        with torch.no_grad():
            assert torch.equal(loaded(target, source, source), expected)
            loaded.key_projection.weight.add_(0.5)
        check_not_stale(loaded, target, source, "torch.load + in-place edit")
        with torch.no_grad():
            assert torch.equal(layer(target, source, source), expected)


def test_patch_embedding_deepcopy_state_dict_pickle_and_dtype():
    torch.manual_seed(0)
    layer = PatchEmbedding(16, 8, 4, 0.1).to(DEVICE).eval()
    x = torch.randn(2, 3, 40, device=DEVICE)
    with torch.no_grad():
        expected, _ = layer(x)
    for what, other in (("deepcopy", copy.deepcopy(layer)), ("torch.load", _roundtrip(layer))):
        with torch.no_grad():
            assert torch.equal(other(x)[0], expected), what
    twin = PatchEmbedding(16, 8, 4, 0.1).to(DEVICE).eval()
    twin.load_state_dict(layer.state_dict(), strict=True)
    with torch.inference_mode():
        assert torch.equal(twin(x)[0], expected)
    layer.to(torch.bfloat16)
    with torch.no_grad():
        y, _ = layer(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - expected).abs().max() <= 2 ** -7 * (1 + expected.abs().max())


# ------------------------------------------------------------------------ TimeLLM prototype cache

def tiny_model(seed=0):
    from timellm_fast.models import TimeLLM, TimeLLMConfig

    torch.manual_seed(seed)
    config = TimeLLMConfig(seq_len=32, pred_len=8, patch_len=8, stride=4, d_model=8, d_ff=8, n_heads=2,
                           num_tokens=10, dropout=0.0, attention_dropout=0.0, backbone="gpt2", llm_layers=1,
                           d_llm=16, llm_heads=2, backbone_dropout=0.0)
    return TimeLLM(config).to(DEVICE).eval()


def fresh_prototypes(model):
    with torch.no_grad():
        return model.mapping_layer(model.word_embeddings.t()).t()


def warm_prototypes(model, reuse):
    with torch.no_grad():
        first = model.prototypes()
        hits = reuse.hits
        assert torch.equal(model.prototypes(), first)
    assert reuse.hits == hits + 1
    return first


def test_prototype_cache_deepcopy_load_state_dict_to_dtype_and_pickle():
    model = tiny_model()
    x = torch.randn(2, 32, 3, device=DEVICE)
    with reuse_prototypes() as reuse:
        before = warm_prototypes(model, reuse)
        with torch.no_grad():
            forecast = model(x)

        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin.mapping_layer.weight.mul_(-2.0)
            assert torch.equal(twin.prototypes(), fresh_prototypes(twin))
            assert not torch.allclose(twin.prototypes(), before)
            assert torch.equal(model.prototypes(), before), "the original keeps its own values"
            assert not torch.allclose(twin(x), forecast)

        other = tiny_model(seed=1)
        model.load_state_dict(other.state_dict())
        with torch.no_grad():
            assert torch.equal(model.prototypes(), fresh_prototypes(model))
            assert torch.equal(model(x), other(x))

        model.to(torch.float64)
        with torch.no_grad():
            protos = model.prototypes()
        assert protos.dtype == torch.float64 and torch.equal(protos, fresh_prototypes(model))

        loaded = _roundtrip(other)
        with torch.no_grad():
            assert torch.equal(loaded(x), other(x))
            loaded.mapping_layer.bias.add_(1.0)
            assert torch.equal(loaded.prototypes(), fresh_prototypes(loaded))


def test_prototype_cache_inference_mode_and_grad_mode():
    model = tiny_model()
    with reuse_prototypes() as reuse:
        before = warm_prototypes(model, reuse)
        with torch.inference_mode():
            assert torch.equal(model.prototypes(), before)
        hits = reuse.hits
        protos = model.prototypes()  # grad mode, trainable mapping layer: recomputed with a graph
        assert protos.requires_grad and reuse.hits == hits
        protos.sum().backward()
        assert model.mapping_layer.weight.grad is not None
        with torch.no_grad():
            model.mapping_layer.weight.sub_(model.mapping_layer.weight.grad)  # an optimizer-like step
            assert torch.equal(model.prototypes(), fresh_prototypes(model))


def test_dispatch_counters_survive_deepcopy_of_modules():
    """Global state is module-level, not per-instance: copying a module never duplicates or resets it."""
    layer, target, source = layer_and_inputs()
    twin = copy.deepcopy(layer)
    with dispatch.record_paths() as seen, torch.no_grad():
        layer(target, source, source)
        twin(target, source, source)
    assert sum(seen.values()) == 2
