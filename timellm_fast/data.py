"""Real ETT windows for checks and benchmarks (SPEC §3), with a synthetic fallback.

The CSVs are read from ``$TIMELLM_FAST_DATA``, else ``../shared/data`` next to the working
directory or next to this checkout; they are never copied into the repo.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

DATA_ENV = "TIMELLM_FAST_DATA"


def find_data_dir() -> Optional[Path]:
    candidates = []
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    for c in candidates:
        if (c / "ETTh1.csv").is_file():
            return c
    return None


def load_ett(name: str = "ETTh1") -> Tuple[Optional[torch.Tensor], str]:
    """(values [rows, 7] float32, where from) or (None, why not)."""
    root = find_data_dir()
    if root is None:
        return None, (f"{name}.csv not found (set {DATA_ENV} or place ../shared/data); "
                      f"using synthetic series")
    path = root / f"{name}.csv"
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)  # date, HUFL, HULL, MUFL, MULL, LUFL, LULL, OT
        rows = [[float(v) for v in row[1:]] for row in reader if row]
    return torch.tensor(rows, dtype=torch.float32), str(path)


def ett_windows(batch: int, seq_len: int = 512, name: str = "ETTh1",
                seed: int = 0) -> Tuple[torch.Tensor, str]:
    """`batch` windows [batch, seq_len, 7] normalized per series (Time-LLM's RevIN without
    affine), from the real data when present, else a seeded synthetic mix of sines and noise."""
    values, source = load_ett(name)
    g = torch.Generator().manual_seed(seed)
    if values is None:
        t = torch.arange(seq_len, dtype=torch.float32)
        phase = torch.rand(batch, 1, 7, generator=g) * 6.28
        period = 24.0 * (1 + torch.arange(7, dtype=torch.float32))
        x = torch.sin(t[None, :, None] * 6.28 / period + phase) + 0.1 * torch.randn(
            batch, seq_len, 7, generator=g)
    else:
        starts = torch.randint(0, values.shape[0] - seq_len, (batch,), generator=g)
        x = torch.stack([values[s:s + seq_len] for s in starts.tolist()])
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True, unbiased=False) + 1e-5
    return (x - mean) / std, source
