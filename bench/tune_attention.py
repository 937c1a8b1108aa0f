"""Tile sweep of the fused attention kernels on the GPU present (issue 6 tuning).

    python bench/tune_attention.py [--shapes etth1-folded,weather-folded] [--dtype bfloat16]
                                   [--roles fwd,bwd_dq,bwd_dkdv] [--dropout] [--budget-s 240]
                                   [--jobs 12] [--out tune.json]

For each shape and kernel role it times every candidate tile (BLOCK_R, BLOCK_S, num_warps,
num_stages) with triton.testing.do_bench, checks each candidate's result against the shipped
tile's, and reports registers and spills of the compiled kernel. Candidates are first compiled
in parallel worker processes (Triton's on-disk cache then serves the timing process), so the
sweep costs little more than the timing itself. It prints the best tile per
(role, dot regime, BLOCK_E, dropout) key of kernels/reprogramming_attention._TILES; a winner goes
into that table only after tests/test_aot.py shows it spill-free on every architecture the
configuration serves.

Without CUDA (or with --smoke) it runs on a tiny shape with two candidates, in Triton's
interpreter on a CPU, to prove the script works, not to tune.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(__file__))

from tuning import ON_GPU, TuneLog, add_sweep_arguments, sweep_setup, time_ms  # noqa: E402  (first: sets the kernels' environment)
from timellm_fast.kernels import reprogramming_attention as attn  # noqa: E402

ROLES = ("fwd", "bwd_dq", "bwd_dkdv")


def candidates(smoke: bool) -> list:
    if smoke:
        return [(16, 16, 4, 1), (32, 16, 4, 1)]
    tiles = itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3))
    # 128 x 128 score tiles never fit next to an E >= 32 accumulator without spilling
    return [t for t in tiles if t[0] * t[1] <= 128 * 64]


def problem(shape, dtype: torch.dtype, device: torch.device, dropout: bool) -> dict:
    """Inputs of one forward + backward at `shape` (a bench.common.Shape)."""
    g = torch.Generator().manual_seed(0)
    he = shape.n_heads * shape.d_keys
    rows = shape.rows * shape.patches
    t = dict(
        target=torch.randn(rows, shape.d_model, generator=g),
        wq=torch.randn(he, shape.d_model, generator=g) / math.sqrt(shape.d_model),
        bq=torch.randn(he, generator=g) / 10,
        kv=torch.randn(shape.num_protos, 2 * he, generator=g),
        dout=torch.randn(rows, he, generator=g),
    )
    t = {k: v.to(device, dtype) for k, v in t.items()}
    t["k"], t["v"] = t["kv"].split(he, dim=1)
    t["n_heads"], t["dropout_p"] = shape.n_heads, (0.1 if dropout else 0.0)
    t["seed"] = torch.tensor([1234], dtype=torch.int64, device=device)
    _, t["lse"] = attn.attention_forward(t["target"], t["wq"], t["bq"], t["k"], t["v"], t["n_heads"],
                                         t["dropout_p"], t["seed"])
    return t


def run_role(role: str, t: dict):
    if role == "fwd":
        return attn.attention_forward(t["target"], t["wq"], t["bq"], t["k"], t["v"], t["n_heads"],
                                      t["dropout_p"], t["seed"])[0]
    dq, dkv = attn.attention_backward(t["target"], t["wq"], t["bq"], t["k"], t["v"], t["dout"], t["lse"],
                                      t["n_heads"], t["dropout_p"], t["seed"], need_dkv=role == "bwd_dkdv")
    return dq if role == "bwd_dq" else dkv


def tile_key(role: str, dtype: torch.dtype, head_dim: int, dropout: bool, device: torch.device) -> tuple:
    dot, precision = attn._dot_path(dtype, device, False)
    return (role, attn.dot_regime(dot, precision), attn.block_e_for(head_dim), dropout)


def _compile_worker(args) -> str:
    """Runs one candidate once in a fresh process, which compiles it into Triton's disk cache."""
    shape, dtype_name, role, dropout, tile = args
    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda" if ON_GPU else "cpu")
    t = problem(shape, dtype, device, dropout)
    key = tile_key(role, dtype, shape.d_keys, dropout, device)
    try:
        with attn.override_tiles({key: tile}):
            run_role(role, t)
        if ON_GPU:
            torch.cuda.synchronize()
        return ""
    except Exception as exc:  # a tile the compiler rejects (shared memory) is a result too
        return f"{type(exc).__name__}: {str(exc)[:200]}"


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
    env = dict(device=device_name, torch=torch.__version__, triton=attn.triton.__version__, dtype=args.dtype,
               dropout=args.dropout)
    print(env, flush=True)
    log = TuneLog(args.out, env)
    results = log.results

    for shape in shapes:
        t = problem(shape, dtype, device, args.dropout)
        for role in roles:
            key = tile_key(role, dtype, shape.d_keys, args.dropout, device)
            if time.monotonic() - start > args.budget_s:
                print(f"budget spent: skipping {shape.name} {role}", flush=True)
                continue
            shipped_cfg = attn.select_config(role, dtype, shape.d_keys, args.dropout, device)  # sm_90: _TILES_SM90
            shipped = (shipped_cfg.block_r, shipped_cfg.block_s, shipped_cfg.num_warps, shipped_cfg.num_stages)
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
            reference = run_role(role, t).float()
            for tile in cands:
                row = dict(shape=shape.name, role=role, key=list(key), tile=list(tile),
                           shipped=tuple(tile) == tuple(shipped))
                if tile in errors:
                    row.update(status="compile error", error=errors[tile])
                    results.append(row)
                    continue
                try:
                    with attn.override_tiles({key: tile}):
                        got = run_role(role, t).float()
                        ms = time_ms(lambda: run_role(role, t))
                    compiled = attn.last_launch.get(role)
                    err = (got - reference).abs().max().item() / (1 + reference.abs().max().item())
                    row.update(status="ok" if err < 1e-2 else "WRONG", ms=ms, rel_err=err,
                               regs=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None))
                except Exception as exc:
                    row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:200]}")
                results.append(row)
            log.pick(f"{shape.name} {key}", [r for r in results if r["shape"] == shape.name and r["role"] == role],
                     shipped)
            log.write()
    log.finish(start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
