"""Every kernel configuration dispatch can choose compiles ahead of time for real GPUs (docs/spec.md §6).

No GPU is needed: triton.compile targets sm_75 (T4), sm_80 (A100) and sm_90 (H100) and ptxas
reports registers and spills. A configuration that spills or fails to build fails here, in CI,
before any user launches it. The compile runs in a child process: under TRITON_INTERPRET=1 (set
by conftest on CPU machines) the kernels in this process are interpreter objects.

It runs with this environment's Triton and with every other Triton a user gets from a plain
install, each from its own venv when that exists (.ci/run makes them): Triton 3.6 (torch 2.11,
our GPU machines) in `.venv-aot-triton36` and Triton 3.8 (what `pip install torch` brings with
torch 2.14.1) in `.venv-aot-triton38`. The versions allocate registers differently (3.6 and 3.8
each spilled on four tiles that fit 3.9), so a tile must fit all of them.
"""
import ast
import json
import os
import subprocess

import pytest

from helpers import AOT_VENVS, REPO, TOOLCHAINS, bench_module, compiled_kernels_env, toolchain_python

#: bench/aot_report.py: compiles and profiles the configurations (run as a script below, read here)
AOT_REPORT = str(REPO / "bench" / "aot_report.py")
report = bench_module("aot_report")

def test_every_kernel_file_contributes_configs():
    names = {cfg["fn"].__name__ if hasattr(cfg["fn"], "__name__") else cfg["fn"].fn.__name__
             for cfg in report.all_configs()}
    assert {"patch_window_fwd", "patch_window_dweight", "patch_dweight_reduce", "patch_window_dx",
            "patch_conv_gemm", "patch_fold", "attention_fwd_kernel", "attention_bwd_delta_kernel",
            "attention_bwd_protos_kernel", "attention_bwd_rows_kernel", "prototype_logits_kernel",
            "prototype_logits_bwd_kernel"} <= names
    for cfg in report.all_configs():  # a config nobody can dispatch to would be dead weight
        assert set(cfg.get("archs", report.ARCHS)) & set(report.ARCHS), cfg["name"]


def _python_with_nvdisasm(toolchain: str) -> str:
    """The toolchain's Python, when its Triton ships nvdisasm (the SASS tests need it); a skip otherwise."""
    python = toolchain_python(toolchain)
    has_nvdisasm = subprocess.run(
        [python, "-c", "import pathlib, triton; print((pathlib.Path(triton.__file__).parent / 'backends' / "
                       "'nvidia' / 'bin' / 'nvdisasm').exists())"], capture_output=True, text=True).stdout.strip()
    if has_nvdisasm != "True":
        pytest.skip(f"the Triton of {python} ships no nvdisasm")
    return python


@pytest.mark.aot_sweep
@pytest.mark.parametrize("toolchain", sorted(TOOLCHAINS))
def test_every_configuration_compiles_for_sm75_sm80_sm90_without_spills(tmp_path, toolchain):
    python = toolchain_python(toolchain)
    out = tmp_path / "aot.json"
    env = compiled_kernels_env()
    proc = subprocess.run(
        [python, AOT_REPORT, "--json", str(out),
         "--jobs", os.environ.get("TIMELLM_FAST_AOT_JOBS", str(min(4, os.cpu_count() or 1)))],
        env=env, capture_output=True, text=True, timeout=1800)
    written = json.loads(out.read_text()) if out.exists() else {}
    results = written.get("results")
    assert results, f"report wrote nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    expected = sum(len(set(cfg.get("archs", report.ARCHS)) & set(report.ARCHS))
                   for cfg in report.all_configs())
    assert len(results) == expected
    # spill-free, and within the shared memory of every GPU of the generation (sm_86/89 for sm_80)
    bad = [r for r in results if r["error"] or r["spill_stores"] or r["spill_loads"]
           or r["shared_bytes"] > report.SHARED_MEMORY_LIMIT[r["arch"]]]
    assert not bad, "\n".join(f"{r['kernel']} sm_{r['arch']}: {r['error'] or r}" for r in bad)
    triton_version = written["toolchain"]["triton"]
    if toolchain in AOT_VENVS:  # the venv must hold the version it is named for
        assert triton_version.startswith(AOT_VENVS[toolchain][1] + "."), triton_version
    assert f"toolchain: Triton {triton_version};" in proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_report_marks_spilled_rows_and_names_its_toolchain():
    """What a person reads in the report: a spilled row is marked, the closing lines name it with
    its bytes, and the toolchain line gives the Triton version and a ptxas per architecture."""
    results = [report.AotResult("fits[E=32]", 90, 128, 0, 0, 4096),
               report.AotResult("spills[E=64]", 90, 255, 24, 12, 4096),
               report.AotResult("breaks[E=128]", 75, None, None, None, 0, "RuntimeError: out of resources"),
               report.AotResult("wide[E=128]", 80, 200, 0, 0, 120_000)]  # more than an sm_86 has
    rows = report.format_table(results).splitlines()
    assert [report.SPILL_MARK in row for row in rows[1:]] == [False, True, False, False]
    assert report.ERROR_MARK in rows[3] and report.SHARED_MARK in rows[4]
    closing = report.summary(results)
    assert closing.splitlines()[0] == "4 compilations, 3 with errors, spills or too much shared memory"
    assert "SPILLS: spills[E=64] sm_90 (24 B stored, 12 B loaded)" in closing
    assert "ERROR: breaks[E=128] sm_75" in closing and "fits" not in closing
    assert "OVER SHARED MEMORY: wide[E=128] sm_80 (120000 B > 101376 B)" in closing
    info = dict(triton="3.8.0", ptxas={75: dict(path="/a/ptxas", version="12.8.93"),
                                       80: dict(path="/a/ptxas", version="12.8.93"),
                                       90: dict(path="/a/ptxas-blackwell", version="13.1.80")})
    assert report.format_toolchain(info) == ("toolchain: Triton 3.8.0; ptxas 12.8.93 for sm_75, sm_80 (/a/ptxas); "
                                             "ptxas 13.1.80 for sm_90 (/a/ptxas-blackwell)")


