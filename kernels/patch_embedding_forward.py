"""The patch embedding's forward: the windowed kernel (every Time-LLM shape), the gather kernel
(the fallback for wider patches, and d(patches) of the backward's gather dx), and their launchers.
Notation and the windows' layout: kernels/patch_embedding.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import cdiv, dot_dtype, multiprocessor_count, store_dtype
from .patch_embedding_device import circular, dropout_args, dropout_keep, series_end, series_rows, window
from .patch_embedding_tiles import select_gemm_config, select_window_fwd_config, windowed_forward


@triton.jit
def patch_window_fwd(
    x_ptr,  # x: [B, N_VARS, T] (strides s_b, s_n, s_t), any float dtype
    w_ptr,  # w: [D, PATCH_LEN, 3] (strides s_wd, s_wc, s_wk)
    out_ptr,  # out: [M, D] contiguous, M = B * N_VARS * P, dtype of the pointer
    M, P, N_VARS, T, PATCH_LEN, STRIDE_BYTES, D,  # STRIDE_BYTES: stride * x's element size
    s_b, s_n, s_t, s_wd, s_wc, s_wk,
    seed_ptr,  # seed: [1] int64 on the device, read only under DROPOUT
    dropout_p, dropout_scale,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, CACHE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):
    """y[bn*P + p] = sum_k patch[(p + k - 1) mod P] @ W_k, with PATCH_LEN <= BLOCK_C.

    Persistent: grid axis 0 is a few programs per SM, each looping over row blocks, so the
    weight (a [D, PATCH_LEN, 3] tensor, strided along every axis the MMA needs) is loaded once
    per program and the loop body reads windows and writes rows only.
    """
    ELEM_BYTES: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth // 8
    TAIL: tl.constexpr = 32 // ELEM_BYTES  # two 16-byte vectors of the series' end
    stride = STRIDE_BYTES // ELEM_BYTES
    pid_o = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    out_ok = outs < D
    w_tap = w_ptr + c[:, None] * s_wc + outs[None, :] * s_wd  # tap 0 of W^T: [BLOCK_C, BLOCK_O]
    w_ok = (c < PATCH_LEN)[:, None] & out_ok[None, :]
    w0 = tl.load(w_tap, mask=w_ok, other=0.0).to(DOT_DTYPE)
    w1 = tl.load(w_tap + s_wk, mask=w_ok, other=0.0).to(DOT_DTYPE)
    w2 = tl.load(w_tap + 2 * s_wk, mask=w_ok, other=0.0).to(DOT_DTYPE)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for block in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        series, p, row_ok = series_rows(x_ptr, rows, M, P, N_VARS, s_b, s_n)
        q0 = circular(p - 1, P)
        q2 = circular(p + 1, P)
        # the last patches reach past T (row 0 too, its tap 0 wraps to patch P - 1)
        reach = tl.maximum(tl.maximum(q0, p), q2) * stride + PATCH_LEN
        x_end = series_end(series, row_ok & (reach > T), T, s_t, TAIL)
        a = window(series, q0, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, CACHE)
        acc = tl.dot(a.to(DOT_DTYPE), w0, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_O] fp32
        a = window(series, p, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, CACHE)
        acc = tl.dot(a.to(DOT_DTYPE), w1, acc, input_precision=INPUT_PRECISION)
        a = window(series, q2, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, CACHE)
        acc = tl.dot(a.to(DOT_DTYPE), w2, acc, input_precision=INPUT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, rows, outs, D, dropout_p)
            acc = tl.where(keep, acc * dropout_scale, 0.0)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * D + outs[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])


@triton.jit
def patch_conv_gemm(
    src_ptr,  # src: [B, N_VARS, T] (strides s_b, s_n, s_t), any float dtype
    w_ptr,  # w: tap k, in-channel c, out column o at k*s_wk + c*s_wc + o*s_wo
    out_ptr,  # out: [M, OUT_COLS] (strides s_om, s_oc), dtype of the pointer
    M, P, N_VARS, C_IN, OUT_COLS, TIME_STRIDE, CLAMP,
    s_b, s_n, s_t, s_wk, s_wc, s_wo, s_om, s_oc,
    seed_ptr,  # seed: [1] int64 on the device (drawn there, so CUDA-graph replays draw anew)
    dropout_p, dropout_scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < M
    out_ok = outs < OUT_COLS
    # Index math once per row, not per operand element (an integer division per gathered element
    # costs more instructions than the gather; python bench/aot_report.py --sass counts them).
    # A row is (series bn, patch p); tap k reads patch (p + k - 1) mod P, a shift of p.
    bn = rows // P
    p = rows - bn * P
    series = src_ptr + (bn // N_VARS).to(tl.int64) * s_b + (bn % N_VARS).to(tl.int64) * s_n  # [BLOCK_M]
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for k in tl.static_range(3):
        q = p + (k - 1)
        q = tl.where(q < 0, q + P, q)
        q = tl.where(q >= P, q - P, q)  # circular neighbour patch
        start = q * TIME_STRIDE  # [BLOCK_M] first time step of that patch
        w_tap = w_ptr + k * s_wk
        if USE_DOT:
            for c0 in range(0, C_IN, BLOCK_K):
                c = c0 + tl.arange(0, BLOCK_K)
                c_ok = c < C_IN
                pos = tl.minimum(start[:, None] + c[None, :], CLAMP)  # replication pad on the right
                a = tl.load(series[:, None] + pos.to(tl.int64) * s_t, mask=row_ok[:, None] & c_ok[None, :],
                            other=0.0)  # a: [BLOCK_M, BLOCK_K]
                w = tl.load(w_tap + c[:, None] * s_wc + outs[None, :] * s_wo,
                            mask=c_ok[:, None] & out_ok[None, :], other=0.0)  # w: [BLOCK_K, BLOCK_O]
                acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        else:
            # a reduction of 3 * C_IN < 16 is below tl.dot's minimum: plain FMAs, one channel at a time
            for c in range(0, C_IN):
                pos = tl.minimum(start + c, CLAMP)
                a = tl.load(series + pos.to(tl.int64) * s_t, mask=row_ok, other=0.0)  # [BLOCK_M]
                w = tl.load(w_tap + c * s_wc + outs * s_wo, mask=out_ok, other=0.0)  # [BLOCK_O]
                acc += a.to(tl.float32)[:, None] * w.to(tl.float32)[None, :]
    if DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), rows, outs, OUT_COLS, dropout_p)
        acc = tl.where(keep, acc * dropout_scale, 0.0)
    mask = row_ok[:, None] & out_ok[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * s_om + outs[None, :] * s_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def patch_conv(
    src: torch.Tensor,  # src: [B, N_VARS, T], read through its strides
    weight: torch.Tensor,  # weight: [d_out, c_in, 3] viewed through (s_wk, s_wc, s_wo) below
    out: torch.Tensor,  # out: [M, OUT_COLS], M = B*N_VARS*P
    *, P: int, c_in: int, time_stride: int, clamp: int, w_strides: tuple, dot_dt: torch.dtype,
    seed: torch.Tensor, dropout_p: float = 0.0,  # seed: [1] int64 on the device
) -> torch.Tensor:
    """The gather kernel (patch_conv_gemm): the forward's fallback, and d(patches) of dx's."""
    B, n_vars, _ = src.shape
    M, out_cols = out.shape
    if M == 0:
        return out
    cfg = select_gemm_config(3 * c_in, out_cols, dot_dt, dropout_p > 0.0)
    patch_conv_gemm[(cdiv(M, cfg.block_m), cdiv(out_cols, cfg.block_o))](
        src, weight, out, M, P, n_vars, c_in, out_cols, time_stride, clamp,
        src.stride(0), src.stride(1), src.stride(2), *w_strides, out.stride(0), out.stride(1),
        seed, *dropout_args(dropout_p), **cfg.constexprs(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def launch_window_fwd(
    x: torch.Tensor,  # x: [B, N, T], any float dtype and strides
    weight: torch.Tensor,  # weight: [D, patch_len, 3]
    y: torch.Tensor,  # y: [B*N*P, D] contiguous, written
    patch_len: int, stride: int, P: int, dot_dt: torch.dtype,
    seed: torch.Tensor, dropout_p: float,  # seed: [1] int64 on x's device
):
    """patch_window_fwd into y; returns what the launch returns: on a GPU the compiled kernel, whose
    registers and spills the tuner reads (bench/tune_patch_embedding.py)."""
    B, N, T = x.shape
    M, D = y.shape
    cfg = select_window_fwd_config(patch_len, D, dot_dt, dropout_p > 0.0)
    tile = cfg.tile
    programs = min(cdiv(M, tile.block_m), tile.programs_per_sm * multiprocessor_count(x.device))
    return patch_window_fwd[(programs, cdiv(D, cfg.block_o))](
        x, weight, y, M, P, N, T, patch_len, stride * x.element_size(), D,
        x.stride(0), x.stride(1), x.stride(2), *weight.stride(),
        seed, *dropout_args(dropout_p), **cfg.constexprs(), num_warps=tile.num_warps, num_stages=tile.num_stages)


def patch_embedding_fwd(
    x: torch.Tensor,  # x: [B, N, T], any float dtype and strides
    weight: torch.Tensor,  # weight: [D, patch_len, 3]
    out_dtype: torch.dtype, patch_len: int, stride: int, P: int,
    seed: torch.Tensor, dropout_p: float = 0.0,  # seed: [1] int64 on x's device
) -> torch.Tensor:  # y: [B*N*P, D]
    B, N, T = x.shape
    D = weight.shape[0]
    M = B * N * P
    y = torch.empty(M, D, device=x.device, dtype=store_dtype(out_dtype))
    dot_dt = dot_dtype(x.dtype, weight.dtype, device=x.device)
    if M == 0:
        pass
    elif windowed_forward(patch_len):
        launch_window_fwd(x, weight, y, patch_len, stride, P, dot_dt, seed, dropout_p)
    else:
        sw_d, sw_c, sw_k = weight.stride()
        patch_conv(x, weight, y, P=P, c_in=patch_len, time_stride=stride, clamp=T - 1,
                   w_strides=(sw_k, sw_c, sw_d), dot_dt=dot_dt, seed=seed, dropout_p=dropout_p)
    return y.to(out_dtype)
