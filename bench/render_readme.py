"""Renders the results sections of README.md and bench/README.md from the committed
bench/results/*/results.json.

    python bench/render_readme.py          # rewrites the blocks between the results markers

README.md gets the headline: our layers against eager, torch.compile and SDPA-fold, and peak
memory, at the target shapes, each from the latest run that measured it, with GPU, versions and
date. bench/README.md gets every run's full table and its targets. No number in either block is
typed by hand: this script writes all of them. Results from CPU runs (folders named local-*) are
never rendered: they do not time kernels.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from report import targets, targets_table  # noqa: E402
START, END = "<!-- results:start -->", "<!-- results:end -->"
#: (op, shape, dtype, mode, what the row shows) of the README headline, in its order
HEADLINE = (
    ("reprogramming", "etth1-folded", "bfloat16", "fwd", "reprogramming layer, ETTh1 folded (168 series)"),
    ("reprogramming", "etth1-folded", "bfloat16", "fwd+bwd", "reprogramming layer, ETTh1 folded (168 series)"),
    ("reprogramming", "traffic-folded", "bfloat16", "fwd", "reprogramming layer, Traffic folded (20688 series)"),
    ("reprogramming", "traffic-folded", "bfloat16", "fwd+bwd", "reprogramming layer, Traffic folded (20688 series)"),
    ("attention-core", "weather-folded", "bfloat16", "fwd", "attention core alone, Weather folded (E = 32)"),
    ("attention-core", "weather-folded", "bfloat16", "fwd+bwd", "attention core alone, Weather folded (E = 32)"),
    ("attention-core", "etth1-folded", "bfloat16", "fwd", "attention core alone, ETTh1 folded (E = 128)"),
    ("attention-core", "etth1-folded", "bfloat16", "fwd+bwd", "attention core alone, ETTh1 folded (E = 128)"),
    ("patch_embedding", "explained-gpt2", "bfloat16", "fwd", "patch embedding, 28 series"),
    ("patch_embedding", "traffic-folded", "bfloat16", "fwd", "patch embedding, 20688 series"),
    ("timellm-full-model", "explained-gpt2", "bfloat16", "train-step", "whole GPT-2 Time-LLM, training step"),
)
HEADLINE_PEERS = (("eager", "vs eager"), ("compile", "vs torch.compile"), ("sdpa-fold", "vs SDPA-fold"))
PEERS = ("eager", "compile", "compile-max-autotune", "sdpa-fold", "ours-custom-op")  # the last: our own route


def gpu_result_files():
    return sorted(p for p in (ROOT / "bench" / "results").glob("*/results.json")
                  if not p.parent.name.startswith("local-"))


def render(files) -> str:
    if not files:
        return ("No GPU benchmark results are committed yet, so this README quotes no speed or "
                "memory number. `timellm-fast bench` on a CUDA machine writes them under "
                "`bench/results/<gpu>-<date>-run<N>/`.")
    lines = []
    for path in files:
        data = json.loads(path.read_text())
        env = data["environment"]
        lines += [f"**{env['device']}**, torch {env['torch']}, triton {env['triton']}, {env['date']} "
                  f"(`{path.relative_to(ROOT)}`). Speedup = peer's median time / ours (wall clock, "
                  f"do_bench); GPU busy = the kernels' own device time (profiler, where recorded); vs ours-custom-op = "
                  f"our kernels reached through the torch.library custom op instead of the direct route "
                  f"(empty for runs made before the direct route existed).", "",
                  "| op | shape | dtype | mode | ours ms | " + " | ".join(f"vs {p}" for p in PEERS)
                  + " | ours GPU busy ms | ours peak MiB | eager peak MiB |", "|" + "---|" * (8 + len(PEERS))]
        groups = defaultdict(dict)
        for r in data["results"]:
            groups[(r["op"], r["shape"], r["dtype"], r["mode"])][r["impl"]] = r
        for key, impls in sorted(groups.items()):
            ours = impls.get("ours")
            if not ours or ours["status"] != "ok":
                continue
            cells = []
            for peer in PEERS:
                r = impls.get(peer)
                cells.append("" if r is None else r["status"] if r["status"] != "ok"
                             else f"{r['seconds'] / ours['seconds']:.2f}x")

            def mib(r):
                return "" if not r or r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.0f}"

            eager = impls.get("eager")
            busy = f"{ours['device_seconds'] * 1e3:.3f}" if ours.get("device_seconds") else "n/a"
            lines.append(f"| {' | '.join(key)} | {ours['seconds'] * 1e3:.3f} | {' | '.join(cells)} | {busy} | "
                         f"{mib(ours)} | {mib(eager) if eager and eager['status'] == 'ok' else (eager or {}).get('status', '')} |")
        lines += ["", "The open performance targets, judged on this run (`bench/report.py` `targets`; unmeasured = "
                  "the case did not fit in the run's time budget, or the target is on GPU time and the run "
                  "did not record it):", ""]
        lines += targets_table(targets(data["results"]))
        lines.append("")
    return "\n".join(lines).rstrip()


def _run_label(path: Path) -> str:
    return path.parent.name


def _cell(impls: dict, peer: str) -> str:
    ours, r = impls["ours"], impls.get(peer)
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"]
    return f"{r['seconds'] / ours['seconds']:.2f}x"


def _mib(r) -> str:
    if not r:
        return ""
    if r.get("status") != "ok":
        return r.get("status", "")
    return "" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:,.0f}"


def render_headline(files) -> str:
    """README's block: one row per HEADLINE case from the latest run whose `ours` row ran ok."""
    if not files:
        return render([])
    runs = []
    for path in files:
        data = json.loads(path.read_text())
        groups = defaultdict(dict)
        for r in data["results"]:
            groups[(r["op"], r["shape"], r["dtype"], r["mode"])][r["impl"]] = r
        runs.append((data["environment"], path, groups))
    runs.sort(key=lambda run: (run[0]["date"], _run_label(run[1])))
    lines = ["| what (bf16) | mode | ours ms | " + " | ".join(label for _, label in HEADLINE_PEERS)
             + " | vs eager, GPU busy time | ours peak MiB | eager peak MiB | run |",
             "|" + "---|" * (7 + len(HEADLINE_PEERS))]
    number = {path: i for i, (_, path, _) in enumerate(runs, 1)}
    used = []
    for op, shape, dtype, mode, what in HEADLINE:
        found = next(((env, path, groups[(op, shape, dtype, mode)]) for env, path, groups in reversed(runs)
                      if groups.get((op, shape, dtype, mode), {}).get("ours", {}).get("status") == "ok"), None)
        if found is None:
            continue
        env, path, impls = found
        if path not in used:
            used.append(path)
        cells = " | ".join(_cell(impls, peer) for peer, _ in HEADLINE_PEERS)
        ours, eager = impls["ours"], impls.get("eager") or {}
        busy = (f"{eager['device_seconds'] / ours['device_seconds']:.2f}x"
                if ours.get("device_seconds") and eager.get("status") == "ok" and eager.get("device_seconds") else "")
        lines.append(f"| {what} | {mode} | {ours['seconds'] * 1e3:.3f} | {cells} | {busy} | {_mib(ours)} | "
                     f"{_mib(impls.get('eager'))} | {number[path]} |")
    notes = []
    for path in sorted(used, key=number.get):
        i, env = number[path], next(e for e, p, _ in runs if p == path)
        notes.append(f"{i}: {env['device']}, torch {env['torch']}, Triton {env['triton']}, {env['date']} "
                     f"(`{path.relative_to(ROOT).parent}`)")
    head = ["Ratios are the peer's median time over ours (wall clock, same process, same GPU): above 1x "
            "ours is faster, below 1x it is slower; GPU busy time: the kernels' own device time "
            "(profiler), without the host's launch overhead, where the run recorded it. Peak memory: "
            "the allocator's peak during one call. Empty: that run did not measure the peer. Runs: " + "; ".join(notes) + ".", ""]
    tail = ["", "These runs measured the kernels as they were on those dates. The kernels have changed "
            "since (see docs/verification.md for what changed); those changes are checked on the CPU "
            "but not yet timed on a GPU. Every run's full table and the performance targets: "
            "bench/README.md."]
    return "\n".join(head + lines + tail)


def _rewrite(path: Path, block: str) -> bool:
    text = path.read_text()
    if START not in text or END not in text:
        print(f"{path.relative_to(ROOT)} has no {START} ... {END} block", file=sys.stderr)
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{block}\n{END}{tail}")
    return True


def main() -> int:
    files = gpu_result_files()
    ok = _rewrite(ROOT / "README.md", render_headline(files))
    ok &= _rewrite(ROOT / "bench" / "README.md", render(files))
    print("README.md and bench/README.md results sections rendered from", len(files), "result file(s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
