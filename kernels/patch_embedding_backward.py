"""The patch embedding's backward: dW from windows of the series and the output gradient (row-chunk
partials summed in a fixed order, so dW is the same bits every run), dx from windows of the output
gradient, the gather fallback's fold, and their launcher. Notation and the windows' layout:
kernels/patch_embedding.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import PATCH_INPUT_PRECISION, TL_DTYPE, cdiv, dot_dtype, store_dtype
from .patch_embedding_device import circular, dropout_args, dropout_keep, series_end, series_rows, window
from .patch_embedding_forward import patch_conv
from .patch_embedding_tiles import (DWEIGHT_BLOCK_C, DWEIGHT_BLOCK_M, DWEIGHT_NUM_STAGES, DWEIGHT_NUM_WARPS, DX_BLOCK_D,
                                    DX_BLOCK_J, DX_BLOCK_U, DX_NUM_STAGES, FOLD_BLOCK_R, FOLD_BLOCK_T, NUM_STAGES,
                                    NUM_WARPS, REDUCE_BLOCK, REDUCE_BLOCK_CHUNKS, dweight_block_o, dweight_chunks,
                                    fit_block, windowed_dx)


@triton.jit
def patch_window_dweight(
    x_ptr,  # x: [B, N_VARS, T] (strides s_b, s_n, s_t)
    g_ptr,  # g: [M, D] contiguous, grad of the layer output
    dw_partial_ptr,  # dw_partial: [num_chunks, 3, PATCH_LEN, D] fp32, one slice per row chunk
    g_masked_ptr,  # g_masked: [M, D] fp32, written only under WRITE_MASKED_GRAD
    M, P, N_VARS, T, PATCH_LEN, STRIDE_BYTES, D, ROWS_PER_CHUNK,  # STRIDE_BYTES: stride * x's element size
    s_b, s_n, s_t,
    seed_ptr,  # seed: [1] int64, the forward's
    dropout_p, dropout_scale,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr, WRITE_MASKED_GRAD: tl.constexpr,
):
    """dW_k^T[c, d] = sum over the chunk's rows of patch[(p + k - 1) mod P][c] * g[row, d], k = 0, 1, 2.

    Grid: (row chunk, channel block, output block). Chunks are summed by patch_dweight_reduce
    in a fixed order, so dW is bitwise reproducible.
    """
    ELEM_BYTES: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth // 8
    TAIL: tl.constexpr = 32 // ELEM_BYTES
    stride = STRIDE_BYTES // ELEM_BYTES
    pid_chunk = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    outs = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    out_ok = outs < D
    acc0 = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    row_start = pid_chunk * ROWS_PER_CHUNK
    row_end = tl.minimum(row_start + ROWS_PER_CHUNK, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        series, p, row_ok = series_rows(x_ptr, rows, row_end, P, N_VARS, s_b, s_n)
        g_mask = row_ok[:, None] & out_ok[None, :]
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * D + outs[None, :], mask=g_mask, other=0.0)
        if DROPOUT:
            keep = dropout_keep(seed, rows, outs, D, dropout_p)
            g = tl.where(keep, g.to(tl.float32) * dropout_scale, 0.0)
            if WRITE_MASKED_GRAD:
                if pid_c == 0:
                    tl.store(g_masked_ptr + rows.to(tl.int64)[:, None] * D + outs[None, :], g, mask=g_mask)
        g = g.to(DOT_DTYPE)  # [BLOCK_M, BLOCK_O]
        q0 = circular(p - 1, P)
        q2 = circular(p + 1, P)
        reach = tl.maximum(tl.maximum(q0, p), q2) * stride + PATCH_LEN
        x_end = series_end(series, row_ok & (reach > T), T, s_t, TAIL)
        # pipelined loads are asynchronous copies: ".ca" keeps the window in L1 for the next taps
        a = window(series, q0, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, ".ca")
        acc0 = tl.dot(tl.trans(a.to(DOT_DTYPE)), g, acc0, input_precision=INPUT_PRECISION)
        a = window(series, p, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, ".ca")
        acc1 = tl.dot(tl.trans(a.to(DOT_DTYPE)), g, acc1, input_precision=INPUT_PRECISION)
        a = window(series, q2, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, ".ca")
        acc2 = tl.dot(tl.trans(a.to(DOT_DTYPE)), g, acc2, input_precision=INPUT_PRECISION)
    tap_size = PATCH_LEN * D
    ptrs = (dw_partial_ptr + pid_chunk.to(tl.int64) * 3 * tap_size + c[:, None] * D + outs[None, :])
    mask = (c < PATCH_LEN)[:, None] & out_ok[None, :]
    tl.store(ptrs, acc0, mask=mask)
    tl.store(ptrs + tap_size, acc1, mask=mask)
    tl.store(ptrs + 2 * tap_size, acc2, mask=mask)


@triton.jit
def patch_dweight_reduce(
    partial_ptr,  # partial: [NUM_CHUNKS, 3, PATCH_LEN, D] fp32 contiguous
    dw_ptr,  # dw: [D, PATCH_LEN, 3] contiguous, dtype of the pointer
    NUM_CHUNKS, PATCH_LEN, D,
    BLOCK_CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
):
    """dw[d, c, k] = sum over chunks of partial[chunk, k, c, d], always in the same order."""
    size = 3 * PATCH_LEN * D
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (k, c, d) flattened
    ok = idx < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for ch0 in range(0, NUM_CHUNKS, BLOCK_CHUNKS):
        chunks = ch0 + tl.arange(0, BLOCK_CHUNKS)
        vals = tl.load(partial_ptr + chunks.to(tl.int64)[:, None] * size + idx[None, :],
                       mask=(chunks < NUM_CHUNKS)[:, None] & ok[None, :], other=0.0)  # [BLOCK_CHUNKS, BLOCK]
        acc += tl.sum(vals, axis=0)
    k = idx // (PATCH_LEN * D)
    rest = idx - k * (PATCH_LEN * D)
    c = rest // D
    d = rest - c * D
    tl.store(dw_ptr + d * (3 * PATCH_LEN) + c * 3 + k, acc.to(dw_ptr.dtype.element_ty), mask=ok)


@triton.jit
def patch_window_dx(
    g_ptr,  # g: [R * P, D] contiguous, the (dropout-masked) output gradient
    w_ptr,  # w: [D, PATCH_LEN, 3] (strides s_wd, s_wc, s_wk)
    dx_ptr,  # dx: [R, T] contiguous, dtype of the pointer
    R, P, T, PATCH_LEN, STRIDE_BYTES, D, N_CHUNKS, N_SHIFTS,  # STRIDE_BYTES: stride * dx's element size
    s_wd, s_wc, s_wk,
    BLOCK_J: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dx of rows (series r, chunk j): steps j*stride + u, u < stride, with BLOCK_U >= 2 * stride.

    N_CHUNKS = cdiv(T, stride) chunks per series, so step T - 1 is in the last one; N_SHIFTS =
    cdiv(PATCH_LEN, stride). Column u of a row is step j*stride + u, read by patch q = j - i at
    channel u + i*stride for i in [-1, N_SHIFTS): every patch covering the step, for u < 2*stride.
    The row's columns u in [stride, 2*stride) are steps of the next chunk, which the last chunk
    needs: its steps >= T are the replication pad, whose gradient goes to step T - 1.
    """
    ELEM_BYTES: tl.constexpr = dx_ptr.dtype.element_ty.primitive_bitwidth // 8
    stride = STRIDE_BYTES // ELEM_BYTES
    rows = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    r = rows // N_CHUNKS
    j = rows - r * N_CHUNKS
    row_ok = rows < R * N_CHUNKS
    g_series = g_ptr + r.to(tl.int64) * P * D  # [BLOCK_J]
    u = tl.arange(0, BLOCK_U)
    acc = tl.zeros((BLOCK_J, BLOCK_U), dtype=tl.float32)
    d_blocks = tl.cdiv(D, BLOCK_D)
    # One flat loop over (shift i, tap k, d block): nested or unrolled loops keep more loop
    # scalars live than sm_80/90 hold in registers (ptxas spilled them, at any register count).
    for step in range(0, (N_SHIFTS + 1) * 3 * d_blocks):
        ik = step // d_blocks
        i = ik // 3 - 1
        k = ik - (i + 1) * 3
        d = (step - ik * d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = j - i  # [BLOCK_J] the patch
        q_ok = row_ok & (q >= 0) & (q < P)
        chan = u + i * stride  # [BLOCK_U] its channel
        chan_ok = (chan >= 0) & (chan < PATCH_LEN) & (u < 2 * stride)
        # d(patch q) = sum_k W_k^T g[(q - k + 1) mod P]: the conv's adjoint, taps flipped
        g_rows = g_series + circular(q + (1 - k), P).to(tl.int64) * D  # [BLOCK_J]
        g = tl.load(g_rows[:, None] + d[None, :], mask=q_ok[:, None] & d_ok[None, :],
                    other=0.0)  # [BLOCK_J, BLOCK_D]
        w = tl.load(w_ptr + d[:, None] * s_wd + chan[None, :] * s_wc + k * s_wk,
                    mask=d_ok[:, None] & chan_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_U]
        # pairs (patch, channel) that do not exist are left out, not added as 0 * value: a NaN or
        # inf in W or g must reach exactly the steps it reaches in the reference
        term = tl.dot(g.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
        acc += tl.where(q_ok[:, None] & chan_ok[None, :], term, 0.0)
    pos = j[:, None] * stride + u[None, :]  # [BLOCK_J, BLOCK_U] time step
    last = (j == N_CHUNKS - 1)[:, None]
    pad = tl.sum(tl.where(last & (pos >= T) & (u < 2 * stride)[None, :], acc, 0.0), axis=1)  # [BLOCK_J]
    acc = tl.where(pos == T - 1, acc + pad[:, None], acc)
    mask = row_ok[:, None] & (u < stride)[None, :] & (pos < T)
    tl.store(dx_ptr + r.to(tl.int64)[:, None] * T + pos, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def patch_fold(
    dpatch_ptr,  # dpatch: [R, P, PATCH_LEN] fp32 contiguous, grad of each patch value
    dx_ptr,  # dx: [R, T] contiguous, dtype of the pointer
    R, P, T, STRIDE, PATCH_LEN, N_OVERLAP,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dx[r, t] = sum of dpatch over every (p, c) that read x[r, t]; a gather, so no atomics.

    Padded position u = p*STRIDE + c read x[min(u, T-1)]: t < T-1 collects u = t only, and
    t = T-1 collects every u in [T-1, T-1+STRIDE].
    """
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < R
    is_last = ts == T - 1
    acc = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    base = rows.to(tl.int64)[:, None] * P * PATCH_LEN
    for j in range(0, STRIDE + 1):
        u = ts + j
        active = (ts < T) & ((j == 0) | is_last)
        for i in range(0, N_OVERLAP):
            p = u // STRIDE - i
            c = u - p * STRIDE
            ok = active & (p >= 0) & (p < P) & (c < PATCH_LEN)
            acc += tl.load(dpatch_ptr + base + (p * PATCH_LEN + c)[None, :],
                           mask=row_ok[:, None] & ok[None, :], other=0.0)
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * T + ts[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & (ts < T)[None, :])


def _dx_by_gather(g_src, weight, dx, P, patch_len, stride, seed):
    """dx through d(patches) [M, patch_len] fp32 in memory (strides the windowed dx does not tile)."""
    B, N, T = dx.shape
    D = weight.shape[0]
    M = B * N * P
    # d(patches)[r, p, c] = sum_{k, d} W[d, c, 2 - k] * g[r, (p + k - 1) mod P, d]
    dpatch = torch.empty(M, patch_len, device=g_src.device, dtype=torch.float32)
    sw_d, sw_c, sw_k = weight.stride()
    patch_conv(
        g_src.view(B * N, 1, P * D), weight[:, :, 2:], dpatch, P=P, c_in=D, time_stride=D,
        clamp=P * D - 1, w_strides=(-sw_k, sw_d, sw_c),
        dot_dt=dot_dtype(g_src.dtype, weight.dtype, device=g_src.device), seed=seed,
    )
    R = B * N
    patch_fold[(cdiv(R, FOLD_BLOCK_R), cdiv(T, FOLD_BLOCK_T))](
        dpatch, dx, R, P, T, stride, patch_len, max(1, cdiv(patch_len, stride)),
        BLOCK_R=FOLD_BLOCK_R, BLOCK_T=FOLD_BLOCK_T, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def patch_embedding_bwd(
    x: torch.Tensor,  # x: [B, N, T]
    weight: torch.Tensor,  # weight: [D, patch_len, 3]
    grad_y: torch.Tensor,  # grad_y: [B*N*P, D]
    patch_len: int, stride: int, P: int,
    seed: torch.Tensor,  # seed: [1] int64 on the device, the forward's
    dropout_p: float, need_dx: bool, need_dw: bool,
):  # -> (dx: [B, N, T] in x.dtype or None, dw: [D, patch_len, 3] in weight.dtype or None)
    B, N, T = x.shape
    D = weight.shape[0]
    M = B * N * P
    if M == 0:
        dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_dw else None
        dx = torch.zeros_like(x) if need_dx else None
        return dx, dw
    g = grad_y.contiguous()
    dropout = dropout_p > 0.0
    dw = None
    g_src = g
    if need_dw or (need_dx and dropout):
        # the dW pass regenerates the dropout mask anyway; when dx is wanted it also keeps the
        # masked gradient, so the dx pass does not need Philox again.
        write_masked = need_dx and dropout
        if write_masked:
            g_src = torch.empty(M, D, device=g.device, dtype=torch.float32)
        num_chunks, rows_per_chunk = dweight_chunks(M)
        block_o = dweight_block_o(D, dropout)
        partial = torch.empty(num_chunks, 3, patch_len, D, device=g.device, dtype=torch.float32)
        dot_dt = dot_dtype(x.dtype, g.dtype, device=g.device) if not dropout else torch.float32
        patch_window_dweight[(num_chunks, cdiv(patch_len, DWEIGHT_BLOCK_C), cdiv(D, block_o))](
            x, g, partial, g_src, M, P, N, T, patch_len, stride * x.element_size(), D, rows_per_chunk,
            x.stride(0), x.stride(1), x.stride(2), seed, *dropout_args(dropout_p),
            BLOCK_M=DWEIGHT_BLOCK_M, BLOCK_C=DWEIGHT_BLOCK_C, BLOCK_O=block_o, DOT_DTYPE=TL_DTYPE[dot_dt],
            INPUT_PRECISION=PATCH_INPUT_PRECISION, DROPOUT=dropout, WRITE_MASKED_GRAD=write_masked,
            num_warps=DWEIGHT_NUM_WARPS, num_stages=DWEIGHT_NUM_STAGES)
        if need_dw:
            dw = torch.empty(D, patch_len, 3, device=g.device, dtype=store_dtype(weight.dtype))
            patch_dweight_reduce[(cdiv(3 * patch_len * D, REDUCE_BLOCK),)](
                partial, dw, num_chunks, patch_len, D,
                BLOCK_CHUNKS=REDUCE_BLOCK_CHUNKS, BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
            dw = dw.to(weight.dtype)
    dx = None
    if need_dx:
        dx = torch.empty(B, N, T, device=x.device, dtype=store_dtype(x.dtype))
        if windowed_dx(stride):
            n_chunks = cdiv(T, stride)
            dot_dt = dot_dtype(g_src.dtype, weight.dtype, device=g.device)
            patch_window_dx[(cdiv(B * N * n_chunks, DX_BLOCK_J),)](
                g_src, weight, dx, B * N, P, T, patch_len, stride * dx.element_size(), D, n_chunks,
                cdiv(patch_len, stride), *weight.stride(),
                BLOCK_J=DX_BLOCK_J, BLOCK_U=fit_block(2 * stride, DX_BLOCK_U), BLOCK_D=fit_block(D, DX_BLOCK_D),
                DOT_DTYPE=TL_DTYPE[dot_dt], INPUT_PRECISION=PATCH_INPUT_PRECISION, num_warps=NUM_WARPS,
                num_stages=DX_NUM_STAGES)
        else:
            _dx_by_gather(g_src, weight, dx, P, patch_len, stride, seed)
        dx = dx.to(x.dtype)
    return dx, dw
