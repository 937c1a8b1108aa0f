"""PatchEmbedding: the fused op (validation, dispatch, custom ops with their autograd) and the
drop-in nn.Module (docs/spec.md §1.1, §4.1).

On the Triton path the op is a pair of torch.library custom ops, ``timellm_fast::patch_embedding_fwd``
and ``_bwd`` (fake implementations for torch.compile and export), the forward's autograd registered
on it: one route in eager mode and under tracing alike. The dropout seed travels as a tensor so that
drawing it inside a compiled graph is no graph break.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, validation
from .reference import num_patches, patch_embedding_reference

if dispatch.TRITON_IMPORT_ERROR is None:
    from .kernels import patch_embedding as pe_kernels
else:  # without Triton dispatch.choose sends every call to the eager path, which needs no kernel
    pe_kernels = None

OP_NAME = "patch_embedding"


def output_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The weight's dtype, or the autocast dtype when autocast is on (docs/spec.md §1.1)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def check_inputs(x, weight, patch_len: int, stride: int, dropout_p: float) -> int:
    """Validates a call and returns P, the number of patches."""
    validation.positive_int("patch_len", patch_len)
    validation.positive_int("stride", stride)
    validation.dropout_prob("dropout", dropout_p)
    validation.float_tensor("x", x, 3, "[B, N, T]")
    validation.float_tensor("weight", weight, 3, "[d_model, patch_len, 3]")
    if weight.shape[1:] != (patch_len, 3) or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [d_model, {patch_len}, 3] (patch_len={patch_len}), "
                         f"got {tuple(weight.shape)}")
    validation.same_device("weight", weight, "x", x)
    T = x.shape[-1]
    if T == 0 or T + stride < patch_len:  # the padded series must hold one patch, as in Time-LLM's unfold
        raise ValueError(f"x has T={T} time steps (last dim): padded by stride={stride} that is fewer than "
                         f"patch_len={patch_len}, so there is no patch")
    return num_patches(T, patch_len, stride)


def _unsupported(x: torch.Tensor, weight: torch.Tensor, P: int, dropout_p: float) -> Optional[str]:
    if x.dtype == torch.float64 or weight.dtype == torch.float64:
        return "float64 runs in eager (the kernels compute in fp32)"
    if dropout_p >= 1.0:
        return "dropout p = 1 zeroes the output: eager"
    M = x.shape[0] * x.shape[1] * P
    if dropout_p > 0 and M * weight.shape[0] >= 2**31:
        return "output has >= 2**31 elements, beyond the int32 Philox offsets of the dropout"
    return None


@torch.library.custom_op("timellm_fast::patch_embedding_fwd", mutates_args=())
@dispatch.one_interpreted_launch_at_a_time
def _forward(
    x: Tensor,  # x: [B, N, T]
    weight: Tensor,  # weight: [D, patch_len, 3]
    patch_len: int, stride: int, out_dtype: torch.dtype, dropout_p: float,
    seed: Tensor,  # seed: [1] int64 on x's device, read only when dropout_p > 0
) -> Tensor:  # y: [B*N, P, D]
    B, N, T = x.shape
    P = num_patches(T, patch_len, stride)
    y = pe_kernels.patch_embedding_fwd(x, weight, out_dtype, patch_len, stride, P, seed, dropout_p)
    return y.view(B * N, P, weight.shape[0])


@_forward.register_fake
def _(x, weight, patch_len, stride, out_dtype, dropout_p, seed):
    B, N, T = x.shape
    return x.new_empty((B * N, num_patches(T, patch_len, stride), weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("timellm_fast::patch_embedding_bwd", mutates_args=())
@dispatch.one_interpreted_launch_at_a_time
def _backward(
    x: Tensor,  # x: [B, N, T]
    weight: Tensor,  # weight: [D, patch_len, 3]
    grad_y: Tensor,  # grad_y: [B*N, P, D]
    patch_len: int, stride: int, dropout_p: float,
    seed: Tensor,  # seed: [1] int64, the forward's
    need_dx: bool, need_dw: bool,
) -> Tuple[Tensor, Tensor]:  # (dx: [B, N, T] or [0], dw: [D, patch_len, 3] or [0])
    P = num_patches(x.shape[-1], patch_len, stride)
    dx, dw = pe_kernels.patch_embedding_bwd(
        x, weight, grad_y.reshape(-1, weight.shape[0]), patch_len, stride, P, seed, dropout_p,
        need_dx, need_dw)
    dx = dx if dx is not None else x.new_empty((0,))
    dw = dw.to(weight.dtype) if dw is not None else weight.new_empty((0,))
    return dx, dw


@_backward.register_fake
def _(x, weight, grad_y, patch_len, stride, dropout_p, seed, need_dx, need_dw):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty((0,))
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else weight.new_empty((0,))
    return dx, dw


def _setup(ctx, inputs, output) -> None:
    x, weight, patch_len, stride, out_dtype, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, seed)
    ctx.config = (patch_len, stride, dropout_p, out_dtype)


def _autograd(ctx, grad_y):
    x, weight, seed = ctx.saved_tensors
    patch_len, stride, dropout_p, out_dtype = ctx.config
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():  # backward(create_graph=True): gradients that differentiate again
        dx, dw = _differentiable_gradients(x, weight, grad_y, patch_len, stride, dropout_p, out_dtype, seed,
                                           need_dx, need_dw)
    else:
        dx, dw = _backward(x, weight, grad_y, patch_len, stride, dropout_p, seed, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None, None, None


def _differentiable_gradients(x, weight, grad_y, patch_len, stride, dropout_p, out_dtype, seed, need_dx, need_dw):
    """(dx, dw) as differentiable functions of x, weight and grad_y, for a backward that builds a
    graph (gradient penalties, Hessian-vector products): the layer recomputed by the eager reference,
    with the kernel's dropout mask made explicit, and differentiated by autograd. The first-order
    values are the kernels' to rounding; the second-order ones are the reference's."""
    y = patch_embedding_reference(x, weight, patch_len, stride)  # [B*N, P, D] fp32
    if dropout_p > 0:
        # the kernel's mask: its forward on all-ones operands is 3·patch_len where kept, 0 where dropped
        P = num_patches(x.shape[-1], patch_len, stride)
        ones = pe_kernels.patch_embedding_fwd(torch.ones(x.shape, device=x.device), torch.ones(weight.shape, device=x.device),
                                              torch.float32, patch_len, stride, P, seed, dropout_p)
        y = y * (ones.view_as(y) != 0) / (1.0 - dropout_p)
    inputs = [t for t, need in ((x, need_dx), (weight, need_dw)) if need]
    grads = iter(torch.autograd.grad(y.to(out_dtype), inputs, grad_y, create_graph=True, allow_unused=True))
    dx = next(grads) if need_dx else None
    dw = next(grads) if need_dw else None
    return dx, dw


_forward.register_autograd(_autograd, setup_context=_setup)


def draw_seed_tensor(dropout_p: float, device: torch.device) -> torch.Tensor:
    """A Philox seed, [1] int64 on `device`, from torch's generator of that device.

    torch.manual_seed reproduces it. On CUDA the draw is a device op, so a captured CUDA graph
    draws a fresh seed on every replay (torch advances graph-safe generators per replay) and the
    backward, replayed in the same graph, reads the forward's. Without dropout nothing is drawn,
    so eval never advances the user's RNG stream: the kernels then never use the seed, and an
    uninitialized tensor stands for it (no fill kernel; made anew on every call, so it is what
    the current mode makes: a fake tensor under FakeTensorMode, a graph's own under capture).
    """
    if dropout_p > 0:
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    return torch.empty((1,), dtype=torch.int64, device=device)


def patch_embedding(
    x: torch.Tensor,  # x: [B, N, T], any float dtype, any strides
    weight: torch.Tensor,  # weight: [d_model, patch_len, 3]
    patch_len: int,
    stride: int,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:  # y: [B*N, P, d_model] in the weight's dtype (or the autocast dtype)
    """Pad + unfold + circular conv + dropout, on the Triton path when it can run."""
    P = check_inputs(x, weight, patch_len, stride, dropout_p)
    p = dropout_p if training else 0.0
    out_dtype = output_dtype(x, weight)
    unsupported = _unsupported(x, weight, P, p)
    if unsupported is None and dispatch.transform_active():
        unsupported = "forward-mode AD or a torch.func transform is active (the kernels have no rule for it)"
    path = dispatch.choose(OP_NAME, x.device, unsupported)
    if path == "triton":
        return _forward(x, weight, patch_len, stride, out_dtype, p, draw_seed_tensor(p, x.device))
    with torch.autocast(x.device.type, enabled=False):
        y = patch_embedding_reference(x, weight, patch_len, stride)
    return F.dropout(y, p=p, training=p > 0).to(out_dtype)


class ReplicationPad1d(nn.Module):
    """Time-LLM's pad of the series [B, N, T]: the last value repeated padding[-1] times on the right."""

    def __init__(self, padding: Tuple[int, int]):
        super().__init__()
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, N, T] -> [B, N, T + padding[-1]]
        return torch.cat([x, x[:, :, -1:].repeat(1, 1, self.padding[-1])], dim=-1)

    def extra_repr(self) -> str:
        return f"padding={self.padding}"


