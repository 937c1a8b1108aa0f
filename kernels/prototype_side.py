"""The factorized form's prototype side from projected keys: the kernels that form mc from K, Wq
and bq in one pass, and its backward, with their launchers.

Where E <= BLOCK_D + 1 (attention_form.CoreForm.keys_first) the layer projects K = source·Wkᵀ + bk and
forms, per head h, mc_h = wqb_hᵀ·K_hᵀ with wqb_h = [Wq_h | 0 | bq_h] ([E, BLOCK_D + 1]): rows
[0, BLOCK_D) of mc_h hold Y_hᵀ = (K_h·Wq_h)ᵀ, zero past d_model, row BLOCK_D holds c_h = K_h·bq_h,
the layout attention_forward reads (kernels/attention.py). Its backward, from mc's gradient dmc:
d K_hᵀ = wqb_h·dmc_h, d wqb_h = K_hᵀ·dmc_hᵀ (d Wq_h and d bq_h), d bk_h = Σ_s d K_hᵀ.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .attention_device import dot_operand
from .attention_form import CoreForm
from .attention_tiles import PROTOTYPE_ALIGN, launch_params, select_config
from .host import cdiv, require_unit_last_stride, store_dtype


@triton.jit
def prototype_logits_kernel(
    wq_ptr,  # wq: [H*E, DM], the query projection's weight (unit stride along DM)
    bq_ptr,  # bq: [H*E], its bias
    k_ptr,  # k: [S, H*E], the projected keys (unit stride along H*E)
    mc_ptr,  # mc: [H, BLOCK_D + 1, S'] contiguous, written here
    wqb_ptr,  # wqb: [H*E, BLOCK_D + 1] contiguous, written here
    S, S_pad, E, DM, stride_wq, stride_k_s,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The factorized form's mc from projected keys: for head h, rows [0, BLOCK_D) of mc_h hold
    Y_hᵀ = Wq_hᵀ·K_hᵀ (zero rows past d_model), row BLOCK_D holds c_h = K_h·bq_h, and the alignment
    columns S..S' are zeros, all written in one pass (2·E·(d_model + 1) FLOPs per prototype and
    head). The same numbers as the batched GEMM of wqb_hᵀ = [Wq_h | 0 | bq_h]ᵀ by K_hᵀ, without a
    concatenation before it or a pad after it: at the small shapes each of those is a dispatcher
    call and a launch. Products of the data dtype accumulate in fp32 and are rounded once, as
    cuBLAS does. The first program of each head also writes wqb_h, the operand
    the backward multiplies by (d K_hᵀ = wqb_h·dmc_h), so nothing concatenates it either way."""
    head = tl.program_id(1)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    e_mask = offs_e < E
    rows = head * E + offs_e  # head h's rows of wq and bq, its columns of k
    k_t = tl.load(k_ptr + offs_s.to(tl.int64)[None, :] * stride_k_s + rows[:, None],
                  mask=e_mask[:, None] & (offs_s < S)[None, :], other=0.0)  # [BLOCK_E, BLOCK_S]; 0 past S
    wq_t = tl.load(wq_ptr + rows[None, :] * stride_wq + offs_d[:, None],
                   mask=(offs_d < DM)[:, None] & e_mask[None, :], other=0.0)  # [BLOCK_D, BLOCK_E]; 0 past DM
    bq = tl.load(bq_ptr + rows, mask=e_mask, other=0.0)  # [BLOCK_E]
    y_t = tl.dot(wq_t.to(DOT_DTYPE), k_t.to(DOT_DTYPE), input_precision=INPUT_PRECISION)  # [BLOCK_D, BLOCK_S] fp32
    c = tl.sum(k_t.to(tl.float32) * bq.to(tl.float32)[:, None], axis=0)  # [BLOCK_S]
    mc_head = mc_ptr + head * (BLOCK_D + 1) * S_pad
    s_mask = offs_s < S_pad
    tl.store(mc_head + offs_d[:, None] * S_pad + offs_s[None, :], y_t.to(mc_ptr.dtype.element_ty),
             mask=s_mask[None, :])
    tl.store(mc_head + BLOCK_D * S_pad + offs_s, c.to(mc_ptr.dtype.element_ty), mask=s_mask)
    if tl.program_id(0) == 0:  # wqb_h's rows, the values as they are (no rounding)
        # read again, row-major [BLOCK_E, BLOCK_D], once mc is written: storing wq_t from the dot's
        # operand layout keeps it live across the dot, which spills the fp32 build at BLOCK_E = 64
        wq_rows = tl.load(wq_ptr + rows[:, None] * stride_wq + offs_d[None, :],
                          mask=e_mask[:, None] & (offs_d < DM)[None, :], other=0.0)
        wqb_rows = wqb_ptr + rows * (BLOCK_D + 1)
        tl.store(wqb_rows[:, None] + offs_d[None, :], wq_rows, mask=e_mask[:, None])
        tl.store(wqb_rows + BLOCK_D, bq, mask=e_mask)


