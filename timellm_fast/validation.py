"""Input checks shared by the ops and modules: every error names the argument and what was expected."""
from __future__ import annotations

import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def positive_int(name: str, value) -> int:
    """value as a Python int: any integer type (a NumPy integer too, as nn.Linear and nn.Conv1d take
    them), positive; bools are rejected as sizes."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


def dropout_prob(name: str, value) -> float:
    """value as a float in [0, 1], the range nn.Dropout accepts (1 drops everything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a float in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN and inf (no math.isfinite: dynamo can't trace it)
        raise ValueError(f"{name} must be a finite float in [0, 1], got {value!r}")
    return value


def float_tensor(name: str, t, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {shape_doc}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), "
                        f"got {t.dtype}")
    return t


def same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                         f"move both to the same device")
