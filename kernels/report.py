"""Ahead-of-time compilation of every kernel configuration for real GPUs, with no GPU present.

``python -m timellm_fast.kernels.report [--arch 75,80,90]`` compiles each entry of every kernel
file's ``aot_configs()`` with ``triton.compile`` for the given compute capabilities and prints
registers, spill bytes and shared memory per configuration (ptxas -v on the generated PTX),
marks every row that spills or fails, and names the toolchain it used (Triton version, the
ptxas of each architecture). tests/test_aot.py runs it under each supported Triton and asserts
zero spills.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Iterable, List, Optional

ARCHS = (75, 80, 90)


@dataclass
class AotResult:
    kernel: str
    arch: int
    registers: Optional[int]
    spill_stores: Optional[int]
    spill_loads: Optional[int]
    shared_bytes: int
    error: Optional[str] = None

    @property
    def spills(self) -> Optional[int]:
        if self.spill_stores is None or self.spill_loads is None:
            return None
        return self.spill_stores + self.spill_loads


def kernel_modules():
    from . import patch_embedding

    modules = [patch_embedding]
    try:
        from . import reprogramming_attention
    except ImportError:  # pragma: no cover - the file lands with the attention issue
        pass
    else:
        modules.append(reprogramming_attention)
    return modules


def all_configs() -> List[dict]:
    return [cfg for mod in kernel_modules() for cfg in mod.aot_configs()]


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for `arch` (triton >= 3.7 ships a newer one for sm_90+)."""
    from triton.backends.nvidia import compiler as nvidia

    try:
        return nvidia.get_ptxas(arch).path
    except TypeError:  # triton <= 3.6: one ptxas for every arch
        return nvidia.get_ptxas().path


def _ptxas_version(path: str) -> str:
    """The CUDA release of a ptxas binary ("12.8.93"), or "unknown"."""
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return "unknown"
    match = re.search(r"V(\d+\.\d+\.\d+)", text)
    return match.group(1) if match else "unknown"


def toolchain(archs: Iterable[int] = ARCHS) -> dict:
    """What compiles here: Triton's version and, per architecture, the ptxas Triton uses."""
    import triton

    ptxas = {}
    for arch in archs:
        try:
            path = _ptxas(arch)
        except Exception as exc:  # reported: a Triton without a bundled ptxas cannot compile here
            ptxas[arch] = dict(path=None, version=f"unavailable ({type(exc).__name__}: {exc})")
        else:
            ptxas[arch] = dict(path=path, version=_ptxas_version(path))
    return dict(triton=triton.__version__, ptxas=ptxas)


def format_toolchain(info: dict) -> str:
    """One line: "Triton 3.9.0; ptxas 12.8.93 for sm_75, sm_80 (/.../ptxas); ..." (arches sharing
    a ptxas are grouped)."""
    groups: dict = {}
    for arch, tool in info["ptxas"].items():
        groups.setdefault((tool["version"], tool["path"]), []).append(arch)
    parts = [f"ptxas {version} for {', '.join(f'sm_{a}' for a in archs)}" + (f" ({path})" if path else "")
             for (version, path), archs in groups.items()]
    return f"toolchain: Triton {info['triton']}; " + "; ".join(parts)


def _ptxas_usage(ptx: str, arch: int) -> tuple:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the kernel's PTX."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={target}", path, "-o", os.devnull],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[:500]}")
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return regs, int(spill.group(1)), int(spill.group(2))


def jit_specialization(cfg: dict) -> dict:
    """The argument attributes Triton's JIT gives a launch: every pointer 16-byte aligned (torch
    allocations are) and the integer arguments a configuration names in "divisible_by_16" (those
    SPEC §2 shapes make multiples of 16, e.g. d_model and head width). Without them the compile
    is the JIT's generic variant, which on the attention kernels needs up to ~1.5x the registers
    (measured: 255 + spills vs 187 for one tile), so a check without them rejects tiles that the
    GPU, compiling for the real shapes, runs spill-free."""
    hinted = set(cfg.get("divisible_by_16", ()))
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(cfg["signature"].items())
            if ty.startswith("*") or name in hinted}


