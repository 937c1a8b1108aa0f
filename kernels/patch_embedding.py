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

The kernels, by file: patch_embedding_forward.py (patch_window_fwd, the gather patch_conv_gemm
and the launcher patch_embedding_fwd), patch_embedding_backward.py (patch_window_dweight,
patch_dweight_reduce, patch_window_dx, patch_fold and the launcher patch_embedding_bwd),
patch_embedding_device.py (the @triton.jit helpers they share), patch_embedding_tiles.py (their
launch configurations, the only source of their tiles). This module is what the op layer
(timellm_fast/patch_embedding.py) calls, and the list of every build the launchers can choose.
"""
from __future__ import annotations

import itertools

import torch

from .aot import aot_config
from .host import TL_DTYPE, SIG_DTYPE, input_precision
from .patch_embedding_backward import (patch_dweight_reduce, patch_embedding_bwd, patch_fold, patch_window_dweight,
                                       patch_window_dx)
from .patch_embedding_forward import compiled_window_fwd, patch_conv_gemm, patch_embedding_fwd, patch_window_fwd
from .patch_embedding_tiles import (DWEIGHT_BLOCK_C, DWEIGHT_BLOCK_M, DWEIGHT_NUM_STAGES, DWEIGHT_NUM_WARPS, DX_BLOCK_D,
                                    DX_BLOCK_J, DX_BLOCK_U, DX_NUM_STAGES, FOLD_BLOCK_R, FOLD_BLOCK_T, GEMM_BLOCK_K,
                                    GEMM_BLOCK_O, NUM_STAGES, NUM_WARPS, REDUCE_BLOCK, REDUCE_BLOCK_CHUNKS,
                                    WINDOW_BLOCK_C, WINDOW_BLOCK_O, GemmConfig, WindowFwdConfig, dweight_block_o)

__all__ = ["aot_configs", "compiled_window_fwd", "patch_embedding_bwd", "patch_embedding_fwd"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: (x, w, out, dot) pointer dtypes: each dtype alone, plus bf16 data with an fp32 weight (the
#: mixed case Time-LLM users hit, computed in fp32)
_PTR_CASES = [(torch.float32, torch.float32, torch.float32, torch.float32),
              (torch.bfloat16, torch.float32, torch.float32, torch.float32),
              (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
              (torch.float16, torch.float16, torch.float16, torch.float16)]
#: (g, w, dx, dot) of patch_window_dx: g is the output gradient (weight's dtype) or, under dropout,
#: the fp32 masked gradient; dx has x's dtype
_DX_CASES = [(torch.float32, torch.float32, torch.float32, torch.float32),
             (torch.float32, torch.float32, torch.bfloat16, torch.float32),
             (torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),
             (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
             (torch.float16, torch.float16, torch.float16, torch.float16)]
#: the window kernels' integer arguments that SPEC §2 shapes make multiples of 16 (T = 512,
#: P = 64, patch_len 16, d_model 16/32, stride 8 in bytes of bf16 = 16), as the JIT marks them
_WINDOW_DIV16 = ("M", "P", "T", "PATCH_LEN", "STRIDE_BYTES", "D", "s_b", "s_n", "s_wd")
_DX_DIV16 = ("P", "T", "PATCH_LEN", "STRIDE_BYTES", "D", "s_wd")
_SEED = {"seed_ptr": torch.int64}
_DROPOUT_SCALARS = ("dropout_p", "dropout_scale")


def aot_configs() -> list:
    """Every (kernel, constexpr set) the launchers can choose, with a representative signature:
    pointer dtypes follow the dot dtype (plus bf16 data with an fp32 weight)."""
    configs = []
    for (x_dt, w_dt, out_dt, dot_dt), block_c, block_o, dropout in itertools.product(
            _PTR_CASES, WINDOW_BLOCK_C, WINDOW_BLOCK_O, (False, True)):
        cfg = WindowFwdConfig(block_c, block_o, dot_dt, dropout)
        configs.append(aot_config(
            f"patch_window_fwd[x={SIG_DTYPE[x_dt]},w={SIG_DTYPE[w_dt]},dot={SIG_DTYPE[dot_dt]},C={block_c},"
            f"O={block_o},dropout={dropout}]", patch_window_fwd, cfg.constexprs(),
            dict(x_ptr=x_dt, w_ptr=w_dt, out_ptr=out_dt, **_SEED), cfg.tile.num_warps, cfg.tile.num_stages,
            _DROPOUT_SCALARS, _WINDOW_DIV16))
    for dt, block_o, (dropout, write_masked) in itertools.product(
            _FLOAT_DTYPES, GEMM_BLOCK_O, ((False, False), (True, False), (True, True))):
        if block_o != dweight_block_o(block_o, dropout):
            continue
        dot_dt = dt if not dropout else torch.float32
        cx = dict(BLOCK_M=DWEIGHT_BLOCK_M, BLOCK_C=DWEIGHT_BLOCK_C, BLOCK_O=block_o,
                  DOT_DTYPE=TL_DTYPE[dot_dt], INPUT_PRECISION=input_precision(dot_dt),
                  DROPOUT=dropout, WRITE_MASKED_GRAD=write_masked)
        configs.append(aot_config(
            f"patch_window_dweight[{SIG_DTYPE[dt]},dot={SIG_DTYPE[dot_dt]},O={block_o},dropout={dropout},"
            f"write_masked={write_masked}]", patch_window_dweight, cx,
            dict(x_ptr=dt, g_ptr=dt, dw_partial_ptr=torch.float32, g_masked_ptr=torch.float32, **_SEED),
            DWEIGHT_NUM_WARPS, DWEIGHT_NUM_STAGES, _DROPOUT_SCALARS, _WINDOW_DIV16))
    for dt in _FLOAT_DTYPES:
        configs.append(aot_config(
            f"patch_dweight_reduce[{SIG_DTYPE[dt]}]", patch_dweight_reduce,
            dict(BLOCK_CHUNKS=REDUCE_BLOCK_CHUNKS, BLOCK=REDUCE_BLOCK), dict(partial_ptr=torch.float32, dw_ptr=dt),
            NUM_WARPS, NUM_STAGES))
    for (g_dt, w_dt, dx_dt, dot_dt), block_u, block_d in itertools.product(_DX_CASES, DX_BLOCK_U, DX_BLOCK_D):
        cx = dict(BLOCK_J=DX_BLOCK_J, BLOCK_U=block_u, BLOCK_D=block_d, DOT_DTYPE=TL_DTYPE[dot_dt],
                  INPUT_PRECISION=input_precision(dot_dt))
        configs.append(aot_config(
            f"patch_window_dx[g={SIG_DTYPE[g_dt]},w={SIG_DTYPE[w_dt]},dx={SIG_DTYPE[dx_dt]},U={block_u},D={block_d}]",
            patch_window_dx, cx, dict(g_ptr=g_dt, w_ptr=w_dt, dx_ptr=dx_dt), NUM_WARPS, DX_NUM_STAGES,
            divisible_by_16=_DX_DIV16))
    for (x_dt, w_dt, out_dt, dot_dt), use_dot, block_k, block_o, dropout in itertools.product(
            _PTR_CASES, (True, False), GEMM_BLOCK_K, GEMM_BLOCK_O, (False, True)):
        if not use_dot and (block_k != GEMM_BLOCK_K[0] or dot_dt != torch.float32):
            continue
        cfg = GemmConfig(block_k, block_o, use_dot, dot_dt, dropout)
        configs.append(aot_config(
            f"patch_conv_gemm[x={SIG_DTYPE[x_dt]},w={SIG_DTYPE[w_dt]},dot={SIG_DTYPE[dot_dt]},K={block_k},"
            f"O={block_o},fma={not use_dot},dropout={dropout}]", patch_conv_gemm, cfg.constexprs(),
            dict(src_ptr=x_dt, w_ptr=w_dt, out_ptr=out_dt, **_SEED), cfg.num_warps, cfg.num_stages, _DROPOUT_SCALARS))
    for dt in _FLOAT_DTYPES:
        configs.append(aot_config(
            f"patch_fold[{SIG_DTYPE[dt]}]", patch_fold, dict(BLOCK_R=FOLD_BLOCK_R, BLOCK_T=FOLD_BLOCK_T),
            dict(dpatch_ptr=torch.float32, dx_ptr=dt), NUM_WARPS, NUM_STAGES))
    return configs
