"""ReprogrammingLayer: op (validation, dispatch, autograd) and the drop-in nn.Module (SPEC §1.2).

The Triton path splits the layer into GEMMs, which cuBLAS does best, and one fused attention
kernel that never materializes the [B', H, L, S] attention matrix:

    forward:  [K | V] = source·Wkᵀ+bk, value·Wvᵀ+bv   (one GEMM when source is value)
              O, lse = fused attention(target, Wq, bq, [K | V])   (Q is built inside the kernel)
              out = O·Woᵀ + bo
    backward: dO = dout·Wo, dWo, dbo                 (GEMMs)
              dQ, [dK | dV] = fused attention backward  (recomputes Q and P; same dropout mask)
              d target, dWq, dbq from dQ; d source, d value, dWk, dbk, dWv, dbv from dK, dV

The eager path runs the same math in PyTorch: `reprogramming_sdpa_fold` (no attention matrix)
when dropout is inactive, the literal reference when attention dropout has to be applied.
"""
from __future__ import annotations

import contextlib
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch, validation
from .cache import TensorCache
from .patch_embedding import draw_seed_tensor  # one dropout-seed rule for both ops
from .reference import reprogramming_reference, reprogramming_sdpa_fold

OP_NAME = "reprogramming_attention"


def working_dtype(target: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for the device (as nn.Linear would), else the input's."""
    device_type = target.device.type
    if torch.is_autocast_enabled(device_type) and target.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return target.dtype


def _kernels():
    from .kernels import reprogramming_attention

    return reprogramming_attention


def project_key_value(
    source: torch.Tensor,  # source: [S, d_llm]
    value: torch.Tensor,  # value: [S, d_llm]
    wk: torch.Tensor, bk: torch.Tensor,  # [H*E, d_llm], [H*E]
    wv: torch.Tensor, bv: torch.Tensor,  # [H*E, d_llm], [H*E]
) -> torch.Tensor:  # kv: [S, 2*H*E], K in the first H*E columns, V in the rest
    """K and V as one tensor: one GEMM when source is value (Time-LLM's case), and one gradient
    for the attention backward to hand back (split K and V would be concatenated again by
    autograd, one more copy)."""
    if source is value:
        return F.linear(source, torch.cat([wk, wv]), torch.cat([bk, bv]))
    return torch.cat([F.linear(source, wk, bk), F.linear(value, wv, bv)], dim=1)


# The fused attention core is a pair of torch.library custom ops, so torch.compile sees only
# their fake implementations (no graph break, no tracing into Triton) and torch.profiler shows
# them as timellm_fast::reprogramming_attention_fwd / _bwd. The GEMMs around the core (K/V and
# output projections) stay ordinary PyTorch ops with PyTorch's own autograd; the custom
# backward covers exactly what the kernel computes: Q = target·Wqᵀ + bq, softmax, dropout, ·V.
# In plain eager mode the same launchers and the same backward are reached through
# DirectAttention instead (dispatch.direct_launch): the custom op's dispatch is host time that
# the small official shapes cannot hide.

FWD_OP_NAME = "timellm_fast::reprogramming_attention_fwd"
BWD_OP_NAME = "timellm_fast::reprogramming_attention_bwd"


def _split_kv(kv: torch.Tensor, he: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """k, v: [S, H*E] views of kv [S, 2*H*E] with one row stride and unit column stride."""
    kv = kv if kv.stride(1) == 1 else kv.contiguous()
    return kv[:, :he], kv[:, he:]


def _launch_attention_forward(
    target_rows: torch.Tensor,  # target_rows: [R, DM]
    wq: torch.Tensor, bq: torch.Tensor,  # [H*E, DM], [H*E]
    kv: torch.Tensor,  # kv: [S, 2*H*E], K then V
    n_heads: int, dropout_p: float,
    seed: torch.Tensor,  # seed: [1] int64 on the device, read only when dropout_p > 0
    allow_tf32: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:  # (heads_out: [R, H*E], lse: [H, R] fp32, base 2)
    k, v = _split_kv(kv, wq.shape[0])
    return _kernels().attention_forward(
        target_rows.contiguous(), wq.contiguous(), bq.contiguous(), k, v, n_heads, dropout_p, seed, allow_tf32)


def _launch_attention_backward(
    target_rows: torch.Tensor,  # target_rows: [R, DM]
    wq: torch.Tensor, bq: torch.Tensor,  # [H*E, DM], [H*E]
    kv: torch.Tensor,  # kv: [S, 2*H*E], K then V
    grad_heads: torch.Tensor,  # grad_heads: [R, H*E], gradient of heads_out
    lse: torch.Tensor,  # lse: [H, R] fp32, the forward's
    n_heads: int, dropout_p: float, seed: torch.Tensor, allow_tf32: bool, need_dkv: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:  # (dq: [R, H*E], dkv: [S, 2*H*E] fp32, or [0] if not needed)
    k, v = _split_kv(kv, wq.shape[0])
    dq, dkv = _kernels().attention_backward(
        target_rows.contiguous(), wq.contiguous(), bq.contiguous(), k, v, grad_heads.contiguous(), lse,
        n_heads, dropout_p, seed, allow_tf32, need_dkv=need_dkv)
    return dq, (dkv if dkv is not None else lse.new_empty((0,)))


@torch.library.custom_op(FWD_OP_NAME, mutates_args=())
def attention_fwd_op(
    target_rows: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, kv: torch.Tensor,
    n_heads: int, dropout_p: float, seed: torch.Tensor, allow_tf32: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:  # shapes: _launch_attention_forward
    return _launch_attention_forward(target_rows, wq, bq, kv, n_heads, dropout_p, seed, allow_tf32)


@attention_fwd_op.register_fake
def _(target_rows, wq, bq, kv, n_heads, dropout_p, seed, allow_tf32):
    R = target_rows.shape[0]
    return (target_rows.new_empty((R, wq.shape[0])),
            target_rows.new_empty((n_heads, R), dtype=torch.float32))


@torch.library.custom_op(BWD_OP_NAME, mutates_args=())
def attention_bwd_op(
    target_rows: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, kv: torch.Tensor,
    grad_heads: torch.Tensor, lse: torch.Tensor,
    n_heads: int, dropout_p: float, seed: torch.Tensor, allow_tf32: bool, need_dkv: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:  # shapes: _launch_attention_backward
    return _launch_attention_backward(target_rows, wq, bq, kv, grad_heads, lse, n_heads, dropout_p, seed,
                                      allow_tf32, need_dkv)


@attention_bwd_op.register_fake
def _(target_rows, wq, bq, kv, grad_heads, lse, n_heads, dropout_p, seed, allow_tf32, need_dkv):
    R, HE = target_rows.shape[0], wq.shape[0]
    dkv = lse.new_empty((kv.shape[0], 2 * HE)) if need_dkv else lse.new_empty((0,))
    return target_rows.new_empty((R, HE)), dkv


def _setup_attention_context(ctx, inputs, output):
    target_rows, wq, bq, kv, n_heads, dropout_p, seed, allow_tf32 = inputs
    ctx.save_for_backward(target_rows, wq, bq, kv, output[1], seed)
    ctx.config = (n_heads, dropout_p, allow_tf32)
    ctx.direct = False  # backward through attention_bwd_op (DirectAttention sets True)
    # lse never receives a gradient: without this autograd would fill a zero [H, R] for it
    # on every backward (one more launch)
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, grad_heads, _grad_lse):
    if grad_heads is None:  # the attention output did not reach the loss
        return None, None, None, None, None, None, None, None
    target_rows, wq, bq, kv, lse, seed = ctx.saved_tensors
    n_heads, dropout_p, allow_tf32 = ctx.config
    need_target, need_wq, need_bq, need_kv = ctx.needs_input_grad[:4]
    args = (target_rows, wq, bq, kv, grad_heads, lse, n_heads, dropout_p, seed, allow_tf32, need_kv)
    dq, dkv = dispatch.backward_on_route(ctx.direct, BWD_OP_NAME, args, attention_bwd_op,
                                         _launch_attention_backward)  # [R, H*E], [S, 2*H*E] fp32
    d_target = dq.mm(wq) if need_target else None  # [R, DM]
    d_wq = dq.t().mm(target_rows) if need_wq else None  # [H*E, DM]
    d_bq = dq.sum(0) if need_bq else None  # [H*E]; torch sums half dtypes in fp32, rounds once
    d_kv = dkv.to(kv.dtype) if need_kv else None  # [S, 2*H*E]
    return d_target, d_wq, d_bq, d_kv, None, None, None, None


attention_fwd_op.register_autograd(_attention_backward, setup_context=_setup_attention_context)


class DirectAttention(torch.autograd.Function):
    """attention_fwd_op with its autograd, without torch.library's dispatch: the same launchers,
    the same saved tensors, the same backward. Used only where dispatch.direct_launch allows.
    (forward takes ctx itself: a separate setup_context makes every apply bind its arguments
    with inspect.signature, ~50 us of host time.)"""

    @staticmethod
    def forward(ctx, target_rows, wq, bq, kv, n_heads, dropout_p, seed, allow_tf32):
        inputs = (target_rows, wq, bq, kv, n_heads, dropout_p, seed, allow_tf32)
        with dispatch.profiled(FWD_OP_NAME):
            output = _launch_attention_forward(*inputs)
        _setup_attention_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        ctx.direct = True
        return output

    backward = staticmethod(_attention_backward)


def fused_attention(
    target_rows: torch.Tensor,  # target_rows: [R, DM]
    wq: torch.Tensor, bq: torch.Tensor,  # [H*E, DM], [H*E]
    kv: torch.Tensor,  # kv: [S, 2*H*E], K then V (project_key_value)
    n_heads: int, dropout_p: float = 0.0, allow_tf32: bool = False,
) -> torch.Tensor:  # heads_out: [R, H*E], heads merged
    """The fused attention core with its autograd, on the route dispatch.direct_launch picks.
    (Assumes the Triton path was chosen: the layer's forward does that.)"""
    args = (target_rows, wq, bq, kv, n_heads, dropout_p, draw_seed_tensor(dropout_p, target_rows.device),
            allow_tf32)
    heads_out, _ = dispatch.call_on_route(OP_NAME, FWD_OP_NAME, (target_rows, wq, bq, kv), args, attention_fwd_op,
                                          DirectAttention, _launch_attention_forward)
    return heads_out


def fused_reprogramming(
    target: torch.Tensor,  # target: [B', L, DM]
    kv: torch.Tensor,  # kv: [S, 2*H*E] (projected, maybe cached)
    wq: torch.Tensor, bq: torch.Tensor, wo: torch.Tensor, bo: torch.Tensor,
    n_heads: int, dropout_p: float, allow_tf32: bool,
) -> torch.Tensor:  # out: [B', L, d_llm]
    Bp, L, DM = target.shape
    heads_out = fused_attention(target.reshape(Bp * L, DM), wq, bq, kv, n_heads, dropout_p, allow_tf32)  # [R, H*E]
    return F.linear(heads_out, wo, bo).view(Bp, L, wo.shape[0])  # -1 is ambiguous when B'·L = 0


def check_inputs(layer: "ReprogrammingLayer", target, source, value) -> None:
    validation.float_tensor("target", target, 3, "[B', L, d_model]")
    validation.float_tensor("source", source, 2, "[S, d_llm]")
    validation.float_tensor("value", value, 2, "[S, d_llm]")
    if target.shape[-1] != layer.d_model:
        raise ValueError(f"target must have d_model={layer.d_model} features in its last dim, "
                         f"got shape {tuple(target.shape)}")
    for name, t in (("source", source), ("value", value)):
        if t.shape[-1] != layer.d_llm:
            raise ValueError(f"{name} must have d_llm={layer.d_llm} features in its last dim, "
                             f"got shape {tuple(t.shape)}")
    if source.shape[0] != value.shape[0]:
        raise ValueError(f"value must have as many rows (prototypes S) as source: source has "
                         f"{source.shape[0]}, value has {value.shape[0]}")
    if source.shape[0] == 0:
        raise ValueError("source must have at least one prototype row (S >= 1), got S = 0")
    validation.same_device("source", source, "target", target)
    validation.same_device("value", value, "target", target)
    weight = layer.query_projection.weight
    validation.same_device("target", target, "the layer's weights", weight)
    if torch.is_autocast_enabled(target.device.type) and target.dtype != torch.float64:
        return  # autocast casts everything to one dtype, as it would for nn.Linear
    for name, t in (("target", target), ("source", source), ("value", value)):
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the layer's weights are {weight.dtype}; "
                            f"convert one of them (or run under torch.autocast)")


class ReprogrammingLayer(nn.Module):
    """Drop-in for Time-LLM's ReprogrammingLayer: same constructor, submodules and state-dict keys.

    `allow_tf32=True` lets fp32 inputs use TF32 tensor cores in the fused kernel (faster, ~1e-3
    relative error); by default fp32 dots are IEEE. ``kv_cache_hits`` / ``kv_cache_misses`` count
    how often the no-grad path reused the K/V projections.
    """

    def __init__(self, d_model, n_heads, d_keys=None, d_llm=None, attention_dropout=0.1, *, allow_tf32=False):
        super().__init__()
        validation.positive_int("d_model", d_model)
        validation.positive_int("n_heads", n_heads)
        if d_llm is None:
            raise ValueError("d_llm (the LLM's embedding width, e.g. 768 or 4096) is required")
        validation.positive_int("d_llm", d_llm)
        if d_keys is None:
            d_keys = d_model // n_heads
            if d_keys <= 0:
                raise ValueError(f"d_keys defaults to d_model // n_heads = {d_model} // {n_heads} = 0; "
                                 f"pass d_keys explicitly")
        validation.positive_int("d_keys", d_keys)
        validation.dropout_prob("attention_dropout", attention_dropout)
        self.d_model, self.d_keys, self.d_llm = d_model, d_keys, d_llm
        self.n_heads = n_heads
        self.allow_tf32 = bool(allow_tf32)
        self.query_projection = nn.Linear(d_model, d_keys * n_heads)
        self.key_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.value_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.out_projection = nn.Linear(d_keys * n_heads, d_llm)
        self.dropout = nn.Dropout(attention_dropout)
        self._kv_cache = TensorCache()  # K/V projections, reused when no autograd graph is needed

    @property
    def kv_cache_hits(self) -> int:
        return self._kv_cache.hits

    @property
    def kv_cache_misses(self) -> int:
        return self._kv_cache.misses

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, d_keys={self.d_keys}, d_llm={self.d_llm}"

    def forward(self, target: torch.Tensor, source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """target: [B', L, d_model], source: [S, d_llm], value: [S, d_llm] -> [B', L, d_llm]."""
        check_inputs(self, target, source, value)
        dtype = working_dtype(target)
        params = (self.query_projection.weight, self.query_projection.bias,
                  self.key_projection.weight, self.key_projection.bias,
                  self.value_projection.weight, self.value_projection.bias,
                  self.out_projection.weight, self.out_projection.bias)
        dropout_p = validation.dropout_prob("dropout.p", self.dropout.p) if self.training else 0.0
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (target, source, value) + params)

        def cast(t):  # .to() is a dispatcher call even when it has nothing to do
            return t if t.dtype == dtype else t.to(dtype)

        wq, bq, wk, bk, wv, bv, wo, bo = (cast(t) for t in params)
        target_c, source_c = cast(target), cast(source)
        value_c = source_c if value is source else cast(value)
        H, E = self.n_heads, self.d_keys
        rows, protos = target.shape[0] * target.shape[1], source.shape[0]

        reason = None
        if dispatch.triton_import_error() is None:
            reason = _kernels().unsupported_reason(dtype, E, protos, rows, dropout_p > 0.0, target.device,
                                                   self.allow_tf32)
        path = dispatch.choose(OP_NAME, target.device, reason)

        def key_value():
            if needs_grad:
                return project_key_value(source_c, value_c, wk, bk, wv, bv)
            watched = (source, value) + params[2:6]  # what K and V are computed from
            return self._kv_cache.get(watched, (dtype,),
                                      lambda: project_key_value(source_c, value_c, wk, bk, wv, bv))

        autocast_on = torch.is_autocast_enabled(target.device.type)
        with torch.autocast(target.device.type, enabled=False) if autocast_on else contextlib.nullcontext():
            if path == "triton":
                return fused_reprogramming(target_c, key_value(), wq, bq, wo, bo, H, dropout_p,
                                           self.allow_tf32)
            if dropout_p > 0:
                return reprogramming_reference(target_c, source_c, value_c, wq, bq, wk, bk, wv, bv, wo, bo, H,
                                               dropout_p=dropout_p, training=True)
            return reprogramming_sdpa_fold(target_c, source_c, value_c, wq, bq, wk, bk, wv, bv, wo, bo, H,
                                           key_value=key_value().split(H * E, dim=1))
