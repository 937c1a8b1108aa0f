"""The reprogramming layer's fused op (docs/spec.md §1.2, §1.3): prototype side, core, output projection,
and the hand-written backward, as torch.library custom ops with their autograd.

The Triton path splits the layer into GEMMs, which cuBLAS does best, and one fused attention core
that never materializes the [B', H, L, S] attention matrix. Where d_model <= E (every Time-LLM
shape) the core runs on the factorized logits of docs/spec.md §1.3, Z_h = s·(target·M_h + c_h): Q never
exists, and where E > W = BLOCK_D + 1 neither does K (the prototype side is built straight from `source`):

    forward:  G_h = [Wq_h | 0 | bq_h]ᵀ·Wk_h, g_h = [Wq_h | 0 | bq_h]ᵀ·bk_h   (tiny GEMMs)
              mc = G·sourceᵀ + g      [H, W, S]: per head Y_hᵀ = (K_h·Wq_h)ᵀ, then c_hᵀ = (K_h·bq_h)ᵀ
              (where E <= W, as much work and one GEMM fewer: K = source·Wkᵀ + bk, mc_h = [Wq_h | 0 | bq_h]ᵀ·K_hᵀ)
              v  = value·Wvᵀ + bv     [S, H, E]
              O, lse = fused core(target, mc, v)     (d_model-wide logit dots, softmax, dropout, ·V)
              out = O·Woᵀ + bo
    backward: the core's kernels hand back d target, d mc, d v, and the layer's chain rule takes
              them through the GEMMs above to every weight, `source` and `value`.

Where d_model > E the same core runs the standard form: X = Q = target·Wqᵀ + bq, mc = Kᵀ.

Two ops, each one route in eager mode and under torch.compile / export alike: a pair of custom ops
(``timellm_fast::<name>_fwd`` / ``_bwd``, with fake implementations: torch.compile sees one opaque
operator each) whose forward has its autograd registered (torch.library's register_autograd):

* ``reprogramming_layer`` (``reprogramming_attention``), the layer in training: the whole layer
  is one node with a hand-written backward; left to autograd the dozen small GEMMs around the core
  would be a dozen graph nodes;
* :func:`attention_core` (``reprogramming_attention_core``), the fused core alone: inference on a
  reused prototype side, the layer's path through its submodules, the attention-core benchmarks.

A backward that builds a graph (``create_graph=True``) recomputes the op with the eager reference
instead of the kernels, so that its gradients differentiate again.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .patch_embedding import draw_seed_tensor  # one dropout-seed rule for both ops (the layer imports it from here)
from .reference import attention_core_reference, reprogramming_reference

if dispatch.TRITON_IMPORT_ERROR is None:
    from .kernels import attention as attn_kernels
    from .kernels.attention import CoreForm, CoreGradients, core_form, standard_form
else:  # without Triton the layer never takes these ops (dispatch.choose)
    attn_kernels = CoreForm = CoreGradients = core_form = standard_form = None


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


def factorized_query_side(wq: torch.Tensor, bq: torch.Tensor, block_d: int) -> torch.Tensor:
    """wqb: [H*E, BLOCK_D + 1], row h·E + e [Wq (d_model columns) | zeros up to BLOCK_D | bq], so that
    with wqb_h its rows of head h (wqb.view(H, E, W)[h]), wqb_hᵀ·K_hᵀ is head h's block of the factorized
    mc operand: rows Y_hᵀ = (K_h·Wq_h)ᵀ, zero rows for the padding of d_model, and c_hᵀ = (K_h·bq_h)ᵀ."""
    HE, DM = wq.shape
    if block_d > DM:
        return torch.cat([wq, wq.new_zeros((HE, block_d - DM)), bq.view(HE, 1)], 1)
    return torch.cat([wq, bq.view(HE, 1)], 1)


def align_prototypes(mc: torch.Tensor) -> torch.Tensor:
    """mc [H, W, S] with its prototype axis padded to a multiple of PROTOTYPE_ALIGN (S = 1000 needs none)."""
    pad = -mc.shape[2] % attn_kernels.PROTOTYPE_ALIGN
    return F.pad(mc, (0, pad)) if pad else mc


class PrototypeSide(NamedTuple):
    """The core's prototype-side operands (shared by every row) and what their backward reuses."""
    mc: torch.Tensor  # mc: [H, W, S'], the prototype side of the logits (factorized) or Kᵀ (standard)
    v: torch.Tensor  # v: [S, H, E]
    wqb: Optional[torch.Tensor]  # wqb: [H*E, W] (factorized_query_side); None on the standard form
    # key_side: what mc was formed from on the factorized form, K [S, H*E] (CoreForm.keys_first)
    # or G [H, W, d_llm] with G_h = wqb_hᵀ·Wk_h; None on the standard form
    key_side: Optional[torch.Tensor]


