"""Which measured tiles survive the ahead-of-time spill check, under the Triton installed here.

    python bench/aot_filter_tiles.py TUNE_JSON [--archs 80,90] [--top 12] [--out filtered.json]

bench/tune_attention.py times tiles on one GPU with one Triton; tests/test_aot.py demands that a
shipped tile compiles without spills on every architecture its configuration serves, under
Triton 3.9 (CI) and 3.6 (the GPU machines). Run this once per toolchain (e.g. with
.venv-aot-triton36/bin/python) on the same tune.json and ship, per key, the fastest tile that is
clean in every output. Needs no GPU: it compiles for GPUTarget(cuda, arch) and runs ptxas -v.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real JIT objects
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the tests and the launchers compile

from timellm_fast.kernels import report  # noqa: E402
from timellm_fast.kernels import reprogramming_attention as attn  # noqa: E402


def _compile(job: tuple) -> dict:
    key, tile, data_dtype, arch = job
    attn._TILES[key] = tuple(tile)
    attn.config_table.cache_clear()
    wanted = next(c for c in attn.config_table().values()  # the _TILES entry, not a Hopper-only variant
                  if c.tile_key == key and attn.SIG_DTYPE[c.data_dtype] == data_dtype and c.arch_split != "sm90")
    cfg = next(c for c in attn.aot_configs() if c["name"] == wanted.name)
    r = report.compile_config(cfg, arch)
    return dict(key=list(key), tile=list(tile), arch=arch, kernel=r.kernel, registers=r.registers,
                spills=None if r.error else r.spill_stores + r.spill_loads, error=r.error)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tune_json")
    parser.add_argument("--archs", default="80,90")
    parser.add_argument("--top", type=int, default=12, help="fastest measured tiles per key to check")
    parser.add_argument("--only", default="", help="check only keys whose text contains this, e.g. \"'bwd_dq', 'bf16', 128\"")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="aot_filtered.json")
    args = parser.parse_args(argv)
    import triton

    tune = json.load(open(args.tune_json))
    data_dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[tune["environment"]["dtype"]]
    by_key = {}
    for r in tune["results"]:
        if r["status"] == "ok" and args.only in str(tuple(r["key"])):
            by_key.setdefault(tuple(r["key"]), []).append(r)
    jobs, ms = [], {}
    for key, rows in by_key.items():
        rows.sort(key=lambda r: r["ms"])
        for r in rows[:args.top]:
            ms[(key, tuple(r["tile"]))] = r["ms"]
            jobs += [(key, tuple(r["tile"]), data_dtype, int(a)) for a in args.archs.split(",")]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_compile, jobs))
    clean = {}
    for r in results:
        k = (tuple(r["key"]), tuple(r["tile"]))
        clean[k] = clean.get(k, True) and r["error"] is None and r["spills"] == 0
    print(f"triton {triton.__version__}, archs {args.archs}")
    for key in by_key:
        ok = sorted((ms[k], k[1]) for k in clean if k[0] == key and clean[k])
        print(key, "fastest clean:", ok[0] if ok else None, "| clean:", [t for _, t in ok])
    json.dump(dict(triton=triton.__version__, archs=args.archs, results=results,
                   clean=[dict(key=list(k[0]), tile=list(k[1]), ms=ms[k]) for k in clean if clean[k]]),
              open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