@triton.jit
def prototype_logits_bwd_kernel(
    dmc_ptr,  # dmc: [H, BLOCK_D + 1, S'] fp32, mc's gradient (attention_backward's)
    wqb_ptr,  # wqb: [H*E, BLOCK_D + 1], prototype_logits' (unit stride along its last axis)
    k_ptr,  # k: [S, H*E], the projected keys (unit stride along H*E)
    dkt_ptr,  # dkt: [H*E, S] contiguous, d Kᵀ, written here
    dwq_ptr,  # dwq: [H*E, DM] contiguous, Wq's gradient, written here
    dbq_ptr,  # dbq: [H*E], bq's gradient, written here
    dbk_ptr,  # dbk: [H*E], bk's gradient (Σ_s d Kᵀ), written here
    S, E, DM, stride_dmc_h, stride_dmc_w, stride_wqb, stride_k_s,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_TO_BF16: tl.constexpr,
):
    """prototype_logits_kernel's backward, one program per head: from mc_h = wqb_hᵀ·K_hᵀ,
    d K_hᵀ = wqb_h·dmc_h and d wqb_h = K_hᵀ·dmc_hᵀ, whose columns [0, d_model) are d Wq_h and whose
    column BLOCK_D is d bq_h; and d bk_h = Σ_s d K_hᵀ. The program walks the prototypes once and
    sums d wqb_h and d bk_h in registers in a fixed order (no atomics: the same bits every run).
    dmc is rounded to the data dtype first, as the batched GEMMs of the same products take it."""
    head = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    e_mask = offs_e < E
    rows = head * E + offs_e  # head h's rows of wqb and d Kᵀ, its columns of k
    wqb_rows = wqb_ptr + rows[:, None] * stride_wqb
    wq_h = tl.load(wqb_rows + offs_d[None, :], mask=e_mask[:, None], other=0.0).to(DOT_DTYPE)  # [BLOCK_E, BLOCK_D]
    bq_h = tl.load(wqb_ptr + rows * stride_wqb + BLOCK_D, mask=e_mask, other=0.0).to(tl.float32)  # [BLOCK_E]
    dmc_head = dmc_ptr + head * stride_dmc_h
    dwq = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    dbq = tl.zeros((BLOCK_E,), dtype=tl.float32)
    dbk = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for s_start in range(0, S, BLOCK_S):
        offs_s = s_start + tl.arange(0, BLOCK_S)
        s_mask = offs_s < S
        dmc_y = dot_operand(tl.load(dmc_head + offs_d[:, None] * stride_dmc_w + offs_s[None, :],
                                    mask=s_mask[None, :], other=0.0), DOT_DTYPE, ROUND_TO_BF16)  # [BLOCK_D, BLOCK_S]
        dmc_c = dot_operand(tl.load(dmc_head + BLOCK_D * stride_dmc_w + offs_s, mask=s_mask, other=0.0),
                            DOT_DTYPE, ROUND_TO_BF16).to(tl.float32)  # [BLOCK_S]
        k_t = tl.load(k_ptr + offs_s.to(tl.int64)[None, :] * stride_k_s + rows[:, None],
                      mask=e_mask[:, None] & s_mask[None, :], other=0.0)  # [BLOCK_E, BLOCK_S]
        dkt = tl.dot(wq_h, dmc_y, input_precision=INPUT_PRECISION) + bq_h[:, None] * dmc_c[None, :]
        tl.store(dkt_ptr + rows.to(tl.int64)[:, None] * S + offs_s[None, :], dkt.to(dkt_ptr.dtype.element_ty),
                 mask=e_mask[:, None] & s_mask[None, :])
        dbk += tl.sum(dkt, axis=1)
        dwq += tl.dot(k_t.to(DOT_DTYPE), tl.trans(dmc_y), input_precision=INPUT_PRECISION)
        dbq += tl.sum(k_t.to(tl.float32) * dmc_c[None, :], axis=1)
    tl.store(dwq_ptr + rows[:, None] * DM + offs_d[None, :], dwq.to(dwq_ptr.dtype.element_ty),
             mask=e_mask[:, None] & (offs_d < DM)[None, :])
    tl.store(dbq_ptr + rows, dbq.to(dbq_ptr.dtype.element_ty), mask=e_mask)
    tl.store(dbk_ptr + rows, dbk.to(dbk_ptr.dtype.element_ty), mask=e_mask)


