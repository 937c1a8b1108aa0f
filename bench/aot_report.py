"""Ahead-of-time compilation of every kernel configuration for real GPUs, with no GPU present.

``python bench/aot_report.py [--arch 75,80,90]`` compiles each kernel build of bench/aot_configs.py
with ``triton.compile`` for the given compute
capabilities and prints registers, spill bytes and shared memory per configuration (ptxas -v on
the generated PTX), marks every row that spills, fails or needs more shared memory than its GPU
generation has, and names the toolchain it used (Triton version, the ptxas of each architecture).
tests/test_aot.py runs it under each supported Triton and asserts none does. ``--work`` counts the
attention kernels' MMA FLOPs and exponentials per element from their SASS; ``--sass`` and
``--traffic`` profile others.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import inspect
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Iterable, List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from aot_configs import all_configs, attention_configs, mma_work_budget, patch_embedding_configs
from timellm_fast.kernels import attention
from timellm_fast.kernels import attention_tiles as tiles
from timellm_fast.kernels._environment import interpreting
from timellm_fast.kernels.attention_tiles import ARCHS
from timellm_fast.kernels.patch_embedding_tiles import WINDOW_FWD_TILES
#: shared memory a block may use, per arch class: sm_75's 64 KiB; for sm_80 the 99 KiB of sm_86 and
#: sm_89 (consumer Ampere and Ada take the sm_80 configurations too; an A100 has 163 KiB); sm_90's 227 KiB
SHARED_MEMORY_LIMIT = {75: 65536, 80: 101376, 90: 232448}


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

    @property
    def over_shared_memory(self) -> bool:
        return self.error is None and self.shared_bytes > SHARED_MEMORY_LIMIT.get(self.arch, self.shared_bytes)

    @property
    def bad(self) -> bool:
        return bool(self.error or self.spills or self.over_shared_memory)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for `arch` (triton >= 3.7 ships a newer one for sm_90+)."""
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


def _triton_ptxas_flags() -> List[str]:
    """The register-allocation flags the installed Triton's own cubin build passes to ptxas (Triton
    3.8 and 3.9 add --regAllocOptLevel=2; 3.6 none): a usage count without them is another build's."""
    source = inspect.getsource(CUDABackend.make_cubin)
    return re.findall(r"'(--regAllocOptLevel=\d+)'", source)


