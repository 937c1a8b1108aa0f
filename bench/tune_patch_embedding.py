"""Tile sweep of the patch embedding's forward kernel on the GPU present (issue 6: >= 70 % of HBM
bandwidth at 20688 series).

    python bench/tune_patch_embedding.py [--shapes traffic-folded,explained-gpt2] [--dtype bfloat16]
                                         [--budget-s 120] [--out tune_patch.json]

For each shape it times `patch_conv_gemm` (the forward: gather + conv GEMM + store) with every
candidate (BLOCK_M, num_warps) through triton.testing.do_bench, checks each candidate's output
against the shipped tile's (the MMA instruction, and so the rounding, may change with the warp
count), reports registers and spills of the compiled kernel and the achieved bandwidth as a
fraction of the device's HBM bandwidth. A winner goes into
kernels/patch_embedding.py only after tests/test_aot.py shows it spill-free on every architecture.

Without CUDA (or with --smoke) it runs a tiny shape with two candidates in Triton's interpreter
to prove the script works, not to tune.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from tuning import TuneLog, add_sweep_arguments, sweep_setup, time_ms  # noqa: E402  (first: sets the kernels' environment)
from timellm_fast.kernels import patch_embedding as pe  # noqa: E402


def candidates(smoke: bool) -> list:
    if smoke:
        return [(32, 4), (64, 4)]
    return list(itertools.product((32, 64, 128, 256), (2, 4, 8)))


def forward(x: torch.Tensor, weight: torch.Tensor, shape, seed: torch.Tensor) -> torch.Tensor:
    """The Triton forward alone (no op layer): y [B*N*P, d_model] in the weight's dtype."""
    return pe.patch_embedding_fwd(x, weight, weight.dtype, shape.patch_len, shape.stride, shape.patches, seed)


def main(argv=None) -> int:
    from common import device_hbm_bytes_per_s, patch_embedding_cost, patch_embedding_input

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_arguments(parser, shapes="traffic-folded,explained-gpt2", budget_s=120.0, out="tune_patch.json")
    args = parser.parse_args(argv)

    start = time.monotonic()
    device, dtype, smoke, shapes, device_name = sweep_setup(args)
    hbm = device_hbm_bytes_per_s()
    env = dict(device=device_name, torch=torch.__version__, triton=pe.triton.__version__, dtype=args.dtype,
               shipped=[pe.GEMM_BLOCK_M, pe.NUM_WARPS], hbm_bytes_per_s=hbm)
    print(env, flush=True)
    log = TuneLog(args.out, env)
    results = log.results

    for shape in shapes:
        if time.monotonic() - start > args.budget_s:
            print(f"budget spent: skipping {shape.name}", flush=True)
            continue
        x = patch_embedding_input(shape, dtype)
        g = torch.Generator().manual_seed(0)
        weight = (torch.randn(shape.d_model, shape.patch_len, 3, generator=g) / 8).to(device, dtype)
        seed = torch.zeros((1,), dtype=torch.int64, device=device)
        _, nbytes = patch_embedding_cost(shape, dtype, backward=False)
        reference = forward(x, weight, shape, seed)
        shipped = (pe.GEMM_BLOCK_M, pe.NUM_WARPS)
        cands = candidates(smoke)
        if shipped not in cands:
            cands.append(shipped)
        for tile in cands:
            row = dict(shape=shape.name, rows=shape.rows, tile=list(tile), shipped=tile == shipped)
            try:
                with pe.override_gemm_tile(*tile):
                    got = forward(x, weight, shape, seed)
                    ms = time_ms(lambda: forward(x, weight, shape, seed))
                compiled = pe.last_launch.get("patch_conv_gemm")
                err = ((got.float() - reference.float()).abs().max().item()
                       / (1 + reference.float().abs().max().item()))
                row.update(status="ok" if err < 1e-2 else "WRONG", rel_err=err, ms=ms, gb_per_s=nbytes / (ms * 1e-3) / 1e9,
                           frac_hbm=(nbytes / (ms * 1e-3) / hbm) if hbm else None,
                           regs=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None))
            except Exception as exc:  # a tile the compiler rejects is a result too
                row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            results.append(row)
            print(row, flush=True)
        log.pick(shape.name, [r for r in results if r["shape"] == shape.name], shipped, extra=("frac_hbm",))
        log.write()
    log.finish(start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