def _compile(cfg: dict, arch: int):
    """triton.compile of one configuration for sm_<arch>, specialized as the JIT would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=cfg["fn"], signature=cfg["signature"], constexprs=cfg["constexprs"],
                    attrs=jit_specialization(cfg))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def compile_config(cfg: dict, arch: int) -> AotResult:
    try:
        compiled = _compile(cfg, arch)
        regs, st, ld = _ptxas_usage(compiled.asm["ptx"], arch)
        return AotResult(cfg["name"], arch, regs, st, ld, int(compiled.metadata.shared))
    except Exception as exc:  # reported, and the test fails on it
        return AotResult(cfg["name"], arch, None, None, None, 0, f"{type(exc).__name__}: {exc}")


def _compile_indexed(job: tuple) -> AotResult:
    index, arch = job
    return compile_config(all_configs()[index], arch)


def compile_all(archs: Iterable[int] = ARCHS, jobs: int = 1) -> List[AotResult]:
    """Compiles every configuration for every arch it can be dispatched on (a config's "archs"
    key, default all), in `jobs` worker processes."""
    from ._launch import interpreting

    if interpreting():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (the kernels "
                           "are interpreter objects otherwise); run this module in its own process")
    work = [(i, arch) for i, cfg in enumerate(all_configs()) for arch in archs
            if arch in cfg.get("archs", ARCHS)]
    if jobs <= 1:
        return [_compile_indexed(job) for job in work]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_indexed, work, chunksize=1)


def sass_profile(cfg: dict, arch: int, ones: tuple = (), div16: tuple = ()) -> dict:
    """Static SASS of one configuration (triton.compile + the nvdisasm Triton ships): instruction
    count, the size of every loop body (backward branches), the opcodes inside loop bodies and the
    load instructions by width. A CPU-side proxy for kernels bound by instruction issue rather
    than by memory (the patch embedding's gather): dynamic instructions per thread = the count
    outside loops plus each body times its trip count. `ones` names integer arguments to compile
    as the constant 1 and `div16` integer arguments to compile as multiples of 16, as the JIT
    specializes a launch whose arguments have those values."""
    import collections

    import triton

    cfg = dict(cfg, signature=dict(cfg["signature"]), constexprs=dict(cfg["constexprs"]),
               divisible_by_16=tuple(cfg.get("divisible_by_16", ())) + tuple(div16))
    for name in ones:
        cfg["signature"][name], cfg["constexprs"][name] = "constexpr", 1
    compiled = _compile(cfg, arch)
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(.*?)\s*;?\s*(/\*.*)?$", line)
        if ins:
            for name in pending:
                labels[name] = len(instructions)
            pending = []
            instructions.append(ins.group(2))
    loops, in_loops = [], collections.Counter()
    for i, text in enumerate(instructions):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if target and labels.get(target.group(1), i + 1) < i:
            body = instructions[labels[target.group(1)]:i + 1]
            loops.append(len(body))
            in_loops.update(m.group(1) for t in body for m in [re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", t)] if m)
    loads = collections.Counter(m.group(1) for t in instructions
                                for m in [re.search(r"\b(LDG[.A-Z0-9_]*|LDGSTS[.A-Z0-9_]*)", t)] if m)
    stores = collections.Counter(m.group(1) for t in instructions for m in [re.search(GLOBAL_STORE, t)] if m)
    return dict(kernel=cfg["name"], arch=arch, instructions=len(instructions), loop_bodies=loops,
                loads=dict(loads), stores=dict(stores), loop_opcodes=dict(in_loops),
                loop_memory=dict(_loop_memory(instructions, labels)))


GLOBAL_LOAD = r"\b((?:LDGSTS|LDG)(?:\.[A-Z0-9_]+)*)(?![A-Z0-9_])"  # not LDGDEPBAR
GLOBAL_STORE = r"\b(STG(?:\.[A-Z0-9_]+)*)(?![A-Z0-9_])"


def _loop_memory(instructions: list, labels: dict) -> "collections.Counter":
    """Global loads and stores inside loop bodies, by full opcode (its width suffix included)."""
    import collections

    found = collections.Counter()
    for i, text in enumerate(instructions):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if target and labels.get(target.group(1), i + 1) < i:
            for body_text in instructions[labels[target.group(1)]:i + 1]:
                for pattern in (GLOBAL_LOAD, GLOBAL_STORE):
                    m = re.search(pattern, body_text)
                    if m:
                        found[m.group(1)] += 1
    return found


def access_bytes(opcode: str) -> int:
    """Bytes one thread moves with a global load/store opcode (LDG.E.128 -> 16, LDG.E.U16 -> 2;
    no width suffix is a 32-bit access)."""
    parts = opcode.split(".")
    for part, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if part in parts:
            return size
    return 4


def traffic_report(archs: Iterable[int]) -> List[str]:
    """Bytes read and written per output row by each kernel file's traffic_cases() (a kernel's main
    loop in SASS at a named specialization), against the case's SPEC minimum."""
    lines = []
    for mod in kernel_modules():
        for case in getattr(mod, "traffic_cases", lambda: [])():
            for arch in archs:
                prof = sass_profile(case["config"], arch, case["ones"], case["div16"])
                per_row = case["threads"] / case["rows_per_iteration"]
                read = sum(access_bytes(op) * n for op, n in prof["loop_memory"].items() if op.startswith("LD"))
                written = sum(access_bytes(op) * n for op, n in prof["loop_memory"].items() if op.startswith("ST"))
                lines += [f"{case['config']['name']} sm_{arch}, {case['shape']}:",
                          f"  loop body ({case['rows_per_iteration']} rows, {case['threads']} threads): "
                          + ", ".join(f"{op} x{n}" for op, n in sorted(prof["loop_memory"].items())),
                          f"  issued per output row: {read * per_row:.0f} B read, {written * per_row:.0f} B written"
                          f" ({case['issued_note']})",
                          f"  SPEC §1.1 minimum per output row: {case['minimum_read']:.0f} B read, "
                          f"{case['minimum_written']:.0f} B written; the loop's reads cover {case['footprint_read']:.0f} "
                          f"distinct B per row (the rest re-reads them)"]
    return lines


