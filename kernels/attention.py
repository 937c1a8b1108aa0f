"""Fused cross-attention of Time-LLM's reprogramming layer on factorized logits: what the op layer
(timellm_fast/reprogramming.py) calls, and every build its launchers can choose.

Notation, used in the shape comments of every attention file:

* ``R = B'·L`` query rows (batch and patch axes folded: every row attends to the same prototypes),
* ``H`` heads, ``E`` the value width of a head (d_keys), ``S`` prototypes,
* ``D`` the width of the logits' dot products: d_model padded to BLOCK_D on the factorized form, E
  on the standard one.

Per head h the kernels see the logits as a thin product plus a bias:

    Z_h[r, s] = scale · (X_h[r] · Y_h[s] + c_h[s])        (natural-log units; the kernels use exp2)
    P_h       = softmax_s(Z_h)
    out[r, hE:(h+1)E] = Σ_s dropout(P_h)[r, s] · V_h[s]
    lse[h, r] = log2 Σ_s 2^(log2(e)·Z_h[r, s])

* factorized form (d_model <= E: every Time-LLM shape): X_h = target for every head, Y_h = K_h·Wq_h
  ([S, d_model]), c_h = K_h·bq_h, scale = 1/sqrt(E). X_h·Y_hᵀ + c_h = Q_h·K_hᵀ exactly, so Q is never
  formed and the logit dots are d_model wide instead of E (SPEC §1.3).
* standard form (d_model > E): X_h = Q_h from a cuBLAS projection, Y_h = K_h, no bias.

The op layer (timellm_fast/reprogramming.py) builds X, Y, c and V with GEMMs; the kernels never see a
projection weight. Layouts (every tensor has unit stride along its last axis):

    x    [R, *]       head h reads columns h·x_head_stride + [0, D) (x_head_stride 0: factorized)
    mc   [H, W, S']   the prototype side, transposed: rows [0, D) hold Y_hᵀ, row D the bias c_h
                      (factorized; W = D + 1), or W = D = E rows of K_hᵀ (standard). Rows run along
                      the prototypes, so a block of them, its bias included, is read with 16-byte
                      loads: the row stride is a multiple of 8 (S' = S rounded up to 8)
    v    [S, H, E]
    out  [R, H·E]     heads merged: what the output projection reads
    lse  [H, R]       fp32, base 2

The kernels, by file:

* attention_forward.py: the forward (online softmax over the prototypes) and the dropout-mask
  debug kernel, with their launchers attention_forward and dropout_keep_mask;
* attention_backward.py: delta, the prototype-stationary and the row-stationary backward kernels,
  launched by attention_backward;
* prototype_side.py: mc from projected keys and its backward (prototype_logits,
  prototype_logits_backward);
* attention_device.py: the @triton.jit helpers they share (operand loads, dot-operand rounding,
  the Philox keep mask, the exponentials);
* attention_form.py: the core's form (CoreForm: factorized or standard, its widths), decided once
  per call and passed whole to the launchers, and which calls have a kernel (unsupported_reason);
* attention_tiles.py: the tiles as data and the choice of a configuration per launch.
"""
from __future__ import annotations

from typing import List

import torch

from .aot import aot_config
from .attention_backward import (CoreGradients, attention_backward, attention_bwd_delta_kernel,
                                 attention_bwd_protos_kernel, attention_bwd_rows_kernel)
from .attention_forward import attention_forward, attention_fwd_kernel, dropout_keep_mask, dropout_keep_mask_kernel
from .attention_form import CoreForm, core_form, standard_form, unsupported_reason
from .attention_tiles import CONFIG_TABLE, PROTOTYPE_ALIGN
from .prototype_side import (prototype_logits, prototype_logits_backward, prototype_logits_bwd_kernel,
                             prototype_logits_kernel)

__all__ = ["PROTOTYPE_ALIGN", "CoreForm", "CoreGradients", "aot_configs", "attention_backward", "attention_forward",
           "core_form", "dropout_keep_mask", "prototype_logits", "prototype_logits_backward", "standard_form",
           "unsupported_reason"]

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
#: integer arguments that SPEC §2 shapes make multiples of 16 (so the JIT specializes them there):
#: head widths, row counts (B'·64), strides of the row-side operands and of V, the Philox row group
#: (a multiple of 128). S = 1000, H = 8 and mc's strides (multiples of S' = 1000) are not; the kernels
#: know mc's row stride is a multiple of PROTOTYPE_ALIGN.
DIVISIBLE_BY_16 = ("R", "D", "E", "DX_COLS", "stride_x_r", "x_head_stride", "stride_v_s", "stride_v_h",
                   "stride_dx_r", "stride_dx_h", "rows_per_chunk", "rows_per_group")


def aot_configs() -> List[dict]:
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
