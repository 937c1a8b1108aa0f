"""patch_model on the Time-LLM ports people install: neuralforecast and PyPOTS, the real packages.

neuralforecast (``neuralforecast.models.timellm``) ships Time-LLM's PatchEmbedding (with its own
ReplicationPad1d and TokenEmbedding) and ReprogrammingLayer; PyPOTS ships the ReprogrammingLayer
(``pypots.nn.modules.timellm.layers``, constructor argument ``d_k``) and uses PatchTST's linear
PatchEmbedding, which is another layer and must be left alone. Each test builds the package's own
modules, patches a copy, and compares the output and every gradient with the unpatched one at
docs/spec.md §4's fp32 bar; the whole-model tests also train both through the package's own ``fit`` and
compare the losses step by step and the forecasts.

The whole models run offline: a 1-layer GPT-2 built from a transformers config (random weights)
and a byte-level GPT-2 tokenizer with no merges (every byte one token), both written to a
temporary folder. neuralforecast's TimeLLM loads them from that folder (its ``llm`` argument);
PyPOTS's backbone loads ``openai-community/gpt2`` by name, so its two loader names are pointed at
the folder. Every dropout is 0 so the patched and unpatched runs are comparable (ours draws its
masks with Philox, the originals with torch's generator).

Skipped, with the install command, where a package is not installed:
``pip install -e ".[integrations]"``, in a venv of its own (PyPOTS pins transformers <= 4.57.6).
"""
import copy
import importlib
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import timellm_original
from helpers import TRITON_RUNS
from timellm_fast import dispatch, patch_model
from timellm_fast.patch_embedding import PatchEmbedding as OurPatchEmbedding
from timellm_fast.reprogramming import ReprogrammingLayer as OurReprogrammingLayer

INSTALL = "pip install -e '.[integrations]' in a venv of its own (PyPOTS pins transformers <= 4.57.6)"
needs_neuralforecast = pytest.mark.skipif(importlib.util.find_spec("neuralforecast") is None,
                                          reason=f"neuralforecast is not installed: {INSTALL}")
needs_pypots = pytest.mark.skipif(importlib.util.find_spec("pypots") is None,
                                  reason=f"PyPOTS is not installed: {INSTALL}")

#: the small backbone: GPT-2's width is Time-LLM's d_llm
D_LLM, SEQ_LEN, HORIZON = 32, 32, 4
PATH = "triton" if TRITON_RUNS else "eager"  # what our layers run here (conftest: the interpreter on a CPU)


# ------------------------------------------------------------------ comparison

