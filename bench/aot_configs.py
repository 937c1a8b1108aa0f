"""Every kernel build the launchers can choose, described for ``triton.compile(ASTSource(...))``:
what bench/aot_report.py compiles for sm_75/80/90 (tests/test_aot.py: spill-free under three
Tritons) and profiles from SASS, and what the tuners compile. Test and benchmark tooling: the
installed library never imports it.

One way to describe a build for both ops: :func:`aot_config`, whose signature comes from the
kernel's own argument names, so a kernel's arguments are spelled once, in its definition.
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, Mapping

import torch

from timellm_fast.kernels.attention_backward import (attention_bwd_delta_kernel, attention_bwd_protos_kernel,
                                                     attention_bwd_rows_kernel)
from timellm_fast.kernels.attention_forward import attention_fwd_kernel, dropout_keep_mask_kernel
from timellm_fast.kernels.attention_tiles import ARCHS, CONFIG_TABLE
from timellm_fast.kernels.host import PATCH_INPUT_PRECISION, SIG_DTYPE, TL_DTYPE
from timellm_fast.kernels.patch_embedding_backward import (patch_dweight_reduce, patch_fold, patch_window_dweight,
                                                           patch_window_dx)
from timellm_fast.kernels.patch_embedding_forward import patch_conv_gemm, patch_window_fwd
from timellm_fast.kernels.patch_embedding_tiles import (DWEIGHT_BLOCK_C, DWEIGHT_BLOCK_M, DWEIGHT_NUM_STAGES,
                                                        DWEIGHT_NUM_WARPS, DX_BLOCK_D, DX_BLOCK_J, DX_BLOCK_U,
                                                        DX_NUM_STAGES, FOLD_BLOCK_R, FOLD_BLOCK_T, GEMM_BLOCK_K,
                                                        GEMM_BLOCK_O, NUM_STAGES, NUM_WARPS, REDUCE_BLOCK,
                                                        REDUCE_BLOCK_CHUNKS, WINDOW_BLOCK_C, WINDOW_BLOCK_O, GemmConfig,
                                                        WindowFwdConfig, dweight_block_o)
from timellm_fast.kernels.prototype_side import prototype_logits_bwd_kernel, prototype_logits_kernel


def signature(kernel, constexprs: Mapping[str, object], pointers: Mapping[str, torch.dtype],
              float_scalars: Iterable[str] = ()) -> Dict[str, str]:
    """triton.compile's signature of `kernel`, in its argument order: "constexpr" for the names in
    `constexprs`, ``*<dtype>`` for the pointer arguments (`pointers` maps each to the dtype it
    points to), "fp32" for `float_scalars`, "i32" for every other (integer) argument. A pointer
    argument (named ``*_ptr``) missing from `pointers` is an error, not a guess."""
    floats = set(float_scalars)
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + SIG_DTYPE[pointers[name]]
        elif name.endswith("_ptr"):
            raise KeyError(f"{name} of {kernel.__name__}: no pointer dtype given")
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def aot_config(name: str, kernel, constexprs: Mapping[str, object], pointers: Mapping[str, torch.dtype],
               num_warps: int, num_stages: int, float_scalars: Iterable[str] = (),
               divisible_by_16: Iterable[str] = (), archs: Iterable[int] = ARCHS, **extra) -> dict:  # ARCHS: every generation
    """One configuration as bench/aot_report.py compiles it: the kernel, its signature and
    constexprs, the launch options, the generations it serves, and the integer arguments the JIT
    marks divisible by 16 at the shapes that matter (its compile then matches the GPU's)."""
    return dict(name=name, fn=kernel, signature=signature(kernel, constexprs, pointers, float_scalars),
                constexprs=dict(constexprs), num_warps=num_warps, num_stages=num_stages, archs=tuple(archs),
                divisible_by_16=tuple(divisible_by_16), **extra)


# ---------------------------------------------------------------- the reprogramming attention

def mma_work_budget(role: str, block_d: int, block_e: int, with_dx: bool = True) -> int:
    """docs/spec.md §1.3's MMA FLOPs per (row, prototype, head) element for one kernel role at BLOCK_D,
    BLOCK_E: the forward 2·D + 2·E; the prototype pass 6·D + 4·E with the row side (the default
    backward), 4·D + 4·E without it; the row pass 4·D + 2·E (so the deterministic backward,
    prototype pass without the row side plus row pass, is 8·D + 6·E)."""
    if role == "fwd":
        return 2 * block_d + 2 * block_e
    if role == "bwd_protos":
        return (6 * block_d + 4 * block_e) if with_dx else (4 * block_d + 4 * block_e)
    if role == "bwd_rows":
        return 4 * block_d + 2 * block_e
    raise ValueError(f"no MMA work budget for role {role!r}")


#: role -> kernel, what the tile table's configurations launch
KERNELS = {
    "fwd": attention_fwd_kernel,
    "bwd_delta": attention_bwd_delta_kernel,
    "bwd_protos": attention_bwd_protos_kernel,
    "bwd_rows": attention_bwd_rows_kernel,
    "dropout_mask": dropout_keep_mask_kernel,
    "prototype_logits": prototype_logits_kernel,
    "prototype_logits_bwd": prototype_logits_bwd_kernel,
}

#: per role: the pointer arguments that are not in the data dtype
_FP32_POINTERS = {
    "fwd": ("lse_ptr",),
    "bwd_delta": ("delta_ptr", "dx_ptr"),
    "bwd_protos": ("lse_ptr", "delta_ptr", "dmc_ptr", "dv_ptr", "dx_ptr"),
    "bwd_rows": ("lse_ptr", "delta_ptr", "dx_ptr"),
    "dropout_mask": (),
    "prototype_logits": (),
    "prototype_logits_bwd": ("dmc_ptr",),
}
_INTEGER_POINTERS = {"seed_ptr": torch.int64, "keep_ptr": torch.int8}
_FLOAT_SCALARS = ("qk_scale", "grad_scale", "dropout_p")
#: integer arguments that docs/spec.md §2 shapes make multiples of 16 (so the JIT specializes them there):
#: head widths, row counts (B'·64), strides of the row-side operands and of V, the Philox row group
#: (a multiple of 128). S = 1000, H = 8 and mc's strides (multiples of S' = 1000) are not; the kernels
#: know mc's row stride is a multiple of PROTOTYPE_ALIGN.
DIVISIBLE_BY_16 = ("R", "D", "E", "DX_COLS", "stride_x_r", "x_head_stride", "stride_v_s", "stride_v_h",
                   "stride_dx_r", "stride_dx_h", "rows_per_chunk", "rows_per_group")


def attention_configs() -> List[dict]:
    """Every configuration of CONFIG_TABLE in the form bench/aot_report.py compiles, for the arch it
    serves: pointers in the data dtype but the fp32 buffers, the seed and the debug kernel's mask."""
    configs = []
    for cfg in CONFIG_TABLE.values():
        kernel = KERNELS[cfg.role]
        pointers = {name: cfg.data_dtype for name in kernel.arg_names if name.endswith("_ptr")}
        pointers.update({name: torch.float32 for name in _FP32_POINTERS[cfg.role]}, **_INTEGER_POINTERS)
        configs.append(aot_config(cfg.name, kernel, cfg.constexprs(), pointers, cfg.num_warps, cfg.num_stages,
                                  float_scalars=_FLOAT_SCALARS, divisible_by_16=DIVISIBLE_BY_16, archs=(cfg.arch,),
                                  config=cfg))
    return configs


# ---------------------------------------------------------------- the patch embedding

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
#: the window kernels' integer arguments that docs/spec.md §2 shapes make multiples of 16 (T = 512,
#: P = 64, patch_len 16, d_model 16/32, stride 8 in bytes of bf16 = 16), as the JIT marks them
_WINDOW_DIV16 = ("M", "P", "T", "PATCH_LEN", "STRIDE_BYTES", "D", "s_b", "s_n", "s_wd")
_DX_DIV16 = ("P", "T", "PATCH_LEN", "STRIDE_BYTES", "D", "s_wd")
_SEED = {"seed_ptr": torch.int64}
_DROPOUT_SCALARS = ("dropout_p", "dropout_scale")


def patch_embedding_configs() -> list:
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
                  DOT_DTYPE=TL_DTYPE[dot_dt], INPUT_PRECISION=PATCH_INPUT_PRECISION,
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
                  INPUT_PRECISION=PATCH_INPUT_PRECISION)
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


def all_configs() -> List[dict]:
    """Both ops' builds."""
    return patch_embedding_configs() + attention_configs()
