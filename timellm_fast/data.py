"""Real ETT windows for checks and benchmarks, with a synthetic fallback.

Where the ETT-hour CSVs (ETTh1.csv, ETTh2.csv) come from: the ETDataset repository
(https://github.com/zhouhaoyi/ETDataset) or Time-LLM's dataset/ folder. They are never copied
into this repository. A caller names one with a path (the CLI's --data), or sets
$TIMELLM_FAST_DATA to a CSV file or to a folder that holds them. A path that was named but
does not exist is an error (DataNotFoundError); only when no data was asked for at all do the
loaders fall back to a seeded synthetic series, and their second result says so.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

DATA_ENV = "TIMELLM_FAST_DATA"
DATA_SOURCES = "the ETDataset repository (https://github.com/zhouhaoyi/ETDataset) or Time-LLM's dataset/ folder"


class DataNotFoundError(FileNotFoundError):
    """A data path the user named does not exist or does not hold the CSV asked for."""


def synthetic_notice(name: str = "ETTh1") -> str:
    return (f"synthetic series: no data was given (--data PATH or ${DATA_ENV}), so a seeded stand-in with "
            f"{name}'s shape is used; get the real {name}.csv from {DATA_SOURCES}")


def _csv_at(path: Path, name: str, what: str) -> Path:
    """`path` itself when it is a file, `path`/`name`.csv when it is a folder, else the error
    (`what` names where the path came from)."""
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / f"{name}.csv"
        if candidate.is_file():
            return candidate
        raise DataNotFoundError(f"{what}: {path} is a folder without {name}.csv")
    raise DataNotFoundError(f"{what}: {path} does not exist")


def resolve_data(path=None, name: str = "ETTh1") -> Optional[Path]:
    """The CSV to read: `path` (a file, or a folder holding `name`.csv), else $TIMELLM_FAST_DATA
    (the same), else None (no data was asked for). Raises DataNotFoundError naming the path when
    the one asked for is not there."""
    if path is not None and str(path) != "":
        return _csv_at(Path(path), name, "data path")
    env = os.environ.get(DATA_ENV, "")
    if env:
        return _csv_at(Path(env), name, f"${DATA_ENV}")
    return None


# --------------------------------------------------------------------------- ETT-hour windows
# The standard ETT-hour split of the Time-Series-Library / Time-LLM loaders: 12 months of train,
# 4 of validation, 4 of test, 30-day months of 24 rows; validation and test start seq_len rows
# early so their first window's input lies just before the split; the scaler is fit on train.

ETT_HOUR_MONTH = 30 * 24
ETT_HOUR_ROWS_NEEDED = 20 * ETT_HOUR_MONTH  # 14400
SPLITS = ("train", "val", "test")
WINDOW_MODES = ("independent", "folded")


def ett_hour_borders(seq_len: int) -> dict:
    """split -> (first row, end row) of the rows a split's windows are cut from."""
    train_end, val_end, test_end = 12 * ETT_HOUR_MONTH, 16 * ETT_HOUR_MONTH, 20 * ETT_HOUR_MONTH
    return {"train": (0, train_end), "val": (train_end - seq_len, val_end), "test": (val_end - seq_len, test_end)}


def read_ett_csv(path) -> torch.Tensor:
    """values [rows, columns] float32 of an ETT csv (the date column dropped)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)  # date, HUFL, HULL, MUFL, MULL, LUFL, LULL, OT
        rows = [[float(v) for v in row[1:]] for row in reader if row]
    return torch.tensor(rows, dtype=torch.float32)


def synthetic_ett(rows: int = 17420, channels: int = 7, seed: int = 0) -> torch.Tensor:
    """A seeded stand-in with ETT's shape: daily and weekly cycles, a slow drift and noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(rows, dtype=torch.float32)[:, None]
    phase = torch.rand(1, channels, generator=g) * 6.28
    scale = 1 + 4 * torch.rand(1, channels, generator=g)
    series = (torch.sin(t * 6.28 / 24 + phase) + 0.5 * torch.sin(t * 6.28 / 168 + 2 * phase)
              + t / rows * torch.randn(1, channels, generator=g))
    return scale * series + 0.2 * torch.randn(rows, channels, generator=g)


def load_ett_values(path=None, name: str = "ETTh1") -> Tuple[torch.Tensor, str]:
    """(values [rows, 7], where from): the CSV at `path`, else from $TIMELLM_FAST_DATA, else
    synthetic_ett() with the synthetic notice as the second field. A path asked for that is
    not there raises DataNotFoundError."""
    resolved = resolve_data(path, name)
    if resolved is None:
        return synthetic_ett(), synthetic_notice(name)
    return read_ett_csv(resolved), str(resolved)