def outputs_and_gradients(model: nn.Module, run):
    """(output, {parameter name: gradient}) of one forward/backward; `run(model)` returns the output."""
    model.zero_grad(set_to_none=True)
    out = run(model)
    g = torch.Generator().manual_seed(9)
    out.backward(torch.randn(out.shape, generator=g))
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_close(what: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """docs/spec.md §4's fp32 bar with the unpatched model as the reference."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref.double()).abs().max().item()
    tol = 1e-4 * (1 + ref.abs().max().item())
    assert err <= tol, f"{what}: max abs err {err:.3e} > {tol:.3e}"


def assert_same_answer(original: nn.Module, patched: nn.Module, run, expected_ops: dict) -> None:
    """Output and every gradient of `patched` equal `original`'s; our ops ran as `expected_ops`
    ({op: calls}) on this machine's path, so the comparison is of our layers, not of two originals."""
    ref_out, ref_grads = outputs_and_gradients(original, run)
    with dispatch.record_paths() as seen:
        out, grads = outputs_and_gradients(patched, run)
    assert dict(seen) == {(op, PATH): calls for op, calls in expected_ops.items()}
    assert ref_out.abs().max() > 0
    assert_close("output", out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert_close(f"d {name}", grads[name], ref)


def zero_dropout(model: nn.Module) -> nn.Module:
    """Every nn.Dropout at p = 0 (the ports hard-wire the reprogramming layer's to 0.1)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def patched_copy(model: nn.Module, expected: dict):
    """A deep copy of `model` with patch_model applied; `expected` maps each name patch_model must
    replace to the class it replaces there. Returns (the copy, the warnings patch_model gave)."""
    patched = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = patch_model(patched)
    assert {r.name: r.old_class for r in summary} == expected
    for r in summary:
        assert r.new_class in (OurPatchEmbedding, OurReprogrammingLayer)
        assert isinstance(patched.get_submodule(r.name), r.new_class)
    return patched, [str(w.message) for w in caught if "timellm_fast" in str(w.message)]


# ------------------------------------------------------------------ an offline GPT-2

@pytest.fixture(scope="module")
def offline_gpt2(tmp_path_factory):
    """A folder holding a 1-layer GPT-2 (random weights, every dropout 0) and a byte-level GPT-2
    tokenizer without merges, loadable with from_pretrained and no network."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    folder = tmp_path_factory.mktemp("offline-gpt2")
    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=1024, n_embd=D_LLM, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    transformers.GPT2Model(config).save_pretrained(str(folder))
    return folder


def input_stage(patch_embedding_class, reprogramming_class) -> nn.Module:
    """Time-LLM's input stage (prototypes, patch embedding, reprogramming) built from the given classes."""
    torch.manual_seed(0)
    return timellm_original.InputStage(d_llm=D_LLM, patch_embedding_class=patch_embedding_class,
                                       reprogramming_class=reprogramming_class)


def series(batch: int = 2, n_vars: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, SEQ_LEN, n_vars, generator=g)


# ------------------------------------------------------------------ neuralforecast

@needs_neuralforecast
def test_neuralforecast_layers_give_the_same_outputs_and_gradients():
    from neuralforecast.models import timellm as nf

    original = input_stage(nf.PatchEmbedding, nf.ReprogrammingLayer)
    patched, notes = patched_copy(original, {"patch_embedding": nf.PatchEmbedding,
                                             "reprogramming_layer": nf.ReprogrammingLayer})
    assert notes == []
    x = series(n_vars=3)
    assert_same_answer(original, patched, lambda m: m(x),
                       {"patch_embedding": 1, "reprogramming_attention": 1})


def neuralforecast_timellm(folder, tmp_path, **overrides):
    """neuralforecast's TimeLLM on the offline GPT-2, every dropout 0, a quiet CPU trainer."""
    from neuralforecast.models import TimeLLM

    settings = dict(h=HORIZON, input_size=SEQ_LEN, patch_len=8, stride=4, d_ff=16, d_llm=D_LLM, d_model=16,
                    n_heads=2, llm=str(folder), dropout=0.0, max_steps=3, batch_size=2, windows_batch_size=4,
                    random_seed=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                    enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    settings.update(overrides)
    return zero_dropout(TimeLLM(**settings))


@needs_neuralforecast
def test_neuralforecast_timellm_gives_the_same_outputs_and_gradients(offline_gpt2, tmp_path):
    from neuralforecast.models import timellm as nf

    original = neuralforecast_timellm(offline_gpt2, tmp_path).train()
    patched, _ = patched_copy(original, {"patch_embedding": nf.PatchEmbedding,
                                         "reprogramming_layer": nf.ReprogrammingLayer})
    x = series(batch=3)  # [windows, input_size, 1]: neuralforecast's univariate insample_y
    assert_same_answer(original, patched, lambda m: m({"insample_y": x}),
                       {"patch_embedding": 1, "reprogramming_attention": 1})


@needs_neuralforecast
def test_neuralforecast_fit_with_a_patched_model_matches_step_by_step(offline_gpt2, tmp_path):
    """README's recipe: patch the model, then hand it to NeuralForecast (which deep-copies it);
    fit's training losses and the forecasts equal the unpatched model's."""
    import pandas as pd
    from neuralforecast import NeuralForecast

    t = np.arange(80)
    frame = pd.DataFrame({"unique_id": np.repeat(["a", "b"], len(t)), "ds": np.tile(t, 2),
                          "y": np.concatenate([np.sin(t / 4), np.cos(t / 5) + t / 40])})

    def fit(patch: bool):
        model = neuralforecast_timellm(offline_gpt2, tmp_path)
        if patch:
            assert [r.name for r in patch_model(model)] == ["patch_embedding", "reprogramming_layer"]
        forecaster = NeuralForecast(models=[model], freq=1)
        forecaster.fit(frame)
        fitted = forecaster.models[0]
        return fitted, [loss for _, loss in fitted.train_trajectories], forecaster.predict()["TimeLLM"].to_numpy()

    original, ref_losses, ref_forecast = fit(patch=False)
    with dispatch.record_paths() as seen:
        patched, losses, forecast = fit(patch=True)
    assert isinstance(patched.reprogramming_layer, OurReprogrammingLayer)  # the deep copy kept our layers
    assert isinstance(patched.patch_embedding, OurPatchEmbedding)
    assert seen[("reprogramming_attention", PATH)] >= 3 and seen[("patch_embedding", PATH)] >= 3
    assert len(ref_losses) == 3 and len(set(ref_losses)) > 1  # three steps that changed the model
    for step, (got, ref) in enumerate(zip(losses, ref_losses)):
        assert abs(got - ref) <= 1e-4 * (1 + abs(ref)), f"step {step}: loss {got} vs unpatched {ref}"
    assert_close("forecast", torch.tensor(forecast), torch.tensor(ref_forecast))


# ------------------------------------------------------------------ PyPOTS

@needs_pypots
def test_pypots_reprogramming_layer_gives_the_same_outputs_and_gradients():
    from pypots.nn.modules.timellm.layers import ReprogrammingLayer as PyPOTSReprogrammingLayer

    original = input_stage(timellm_original.PatchEmbedding, PyPOTSReprogrammingLayer)
    patched, notes = patched_copy(original, {"patch_embedding": timellm_original.PatchEmbedding,
                                             "reprogramming_layer": PyPOTSReprogrammingLayer})
    assert notes == []
    layer = patched.reprogramming_layer  # d_k read from the projections' shapes
    assert (layer.d_model, layer.n_heads, layer.d_keys, layer.d_llm) == (16, 2, 16, D_LLM)
    x = series(n_vars=3)
    assert_same_answer(original, patched, lambda m: m(x),
                       {"patch_embedding": 1, "reprogramming_attention": 1})


class _FromFolder:
    """Stands in for a transformers class in PyPOTS's backbone module: from_pretrained of the
    Hugging Face name it asks for loads the offline folder instead."""

    def __init__(self, cls, folder):
        self.cls, self.folder = cls, folder

    def from_pretrained(self, name, **kwargs):
        assert name == "openai-community/gpt2", name  # what PyPOTS's GPT2 backbone asks for
        return self.cls.from_pretrained(str(self.folder), **kwargs)


@pytest.fixture
def pypots_offline(offline_gpt2, monkeypatch):
    """PyPOTS's TimeLLM backbone loading GPT-2 and its tokenizer from the offline folder."""
    import transformers
    backbone = importlib.import_module("pypots.nn.modules.timellm.backbone")
    monkeypatch.setattr(backbone, "GPT2Model", _FromFolder(transformers.GPT2Model, offline_gpt2))
    monkeypatch.setattr(backbone, "GPT2Tokenizer", _FromFolder(transformers.GPT2Tokenizer, offline_gpt2))


def pypots_timellm():
    """PyPOTS's TimeLLM forecaster (GPT2 backbone, 1 layer, one epoch per fit), every dropout 0, on the CPU."""
    from pypots.forecasting import TimeLLM

    torch.manual_seed(0)
    model = TimeLLM(n_steps=SEQ_LEN, n_features=2, n_pred_steps=HORIZON, n_pred_features=2, term="long",
                    llm_model_type="GPT2", n_layers=1, patch_size=8, patch_stride=4, d_llm=D_LLM, d_model=16,
                    d_ffn=16, n_heads=2, dropout=0.0, domain_prompt_content="two test series", batch_size=2,
                    epochs=1, device="cpu", verbose=False, model_saving_strategy=None)
    zero_dropout(model.model)
    return model


@needs_pypots
def test_pypots_timellm_gives_the_same_outputs_and_gradients(pypots_offline):
    from pypots.nn.modules.timellm.layers import ReprogrammingLayer as PyPOTSReprogrammingLayer

    original = pypots_timellm().model.train()  # the nn.Module PyPOTS trains
    patched, notes = patched_copy(original, {"backbone.reprogramming_layer": PyPOTSReprogrammingLayer})
    # PatchTST's linear patch embedding is another layer: left alone, and the warning says why
    assert len(notes) == 1 and "backbone.patch_embedding" in notes[0] and "value_embedding is Linear" in notes[0]
    assert type(patched.backbone.patch_embedding) is type(original.backbone.patch_embedding)
    x = series(n_vars=2)
    batch = {"X": x, "missing_mask": torch.ones_like(x)}
    assert_same_answer(original, patched, lambda m: m(batch)["forecasting"], {"reprogramming_attention": 1})


@needs_pypots
def test_pypots_fit_with_a_patched_model_matches(pypots_offline):
    """README's recipe: patch the forecaster's model after building it (its optimizer already
    holds the parameters, which patch_model keeps) and before fit; the forecasts after one epoch
    (three steps) equal the unpatched forecaster's."""
    g = np.random.default_rng(0)
    t = np.arange(6 * 5 + SEQ_LEN + HORIZON)[:, None]
    values = (np.sin(t / np.array([[4.0, 7.0]])) + 0.1 * g.standard_normal((len(t), 2))).astype("float32")
    train = {"X": np.stack([values[5 * i:5 * i + SEQ_LEN] for i in range(6)]),
             "X_pred": np.stack([values[5 * i + SEQ_LEN:5 * i + SEQ_LEN + HORIZON] for i in range(6)])}

    def fit(patch: bool):
        forecaster = pypots_timellm()
        if patch:
            assert [r.name for r in patch_model(forecaster.model)] == ["backbone.reprogramming_layer"]
        before = {name: p.detach().clone() for name, p in forecaster.model.named_parameters() if p.requires_grad}
        torch.manual_seed(1)  # the training loader's shuffle
        forecaster.fit(train)
        moved = any(not torch.equal(p, before[name]) for name, p in forecaster.model.named_parameters()
                    if name in before)
        return forecaster, moved, forecaster.predict({"X": train["X"]})["forecasting"]

    _, ref_moved, ref_forecast = fit(patch=False)
    with dispatch.record_paths() as seen:
        patched, moved, forecast = fit(patch=True)
    assert ref_moved and moved  # both trained
    assert isinstance(patched.model.backbone.reprogramming_layer, OurReprogrammingLayer)
    assert seen[("reprogramming_attention", PATH)] >= 3  # three training batches, then predict
    assert_close("forecast", torch.tensor(forecast), torch.tensor(ref_forecast))