SPILL_MARK = "SPILLS"
ERROR_MARK = "ERROR"


def format_table(results: List[AotResult]) -> str:
    """One row per compilation; a row that spills ends with SPILLS, one that failed reads ERROR."""
    lines = [f"{'kernel configuration':<96} {'sm':>3} {'regs':>5} {'spill B':>8} {'smem B':>7}"]
    for r in results:
        if r.error:
            lines.append(f"{r.kernel:<96} {r.arch:>3} {ERROR_MARK} {r.error[:200]}")
        else:
            mark = f"  <- {SPILL_MARK}" if r.spills else ""
            lines.append(f"{r.kernel:<96} {r.arch:>3} {r.registers:>5} {r.spills:>8} {r.shared_bytes:>7}{mark}")
    return "\n".join(lines)


def summary(results: List[AotResult]) -> str:
    """The closing lines: the count, and each configuration that spilled or failed by name."""
    bad = [r for r in results if r.error or r.spills]
    lines = [f"{len(results)} compilations, {len(bad)} with errors or spills"]
    lines += [f"  {ERROR_MARK if r.error else SPILL_MARK}: {r.kernel} sm_{r.arch}"
              + ("" if r.error else f" ({r.spill_stores} B stored, {r.spill_loads} B loaded)") for r in bad]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)),
                        help="compute capabilities, comma separated (default 75,80,90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: all cores)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--sass", metavar="SUBSTRING",
                        help="instead: SASS instruction counts and loop bodies of the configurations "
                             "whose name contains SUBSTRING")
    parser.add_argument("--ones", default="", help="with --sass: integer arguments compiled as the "
                                                   "constant 1, comma separated (unit strides: s_t,s_oc)")
    parser.add_argument("--div16", default="", help="with --sass: integer arguments compiled as "
                                                    "multiples of 16, comma separated")
    parser.add_argument("--traffic", action="store_true",
                        help="instead: global bytes read and written per output row by the kernels' main "
                             "loops (SASS), against the SPEC minimum")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a]
    if args.traffic:
        print("\n".join(traffic_report(archs)))
        return 0
    if args.sass:
        for cfg in all_configs():
            if args.sass in cfg["name"]:
                for arch in archs:
                    print(sass_profile(cfg, arch, tuple(n for n in args.ones.split(",") if n),
                                       tuple(n for n in args.div16.split(",") if n)))
        return 0
    info = toolchain(archs)
    print(format_toolchain(info), flush=True)
    results = compile_all(archs, jobs=args.jobs)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(toolchain=info, results=[asdict(r) for r in results]), f, indent=1)
    print("\n" + format_toolchain(info))
    print(summary(results))
    return 1 if any(r.error or r.spills for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
