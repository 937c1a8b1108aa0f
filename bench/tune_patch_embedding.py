"""Tile sweep of the patch embedding's forward kernel on the GPU present (target: >= 70 % of HBM
bandwidth at 20688 series, Traffic-folded).

    python bench/tune_patch_embedding.py [--shapes traffic-folded,explained-gpt2] [--dtype bfloat16]
                                         [--budget-s 120] [--out tune_patch.json]

For each shape it times `patch_window_fwd` (the forward: window loads + three MMAs + row stores,
persistent over row blocks) with every candidate WindowTile (rows per block, warps, pipeline
stages, programs per SM) through triton.testing.do_bench, in order, until the budget is spent;
checks each candidate's output against the shipped tile's (the MMA instruction, and so the
rounding, may change with the warp count), reports registers and spills of the compiled kernel
and the achieved bandwidth as a fraction of the device's HBM bandwidth. A winner goes into
WINDOW_FWD_TILES in kernels/patch_embedding.py only after tests/test_aot.py shows it spill-free
on every architecture.

Without CUDA (or with --smoke) it runs a tiny shape with two candidates in Triton's interpreter
to prove the script works, not to tune.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from tuning import TuneLog, add_sweep_arguments, sweep_setup, time_ms  # noqa: E402  (first: sets the kernels' environment)
import triton  # noqa: E402
from common import device_hbm_bytes_per_s, patch_embedding_cost, patch_embedding_input  # noqa: E402
from timellm_fast.kernels import patch_embedding as pe  # noqa: E402
from timellm_fast.kernels import patch_embedding_tiles as pe_tiles  # noqa: E402
from timellm_fast.kernels import patch_embedding_forward as pe_forward  # noqa: E402
from timellm_fast.kernels.host import dot_dtype, store_dtype  # noqa: E402
from tile_overrides import override_window_tile  # noqa: E402


def compiled_window_fwd(
    x: torch.Tensor,  # x: [B, N, T], any float dtype and strides
    weight: torch.Tensor,  # weight: [D, patch_len, 3]
    out_dtype: torch.dtype, patch_len: int, stride: int, P: int,
    seed: torch.Tensor, dropout_p: float = 0.0,  # seed: [1] int64 on x's device
):
    """Launches patch_window_fwd once as the library's forward launcher would (tile overrides
    included) and returns the compiled kernel (n_regs, n_spills; None under the interpreter)."""
    if not pe_tiles.windowed_forward(patch_len):
        raise ValueError(f"patch_len={patch_len} takes the gather kernel, not patch_window_fwd")
    B, N, _ = x.shape
    y = torch.empty(B * N * P, weight.shape[0], device=x.device, dtype=store_dtype(out_dtype))
    if y.shape[0] == 0:
        raise ValueError("no rows: an empty input launches no kernel")
    return pe_forward.launch_window_fwd(x, weight, y, patch_len, stride, P,
                                        dot_dtype(x.dtype, weight.dtype, device=x.device), seed, dropout_p)


def candidates(smoke: bool) -> list:
    """WindowTiles to time, the likelier ones first (the sweep stops when its budget is spent):
    no pipelining and pipelined through L1, at the residency a 64..255-register kernel allows."""
    if smoke:  # with the shipped tile: a pipelined one and a one-program loop over every block
        return [pe_tiles.WindowTile(32, 4, 2, 1)]
    return [pe_tiles.WindowTile(block_m, warps, stages, programs)
            for stages, programs, block_m, warps in itertools.product((1, 2), (8, 4, 16), (64, 128, 256, 32), (4, 8, 2))]


def forward(x: torch.Tensor, weight: torch.Tensor, shape, seed: torch.Tensor) -> torch.Tensor:
    """The Triton forward alone (no op layer): y [B*N*P, d_model] in the weight's dtype."""
    return pe.patch_embedding_fwd(x, weight, weight.dtype, shape.patch_len, shape.stride, shape.patches, seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_arguments(parser, shapes="traffic-folded,explained-gpt2", budget_s=120.0, out="tune_patch.json")
    args = parser.parse_args(argv)

    start = time.monotonic()
    device, dtype, smoke, shapes, device_name = sweep_setup(args)
    hbm = device_hbm_bytes_per_s()
    dot_dt = dot_dtype(dtype, dtype, device=device)
    shipped = pe_tiles.WINDOW_FWD_TILES[dot_dt]
    env = dict(device=device_name, torch=torch.__version__, triton=triton.__version__, dtype=args.dtype,
               shipped=list(dataclasses.astuple(shipped)), tile_fields=[f.name for f in dataclasses.fields(shipped)],
               hbm_bytes_per_s=hbm)
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
        cands = candidates(smoke)
        cands = [shipped] + [t for t in cands if t != shipped]  # the shipped tile is always timed
        for tile in cands:
            if time.monotonic() - start > args.budget_s:
                print(f"budget spent: {len(cands) - cands.index(tile)} tiles of {shape.name} not timed", flush=True)
                break
            row = dict(shape=shape.name, rows=shape.rows, tile=list(dataclasses.astuple(tile)), shipped=tile == shipped)
            try:
                with override_window_tile(tile):
                    got = forward(x, weight, shape, seed)
                    ms = time_ms(lambda: forward(x, weight, shape, seed))
                    compiled = compiled_window_fwd(x, weight, weight.dtype, shape.patch_len, shape.stride,
                                                      shape.patches, seed)
                err = ((got.float() - reference.float()).abs().max().item()
                       / (1 + reference.float().abs().max().item()))
                row.update(status="ok" if err < 1e-2 else "WRONG", rel_err=err, ms=ms, gb_per_s=nbytes / (ms * 1e-3) / 1e9,
                           frac_hbm=(nbytes / (ms * 1e-3) / hbm) if hbm else None,
                           regs=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None))
            except Exception as exc:  # a tile the compiler rejects is a result too
                row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            results.append(row)
            print(row, flush=True)
        log.pick(shape.name, [r for r in results if r["shape"] == shape.name], dataclasses.astuple(shipped),
                 extra=("frac_hbm",))
        log.write()
    log.finish(start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
