"""ReprogrammingLayer, the drop-in nn.Module for Time-LLM's reprogramming layer (docs/spec.md §1.2, §4.1):
which path a call takes, input checks, and Time-LLM's forward through the submodules.

A call with plain submodules (fused_parameters) is one fused op on the Triton path
(timellm_fast.reprogramming_op: reprogramming_layer in training, attention_core on the prototype
side at inference) and PyTorch's SDPA-fold or Time-LLM's materialized form on the eager path
(timellm_fast.reference). Anything else goes through the submodules' calls, with the fused core
on their Q, K and V where that is exact.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch, validation
from .cache import reused
from .reference import (attention_materialized, attention_sdpa_folded, reprogramming_reference,
                        reprogramming_sdpa_fold)
from .reprogramming_op import (align_prototypes, attention_core, attn_kernels, core_form, draw_seed_tensor, in_dtype,
                               project_key_value, prototype_operands, query_operand, reprogramming_layer,
                               standard_form)

OP_NAME = "reprogramming_attention"


_PROJECTIONS = ("query_projection", "key_projection", "value_projection", "out_projection")


def fused_parameters(layer: "ReprogrammingLayer") -> Optional[tuple]:
    """(wq, bq, wk, bk, wv, bv, wo, bo, dropout) where the fused layer computes what the original's
    submodule calls compute: each projection a plain nn.Linear with bias (dispatch.plain) of the
    layer's shapes, the dropout a plain nn.Dropout, no global module hook; else None (the layer
    then computes through its submodules). Asked on every call: hooks can come at any time."""
    modules = layer._modules
    q, k, v, o = (modules.get(name) for name in _PROJECTIONS)
    dropout = modules.get("dropout")
    plain, Linear = dispatch.plain, nn.Linear
    if not (plain(q, Linear) and plain(k, Linear) and plain(v, Linear) and plain(o, Linear)
            and plain(dropout, nn.Dropout)) or dispatch.global_module_hooks():
        return None
    wq, bq, wk, bk, wv, bv, wo, bo = q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, o.weight, o.bias
    HE = layer.n_heads * layer.d_keys
    if (bq is None or bk is None or bv is None or bo is None or wq.shape != (HE, layer.d_model)
            or wk.shape != (HE, layer.d_llm) or wv.shape != (HE, layer.d_llm) or wo.shape != (layer.d_llm, HE)):
        return None  # another structure than the constructor's: the submodules know what they compute
    return wq, bq, wk, bk, wv, bv, wo, bo, dropout


def check_inputs(layer: "ReprogrammingLayer", target, source, value, weight: torch.Tensor) -> Tuple[torch.dtype, bool]:
    """(the working dtype, whether autocast is on for target's device) after checking the inputs;
    every error names the argument and what was expected. The working dtype is the autocast dtype
    where autocast casts, as it would for nn.Linear (float64 is left alone), else the inputs'."""
    validation.float_tensor("target", target, 3, "[B', L, d_model]")
    validation.float_tensor("source", source, 2, "[S, d_llm]")
    validation.float_tensor("value", value, 2, "[S, d_llm]")
    if target.shape[-1] != layer.d_model:
        raise ValueError(f"target must have d_model={layer.d_model} features in its last dim, "
                         f"got shape {tuple(target.shape)}")
    for name, t in (("source", source), ("value", value)):
        if t.shape[-1] != layer.d_llm:
            raise ValueError(f"{name} must have d_llm={layer.d_llm} features in its last dim, got shape {tuple(t.shape)}")
    if source.shape[0] != value.shape[0]:
        raise ValueError(f"value must have as many rows (prototypes S) as source: source has "
                         f"{source.shape[0]}, value has {value.shape[0]}")
    if source.shape[0] == 0:
        raise ValueError("source must have at least one prototype row (S >= 1), got S = 0")
    validation.same_device("source", source, "target", target)
    validation.same_device("value", value, "target", target)
    validation.same_device("target", target, "the layer's weights", weight)
    device_type = target.device.type
    autocast_on = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast_on and target.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type), autocast_on  # autocast casts everything to one dtype
    for name, t in (("target", target), ("source", source), ("value", value)):
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the layer's weights are {weight.dtype}; "
                            f"convert one of them (or run under torch.autocast)")
    return target.dtype, autocast_on


