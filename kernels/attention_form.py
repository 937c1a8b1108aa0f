"""The fused core's form: how it reads its operands, decided once per call from the layer's widths,
and whether a call has a kernel at all.

Per head h the kernels compute logits scale·(X_h·Y_hᵀ + c_h) (kernels/attention.py):

* factorized (d_model <= E and <= 32: every Time-LLM shape): X_h = target for every head (its
  d_model columns padded to BLOCK_D), [Y_hᵀ; c_h] = (K_h·[Wq_h | 0 | bq_h])ᵀ, so the logit dots are
  BLOCK_D wide instead of E (docs/spec.md §1.3);
* standard: X_h = Q_h (columns h·E + [0, E) of Q), Y_h = K_h, no bias, E-wide dots. The layer
  also takes it on Q, K, V from its submodules' own calls, whatever d_model.

A :class:`CoreForm` travels whole from the op layer to the launchers; across a custom op's
boundary as its four fields.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ._environment import interpreting
from .attention_tiles import (BLOCK_PAIRS, FACTORIZED_BLOCK_D, MAX_BLOCK_R, MAX_HEAD_DIM, MIN_HEAD_DIM,
                              TURING_MAX_BLOCK_E, arch_class, block_e_for, rows_per_philox_group, select_config)


class CoreForm(NamedTuple):
    """How the fused core reads its operands (module docstring)."""
    d_model: int  # the layer's d_model: the factorized row operand's own columns
    head_dim: int  # E
    factorized: bool
    block_d: int  # BLOCK_D, the tile width of the logit dots (d_model padded, or E padded)

    @property
    def block_e(self) -> int:  # BLOCK_E: E padded to a tile width
        return block_e_for(self.head_dim)

    @property
    def d_logit(self) -> int:  # D, the width the kernels take the logit dots over
        return self.block_d if self.factorized else self.head_dim

    @property
    def x_head_stride(self) -> int:  # where head h's columns of x start: 0 (all heads read target) or h·E
        return 0 if self.factorized else self.head_dim

    @property
    def scale(self) -> float:  # the logits' factor
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def keys_first(self) -> bool:
        """Factorized: whether mc is formed from the projected keys (mc_h = [Wq_h | 0 | bq_h]ᵀ·K_hᵀ,
        prototype_logits_kernel) rather than from G_h = [Wq_h | 0 | bq_h]ᵀ·Wk_h without K. The K
        projection costs S·d_llm·H·E multiply-adds, G's route S·d_llm·H·W: where E <= W = BLOCK_D + 1
        projecting K is no more work, and it is one GEMM fewer in each direction."""
        return self.factorized and self.head_dim <= self.block_d + 1


def is_factorized(d_model: int, head_dim: int) -> bool:
    """The factorized form's logit dots are d_model wide, the standard form's E wide (docs/spec.md §1.3)."""
    return d_model <= head_dim and d_model <= FACTORIZED_BLOCK_D[-1]


def core_form(d_model: int, head_dim: int) -> CoreForm:
    """The form of the layer's fused op for its widths: factorized where it can be."""
    if not is_factorized(d_model, head_dim):
        return standard_form(d_model, head_dim)
    block_e = block_e_for(head_dim)  # no pair beyond the widest head: unsupported_reason names it
    block_d = next((width for width in FACTORIZED_BLOCK_D if d_model <= width and (width, block_e) in BLOCK_PAIRS),
                   block_e)
    return CoreForm(d_model, head_dim, True, block_d)


def standard_form(d_model: int, head_dim: int) -> CoreForm:
    """The standard form: x = Q [R, H*E], mc = Kᵀ, E-wide logit dots."""
    return CoreForm(d_model, head_dim, False, block_e_for(head_dim))


def no_config_reason(data_dtype: torch.dtype, form: CoreForm, arch: int) -> str:
    """Why a GPU generation has no configuration for this dtype and form (it then runs eager)."""
    if arch == 75 and data_dtype != torch.float16:
        return (f"{data_dtype} on Turing (sm_75) runs eager: no bf16 tensor cores, and FMA kernels lose to "
                f"SDPA there (float16 takes the kernel)")
    if arch == 75 and form.block_e > TURING_MAX_BLOCK_E:
        return (f"head width d_keys={form.head_dim} on Turing (sm_75) runs eager: its MMA lowering spills above "
                f"{TURING_MAX_BLOCK_E}")
    if data_dtype == torch.float32 and form.block_d not in FACTORIZED_BLOCK_D:
        return (f"float32 with {form.block_d}-wide logit dots (d_model={form.d_model}, d_keys={form.head_dim}) "
                f"runs eager: the FMA kernels spill at that width (bf16 and fp16 take the kernel)")
    return f"no kernel configuration for {data_dtype}, d_keys={form.head_dim}, d_model={form.d_model} on sm_{arch}"


def unsupported_reason(data_dtype: torch.dtype, form: CoreForm, num_protos: int, has_dropout: bool,
                       device: Optional[torch.device] = None, allow_tf32: bool = False) -> Optional[str]:
    """Why this call has no kernel (the op layer then runs eager), or None. S matters only for the
    dropout counters."""
    if data_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {data_dtype} has no kernel (float32, bfloat16, float16 only)"
    if not MIN_HEAD_DIM <= form.head_dim <= MAX_HEAD_DIM:
        return f"head width d_keys={form.head_dim} is outside the kernel's {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    if has_dropout and rows_per_philox_group(num_protos) < MAX_BLOCK_R:
        return f"S={num_protos} prototypes is too many for the dropout counters"
    if device is not None:
        gpu = device.type == "cuda" and not interpreting()
        if gpu and allow_tf32 and data_dtype == torch.float32:
            return "allow_tf32: TF32 runs eager (PyTorch's SDPA runs fp32 on tensor cores); the kernels are IEEE fp32"
        roles = ("fwd", "bwd_protos", "bwd_rows")
        if form.keys_first:
            roles += ("prototype_logits", "prototype_logits_bwd")  # the factorized mc from projected keys
        for role in roles:
            if select_config(role, data_dtype, form, has_dropout, device) is None:
                return no_config_reason(data_dtype, form, arch_class(device) if gpu else 80)
    return None
