"""The @triton.jit helpers the patch embedding's kernels share: rows as (series, patch), the
circular neighbour patches, the windows of the padded series, and the Philox dropout mask, whose
host side (dropout_args) every launcher passes the same way. Notation and the windows' layout:
kernels/patch_embedding.py."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, rows, cols, OUT_COLS, dropout_p):
    """Philox keep-mask of the [M, OUT_COLS] output; the element index is the Philox offset,
    so forward and backward regenerate the same mask from the same seed."""
    offsets = rows[:, None] * OUT_COLS + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def series_rows(x_ptr, rows, M, P, N_VARS, s_b, s_n):
    """Rows (series bn, patch p) -> each row's series base pointer, p, and whether it exists."""
    bn = rows // P
    p = rows - bn * P
    series = x_ptr + (bn // N_VARS).to(tl.int64) * s_b + (bn % N_VARS).to(tl.int64) * s_n  # [BLOCK_M]
    return series, p, rows < M


@triton.jit
def circular(q, P):
    """q mod P for q in [-P, 2P): a neighbour patch of the circular conv, without a division."""
    q = tl.where(q < 0, q + P, q)
    return tl.where(q >= P, q - P, q)


@triton.jit
def series_end(series, needed, T, s_t, TAIL: tl.constexpr):
    """x[T - 1] of each row's series ([BLOCK_M], x's dtype; 0 where not `needed`), the value of
    the replication pad: a TAIL-wide load of the series' last steps (whole vectors when T is a
    multiple of 16), the last step picked on chip. Predicated on `needed`, so rows whose windows
    stay inside the series issue no load."""
    tail = tl.maximum(T - TAIL, 0) + tl.arange(0, TAIL)  # [TAIL] time steps
    vals = tl.load(series[:, None] + tail.to(tl.int64)[None, :] * s_t,
                   mask=needed[:, None] & (tail < T)[None, :], other=0.0)  # [BLOCK_M, TAIL]
    return tl.sum(tl.where((tail == T - 1)[None, :], vals.to(tl.float32), 0.0), axis=1).to(vals.dtype)


@triton.jit
def window(series, q, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t,
           ELEM_BYTES: tl.constexpr, CACHE: tl.constexpr):
    """Channels c of padded patch q of each row's series: [BLOCK_M, BLOCK_C], zero at c >= PATCH_LEN.

    One contiguous window per row. The start q * stride is computed from the stride in bytes:
    the JIT marks that argument divisible by 16 exactly when every window starts on a 16-byte
    boundary, and the division by the element size keeps that fact, so the load vectorizes.
    """
    start = q * STRIDE_BYTES // ELEM_BYTES  # [BLOCK_M] first time step of the patch
    pos = start[:, None] + c[None, :]  # [BLOCK_M, BLOCK_C]
    in_series = pos < T
    c_ok = (c < PATCH_LEN)[None, :]
    a = tl.load(series[:, None] + pos.to(tl.int64) * s_t, mask=row_ok[:, None] & in_series & c_ok,
                other=0.0, cache_modifier=CACHE)
    return tl.where(in_series | ~c_ok, a, x_end[:, None])  # replication pad on the right


def dropout_args(dropout_p: float) -> tuple:
    """The kernels' (dropout_p, dropout_scale) arguments."""
    return float(dropout_p), (1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0)