def prototype_logits(
    wq: torch.Tensor,  # wq: [H*E, DM], the query projection's weight
    bq: torch.Tensor,  # bq: [H*E], its bias
    k: torch.Tensor,  # k: [S, H*E], the projected keys
    n_heads: int,
    form: CoreForm,  # a keys_first form
) -> Tuple[torch.Tensor, torch.Tensor]:  # mc: [H, BLOCK_D + 1, S'] (S' = S rounded up to PROTOTYPE_ALIGN), wqb
    """The factorized form's prototype side from projected keys (prototype_logits_kernel), in k's
    dtype: mc, attention_forward's operand, whose rows [0, BLOCK_D) of mc_h are (K_h·Wq_h)ᵀ with
    zero rows past d_model, row BLOCK_D (K_h·bq_h)ᵀ, the alignment columns zeros; and wqb
    [H*E, BLOCK_D + 1], row h·E + e [Wq | zeros up to BLOCK_D | bq], of which mc_h = wqb_hᵀ·K_hᵀ.
    Not differentiable (the layer's backward differentiates it)."""
    (HE, DM), (S, k_cols) = wq.shape, k.shape
    E = HE // n_heads
    if wq.dtype != bq.dtype or wq.dtype != k.dtype:
        raise ValueError(f"wq, bq and k must share a dtype, got {wq.dtype}, {bq.dtype}, {k.dtype}")
    if k_cols != HE or HE % n_heads or bq.shape != (HE,):
        raise ValueError(f"k [S, H*E] and bq [H*E] must match wq [H*E, d_model] with H={n_heads}, got k "
                         f"{tuple(k.shape)}, bq {tuple(bq.shape)}, wq {tuple(wq.shape)}")
    require_unit_last_stride(wq=wq, bq=bq, k=k)
    cfg = select_config("prototype_logits", k.dtype, form, False, k.device)
    if cfg is None or not form.keys_first or (form.d_model, form.head_dim) != (DM, E):
        raise ValueError(f"no prototype-logits kernel for d_model={DM}, d_keys={E}, {k.dtype} with {form} (the "
                         f"factorized form forms mc from K where d_keys <= BLOCK_D + 1: keys_first)")
    S_pad = S + (-S % PROTOTYPE_ALIGN)
    mc = torch.empty(n_heads, cfg.block_d + 1, S_pad, dtype=store_dtype(k.dtype), device=k.device)
    wqb = torch.empty(HE, cfg.block_d + 1, dtype=k.dtype, device=k.device)
    # one program per head at least: without prototypes the first still writes wqb
    prototype_logits_kernel[(max(cdiv(S_pad, cfg.block_s), 1), n_heads)](
        wq, bq, k, mc, wqb, S, S_pad, E, DM, wq.stride(0), k.stride(0), **launch_params(cfg))
    return mc.to(k.dtype), wqb


def prototype_logits_backward(
    dmc: torch.Tensor,  # dmc: [H, BLOCK_D + 1, S'] fp32, attention_backward's
    wqb: torch.Tensor,  # wqb: [H*E, BLOCK_D + 1], prototype_logits'
    k: torch.Tensor,  # k: [S, H*E], the projected keys prototype_logits read
    n_heads: int,
    form: CoreForm,  # prototype_logits'
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # dkt [H*E, S], dwq [H*E, DM], dbq, dbk [H*E]
    """The gradients prototype_logits' mc passes on, in k's dtype (prototype_logits_bwd_kernel):
    d Kᵀ, Wq's and bq's, and bk's (Σ_s d Kᵀ: K = source·Wkᵀ + bk). dmc's alignment columns are
    not read."""
    (HE, W), (S, k_cols) = wqb.shape, k.shape
    E = HE // n_heads
    if dmc.dtype != torch.float32 or wqb.dtype != k.dtype:
        raise ValueError(f"dmc must be float32 and wqb share k's dtype, got {dmc.dtype}, {wqb.dtype}, {k.dtype}")
    if k_cols != HE or HE % n_heads or dmc.shape[:2] != (n_heads, W) or dmc.shape[2] < S:
        raise ValueError(f"dmc [H, W, S'] and k [S, H*E] must match wqb [H*E, W] with H={n_heads}, got dmc "
                         f"{tuple(dmc.shape)}, k {tuple(k.shape)}, wqb {tuple(wqb.shape)}")
    require_unit_last_stride(dmc=dmc, wqb=wqb, k=k)
    d_model = form.d_model
    cfg = select_config("prototype_logits_bwd", k.dtype, form, False, k.device)
    if cfg is None or not form.keys_first or E != form.head_dim or W != cfg.block_d + 1:
        raise ValueError(f"no prototype-logits backward for d_keys={E}, W={W}, {k.dtype} with {form} "
                         f"(keys_first forms only)")
    dev, out_dtype = k.device, store_dtype(k.dtype)
    dkt = torch.empty(HE, S, dtype=out_dtype, device=dev)
    dwq = torch.empty(HE, d_model, dtype=out_dtype, device=dev)
    dbq = torch.empty(HE, dtype=out_dtype, device=dev)
    dbk = torch.empty(HE, dtype=out_dtype, device=dev)
    prototype_logits_bwd_kernel[(n_heads,)](
        dmc, wqb, k, dkt, dwq, dbq, dbk, S, E, d_model, dmc.stride(0), dmc.stride(1), wqb.stride(0), k.stride(0),
        **launch_params(cfg))
    # the interpreter's bf16 results, rounded by torch (store_dtype); no-ops elsewhere
    return dkt.to(k.dtype), dwq.to(k.dtype), dbq.to(k.dtype), dbk.to(k.dtype)
