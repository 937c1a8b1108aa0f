"""ReprogrammingLayer: op (validation, dispatch, autograd) and the drop-in nn.Module (SPEC §1.2).

The Triton path splits the layer into GEMMs, which cuBLAS does best, and one fused attention core
that never materializes the [B', H, L, S] attention matrix. Where d_model <= E (every Time-LLM
shape) the core runs on the factorized logits of SPEC §1.3, Z_h = s·(target·M_h + c_h): Q never
exists, and where E > W = BLOCK_D + 1 neither does K (the prototype side is built straight from `source`):

    forward:  G_h = [Wq_h | 0 | bq_h]ᵀ·Wk_h, g_h = [Wq_h | 0 | bq_h]ᵀ·bk_h   (tiny GEMMs)
              mc = G·sourceᵀ + g      [H, W, S]: per head Y_hᵀ = (K_h·Wq_h)ᵀ, then c_hᵀ = (K_h·bq_h)ᵀ
              (where E <= W, as much work and one GEMM fewer: K = source·Wkᵀ + bk, mc_h = [Wq_h | 0 | bq_h]ᵀ·K_hᵀ)
              v  = value·Wvᵀ + bv     [S, H, E]
              O, lse = fused core(target, mc, v)     (d_model-wide logit dots, softmax, dropout, ·V)
              out = O·Woᵀ + bo
    backward: the core's kernels hand back d target, d mc, d v, and the layer's own backward takes
              them through the GEMMs above to every weight, `source` and `value` (in training the
              whole layer is one autograd node: reprogramming_op below).

Where d_model > E the same core runs the standard form: X = Q = target·Wqᵀ + bq, mc = K.
The eager path runs the same math in PyTorch: `reprogramming_sdpa_fold` (no attention matrix)
when dropout is inactive, the literal reference when attention dropout has to be applied.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch, validation
from .cache import TensorCache
from .patch_embedding import draw_seed_tensor  # one dropout-seed rule for both ops
from .reference import reprogramming_reference, reprogramming_sdpa_fold
from .triton_op import TritonOp

if dispatch.triton_import_error() is None:
    from .kernels import attention as attn_kernels
else:  # without Triton dispatch.choose sends every call to the eager path, which needs no kernel
    attn_kernels = None

OP_NAME = "reprogramming_attention"


def project_key_value(
    source: torch.Tensor,  # source: [S, d_llm]
    value: torch.Tensor,  # value: [S, d_llm]
    wk: torch.Tensor, bk: torch.Tensor,  # [H*E, d_llm], [H*E]
    wv: torch.Tensor, bv: torch.Tensor,  # [H*E, d_llm], [H*E]
) -> torch.Tensor:  # kv: [S, 2*H*E], K in the first H*E columns, V in the rest
    """K and V as one tensor (the eager path's K/V cache): one GEMM when source is value."""
    if source is value:
        return F.linear(source, torch.cat([wk, wv]), torch.cat([bk, bv]))
    return torch.cat([F.linear(source, wk, bk), F.linear(value, wv, bv)], dim=1)


class CoreForm(NamedTuple):
    """How the fused core reads its operands (kernels/reprogramming_attention.py's docstring)."""
    d_logit: int  # D, the width of the logit dots
    x_head_stride: int  # 0: every head reads the same target columns (factorized); E: Q's head columns
    has_bias: bool  # the factorized form's c_h column
    scale: float  # 1/sqrt(E)
    d_model: int


_CORE_FORMS: dict = {}


def core_form(d_model: int, n_heads: int, head_dim: int) -> CoreForm:
    """The core's form for these widths (memoized: asked forward and backward on every call;
    not for the symbolic widths of a trace, which do not hash)."""
    key = (d_model, n_heads, head_dim)
    symbolic = not (d_model.__class__ is n_heads.__class__ is head_dim.__class__ is int)
    form = None if symbolic else _CORE_FORMS.get(key)
    if form is None:
        scale = 1.0 / math.sqrt(head_dim)
        if attn_kernels.is_factorized(d_model, head_dim):
            form = CoreForm(attn_kernels.block_d_for(d_model, head_dim), 0, True, scale, d_model)
        else:
            form = CoreForm(head_dim, head_dim, False, scale, d_model)
        if not symbolic:
            _CORE_FORMS[key] = form
    return form


_ZEROS: dict = {}


def _zeros(like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A zero tensor for padding operands: cached per (shape, dtype, device), except while
    torch.compile traces or a CUDA graph captures (a tensor made there is a fake, or is filled only
    when the graph replays)."""
    device = like.device
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return like.new_zeros(shape)
    key = (shape, like.dtype, device)
    zeros = _ZEROS.get(key)
    if zeros is None:
        zeros = _ZEROS[key] = like.new_zeros(shape)
    return zeros


def factorized_query_side(wq: torch.Tensor, bq: torch.Tensor, block_d: int) -> torch.Tensor:
    """wqb: [H*E, BLOCK_D + 1], row h·E + e [Wq (d_model columns) | zeros up to BLOCK_D | bq], so that
    with wqb_h its rows of head h (wqb.view(H, E, W)[h]), wqb_hᵀ·K_hᵀ is head h's block of the factorized
    mc operand: rows Y_hᵀ = (K_h·Wq_h)ᵀ, zero rows for the padding of d_model, and c_hᵀ = (K_h·bq_h)ᵀ.
    Kept 2-D: its head-split views are made where they are used (each view is a dispatcher call)."""
    HE, DM = wq.shape
    if block_d > DM:
        return torch.cat([wq, _zeros(wq, (HE, block_d - DM)), bq.view(HE, 1)], 1)
    return torch.cat([wq, bq.view(HE, 1)], 1)


def _align_prototypes(mc: torch.Tensor) -> torch.Tensor:
    """mc [H, W, S] with its prototype axis padded to a multiple of PROTOTYPE_ALIGN (S = 1000 needs none)."""
    pad = -mc.shape[2] % attn_kernels.PROTOTYPE_ALIGN
    return F.pad(mc, (0, pad)) if pad else mc


class PrototypeSide(NamedTuple):
    """The core's prototype-side operands (shared by every row) and what their backward reuses."""
    mc: torch.Tensor  # mc: [H, W, S'], the prototype side of the logits (factorized) or Kᵀ (standard)
    v: torch.Tensor  # v: [S, H, E]
    wqb: Optional[torch.Tensor]  # wqb: [H*E, W] (factorized_query_side); None on the standard form
    # key_side: what mc was formed from on the factorized form, K [S, H*E] (attn_kernels.keys_first)
    # or G [H, W, d_llm] with G_h = wqb_hᵀ·Wk_h; None on the standard form
    key_side: Optional[torch.Tensor]


def heads_of_query_side(wqb: torch.Tensor, n_heads: int) -> torch.Tensor:  # wqbᵀ per head: [H, W, E]
    """wqb [H*E, W] (contiguous) as the per-head transposes wqb_hᵀ, in one call (a view and a transpose are two)."""
    HE, W = wqb.shape
    E = HE // n_heads
    return wqb.as_strided((n_heads, W, E), (E * W, 1, W))


def keys_transposed(k: torch.Tensor, n_heads: int) -> torch.Tensor:  # Kᵀ per head: [H, E, S]
    """k [S, H*E] as K_hᵀ per head, in one call where its columns are unit-strided (a view and a
    permute are two)."""
    S, HE = k.shape
    E = HE // n_heads
    if k.stride(1) == 1:
        return k.as_strided((n_heads, E, S), (E, 1, k.stride(0)))
    return k.reshape(S, n_heads, E).permute(1, 2, 0)


def mc_from_keys(wqb: torch.Tensor, k: torch.Tensor, n_heads: int) -> torch.Tensor:  # mc: [H, W, S]
    """The factorized mc from projected keys k [S, H*E]: mc_h = wqb_hᵀ·K_hᵀ, one batched GEMM of
    2·S·E·H·W FLOPs that writes the kernels' transposed layout."""
    return torch.bmm(heads_of_query_side(wqb, n_heads), keys_transposed(k, n_heads))


def prototype_operands(
    source: torch.Tensor, value: torch.Tensor,  # [S, d_llm] each
    wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor,
    n_heads: int, form: CoreForm, keys_kernel: bool = False,
) -> PrototypeSide:
    """The prototype side (cached at inference by the layer).

    Factorized: mc_h = (K_h·wqb_h)ᵀ, either from K (attn_kernels.keys_first) or, where E > BLOCK_D + 1, as
    G·sourceᵀ + g with G_h = wqb_hᵀ·Wk_h and g_h = wqb_hᵀ·bk_h without forming K: 2·S·d_llm·H·(BLOCK_D + 1)
    FLOPs instead of the K projection's 2·S·d_llm·H·E (SPEC §1.3), one GEMM whose output is already the
    kernels' transposed layout. Standard: mc = Kᵀ.

    keys_kernel: mc and wqb from K by attn_kernels.prototype_logits, one launch (the layer op's
    forward launcher, which runs in training on every call); else by the concatenation and the
    batched GEMM mc_from_keys (the inference cache, built once per prototype set, which
    torch.compile traces)."""
    S, d_llm = source.shape
    H, E = n_heads, wk.shape[0] // n_heads
    v = F.linear(value, wv, bv).view(S, H, E)
    if not form.has_bias:
        return PrototypeSide(_align_prototypes(torch.addmm(bk.view(H * E, 1), wk, source.t()).view(H, E, S)), v,
                             None, None)
    keys_first = attn_kernels.keys_first(form.d_model, E)
    if keys_first:
        k = F.linear(source, wk, bk)  # K: [S, H*E]
        if keys_kernel:
            mc, wqb = attn_kernels.prototype_logits(wq, bq, k, H)
            return PrototypeSide(mc, v, wqb, k)
    wqb = factorized_query_side(wq, bq, form.d_logit)  # [H*E, W]
    if keys_first:
        return PrototypeSide(_align_prototypes(mc_from_keys(wqb, k, H)), v, wqb, k)
    wqb_t = heads_of_query_side(wqb, H)  # [H, W, E]
    g = torch.bmm(wqb_t, wk.view(H, E, d_llm))  # [H, W, d_llm]
    g_bias = torch.bmm(wqb_t, bk.view(H, E, 1))  # [H, W, 1]
    W = g.shape[1]
    mc = torch.addmm(g_bias.view(H * W, 1), g.view(H * W, d_llm), source.t())  # [H*W, S]
    return PrototypeSide(_align_prototypes(mc.view(H, W, S)), v, wqb, g)


def padded_rows(target_rows: torch.Tensor, form: CoreForm) -> torch.Tensor:  # x: [R, BLOCK_D]
    """The factorized form's row operand: target with zero columns up to BLOCK_D, so that every row
    is a whole, 16-aligned tile row."""
    pad = form.d_logit - target_rows.shape[1]
    if pad:
        return F.pad(target_rows, (0, pad))
    return target_rows if target_rows.is_contiguous() else target_rows.contiguous()


def query_operand(target_rows: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, form: CoreForm) -> torch.Tensor:
    """x: the core's row-side operand: padded_rows (factorized), or Q [R, H*E] (standard)."""
    return padded_rows(target_rows, form) if form.has_bias else F.linear(target_rows, wq, bq)


def core_from_keys(
    target_rows: torch.Tensor,  # target_rows: [R, DM]
    wq: torch.Tensor, bq: torch.Tensor,  # [H*E, DM], [H*E]
    kv: torch.Tensor,  # kv: [S, 2*H*E], K then V
    n_heads: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, CoreForm]:  # (x, mc, v, form)
    """The core's operands from a projected K (the attention-core benchmark's inputs): on the
    factorized form mc_h = wqb_hᵀ·K_hᵀ by a batched GEMM, 2·S·E·H·(BLOCK_D + 1) FLOPs."""
    HE, DM = wq.shape
    H, E = n_heads, HE // n_heads
    S = kv.shape[0]
    form = core_form(DM, H, E)
    v = kv[:, HE:].view(S, H, E)
    if form.has_bias:
        mc = mc_from_keys(factorized_query_side(wq, bq, form.d_logit), kv[:, :HE], H)  # [H, W, S]
    else:
        mc = kv[:, :HE].t().contiguous().view(H, E, S)  # Kᵀ
    return query_operand(target_rows, wq, bq, form), _align_prototypes(mc), v, form


# Two TritonOps (timellm_fast.triton_op): custom ops torch.compile sees only as their fake
# implementations (no graph break, no tracing into Triton), and a direct autograd.Function in plain
# eager mode, the same launchers behind both.
#
# * reprogramming_op, the layer's training path: the whole layer (prototype side, query side,
#   fused core, output projection) is one op with a hand-written backward. Left to autograd the
#   dozen small GEMMs around the core are a dozen graph nodes, and at the official shapes their
#   bookkeeping costs more host time than the GPU work (bench/ROOFLINE.md).
# * attention_core_op: the fused core alone, for inference on the cached prototype side and for
#   the attention-core benchmarks.

_TENSOR_INPUTS = 11  # target, source, value, wq, bq, wk, bk, wv, bv, wo, bo


def _launch_layer_forward(
    target: torch.Tensor,  # target: [..., DM], R rows (the layer's [B', L, DM]: reshaped here, out of autograd's sight)
    source: torch.Tensor, value: torch.Tensor,  # [S, d_llm] each
    wq: torch.Tensor, bq: torch.Tensor,  # [H*E, DM], [H*E]
    wk: torch.Tensor, bk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor,  # [H*E, d_llm], [H*E]
    wo: torch.Tensor, bo: torch.Tensor,  # [d_llm, H*E], [d_llm]
    n_heads: int, dropout_p: float,
    seed: torch.Tensor,  # seed: [1] int64 on the device, read only when dropout_p > 0
    allow_tf32: bool, deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [..., d_llm], then what the backward reuses: heads [R, H*E], lse [H, R] fp32, mc, v,
    query_side (wqb [H*E, W] factorized, Q [R, H*E] standard), key_side (PrototypeSide's; [0] standard))."""
    H, (HE, DM) = n_heads, wq.shape
    form = core_form(DM, H, HE // H)
    mc, v, wqb, key_side = prototype_operands(source, value, wq, bq, wk, bk, wv, bv, H, form, True)
    x = query_operand(target.reshape(-1, DM), wq, bq, form)
    heads, lse = attn_kernels.attention_forward(x, mc, v, form.d_logit, form.x_head_stride, form.has_bias, form.scale,
                                                DM, dropout_p, seed, allow_tf32)
    # the 2-D linear and a view of its result, sizes as separate arguments: each part is the
    # cheaper spelling (a 3-D linear folds its input first; a Size + tuple is built in Python)
    out = F.linear(heads, wo, bo).view(*target.shape[:-1], wo.shape[0])
    if form.has_bias:
        return out, heads, lse, mc, v, wqb, key_side
    # the padded target of the factorized form is rebuilt by the backward; Q is kept (it may not
    # be rebuilt for free), and a custom op's outputs may not alias its inputs
    return out, heads, lse, mc, v, x, lse.new_empty((0,))


def _layer_forward_fake(target, source, value, wq, bq, wk, bk, wv, bv, wo, bo, n_heads, dropout_p, seed,
                        allow_tf32, deterministic):
    DM = target.shape[-1]
    R = math.prod(target.shape[:-1])
    S, d_llm = source.shape
    H, HE = n_heads, wq.shape[0]
    E = HE // H
    form = core_form(DM, H, E)
    W = form.d_logit + 1 if form.has_bias else E
    S_pad = S + (-S % attn_kernels.PROTOTYPE_ALIGN)
    new = target.new_empty
    if form.has_bias:
        query_side = new((HE, W))
        key_side = new((S, HE)) if attn_kernels.keys_first(DM, E) else new((H, W, d_llm))
    else:
        query_side, key_side = new((R, HE)), new((0,), dtype=torch.float32)
    return (new(target.shape[:-1] + (wo.shape[0],)), new((R, HE)), new((H, R), dtype=torch.float32), new((H, W, S_pad)),
            new((S, H, E)), query_side, key_side)


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; without a dispatcher call when it already is (.to() is one even as a no-op)."""
    return t if t.dtype == dtype else t.to(dtype)


def _prototype_columns(dmc: torch.Tensor, num_protos: int) -> torch.Tensor:
    """dmc: [H, W, S'] without its alignment columns S..S' (they carry nothing); no narrow when S' = S."""
    return dmc if dmc.shape[2] == num_protos else dmc.narrow(2, 0, num_protos)


def _layer_chain_rule(
    grad_out: torch.Tensor,  # grad_out: [..., d_llm], as the forward's out
    target: torch.Tensor, source: torch.Tensor, value: torch.Tensor,  # the forward's inputs
    wq: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
    heads: torch.Tensor, lse: torch.Tensor, mc: torch.Tensor, v: torch.Tensor,  # the forward's outputs
    query_side: torch.Tensor, key_side: torch.Tensor,
    n_heads: int, dropout_p: float, seed: torch.Tensor, allow_tf32: bool, deterministic: bool,
    needs: Sequence[bool],  # per tensor input of the forward (_TENSOR_INPUTS): whether it needs a gradient
) -> List[Optional[torch.Tensor]]:  # one gradient per tensor input, in the working dtype; None where not needed
    """The layer's chain rule around the core's backward kernels (the GEMMs autograd would run,
    without its graph). The core's fp32 gradients are rounded to the working dtype first, as the
    GEMMs' own gradients are. On G's route Wq's and bq's gradients are strided views of one buffer
    (autograd accumulates them as they are; the custom op's form copies them); from K they come
    contiguous from prototype_logits_backward."""
    need_target, need_source, need_value, need_wq, need_bq, need_wk, need_bk, need_wv, need_bv, need_wo, need_bo = needs
    DM = target.shape[-1]
    S, d_llm = source.shape
    H, HE = n_heads, wk.shape[0]
    E = HE // H
    form = core_form(DM, H, E)
    dtype = heads.dtype
    target_rows = target.reshape(-1, DM)  # [R, DM]
    grad_out = grad_out.reshape(-1, d_llm)  # [R, d_llm]
    grads: List[Optional[torch.Tensor]] = [None] * _TENSOR_INPUTS
    if need_wo:
        grads[9] = grad_out.t().mm(heads)
    if need_bo:
        grads[10] = grad_out.sum(0)
    need_query_weights = need_wq or need_bq
    need_k = need_source or need_wk or need_bk  # what K reaches
    need_key = need_k or (form.has_bias and need_query_weights)  # what dmc reaches
    need_x = need_target or (not form.has_bias and need_query_weights)
    need_protos = need_key or need_value or need_wv or need_bv
    if need_x or need_protos:
        grad_heads = grad_out.mm(wo)  # [R, H*E]
        x = padded_rows(target_rows, form) if form.has_bias else query_side
        dx, dmc, dv = attn_kernels.attention_backward(
            x, mc, v, heads, grad_heads, lse, form.d_logit, form.x_head_stride, form.has_bias, form.scale, DM,
            dropout_p, seed, allow_tf32, need_dx=need_x, need_protos=need_protos, deterministic=deterministic)
        if need_x and form.has_bias:
            # the padding columns of x are not target's
            grads[0] = _in_dtype(dx if dx.shape[1] == DM else dx.narrow(1, 0, DM), dtype).view_as(target)
        elif need_x:  # dx is dQ
            dq = _in_dtype(dx, dtype)
            grads[0] = dq.mm(wq).view_as(target) if need_target else None
            grads[3] = dq.t().mm(target_rows) if need_wq else None
            grads[4] = dq.sum(0) if need_bq else None
        if need_protos:
            dv = _in_dtype(dv, dtype).view(S, HE)
            grads[2] = dv.mm(wv) if need_value else None
            grads[7] = dv.t().mm(value) if need_wv else None
            grads[8] = dv.sum(0) if need_bv else None
        dkt = None  # d Kᵀ: [H*E, S], where K's gradient is needed and K is on the path
        dwqb = None  # d wqb_h: [H, E, W] (factorized, where Wq or bq needs a gradient)
        if need_key and attn_kernels.keys_first(DM, E):
            # mc_h = wqb_hᵀ·K_hᵀ: d K_hᵀ = wqb_h·dmc_h, d wqb_h = K_hᵀ·dmc_hᵀ and d bk = Σ_s d Kᵀ in one
            # launch, from the core's fp32 dmc (the kernel rounds it to the data dtype)
            dkt, dwq, dbq, dbk = attn_kernels.prototype_logits_backward(dmc, query_side, key_side, H, DM)
            grads[3] = dwq if need_wq else None
            grads[4] = dbq if need_bq else None
            if need_k:
                grads[1] = dkt.t().mm(wk) if need_source else None
                grads[5] = dkt.mm(source) if need_wk else None
                grads[6] = dbk if need_bk else None
            return grads
        if need_key:
            dmc = _in_dtype(_prototype_columns(dmc, S), dtype)  # [H, W, S]
        if need_key and form.has_bias:
            W = mc.shape[1]
            dmc = dmc.reshape(H * W, S)  # [H*W, S]
            grads[1] = dmc.t().mm(key_side.view(H * W, d_llm)) if need_source else None
            if need_wk or need_bk or need_query_weights:
                wqb = query_side.view(H, E, W)  # [H, E, W]
                dg = dmc.mm(source).view(H, W, d_llm)  # [H, W, d_llm]
                dg_bias = dmc.sum(1).view(H, W, 1)  # [H, W, 1]
                grads[5] = torch.bmm(wqb, dg).view(HE, d_llm) if need_wk else None
                grads[6] = torch.bmm(wqb, dg_bias).view(HE) if need_bk else None
                if need_query_weights:
                    # G_h = wqb_hᵀ·Wk_h and g_h = wqb_hᵀ·bk_h: d wqb_h = Wk_h·dG_hᵀ + bk_h·dg_hᵀ
                    dwqb = torch.baddbmm(torch.mul(bk.view(H, E, 1), dg_bias.view(H, 1, W)), wk.view(H, E, d_llm),
                                         dg.transpose(1, 2))
        elif need_key:  # standard: dmc is d Kᵀ
            dkt = dmc.reshape(HE, S)
        if dkt is not None:
            grads[1] = dkt.t().mm(wk) if need_source else None
            grads[5] = dkt.mm(source) if need_wk else None
            grads[6] = dkt.sum(1) if need_bk else None
        if dwqb is not None:  # wqb_h = [Wq_h | zeros | bq_h]: its rows are Wq's and bq's, [H*E, W]
            dwqb = dwqb.view(HE, dwqb.shape[2])
            grads[3] = dwqb.narrow(1, 0, DM) if need_wq else None
            grads[4] = dwqb.select(1, dwqb.shape[1] - 1) if need_bq else None  # the bias column
    return grads


def _launch_layer_backward(
    grad_out: torch.Tensor, target: torch.Tensor, source: torch.Tensor, value: torch.Tensor,
    wq: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor,
    heads: torch.Tensor, lse: torch.Tensor, mc: torch.Tensor, v: torch.Tensor,
    query_side: torch.Tensor, key_side: torch.Tensor,
    n_heads: int, dropout_p: float, seed: torch.Tensor, allow_tf32: bool, deterministic: bool,
    needs: Sequence[bool],
) -> List[torch.Tensor]:
    """_layer_chain_rule as a custom op returns it: a custom op's outputs may not alias one another
    (views are copied) or be missing (a fresh empty tensor for each gradient not needed)."""
    grads = _layer_chain_rule(grad_out, target, source, value, wq, wk, bk, wv, wo, heads, lse, mc, v,
                              query_side, key_side, n_heads, dropout_p, seed, allow_tf32, deterministic, needs)
    return [t.contiguous() if t is not None else heads.new_empty((0,)) for t in grads]


def _layer_backward_fake(grad_out, target, source, value, wq, wk, bk, wv, wo, heads, lse, mc, v, query_side, key_side,
                         n_heads, dropout_p, seed, allow_tf32, deterministic, needs):
    shapes = (target.shape, source.shape, value.shape, wq.shape, wq.shape[:1], wk.shape, wk.shape[:1],
              wv.shape, wv.shape[:1], wo.shape, wo.shape[:1])
    return [heads.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


def _save_layer(ctx, inputs, outputs):
    target, source, value, wq, bq, wk, bk, wv, bv, wo, bo, n_heads, dropout_p, seed, allow_tf32, deterministic = inputs
    _, heads, lse, mc, v, query_side, key_side = outputs
    # heads and lse as the core's autograd kept them; mc, v, wqb and K or G are a few MB at most
    ctx.save_for_backward(target, source, value, wq, wk, bk, wv, wo, heads, lse, mc, v, query_side, key_side, seed)
    ctx.config = (n_heads, dropout_p, allow_tf32, deterministic)


def _layer_gradients(ctx, run_backward, grad_out):
    if grad_out is None:  # the layer's output did not reach the loss
        return (None,) * 16
    target, source, value, wq, wk, bk, wv, wo, heads, lse, mc, v, query_side, key_side, seed = ctx.saved_tensors
    n_heads, dropout_p, allow_tf32, deterministic = ctx.config
    needs = list(ctx.needs_input_grad[:_TENSOR_INPUTS])
    grads = run_backward(grad_out, target, source, value, wq, wk, bk, wv, wo, heads, lse, mc, v, query_side, key_side,
                         n_heads, dropout_p, seed, allow_tf32, deterministic, needs)
    if not ctx.direct:  # the custom op's empty tensors for the gradients not needed
        grads = [t if need else None for t, need in zip(grads, needs)]
    return (*grads, None, None, None, None, None)


#: reprogramming_op(target, source, value, wq, bq, wk, bk, wv, bv, wo, bo, n_heads, dropout_p, seed,
#: allow_tf32, deterministic) -> out [..., d_llm] for target [..., d_model] (the launcher's other outputs are residuals for the backward)
reprogramming_op = TritonOp(
    OP_NAME, forward=_launch_layer_forward, forward_fake=_layer_forward_fake, backward=_launch_layer_backward,
    direct_backward=_layer_chain_rule, backward_fake=_layer_backward_fake, save=_save_layer, gradients=_layer_gradients,
    differentiable=_TENSOR_INPUTS, residuals=True)


def _launch_core_forward(
    x: torch.Tensor,  # x: [R, *] (query_operand)
    mc: torch.Tensor,  # mc: [H, W, S'] (prototype_operands)
    v: torch.Tensor,  # v: [S, H, E]
    d_logit: int, x_head_stride: int, has_bias: bool, scale: float, d_model: int,
    dropout_p: float,
    seed: torch.Tensor,  # seed: [1] int64 on the device, read only when dropout_p > 0
    allow_tf32: bool, deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:  # (heads_out: [R, H*E], lse: [H, R] fp32, base 2)
    return attn_kernels.attention_forward(x, mc, v, d_logit, x_head_stride, has_bias, scale, d_model, dropout_p,
                                          seed, allow_tf32)


def _core_forward_fake(x, mc, v, d_logit, x_head_stride, has_bias, scale, d_model, dropout_p, seed,
                       allow_tf32, deterministic):
    R = x.shape[0]
    S, H, E = v.shape
    return x.new_empty((R, H * E)), x.new_empty((H, R), dtype=torch.float32)


def _launch_core_backward(
    x: torch.Tensor, mc: torch.Tensor, v: torch.Tensor,  # as in the forward
    heads_out: torch.Tensor,  # heads_out: [R, H*E], the forward's
    grad_heads: torch.Tensor,  # grad_heads: [R, H*E], its gradient
    lse: torch.Tensor,  # lse: [H, R] fp32, the forward's
    d_logit: int, x_head_stride: int, has_bias: bool, scale: float, d_model: int,
    dropout_p: float, seed: torch.Tensor, allow_tf32: bool, deterministic: bool,
    need_x: bool, need_protos: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (dx, dmc, dv) fp32, [0] where not needed
    dx, dmc, dv = attn_kernels.attention_backward(
        x, mc, v, heads_out, grad_heads, lse, d_logit, x_head_stride, has_bias, scale, d_model, dropout_p, seed,
        allow_tf32, need_dx=need_x, need_protos=need_protos, deterministic=deterministic)
    def nothing():  # a fresh empty tensor for each missing gradient: custom-op outputs may not alias
        return lse.new_empty((0,))

    return (dx if dx is not None else nothing(), dmc if dmc is not None else nothing(),
            dv if dv is not None else nothing())


def _core_backward_fake(x, mc, v, heads_out, grad_heads, lse, d_logit, x_head_stride, has_bias, scale,
                        d_model, dropout_p, seed, allow_tf32, deterministic, need_x, need_protos):
    return (lse.new_empty(x.shape if need_x else (0,)), lse.new_empty(mc.shape if need_protos else (0,)),
            lse.new_empty(v.shape if need_protos else (0,)))


def _save_core(ctx, inputs, output):
    x, mc, v, d_logit, x_head_stride, has_bias, scale, d_model, dropout_p, seed, allow_tf32, deterministic = inputs
    heads_out, lse = output
    ctx.save_for_backward(x, mc, v, heads_out, lse, seed)
    ctx.config = (d_logit, x_head_stride, has_bias, scale, d_model, dropout_p)
    ctx.flags = (allow_tf32, deterministic)


def _core_gradients(ctx, run_backward, grad_heads):
    if grad_heads is None:  # the attention output did not reach the loss
        return (None,) * 12
    x, mc, v, heads_out, lse, seed = ctx.saved_tensors
    d_logit, x_head_stride, has_bias, scale, d_model, dropout_p = ctx.config
    allow_tf32, deterministic = ctx.flags
    need_x, need_mc, need_v = ctx.needs_input_grad[:3]
    dx, dmc, dv = run_backward(x, mc, v, heads_out, grad_heads, lse, d_logit, x_head_stride, has_bias, scale,
                               d_model, dropout_p, seed, allow_tf32, deterministic, need_x,
                               need_mc or need_v)  # fp32
    return ((dx.to(x.dtype) if need_x else None), (dmc.to(mc.dtype) if need_mc else None),
            (dv.to(v.dtype) if need_v else None)) + (None,) * 9


#: attention_core_op(x, mc, v, d_logit, x_head_stride, has_bias, scale, d_model, dropout_p, seed,
#: allow_tf32, deterministic) -> heads_out [R, H*E] (lse [H, R] is a residual for the backward)
attention_core_op = TritonOp(
    f"{OP_NAME}_core", forward=_launch_core_forward, forward_fake=_core_forward_fake,
    backward=_launch_core_backward, backward_fake=_core_backward_fake, save=_save_core,
    gradients=_core_gradients, differentiable=3, residuals=True)


def fused_core(
    x: torch.Tensor,  # x: [R, *] (query_operand)
    mc: torch.Tensor,  # mc: [H, W, S'] (prototype_operands)
    v: torch.Tensor,  # v: [S, H, E]
    form: CoreForm, dropout_p: float = 0.0, allow_tf32: bool = False, deterministic: bool = False,
) -> torch.Tensor:  # heads_out: [R, H*E], heads merged
    """The fused attention core with its autograd, on the route dispatch picks.
    (Assumes the Triton path was chosen: the layer's forward does that.)"""
    return attention_core_op(x, mc, v, form.d_logit, form.x_head_stride, form.has_bias, form.scale, form.d_model,
                             dropout_p, draw_seed_tensor(dropout_p, x.device), allow_tf32, deterministic)


def fused_attention(
    target_rows: torch.Tensor,  # target_rows: [R, DM]
    wq: torch.Tensor, bq: torch.Tensor,  # [H*E, DM], [H*E]
    kv: torch.Tensor,  # kv: [S, 2*H*E], K then V (project_key_value)
    n_heads: int, dropout_p: float = 0.0, allow_tf32: bool = False, deterministic: bool = False,
) -> torch.Tensor:  # heads_out: [R, H*E]
    """softmax(Q·Kᵀ/√E)·V with Q = target_rows·Wqᵀ + bq, given projected K and V: the attention core
    alone, as the benchmarks compare it with SDPA on the same inputs."""
    x, mc, v, form = core_from_keys(target_rows, wq, bq, kv, n_heads)
    return fused_core(x, mc, v, form, dropout_p, allow_tf32, deterministic)


_PROJECTIONS = ("query_projection", "key_projection", "value_projection", "out_projection")


def _submodule(layer: nn.Module, name: str) -> nn.Module:
    """layer.<name>, read from the layer's _modules: nn.Module.__getattr__ is a Python call per
    attribute, on every call of the layer. A name missing there is looked up the usual way."""
    module = layer._modules.get(name)
    return module if module is not None else getattr(layer, name)


def projection_tensors(layer: "ReprogrammingLayer") -> tuple:  # (wq, bq, wk, bk, wv, bv, wo, bo)
    """The four projections' weights and biases, as attribute access gives them, read from the
    modules' own dicts: twelve nn.Module.__getattr__ calls cost more than a kernel launch, and this
    runs on every call, so the usual layout is read in one expression without a loop. Anything
    else (a name missing from a dict: a parametrization's property, a plain tensor attribute, a
    replaced submodule) is looked up the usual way."""
    modules = layer._modules
    try:  # a None entry is a parameter registered as None, which attribute access gives too
        q, k, v, o = (modules["query_projection"]._parameters, modules["key_projection"]._parameters,
                      modules["value_projection"]._parameters, modules["out_projection"]._parameters)
        return q["weight"], q["bias"], k["weight"], k["bias"], v["weight"], v["bias"], o["weight"], o["bias"]
    except (KeyError, AttributeError):
        return tuple(getattr(_submodule(layer, name), attr) for name in _PROJECTIONS for attr in ("weight", "bias"))


def check_inputs(layer: "ReprogrammingLayer", target, source, value, weight: torch.Tensor) -> Tuple[torch.dtype, bool]:
    """(the working dtype, whether autocast is on for target's device) after checking the inputs.

    The working dtype is the autocast dtype where autocast casts, as it would for nn.Linear
    (float64 is left alone), else the inputs'. Inputs that plainly fit (one float dtype and one
    device for all, the layer's widths) pass in one expression that reads each property once
    (this runs on every call); anything else goes through the checks one by one, whose errors
    name what is wrong."""
    Tensor = torch.Tensor
    fits = False
    if isinstance(target, Tensor) and isinstance(source, Tensor) and isinstance(value, Tensor):
        t_shape, s_shape, v_shape = target.shape, source.shape, value.shape
        dtype, device = target.dtype, target.device
        fits = (len(t_shape) == 3 and len(s_shape) == 2 and len(v_shape) == 2 and t_shape[2] == layer.d_model
                and s_shape[1] == layer.d_llm == v_shape[1] and s_shape[0] == v_shape[0] > 0
                and dtype in validation.FLOAT_DTYPES and source.dtype == dtype == value.dtype == weight.dtype
                and source.device == device == value.device == weight.device)
    if not fits:
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
        validation.same_device("target", target, "the layer's weights", weight)
        dtype, device = target.dtype, target.device
    device_type = device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    if autocast_on and dtype != torch.float64:
        return torch.get_autocast_dtype(device_type), autocast_on  # autocast casts everything to one dtype
    if not fits:
        for name, t in (("target", target), ("source", source), ("value", value)):
            if t.dtype != weight.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but the layer's weights are {weight.dtype}; "
                                f"convert one of them (or run under torch.autocast)")
    return dtype, autocast_on


class ReprogrammingLayer(nn.Module):
    """Drop-in for Time-LLM's ReprogrammingLayer: same constructor, submodules and state-dict keys.

    The fused kernels compute fp32 inputs with IEEE fp32 dot products; `allow_tf32=True` sends fp32
    on a GPU to PyTorch's SDPA instead, which runs fp32 on tensor cores. `deterministic=True` makes the fused backward
    bitwise reproducible (fixed-order reductions instead of fp32 atomics, at 8·D + 6·E instead of
    6·D + 4·E MMA FLOPs per element); it is also on whenever
    ``torch.use_deterministic_algorithms(True)`` is. ``kv_cache_hits`` / ``kv_cache_misses`` count how
    often the no-grad path reused the prototype-side projections.
    """

    def __init__(self, d_model, n_heads, d_keys=None, d_llm=None, attention_dropout=0.1, *, allow_tf32=False,
                 deterministic=False):
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
        self.deterministic = bool(deterministic)
        self.query_projection = nn.Linear(d_model, d_keys * n_heads)
        self.key_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.value_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.out_projection = nn.Linear(d_keys * n_heads, d_llm)
        self.dropout = nn.Dropout(attention_dropout)
        self._kv_cache = TensorCache()  # prototype-side projections, reused when no autograd graph is needed

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
        params = projection_tensors(self)
        dtype, autocast_on = check_inputs(self, target, source, value, params[0])
        dropout_p = _submodule(self, "dropout").p if self.training else 0.0
        if dropout_p.__class__ is not float or not 0.0 <= dropout_p < 1.0:  # the usual value passes unconverted
            dropout_p = validation.dropout_prob("dropout.p", dropout_p)
        device = target.device
        reason = None
        if attn_kernels is not None:  # without Triton, dispatch.choose gives its import error as the reason
            reason = attn_kernels.unsupported_reason(dtype, self.d_keys, self.d_model, source.shape[0],
                                                     dropout_p > 0.0, device, self.allow_tf32)
        path = dispatch.choose(OP_NAME, device, reason)
        if autocast_on:  # the operands are cast here, once; what runs below must not cast them again
            with torch.autocast(device.type, enabled=False):
                return self._compute(path, target, source, value, params, dtype, dropout_p)
        return self._compute(path, target, source, value, params, dtype, dropout_p)

    def _compute(self, path: str, target: torch.Tensor, source: torch.Tensor, value: torch.Tensor, params: tuple,
                 dtype: torch.dtype, dropout_p: float) -> torch.Tensor:  # out: [B', L, d_llm]
        """The layer on `path` with its operands in the working dtype."""
        wq, bq, wk, bk, wv, bv, wo, bo = params
        if (dtype == target.dtype == source.dtype == value.dtype == wq.dtype == bq.dtype == wk.dtype == bk.dtype
                == wv.dtype == bv.dtype == wo.dtype == bo.dtype):  # nothing to cast (no dispatcher calls)
            target_c, source_c, value_c = target, source, value
        else:
            wq, bq, wk, bk, wv, bv, wo, bo = (_in_dtype(t, dtype) for t in params)
            target_c, source_c = _in_dtype(target, dtype), _in_dtype(source, dtype)
            value_c = source_c if value is source else _in_dtype(value, dtype)
        H = self.n_heads
        # in training the first test decides (target is an activation that requires grad)
        needs_grad = torch.is_grad_enabled() and (target.requires_grad or source.requires_grad or value.requires_grad
                                                  or any(t.requires_grad for t in params))
        if path == "triton":
            deterministic = self.deterministic or torch.are_deterministic_algorithms_enabled()
            if needs_grad:  # the whole layer as one autograd node, [B', L, *] in and out
                return reprogramming_op(target_c, source_c, value_c, wq, bq, wk, bk, wv, bv, wo, bo, H, dropout_p,
                                        draw_seed_tensor(dropout_p, target.device), self.allow_tf32, deterministic)
            Bp, L, DM = target.shape
            form = core_form(DM, H, self.d_keys)
            side = self._kv_cache.get(  # the prototype side, reused while its inputs are unchanged
                (source, value) + params[:6], (dtype, "triton"),
                lambda: prototype_operands(source_c, value_c, wq, bq, wk, bk, wv, bv, H, form))
            heads_out = fused_core(query_operand(target_c.reshape(Bp * L, DM), wq, bq, form), side.mc, side.v, form,
                                   dropout_p, self.allow_tf32, deterministic)  # [R, H*E]
            return F.linear(heads_out, wo, bo).view(Bp, L, wo.shape[0])  # -1 is ambiguous when B'·L = 0
        if dropout_p > 0:
            return reprogramming_reference(target_c, source_c, value_c, wq, bq, wk, bk, wv, bv, wo, bo, H,
                                           dropout_p=dropout_p, training=True)

        def key_value():  # kv: [S, 2·H·E]
            return project_key_value(source_c, value_c, wk, bk, wv, bv)

        kv = key_value() if needs_grad else self._kv_cache.get((source, value) + params[:6], (dtype, "eager"), key_value)
        return reprogramming_sdpa_fold(target_c, source_c, value_c, wq, bq, wk, bk, wv, bv, wo, bo, H,
                                       key_value=kv.split(H * self.d_keys, dim=1))