def _parse_ptxas_log(text: str) -> Optional[tuple]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` output, or None."""
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not spill:
        return None
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


def _ptxas_usage(ptx: str, arch: int) -> tuple:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the kernel's PTX, with
    the flags Triton's own build uses (for a compile that Triton's cache served: no log then)."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(arch), "-lineinfo", "-v", *_triton_ptxas_flags(), f"--gpu-name={target}", path,
                               "-o", os.devnull], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[:500]}")
    return _parse_ptxas_log(text)


def jit_specialization(cfg: dict) -> dict:
    """The argument attributes Triton's JIT gives a launch: every pointer 16-byte aligned (torch
    allocations are) and the integer arguments a configuration names in "divisible_by_16" (those
    docs/spec.md §2 shapes make multiples of 16, e.g. d_model and head width). Without them the compile
    is the JIT's generic variant, which on the attention kernels needs up to ~1.5x the registers
    (bench/ROOFLINE.md), so a check without them rejects tiles that the GPU, compiling for the
    real shapes, runs spill-free."""
    hinted = set(cfg.get("divisible_by_16", ()))
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(cfg["signature"].items())
            if ty.startswith("*") or name in hinted}


def _compile(cfg: dict, arch: int):
    """triton.compile of one configuration for sm_<arch>, specialized as the JIT would."""
    src = ASTSource(fn=cfg["fn"], signature=cfg["signature"], constexprs=cfg["constexprs"],
                    attrs=jit_specialization(cfg))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def compile_config(cfg: dict, arch: int) -> AotResult:
    """Registers and spills as Triton's own ptxas run reports them (TRITON_DUMP_PTXAS_LOG), or, when
    Triton's cache served the build, from a ptxas run with the same flags."""
    try:
        log = io.StringIO()
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        try:
            with contextlib.redirect_stdout(log):
                compiled = _compile(cfg, arch)
        finally:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        usage = _parse_ptxas_log(log.getvalue()) or _ptxas_usage(compiled.asm["ptx"], arch)
        regs, st, ld = usage
        return AotResult(cfg["name"], arch, regs, st, ld, int(compiled.metadata.shared))
    except Exception as exc:  # reported, and the test fails on it
        return AotResult(cfg["name"], arch, None, None, None, 0, f"{type(exc).__name__}: {exc}")


def _compile_indexed(job: tuple) -> AotResult:
    index, arch = job
    return compile_config(all_configs()[index], arch)


def compile_all(archs: Iterable[int] = ARCHS, jobs: int = 1) -> List[AotResult]:
    """Compiles every configuration for every arch it can be dispatched on (a config's "archs"
    key, default all), in `jobs` worker processes."""
    if interpreting():
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (the kernels "
                           "are interpreter objects otherwise); run this script in its own process")
    work = [(i, arch) for i, cfg in enumerate(all_configs()) for arch in archs
            if arch in cfg.get("archs", ARCHS)]
    if jobs <= 1:
        return [_compile_indexed(job) for job in work]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_indexed, work, chunksize=1)


def _sass(cfg: dict, arch: int, constants: Optional[dict] = None, div16: tuple = (), with_labels: bool = False) -> tuple:
    """(instructions, loops) of one configuration's SASS (triton.compile + the nvdisasm Triton ships):
    instruction texts in order, and (first, last) index of every loop body (a backward branch).
    `constants` names integer arguments to compile as those constants and `div16` integer arguments
    to compile as multiples of 16, as the JIT specializes a launch whose arguments have those values."""
    cfg = dict(cfg, signature=dict(cfg["signature"]), constexprs=dict(cfg["constexprs"]),
               divisible_by_16=tuple(cfg.get("divisible_by_16", ())) + tuple(div16))
    for name, value in (constants or {}).items():
        cfg["signature"][name], cfg["constexprs"][name] = "constexpr", value
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
    loops = []
    for i, text in enumerate(instructions):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if target and labels.get(target.group(1), i + 1) < i:
            loops.append((labels[target.group(1)], i))
    return (instructions, loops, labels) if with_labels else (instructions, loops)


def _opcode(text: str) -> Optional[str]:
    m = re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_x]+)*)", text)
    return m.group(1) if m else None


GLOBAL_LOAD = r"\b((?:LDGSTS|LDG)(?:\.[A-Z0-9_]+)*)(?![A-Z0-9_])"  # not LDGDEPBAR
GLOBAL_STORE = r"\b(STG(?:\.[A-Z0-9_]+)*)(?![A-Z0-9_])"


def sass_profile(cfg: dict, arch: int, ones: tuple = (), div16: tuple = ()) -> dict:
    """Static SASS of one configuration: instruction count, the size of every loop body (backward
    branches), the opcodes inside loop bodies, the global loads and stores by width (in all and
    inside loops). A CPU-side proxy for kernels bound by instruction issue rather than by memory:
    dynamic instructions per thread = the count outside loops plus each body times its trip count.
    `ones` names integer arguments to compile as the constant 1 (see _sass for `div16`)."""
    instructions, loops, labels = _sass(cfg, arch, {name: 1 for name in ones}, div16, with_labels=True)
    in_loops = collections.Counter()
    for first, last in loops:
        in_loops.update(op.split(".")[0] for op in map(_opcode, instructions[first:last + 1]) if op)
    loads = collections.Counter(m.group(1) for t in instructions for m in [re.search(GLOBAL_LOAD, t)] if m)
    stores = collections.Counter(m.group(1) for t in instructions for m in [re.search(GLOBAL_STORE, t)] if m)
    return dict(kernel=cfg["name"], arch=arch, instructions=len(instructions),
                loop_bodies=[last - first + 1 for first, last in loops], loads=dict(loads), stores=dict(stores),
                loop_opcodes=dict(in_loops), loop_memory=dict(_loop_memory(instructions, labels)))


def _loop_memory(instructions: list, labels: dict) -> "collections.Counter":
    """Global loads and stores inside loop bodies, by full opcode (its width suffix included)."""
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


#: The patch embedding forward's configuration at Traffic-folded (20688 contiguous bf16 series, T 512,
#: patch_len 16, stride 8, d_model 16) and the arguments the JIT compiles as the constant 1 there
#: (one variable per series as bench/common.py lays it out, unit time stride, the weight's tap
#: stride); the multiples of 16 are the configuration's divisible_by_16.
TRAFFIC_FOLDED_FWD = "patch_window_fwd[x=bf16,w=bf16,dot=bf16,C=16,O=16,dropout=False]"
TRAFFIC_FOLDED_ONES = ("N_VARS", "s_t", "s_wk")


def traffic_cases() -> list:
    """For --traffic: the patch embedding forward's main loop at Traffic-folded, with docs/spec.md §1.1's
    minimum per output row (each series read once, each row of y written once; the weight is
    1.5 KB for the whole call)."""
    T, patch_len, stride, d_model, elem = 512, 16, 8, 16, 2
    P = (T + stride - patch_len) // stride + 1
    tile = WINDOW_FWD_TILES[torch.bfloat16]
    config = next(c for c in patch_embedding_configs() if c["name"] == TRAFFIC_FOLDED_FWD)
    return [dict(config=config, ones=TRAFFIC_FOLDED_ONES, div16=(),
                 shape="Traffic-folded (T 512, patch 16/8, d_model 16, bf16)",
                 rows_per_iteration=tile.block_m, threads=32 * tile.num_warps,
                 minimum_read=T * elem / P, minimum_written=d_model * elem, footprint_read=T * elem / P,
                 issued_note=f"reads: 3 taps x {patch_len * elem} B, overlapping windows meant to hit L1, plus the "
                             f"series' last {32 // elem} steps, loaded only by the rows whose patches reach past T")]


def traffic_report(archs: Iterable[int]) -> List[str]:
    """Bytes read and written per output row by each traffic case (a kernel's main loop in SASS at
    a named specialization), against the case's SPEC minimum."""
    lines = []
    for case in traffic_cases():
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
                      f"  docs/spec.md §1.1 minimum per output row: {case['minimum_read']:.0f} B read, "
                      f"{case['minimum_written']:.0f} B written; the loop's reads cover {case['footprint_read']:.0f} "
                      f"distinct B per row (the rest re-reads them)"]
    return lines


# ---- work per element, counted from SASS (the attention kernels) ------------------------------

#: mma.sync shapes of sm_80's HMMA opcodes (per warp)
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}
#: (name, d_model, E) of the docs/spec.md §2 shapes whose attention kernels the work report counts
WORK_SHAPES = (("explained-gpt2", 32, 32), ("etth1-folded", 32, 128), ("weather-folded", 32, 32),
               ("ecl-folded", 16, 32), ("traffic-folded", 16, 32), ("m4", 8, 32))


def mma_flops(instruction: str, num_warps: int) -> int:
    """FLOPs one program executes for this SASS instruction (0 if it is not an MMA): Hopper's
    HGMMA.MxNxK is one MMA per warpgroup (4 warps), sm_80's HMMA.mnk one per warp."""
    op = _opcode(instruction) or ""
    wgmma = re.match(r"[HQ]GMMA\.(\d+)x(\d+)x(\d+)", op)
    if wgmma:
        m, n, k = map(int, wgmma.groups())
        return 2 * m * n * k * (num_warps // 4)
    hmma = re.match(r"HMMA\.(\d+)", op)
    if hmma and hmma.group(1) in _HMMA_SHAPES:
        m, n, k = _HMMA_SHAPES[hmma.group(1)]
        return 2 * m * n * k * num_warps
    return 0


def loop_work(cfg: dict, arch: int, elements_per_iteration: int, constants: Optional[dict] = None) -> dict:
    """MMA FLOPs and MUFU.EX2 per element of work in the kernel's main loop (the loop body with the
    most MMA FLOPs): its instructions' MMA FLOPs and its ex2 count times the program's threads, over
    the elements one iteration covers. Exponentials inside a branch of the loop body (the forward's
    rescale, taken only when a row maximum grows past the threshold) are counted apart, as
    `ex2_in_branches_per_element`; so are all instructions (`instructions_per_element` on the path
    every iteration takes)."""
    instructions, loops, labels = _sass(cfg, arch, constants, with_labels=True)
    if not loops:
        raise ValueError(f"{cfg['name']} on sm_{arch}: no loop in its SASS")
    flops, first, last = max((sum(mma_flops(t, cfg["num_warps"]) for t in instructions[first:last + 1]), first, last)
                             for first, last in loops)
    skipped = set()
    for i in range(first, last + 1):
        target = re.search(r"BRA(?:\.\w+)*\s+`\((\.L_x_\d+)\)", instructions[i])
        if target and i < labels.get(target.group(1), -1) <= last + 1:
            skipped.update(range(i + 1, labels[target.group(1)]))
    threads = cfg["num_warps"] * 32
    ex2 = [i for i in range(first, last + 1) if (_opcode(instructions[i]) or "").startswith("MUFU.EX2")]
    main = [i for i in range(first, last + 1) if i not in skipped]
    per_thread = elements_per_iteration / threads
    return dict(mma_flops_per_element=flops / elements_per_iteration,
                ex2_per_element=sum(1 for i in ex2 if i not in skipped) / per_thread,
                ex2_in_branches_per_element=sum(1 for i in ex2 if i in skipped) / per_thread,
                instructions_per_element=len(main) / per_thread)