def mc_from_keys(wqb: torch.Tensor, k: torch.Tensor, n_heads: int) -> torch.Tensor:  # mc: [H, W, S]
    """The factorized mc from projected keys k [S, H*E]: mc_h = wqb_hᵀ·K_hᵀ, one batched GEMM of
    2·S·E·H·W FLOPs that writes the kernels' transposed layout."""
    (HE, W), S = wqb.shape, k.shape[0]
    E = HE // n_heads
    return torch.bmm(wqb.view(n_heads, E, W).transpose(1, 2), k.reshape(S, n_heads, E).permute(1, 2, 0))


def prototype_operands(
    source: torch.Tensor, value: torch.Tensor,  # [S, d_llm] each
    wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor, wv: torch.Tensor, bv: torch.Tensor,
    n_heads: int, form: CoreForm, keys_kernel: bool = False,
) -> PrototypeSide:
    """The prototype side (cached at inference by the layer).

    Factorized: mc_h = (K_h·wqb_h)ᵀ, either from K (CoreForm.keys_first) or, where E > BLOCK_D + 1, as
    G·sourceᵀ + g with G_h = wqb_hᵀ·Wk_h and g_h = wqb_hᵀ·bk_h without forming K: 2·S·d_llm·H·(BLOCK_D + 1)
    FLOPs instead of the K projection's 2·S·d_llm·H·E (docs/spec.md §1.3), one GEMM whose output is already the
    kernels' transposed layout. Standard: mc = Kᵀ.

    keys_kernel: mc and wqb from K by attn_kernels.prototype_logits, one launch (the layer op's
    forward launcher, which runs in training on every call); else by the concatenation and the
    batched GEMM mc_from_keys (the inference cache, built once per prototype set, which
    torch.compile traces)."""
    S, d_llm = source.shape
    H, E = n_heads, wk.shape[0] // n_heads
    v = F.linear(value, wv, bv).view(S, H, E)
    if not form.factorized:
        return PrototypeSide(align_prototypes(torch.addmm(bk.view(H * E, 1), wk, source.t()).view(H, E, S)), v,
                             None, None)
    keys_first = form.keys_first
    if keys_first:
        k = F.linear(source, wk, bk)  # K: [S, H*E]
        if keys_kernel:
            mc, wqb = attn_kernels.prototype_logits(wq, bq, k, H, form)
            return PrototypeSide(mc, v, wqb, k)
    wqb = factorized_query_side(wq, bq, form.d_logit)  # [H*E, W]
    if keys_first:
        return PrototypeSide(align_prototypes(mc_from_keys(wqb, k, H)), v, wqb, k)
    wqb_t = wqb.view(H, E, -1).transpose(1, 2)  # wqb_hᵀ: [H, W, E]
    g = torch.bmm(wqb_t, wk.view(H, E, d_llm))  # [H, W, d_llm]
    g_bias = torch.bmm(wqb_t, bk.view(H, E, 1))  # [H, W, 1]
    W = g.shape[1]
    mc = torch.addmm(g_bias.view(H * W, 1), g.view(H * W, d_llm), source.t())  # [H*W, S]
    return PrototypeSide(align_prototypes(mc.view(H, W, S)), v, wqb, g)


def padded_rows(target_rows: torch.Tensor, form: CoreForm) -> torch.Tensor:  # x: [R, BLOCK_D]
    """The factorized form's row operand: target with zero columns up to BLOCK_D, so that every row
    is a whole, 16-aligned tile row."""
    pad = form.d_logit - target_rows.shape[1]
    if pad:
        return F.pad(target_rows, (0, pad))
    return target_rows if target_rows.is_contiguous() else target_rows.contiguous()


def query_operand(target_rows: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, form: CoreForm) -> torch.Tensor:
    """x: the core's row-side operand: padded_rows (factorized), or Q [R, H*E] (standard)."""
    return padded_rows(target_rows, form) if form.factorized else F.linear(target_rows, wq, bq)


