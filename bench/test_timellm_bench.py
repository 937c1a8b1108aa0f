"""Whole-stage and whole-model rows: the Time-LLM input stage (prototypes + patch embedding +
reprogramming) and a full Time-LLM step on a 6-layer GPT-2 backbone (docs/spec.md §2 explained example),
eager vs fast, training step and inference; inference reuses the prototypes (both models) and
our layer's prototype side across calls (timellm_fast.reuse_prototypes), also at large batch,
reported as series per second (the whole model in micro-batches of SERVE_CHUNK windows; the
input-stage row takes all rows in one call). The report divides input-stage time by full-step
time so users see where our win matters."""
import contextlib

import pytest
import torch

from cases import run_case
from common import DEVICE, FULL, ON_GPU, Shape, patch_embedding_cost, reprogramming_cost
from conftest import RESULTS
from timellm_fast import reuse_prototypes
from timellm_fast.data import ett_windows
from timellm_fast.models import TimeLLM, TimeLLMConfig

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
if FULL:
    CONFIG = dict(seq_len=512, pred_len=96, d_model=32, d_ff=32, n_heads=8, llm_layers=6, d_llm=768,
                  llm_heads=12, num_tokens=1000, backbone="gpt2")
    BATCHES = {"explained-gpt2": 4, "large-batch": 20688 // 7}  # x 7 ETTh1 variables = B*N series
    # The whole model is served in micro-batches of this many windows (x 7 series), as a serving
    # loop would: one call with all 20688 series does not fit a 139 GiB GPU for eager or ours (the
    # GPT-2 backbone's activations, not the input stage; bench/ROOFLINE.md).
    SERVE_CHUNK = 256
else:
    CONFIG = dict(seq_len=64, pred_len=16, d_model=16, d_ff=16, n_heads=2, llm_layers=1, d_llm=32,
                  llm_heads=2, num_tokens=37, backbone="gpt2")
    BATCHES = {"cpu-tiny": 1}
    SERVE_CHUNK = 1


def build(fast: bool, training: bool) -> TimeLLM:
    torch.manual_seed(0)
    model = TimeLLM(TimeLLMConfig(dropout=0.0, attention_dropout=0.0, **CONFIG), fast=fast).to(DEVICE)
    return model.train(training)


def shape_of(name: str, batch: int) -> Shape:
    c = CONFIG
    return Shape(name, batch * 7, c["d_model"], c["d_ff"], c["d_llm"], seq_len=c["seq_len"],
                 n_heads=c["n_heads"], num_protos=c["num_tokens"])


def stage_cost(s: Shape, vocab: int) -> tuple:
    """FLOPs of the input stage: the prototype GEMM (vocab x d_llm x S) plus both layers."""
    pe, rp = patch_embedding_cost(s, DTYPE, False), reprogramming_cost(s, DTYPE, False)
    e = torch.finfo(DTYPE).bits // 8
    return (pe[0] + rp[0] + 2.0 * vocab * s.d_llm * s.num_protos,
            pe[1] + rp[1] + e * (vocab * s.d_llm + vocab * s.num_protos))


def priority(params) -> int:
    return 1  # after the kernel targets, before the rest of the grid


@pytest.mark.parametrize("mode", ["train-step", "inference"])
@pytest.mark.parametrize("what", ["input-stage", "full-model"])
@pytest.mark.parametrize("impl", ["eager", "ours"])
@pytest.mark.parametrize("batch_name", sorted(BATCHES))
def test_timellm(benchmark, batch_name, impl, what, mode):
    if batch_name == "large-batch" and mode != "inference":
        pytest.skip("the large-batch row is inference (series per second)")
    training = mode == "train-step"
    model = build(fast=impl == "ours", training=training)
    batch = BATCHES[batch_name]
    windows, _ = ett_windows(batch, CONFIG["seq_len"])
    x = windows.to(DEVICE)  # [B, T, 7]
    series = x.permute(0, 2, 1)  # [B, 7, T]
    shape = shape_of(batch_name, batch)
    vocab = model.word_embeddings.shape[0]

    def input_stage():
        source = model.prototypes()
        enc, _ = model.patch_embedding(series)
        return model.reprogramming_layer(enc, source, source)

    def full_model():
        if batch_name != "large-batch":
            return model(x)
        return [model(x[i:i + SERVE_CHUNK]) for i in range(0, batch, SERVE_CHUNK)]

    forward = input_stage if what == "input-stage" else full_model

    def step():
        with torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE != torch.float32):
            if training:
                out = forward()
                out.float().square().mean().backward()
            else:
                with torch.no_grad():
                    forward()

    cost = stage_cost(shape, vocab)
    # inference as a serving loop runs it: nothing trains, so the prototype side is reused
    with contextlib.nullcontext() if training else reuse_prototypes():
        row = run_case(benchmark, RESULTS, op=f"timellm-{what}", shape=shape, dtype=DTYPE, mode=mode, impl=impl,
                       step=step, cost=(cost[0] * (3 if training else 1), cost[1]))
    if row["status"] == "ok":
        row["series_per_s"] = shape.rows / row["seconds"]
        benchmark.extra_info["series_per_s"] = row["series_per_s"]
    assert row["status"] in ("ok", "OOM")
