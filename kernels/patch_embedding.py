"""Fused patch embedding: replication pad + unfold + circular Conv1d (kernel 3) + dropout.

The layer is a GEMM ``[B*N*P, 3*patch_len] x [3*patch_len, d_model]`` whose left operand is
gathered on the fly from the raw series, so neither the padded series nor the unfolded patches
ever exist in memory. One kernel (`patch_conv_gemm`) serves two roles:

* forward: rows are (series bn, patch p); the operand column (tap k, offset c) reads
  ``x[bn, min(((p + k - 1) mod P) * stride + c, T - 1)]`` — the ``min`` is the replication pad,
  the ``mod`` the circular conv padding;
* backward, d(patches): the adjoint of a circular 3-tap conv is the same circular conv with
  taps flipped and the weight transposed, so the same gather reads the (dropout-masked)
  output gradient instead of ``x`` (time stride d_model, nothing to clamp).

Backward also has a deterministic dW reduction (`patch_conv_dweight`, one partial per row
chunk, summed in a fixed order) and the fold of d(patches) back onto the series
(`patch_fold`), where every padded position ``>= T - 1`` lands on ``T - 1``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import SIG_DTYPE, TL_DTYPE, cdiv, dot_dtype, input_precision, next_pow2, store_dtype

MAX_PHILOX_ELEMENTS = 2**31 - 1  # tl.rand offsets are int32


@triton.jit
def _gather_conv_operand(
    src_ptr, rows, cols, M, P, N_VARS, K_TOTAL, C_IN, TIME_STRIDE, CLAMP,
    s_b, s_n, s_t,
):
    """Tile of the implicit GEMM operand: [len(rows), len(cols)], fp32-free raw loads.

    rows index (bn, p) with bn = b * N_VARS + n; cols index (k, c) with k the conv tap.
    """
    bn = rows // P
    p = rows - bn * P
    b = (bn // N_VARS).to(tl.int64)
    n = (bn % N_VARS).to(tl.int64)
    k = cols // C_IN
    c = cols - k * C_IN
    q = (p[:, None] + k[None, :] + P - 1) % P  # circular neighbour patch
    pos = tl.minimum(q * TIME_STRIDE + c[None, :], CLAMP)  # replication pad on the right
    ptrs = src_ptr + b[:, None] * s_b + n[:, None] * s_n + pos.to(tl.int64) * s_t
    mask = (rows < M)[:, None] & (cols < K_TOTAL)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _dropout_keep(seed, rows, cols, OUT_COLS, dropout_p):
    """Philox keep-mask of the [M, OUT_COLS] output; the element index is the Philox offset,
    so forward and backward regenerate the same mask from the same seed."""
    offsets = rows[:, None] * OUT_COLS + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


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
    # Index math once per row, not per operand element: at 20688 series the previous form ran at
    # 18% of the H200's HBM bandwidth with an integer division and modulo per gathered element
    # (python -m timellm_fast.kernels.report --sass counts the instructions).
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
def patch_conv_dweight(
    x_ptr,  # x: [B, N_VARS, T] (strides s_b, s_n, s_t)
    g_ptr,  # g: [M, D] contiguous, grad of the layer output
    dw_partial_ptr,  # dw_partial: [num_chunks, K_TOTAL, D] fp32, one slice per row chunk
    g_masked_ptr,  # g_masked: [M, D] fp32, written only when WRITE_MASKED_GRAD
    M, P, N_VARS, K_TOTAL, C_IN, D, TIME_STRIDE, CLAMP, ROWS_PER_CHUNK,
    s_b, s_n, s_t,
    seed_ptr,  # seed: [1] int64, the forward's
    dropout_p, dropout_scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr, WRITE_MASKED_GRAD: tl.constexpr,
):
    """dW^T[(k, c), d] = sum over rows of operand[row, (k, c)] * g[row, d] for one row chunk.

    Chunks are summed afterwards in a fixed order, so dW is bitwise reproducible (no atomics).
    """
    pid_chunk = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_o = tl.program_id(2)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = tl.zeros((BLOCK_K, BLOCK_O), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    row_start = pid_chunk * ROWS_PER_CHUNK
    row_end = tl.minimum(row_start + ROWS_PER_CHUNK, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        in_chunk = rows < row_end
        a = _gather_conv_operand(x_ptr, rows, cols, row_end, P, N_VARS, K_TOTAL, C_IN,
                                 TIME_STRIDE, CLAMP, s_b, s_n, s_t)
        g_mask = in_chunk[:, None] & (outs < D)[None, :]
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * D + outs[None, :], mask=g_mask,
                    other=0.0)
        if DROPOUT:
            keep = _dropout_keep(seed, rows, outs, D, dropout_p)
            g = tl.where(keep, g.to(tl.float32) * dropout_scale, 0.0)
            if WRITE_MASKED_GRAD:
                if pid_k == 0:
                    tl.store(g_masked_ptr + rows.to(tl.int64)[:, None] * D + outs[None, :], g,
                             mask=g_mask)
        acc = tl.dot(tl.trans(a.to(DOT_DTYPE)), g.to(DOT_DTYPE), acc,
                     input_precision=INPUT_PRECISION)
    ptrs = (dw_partial_ptr + pid_chunk.to(tl.int64) * K_TOTAL * D + cols[:, None] * D
            + outs[None, :])
    tl.store(ptrs, acc, mask=(cols < K_TOTAL)[:, None] & (outs < D)[None, :])


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
# Configurations. Launchers pick only from these tables, and tests compile every entry ahead of
# time for real GPUs, so nothing dispatch can choose is unproven on sm_75/80/90.

GEMM_BLOCK_M = 64
GEMM_BLOCK_K = (16,)
GEMM_BLOCK_O = (16, 32)  # 64 spills under dropout (Philox on 4096 elements)
DWEIGHT_BLOCK_M = 32
DWEIGHT_BLOCK_K = 32
FOLD_BLOCK_R, FOLD_BLOCK_T = 16, 64
NUM_WARPS = 4
DWEIGHT_NUM_WARPS = 8
MAX_DW_CHUNKS = 256  # fixed (not SM-count) so dW is the same bits on every GPU


@dataclass(frozen=True)
class GemmConfig:
    block_k: int
    block_o: int
    use_dot: bool
    dot_dtype: torch.dtype
    dropout: bool
    block_m: int = GEMM_BLOCK_M
    num_warps: int = NUM_WARPS


#: (BLOCK_M, num_warps) of patch_conv_gemm for tuning (bench/tune_patch_embedding.py); None in
#: normal use. Set only through override_gemm_tile: a tile here has not been through the
#: ahead-of-time spill check of tests/test_aot.py.
_GEMM_TILE_OVERRIDE = [None]


@contextlib.contextmanager
def override_gemm_tile(block_m: int, num_warps: int):
    """Launch patch_conv_gemm with another (BLOCK_M, num_warps) inside the block (tuning only)."""
    if block_m not in (16, 32, 64, 128, 256) or num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"BLOCK_M must be a power of two in 16..256 and num_warps in 1..16, got "
                         f"({block_m}, {num_warps})")
    saved = _GEMM_TILE_OVERRIDE[0]
    _GEMM_TILE_OVERRIDE[0] = (block_m, num_warps)
    try:
        yield
    finally:
        _GEMM_TILE_OVERRIDE[0] = saved


def select_gemm_config(k_total: int, out_cols: int, dot_dt: torch.dtype, dropout: bool) -> GemmConfig:
    use_dot = k_total >= 16
    block_k = min(GEMM_BLOCK_K[-1], next_pow2(k_total)) if use_dot else GEMM_BLOCK_K[0]
    block_o = min(GEMM_BLOCK_O[-1], max(GEMM_BLOCK_O[0], next_pow2(out_cols)))
    cfg = GemmConfig(block_k, block_o, use_dot, dot_dt if use_dot else torch.float32, dropout)
    if _GEMM_TILE_OVERRIDE[0] is not None:
        cfg = dataclasses.replace(cfg, block_m=_GEMM_TILE_OVERRIDE[0][0], num_warps=_GEMM_TILE_OVERRIDE[0][1])
    return cfg


def dweight_block_o(d_model: int, dropout: bool) -> int:
    # Regenerating the dropout mask (Philox) next to an fp32 FMA dot spills at 32 columns.
    if dropout:
        return GEMM_BLOCK_O[0]
    return min(GEMM_BLOCK_O[-1], max(GEMM_BLOCK_O[0], next_pow2(d_model)))


def _gemm_constexprs(cfg: GemmConfig, allow_tf32: bool = False) -> dict:
    return dict(
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_O=cfg.block_o, USE_DOT=cfg.use_dot,
        DOT_DTYPE=TL_DTYPE[cfg.dot_dtype], INPUT_PRECISION=input_precision(cfg.dot_dtype, allow_tf32),
        DROPOUT=cfg.dropout,
    )


#: kernel name -> what its last launch returned (on a GPU, the compiled kernel: n_regs, n_spills)
last_launch: dict = {}


def patch_conv(
    src: torch.Tensor,  # src: [B, N_VARS, T], read through its strides
    weight: torch.Tensor,  # weight: [d_out, c_in, 3] viewed through (s_wk, s_wc, s_wo) below
    out: torch.Tensor,  # out: [M, OUT_COLS], M = B*N_VARS*P
    *, P: int, c_in: int, time_stride: int, clamp: int, w_strides: tuple, dot_dt: torch.dtype,
    seed: torch.Tensor, dropout_p: float = 0.0,  # seed: [1] int64 on the device
) -> torch.Tensor:
    B, n_vars, _ = src.shape
    M, out_cols = out.shape
    if M == 0:
        return out
    k_total = 3 * c_in
    dropout = dropout_p > 0.0
    cfg = select_gemm_config(k_total, out_cols, dot_dt, dropout)
    grid = (cdiv(M, cfg.block_m), cdiv(out_cols, cfg.block_o))
    last_launch["patch_conv_gemm"] = patch_conv_gemm[grid](
        src, weight, out,
        M, P, n_vars, c_in, out_cols, time_stride, clamp,
        src.stride(0), src.stride(1), src.stride(2), *w_strides, out.stride(0), out.stride(1),
        seed, float(dropout_p), 1.0 / (1.0 - dropout_p) if dropout else 1.0,
        num_warps=cfg.num_warps, **_gemm_constexprs(cfg),
    )
    return out


def patch_embedding_fwd(
    x: torch.Tensor,  # x: [B, N, T], any float dtype and strides
    weight: torch.Tensor,  # weight: [D, patch_len, 3]
    out_dtype: torch.dtype, patch_len: int, stride: int, P: int,
    seed: torch.Tensor, dropout_p: float = 0.0,  # seed: [1] int64 on x's device
) -> torch.Tensor:  # y: [B*N*P, D]
    B, N, T = x.shape
    D = weight.shape[0]
    y = torch.empty((B * N * P, D), device=x.device, dtype=store_dtype(out_dtype))
    sw_d, sw_c, sw_k = weight.stride()
    patch_conv(
        x, weight, y, P=P, c_in=patch_len, time_stride=stride, clamp=T - 1,
        w_strides=(sw_k, sw_c, sw_d), dot_dt=dot_dtype(x.dtype, weight.dtype, device=x.device),
        seed=seed, dropout_p=dropout_p,
    )
    return y.to(out_dtype)


def patch_embedding_bwd(
    x: torch.Tensor,  # x: [B, N, T]
    weight: torch.Tensor,  # weight: [D, patch_len, 3]
    grad_y: torch.Tensor,  # grad_y: [B*N*P, D]
    patch_len: int, stride: int, P: int,
    seed: torch.Tensor,  # seed: [1] int64 on the device, the forward's
    dropout_p: float, need_dx: bool, need_dw: bool,
):  # -> (dx: [B, N, T] in x.dtype or None, dw: [D, patch_len, 3] fp32 or None)
    B, N, T = x.shape
    D = weight.shape[0]
    M = B * N * P
    g = grad_y.contiguous()
    dropout = dropout_p > 0.0
    scale = 1.0 / (1.0 - dropout_p) if dropout else 1.0
    k_total = 3 * patch_len
    dw = None
    g_masked = g
    if M == 0:
        dw = torch.zeros((D, patch_len, 3), device=g.device) if need_dw else None
        dx = torch.zeros_like(x) if need_dx else None
        return dx, dw
    if need_dw or (need_dx and dropout):
        # the dW pass regenerates the dropout mask anyway; when dx is wanted it also keeps
        # the masked gradient so the dx pass does not need Philox again.
        write_masked = need_dx and dropout
        if write_masked:
            g_masked = torch.empty((M, D), device=g.device, dtype=torch.float32)
        num_chunks = min(MAX_DW_CHUNKS, max(1, cdiv(M, DWEIGHT_BLOCK_M * 4)))
        rows_per_chunk = cdiv(cdiv(M, num_chunks), DWEIGHT_BLOCK_M) * DWEIGHT_BLOCK_M
        num_chunks = cdiv(M, rows_per_chunk)
        block_o = dweight_block_o(D, dropout)
        partial = torch.empty((num_chunks, k_total, D), device=g.device, dtype=torch.float32)
        dot_dt = dot_dtype(x.dtype, g.dtype, device=g.device) if not dropout else torch.float32
        grid = (num_chunks, cdiv(k_total, DWEIGHT_BLOCK_K), cdiv(D, block_o))
        patch_conv_dweight[grid](
            x, g, partial, g_masked,
            M, P, N, k_total, patch_len, D, stride, T - 1, rows_per_chunk,
            x.stride(0), x.stride(1), x.stride(2),
            seed, float(dropout_p), scale,
            BLOCK_M=DWEIGHT_BLOCK_M, BLOCK_K=DWEIGHT_BLOCK_K, BLOCK_O=block_o,
            DOT_DTYPE=TL_DTYPE[dot_dt], INPUT_PRECISION=input_precision(dot_dt),
            DROPOUT=dropout, WRITE_MASKED_GRAD=write_masked, num_warps=DWEIGHT_NUM_WARPS,
        )
        if need_dw:
            # [K, D] with K = (tap, channel) -> [D, patch_len, 3]
            dw = partial.sum(0).view(3, patch_len, D).permute(2, 1, 0).contiguous()
    dx = None
    if need_dx:
        # d(patches)[r, p, c] = sum_{k, d} W[d, c, 2 - k] * g[r, (p + k - 1) mod P, d]
        dpatch = torch.empty((M, patch_len), device=g.device, dtype=torch.float32)
        sw_d, sw_c, sw_k = weight.stride()
        src = g_masked.view(B * N, 1, P * D)
        patch_conv(
            src, weight[:, :, 2:], dpatch, P=P, c_in=D, time_stride=D, clamp=P * D - 1,
            w_strides=(-sw_k, sw_d, sw_c),
            dot_dt=dot_dtype(g_masked.dtype, weight.dtype, device=g.device), seed=seed,
        )
        dx = torch.empty((B, N, T), device=x.device, dtype=store_dtype(x.dtype))
        R = B * N
        grid = (cdiv(R, FOLD_BLOCK_R), cdiv(T, FOLD_BLOCK_T))
        patch_fold[grid](
            dpatch, dx, R, P, T, stride, patch_len, max(1, cdiv(patch_len, stride)),
            BLOCK_R=FOLD_BLOCK_R, BLOCK_T=FOLD_BLOCK_T, num_warps=NUM_WARPS,
        )
        dx = dx.to(x.dtype)
    return dx, dw


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation table (see timellm_fast.kernels.report and tests/test_aot.py).

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def aot_configs() -> list:
    """Every (kernel, constexpr set) the launchers above can choose, with a representative
    signature: pointer dtypes follow the dot dtype (plus bf16 data with an fp32 weight, the
    mixed case Time-LLM users hit)."""
    configs = []
    gemm_sig_base = {
        "M": "i32", "P": "i32", "N_VARS": "i32", "C_IN": "i32",
        "OUT_COLS": "i32", "TIME_STRIDE": "i32", "CLAMP": "i32",
        "s_b": "i32", "s_n": "i32", "s_t": "i32", "s_wk": "i32", "s_wc": "i32", "s_wo": "i32",
        "s_om": "i32", "s_oc": "i32", "seed_ptr": "*i64", "dropout_p": "fp32", "dropout_scale": "fp32",
    }
    ptr_cases = [(torch.float32, torch.float32, torch.float32, torch.float32),
                 (torch.bfloat16, torch.float32, torch.float32, torch.float32),
                 (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
                 (torch.float16, torch.float16, torch.float16, torch.float16)]
    for (x_dt, w_dt, out_dt, dot_dt), use_dot, block_k, block_o, dropout in itertools.product(
            ptr_cases, (True, False), GEMM_BLOCK_K, GEMM_BLOCK_O, (False, True)):
        if not use_dot and (block_k != GEMM_BLOCK_K[0] or dot_dt != torch.float32):
            continue
        cfg = GemmConfig(block_k, block_o, use_dot, dot_dt, dropout)
        sig = {"src_ptr": f"*{SIG_DTYPE[x_dt]}", "w_ptr": f"*{SIG_DTYPE[w_dt]}",
               "out_ptr": f"*{SIG_DTYPE[out_dt]}", **gemm_sig_base}
        cx = _gemm_constexprs(cfg)
        sig.update({k: "constexpr" for k in cx})
        configs.append(dict(
            name=f"patch_conv_gemm[x={SIG_DTYPE[x_dt]},w={SIG_DTYPE[w_dt]},dot={SIG_DTYPE[dot_dt]},"
                 f"K={block_k},O={block_o},fma={not use_dot},dropout={dropout}]",
            fn=patch_conv_gemm, signature=sig, constexprs=cx, num_warps=cfg.num_warps, num_stages=3))
    dw_sig_base = {
        "M": "i32", "P": "i32", "N_VARS": "i32", "K_TOTAL": "i32", "C_IN": "i32", "D": "i32",
        "TIME_STRIDE": "i32", "CLAMP": "i32", "ROWS_PER_CHUNK": "i32",
        "s_b": "i32", "s_n": "i32", "s_t": "i32", "seed_ptr": "*i64", "dropout_p": "fp32",
        "dropout_scale": "fp32",
    }
    for dt, block_o, (dropout, write_masked) in itertools.product(
            _FLOAT_DTYPES, GEMM_BLOCK_O, ((False, False), (True, False), (True, True))):
        if block_o != dweight_block_o(block_o, dropout):
            continue
        dot_dt = dt if not dropout else torch.float32
        cx = dict(BLOCK_M=DWEIGHT_BLOCK_M, BLOCK_K=DWEIGHT_BLOCK_K, BLOCK_O=block_o,
                  DOT_DTYPE=TL_DTYPE[dot_dt], INPUT_PRECISION=input_precision(dot_dt),
                  DROPOUT=dropout, WRITE_MASKED_GRAD=write_masked)
        sig = {"x_ptr": f"*{SIG_DTYPE[dt]}", "g_ptr": f"*{SIG_DTYPE[dt]}",
               "dw_partial_ptr": "*fp32", "g_masked_ptr": "*fp32", **dw_sig_base}
        sig.update({k: "constexpr" for k in cx})
        configs.append(dict(
            name=f"patch_conv_dweight[{SIG_DTYPE[dt]},dot={SIG_DTYPE[dot_dt]},O={block_o},"
                 f"dropout={dropout},write_masked={write_masked}]",
            fn=patch_conv_dweight, signature=sig, constexprs=cx, num_warps=DWEIGHT_NUM_WARPS, num_stages=3))
    for dt in _FLOAT_DTYPES:
        cx = dict(BLOCK_R=FOLD_BLOCK_R, BLOCK_T=FOLD_BLOCK_T)
        sig = {"dpatch_ptr": "*fp32", "dx_ptr": f"*{SIG_DTYPE[dt]}", "R": "i32", "P": "i32",
               "T": "i32", "STRIDE": "i32", "PATCH_LEN": "i32", "N_OVERLAP": "i32",
               "BLOCK_R": "constexpr", "BLOCK_T": "constexpr"}
        configs.append(dict(name=f"patch_fold[{SIG_DTYPE[dt]}]", fn=patch_fold, signature=sig,
                            constexprs=cx, num_warps=NUM_WARPS, num_stages=3))
    return configs
