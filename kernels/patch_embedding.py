"""Fused patch embedding: replication pad + unfold + circular Conv1d (kernel 3) + dropout.

The layer is a GEMM ``[B*N*P, 3*patch_len] x [3*patch_len, d_model]`` whose left operand is
formed on chip from the raw series, so neither the padded series nor the unfolded patches ever
exist in memory. Output row (series bn, patch p), conv tap k reads patch ``q = (p + k - 1) mod P``,
and patch q is the window ``xp[q*stride : q*stride + patch_len]`` of the padded series: a
strided view of the series, contiguous along the patch. So every operand row is one contiguous
window load, and with unit time stride, 16-byte aligned series and ``stride * element size`` a
multiple of 16 bytes (Time-LLM's contiguous bf16 ``[B, N, 512]`` with stride 8) it is made of
16-byte vector loads. The circular wrap is a per-row index; the replication pad (positions
``>= T`` read ``x[T - 1]``) is a select against ``x[T - 1]``, loaded only for the rows whose
windows reach past T. Neighbouring windows overlap (a window is read by three taps and, when
``stride < patch_len``, by several patches); the loads go through L1 (plain loads, or L1-cached
asynchronous copies when pipelined) so that the overlap is served there and HBM sees each series
about once (bench/ncu_kernels.py has Nsight Compute check it).

Windowed kernels (every SPEC §2 shape):

* ``patch_window_fwd``: the forward, persistent over row blocks so the (strided, gathered)
  weight is read once per program and the loop does window loads, three MMAs and row stores;
* ``patch_window_dweight``: dW^T partials, one per row chunk, from the same windows and the
  output gradient; ``patch_dweight_reduce`` sums them in a fixed order (deterministic, no
  atomics) straight into the weight's ``[d_model, patch_len, 3]`` layout and dtype;
* ``patch_window_dx``: dx straight from windows of the output gradient, one launch. The adjoint
  of the conv is a circular conv with flipped taps, and the fold of the patches back onto the
  series is a sum over the patches covering each step: step ``t = j*stride + u`` (chunk j) is
  read by patch ``q = j - i`` at channel ``u + i*stride``, for the few shifts i with that
  channel inside the patch, so a block of chunks computes its steps as a sum over (i, tap) of
  ``g[(q - k + 1) mod P] @ W_k^T`` restricted to those channels. Padded steps ``>= T`` fold into
  ``T - 1`` inside the block that holds step ``T - 1``.

Gather kernels, the fallback outside the windowed tiles (patch_len > 32 in the forward, stride
> 16 in dx): ``patch_conv_gemm`` gathers the operand with a clamped address per element;
for dx it reads the output gradient with taps flipped (d(patches)) and ``patch_fold`` folds
d(patches) onto the series.

Launch parameters come only from kernels/patch_embedding_tiles.py.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._launch import (SIG_DTYPE, TL_DTYPE, cdiv, dot_dtype, input_precision, interned_params, launch,
                      multiprocessor_count, store_dtype)
from .patch_embedding_tiles import (DWEIGHT_BLOCK_C, DWEIGHT_BLOCK_M, DWEIGHT_NUM_STAGES, DWEIGHT_NUM_WARPS,
                                    DX_BLOCK_D, DX_BLOCK_J, DX_BLOCK_U, DX_NUM_STAGES, FOLD_BLOCK_R, FOLD_BLOCK_T,
                                    GEMM_BLOCK_K, GEMM_BLOCK_O, NUM_STAGES, NUM_WARPS, REDUCE_BLOCK, REDUCE_BLOCK_CHUNKS,
                                    WINDOW_BLOCK_C, WINDOW_BLOCK_O, WINDOW_FWD_TILES, GemmConfig, WindowFwdConfig,
                                    dweight_block_o, dweight_chunks, fit_block, select_gemm_config,
                                    select_window_fwd_config, windowed_dx, windowed_forward)


@triton.jit
def _dropout_keep(seed, rows, cols, OUT_COLS, dropout_p):
    """Philox keep-mask of the [M, OUT_COLS] output; the element index is the Philox offset,
    so forward and backward regenerate the same mask from the same seed."""
    offsets = rows[:, None] * OUT_COLS + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _series_rows(x_ptr, rows, M, P, N_VARS, s_b, s_n):
    """Rows (series bn, patch p) -> each row's series base pointer, p, and whether it exists."""
    bn = rows // P
    p = rows - bn * P
    series = x_ptr + (bn // N_VARS).to(tl.int64) * s_b + (bn % N_VARS).to(tl.int64) * s_n  # [BLOCK_M]
    return series, p, rows < M


@triton.jit
def _circular(q, P):
    """q mod P for q in [-P, 2P): a neighbour patch of the circular conv, without a division."""
    q = tl.where(q < 0, q + P, q)
    return tl.where(q >= P, q - P, q)


@triton.jit
def _series_end(series, needed, T, s_t, TAIL: tl.constexpr):
    """x[T - 1] of each row's series ([BLOCK_M], x's dtype; 0 where not `needed`), the value of
    the replication pad: a TAIL-wide load of the series' last steps (whole vectors when T is a
    multiple of 16), the last step picked on chip. Predicated on `needed`, so rows whose windows
    stay inside the series issue no load."""
    tail = tl.maximum(T - TAIL, 0) + tl.arange(0, TAIL)  # [TAIL] time steps
    vals = tl.load(series[:, None] + tail.to(tl.int64)[None, :] * s_t,
                   mask=needed[:, None] & (tail < T)[None, :], other=0.0)  # [BLOCK_M, TAIL]
    return tl.sum(tl.where((tail == T - 1)[None, :], vals.to(tl.float32), 0.0), axis=1).to(vals.dtype)


@triton.jit
def _window(series, q, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t,
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
        series, p, row_ok = _series_rows(x_ptr, rows, M, P, N_VARS, s_b, s_n)
        q0 = _circular(p - 1, P)
        q2 = _circular(p + 1, P)
        # the last patches reach past T (row 0 too, its tap 0 wraps to patch P - 1)
        reach = tl.maximum(tl.maximum(q0, p), q2) * stride + PATCH_LEN
        x_end = _series_end(series, row_ok & (reach > T), T, s_t, TAIL)
        a = _window(series, q0, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, CACHE)
        acc = tl.dot(a.to(DOT_DTYPE), w0, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_O] fp32
        a = _window(series, p, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, CACHE)
        acc = tl.dot(a.to(DOT_DTYPE), w1, acc, input_precision=INPUT_PRECISION)
        a = _window(series, q2, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, CACHE)
        acc = tl.dot(a.to(DOT_DTYPE), w2, acc, input_precision=INPUT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, rows, outs, D, dropout_p)
            acc = tl.where(keep, acc * dropout_scale, 0.0)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * D + outs[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])


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
        series, p, row_ok = _series_rows(x_ptr, rows, row_end, P, N_VARS, s_b, s_n)
        g_mask = row_ok[:, None] & out_ok[None, :]
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * D + outs[None, :], mask=g_mask, other=0.0)
        if DROPOUT:
            keep = _dropout_keep(seed, rows, outs, D, dropout_p)
            g = tl.where(keep, g.to(tl.float32) * dropout_scale, 0.0)
            if WRITE_MASKED_GRAD:
                if pid_c == 0:
                    tl.store(g_masked_ptr + rows.to(tl.int64)[:, None] * D + outs[None, :], g, mask=g_mask)
        g = g.to(DOT_DTYPE)  # [BLOCK_M, BLOCK_O]
        q0 = _circular(p - 1, P)
        q2 = _circular(p + 1, P)
        reach = tl.maximum(tl.maximum(q0, p), q2) * stride + PATCH_LEN
        x_end = _series_end(series, row_ok & (reach > T), T, s_t, TAIL)
        # pipelined loads are asynchronous copies: ".ca" keeps the window in L1 for the next taps
        a = _window(series, q0, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, ".ca")
        acc0 = tl.dot(tl.trans(a.to(DOT_DTYPE)), g, acc0, input_precision=INPUT_PRECISION)
        a = _window(series, p, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, ".ca")
        acc1 = tl.dot(tl.trans(a.to(DOT_DTYPE)), g, acc1, input_precision=INPUT_PRECISION)
        a = _window(series, q2, row_ok, x_end, c, T, STRIDE_BYTES, PATCH_LEN, s_t, ELEM_BYTES, ".ca")
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
        g_rows = g_series + _circular(q + (1 - k), P).to(tl.int64) * D  # [BLOCK_J]
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
    # costs more instructions than the gather; python -m timellm_fast.kernels.report --sass counts them).
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
        keep = _dropout_keep(tl.load(seed_ptr), rows, outs, OUT_COLS, dropout_p)
        acc = tl.where(keep, acc * dropout_scale, 0.0)
    mask = row_ok[:, None] & out_ok[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * s_om + outs[None, :] * s_oc
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


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


# ----------------------------------------------------------------------------------------------
# Launchers: configurations from patch_embedding_tiles, nothing else.


def _dropout_args(dropout_p: float) -> tuple:
    return float(dropout_p), (1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0)


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
    grid = (cdiv(M, cfg.block_m), cdiv(out_cols, cfg.block_o))
    launch(patch_conv_gemm, grid, interned_params(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs()),
           src, weight, out,
           M, P, n_vars, c_in, out_cols, time_stride, clamp,
           src.stride(0), src.stride(1), src.stride(2), *w_strides, out.stride(0), out.stride(1),
           seed, *_dropout_args(dropout_p))
    return out


def _launch_window_fwd(
    x: torch.Tensor,  # x: [B, N, T], any float dtype and strides
    weight: torch.Tensor,  # weight: [D, patch_len, 3]
    y: torch.Tensor,  # y: [B*N*P, D] contiguous, written
    patch_len: int, stride: int, P: int, dot_dt: torch.dtype,
    seed: torch.Tensor, dropout_p: float,  # seed: [1] int64 on x's device
):
    """patch_window_fwd into y; returns what the launch returns (on a GPU, the compiled kernel)."""
    B, N, T = x.shape
    M, D = y.shape
    cfg = select_window_fwd_config(patch_len, D, dot_dt, dropout_p > 0.0)
    tile = cfg.tile
    programs = min(cdiv(M, tile.block_m), tile.programs_per_sm * multiprocessor_count(x.device))
    sw_d, sw_c, sw_k = weight.stride()
    return launch(patch_window_fwd, (programs, cdiv(D, cfg.block_o)),
                  interned_params(num_warps=tile.num_warps, num_stages=tile.num_stages, **cfg.constexprs()),
                  x, weight, y,
                  M, P, N, T, patch_len, stride * x.element_size(), D,
                  x.stride(0), x.stride(1), x.stride(2), sw_d, sw_c, sw_k,
                  seed, *_dropout_args(dropout_p))


def patch_embedding_fwd(
    x: torch.Tensor,  # x: [B, N, T], any float dtype and strides
    weight: torch.Tensor,  # weight: [D, patch_len, 3]
    out_dtype: torch.dtype, patch_len: int, stride: int, P: int,
    seed: torch.Tensor, dropout_p: float = 0.0,  # seed: [1] int64 on x's device
) -> torch.Tensor:  # y: [B*N*P, D]
    B, N, T = x.shape
    D = weight.shape[0]
    M = B * N * P
    y = torch.empty(M, D, device=x.device, dtype=store_dtype(out_dtype))  # sizes as separate arguments: parsed faster than a tuple
    dot_dt = dot_dtype(x.dtype, weight.dtype, device=x.device)
    if M == 0:
        pass
    elif windowed_forward(patch_len):
        _launch_window_fwd(x, weight, y, patch_len, stride, P, dot_dt, seed, dropout_p)
    else:
        sw_d, sw_c, sw_k = weight.stride()
        patch_conv(x, weight, y, P=P, c_in=patch_len, time_stride=stride, clamp=T - 1,
                   w_strides=(sw_k, sw_c, sw_d), dot_dt=dot_dt, seed=seed, dropout_p=dropout_p)
    return y.to(out_dtype)


def compiled_window_fwd(
    x: torch.Tensor,  # x: [B, N, T], any float dtype and strides
    weight: torch.Tensor,  # weight: [D, patch_len, 3]
    out_dtype: torch.dtype, patch_len: int, stride: int, P: int,
    seed: torch.Tensor, dropout_p: float = 0.0,  # seed: [1] int64 on x's device
):
    """Launches patch_window_fwd once as patch_embedding_fwd would (tile overrides included) and
    returns the compiled kernel (n_regs, n_spills; None under the interpreter): what the tuner
    (bench/tune_patch_embedding.py) asks for."""
    if not windowed_forward(patch_len):
        raise ValueError(f"patch_len={patch_len} takes the gather kernel, not patch_window_fwd")
    B, N, _ = x.shape
    y = torch.empty(B * N * P, weight.shape[0], device=x.device, dtype=store_dtype(out_dtype))
    if y.shape[0] == 0:
        raise ValueError("no rows: an empty input launches no kernel")
    return _launch_window_fwd(x, weight, y, patch_len, stride, P, dot_dtype(x.dtype, weight.dtype, device=x.device),
                              seed, dropout_p)


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
    launch(patch_fold, (cdiv(R, FOLD_BLOCK_R), cdiv(T, FOLD_BLOCK_T)),
           interned_params(BLOCK_R=FOLD_BLOCK_R, BLOCK_T=FOLD_BLOCK_T, num_warps=NUM_WARPS, num_stages=NUM_STAGES),
           dpatch, dx, R, P, T, stride, patch_len, max(1, cdiv(patch_len, stride)))


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
        launch(patch_window_dweight, (num_chunks, cdiv(patch_len, DWEIGHT_BLOCK_C), cdiv(D, block_o)),
               interned_params(BLOCK_M=DWEIGHT_BLOCK_M, BLOCK_C=DWEIGHT_BLOCK_C, BLOCK_O=block_o,
                               DOT_DTYPE=TL_DTYPE[dot_dt], INPUT_PRECISION=input_precision(dot_dt),
                               DROPOUT=dropout, WRITE_MASKED_GRAD=write_masked, num_warps=DWEIGHT_NUM_WARPS,
                               num_stages=DWEIGHT_NUM_STAGES),
               x, g, partial, g_src,
               M, P, N, T, patch_len, stride * x.element_size(), D, rows_per_chunk,
               x.stride(0), x.stride(1), x.stride(2),
               seed, *_dropout_args(dropout_p))
        if need_dw:
            dw = torch.empty(D, patch_len, 3, device=g.device, dtype=store_dtype(weight.dtype))
            launch(patch_dweight_reduce, (cdiv(3 * patch_len * D, REDUCE_BLOCK),),
                   interned_params(BLOCK_CHUNKS=REDUCE_BLOCK_CHUNKS, BLOCK=REDUCE_BLOCK, num_warps=NUM_WARPS,
                                   num_stages=NUM_STAGES),
                   partial, dw, num_chunks, patch_len, D)
            dw = dw.to(weight.dtype)
    dx = None
    if need_dx:
        dx = torch.empty(B, N, T, device=x.device, dtype=store_dtype(x.dtype))
        if windowed_dx(stride):
            n_chunks = cdiv(T, stride)
            dot_dt = dot_dtype(g_src.dtype, weight.dtype, device=g.device)
            sw_d, sw_c, sw_k = weight.stride()
            launch(patch_window_dx, (cdiv(B * N * n_chunks, DX_BLOCK_J),),
                   interned_params(BLOCK_J=DX_BLOCK_J, BLOCK_U=fit_block(2 * stride, DX_BLOCK_U),
                                   BLOCK_D=fit_block(D, DX_BLOCK_D), DOT_DTYPE=TL_DTYPE[dot_dt],
                                   INPUT_PRECISION=input_precision(dot_dt), num_warps=NUM_WARPS,
                                   num_stages=DX_NUM_STAGES),
                   g_src, weight, dx,
                   B * N, P, T, patch_len, stride * dx.element_size(), D, n_chunks, cdiv(patch_len, stride),
                   sw_d, sw_c, sw_k)
        else:
            _dx_by_gather(g_src, weight, dx, P, patch_len, stride, seed)
        dx = dx.to(x.dtype)
    return dx, dw


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation table (see timellm_fast.kernels.report and tests/test_aot.py).

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: (x, w, out, dot) pointer dtypes: each dtype alone, plus bf16 data with an fp32 weight (the
#: mixed case Time-LLM users hit, computed in fp32)
_PTR_CASES = [(torch.float32, torch.float32, torch.float32, torch.float32),
              (torch.bfloat16, torch.float32, torch.float32, torch.float32),
              (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
              (torch.float16, torch.float16, torch.float16, torch.float16)]
#: the window kernels' integer arguments that SPEC §2 shapes make multiples of 16 (T = 512,
#: P = 64, patch_len 16, d_model 16/32, stride 8 in bytes of bf16 = 16), as the JIT marks them
_WINDOW_DIV16 = ("M", "P", "T", "PATCH_LEN", "STRIDE_BYTES", "D", "s_b", "s_n", "s_wd")


def _signature(ptrs: dict, ints: tuple, tail: dict, constexprs: dict) -> dict:
    return {**ptrs, **{name: "i32" for name in ints}, **tail, **{k: "constexpr" for k in constexprs}}


_DROPOUT_SIG = {"seed_ptr": "*i64", "dropout_p": "fp32", "dropout_scale": "fp32"}


def window_fwd_aot_config(x_dt, w_dt, out_dt, cfg: WindowFwdConfig) -> dict:
    cx = cfg.constexprs()
    sig = _signature({"x_ptr": f"*{SIG_DTYPE[x_dt]}", "w_ptr": f"*{SIG_DTYPE[w_dt]}", "out_ptr": f"*{SIG_DTYPE[out_dt]}"},
                     ("M", "P", "N_VARS", "T", "PATCH_LEN", "STRIDE_BYTES", "D", "s_b", "s_n", "s_t", "s_wd", "s_wc",
                      "s_wk"), _DROPOUT_SIG, cx)
    return dict(name=f"patch_window_fwd[x={SIG_DTYPE[x_dt]},w={SIG_DTYPE[w_dt]},dot={SIG_DTYPE[cfg.dot_dtype]},"
                     f"C={cfg.block_c},O={cfg.block_o},dropout={cfg.dropout}]",
                fn=patch_window_fwd, signature=sig, constexprs=cx, num_warps=cfg.tile.num_warps,
                num_stages=cfg.tile.num_stages, divisible_by_16=_WINDOW_DIV16)


def aot_configs() -> list:
    """Every (kernel, constexpr set) the launchers above can choose, with a representative
    signature: pointer dtypes follow the dot dtype (plus bf16 data with an fp32 weight)."""
    configs = []
    for (x_dt, w_dt, out_dt, dot_dt), block_c, block_o, dropout in itertools.product(
            _PTR_CASES, WINDOW_BLOCK_C, WINDOW_BLOCK_O, (False, True)):
        configs.append(window_fwd_aot_config(x_dt, w_dt, out_dt, WindowFwdConfig(block_c, block_o, dot_dt, dropout)))
    for dt, block_o, (dropout, write_masked) in itertools.product(
            _FLOAT_DTYPES, GEMM_BLOCK_O, ((False, False), (True, False), (True, True))):
        if block_o != dweight_block_o(block_o, dropout):
            continue
        dot_dt = dt if not dropout else torch.float32
        cx = dict(BLOCK_M=DWEIGHT_BLOCK_M, BLOCK_C=DWEIGHT_BLOCK_C, BLOCK_O=block_o,
                  DOT_DTYPE=TL_DTYPE[dot_dt], INPUT_PRECISION=input_precision(dot_dt),
                  DROPOUT=dropout, WRITE_MASKED_GRAD=write_masked)
        sig = _signature({"x_ptr": f"*{SIG_DTYPE[dt]}", "g_ptr": f"*{SIG_DTYPE[dt]}", "dw_partial_ptr": "*fp32",
                          "g_masked_ptr": "*fp32"},
                         ("M", "P", "N_VARS", "T", "PATCH_LEN", "STRIDE_BYTES", "D", "ROWS_PER_CHUNK", "s_b", "s_n",
                          "s_t"), _DROPOUT_SIG, cx)
        configs.append(dict(
            name=f"patch_window_dweight[{SIG_DTYPE[dt]},dot={SIG_DTYPE[dot_dt]},O={block_o},"
                 f"dropout={dropout},write_masked={write_masked}]",
            fn=patch_window_dweight, signature=sig, constexprs=cx, num_warps=DWEIGHT_NUM_WARPS,
            num_stages=DWEIGHT_NUM_STAGES,
            divisible_by_16=_WINDOW_DIV16))
    for dt in _FLOAT_DTYPES:
        cx = dict(BLOCK_CHUNKS=REDUCE_BLOCK_CHUNKS, BLOCK=REDUCE_BLOCK)
        sig = _signature({"partial_ptr": "*fp32", "dw_ptr": f"*{SIG_DTYPE[dt]}"}, ("NUM_CHUNKS", "PATCH_LEN", "D"),
                         {}, cx)
        configs.append(dict(name=f"patch_dweight_reduce[{SIG_DTYPE[dt]}]", fn=patch_dweight_reduce, signature=sig,
                            constexprs=cx, num_warps=NUM_WARPS, num_stages=NUM_STAGES))
    # (g, w, dx, dot): g is the output gradient (weight's dtype) or, under dropout, the fp32
    # masked gradient; dx has x's dtype
    dx_cases = [(torch.float32, torch.float32, torch.float32, torch.float32),
                (torch.float32, torch.float32, torch.bfloat16, torch.float32),
                (torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),
                (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
                (torch.float16, torch.float16, torch.float16, torch.float16)]
    for (g_dt, w_dt, dx_dt, dot_dt), block_u, block_d in itertools.product(dx_cases, DX_BLOCK_U, DX_BLOCK_D):
        cx = dict(BLOCK_J=DX_BLOCK_J, BLOCK_U=block_u, BLOCK_D=block_d, DOT_DTYPE=TL_DTYPE[dot_dt],
                  INPUT_PRECISION=input_precision(dot_dt))
        sig = _signature({"g_ptr": f"*{SIG_DTYPE[g_dt]}", "w_ptr": f"*{SIG_DTYPE[w_dt]}", "dx_ptr": f"*{SIG_DTYPE[dx_dt]}"},
                         ("R", "P", "T", "PATCH_LEN", "STRIDE_BYTES", "D", "N_CHUNKS", "N_SHIFTS", "s_wd", "s_wc",
                          "s_wk"), {}, cx)
        configs.append(dict(
            name=f"patch_window_dx[g={SIG_DTYPE[g_dt]},w={SIG_DTYPE[w_dt]},dx={SIG_DTYPE[dx_dt]},U={block_u},"
                 f"D={block_d}]",
            fn=patch_window_dx, signature=sig, constexprs=cx, num_warps=NUM_WARPS, num_stages=DX_NUM_STAGES,
            divisible_by_16=("P", "T", "PATCH_LEN", "STRIDE_BYTES", "D", "s_wd")))
    gemm_ints = ("M", "P", "N_VARS", "C_IN", "OUT_COLS", "TIME_STRIDE", "CLAMP", "s_b", "s_n", "s_t", "s_wk",
                 "s_wc", "s_wo", "s_om", "s_oc")
    for (x_dt, w_dt, out_dt, dot_dt), use_dot, block_k, block_o, dropout in itertools.product(
            _PTR_CASES, (True, False), GEMM_BLOCK_K, GEMM_BLOCK_O, (False, True)):
        if not use_dot and (block_k != GEMM_BLOCK_K[0] or dot_dt != torch.float32):
            continue
        cfg = GemmConfig(block_k, block_o, use_dot, dot_dt, dropout)
        cx = cfg.constexprs()
        sig = _signature({"src_ptr": f"*{SIG_DTYPE[x_dt]}", "w_ptr": f"*{SIG_DTYPE[w_dt]}",
                          "out_ptr": f"*{SIG_DTYPE[out_dt]}"}, gemm_ints, _DROPOUT_SIG, cx)
        configs.append(dict(
            name=f"patch_conv_gemm[x={SIG_DTYPE[x_dt]},w={SIG_DTYPE[w_dt]},dot={SIG_DTYPE[dot_dt]},"
                 f"K={block_k},O={block_o},fma={not use_dot},dropout={dropout}]",
            fn=patch_conv_gemm, signature=sig, constexprs=cx, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    for dt in _FLOAT_DTYPES:
        cx = dict(BLOCK_R=FOLD_BLOCK_R, BLOCK_T=FOLD_BLOCK_T)
        sig = _signature({"dpatch_ptr": "*fp32", "dx_ptr": f"*{SIG_DTYPE[dt]}"},
                         ("R", "P", "T", "STRIDE", "PATCH_LEN", "N_OVERLAP"), {}, cx)
        configs.append(dict(name=f"patch_fold[{SIG_DTYPE[dt]}]", fn=patch_fold, signature=sig,
                            constexprs=cx, num_warps=NUM_WARPS, num_stages=NUM_STAGES))
    return configs


#: The forward's configuration at Traffic-folded (SPEC §2: 20688 contiguous bf16 series, T 512,
#: patch_len 16, stride 8, d_model 16) and the arguments the JIT compiles as the constant 1 there
#: (one variable per series as bench/common.py lays it out, unit time stride, the weight's tap
#: stride); the multiples of 16 are the configuration's divisible_by_16.
TRAFFIC_FOLDED_FWD = "patch_window_fwd[x=bf16,w=bf16,dot=bf16,C=16,O=16,dropout=False]"
TRAFFIC_FOLDED_ONES = ("N_VARS", "s_t", "s_wk")


def traffic_cases() -> list:
    """For `python -m timellm_fast.kernels.report --traffic`: the forward's main loop at
    Traffic-folded, with SPEC §1.1's minimum per output row (each series read once, each row of
    y written once; the weight is 1.5 KB for the whole call)."""
    T, patch_len, stride, d_model, elem = 512, 16, 8, 16, 2
    P = (T + stride - patch_len) // stride + 1
    tile = WINDOW_FWD_TILES[torch.bfloat16]
    config = next(c for c in aot_configs() if c["name"] == TRAFFIC_FOLDED_FWD)
    return [dict(config=config, ones=TRAFFIC_FOLDED_ONES, div16=(),
                 shape="Traffic-folded (T 512, patch 16/8, d_model 16, bf16)",
                 rows_per_iteration=tile.block_m, threads=32 * tile.num_warps,
                 minimum_read=T * elem / P, minimum_written=d_model * elem, footprint_read=T * elem / P,
                 issued_note=f"reads: 3 taps x {patch_len * elem} B, overlapping windows meant to hit L1, plus the "
                             f"series' last {32 // elem} steps, loaded only by the rows whose patches reach past T")]
