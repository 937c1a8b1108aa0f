"""Command line: ``timellm-fast [check|bench|all|forecast]`` (default ``all``: check, then bench).

* ``check`` runs every op on the device present against the float64 oracle and prints the max
  errors, the SPEC §4 tolerance and which path ran. On a machine without CUDA it turns on
  Triton's interpreter so the kernels themselves are checked (slowly), not only the fallback.
* ``bench`` times eager against our op per SPEC §2 shape. Kernel timings mean something only
  on a GPU; on the CPU it says so and times the eager paths.
* ``forecast`` trains Time-LLM briefly with eager and with our layers (timellm_fast.forecast).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if not torch.cuda.is_available():
    # must precede the first import of the kernels (triton.jit reads it at decoration time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import dispatch  # noqa: E402
from .data import ett_windows  # noqa: E402
from .patch_embedding import patch_embedding  # noqa: E402
from .reference import patch_embedding_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (name, B*N rows, d_model) for the patch embedding with T=512, patch_len 16, stride 8 (SPEC §2)
PATCH_SHAPES = [("explained-gpt2", 28, 32), ("etth1-folded", 168, 32), ("ecl-folded", 7704, 16),
                ("traffic-folded", 20688, 16)]


def _series(rows: int, seq_len: int = 512) -> tuple:
    """x: [rows // 7 (+1), 7, T] windows of real ETTh1, cut to `rows` series."""
    windows, source = ett_windows((rows + 6) // 7, seq_len)
    x = windows.permute(0, 2, 1).reshape(-1, seq_len)[:rows]  # [rows, T]
    return x.reshape(rows, 1, seq_len).to(DEVICE), source


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def check(rows: int = 14) -> bool:
    print(f"device: {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'cpu'}; "
          f"Triton interpreter: {dispatch.interpreter_enabled()}")
    x_base, source = _series(rows, 96)
    print(f"data: {source}")
    print(f"{'op':<16} {'dtype':<9} {'path':<7} {'err y':>9} {'err dW':>9} {'err dx':>9} {'fp32 tol':>9}  ok")
    all_ok = True
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        w = (torch.randn(32, 16, 3) / 7).to(DEVICE, dtype).requires_grad_(True)
        x = x_base.to(dtype).clone().requires_grad_(True)
        y = patch_embedding(x, w, 16, 8)
        grad = torch.randn_like(y)
        y.backward(grad)
        path = dispatch.last_path["patch_embedding"]
        x64 = x.detach().double().requires_grad_(True)
        w64 = w.detach().double().requires_grad_(True)
        y64 = patch_embedding_reference(x64, w64, 16, 8)
        y64.backward(grad.double())
        errs = [_err(y, y64), _err(w.grad, w64.grad), _err(x.grad, x64.grad)]
        scales = [1 + t.abs().max().item() for t in (y64, w64.grad, x64.grad)]
        if dtype == torch.float32:
            ok = all(e <= 1e-4 * s for e, s in zip(errs, scales))
        else:  # one rounding of an fp32-accurate result: within one ulp of the dtype
            ulp = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
            ok = all(e <= 2 * ulp * s for e, s in zip(errs, scales))
        all_ok &= ok
        print(f"{'patch_embedding':<16} {str(dtype).split('.')[-1]:<9} {path:<7} "
              f"{errs[0]:>9.2e} {errs[1]:>9.2e} {errs[2]:>9.2e} {1e-4 * scales[0]:>9.2e}  "
              f"{'yes' if ok else 'NO'}")
    return all_ok


def _time(fn, reps: int) -> float:
    """Median seconds of fn() after a warm-up, with CUDA events on a GPU."""
    fn()
    times = []
    for _ in range(reps):
        if DEVICE.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(reps: int = 20) -> None:
    if DEVICE.type != "cuda":
        print("\nbench: no CUDA device: Triton kernel timings need a GPU. Timing the eager "
              "reference only (the path CPU users get).")
        shapes = PATCH_SHAPES[:2]
    else:
        print(f"\nbench on {torch.cuda.get_device_name()}: median of {reps} runs, forward, bf16")
        shapes = PATCH_SHAPES
    print(f"{'shape':<16} {'rows':>6} {'eager ms':>9} {'ours ms':>9} {'speedup':>8}")
    for name, rows, d_model in shapes:
        x, _ = _series(rows)
        dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
        x = x.to(dtype)
        w = (torch.randn(d_model, 16, 3) / 7).to(DEVICE, dtype)
        with torch.no_grad():
            eager = _time(lambda: patch_embedding_reference(x, w, 16, 8).to(dtype), reps)
            if DEVICE.type == "cuda":
                ours = _time(lambda: patch_embedding(x, w, 16, 8), reps)
                print(f"{name:<16} {rows:>6} {eager * 1e3:>9.3f} {ours * 1e3:>9.3f} "
                      f"{eager / ours:>7.2f}x")
            else:
                print(f"{name:<16} {rows:>6} {eager * 1e3:>9.3f} {'n/a':>9} {'n/a':>8}")


def main(argv=None) -> int:
    from .forecast import add_forecast_arguments, forecast_main

    parser = argparse.ArgumentParser(prog="timellm-fast", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="{all,check,bench,forecast}")
    commands.add_parser("all", help="check, then bench (the default)")
    commands.add_parser("check", help="every op against the float64 oracle")
    commands.add_parser("bench", help="eager against our ops at the SPEC shapes")
    add_forecast_arguments(commands.add_parser(
        "forecast", help="train Time-LLM briefly on ETTh1 with eager and fast layers; MSE/MAE and step times"))
    args = parser.parse_args(argv)
    if args.command == "forecast":
        return forecast_main(args)
    args.command = args.command or "all"
    ok = True
    if args.command in ("all", "check"):
        ok = check()
    if args.command in ("all", "bench"):
        bench()
    if not ok:
        print("\ncheck FAILED: an op is outside its tolerance", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
