"""The reprogramming attention's backward: the delta, prototype-stationary and row-stationary
kernels and their launcher.

Notation and layouts: kernels/attention.py. From the forward's lse and the stored output O
(G = d out):

    delta[h, r] = Σ_e G·O over head h's columns    (= Σ_s P·dP; bench/ROOFLINE.md "Delta")
    dP = G_h·V_hᵀ (through the forward's dropout mask),  dZ = P ∘ (dP − delta)
    prototype side:  dV_h = dropout(P)ᵀ·G_h,  dY_h = scale·dZᵀ·X_h,  dc_h = scale·Σ_r dZ
    row side:        dX_h = scale·dZ·Y_h       (factorized: summed over heads into d target)

`attention_bwd_protos_kernel` owns a block of prototypes of one head and a chunk of rows: it forms
each (row, prototype) element's P, dP and dZ once (6·D + 4·E MMA FLOPs per element), keeps the
prototype side in registers (one fp32 partial per row chunk, summed in a fixed order) and, in the
default mode, adds the row side into dX with fp32 atomics (the order of those additions varies run
to run, as in FlashAttention's and PyTorch's own SDPA backward). Deterministic mode takes the row
side from `attention_bwd_rows_kernel` instead, a row-stationary pass that forms P, dP and dZ a second
time and reduces in a fixed order (8·D + 6·E per element in all): bitwise reproducible. Both form P
with the forward's exponentials and dropout mask (attention_device).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .attention_device import (LOG2E, MC_ALIGN, check_operands, dot_operand, dropout_keep, load_protos, load_rows,
                               softmax_exp2)
from .attention_form import CoreForm
from .attention_tiles import PROTOTYPE_ALIGN, launch_params, rows_per_philox_group, select_config
from .host import cdiv, seed_tensor

#: the prototype-stationary backward splits the rows into chunks until the grid has about this many programs
PROTOS_TARGET_PROGRAMS = 512


@triton.jit
def _row_block(
    dx,  # the row side's accumulator: [BLOCK_R, BLOCK_D] fp32
    x, grad, lse, delta,  # [BLOCK_R, BLOCK_D], [BLOCK_R, BLOCK_E] in DOT_DTYPE; [BLOCK_R], [BLOCK_R] fp32
    proto_start, mc_head, v_head, offs_r, offs_d, d_mask, offs_e, e_mask,
    S, D, H, stride_mc_d, stride_v_s, has_bias, qk_scale, seed, head, row_start, rows_per_group, dropout_p,
    keep_scale,
    BLOCK_S: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, POLY_EIGHTHS: tl.constexpr,
    ROUND_TO_BF16: tl.constexpr, MASKED: tl.constexpr,
):
    """One block of prototypes of the row-stationary backward: returns dx + dZ·Y_h over the block."""
    offs_s = proto_start + tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    y_t, v, bias = load_protos(mc_head, v_head, offs_s, s_mask, offs_d, d_mask, offs_e, e_mask, D, stride_mc_d,
                               stride_v_s, has_bias, MASKED, DOT_DTYPE)
    logits = tl.dot(x, y_t, input_precision=INPUT_PRECISION) * qk_scale + (bias * qk_scale)[None, :]
    probs = softmax_exp2(logits - lse[:, None], proto_start, POLY_EIGHTHS)
    if MASKED:
        probs = tl.where(s_mask[None, :], probs, 0.0)
    dprobs = tl.dot(grad, tl.trans(v), input_precision=INPUT_PRECISION)
    if dropout_p > 0.0:
        keep = dropout_keep(seed, head, H, row_start, rows_per_group, offs_r[:, None], offs_s[None, :], S,
                            dropout_p)
        dprobs = tl.where(keep, dprobs * keep_scale, 0.0)
    dlogits = probs * (dprobs - delta[:, None])
    return tl.dot(dot_operand(dlogits, DOT_DTYPE, ROUND_TO_BF16), tl.trans(y_t), dx, input_precision=INPUT_PRECISION)


@triton.jit(do_not_specialize=["zero_dx"])
def attention_bwd_delta_kernel(
    out_ptr,  # out: [R, H*E], the forward's output
    grad_ptr,  # grad: [R, H*E], its gradient
    delta_ptr,  # delta: [H, R] fp32, written here
    dx_ptr,  # dx: [R, DX_COLS] fp32, zeroed here when zero_dx (the atomic row side adds into it)
    R, H, E, DX_COLS, zero_dx,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """delta[h, r] = Σ_e grad·out over head h's columns. Equal to Σ_s P·dP in exact arithmetic
    (the forward's out is Σ_s dropout(P)·V), with no pass over the prototypes."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    row_offsets = offs_r.to(tl.int64)[:, None] * (H * E)
    for head in range(0, H):
        delta = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for e_start in range(0, E, BLOCK_E):  # BLOCK_E: a chunk of the head's columns
            offs_e = e_start + tl.arange(0, BLOCK_E)
            cols = row_offsets + (head * E + offs_e)[None, :]
            mask = r_mask[:, None] & (offs_e < E)[None, :]
            o = tl.load(out_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            delta += tl.sum(o * g, axis=1)
        tl.store(delta_ptr + head * R + offs_r, delta, mask=r_mask)
    if zero_dx != 0:
        offs_x = tl.arange(0, BLOCK_X)
        zeros = tl.zeros((BLOCK_R, BLOCK_X), dtype=tl.float32)
        for col_start in range(0, DX_COLS, BLOCK_X):
            cols = col_start + offs_x
            tl.store(dx_ptr + offs_r.to(tl.int64)[:, None] * DX_COLS + cols[None, :], zeros,
                     mask=r_mask[:, None] & (cols < DX_COLS)[None, :])


@triton.jit(do_not_specialize=["has_bias", "with_dx"])
def attention_bwd_protos_kernel(
    x_ptr,  # x: [R, *] as in the forward
    mc_ptr,  # mc: [H, W, S'] as in the forward
    v_ptr,  # v: [S, H, E] as in the forward
    grad_ptr,  # grad: [R, H*E], gradient of the forward's out
    lse_ptr,  # lse: [H, R] fp32, the forward's
    delta_ptr,  # delta: [H, R] fp32, attention_bwd_delta_kernel's
    dmc_ptr,  # dmc: [n_chunks, H, W, S'] fp32 (dense), written here: dYᵀ and dc of each row chunk
    dv_ptr,  # dv: [n_chunks, S, H, E] fp32 (dense), written here
    dx_ptr,  # dx: [R, *] fp32 with x's columns, added to atomically when with_dx
    R, S, D, H, E, W, S_PAD,
    stride_x_r, x_head_stride, stride_mc_h8, stride_mc_d8, stride_v_s, stride_v_h, stride_dx_r,
    rows_per_chunk,  # a multiple of BLOCK_R
    has_bias,  # as in the forward
    qk_scale,  # log2(e) · scale
    grad_scale,  # scale: the logits' factor, applied to dY, dc and dX
    with_dx,  # 1: add the row side into dx (default mode); 0: leave it to attention_bwd_rows_kernel
    dropout_p,  # a run-time value: one build serves training with and without dropout
    seed_ptr,  # seed: [1] int64 on the device, the forward's
    rows_per_group,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    POLY_EIGHTHS: tl.constexpr,  # as in the forward: an element gets the forward's exponential
    ROUND_TO_BF16: tl.constexpr,
):
    proto_start = tl.program_id(0) * BLOCK_S
    head = tl.program_id(1)
    chunk = tl.program_id(2)
    offs_s = proto_start + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    s_mask = offs_s < S
    d_mask = offs_d < D
    e_mask = offs_e < E
    stride_mc_h, stride_mc_d = stride_mc_h8 * MC_ALIGN, stride_mc_d8 * MC_ALIGN
    mc_head = mc_ptr + head * stride_mc_h
    y_t, v, bias = load_protos(mc_head, v_ptr + head * stride_v_h, offs_s, s_mask, offs_d, d_mask, offs_e, e_mask,
                               D, stride_mc_d, stride_v_s, has_bias, True, DOT_DTYPE)
    y = tl.trans(y_t)  # [BLOCK_S, BLOCK_D]
    bias = bias * qk_scale
    seed = tl.load(seed_ptr)
    keep_scale = 1.0 / (1.0 - dropout_p)

    dy = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
    dc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    x_cols = head * x_head_stride + offs_d
    chunk_start = chunk * rows_per_chunk
    chunk_end = tl.minimum(chunk_start + rows_per_chunk, R)
    for row_start in range(chunk_start, chunk_end, BLOCK_R):
        offs_r = row_start + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        x = load_rows(x_ptr, offs_r, r_mask, x_cols, d_mask, stride_x_r, DOT_DTYPE)  # [BLOCK_R, BLOCK_D]
        grad = load_rows(grad_ptr, offs_r, r_mask, head * E + offs_e, e_mask, H * E, DOT_DTYPE)  # [BLOCK_R, BLOCK_E]
        lse = tl.load(lse_ptr + head * R + offs_r, mask=r_mask, other=0.0)
        delta = tl.load(delta_ptr + head * R + offs_r, mask=r_mask, other=0.0)

        # transposed orientation [BLOCK_S, BLOCK_R]: the prototype side reduces over rows
        logits_t = tl.dot(y, tl.trans(x), input_precision=INPUT_PRECISION) * qk_scale + bias[:, None]
        # padded rows and prototypes must give P = 0: exp2(logit - 0) there can overflow to inf,
        # and inf · 0 is NaN
        probs_t = softmax_exp2(logits_t - lse[None, :], proto_start, POLY_EIGHTHS)
        probs_t = tl.where(s_mask[:, None] & r_mask[None, :], probs_t, 0.0)
        dprobs_t = tl.dot(v, tl.trans(grad), input_precision=INPUT_PRECISION)  # [BLOCK_S, BLOCK_R]
        if dropout_p > 0.0:
            keep_t = dropout_keep(seed, head, H, row_start, rows_per_group, offs_r[None, :], offs_s[:, None], S,
                                  dropout_p)
            attn_t = tl.where(keep_t, probs_t * keep_scale, 0.0)
            dprobs_t = tl.where(keep_t, dprobs_t * keep_scale, 0.0)
        else:
            attn_t = probs_t
        dv = tl.dot(dot_operand(attn_t, DOT_DTYPE, ROUND_TO_BF16), grad, dv, input_precision=INPUT_PRECISION)
        dlogits_t = probs_t * (dprobs_t - delta[None, :])
        dlogits_op = dot_operand(dlogits_t, DOT_DTYPE, ROUND_TO_BF16)
        dy = tl.dot(dlogits_op, x, dy, input_precision=INPUT_PRECISION)
        dc += tl.sum(dlogits_t, axis=1)
        if with_dx != 0:
            dx = tl.dot(tl.trans(dlogits_op), y, input_precision=INPUT_PRECISION)  # [BLOCK_R, BLOCK_D]
            tl.atomic_add(dx_ptr + offs_r.to(tl.int64)[:, None] * stride_dx_r + x_cols[None, :], dx * grad_scale,
                          mask=r_mask[:, None] & d_mask[None, :], sem="relaxed")

    # one dense fp32 slab per row chunk, summed in a fixed order by the launcher; dY stored transposed
    # into mc's layout (the columns of a row of the slab run along the prototypes)
    slab = dmc_ptr + (chunk.to(tl.int64) * H + head) * W * S_PAD
    # the slab's alignment padding (prototypes S..S_PAD) gets zeros (dy, dc are 0 past S): it is the
    # gradient of mc's padding, which autograd sees
    pad_mask = offs_s < S_PAD
    tl.store(slab + offs_d[None, :] * S_PAD + offs_s[:, None], dy * grad_scale,
             mask=pad_mask[:, None] & d_mask[None, :])
    tl.store(slab + D * S_PAD + offs_s, dc * grad_scale, mask=pad_mask & ((offs_s * 0 + has_bias) != 0))
    dv_rows = (chunk.to(tl.int64) * S + offs_s) * H + head  # [BLOCK_S] row of (chunk, s, head)
    tl.store(dv_ptr + dv_rows[:, None] * E + offs_e[None, :], dv, mask=s_mask[:, None] & e_mask[None, :])


@triton.jit(do_not_specialize=["has_bias"])
def attention_bwd_rows_kernel(
    x_ptr,  # x: [R, *] as in the forward
    mc_ptr,  # mc: [H, W, S'] as in the forward
    v_ptr,  # v: [S, H, E] as in the forward
    grad_ptr,  # grad: [R, H*E], gradient of the forward's out
    lse_ptr,  # lse: [H, R] fp32, the forward's
    delta_ptr,  # delta: [H, R] fp32, attention_bwd_delta_kernel's
    dx_ptr,  # dx: fp32, head h's [R, D] block at dx_ptr + h*stride_dx_h (row stride stride_dx_r), written here
    R, S, D, H, E,
    stride_x_r, x_head_stride, stride_mc_h8, stride_mc_d8, stride_v_s, stride_v_h, stride_dx_r, stride_dx_h,
    has_bias,  # as in the forward
    qk_scale,  # log2(e) · scale
    grad_scale,  # scale
    dropout_p,  # a run-time value, as in attention_bwd_protos_kernel
    seed_ptr,  # seed: [1] int64 on the device, the forward's
    rows_per_group,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    POLY_EIGHTHS: tl.constexpr,  # as in the forward: an element gets the forward's exponential
    ROUND_TO_BF16: tl.constexpr,
):
    """The row side dX_h = scale·Σ_s dZ·Y_h in a fixed order (deterministic mode)."""
    row_start = tl.program_id(0) * BLOCK_R
    head = tl.program_id(1)
    offs_r = row_start + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    r_mask = offs_r < R
    d_mask = offs_d < D
    e_mask = offs_e < E
    stride_mc_h, stride_mc_d = stride_mc_h8 * MC_ALIGN, stride_mc_d8 * MC_ALIGN
    x = load_rows(x_ptr, offs_r, r_mask, head * x_head_stride + offs_d, d_mask, stride_x_r, DOT_DTYPE)
    grad = load_rows(grad_ptr, offs_r, r_mask, head * E + offs_e, e_mask, H * E, DOT_DTYPE)
    lse = tl.load(lse_ptr + head * R + offs_r, mask=r_mask, other=0.0)
    delta = tl.load(delta_ptr + head * R + offs_r, mask=r_mask, other=0.0)
    mc_head = mc_ptr + head * stride_mc_h
    v_head = v_ptr + head * stride_v_h
    seed = tl.load(seed_ptr)
    keep_scale = 1.0 / (1.0 - dropout_p)

    dx = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    full_end = (S // BLOCK_S) * BLOCK_S
    for proto_start in range(0, full_end, BLOCK_S):
        dx = _row_block(dx, x, grad, lse, delta, proto_start, mc_head, v_head, offs_r, offs_d, d_mask, offs_e, e_mask,
                        S, D, H, stride_mc_d, stride_v_s, has_bias, qk_scale, seed, head, row_start, rows_per_group,
                        dropout_p, keep_scale, BLOCK_S, DOT_DTYPE, INPUT_PRECISION, POLY_EIGHTHS, ROUND_TO_BF16, False)
    if full_end < S:
        dx = _row_block(dx, x, grad, lse, delta, full_end, mc_head, v_head, offs_r, offs_d, d_mask, offs_e, e_mask,
                        S, D, H, stride_mc_d, stride_v_s, has_bias, qk_scale, seed, head, row_start, rows_per_group,
                        dropout_p, keep_scale, BLOCK_S, DOT_DTYPE, INPUT_PRECISION, POLY_EIGHTHS, ROUND_TO_BF16, True)

    dx_ptrs = dx_ptr + head * stride_dx_h + offs_r.to(tl.int64)[:, None] * stride_dx_r + offs_d[None, :]
    tl.store(dx_ptrs, dx * grad_scale, mask=r_mask[:, None] & d_mask[None, :])


class CoreGradients(NamedTuple):
    """The attention core's gradients, fp32: x's [R, x.shape[1]], mc's [H, W, S'], v's [S, H, E]."""
    x: Optional[torch.Tensor]
    mc: Optional[torch.Tensor]
    v: Optional[torch.Tensor]


def protos_rows_per_chunk(num_rows: int, num_proto_blocks: int, n_heads: int, block_r: int) -> int:
    """Rows per program of the prototype-stationary backward: enough chunks to fill the GPU, each a
    whole number of row blocks (at least four, so a chunk amortizes loading its prototype tile).

    Depends on the shapes only, not on the GPU, so a problem always sums the same partials in
    the same order.
    """
    chunks = max(1, -(-PROTOS_TARGET_PROGRAMS // (num_proto_blocks * n_heads)))
    rows = max(4 * block_r, -(-num_rows // chunks))
    return -(-rows // block_r) * block_r


def attention_backward(
    x: torch.Tensor,  # x: [R, *] as in attention_forward
    mc: torch.Tensor,  # mc: [H, W, S'] as in attention_forward
    v: torch.Tensor,  # v: [S, H, E] as in attention_forward
    out: torch.Tensor,  # out: [R, H*E], attention_forward's
    grad: torch.Tensor,  # grad: [R, H*E], its gradient
    lse: torch.Tensor,  # lse: [H, R] fp32, attention_forward's
    form: CoreForm,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,  # the forward's
    allow_tf32: bool = False,
    need_dx: bool = True,
    need_protos: bool = True,
    deterministic: bool = False,
) -> CoreGradients:
    """(dx: [R, x.shape[1]] fp32, dmc: [H, W, S'] fp32, dv: [S, H, E] fp32), None where not needed;
    dmc's prototype columns S..S' (mc's alignment padding) are zeros.

    Default mode: the prototype-stationary kernel forms every element once and adds dx with atomics.
    deterministic: dx from the row-stationary kernel instead (fixed reduction order everywhere).
    """
    dev, dt, f32 = x.device, x.dtype, torch.float32
    seed = seed_tensor(seed, dropout_p, dev)
    check_operands(x, mc, v)
    R, dx_cols = x.shape
    S, H, E = v.shape
    _, W, S_pad = mc.shape
    if R == 0:  # empty batch: dx is empty and the prototype side is a sum over no rows
        return CoreGradients(torch.zeros((0, dx_cols), dtype=f32, device=dev) if need_dx else None,
                             torch.zeros((H, W, S_pad), dtype=f32, device=dev) if need_protos else None,
                             torch.zeros((S, H, E), dtype=f32, device=dev) if need_protos else None)
    grad, out = grad.contiguous(), out.contiguous()
    # dx added by the prototype-stationary kernel with atomics (default mode)
    atomic_dx = need_dx and need_protos and not deterministic
    operand_strides = (x.stride(0), form.x_head_stride, mc.stride(0) // PROTOTYPE_ALIGN, mc.stride(1) // PROTOTYPE_ALIGN,
                       v.stride(0), v.stride(1), dx_cols)
    logit_args = (int(form.factorized), LOG2E * form.scale, form.scale)  # has_bias, qk_scale, grad_scale
    philox = (float(dropout_p), seed, rows_per_philox_group(S))

    delta = torch.empty(H, R, dtype=f32, device=dev)
    dx = torch.empty(R, dx_cols, dtype=f32, device=dev) if atomic_dx else None  # zeroed by the delta kernel
    dx_or_delta = dx if atomic_dx else delta  # the delta kernel's dx argument (untouched without atomics)
    cfg = select_config("bwd_delta", dt, None, False, dev, allow_tf32)
    attention_bwd_delta_kernel[(cdiv(R, cfg.block_r),)](
        out, grad, delta, dx_or_delta, R, H, E, dx_cols, int(atomic_dx), **launch_params(cfg))

    dmc = dv = None
    if need_protos:
        cfg = select_config("bwd_protos", dt, form, dropout_p > 0.0, dev, allow_tf32)
        proto_blocks = cdiv(S, cfg.block_s)
        rows_per_chunk = protos_rows_per_chunk(R, proto_blocks, H, cfg.block_r)
        chunks = cdiv(R, rows_per_chunk)  # partial sums of dmc and dv over row chunks
        # one chunk: the kernel writes the result itself (same layout, no chunk axis to reduce or index)
        chunk_axis = (chunks,) if chunks > 1 else ()
        dmc = torch.empty(*chunk_axis, H, W, S_pad, dtype=f32, device=dev)  # [(C,) H, W, S']
        dv = torch.empty(*chunk_axis, S, H, E, dtype=f32, device=dev)  # [(C,) S, H, E]
        attention_bwd_protos_kernel[(proto_blocks, H, chunks)](
            x, mc, v, grad, lse, delta, dmc, dv, dx if atomic_dx else dmc,  # dx: untouched without atomics
            R, S, form.d_logit, H, E, W, S_pad, *operand_strides, rows_per_chunk, *logit_args, int(atomic_dx), *philox,
            **launch_params(cfg))
        if chunk_axis:
            dmc, dv = dmc.sum(0), dv.sum(0)

    if need_dx and not atomic_dx:
        cfg = select_config("bwd_rows", dt, form, dropout_p > 0.0, dev, allow_tf32)
        if form.factorized:  # every head adds into the same target columns, summed below
            dx_heads, head_stride = torch.empty(H, R, dx_cols, dtype=f32, device=dev), R * dx_cols
        else:  # standard: head h owns columns h·E + [0, E) of dQ
            dx_heads, head_stride = torch.empty(R, dx_cols, dtype=f32, device=dev), form.x_head_stride
        attention_bwd_rows_kernel[(cdiv(R, cfg.block_r), H)](
            x, mc, v, grad, lse, delta, dx_heads, R, S, form.d_logit, H, E, *operand_strides, head_stride, *logit_args,
            *philox, **launch_params(cfg))
        dx = dx_heads.sum(0) if form.factorized else dx_heads
    return CoreGradients(dx, dmc, dv)
