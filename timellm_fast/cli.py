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
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if not torch.cuda.is_available():
    # must precede the first import of the kernels (triton.jit reads it at decoration time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import dispatch  # noqa: E402
from .data import ett_windows  # noqa: E402
from .patch_embedding import patch_embedding  # noqa: E402
from .reference import patch_embedding_reference, reprogramming_reference  # noqa: E402
from .reprogramming import ReprogrammingLayer  # noqa: E402

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


def _tolerance(dtype: torch.dtype, scale: float) -> float:
    """fp32: SPEC §4's 1e-4 (1 + max|oracle|); half precision: two ulps of the dtype at that
    scale (one rounding of an fp32-accurate result, with room for the rounded inputs)."""
    if dtype == torch.float32:
        return 1e-4 * scale
    return 2.0 ** -(7 if dtype == torch.bfloat16 else 10) * scale


def _check_patch_embedding(x_base: torch.Tensor, dtype: torch.dtype) -> tuple:
    torch.manual_seed(0)
    w = (torch.randn(32, 16, 3) / 7).to(DEVICE, dtype).requires_grad_(True)
    x = x_base.to(dtype).clone().requires_grad_(True)
    y = patch_embedding(x, w, 16, 8)
    grad = torch.randn_like(y)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y64 = patch_embedding_reference(x64, w64, 16, 8)
    y64.backward(grad.double())
    pairs = {"y": (y, y64), "dW": (w.grad, w64.grad), "dx": (x.grad, x64.grad)}
    return dispatch.last_path["patch_embedding"], pairs


def _check_reprogramming(target_base: torch.Tensor, dtype: torch.dtype) -> tuple:
    torch.manual_seed(0)
    layer = ReprogrammingLayer(32, 4, d_keys=32, d_llm=96, attention_dropout=0.0).to(DEVICE, dtype)
    target = target_base.to(dtype).clone().requires_grad_(True)
    protos = (torch.randn(1000, 96) / 10).to(DEVICE, dtype).requires_grad_(True)
    out = layer(target, protos, protos)
    grad = torch.randn_like(out)
    out.backward(grad)
    params64 = [p.detach().double().requires_grad_(True) for p in layer.parameters()]
    t64 = target.detach().double().requires_grad_(True)
    p64 = protos.detach().double().requires_grad_(True)
    wq, bq, wk, bk, wv, bv, wo, bo = params64
    out64 = reprogramming_reference(t64, p64, p64, wq, bq, wk, bk, wv, bv, wo, bo, 4)
    out64.backward(grad.double())
    pairs = {"out": (out, out64), "d target": (target.grad, t64.grad),
             "d prototypes": (protos.grad, p64.grad), "dWq": (layer.query_projection.weight.grad, wq.grad),
             "dWk": (layer.key_projection.weight.grad, wk.grad)}
    return dispatch.last_path["reprogramming_attention"], pairs


def check(rows: int = 14) -> bool:
    print(f"device: {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'cpu'}; "
          f"Triton interpreter: {dispatch.interpreter_enabled()}")
    x_base, source = _series(rows, 96)
    print(f"data: {source}")
    # patch embeddings of the same real windows feed the reprogramming check
    with torch.no_grad():
        target_base = patch_embedding_reference(x_base, torch.randn(32, 16, 3, device=DEVICE) / 7, 16, 8)
    print(f"{'op':<16} {'dtype':<9} {'path':<7} {'tensor':<13} {'max err':>9} {'tolerance':>9}  ok")
    all_ok = True
    for op, run, inputs in (("patch_embedding", _check_patch_embedding, x_base),
                            ("reprogramming", _check_reprogramming, target_base)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            path, pairs = run(inputs, dtype)
            for name, (got, ref) in pairs.items():
                err = _err(got, ref)
                tol = _tolerance(dtype, 1 + ref.abs().max().item())
                all_ok &= err <= tol
                print(f"{op:<16} {str(dtype).split('.')[-1]:<9} {path:<7} {name:<13} {err:>9.2e} "
                      f"{tol:>9.2e}  {'yes' if err <= tol else 'NO'}")
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


def bench_suite_dir() -> Optional[Path]:
    """bench/ of a source checkout (the suites are not part of the wheel)."""
    candidate = Path(__file__).resolve().parent.parent / "bench"
    return candidate if (candidate / "conftest.py").is_file() else None


def bench(out: Optional[str] = None, budget_s: Optional[float] = None, select: Optional[str] = None) -> int:
    """Runs the pytest-benchmark suites on the device present and writes JSON, markdown and plots.

    budget_s: cases run in priority order (the issue's targets first) and those that would start
    after budget_s seconds are skipped and listed. select: a pytest -k expression."""
    suite = bench_suite_dir()
    if suite is None:
        print("\nbench: the suites live in the source checkout's bench/ folder; running the quick "
              "built-in comparison instead.")
        quick_bench()
        return 0
    device = torch.cuda.get_device_name().replace(" ", "-") if DEVICE.type == "cuda" else "cpu"
    out = out or str(suite / "results" / f"{'local-' if DEVICE.type != 'cuda' else ''}{device}-"
                     f"{datetime.date.today().isoformat()}")
    if DEVICE.type != "cuda":
        print("\nbench: no CUDA device. Kernel timings need a GPU: this runs the suites in their "
              "reduced CPU form (our path in Triton's interpreter), to prove they run, not to time.")
    cmd = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
           f"--bench-out={out}", "--benchmark-columns=median,rounds"]
    if budget_s is not None:
        cmd.append(f"--bench-budget-s={budget_s}")
    if select:
        cmd += ["-k", select]
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=str(suite.parent))


def quick_bench(reps: int = 20) -> None:
    shapes = PATCH_SHAPES if DEVICE.type == "cuda" else PATCH_SHAPES[:2]
    print(f"{'shape':<16} {'rows':>6} {'eager ms':>9} {'ours ms':>9} {'speedup':>8}")
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    for name, rows, d_model in shapes:
        x, _ = _series(rows)
        x = x.to(dtype)
        w = (torch.randn(d_model, 16, 3) / 7).to(DEVICE, dtype)
        with torch.no_grad():
            eager = _time(lambda: patch_embedding_reference(x, w, 16, 8).to(dtype), reps)
            if DEVICE.type == "cuda":
                ours = _time(lambda: patch_embedding(x, w, 16, 8), reps)
                print(f"{name:<16} {rows:>6} {eager * 1e3:>9.3f} {ours * 1e3:>9.3f} {eager / ours:>7.2f}x")
            else:
                print(f"{name:<16} {rows:>6} {eager * 1e3:>9.3f} {'n/a':>9} {'n/a':>8}")


def main(argv=None) -> int:
    from .forecast import add_forecast_arguments, forecast_main

    parser = argparse.ArgumentParser(prog="timellm-fast", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="{all,check,bench,forecast}")
    commands.add_parser("all", help="check, then bench (the default)")
    commands.add_parser("check", help="every op against the float64 oracle")
    bench_parser = commands.add_parser("bench", help="pytest-benchmark suites against every peer")
    bench_parser.add_argument("--out", help="results folder (default bench/results/<device>-<date>)")
    bench_parser.add_argument("--budget-s", type=float, default=None,
                              help="run the cases in priority order (targets first) and skip those "
                                   "that would start after this many seconds")
    bench_parser.add_argument("-k", dest="select", default=None, help="pytest -k expression selecting cases")
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
        ok &= bench(getattr(args, "out", None), getattr(args, "budget_s", None),
                     getattr(args, "select", None)) == 0
    if not ok:
        print("\nFAILED: an op is outside its tolerance or a benchmark failed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