def ett_windows(batch: int, seq_len: int = 512, name: str = "ETTh1",
                seed: int = 0, path=None) -> Tuple[torch.Tensor, str]:
    """`batch` random windows [batch, seq_len, channels] normalized per series (Time-LLM's RevIN
    without affine) from load_ett_values' series (the second result says where it came from)."""
    values, source = load_ett_values(path, name)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, values.shape[0] - seq_len, (batch,), generator=g)
    x = torch.stack([values[s:s + seq_len] for s in starts.tolist()])
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True, unbiased=False) + 1e-5
    return (x - mean) / std, source


class ETTHourWindows(torch.utils.data.Dataset):
    """Sliding windows of one split of an ETT-hour series, standardized with train statistics.

    ``mode="independent"`` (Time-LLM's loader): each item is one variable,
    ``x [seq_len, 1]``, ``y [label_len + pred_len, 1]``; items are ordered variable-major.
    ``mode="folded"``: each item holds all variables, ``x [seq_len, N]``, ``y [label_len + pred_len, N]``.
    """

    def __init__(self, values: torch.Tensor, split: str = "train", seq_len: int = 512, pred_len: int = 96,
                 label_len: int = 0, mode: str = "independent"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if mode not in WINDOW_MODES:
            raise ValueError(f"mode must be one of {', '.join(WINDOW_MODES)}, got {mode!r}")
        for name, value in (("seq_len", seq_len), ("pred_len", pred_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(label_len, bool) or not isinstance(label_len, int) or not 0 <= label_len <= seq_len:
            raise ValueError(f"label_len must be an int in [0, seq_len={seq_len}], got {label_len!r}")
        if not isinstance(values, torch.Tensor) or values.dim() != 2:
            raise ValueError(f"values must be a [rows, channels] tensor, got "
                             f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
        if values.shape[0] < ETT_HOUR_ROWS_NEEDED:
            raise ValueError(f"values has {values.shape[0]} rows; the ETT-hour split needs at least "
                             f"{ETT_HOUR_ROWS_NEEDED} (20 months of hourly rows)")
        borders = ett_hour_borders(seq_len)
        if borders["val"][0] < 0:
            raise ValueError(f"seq_len={seq_len} is longer than the train split ({borders['train'][1]} rows)")
        train = values[slice(*borders["train"])].double()
        self.mean = train.mean(dim=0)
        self.std = train.std(dim=0, unbiased=False)  # a standard scaler: population std
        if (self.std == 0).any():
            raise ValueError("values has a constant column in the train split; cannot standardize it")
        first, end = borders[split]
        self.data = ((values[first:end].double() - self.mean) / self.std).float()  # [rows, N]
        self.split, self.mode = split, mode
        self.seq_len, self.pred_len, self.label_len = seq_len, pred_len, label_len
        self.windows_per_variable = self.data.shape[0] - seq_len - pred_len + 1
        if self.windows_per_variable <= 0:
            raise ValueError(f"split {split!r} has {self.data.shape[0]} rows, too few for seq_len + pred_len = "
                             f"{seq_len + pred_len}")
        self.n_vars = self.data.shape[1]

    def __len__(self) -> int:
        if self.mode == "independent":
            return self.windows_per_variable * self.n_vars
        return self.windows_per_variable

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} windows")
        index %= len(self)
        columns = slice(None)
        if self.mode == "independent":
            variable, index = divmod(index, self.windows_per_variable)
            columns = slice(variable, variable + 1)
        x_end = index + self.seq_len
        y_start = x_end - self.label_len
        return (self.data[index:x_end, columns],
                self.data[y_start:x_end + self.pred_len, columns])

    def inverse_transform(self, y: torch.Tensor, variable: Optional[int] = None) -> torch.Tensor:
        """Back to the csv's units: all variables in the last dim, or the one given."""
        mean, std = (self.mean, self.std) if variable is None else (self.mean[variable], self.std[variable])
        return (y.double() * std + mean).to(y.dtype)


def ett_hour_loader(values: torch.Tensor, split: str, batch_size: int, seq_len: int = 512, pred_len: int = 96,
                    label_len: int = 0, mode: str = "independent", shuffle: Optional[bool] = None,
                    seed: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of ETTHourWindows; shuffled (seeded) for train unless told otherwise."""
    dataset = ETTHourWindows(values, split, seq_len, pred_len, label_len, mode)
    shuffle = split == "train" if shuffle is None else shuffle
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       drop_last=drop_last)
