"""Which candidate tiles of the attention kernels pass the ahead-of-time check, under the Triton
installed here.

    python bench/aot_filter_tiles.py [--tune TUNE_JSON] [--only REGEX] [--first-clean] [--after A.json ...]
                                     [--jobs N] [--out out.json]

tests/test_aot.py demands that every shipped tile compiles without spills, within its GPU
generation's shared memory, under Triton 3.6, 3.8 and 3.9, and that the sm_90 MMA kernels do no
more MMA work per element than the factorized form's budget (a tile whose warps repeat each other's
MMAs does more: aot_report.loop_work). This compiles, for every configuration
of kernels/attention_tiles.CONFIG_TABLE whose name matches REGEX, candidate
tiles on the configuration's own arch (GPUTarget; no GPU needed) and writes registers, spills and
shared memory per candidate. Candidates: with --tune, the tiles a GPU sweep (bench/tune_attention.py)
timed, fastest first; without, CANDIDATES below, in order of preference. Run it once per toolchain
(e.g. with .venv-aot-triton36/bin/python) and ship, per key, the first candidate that is clean in
every output: `--pick A.json B.json C.json` prints that choice.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real JIT objects
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the tests and the launchers compile

import triton  # noqa: E402
import aot_report as report  # noqa: E402  (bench/, this script's directory)
from aot_configs import attention_configs, mma_work_budget  # noqa: E402
from timellm_fast.kernels import attention as attn  # noqa: E402
from timellm_fast.kernels import attention_tiles as tiles  # noqa: E402

#: (role, arch) -> tiles (BLOCK_R, BLOCK_S, num_warps, num_stages) of the tensor-core regimes, preferred
#: first: the larger MMA-shaped tiles (on sm_90 a warpgroup's 64 rows on the M side: BLOCK_R for the
#: forward and the row pass, BLOCK_S for the prototype pass, whose row side dX also wants BLOCK_R >= 64)
#: before the ones that merely fit
_MMA = {
    ("fwd", 90): [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2),
                  (64, 32, 4, 1), (64, 16, 4, 1)],
    ("fwd", 80): [(128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1)],
    ("fwd", 75): [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)],
    ("bwd_protos", 90): [(64, 128, 8, 2), (64, 128, 8, 1), (64, 64, 4, 2), (64, 64, 4, 1), (32, 128, 8, 2),
                         (32, 64, 4, 2), (32, 64, 4, 1), (16, 64, 4, 1)],
    ("bwd_protos", 80): [(64, 64, 8, 2), (32, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 8, 2),
                         (32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    ("bwd_protos", 75): [(32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    ("bwd_rows", 90): [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 1),
                       (64, 16, 4, 1)],
    ("bwd_rows", 80): [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1),
                       (16, 16, 4, 1)],
    ("bwd_rows", 75): [(64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)],
}
_FMA = {
    "fwd": [(64, 32, 8, 1), (32, 32, 8, 1), (32, 16, 8, 1), (16, 16, 8, 1), (16, 16, 4, 1)],
    "bwd_protos": [(32, 32, 8, 1), (16, 32, 8, 1), (16, 16, 8, 1), (16, 16, 4, 1)],
    "bwd_rows": [(32, 32, 8, 1), (32, 16, 8, 1), (16, 16, 8, 1), (16, 16, 4, 1)],
}


def candidates(cfg: tiles.AttentionConfig) -> list:
    if tiles.regime(cfg.dot_dtype, cfg.input_precision) == "fma":
        return _FMA[cfg.role]
    return _MMA[(cfg.role, cfg.arch)]


def _compile_until_clean(job: tuple) -> list:
    """Compiles a configuration's candidates in order and stops at the first clean one."""
    name, tiles_ = job
    rows = []
    for tile in tiles_:
        rows.append(_compile((name, tile)))
        if rows[-1]["clean"]:
            break
    return rows