def materializes_attention(dropout_p: float, needs_grad: bool, device: torch.device) -> bool:
    """Whether the eager path takes Time-LLM's materialized form rather than SDPA: dropout acts on
    A; on a CPU in training PyTorch's fused SDPA has no double backward, which the einsum form has."""
    return dropout_p > 0 or (needs_grad and device.type == "cpu")


class ReprogrammingLayer(nn.Module):
    """Drop-in for Time-LLM's ReprogrammingLayer: same constructor, submodules and state-dict keys.

    Where its submodules are plain (fused_parameters: nn.Linear projections with bias, an
    nn.Dropout, no hooks or overridden forwards) the whole layer is one fused op whose attention
    dropout follows the ``dropout`` module's ``p`` and ``training``. Anything else (hooks,
    hook-based weight_norm / spectral_norm, adapters, FSDP2 or DeepSpeed wrappers, another
    dropout module) computes through the submodules' own calls, as the original does, with the
    fused attention core on Q, K, V where it is exact; forward-mode AD and torch.func transforms
    run the original's math.

    The fused kernels compute fp32 inputs with IEEE fp32 dot products; `allow_tf32=True` sends fp32
    on a GPU to PyTorch's SDPA instead, which runs fp32 on tensor cores. `deterministic=True` makes the fused backward
    bitwise reproducible (fixed-order reductions instead of fp32 atomics, at 8·D + 6·E instead of
    6·D + 4·E MMA FLOPs per element); it is also on whenever
    ``torch.use_deterministic_algorithms(True)`` is. Inside a :func:`timellm_fast.reuse_prototypes`
    block the prototype side is computed once and reused while it needs no autograd graph.
    """

    def __init__(self, d_model, n_heads, d_keys=None, d_llm=None, attention_dropout=0.1, *, allow_tf32=False,
                 deterministic=False):
        super().__init__()
        d_model = validation.positive_int("d_model", d_model)
        n_heads = validation.positive_int("n_heads", n_heads)
        if d_llm is None:
            raise ValueError("d_llm (the LLM's embedding width, e.g. 768 or 4096) is required")
        d_llm = validation.positive_int("d_llm", d_llm)
        if d_keys is None or (not isinstance(d_keys, bool) and d_keys == 0):  # Time-LLM: d_keys or d_model // n_heads
            d_keys = d_model // n_heads
            if d_keys <= 0:
                raise ValueError(f"d_keys defaults to d_model // n_heads = {d_model} // {n_heads} = 0; "
                                 f"pass d_keys explicitly")
        d_keys = validation.positive_int("d_keys", d_keys)
        self.d_model, self.d_keys, self.d_llm = d_model, d_keys, d_llm
        self.n_heads = n_heads
        self.allow_tf32 = bool(allow_tf32)
        self.deterministic = bool(deterministic)
        self.query_projection = nn.Linear(d_model, d_keys * n_heads)
        self.key_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.value_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.out_projection = nn.Linear(d_keys * n_heads, d_llm)
        self.dropout = nn.Dropout(validation.dropout_prob("attention_dropout", attention_dropout))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, d_keys={self.d_keys}, d_llm={self.d_llm}"

    def _deterministic(self) -> bool:
        """Fixed-order reductions in the fused backward: asked for, or by torch.use_deterministic_algorithms."""
        return self.deterministic or torch.are_deterministic_algorithms_enabled()

    def forward(self, target: torch.Tensor, source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """target: [B', L, d_model], source: [S, d_llm], value: [S, d_llm] -> [B', L, d_llm]."""
        fused = fused_parameters(self)
        if fused is None:
            return self._forward_through_submodules(target, source, value)
        *params, dropout = fused
        if params[0].is_meta and isinstance(target, torch.Tensor) and target.is_meta:  # shapes only: the original's ops
            return self._forward_through_submodules(target, source, value)
        dtype, autocast_on = check_inputs(self, target, source, value, params[0])
        dropout_p = dropout.p if dropout.training else 0.0
        if dropout_p.__class__ is not float or not 0.0 <= dropout_p < 1.0:  # the usual value passes unconverted
            dropout_p = validation.dropout_prob("dropout.p", dropout_p)
        if dropout_p >= 1.0 or dispatch.transform_active():  # everything dropped / no kernel rule for it
            return self._forward_through_submodules(target, source, value)
        device = target.device
        form = reason = None
        if attn_kernels is not None:  # without Triton, dispatch.choose gives its import error as the reason
            form = core_form(self.d_model, self.d_keys)
            reason = attn_kernels.unsupported_reason(dtype, form, source.shape[0], dropout_p > 0.0, device,
                                                     self.allow_tf32)
        path = dispatch.choose(OP_NAME, device, reason)
        if autocast_on:  # the operands are cast here, once; what runs below must not cast them again
            with torch.autocast(device.type, enabled=False):
                return self._compute(path, form, target, source, value, params, dtype, dropout_p)
        return self._compute(path, form, target, source, value, params, dtype, dropout_p)

    def _compute(self, path: str, form, target: torch.Tensor, source: torch.Tensor, value: torch.Tensor,
                 params: list, dtype: torch.dtype, dropout_p: float) -> torch.Tensor:  # out: [B', L, d_llm]
        """The fused layer on `path` (the core in `form` on the Triton path) with its operands in the
        working dtype."""
        wq, bq, wk, bk, wv, bv, wo, bo = params
        if (dtype == target.dtype == source.dtype == value.dtype == wq.dtype == bq.dtype == wk.dtype == bk.dtype
                == wv.dtype == bv.dtype == wo.dtype == bo.dtype):  # nothing to cast (no dispatcher calls)
            target_c, source_c, value_c = target, source, value
        else:
            wq, bq, wk, bk, wv, bv, wo, bo = (in_dtype(t, dtype) for t in params)
            target_c, source_c = in_dtype(target, dtype), in_dtype(source, dtype)
            value_c = source_c if value is source else in_dtype(value, dtype)
        H = self.n_heads
        # in training the first test decides (target is an activation that requires grad)
        needs_grad = torch.is_grad_enabled() and (target.requires_grad or source.requires_grad or value.requires_grad
                                                  or any(t.requires_grad for t in params))
        if path == "triton":
            deterministic = self._deterministic()
            if needs_grad:  # the whole layer as one autograd node, [B', L, *] in and out
                return reprogramming_layer(target_c, source_c, value_c, wq, bq, wk, bk, wv, bv, wo, bo, H, dropout_p,
                                           draw_seed_tensor(dropout_p, target.device), self.allow_tf32,
                                           deterministic)[0]
            Bp, L, DM = target.shape
            side = reused(self, (source, value) + tuple(params[:6]), (dtype, "triton"),
                          lambda: prototype_operands(source_c, value_c, wq, bq, wk, bk, wv, bv, H, form))
            heads_out = attention_core(query_operand(target_c.reshape(Bp * L, DM), wq, bq, form), side.mc, side.v,
                                       form, dropout_p, self.allow_tf32, deterministic)  # [R, H*E]
            return F.linear(heads_out, wo, bo).view(Bp, L, wo.shape[0])  # -1 is ambiguous when B'·L = 0
        if materializes_attention(dropout_p, needs_grad, target.device):
            return reprogramming_reference(target_c, source_c, value_c, wq, bq, wk, bk, wv, bv, wo, bo, H,
                                           dropout_p=dropout_p, training=True)

        def key_value():  # kv: [S, 2·H·E]
            return project_key_value(source_c, value_c, wk, bk, wv, bv)

        kv = key_value() if needs_grad else reused(self, (source, value) + tuple(params[:6]), (dtype, "eager"),
                                                   key_value)
        return reprogramming_sdpa_fold(target_c, source_c, value_c, wq, bq, wk, bk, wv, bv, wo, bo, H,
                                       key_value=kv.split(H * self.d_keys, dim=1))

    def _forward_through_submodules(self, target: torch.Tensor, source: torch.Tensor,
                                    value: torch.Tensor) -> torch.Tensor:
        """Time-LLM's forward, submodule call for submodule call (what hooks, adapters, sharded
        parameters and transforms see), with the fused attention core where it is exact."""
        q = self.query_projection(target)  # [B', L, H*E]
        k = self.key_projection(source)  # [S, H*E]
        v = self.value_projection(value)  # [S, H*E]
        return self.out_projection(self._attention(q, k, v))

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # [B', L, H*E]
        """softmax(Q·Kᵀ/√E) with the layer's dropout module, ·V, per head: the fused core (standard
        form) or SDPA where the dropout module is plain and its p < 1, else Time-LLM's einsum form
        calling the dropout module on A (also under forward AD, torch.func transforms, on the meta
        device and for operands of different dtypes, where only PyTorch's own ops apply)."""
        H, dropout = self.n_heads, self.dropout
        plain_dropout = dispatch.plain(dropout, nn.Dropout) and not dispatch.global_module_hooks()
        dropout_p = float(dropout.p) if plain_dropout and dropout.training else 0.0
        literal = None  # why only Time-LLM's einsum form applies
        if not plain_dropout:
            literal = "the dropout module has hooks or its own forward: it is called on the attention matrix"
        elif not 0.0 <= dropout_p < 1.0:
            literal = f"attention dropout p={dropout_p} drops everything"
        elif q.is_meta:
            literal = "the meta device"
        elif dispatch.transform_active():
            literal = "forward-mode AD or a torch.func transform is active (the kernels have no rule for it)"
        elif (q.dim() != 3 or k.dim() != 2 or v.dim() != 2 or not q.dtype == k.dtype == v.dtype or q.shape[-1] % H
              or not q.shape[-1] == k.shape[-1] == v.shape[-1] or k.shape[0] != v.shape[0]):
            literal = "the projections' outputs are not one dtype and shape"
        if literal is not None:
            dispatch.choose(OP_NAME, q.device, literal)  # recorded as eager; TIMELLM_FAST_BACKEND=triton raises
            return attention_materialized(q, k, v, H, dropout=dropout)
        Bp, L, HE = q.shape
        S, E = k.shape[0], HE // H
        form = reason = None
        if attn_kernels is not None:  # the standard form: Q, K, V come from the submodules
            form = standard_form(self.d_model, E)
            reason = attn_kernels.unsupported_reason(q.dtype, form, S, dropout_p > 0.0, q.device, self.allow_tf32)
        if dispatch.choose(OP_NAME, q.device, reason) == "triton":
            deterministic = self._deterministic()
            mc = align_prototypes(k.t().contiguous().view(H, E, S))  # Kᵀ per head: [H, E, S']
            heads = attention_core(q.reshape(Bp * L, HE).contiguous(), mc, v.reshape(S, H, E), form,
                                   dropout_p, self.allow_tf32, deterministic)  # [R, H*E]
            return heads.view(Bp, L, HE)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if materializes_attention(dropout_p, needs_grad, q.device):
            return attention_materialized(q, k, v, H, dropout=dropout)
        return attention_sdpa_folded(q.reshape(Bp * L, HE), k, v, H).view(Bp, L, HE)
