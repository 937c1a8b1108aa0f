"""torch.profiler trace of the Time-LLM input stage (patch embedding -> reprogramming) or the
whole model, with our layers or the eager ones.

    python bench/profile_trace.py [--what layers|model] [--eager] [--rows 168] [--out trace.json]

Writes a Chrome trace (open in chrome://tracing or Perfetto) and prints the top operators and
kernels by device time (without a GPU: CPU time of our layers' eager path). Our ops appear as
``timellm_fast::patch_embedding_fwd`` / ``_bwd`` and ``timellm_fast::reprogramming_attention_fwd``
/ ``_bwd``; their Triton kernels by kernel name underneath.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from timellm_fast import PatchEmbedding, ReprogrammingLayer  # noqa: E402
from timellm_fast.data import ett_windows  # noqa: E402
from timellm_fast.models import EagerPatchEmbedding, EagerReprogrammingLayer, TimeLLM, TimeLLMConfig  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def layer_stack(args, dtype):
    """(step function) one training step of patch embedding -> reprogramming on ETTh1 windows."""
    pe_cls, rp_cls = (EagerPatchEmbedding, EagerReprogrammingLayer) if args.eager else (PatchEmbedding, ReprogrammingLayer)
    patch = pe_cls(args.d_model, 16, 8, 0.1).to(DEVICE, dtype).train()
    reprogram = rp_cls(args.d_model, 8, args.d_keys, args.d_llm, 0.1).to(DEVICE, dtype).train()
    windows, source = ett_windows(max(1, args.rows // 7), args.seq_len)
    print(f"data: {source}")
    x = windows.permute(0, 2, 1).reshape(-1, 1, args.seq_len)[:args.rows].to(DEVICE, dtype)
    prototypes = (torch.randn(args.protos, args.d_llm) / args.d_llm ** 0.5).to(DEVICE, dtype).requires_grad_(True)

    def step():
        enc, _ = patch(x)
        out = reprogram(enc, prototypes, prototypes)
        out.float().square().mean().backward()

    return step


def full_model(args, dtype):
    cfg = TimeLLMConfig(seq_len=args.seq_len, pred_len=96, d_model=args.d_model, d_ff=args.d_keys,
                        llm_layers=6, d_llm=args.d_llm if DEVICE.type == "cuda" else 64)
    model = TimeLLM(cfg, fast=not args.eager).to(DEVICE).train()
    windows, source = ett_windows(max(1, args.rows // 7), args.seq_len)
    print(f"data: {source}")
    x = windows[: max(1, args.rows // 7)].to(DEVICE)

    def step():
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        out.float().square().mean().backward()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("layers", "model"), default="layers")
    parser.add_argument("--eager", action="store_true", help="profile the eager Time-LLM layers instead")
    gpu = DEVICE.type == "cuda"
    parser.add_argument("--rows", type=int, default=168 if gpu else 7, help="B*N series")
    parser.add_argument("--seq-len", type=int, default=512 if gpu else 64)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--d-keys", type=int, default=128 if gpu else 16)
    parser.add_argument("--d-llm", type=int, default=4096 if gpu else 64)
    parser.add_argument("--protos", type=int, default=1000 if gpu else 64, help="S text prototypes")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if gpu else "fp32")
    parser.add_argument("--out", default="timellm_fast_trace.json")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    step = (layer_stack if args.what == "layers" else full_model)(args, dtype)
    step()  # warm-up: compiles the kernels outside the trace
    activities = [torch.profiler.ProfilerActivity.CPU]
    if gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if gpu:
            torch.cuda.synchronize()
    prof.export_chrome_trace(args.out)
    sort_by = "device_time_total" if gpu else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top))
    print(f"Chrome trace written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
