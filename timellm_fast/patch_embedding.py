"""PatchEmbedding: op (validation, dispatch, autograd) and the drop-in nn.Module."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch, validation
from .reference import num_patches, patch_embedding_reference

OP_NAME = "patch_embedding"


def output_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The weight's dtype, or the autocast dtype when autocast is on (SPEC §1.1)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def draw_seed() -> int:
    """A Philox seed from torch's default generator, so torch.manual_seed reproduces dropout."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


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


class _PatchEmbeddingTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, patch_len, stride, P, out_dtype, dropout_p, seed):
        from .kernels import patch_embedding as kernel

        y = kernel.patch_embedding_fwd(x, weight, out_dtype, patch_len, stride, P, seed, dropout_p)
        ctx.save_for_backward(x, weight)
        ctx.cfg = (patch_len, stride, P, seed, dropout_p)
        return y.view(x.shape[0] * x.shape[1], P, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        from .kernels import patch_embedding as kernel

        x, weight = ctx.saved_tensors
        patch_len, stride, P, seed, dropout_p = ctx.cfg
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = kernel.patch_embedding_bwd(
            x, weight, grad_y.reshape(-1, weight.shape[0]), patch_len, stride, P, seed, dropout_p,
            need_dx, need_dw)
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dx, dw, None, None, None, None, None, None


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
        seed = draw_seed() if p > 0 else 0  # eval must not advance the user's RNG stream
        return _PatchEmbeddingTriton.apply(x, weight, patch_len, stride, P, out_dtype, p, seed)
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