def work_lines(arch: int = 90, poly_eighths: Optional[int] = None) -> List[str]:
    """One line per (role, SPEC shape) for the bf16 attention kernels as the JIT builds them on
    `arch`: `work ROLE SHAPE d_model=.. E=.. mma_flops_per_element=.. ex2_per_element=..`, then the
    exponentials inside loop branches, the instructions per element on the path every iteration
    takes, the docs/spec.md §1.3 budget and FlashAttention's work. Roles: fwd; bwd = the default backward
    (delta has no MMA; the prototype-stationary kernel with the atomic row side); bwd-deterministic
    = the prototype-stationary kernel without the row side plus the row-stationary kernel.

    A configuration computing a share of its exponentials by the polynomial (poly_eighths, the
    shipped value unless given) chooses per group of 128 prototypes, a branch the SASS does not
    resolve: its counts are (1 - share)·(the build with every group on MUFU.EX2) + share·(the build
    with every group on the polynomial), both counted from their SASS."""
    by_name = {c["name"]: c for c in attention_configs()}
    lines = []
    for shape, d_model, head_dim in WORK_SHAPES:
        form = attention.core_form(d_model, head_dim)
        block_d, block_e = form.block_d, form.block_e

        def work(role, **constants):
            cfg = tiles.CONFIG_TABLE[(role, arch, torch.bfloat16, torch.bfloat16, "ieee", block_d, block_e, False)]
            eighths = cfg.poly_eighths if poly_eighths is None else poly_eighths
            counts = []
            for pure in (0, 8):  # every group on MUFU.EX2, every group on the polynomial
                pure_cfg = dataclasses.replace(cfg, poly_eighths=pure)
                aot = dict(by_name[cfg.name], constexprs=pure_cfg.constexprs())
                counts.append(loop_work(aot, arch, cfg.block_r * cfg.block_s, constants))
            share = eighths / 8
            return {k: (1 - share) * counts[0][k] + share * counts[1][k] for k in counts[0]}

        # the JIT's build for the factorized form; the row side's branch fixed as each mode takes it
        fwd = work("fwd")
        bwd = work("bwd_protos", with_dx=1)
        det_protos, det_rows = work("bwd_protos", with_dx=0), work("bwd_rows")
        budget = functools.partial(mma_work_budget, block_d=block_d, block_e=block_e)
        roles = (("fwd", fwd, budget("fwd"), 4 * head_dim),
                 ("bwd", bwd, budget("bwd_protos"), 10 * head_dim),
                 ("bwd-deterministic", {k: det_protos[k] + det_rows[k] for k in det_protos},
                  budget("bwd_protos", with_dx=False) + budget("bwd_rows"), 10 * head_dim))
        for role, w, budget, flash in roles:
            lines.append(f"work {role} {shape} d_model={d_model} E={head_dim} "
                         f"mma_flops_per_element={w['mma_flops_per_element']:.0f} "
                         f"ex2_per_element={w['ex2_per_element']:.2f} "
                         f"ex2_in_branches_per_element={w['ex2_in_branches_per_element']:.2f} "
                         f"instructions_per_element={w['instructions_per_element']:.1f} "
                         f"spec_budget={budget} flashattention={flash}")
    return lines