def _compile(job: tuple) -> dict:
    name, tile = job
    cfg = next(c for c in tiles.CONFIG_TABLE.values() if c.name == name)
    cfg = dataclasses.replace(cfg, block_r=tile[0], block_s=tile[1], num_warps=tile[2], num_stages=tile[3])
    aot = next(c for c in attention_configs() if c["name"] == name)
    aot = dict(aot, constexprs=cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    r = report.compile_config(aot, cfg.arch)
    spills = None if r.error else r.spill_stores + r.spill_loads
    fits = r.error is None and r.shared_bytes <= report.SHARED_MEMORY_LIMIT[cfg.arch]
    work = budget = None
    error = r.error
    if fits and spills == 0 and cfg.dot_dtype != torch.float32 and cfg.arch == 90:
        # a tile whose warps repeat each other's MMAs does more than the factorized form's work (checked
        # on sm_90, where aot_report.py --work counts it; Triton 3.6's sm_80 build of the prototype pass
        # exceeds it with every tile that fits, 3.8 and 3.9 do not)
        constants = {"with_dx": 1} if cfg.role == "bwd_protos" else {}
        budget = mma_work_budget(cfg.role, cfg.block_d, cfg.block_e)
        try:
            work = report.loop_work(aot, cfg.arch, cfg.block_r * cfg.block_s, constants)["mma_flops_per_element"]
        except Exception as exc:  # no countable loop: not proven within the budget
            error = f"work count: {type(exc).__name__}: {exc}"
    within = error is None and (work is None or work <= budget)
    return dict(kernel=name, tile=list(tile), arch=cfg.arch, registers=r.registers, spills=spills,
                shared_bytes=r.shared_bytes, mma_flops_per_element=work, budget=budget,
                clean=fits and spills == 0 and within, error=error)


def pick(paths: list) -> dict:
    """Per configuration, the first candidate clean in every result file (None if none is)."""
    runs = [json.load(open(p)) for p in paths]
    order, clean = {}, {}
    for run in runs:
        for r in run["results"]:
            key = (r["kernel"], tuple(r["tile"]))
            order.setdefault(r["kernel"], [])
            if tuple(r["tile"]) not in order[r["kernel"]]:
                order[r["kernel"]].append(tuple(r["tile"]))
            clean[key] = clean.get(key, True) and r["clean"]
    missing = {k for run in runs for k in [(r["kernel"], tuple(r["tile"])) for r in run["results"]]}
    for run in runs:  # a candidate some toolchain did not compile is not proven clean
        seen = {(r["kernel"], tuple(r["tile"])) for r in run["results"]}
        for key in missing - seen:
            clean[key] = False
    return {name: next((t for t in tiles_ if clean[(name, t)]), None) for name, tiles_ in order.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", default=None, help="a tune.json: its timed tiles, fastest first")
    parser.add_argument("--only", default="", help="configurations whose name matches this regular expression")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="aot_filtered.json")
    parser.add_argument("--pick", nargs="+", default=None, help="instead: combine result files, print the choice")
    parser.add_argument("--first-clean", action="store_true",
                        help="stop at each configuration's first clean candidate (without --tune)")
    parser.add_argument("--after", nargs="*", default=(),
                        help="result files of other toolchains: start each configuration's candidates at "
                             "the latest of their picks (converging on a tile clean under all of them)")
    args = parser.parse_args(argv)
    if args.pick:
        for name, tile in pick(args.pick).items():
            print(name, tile)
        return 0
    timed = {}
    if args.tune:
        for r in json.load(open(args.tune))["results"]:
            if r["status"] == "ok":
                timed.setdefault(r["kernel"], []).append((r["ms"], tuple(r["tile"])))
    earlier = {}
    for path in args.after:
        for r in json.load(open(path))["results"]:
            if r["clean"]:
                earlier.setdefault(r["kernel"], []).append(tuple(r["tile"]))
    jobs = []
    for cfg in tiles.CONFIG_TABLE.values():
        if cfg.role not in ("fwd", "bwd_protos", "bwd_rows") or not re.search(args.only, cfg.name):
            continue
        tiles_ = [t for _, t in sorted(timed[cfg.name])] if cfg.name in timed else candidates(cfg)
        if cfg.name in earlier:  # no candidate before the latest pick of the other toolchains
            start = max(tiles_.index(t) for t in earlier[cfg.name] if t in tiles_)
            tiles_ = tiles_[start:]
        jobs.append((cfg.name, tiles_))
    with ProcessPoolExecutor(args.jobs) as pool:
        if args.first_clean:
            results = [r for rows in pool.map(_compile_until_clean, jobs, chunksize=1) for r in rows]
        else:
            results = list(pool.map(_compile, [(n, t) for n, ts in jobs for t in ts], chunksize=1))
    json.dump(dict(triton=triton.__version__, results=results), open(args.out, "w"), indent=1)
    print(f"triton {triton.__version__}: {len(results)} compilations, {sum(r['clean'] for r in results)} clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