class TokenEmbedding(nn.Module):
    """Time-LLM's token embedding: the circular Conv1d over the patch axis, weight under the
    original name value_embedding.tokenConv.weight."""

    def __init__(self, c_in: int, d_model: int):
        super().__init__()
        self.tokenConv = nn.Conv1d(c_in, d_model, kernel_size=3, padding=1,
                                   padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.tokenConv.weight, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B*N, P, patch_len] -> [B*N, P, d_model]
        return self.tokenConv(x.permute(0, 2, 1)).transpose(1, 2)


def is_token_conv(conv: nn.Conv1d, patch_len: int) -> bool:
    """Whether `conv` is Time-LLM's token-embedding convolution, which the kernels compute (kernel 3,
    circular padding 1, unit stride and dilation, one group, no bias, patch_len input channels):
    the fused path's condition and patch_model's."""
    return (conv.bias is None and conv.kernel_size == (3,) and conv.padding == (1,) and conv.padding_mode == "circular"
            and conv.stride == (1,) and conv.dilation == (1,) and conv.groups == 1 and conv.in_channels == patch_len)


class PatchEmbedding(nn.Module):
    """Drop-in for Time-LLM's PatchEmbedding: ``forward(x [B, N, T]) -> (y [B*N, P, d_model], N)``.

    The same submodules as the original (``padding_patch_layer``, ``value_embedding.tokenConv``,
    ``dropout``). Where each of them is plain (dispatch.plain: no hooks, no overridden forward,
    the original's settings) the whole layer is one fused op, whose dropout follows the
    ``dropout`` module's ``p`` and ``training``; anything else runs the original's calls of its
    submodules, as does forward-mode AD or a torch.func transform.
    """

    def __init__(self, d_model: int, patch_len: int, stride: int, dropout: float):
        super().__init__()
        self.d_model = validation.positive_int("d_model", d_model)
        self.patch_len = validation.positive_int("patch_len", patch_len)
        self.stride = validation.positive_int("stride", stride)
        self.padding_patch_layer = ReplicationPad1d((0, self.stride))
        self.value_embedding = TokenEmbedding(self.patch_len, self.d_model)
        self.dropout = nn.Dropout(validation.dropout_prob("dropout", dropout))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        conv, dropout = self._fused_submodules()
        if conv is not None and conv.weight.is_meta and isinstance(x, torch.Tensor) and x.is_meta:
            return self._forward_through_submodules(x)  # shapes only: the original's ops
        if conv is None or dispatch.transform_active():
            if isinstance(x, torch.Tensor):  # recorded as eager; TIMELLM_FAST_BACKEND=triton raises
                dispatch.choose(OP_NAME, x.device, "the submodules have hooks, their own forward or other settings"
                                if conv is None else "forward-mode AD or a torch.func transform is active")
            return self._forward_through_submodules(x)
        y = patch_embedding(x, conv.weight, self.patch_len, self.stride, dropout.p, dropout.training)
        return y, x.shape[1]

    def _fused_submodules(self) -> tuple:
        """(tokenConv, dropout) where the fused op computes what the submodules' calls compute,
        else (None, None)."""
        modules = self._modules
        pad, embedding, dropout = modules.get("padding_patch_layer"), modules.get("value_embedding"), modules.get("dropout")
        conv = embedding._modules.get("tokenConv") if isinstance(embedding, TokenEmbedding) else None
        if (conv is not None and dispatch.plain(pad, ReplicationPad1d) and dispatch.plain(embedding, TokenEmbedding)
                and dispatch.plain(conv, nn.Conv1d) and dispatch.plain(dropout, nn.Dropout)
                and not dispatch.global_module_hooks() and tuple(pad.padding) == (0, self.stride)
                and is_token_conv(conv, self.patch_len)):
            return conv, dropout
        return None, None

    def _forward_through_submodules(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Time-LLM's forward, call for call: what hooks, adapters and transforms see."""
        n_vars = x.shape[1]
        x = self.padding_patch_layer(x)
        x = x.unfold(dimension=-1, size=self.patch_len, step=self.stride)
        x = torch.reshape(x, (x.shape[0] * x.shape[1], x.shape[2], x.shape[3]))
        return self.dropout(self.value_embedding(x)), n_vars

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, patch_len={self.patch_len}, stride={self.stride}"
