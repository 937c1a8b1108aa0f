"""PatchEmbedding: op (validation, dispatch, autograd) and the drop-in nn.Module."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch, validation
from .reference import num_patches, patch_embedding_reference
from .triton_op import TritonOp

if dispatch.triton_import_error() is None:
    from .kernels import patch_embedding as pe_kernels
else:  # without Triton dispatch.choose sends every call to the eager path, which needs no kernel
    pe_kernels = None

OP_NAME = "patch_embedding"


def output_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The weight's dtype, or the autocast dtype when autocast is on (SPEC §1.1)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
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
    if T < patch_len:
        raise ValueError(f"x has T={T} time steps (last dim), fewer than patch_len={patch_len}")
    return num_patches(T, patch_len, stride)


def _unsupported(x: torch.Tensor, weight: torch.Tensor, P: int, dropout_p: float) -> Optional[str]:
    if x.dtype == torch.float64 or weight.dtype == torch.float64:
        return "float64 runs in eager (the kernels compute in fp32)"
    M = x.shape[0] * x.shape[1] * P
    if dropout_p > 0 and M * weight.shape[0] >= 2**31:
        return "output has >= 2**31 elements, beyond the int32 Philox offsets of the dropout"
    return None


# The Triton path (timellm_fast.triton_op): custom ops timellm_fast::patch_embedding_fwd / _bwd
# for torch.compile and friends, a direct autograd.Function in plain eager mode, the same launchers
# behind both. The dropout seed travels as a tensor so that drawing it inside a compiled graph is
# no graph break.


def _launch_forward(
    x: torch.Tensor,  # x: [B, N, T]
    weight: torch.Tensor,  # weight: [D, patch_len, 3]
    patch_len: int, stride: int, out_dtype: torch.dtype, dropout_p: float,
    seed: torch.Tensor,  # seed: [1] int64 on x's device, read only when dropout_p > 0
) -> torch.Tensor:  # y: [B*N, P, D]
    B, N, T = x.shape
    P = num_patches(T, patch_len, stride)
    y = pe_kernels.patch_embedding_fwd(x, weight, out_dtype, patch_len, stride, P, seed, dropout_p)
    return y.view(B * N, P, weight.shape[0])


def _forward_fake(x, weight, patch_len, stride, out_dtype, dropout_p, seed):
    B, N, T = x.shape
    return x.new_empty((B * N, num_patches(T, patch_len, stride), weight.shape[0]), dtype=out_dtype)


def _launch_backward(
    x: torch.Tensor,  # x: [B, N, T]
    weight: torch.Tensor,  # weight: [D, patch_len, 3]
    grad_y: torch.Tensor,  # grad_y: [B*N, P, D]
    patch_len: int, stride: int, dropout_p: float,
    seed: torch.Tensor,  # seed: [1] int64, the forward's
    need_dx: bool, need_dw: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:  # (dx: [B, N, T] or [0], dw: [D, patch_len, 3] or [0])
    P = num_patches(x.shape[-1], patch_len, stride)
    dx, dw = pe_kernels.patch_embedding_bwd(
        x, weight, grad_y.reshape(-1, weight.shape[0]), patch_len, stride, P, seed, dropout_p,
        need_dx, need_dw)
    dx = dx if dx is not None else x.new_empty((0,))
    dw = dw.to(weight.dtype) if dw is not None else weight.new_empty((0,))
    return dx, dw


def _backward_fake(x, weight, grad_y, patch_len, stride, dropout_p, seed, need_dx, need_dw):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty((0,))
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else weight.new_empty((0,))
    return dx, dw


def _save(ctx, inputs, y):
    x, weight, patch_len, stride, _out_dtype, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, seed)
    ctx.cfg = (patch_len, stride, dropout_p)


def _gradients(ctx, run_backward, grad_y):
    x, weight, seed = ctx.saved_tensors
    patch_len, stride, dropout_p = ctx.cfg
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = run_backward(x, weight, grad_y, patch_len, stride, dropout_p, seed, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None, None, None


#: patch_embedding_triton(x, weight, patch_len, stride, out_dtype, dropout_p, seed) -> y [B*N, P, D]
patch_embedding_triton = TritonOp(
    "patch_embedding", forward=_launch_forward, forward_fake=_forward_fake, backward=_launch_backward,
    backward_fake=_backward_fake, save=_save, gradients=_gradients, differentiable=2)


def draw_seed_tensor(dropout_p: float, device: torch.device) -> torch.Tensor:
    """A Philox seed, [1] int64 on `device`, from torch's generator of that device.

    torch.manual_seed reproduces it. On CUDA the draw is a device op, so a captured CUDA graph
    draws a fresh seed on every replay (torch advances graph-safe generators per replay) and the
    backward, replayed in the same graph, reads the forward's. Without dropout nothing is drawn,
    so eval never advances the user's RNG stream: the seed argument is then never read by the
    kernels, and is one cached zero per device, so an eval forward is one kernel launch, not a
    memset and a launch. Not cached while torch.compile traces or a CUDA graph captures (a tensor
    made there is a fake, or is filled only when the graph replays).
    """
    if dropout_p > 0:
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    if device.__class__ is not torch.device:
        device = torch.device(device)
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.zeros((1,), dtype=torch.int64, device=device)
    seed = _UNUSED_SEEDS.get(device)  # found at once for a tensor's own .device (indexed on CUDA)
    if seed is None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        seed = _UNUSED_SEEDS.get(device)
        if seed is None:
            seed = _UNUSED_SEEDS[device] = torch.zeros((1,), dtype=torch.int64, device=device)
    return seed


_UNUSED_SEEDS: dict = {}


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
    path = dispatch.choose(OP_NAME, x.device, _unsupported(x, weight, P, p))
    if path == "triton":
        return patch_embedding_triton(x, weight, patch_len, stride, out_dtype, p, draw_seed_tensor(p, x.device))
    with torch.autocast(x.device.type, enabled=False):
        y = patch_embedding_reference(x, weight, patch_len, stride)
    return F.dropout(y, p=p, training=p > 0).to(out_dtype)


class TokenEmbedding(nn.Module):
    """Holds the conv weight under the original name: value_embedding.tokenConv.weight."""

    def __init__(self, c_in: int, d_model: int):
        super().__init__()
        self.tokenConv = nn.Conv1d(c_in, d_model, kernel_size=3, padding=1,
                                   padding_mode="circular", bias=False)
        nn.init.kaiming_normal_(self.tokenConv.weight, mode="fan_in", nonlinearity="leaky_relu")


class PatchEmbedding(nn.Module):
    """Drop-in for Time-LLM's PatchEmbedding: ``forward(x [B, N, T]) -> (y [B*N, P, d_model], N)``."""

    def __init__(self, d_model: int, patch_len: int, stride: int, dropout: float):
        super().__init__()
        self.d_model = validation.positive_int("d_model", d_model)
        self.patch_len = validation.positive_int("patch_len", patch_len)
        self.stride = validation.positive_int("stride", stride)
        self.dropout_p = validation.dropout_prob("dropout", dropout)
        self.value_embedding = TokenEmbedding(patch_len, d_model)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        y = patch_embedding(x, self.value_embedding.tokenConv.weight, self.patch_len, self.stride,
                            self.dropout_p, self.training)
        return y, x.shape[1]

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, patch_len={self.patch_len}, stride={self.stride}, "
                f"dropout={self.dropout_p}")