@pytest.mark.parametrize("toolchain", sorted(TOOLCHAINS))
def test_patch_embedding_gather_does_no_integer_division_per_element(toolchain):
    """The forward's gather computes series and circular-neighbour indices once per row; inside
    its loops there is no integer division (on NVIDIA GPUs an I2F/MUFU.RCP/F2I sequence), which
    the per-element form had in every iteration. SASS from nvdisasm, sm_80 and sm_90, the bf16
    configuration specialized as the JIT compiles it at Traffic-folded (unit strides as the
    constant 1, multiples of 16 marked)."""
    python = _python_with_nvdisasm(toolchain)
    env = compiled_kernels_env()
    name = "patch_conv_gemm[x=bf16,w=bf16,dot=bf16,K=16,O=16,fma=False,dropout=False]"
    proc = subprocess.run([python, AOT_REPORT, "--sass", name,
                           "--arch", "80,90", "--ones", "N_VARS,s_t,s_wk,s_oc",
                           "--div16", "M,P,C_IN,OUT_COLS,s_b,s_n,s_wo,s_om"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profiles = [ast.literal_eval(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [p["arch"] for p in profiles] == [80, 90]
    for p in profiles:
        assert len(p["loop_bodies"]) == 3, p  # one channel loop per conv tap
        assert p["loop_opcodes"].get("LDG", 0) > 0, p  # the gather is inside them
        division = {op: n for op, n in p["loop_opcodes"].items() if op in ("I2F", "F2I", "MUFU")}
        assert not division, (p["arch"], division)


@pytest.mark.parametrize("toolchain", sorted(TOOLCHAINS))
def test_patch_window_forward_loop_moves_16_byte_vectors(toolchain):
    """The windowed forward's main loop at Traffic-folded (contiguous bf16 series, stride 8) reads
    its windows with 128-bit loads and writes y with 128-bit stores: no 2-byte gather is left in
    the loop (the weight's strided gather happens once per program, before it). SASS of sm_90
    and sm_80 from nvdisasm, specialized as the JIT compiles that launch."""

    python = _python_with_nvdisasm(toolchain)
    proc = subprocess.run([python, AOT_REPORT, "--sass", report.TRAFFIC_FOLDED_FWD,
                           "--arch", "80,90", "--ones", ",".join(report.TRAFFIC_FOLDED_ONES)],
                          env=compiled_kernels_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    profiles = [ast.literal_eval(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [p["arch"] for p in profiles] == [80, 90]
    for p in profiles:
        assert len(p["loop_bodies"]) == 1, p  # the persistent loop over row blocks
        loop = p["loop_memory"]
        loads = {op: n for op, n in loop.items() if op.startswith("LDG")}
        stores = {op: n for op, n in loop.items() if op.startswith("STG")}
        assert loads and all(report.access_bytes(op) == 16 for op in loads), (p["arch"], loop)
        assert loads.get("LDG.E.128", 0) >= 3, (p["arch"], loop)  # three taps (and the series' end)
        assert stores and all(report.access_bytes(op) == 16 for op in stores), (p["arch"], loop)
        assert sum(loop.values()) == sum(loads.values()) + sum(stores.values()), (p["arch"], loop)


def test_traffic_report_prints_bytes_per_output_row_against_the_minimum():
    """`aot_report.py --traffic` (the same SASS, sm_90) states the bytes the forward's loop moves per
    output row at Traffic-folded: y's 32 B written (a 16-byte store per thread, 128 threads per
    64 rows), 128 B of reads issued (three 32-byte taps and the predicated series-end load), and
    beside them the docs/spec.md §1.1 minimum of 16 B read and 32 B written."""
    python = toolchain_python("this-env")
    proc = subprocess.run([python, AOT_REPORT, "--traffic", "--arch", "90"],
                          env=compiled_kernels_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "nvdisasm" in proc.stderr:
        pytest.skip("this Triton ships no nvdisasm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "issued per output row: 128 B read, 32 B written" in proc.stdout, proc.stdout
    assert "docs/spec.md §1.1 minimum per output row: 16 B read, 32 B written" in proc.stdout, proc.stdout


@pytest.mark.aot_sweep
@pytest.mark.parametrize("toolchain", sorted(TOOLCHAINS))
def test_attention_work_per_element_is_within_the_factorized_budgets(toolchain):
    """`aot_report.py --work`: the MMA FLOPs and exponentials per (row, prototype, head) element of the bf16
    attention kernels at the docs/spec.md §2 shapes, counted from their sm_90 SASS as the JIT builds them
    (docs/spec.md §1.3 budgets: forward 2·D + 2·E, default backward 6·D + 4·E, deterministic backward
    8·D + 6·E; one exponential per element per softmax pass, plus the forward's rescale, one per row
    and prototype block)."""
    python = toolchain_python(toolchain)
    proc = subprocess.run([python, AOT_REPORT, "--work"], env=compiled_kernels_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [dict(kv.split("=") for kv in line.split()[4:]) | dict(role=line.split()[1], shape=line.split()[2])
            for line in proc.stdout.splitlines() if line.startswith("work ")]
    assert {(r["role"], r["shape"]) for r in rows} == {(role, shape) for role in ("fwd", "bwd", "bwd-deterministic")
                                                      for shape, _, _ in report.WORK_SHAPES}
    passes = {"fwd": 1, "bwd": 1, "bwd-deterministic": 2}  # softmax passes over each element
    for r in rows:
        flops, budget = float(r["mma_flops_per_element"]), float(r["spec_budget"])
        assert 0 < flops <= budget, r
        assert float(r["ex2_per_element"]) <= passes[r["role"]] + (1 / 16 if r["role"] == "fwd" else 0), r
    etth1 = {r["role"]: float(r["mma_flops_per_element"]) for r in rows if r["shape"] == "etth1-folded"}
    assert etth1["fwd"] == 320 and etth1["bwd"] <= 704  # docs/spec.md §1.3: 1.6x and 1.8x less than FlashAttention's


def _work_rows(python: str, *args: str) -> dict:
    proc = subprocess.run([python, AOT_REPORT, "--work", *args], env=compiled_kernels_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {(line.split()[1], line.split()[2]): dict(kv.split("=") for kv in line.split()[3:])
            for line in proc.stdout.splitlines() if line.startswith("work ")}


@pytest.mark.aot_sweep
def test_work_report_counts_the_polynomial_share_of_the_exponentials():
    """With a share of the exponentials on the FMA units, `aot_report.py --work` counts MUFU.EX2 per element
    at 1 - share of the all-MUFU build (what is left at share 1 is the forward's rescale, one per row
    and block, taken only past the threshold at E >= 64); MMA FLOPs do not move."""
    python = toolchain_python("this-env")
    shares = {eighths: _work_rows(python, "--poly-eighths", str(eighths)) for eighths in (0, 4, 8)}
    for key, mufu in shares[0].items():
        role, shape = key
        half, poly = shares[4][key], shares[8][key]
        assert float(poly["ex2_per_element"]) <= 1 / 16, (key, poly)
        expected = 0.5 * (float(mufu["ex2_per_element"]) + float(poly["ex2_per_element"]))
        assert abs(float(half["ex2_per_element"]) - expected) <= 0.01, (key, half, expected)
        assert half["mma_flops_per_element"] == mufu["mma_flops_per_element"] == poly["mma_flops_per_element"]
        if mufu["E"] == "32":  # the exponentials the E = 32 kernels issue drop to 1 - share
            assert float(half["ex2_per_element"]) <= 0.5 * float(mufu["ex2_per_element"]) + 1 / 32, key
