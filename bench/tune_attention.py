"""Tile sweep of the fused attention kernels on the GPU present.

    python bench/tune_attention.py [--shapes etth1-folded,weather-folded] [--dtype bfloat16]
                                   [--roles fwd,bwd_protos,bwd_rows] [--dropout] [--budget-s 240]
                                   [--jobs 12] [--out tune.json]

For each shape and kernel role it times every candidate tile (BLOCK_R, BLOCK_S, num_warps,
num_stages) with triton.testing.do_bench, checks each candidate's result against the shipped
tile's, and reports registers and spills of the candidate compiled ahead of time for this GPU's
arch (bench/aot_report.py, the same build the JIT makes). Candidates are first compiled in parallel
worker processes (Triton's on-disk cache then serves the timing process), so the sweep costs
little more than the timing itself. It prints the best tile per configuration of
kernels/attention_tiles.py; a winner goes into that table only after
bench/aot_filter_tiles.py (--tune this file) and tests/test_aot.py show it spill-free under every
Triton CI checks. "bwd_protos" is timed in the default mode (the row side added atomically),
"bwd_rows" as the deterministic mode adds it.

Without CUDA (or with --smoke) it runs on a tiny shape with two candidates, in Triton's
interpreter on a CPU, to prove the script works, not to tune.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(__file__))

from tuning import ON_GPU, TuneLog, add_sweep_arguments, sweep_setup, time_ms  # noqa: E402  (first: sets the kernels' environment)
import triton  # noqa: E402
import aot_report as report  # noqa: E402
from aot_configs import attention_configs  # noqa: E402
from timellm_fast.kernels import attention as attn  # noqa: E402
from timellm_fast.kernels import attention_tiles as tiles  # noqa: E402
from common import attention_core_inputs, core_from_keys  # noqa: E402
from tile_overrides import override_tiles, tile_key  # noqa: E402

ROLES = ("fwd", "bwd_protos", "bwd_rows")


def candidates(smoke: bool) -> list:
    if smoke:
        return [(16, 16, 4, 1), (32, 16, 4, 1)]
    tiles_ = itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3))
    # 128 x 128 logit tiles never fit next to an E >= 32 accumulator without spilling
    return [t for t in tiles_ if t[0] * t[1] <= 128 * 64]


def problem(shape, dtype: torch.dtype, device: torch.device, dropout: bool) -> dict:
    """The core's operands of one forward + backward at `shape` (a bench.common.Shape)."""
    x, mc, v, form = core_from_keys(*attention_core_inputs(shape, dtype, False, device), shape.n_heads)
    g = torch.Generator().manual_seed(1)
    t = dict(x=x, mc=mc.contiguous(), v=v.contiguous(), form=form, dropout_p=0.1 if dropout else 0.0,
             seed=torch.tensor([1234], dtype=torch.int64, device=device),
             grad=torch.randn(x.shape[0], v.shape[1] * v.shape[2], generator=g).to(device, dtype))
    t["out"], t["lse"] = run_role("fwd", t)
    return t


def run_role(role: str, t: dict):
    f = t["form"]
    if role == "fwd":
        return attn.attention_forward(t["x"], t["mc"], t["v"], f, t["dropout_p"], t["seed"])
    dx, dmc, dv = attn.attention_backward(t["x"], t["mc"], t["v"], t["out"], t["grad"], t["lse"], f, t["dropout_p"],
                                          t["seed"], deterministic=role == "bwd_rows")
    return torch.cat([dx.flatten(), dmc.flatten(), dv.flatten()])


def shipped_config(role: str, dtype: torch.dtype, shape, dropout: bool, device: torch.device):
    return tiles.select_config(role, dtype, attn.core_form(shape.d_model, shape.d_keys), dropout, device)


def _compile_worker(args) -> str:
    """Runs one candidate once in a fresh process, which compiles it into Triton's disk cache."""
    shape, dtype_name, role, dropout, tile = args
    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda" if ON_GPU else "cpu")
    t = problem(shape, dtype, device, dropout)
    key = tile_key(shipped_config(role, dtype, shape, dropout, device))
    try:
        with override_tiles({key: tile}):
            run_role(role, t)
        if ON_GPU:
            torch.cuda.synchronize()
        return ""
    except Exception as exc:  # a tile the compiler rejects (shared memory) is a result too
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def aot_usage(cfg, tile) -> dict:
    """Registers and spills of `cfg` with `tile`, compiled ahead of time for its arch (GPU runs only)."""
    if cfg.arch == tiles.INTERPRETER:
        return {}
    cfg = dataclasses.replace(cfg, block_r=tile[0], block_s=tile[1], num_warps=tile[2], num_stages=tile[3])
    aot = next(c for c in attention_configs() if c["name"] == cfg.name)
    r = report.compile_config(dict(aot, constexprs=cfg.constexprs(), num_warps=tile[2], num_stages=tile[3]), cfg.arch)
    return dict(regs=r.registers, spills=None if r.error else r.spills, shared_bytes=r.shared_bytes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_arguments(parser, shapes="etth1-folded,weather-folded", budget_s=240.0, out="tune.json")
    parser.add_argument("--roles", default=",".join(ROLES))
    parser.add_argument("--dropout", action="store_true", help="tune the dropout variants instead")
    parser.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1))
    args = parser.parse_args(argv)

    start = time.monotonic()
    device, dtype, smoke, shapes, device_name = sweep_setup(args)
    roles = [r for r in args.roles.split(",") if r]
    env = dict(device=device_name, torch=torch.__version__, triton=triton.__version__, dtype=args.dtype,
               dropout=args.dropout)
    print(env, flush=True)
    log = TuneLog(args.out, env)
    results = log.results

    for shape in shapes:
        t = problem(shape, dtype, device, args.dropout)
        for role in roles:
            cfg = shipped_config(role, dtype, shape, args.dropout, device)
            if time.monotonic() - start > args.budget_s:
                print(f"budget spent: skipping {shape.name} {role}", flush=True)
                continue
            shipped = cfg.tile
            cands = candidates(smoke)
            if shipped not in cands:
                cands.append(shipped)
            errors = {}
            if ON_GPU and args.jobs > 1 and not smoke:
                jobs = [(shape, args.dtype, role, args.dropout, c) for c in cands]
                # spawn: a forked child must not inherit this process's CUDA context
                import multiprocessing

                with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                    errors = {c: e for c, e in zip(cands, pool.map(_compile_worker, jobs)) if e}
            reference = run_role(role, t)[0].float() if role == "fwd" else run_role(role, t).float()
            for tile in cands:
                row = dict(shape=shape.name, role=role, kernel=cfg.name, key=list(tile_key(cfg)), tile=list(tile),
                           shipped=tuple(tile) == tuple(shipped))
                if tile in errors:
                    row.update(status="compile error", error=errors[tile])
                    results.append(row)
                    continue
                try:
                    with override_tiles({tile_key(cfg): tile}):
                        got = run_role(role, t)
                        got = (got[0] if role == "fwd" else got).float()
                        ms = time_ms(lambda: run_role(role, t))
                    err = (got - reference).abs().max().item() / (1 + reference.abs().max().item())
                    row.update(status="ok" if err < 1e-2 else "WRONG", ms=ms, rel_err=err, **aot_usage(cfg, tile))
                except Exception as exc:
                    row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:200]}")
                results.append(row)
            log.pick(f"{shape.name} {cfg.name}",
                     [r for r in results if r["shape"] == shape.name and r["role"] == role], shipped)
            log.write()
    log.finish(start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