SPILL_MARK = "SPILLS"
ERROR_MARK = "ERROR"
SHARED_MARK = "OVER SHARED MEMORY"


def format_table(results: List[AotResult]) -> str:
    """One row per compilation; a row that spills ends with SPILLS, one that failed reads ERROR."""
    lines = [f"{'kernel configuration':<96} {'sm':>3} {'regs':>5} {'spill B':>8} {'smem B':>7}"]
    for r in results:
        if r.error:
            lines.append(f"{r.kernel:<96} {r.arch:>3} {ERROR_MARK} {r.error[:200]}")
        else:
            mark = f"  <- {SPILL_MARK}" if r.spills else f"  <- {SHARED_MARK}" if r.over_shared_memory else ""
            lines.append(f"{r.kernel:<96} {r.arch:>3} {r.registers:>5} {r.spills:>8} {r.shared_bytes:>7}{mark}")
    return "\n".join(lines)


def summary(results: List[AotResult]) -> str:
    """The closing lines: the count, and each configuration that spilled or failed by name."""
    bad = [r for r in results if r.bad]
    lines = [f"{len(results)} compilations, {len(bad)} with errors, spills or too much shared memory"]
    for r in bad:
        if r.error:
            lines.append(f"  {ERROR_MARK}: {r.kernel} sm_{r.arch}")
        elif r.spills:
            lines.append(f"  {SPILL_MARK}: {r.kernel} sm_{r.arch} ({r.spill_stores} B stored, {r.spill_loads} B loaded)")
        else:
            lines.append(f"  {SHARED_MARK}: {r.kernel} sm_{r.arch} ({r.shared_bytes} B > "
                         f"{SHARED_MEMORY_LIMIT[r.arch]} B)")
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
    parser.add_argument("--work", action="store_true",
                        help="instead: MMA FLOPs and exponentials per (row, prototype, head) element of the "
                             "bf16 attention kernels at the SPEC shapes, counted from sm_90 SASS")
    parser.add_argument("--poly-eighths", type=int, default=None, choices=range(9), metavar="0..8",
                        help="with --work: count as if every configuration computed this many eighths of its "
                             "exponentials by the polynomial (default: each configuration's own)")
    args = parser.parse_args(argv)
    if args.work:
        for line in work_lines(90, args.poly_eighths):
            print(line, flush=True)
        return 0
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
    return 1 if any(r.bad for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
