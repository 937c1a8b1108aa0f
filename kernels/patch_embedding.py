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

Windowed kernels (every docs/spec.md §2 shape):

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
(timellm_fast/patch_embedding.py) calls; bench/aot_configs.py lists every build the launchers can
choose.
"""
from __future__ import annotations

from .patch_embedding_backward import patch_embedding_bwd
from .patch_embedding_forward import patch_embedding_fwd

__all__ = ["patch_embedding_bwd", "patch_embedding_fwd"]
