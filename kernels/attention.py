"""Fused cross-attention of Time-LLM's reprogramming layer on factorized logits: what the op layer
(timellm_fast/reprogramming_op.py) calls (bench/aot_configs.py lists every build its launchers
can choose).

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
  formed and the logit dots are d_model wide instead of E (docs/spec.md §1.3).
* standard form (d_model > E): X_h = Q_h from a cuBLAS projection, Y_h = K_h, no bias.

The op layer (timellm_fast/reprogramming_op.py) builds X, Y, c and V with GEMMs; the kernels never see a
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

from .attention_backward import CoreGradients, attention_backward
from .attention_form import CoreForm, core_form, standard_form, unsupported_reason
from .attention_forward import attention_forward, dropout_keep_mask
from .attention_tiles import PROTOTYPE_ALIGN
from .prototype_side import prototype_logits, prototype_logits_backward

__all__ = ["PROTOTYPE_ALIGN", "CoreForm", "CoreGradients", "attention_backward", "attention_forward",
           "core_form", "dropout_keep_mask", "prototype_logits", "prototype_logits_backward", "standard_form",
           "unsupported_reason"]
