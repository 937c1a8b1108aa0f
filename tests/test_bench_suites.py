"""The benchmark suites must not rot: CI runs them in their reduced CPU form, and the README
renderer is checked on a synthetic result file."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_suites_run_and_write_results(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "bench"), "-q", "-p", "no:cacheprovider",
         f"--bench-out={out}"], cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO / "bench")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert {"device", "torch", "triton", "date"} <= set(data["environment"])
    seen = {(r["op"], r["impl"], r["mode"]) for r in data["results"]}
    for op, impls in (("patch_embedding", ("eager", "ours")),
                      ("reprogramming", ("eager", "sdpa-fold", "ours"))):
        for impl in impls:
            for mode in ("fwd", "fwd+bwd"):
                assert (op, impl, mode) in seen
    for r in data["results"]:
        assert r["status"] == "ok" and r["seconds"] > 0 and r["flops"] > 0 and r["bytes"] > 0
    table = (out / "results.md").read_text()
    assert "| reprogramming | cpu-tiny | float32 | fwd+bwd | ours |" in table


def test_readme_renderer_quotes_only_committed_gpu_results(tmp_path):
    spec = importlib.util.spec_from_file_location("render_readme", REPO / "bench" / "render_readme.py")
    render_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_readme)
    assert "No GPU benchmark results" in render_readme.render([])
    rows = [dict(op="reprogramming", shape="etth1-folded", dtype="bfloat16", mode="fwd", impl=impl,
                 status="ok", seconds=secs, peak_bytes=2**20 * mib)
            for impl, secs, mib in (("ours", 0.001, 10), ("eager", 0.004, 400), ("sdpa-fold", 0.002, 20))]
    rows.append(dict(op="reprogramming", shape="etth1-folded", dtype="bfloat16", mode="fwd",
                     impl="compile", status="OOM"))
    path = tmp_path / "h100-x" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(dict(environment=dict(device="NVIDIA H100", torch="2.11", triton="3.6",
                                                     date="2026-11-25"), results=rows)))
    render_readme.ROOT = tmp_path
    text = render_readme.render([path])
    assert "| reprogramming | etth1-folded | bfloat16 | fwd | 1.000 | 4.00x | OOM |  | 2.00x | 10 | 400 |" in text
