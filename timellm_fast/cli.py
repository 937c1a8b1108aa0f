"""Command line: timellm-fast [all|check|bench|forecast] (default: all, that is check, then bench).

  check     runs both ops in fp32, bf16 and fp16 against the float64 oracle and prints each max
            error, its tolerance and which path ran, then a verdict line. On a machine without
            CUDA it runs in a child process with Triton's interpreter turned on, so that the
            kernels themselves are checked (slowly), not only the eager fallback.
  bench     runs the pytest-benchmark suites: eager against our layers per shape. On a GPU the
            layers run their Triton kernels; elsewhere their eager path, in a reduced form that
            proves the suites run but times no kernel. Each run writes a new folder (a run number
            in its name) and ends by naming every file it wrote.
  forecast  trains a small Time-LLM briefly with eager and with our layers on ETTh1 and prints
            MSE/MAE and step times for both.

check, bench and all take --data (an ETT CSV or its folder) as forecast does; without it,
$TIMELLM_FAST_DATA, else a synthetic series, and the output says which. Importing this module
changes no environment variable: forecast and bench run the real dispatch (Triton on CUDA, the
eager path elsewhere).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from . import dispatch
from .data import DATA_ENV, DataNotFoundError, ett_windows, resolve_data
from .forecast import DATA_HELP, add_forecast_arguments, forecast_main
from .patch_embedding import patch_embedding
from .reference import patch_embedding_reference, reprogramming_reference
from .reprogramming import ReprogrammingLayer
from .timing import median_seconds

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (name, B*N rows, d_model) for the patch embedding with T=512, patch_len 16, stride 8 (docs/spec.md §2)
PATCH_SHAPES = [("explained-gpt2", 28, 32), ("etth1-folded", 168, 32), ("ecl-folded", 7704, 16),
                ("traffic-folded", 20688, 16)]


def _series(rows: int, seq_len: int = 512, data: Optional[str] = None) -> tuple:
    """x: [rows, 1, T] series cut from ETTh1 windows (the CSV `data` names, else
    $TIMELLM_FAST_DATA's), or from the synthetic stand-in when no data was given; and where they
    came from."""
    windows, source = ett_windows((rows + 6) // 7, seq_len, path=data)
    x = windows.permute(0, 2, 1).reshape(-1, seq_len)[:rows]  # [rows, T]
    return x.reshape(rows, 1, seq_len).to(DEVICE), source


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _tolerance(dtype: torch.dtype, scale: float) -> float:
    """fp32: docs/spec.md §4's 1e-4 (1 + max|oracle|); half precision: two ulps of the dtype at that
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


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"


def check(rows: int = 14, data: Optional[str] = None) -> bool:
    """Both ops against the float64 oracle on this process's device and interpreter setting, on
    series from `data` (a CSV or its folder; None: $TIMELLM_FAST_DATA, else synthetic); prints a
    table and a verdict line, returns whether every tensor is within tolerance."""
    problem = dispatch.triton_device_problem(DEVICE)
    if problem is not None:
        how = f"eager path, so the kernels are not checked ({problem})"
    elif DEVICE.type == "cuda":
        how = "Triton kernels on the GPU"
    else:
        how = ("Triton kernels in Triton's interpreter (TRITON_INTERPRET=1; no CUDA device): "
               "checks the kernels' numbers, slowly; says nothing about GPU speed")
    print(f"check: device {_device_name()}; ops run as: {how}")
    x_base, source = _series(rows, 96, data)
    print(f"data: {source}")
    # patch embeddings of the same real windows feed the reprogramming check
    with torch.no_grad():
        target_base = patch_embedding_reference(x_base, torch.randn(32, 16, 3, device=DEVICE) / 7, 16, 8)
    print(f"{'op':<16} {'dtype':<9} {'path':<7} {'tensor':<13} {'max err':>9} {'tolerance':>9}  ok")
    failed, total = [], 0
    for op, run, inputs in (("patch_embedding", _check_patch_embedding, x_base),
                            ("reprogramming", _check_reprogramming, target_base)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            path, pairs = run(inputs, dtype)
            dtype_name = str(dtype).split('.')[-1]
            for name, (got, ref) in pairs.items():
                err = _err(got, ref)
                tol = _tolerance(dtype, 1 + ref.abs().max().item())
                total += 1
                if not err <= tol:
                    failed.append(f"{op} {dtype_name} {name}")
                print(f"{op:<16} {dtype_name:<9} {path:<7} {name:<13} {err:>9.2e} "
                      f"{tol:>9.2e}  {'yes' if err <= tol else 'NO'}")
    print(f"\ncheck: {total - len(failed)}/{total} within tolerance"
          + (f"; outside it: {', '.join(failed)}" if failed else ""))
    return not failed


def check_command(data: Optional[str] = None) -> bool:
    """`check` as the user runs it: in this process on a GPU (or when the interpreter is already
    on), else in a child process started with TRITON_INTERPRET=1. The variable must be set
    before any Triton kernel is defined, which in this process may already have happened."""
    if DEVICE.type == "cuda" or dispatch.interpreting():
        return check(data=data)
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print("check: no CUDA device, so the check runs the Triton kernels in Triton's interpreter "
          "(a child process with TRITON_INTERPRET=1)", flush=True)
    data_args = ["--data", data] if data else []
    return subprocess.call([sys.executable, "-m", "timellm_fast", "check", *data_args], env=env) == 0


def bench_suite_dir() -> Optional[Path]:
    """bench/ of a source checkout (the suites are not part of the wheel)."""
    candidate = Path(__file__).resolve().parent.parent / "bench"
    return candidate if (candidate / "conftest.py").is_file() else None


class ResultsFolderNotEmpty(ValueError):
    """bench was given an --out folder that already holds files."""


def new_results_dir(parent: Path, stem: str) -> Path:
    """parent/<stem>-run<N>, N one more than the highest run of that stem there, created empty:
    a second run on the same day gets its own folder instead of overwriting the first's."""
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{stem}-run"
    runs = [int(p.name[len(prefix):]) for p in parent.glob(f"{prefix}*") if p.name[len(prefix):].isdigit()]
    number = max(runs, default=0) + 1
    while True:
        folder = parent / f"{prefix}{number}"
        try:
            folder.mkdir()  # exclusive: two runs started together do not share a folder
            return folder
        except FileExistsError:
            number += 1


def bench(out: Optional[str] = None, budget_s: Optional[float] = None, select: Optional[str] = None,
          data: Optional[str] = None) -> int:
    """Runs the pytest-benchmark suites on the device present and writes JSON, markdown and plots
    into `out` (default: a new bench/results/<device>-<date>-run<N>; an `out` that already holds
    files is refused), then names every file written.

    budget_s: cases run in priority order (the performance targets first) and those that would start
    after budget_s seconds are skipped and listed. select: a pytest -k expression. data: the ETT
    CSV (or its folder) the suites cut their series from."""
    suite = bench_suite_dir()
    if suite is None:
        print("\nbench: the suites live in the source checkout's bench/ folder; running the quick "
              "built-in comparison instead.")
        quick_bench(data=data)
        return 0
    if out is not None and Path(out).is_dir() and any(Path(out).iterdir()):
        raise ResultsFolderNotEmpty(f"--out {out} already holds files; results are never overwritten: "
                                    f"name a new folder")
    device = torch.cuda.get_device_name().replace(" ", "-") if DEVICE.type == "cuda" else "cpu"
    if out is None:
        stem = f"{'local-' if DEVICE.type != 'cuda' else ''}{device}-{datetime.date.today().isoformat()}"
        out = str(new_results_dir(suite / "results", stem))
    if DEVICE.type != "cuda":
        print("\nbench: no CUDA device. Kernel timings need a GPU: this runs the suites in their "
              "reduced CPU form, with our layers on their eager path, to prove the suites run, not to "
              "time kernels; results.md gives one wall-clock median per case and no ratios.")
    # -rs: every skipped case is listed with its reason
    cmd = [sys.executable, "-m", "pytest", str(suite), "-q", "-rs", "-p", "no:cacheprovider",
           f"--bench-out={out}", "--benchmark-columns=median,rounds"]
    if budget_s is not None:
        cmd.append(f"--bench-budget-s={budget_s}")
    if select:
        cmd += ["-k", select]
    print("running:", " ".join(cmd), flush=True)
    env = dict(os.environ)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the kernels' default, without Triton 3.9's warning
    if data:
        env[DATA_ENV] = data  # the suites' loaders read the variable (they run in pytest, not here)
    status = subprocess.call(cmd, cwd=str(suite.parent), env=env)
    written = sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() else []
    print(f"\nbench: {'wrote ' + ', '.join(written) + ' in ' + out if written else 'wrote no file'}")
    return status


def quick_bench(reps: int = 20, data: Optional[str] = None) -> None:
    on_gpu = DEVICE.type == "cuda"
    shapes = PATCH_SHAPES if on_gpu else PATCH_SHAPES[:2]
    print(f"{'shape':<16} {'rows':>6} {'eager ms':>9} {'ours ms':>9} {'speedup':>8}")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    for name, rows, d_model in shapes:
        x, _ = _series(rows, data=data)
        x = x.to(dtype)
        w = (torch.randn(d_model, 16, 3) / 7).to(DEVICE, dtype)
        with torch.no_grad():
            eager = median_seconds(lambda: patch_embedding_reference(x, w, 16, 8).to(dtype), cuda=on_gpu, reps=reps)
            if on_gpu:
                ours = median_seconds(lambda: patch_embedding(x, w, 16, 8), cuda=on_gpu, reps=reps)
                print(f"{name:<16} {rows:>6} {eager * 1e3:>9.3f} {ours * 1e3:>9.3f} {eager / ours:>7.2f}x")
            else:
                print(f"{name:<16} {rows:>6} {eager * 1e3:>9.3f} {'n/a':>9} {'n/a':>8}")


def _add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, metavar="PATH", help=DATA_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="timellm-fast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Checks and benchmarks of timellm_fast's fused Time-LLM layers, and a short "
                    "Time-LLM forecast with eager and with fast layers.",
        epilog="Without a command: all (check, then bench). Each command has its own --help.")
    commands = parser.add_subparsers(dest="command", metavar="{all,check,bench,forecast}")
    check_help = ("every op in fp32, bf16 and fp16 against the float64 oracle; on a machine without CUDA "
                  "in Triton's interpreter")
    bench_help = "the pytest-benchmark suites: eager, torch.compile and SDPA-fold against our layers"
    all_parser = commands.add_parser(
        "all", help="check, then bench (the default)",
        description=f"check ({check_help}), then bench ({bench_help}), with bench's default options. "
                    "Exits 1 if an op is outside its tolerance or a benchmark fails.")
    _add_data_argument(all_parser)
    check_parser = commands.add_parser(
        "check", help=check_help,
        description="Runs the patch embedding and the reprogramming layer, forward and backward, in fp32, "
                    "bf16 and fp16 on ETTh1 windows and compares every output and gradient with the float64 "
                    "oracle; prints each error beside its tolerance and which path ran, then a verdict line, "
                    "and exits 1 if a tensor is outside its tolerance. Without CUDA it runs the Triton kernels "
                    "in Triton's interpreter (slow, but it checks the kernels' own numbers).")
    _add_data_argument(check_parser)
    bench_parser = commands.add_parser(
        "bench", help=bench_help,
        description="Runs the benchmark suites of the source checkout's bench/ folder and writes results.json, "
                    "results.md and plots into a new folder, then names every file it wrote. On a GPU every "
                    "shape of the specification, timed with triton.testing.do_bench; without one a reduced "
                    "grid that proves the suites run and times no kernel.")
    bench_parser.add_argument("--out", help="results folder, new or empty (default: a new "
                                            "bench/results/<device>-<date>-run<N>)")
    bench_parser.add_argument("--budget-s", type=float, default=None,
                              help="run the cases in priority order (targets first) and skip those "
                                   "that would start after this many seconds")
    bench_parser.add_argument("-k", dest="select", default=None, help="pytest -k expression selecting cases")
    _add_data_argument(bench_parser)
    add_forecast_arguments(commands.add_parser(
        "forecast", help="train Time-LLM briefly on ETTh1 with eager and fast layers; MSE/MAE and step times",
        description="Trains a small Time-LLM for a few steps twice, with Time-LLM's eager layers and with ours, "
                    "from the same weights on the same batches, then evaluates both on test windows: prints "
                    "test MSE / MAE, the last training loss and the step times of each, and exits 1 if their "
                    "forecasts disagree."))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "forecast":
        try:
            return forecast_main(args)
        except DataNotFoundError as exc:
            print(f"timellm-fast forecast: error: {exc}", file=sys.stderr)
            return 2
    args.command = args.command or "all"
    data = getattr(args, "data", None)
    try:
        # a named path that is not there is an error before anything runs; the child processes
        # get the resolved CSV
        resolved = resolve_data(data)
    except DataNotFoundError as exc:
        print(f"timellm-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    data = str(resolved) if data and resolved is not None else None
    ok = True
    if args.command in ("all", "check"):
        ok = check_command(data)
    if args.command in ("all", "bench"):
        try:
            ok &= bench(getattr(args, "out", None), getattr(args, "budget_s", None),
                        getattr(args, "select", None), data) == 0
        except ResultsFolderNotEmpty as exc:
            print(f"timellm-fast bench: error: {exc}", file=sys.stderr)
            return 2
    if not ok:
        print("\nFAILED: an op is outside its tolerance or a benchmark failed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
