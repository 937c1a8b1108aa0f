"""Writes benchmark results: JSON (every row, plus the environment), a markdown table of speedups
against every peer, and PNG plots when matplotlib is installed."""
from __future__ import annotations

import datetime
import json
import os
from collections import defaultdict

import torch


def environment() -> dict:
    import triton

    return dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        date=datetime.date.today().isoformat(),
    )


def _groups(rows):
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["shape"], r["dtype"], r["mode"])][r["impl"]] = r
    return groups


def markdown(rows, env) -> str:
    lines = [f"# Benchmark results: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}. "
             "Median times; speedup = peer time / ours (> 1: ours is faster); fraction of the H100 "
             "limits: 3.35 TB/s HBM, 790 TFLOP/s bf16 dense (67 fp32).", "",
             "| op | shape | dtype | mode | impl | ms | speedup of ours | TFLOP/s | GB/s | % HBM | "
             "% FLOP | peak MiB |", "|" + "---|" * 12]
    for (op, shape, dtype, mode), impls in sorted(_groups(rows).items()):
        ours = impls.get("ours", {})
        for name, r in sorted(impls.items()):
            if r["status"] != "ok":
                lines.append(f"| {op} | {shape} | {dtype} | {mode} | {name} | {r['status']} |  |  |  |  |  |  |")
                continue
            speed = (f"{r['seconds'] / ours['seconds']:.2f}x" if ours.get("status") == "ok" and name != "ours"
                     else "")
            peak = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") is not None else "n/a"
            lines.append(f"| {op} | {shape} | {dtype} | {mode} | {name} | {r['seconds'] * 1e3:.3f} | {speed} | "
                         f"{r['tflops']:.2f} | {r['gbs']:.0f} | {100 * r['frac_hbm']:.1f} | "
                         f"{100 * r['frac_flops']:.1f} | {peak} |")
    shares = []
    for (op, shape, dtype, mode), impls in sorted(_groups(rows).items()):
        if op != "timellm-input-stage":
            continue
        full = _groups(rows).get(("timellm-full-model", shape, dtype, mode), {})
        for name, r in sorted(impls.items()):
            f = full.get(name)
            if r["status"] == "ok" and f and f["status"] == "ok":
                shares.append(f"| {shape} | {dtype} | {mode} | {name} | {100 * r['seconds'] / f['seconds']:.1f}% |")
    if shares:
        lines += ["", "Share of a full Time-LLM step spent in the input stage (prototypes + patch "
                  "embedding + reprogramming):", "", "| shape | dtype | mode | impl | input-stage share |",
                  "|---|---|---|---|---|"] + shares
    series = [r for r in rows if r.get("series_per_s") and r["mode"] == "inference" and r["op"] == "timellm-full-model"]
    if series:
        lines += ["", "Inference throughput (full model):", "", "| shape | impl | series/s |", "|---|---|---|"]
        lines += [f"| {r['shape']} | {r['impl']} | {r['series_per_s']:.0f} |" for r in series]
    if env["device"] == "cpu":
        lines += ["", "CPU run: `ours` executes in Triton's interpreter, so these times only prove "
                  "the suites run; kernel timings need a GPU."]
    return "\n".join(lines) + "\n"


def plots(rows, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    groups = _groups(rows)
    for metric, fname, ylabel in (("speedup", "speedup.png", "peer time / ours"),
                                  ("peak_bytes", "memory.png", "peak MiB")):
        fig, ax = plt.subplots(figsize=(10, 4))
        labels, series = [], defaultdict(list)
        for key, impls in sorted(groups.items()):
            ours = impls.get("ours")
            if not ours or ours["status"] != "ok":
                continue
            labels.append("/".join(key))
            for name, r in impls.items():
                if r["status"] != "ok":
                    series[name].append(float("nan"))
                elif metric == "speedup":
                    series[name].append(r["seconds"] / ours["seconds"])
                else:
                    series[name].append((r.get("peak_bytes") or 0) / 2**20)
        for name, values in series.items():
            if len(values) == len(labels):
                ax.plot(range(len(labels)), values, marker="o", label=name)
        ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=6)
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=120)
        plt.close(fig)


def write_results(out: str, rows: list) -> None:
    os.makedirs(out, exist_ok=True)
    env = environment()
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(environment=env, results=rows), f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(rows, env))
    plots(rows, out)
    print(f"\nbenchmark results written to {out}/results.json, results.md")
