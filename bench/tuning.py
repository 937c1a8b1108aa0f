"""Plumbing shared by the tile tuners (tune_attention.py, tune_patch_embedding.py) and
ncu_kernels.py. Import it first: without a GPU these scripts time or profile nothing, and run
only as smoke runs in Triton's interpreter, which must be turned on before Python starts
(TRITON_INTERPRET=1 python bench/tune_attention.py --smoke); it stops them otherwise."""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, List, Optional, Sequence

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # before Triton is imported

from timellm_fast.kernels._environment import interpreting  # noqa: E402
from timellm_fast.timing import median_seconds  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU and not interpreting():
    raise SystemExit("no CUDA device: the tuners and the Nsight Compute driver launch Triton kernels. On a "
                     "CPU they run only as a smoke run in Triton's interpreter: TRITON_INTERPRET=1 python "
                     "bench/<script>.py --smoke")

from common import CPU_SHAPES, SPEC_SHAPES  # noqa: E402  (after the check above: nothing to import without it)


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn() (do_bench, ~40 ms) on a GPU; one wall-clock call elsewhere (smoke runs)."""
    return median_seconds(fn, cuda=ON_GPU, reps=1, warmup_calls=0, rep_ms=40) * 1e3


class TuneLog:
    """The rows a sweep timed and the best tile per label, rewritten to `path` after every label so
    a sweep cut by its time limit keeps what it measured."""

    def __init__(self, path: str, environment: dict):
        self.path, self.environment = path, environment
        self.results: List[dict] = []
        self.best: dict = {}

    def write(self) -> None:
        with open(self.path, "w") as f:
            json.dump(dict(environment=self.environment, results=self.results, best=self.best), f, indent=1)

    def finish(self, start: float) -> None:
        self.write()
        print(f"wrote {self.path} ({len(self.results)} timings, {time.monotonic() - start:.0f} s)")

    def pick(self, label: str, rows: Sequence[dict], shipped: Sequence[int], extra: Sequence[str] = ()) -> Optional[dict]:
        """Records and prints the fastest correct, spill-free row of `rows` against the shipped tile."""
        ok = [r for r in rows if r["status"] == "ok" and not r.get("spills")]
        if not ok:
            return None
        win = min(ok, key=lambda r: r["ms"])
        ship = next((r for r in ok if r["shipped"]), None)
        self.best[label] = dict(best=win["tile"], best_ms=win["ms"], shipped=list(shipped),
                                shipped_ms=ship and ship["ms"], **{f"best_{k}": win.get(k) for k in extra})
        print(f"{label:<48} best {tuple(win['tile'])} {win['ms']:.4f} ms; shipped {tuple(shipped)} "
              f"{ship['ms'] if ship else float('nan'):.4f} ms", flush=True)
        return self.best[label]


def add_sweep_arguments(parser: argparse.ArgumentParser, *, shapes: str, budget_s: float, out: str) -> None:
    """The options every tuner takes (its own come next)."""
    parser.add_argument("--shapes", default=shapes, help="docs/spec.md §2 shape names, comma separated")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--budget-s", type=float, default=budget_s)
    parser.add_argument("--out", default=out)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape, two candidates: proves the script runs (the default without CUDA)")


def sweep_setup(args: argparse.Namespace) -> tuple:
    """(device, dtype, smoke, shapes, device name) of a sweep from its parsed options."""
    smoke = args.smoke or not ON_GPU
    shapes = CPU_SHAPES if smoke else [s for s in SPEC_SHAPES if s.name in args.shapes.split(",")]
    name = (torch.cuda.get_device_name() if ON_GPU else "cpu (interpreter)") + (" smoke run" if smoke else "")
    return torch.device("cuda" if ON_GPU else "cpu"), getattr(torch, args.dtype), smoke, shapes, name
