"""Eager reference of the two Time-LLM input layers, written from docs/spec.md §1.

These functions are the single statement of the math in PyTorch. They serve twice:

* as the **fallback** when a Triton kernel cannot run (CPU without the interpreter, an
  unsupported configuration), and
* as the **test oracle** when called on float64 tensors.

They take plain tensors (no modules) and do no input validation: the op layer validates
before it dispatches, so the fallback and the kernels see the same, already-checked inputs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def num_patches(seq_len: int, patch_len: int, stride: int) -> int:
    """P = (T + stride - patch_len) // stride + 1 (docs/spec.md §1.1 step 2)."""
    return (seq_len + stride - patch_len) // stride + 1


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any operand is float64 (the oracle), else float32 (docs/spec.md §1.1: compute in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def patch_embedding_reference(
    x: torch.Tensor,  # x: [B, N, T], any float dtype, any strides
    weight: torch.Tensor,  # weight: [d_model, patch_len, 3]
    patch_len: int,
    stride: int,
) -> torch.Tensor:  # y: [B*N, P, d_model] in the compute dtype (fp32, or fp64 for the oracle)
    """Replication pad right by `stride`, unfold into patches, circular conv (kernel 3, no bias).

    Dropout is not part of the reference math: the op layer applies it after this.
    """
    dt = compute_dtype(x, weight)
    B, N, T = x.shape
    xs = x.to(dt)
    # 1. replication pad: xp[t] = x[min(t, T-1)] for t < T + stride
    xp = torch.cat([xs, xs[..., -1:].expand(B, N, stride)], dim=-1)
    # 2. unfold: patch[p, c] = xp[p*stride + c]
    patches = xp.unfold(-1, patch_len, stride)  # [B, N, P, patch_len]
    P = patches.shape[2]
    patches = patches.reshape(B * N, P, patch_len)
    # 3. circular conv along the patch axis: y[p] = sum_k W[:, :, k] @ patch[(p + k - 1) mod P]
    channels_first = patches.transpose(1, 2)  # [B*N, patch_len, P]
    padded = F.pad(channels_first, (1, 1), mode="circular")
    y = F.conv1d(padded, weight.to(dt))  # [B*N, d_model, P]
    return y.transpose(1, 2)  # [B*N, P, d_model]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight, bias)


def reprogramming_reference(
    target: torch.Tensor,  # target: [B', L, d_model]
    source: torch.Tensor,  # source: [S, d_llm]
    value: torch.Tensor,  # value: [S, d_llm]
    wq: torch.Tensor, bq: torch.Tensor,  # [H*E, d_model], [H*E]
    wk: torch.Tensor, bk: torch.Tensor,  # [H*E, d_llm], [H*E]
    wv: torch.Tensor, bv: torch.Tensor,  # [H*E, d_llm], [H*E]
    wo: torch.Tensor, bo: torch.Tensor,  # [d_llm, H*E], [d_llm]
    n_heads: int,
    dropout_p: float = 0.0,
    training: bool = False,
    keep: Optional[torch.Tensor] = None,  # keep: [H, B'*L, S] bool, a given dropout mask (see attention_materialized)
) -> torch.Tensor:  # out: [B', L, d_llm]
    """The literal form of docs/spec.md §1.2: materializes A [B', H, L, S]. Oracle use only."""
    q = linear(target, wq, bq)
    k, v = linear(source, wk, bk), linear(value, wv, bv)
    return linear(attention_materialized(q, k, v, n_heads, dropout_p, training, keep=keep), wo, bo)


def attention_materialized(
    q: torch.Tensor,  # q: [B', L, H*E], the projected queries
    k: torch.Tensor,  # k: [S, H*E]
    v: torch.Tensor,  # v: [S, H*E]
    n_heads: int,
    dropout_p: float = 0.0,
    training: bool = False,
    dropout=None,  # a module applied to A instead of F.dropout (the layer's own nn.Dropout, as Time-LLM calls it)
    keep: Optional[torch.Tensor] = None,  # keep: [H, B'*L, S] bool: this mask instead of a fresh draw
) -> torch.Tensor:  # o: [B', L, H*E], heads merged
    """The attention core as Time-LLM computes it: A [B', H, L, S] exists. With `keep` the
    dropout is that mask, scaled by 1 / (1 - dropout_p) as the kernels apply it (a kernel's mask
    made explicit: kernels.attention.dropout_keep_mask)."""
    Bp, L, HE = q.shape
    S = k.shape[0]
    H = n_heads
    E = HE // H
    scores = torch.einsum("blhe,she->bhls", q.view(Bp, L, H, E), k.view(S, H, E))
    a = torch.softmax(scores / math.sqrt(E), dim=-1)
    if keep is not None:
        a = a * keep.view(H, Bp, L, S).transpose(0, 1).to(a.dtype) / (1.0 - dropout_p)
    elif dropout is not None:
        a = dropout(a)
    else:
        a = F.dropout(a, p=dropout_p, training=training)
    return torch.einsum("bhls,she->blhe", a, v.view(S, H, E)).reshape(Bp, L, HE)


def attention_core_reference(
    x: torch.Tensor,  # x: [R, *], the fused core's row operand (padded target, or Q)
    mc: torch.Tensor,  # mc: [H, W, S'], its prototype operand
    v: torch.Tensor,  # v: [S, H, E]
    d_logit: int, factorized: bool, scale: float,
    dropout_p: float = 0.0,
    keep: Optional[torch.Tensor] = None,  # keep: [H, R, S] bool, the kernels' dropout mask
) -> torch.Tensor:  # heads: [R, H*E]
    """What the fused core computes, from its own operands (kernels/attention.py's
    docstring): per head h, logits scale·(X_h·Y_h + c_h) with X_h = x[:, :D] and [Y_hᵀ; c_h] =
    mc[h, :D + 1] (factorized), or X_h = Q_h and Y_hᵀ = K_hᵀ = mc[h, :E] (standard)."""
    R = x.shape[0]
    S, H, E = v.shape
    D = d_logit
    if factorized:
        logits = torch.einsum("rd,hds->hrs", x[:, :D], mc[:, :D, :S]) + mc[:, D:D + 1, :S]
    else:
        logits = torch.einsum("rhe,hes->hrs", x.reshape(R, H, E), mc[:, :E, :S])
    a = torch.softmax(logits * scale, dim=-1)  # [H, R, S]
    if keep is not None:
        a = a * keep.to(a.dtype) / (1.0 - dropout_p)
    return torch.einsum("hrs,she->rhe", a, v).reshape(R, H * E)


def reprogramming_sdpa_fold(
    target: torch.Tensor,  # target: [B', L, d_model]
    source: torch.Tensor,  # source: [S, d_llm]
    value: torch.Tensor,  # value: [S, d_llm]
    wq: torch.Tensor, bq: torch.Tensor,  # [H*E, d_model], [H*E]
    wk: torch.Tensor, bk: torch.Tensor,  # [H*E, d_llm], [H*E]
    wv: torch.Tensor, bv: torch.Tensor,  # [H*E, d_llm], [H*E]
    wo: torch.Tensor, bo: torch.Tensor,  # [d_llm, H*E], [d_llm]
    n_heads: int,
    key_value: Optional[tuple] = None,  # precomputed (K, V), each [S, H*E]
) -> torch.Tensor:  # out: [B', L, d_llm]
    """docs/spec.md §1.2 without dropout, never holding A [B', H, L, S].

    Every query row attends to the same K/V, so the B'·L rows fold into one long sequence per
    head and a single scaled_dot_product_attention call ([1, H, B'·L, E] against [1, H, S, E])
    runs it with the fused (flash / memory-efficient) backends where PyTorch has them.
    """
    Bp, L, d_model = target.shape
    q = linear(target.reshape(Bp * L, d_model), wq, bq)  # [R, H*E]
    if key_value is None:
        k, v = linear(source, wk, bk), linear(value, wv, bv)  # [S, H*E] each
    else:
        k, v = key_value
    o = attention_sdpa_folded(q, k, v, n_heads)  # [R, H*E]
    return linear(o.reshape(Bp, L, wq.shape[0]), wo, bo)


def attention_sdpa_folded(
    q: torch.Tensor,  # q: [R, H*E], all B'·L query rows
    k: torch.Tensor,  # k: [S, H*E]
    v: torch.Tensor,  # v: [S, H*E]
    n_heads: int,
) -> torch.Tensor:  # o: [R, H*E], heads merged
    """The attention core as one scaled_dot_product_attention call: [1, H, R, E] against
    [1, H, S, E] (the head split is a view; merging the heads back is a copy)."""
    R, HE = q.shape
    S = k.shape[0]
    H = n_heads
    E = HE // H

    def heads_first(x: torch.Tensor, n: int) -> torch.Tensor:  # [n, H*E] -> [1, H, n, E]
        return x.reshape(n, H, E).transpose(0, 1).unsqueeze(0)

    o = F.scaled_dot_product_attention(heads_first(q, R), heads_first(k, S), heads_first(v, S))  # [1, H, R, E]
    return o.squeeze(0).transpose(0, 1).reshape(R, HE)