# ---------------------------------------------------------------------------------------------
# the layer op
# ---------------------------------------------------------------------------------------------

class LayerGradients(NamedTuple):
    """One gradient per tensor input of the layer op (None, or an empty tensor across the custom
    op's boundary, where not needed)."""
    target: Optional[Tensor]
    source: Optional[Tensor]
    value: Optional[Tensor]
    wq: Optional[Tensor]
    bq: Optional[Tensor]
    wk: Optional[Tensor]
    bk: Optional[Tensor]
    wv: Optional[Tensor]
    bv: Optional[Tensor]
    wo: Optional[Tensor]
    bo: Optional[Tensor]


_TENSOR_INPUTS = len(LayerGradients._fields)  # target, source, value, wq, bq, wk, bk, wv, bv, wo, bo


def launch_layer_forward(
    target: Tensor,  # target: [..., DM], R rows (the layer's [B', L, DM])
    source: Tensor, value: Tensor,  # [S, d_llm] each
    wq: Tensor, bq: Tensor,  # [H*E, DM], [H*E]
    wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor,  # [H*E, d_llm], [H*E]
    wo: Tensor, bo: Tensor,  # [d_llm, H*E], [d_llm]
    n_heads: int, dropout_p: float,
    seed: Tensor,  # seed: [1] int64 on the device, read only when dropout_p > 0
    allow_tf32: bool, deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out [..., d_llm], then what the backward reuses: heads [R, H*E], lse [H, R] fp32, mc, v,
    query_side (wqb [H*E, W] factorized, Q [R, H*E] standard), key_side (PrototypeSide's; [0] standard))."""
    H, (HE, DM) = n_heads, wq.shape
    form = core_form(DM, HE // H)
    mc, v, wqb, key_side = prototype_operands(source, value, wq, bq, wk, bk, wv, bv, H, form, True)
    x = query_operand(target.reshape(-1, DM), wq, bq, form)
    heads, lse = attn_kernels.attention_forward(x, mc, v, form, dropout_p, seed, allow_tf32)
    out = F.linear(heads, wo, bo).view(*target.shape[:-1], wo.shape[0])
    if form.factorized:
        return out, heads, lse, mc, v, wqb, key_side
    # the padded target of the factorized form is rebuilt by the backward; Q is kept (it may not
    # be rebuilt for free), and a custom op's outputs may not alias its inputs
    return out, heads, lse, mc, v, x, lse.new_empty((0,))


#: reprogramming_layer(target, source, value, wq, bq, wk, bk, wv, bv, wo, bo, n_heads, dropout_p, seed,
#: allow_tf32, deterministic) -> (out [B', L, d_llm], residuals for the backward): the whole layer as
#: one autograd node on the Triton path, its operands in one dtype (launch_layer_forward runs it)
reprogramming_layer = torch.library.custom_op("timellm_fast::reprogramming_attention_fwd", mutates_args=())(
    dispatch.one_interpreted_launch_at_a_time(launch_layer_forward))


@reprogramming_layer.register_fake
def _(target, source, value, wq, bq, wk, bk, wv, bv, wo, bo, n_heads, dropout_p, seed, allow_tf32, deterministic):
    DM = target.shape[-1]
    R = math.prod(target.shape[:-1])
    S, d_llm = source.shape
    H, HE = n_heads, wq.shape[0]
    E = HE // H
    form = core_form(DM, E)
    W = form.d_logit + 1 if form.factorized else E
    S_pad = S + (-S % attn_kernels.PROTOTYPE_ALIGN)
    new = target.new_empty
    if form.factorized:
        query_side = new((HE, W))
        key_side = new((S, HE)) if form.keys_first else new((H, W, d_llm))
    else:
        query_side, key_side = new((R, HE)), new((0,), dtype=torch.float32)
    return (new(target.shape[:-1] + (wo.shape[0],)), new((R, HE)), new((H, R), dtype=torch.float32), new((H, W, S_pad)),
            new((S, H, E)), query_side, key_side)


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
    needs: Sequence[bool],  # per tensor input of the forward (LayerGradients' order): whether it needs a gradient
) -> LayerGradients:  # in the working dtype; None where not needed
    """The layer's chain rule around the core's backward kernels (the GEMMs autograd would run,
    without its graph). The core's fp32 gradients are rounded to the working dtype first, as the
    GEMMs' own gradients are. On G's route Wq's and bq's gradients are strided views of one buffer
    (the custom op copies them); from K they come contiguous from prototype_logits_backward."""
    need_target, need_source, need_value, need_wq, need_bq, need_wk, need_bk, need_wv, need_bv, need_wo, need_bo = needs
    DM = target.shape[-1]
    S, d_llm = source.shape
    H, HE = n_heads, wk.shape[0]
    E = HE // H
    form = core_form(DM, E)
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
    need_key = need_k or (form.factorized and need_query_weights)  # what dmc reaches
    need_x = need_target or (not form.factorized and need_query_weights)
    need_protos = need_key or need_value or need_wv or need_bv
    if need_x or need_protos:
        grad_heads = grad_out.mm(wo)  # [R, H*E]
        x = padded_rows(target_rows, form) if form.factorized else query_side
        dx, dmc, dv = attn_kernels.attention_backward(
            x, mc, v, heads, grad_heads, lse, form,
            dropout_p, seed, allow_tf32, need_dx=need_x, need_protos=need_protos, deterministic=deterministic)
        if need_x and form.factorized:
            # the padding columns of x are not target's
            grads[0] = in_dtype(dx if dx.shape[1] == DM else dx.narrow(1, 0, DM), dtype).view_as(target)
        elif need_x:  # dx is dQ
            dq = in_dtype(dx, dtype)
            grads[0] = dq.mm(wq).view_as(target) if need_target else None
            grads[3] = dq.t().mm(target_rows) if need_wq else None
            grads[4] = dq.sum(0) if need_bq else None
        if need_protos:
            dv = in_dtype(dv, dtype).view(S, HE)
            grads[2] = dv.mm(wv) if need_value else None
            grads[7] = dv.t().mm(value) if need_wv else None
            grads[8] = dv.sum(0) if need_bv else None
        dkt = None  # d Kᵀ: [H*E, S], where K's gradient is needed and K is on the path
        dwqb = None  # d wqb_h: [H, E, W] (factorized, where Wq or bq needs a gradient)
        if need_key and form.keys_first:
            # mc_h = wqb_hᵀ·K_hᵀ: d K_hᵀ = wqb_h·dmc_h, d wqb_h = K_hᵀ·dmc_hᵀ and d bk = Σ_s d Kᵀ in one
            # launch, from the core's fp32 dmc (the kernel rounds it to the data dtype)
            dkt, dwq, dbq, dbk = attn_kernels.prototype_logits_backward(dmc, query_side, key_side, H, form)
            grads[3] = dwq if need_wq else None
            grads[4] = dbq if need_bq else None
            if need_k:
                grads[1] = dkt.t().mm(wk) if need_source else None
                grads[5] = dkt.mm(source) if need_wk else None
                grads[6] = dbk if need_bk else None
            return LayerGradients(*grads)
        if need_key:
            dmc = in_dtype(_prototype_columns(dmc, S), dtype)  # [H, W, S]
        if need_key and form.factorized:
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
    return LayerGradients(*grads)


@torch.library.custom_op("timellm_fast::reprogramming_attention_bwd", mutates_args=())
@dispatch.one_interpreted_launch_at_a_time
def _layer_backward(
    grad_out: Tensor, target: Tensor, source: Tensor, value: Tensor,
    wq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor, wo: Tensor,
    heads: Tensor, lse: Tensor, mc: Tensor, v: Tensor, query_side: Tensor, key_side: Tensor,
    n_heads: int, dropout_p: float, seed: Tensor, allow_tf32: bool, deterministic: bool,
    needs: List[bool],
) -> List[Tensor]:
    """_layer_chain_rule as a custom op returns it: its outputs may not alias one another (views
    are copied) or be missing (a fresh empty tensor for each gradient not needed)."""
    grads = _layer_chain_rule(grad_out, target, source, value, wq, wk, bk, wv, wo, heads, lse, mc, v,
                              query_side, key_side, n_heads, dropout_p, seed, allow_tf32, deterministic, needs)
    return [t.contiguous() if t is not None else heads.new_empty((0,)) for t in grads]


@_layer_backward.register_fake
def _(grad_out, target, source, value, wq, wk, bk, wv, wo, heads, lse, mc, v, query_side, key_side,
      n_heads, dropout_p, seed, allow_tf32, deterministic, needs):
    shapes = (target.shape, source.shape, value.shape, wq.shape, wq.shape[:1], wk.shape, wk.shape[:1],
              wv.shape, wv.shape[:1], wo.shape, wo.shape[:1])
    return [heads.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


def _setup_layer(ctx, inputs, output) -> None:
    target, source, value, wq, bq, wk, bk, wv, bv, wo, bo, n_heads, dropout_p, seed, allow_tf32, deterministic = inputs
    _, heads, lse, mc, v, query_side, key_side = output
    # heads and lse as the core's autograd would keep them; mc, v, wqb and K or G are a few MB at
    # most; the biases only for a backward that builds a graph (_differentiable_layer_gradients)
    ctx.save_for_backward(target, source, value, wq, bq, wk, bk, wv, bv, wo, bo, heads, lse, mc, v, query_side,
                          key_side, seed)
    ctx.config = (n_heads, dropout_p, allow_tf32, deterministic)
    ctx.set_materialize_grads(False)  # the residual outputs never get a gradient: no zeros for them


def _dropout_keep(num_rows: int, num_protos: int, n_heads: int, dropout_p: float,
                  seed: Tensor) -> Optional[Tensor]:  # keep: [H, R, S] bool, or None without dropout
    """The kernels' attention dropout mask for this seed, made explicit."""
    if dropout_p <= 0.0:
        return None
    return attn_kernels.dropout_keep_mask(num_rows, num_protos, n_heads, dropout_p, int(seed.item()), seed.device)


def _differentiable_layer_gradients(inputs: tuple, grad_out: Tensor, n_heads: int, dropout_p: float, seed: Tensor,
                                    needs: Sequence[bool]) -> LayerGradients:
    """The layer's gradients as differentiable functions of its inputs and grad_out, for a backward
    that builds a graph (create_graph=True: gradient penalties, Hessian-vector products): the layer
    recomputed by the eager reference, with the kernels' dropout mask made explicit, and
    differentiated by autograd. First-order values are the kernels' to rounding."""
    target, source = inputs[0], inputs[1]
    keep = _dropout_keep(target.numel() // target.shape[-1], source.shape[0], n_heads, dropout_p, seed)
    out = reprogramming_reference(*inputs, n_heads, dropout_p, keep=keep)
    wanted = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    return LayerGradients(*(next(grads) if need else None for need in needs))


def _layer_autograd(ctx, grad_out, *_residual_grads):
    if grad_out is None:  # the layer's output did not reach the loss
        return (None,) * 16
    (target, source, value, wq, bq, wk, bk, wv, bv, wo, bo, heads, lse, mc, v, query_side, key_side,
     seed) = ctx.saved_tensors
    n_heads, dropout_p, allow_tf32, deterministic = ctx.config
    needs = list(ctx.needs_input_grad[:_TENSOR_INPUTS])
    if torch.is_grad_enabled():  # backward(create_graph=True)
        grads = _differentiable_layer_gradients((target, source, value, wq, bq, wk, bk, wv, bv, wo, bo), grad_out,
                                                n_heads, dropout_p, seed, needs)
    else:
        grads = LayerGradients(*_layer_backward(grad_out, target, source, value, wq, wk, bk, wv, wo, heads, lse, mc,
                                                v, query_side, key_side, n_heads, dropout_p, seed, allow_tf32,
                                                deterministic, needs))
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None)


reprogramming_layer.register_autograd(_layer_autograd, setup_context=_setup_layer)


# ---------------------------------------------------------------------------------------------
# the core op
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("timellm_fast::reprogramming_attention_core_fwd", mutates_args=())
@dispatch.one_interpreted_launch_at_a_time
def _core_forward(
    x: Tensor,  # x: [R, *] (query_operand)
    mc: Tensor,  # mc: [H, W, S'] (prototype_operands)
    v: Tensor,  # v: [S, H, E]
    d_model: int, head_dim: int, factorized: bool, block_d: int,  # the CoreForm
    dropout_p: float,
    seed: Tensor,  # seed: [1] int64 on the device, read only when dropout_p > 0
    allow_tf32: bool, deterministic: bool,
) -> Tuple[Tensor, Tensor]:  # (heads_out: [R, H*E], lse: [H, R] fp32, base 2)
    form = CoreForm(d_model, head_dim, factorized, block_d)
    return attn_kernels.attention_forward(x, mc, v, form, dropout_p, seed, allow_tf32)


@_core_forward.register_fake
def _(x, mc, v, d_model, head_dim, factorized, block_d, dropout_p, seed, allow_tf32, deterministic):
    R = x.shape[0]
    S, H, E = v.shape
    return x.new_empty((R, H * E)), x.new_empty((H, R), dtype=torch.float32)


@torch.library.custom_op("timellm_fast::reprogramming_attention_core_bwd", mutates_args=())
@dispatch.one_interpreted_launch_at_a_time
def _core_backward(
    x: Tensor, mc: Tensor, v: Tensor,  # as in the forward
    heads_out: Tensor,  # heads_out: [R, H*E], the forward's
    grad_heads: Tensor,  # grad_heads: [R, H*E], its gradient
    lse: Tensor,  # lse: [H, R] fp32, the forward's
    d_model: int, head_dim: int, factorized: bool, block_d: int,  # the CoreForm
    dropout_p: float, seed: Tensor, allow_tf32: bool, deterministic: bool,
    need_x: bool, need_protos: bool,
) -> Tuple[Tensor, Tensor, Tensor]:  # CoreGradients: (dx, dmc, dv) fp32, [0] where not needed
    grads = attn_kernels.attention_backward(
        x, mc, v, heads_out, grad_heads, lse, CoreForm(d_model, head_dim, factorized, block_d), dropout_p, seed,
        allow_tf32, need_dx=need_x, need_protos=need_protos, deterministic=deterministic)
    # a fresh empty tensor for each missing gradient: custom-op outputs may not alias
    return tuple(g if g is not None else lse.new_empty((0,)) for g in grads)


@_core_backward.register_fake
def _(x, mc, v, heads_out, grad_heads, lse, d_model, head_dim, factorized, block_d, dropout_p, seed,
      allow_tf32, deterministic, need_x, need_protos):
    return (lse.new_empty(x.shape if need_x else (0,)), lse.new_empty(mc.shape if need_protos else (0,)),
            lse.new_empty(v.shape if need_protos else (0,)))


def _setup_core(ctx, inputs, output) -> None:
    x, mc, v, d_model, head_dim, factorized, block_d, dropout_p, seed, allow_tf32, deterministic = inputs
    heads_out, lse = output
    ctx.save_for_backward(x, mc, v, heads_out, lse, seed)
    ctx.form = CoreForm(d_model, head_dim, factorized, block_d)
    ctx.config = (dropout_p, allow_tf32, deterministic)
    ctx.set_materialize_grads(False)


def _core_autograd(ctx, grad_heads, _grad_lse):
    if grad_heads is None:  # the attention output did not reach the loss
        return (None,) * 11
    x, mc, v, heads_out, lse, seed = ctx.saved_tensors
    form, (dropout_p, allow_tf32, deterministic) = ctx.form, ctx.config
    need_x, need_mc, need_v = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # backward(create_graph=True): recomputed by the reference, as for the layer
        keep = _dropout_keep(x.shape[0], v.shape[0], v.shape[1], dropout_p, seed)
        heads = attention_core_reference(x, mc, v, form.d_logit, form.factorized, form.scale, dropout_p, keep)
        wanted = [t for t, need in ((x, need_x), (mc, need_mc), (v, need_v)) if need]
        grads = iter(torch.autograd.grad(heads.to(heads_out.dtype), wanted, grad_heads, create_graph=True,
                                         allow_unused=True))
        return tuple(next(grads) if need else None for need in (need_x, need_mc, need_v)) + (None,) * 8
    grads = CoreGradients(*_core_backward(x, mc, v, heads_out, grad_heads, lse, *form, dropout_p, seed, allow_tf32,
                                          deterministic, need_x, need_mc or need_v))  # fp32
    return ((grads.x.to(x.dtype) if need_x else None), (grads.mc.to(mc.dtype) if need_mc else None),
            (grads.v.to(v.dtype) if need_v else None)) + (None,) * 8


_core_forward.register_autograd(_core_autograd, setup_context=_setup_core)


def attention_core(
    x: Tensor,  # x: [R, *] (query_operand)
    mc: Tensor,  # mc: [H, W, S'] (prototype_operands)
    v: Tensor,  # v: [S, H, E]
    form: CoreForm, dropout_p: float = 0.0, allow_tf32: bool = False, deterministic: bool = False,
) -> Tensor:  # heads_out: [R, H*E], heads merged
    """The fused attention core with its autograd (the Triton path: the layer chose it)."""
    return _core_forward(x, mc, v, *form, dropout_p, draw_seed_tensor(dropout_p, x.device), allow_tf32,
                         deterministic)[0]
