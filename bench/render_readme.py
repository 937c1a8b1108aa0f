"""Renders README.md's results section from the committed bench/results/*/results.json.

    python bench/render_readme.py          # rewrites the block between the results markers

No number in that section is typed by hand: this script writes all of it. Results from CPU runs
(folders named local-*) are never rendered: they do not time kernels.
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
PEERS = ("eager", "compile", "compile-max-autotune", "sdpa-fold", "ours-custom-op")  # the last: our own route


def gpu_result_files():
    return sorted(p for p in (ROOT / "bench" / "results").glob("*/results.json")
                  if not p.parent.name.startswith("local-"))


def render(files) -> str:
    if not files:
        return ("No GPU benchmark results are committed yet, so this README quotes no speed or "
                "memory number. `timellm-fast bench` on a CUDA machine writes them under "
                "`bench/results/<gpu>-<date>/`.")
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
        lines += ["", "Issue 6 targets on this run (`bench/report.py` `targets`; unmeasured = the case did not "
                  "run in this session's time budget):", ""]
        lines += targets_table(targets(data["results"]))
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render(gpu_result_files())}\n{END}{tail}")
    print("README.md results section rendered from", len(gpu_result_files()), "result file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
