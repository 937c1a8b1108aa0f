"""Shared pieces of the benchmark suites: docs/spec.md §2 shapes, the peers, timing, FLOP/byte models.

Every case times all its implementations in the same process on the same device, so each
claim is a ratio (docs/spec.md §5). GPU timing is `triton.testing.do_bench` (warm-up, CUDA-event
timing, L2 flush, median); CPU timing is a wall-clock median and says nothing about kernels.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from timellm_fast import PatchEmbedding, ReprogrammingLayer
from timellm_fast.data import ett_windows
from timellm_fast.models import EagerPatchEmbedding, EagerReprogrammingLayer
from timellm_fast.reference import attention_materialized, attention_sdpa_folded, reprogramming_sdpa_fold
from timellm_fast.reprogramming_op import (align_prototypes, attention_core, core_form, factorized_query_side,
                                         mc_from_keys, query_operand)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
#: reduced shapes and eager-only peers on CPU (the suites must run in CI, not time kernels there)
#: TIMELLM_FAST_BENCH_FULL=1 forces the full grid anywhere (to list or order it: --collect-only)
FULL = (ON_GPU and os.environ.get("TIMELLM_FAST_BENCH_QUICK", "0") == "0") or \
    os.environ.get("TIMELLM_FAST_BENCH_FULL", "0") == "1"

H100_HBM_BYTES_PER_S = 3.35e12
H100_PEAK_FLOPS = {torch.bfloat16: 790e12, torch.float16: 790e12, torch.float32: 67e12}  # fp32: no TF32
#: HBM bandwidth of the GPU the run is on (datasheet values), when it is not an H100 SXM: docs/spec.md's
#: fractions stay "of the H100", and the HBM target is judged against the device's own limit too
_HBM_BYTES_PER_S_BY_NAME = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12))


@functools.lru_cache(maxsize=None)
def device_hbm_bytes_per_s() -> Optional[float]:
    if not ON_GPU:
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in _HBM_BYTES_PER_S_BY_NAME if key in name), None)


@dataclass(frozen=True)
class Shape:
    name: str
    rows: int  # B·N series (patch embedding) = B' (reprogramming)
    d_model: int
    d_keys: int
    d_llm: int
    seq_len: int = 512
    patch_len: int = 16
    stride: int = 8
    n_heads: int = 8
    num_protos: int = 1000

    @property
    def patches(self) -> int:
        return (self.seq_len + self.stride - self.patch_len) // self.stride + 1


# docs/spec.md §2 (folded B·N where the table gives one; channel-independent rows = 24)
SPEC_SHAPES = [
    Shape("explained-gpt2", 28, 32, 32, 768),
    Shape("etth1-independent", 24, 32, 128, 4096),
    Shape("etth1-folded", 168, 32, 128, 4096),
    Shape("weather-folded", 504, 32, 32, 4096),
    Shape("ecl-folded", 7704, 16, 32, 4096),
    Shape("traffic-folded", 20688, 16, 32, 4096),
]
CPU_SHAPES = [Shape("cpu-tiny", 4, 16, 16, 64, seq_len=64, n_heads=2, num_protos=37)]
SHAPES = SPEC_SHAPES if FULL else CPU_SHAPES
DTYPES = [torch.bfloat16, torch.float32] if ON_GPU or FULL else [torch.float32]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def peak_memory_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak allocated bytes during one call, above what was allocated before it (GPU only)."""
    if not ON_GPU:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def gpu_activity(fn: Callable[[], object], calls: int = 3) -> Dict[str, Optional[float]]:
    """Device activities (kernels, memsets, copies) per call of fn, and their summed device time
    per call, from torch.profiler (GPU only). The count is the launch count that dominates the
    small official shapes; the time is what the GPU itself spent, without the host's launch
    overhead that the wall-clock median includes (one stream: the activities do not overlap)."""
    if not ON_GPU:
        return dict(gpu_kernels=None, device_seconds=None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return dict(gpu_kernels=round(len(events) / calls),
                device_seconds=sum(e.time_range.elapsed_us() for e in events) / calls / 1e6)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def rates(flops: float, bytes_moved: float, seconds: float, dtype: torch.dtype,
          device_seconds: Optional[float] = None) -> Dict[str, float]:
    """Rates over the wall-clock median `seconds`; the `kernel_` ones over the GPU's own busy
    time (`device_seconds`, profiler), which is what a roofline fraction of a kernel means."""
    tflops = flops / seconds / 1e12
    gbs = bytes_moved / seconds / 1e9
    device_hbm = device_hbm_bytes_per_s()
    out = dict(tflops=tflops, gbs=gbs, frac_flops=tflops * 1e12 / H100_PEAK_FLOPS[dtype],
               frac_hbm=gbs * 1e9 / H100_HBM_BYTES_PER_S,
               frac_hbm_device=None if device_hbm is None else gbs * 1e9 / device_hbm)
    if device_seconds:
        kernel_bw = bytes_moved / device_seconds
        out.update(kernel_tflops=flops / device_seconds / 1e12, kernel_gbs=kernel_bw / 1e9,
                   kernel_frac_hbm=kernel_bw / H100_HBM_BYTES_PER_S,
                   kernel_frac_hbm_device=None if device_hbm is None else kernel_bw / device_hbm)
    return out


# ---- patch embedding ---------------------------------------------------------------------------

def patch_embedding_cost(s: Shape, dtype: torch.dtype, backward: bool) -> tuple:
    """(FLOPs, minimum HBM bytes): read x and W, write y (and read dy, write dW for backward)."""
    e = torch.finfo(dtype).bits // 8
    m = s.rows * s.patches
    flops = 2.0 * m * 3 * s.patch_len * s.d_model
    nbytes = s.rows * s.seq_len * e + m * s.d_model * e
    if backward:
        flops *= 2  # dW only: the series carries no gradient in Time-LLM
        nbytes += m * s.d_model * e
    return flops, nbytes


def patch_embedding_impls(s: Shape, dtype: torch.dtype) -> Dict[str, Callable]:
    """name -> module factory; every module has the same weights."""
    torch.manual_seed(0)
    ours = PatchEmbedding(s.d_model, s.patch_len, s.stride, 0.0).to(DEVICE, dtype)
    eager = EagerPatchEmbedding(s.d_model, s.patch_len, s.stride, 0.0).to(DEVICE, dtype)
    eager.load_state_dict(ours.state_dict())
    impls = {"eager": eager, "ours": ours}
    if FULL:
        impls["compile"] = torch.compile(eager)
        impls["compile-max-autotune"] = torch.compile(eager, mode="max-autotune-no-cudagraphs")
    return impls


def patch_embedding_input(s: Shape, dtype: torch.dtype) -> torch.Tensor:
    windows, _ = ett_windows((s.rows + 6) // 7, s.seq_len)  # [B, T, 7] real ETTh1 when present
    x = windows.permute(0, 2, 1).reshape(-1, s.seq_len)[:s.rows]
    return x.reshape(s.rows, 1, s.seq_len).to(DEVICE, dtype)


# ---- reprogramming -----------------------------------------------------------------------------

def reprogramming_cost(s: Shape, dtype: torch.dtype, backward: bool) -> tuple:
    """(FLOPs, minimum HBM bytes) of docs/spec.md §2.1: Q, K/V projections, QKᵀ + AV, out projection."""
    e = torch.finfo(dtype).bits // 8
    rows = s.rows * s.patches
    he = s.n_heads * s.d_keys
    flops = (2.0 * rows * s.d_model * he + 2 * 2.0 * s.num_protos * s.d_llm * he
             + 4.0 * rows * s.num_protos * he + 2.0 * rows * he * s.d_llm)
    nbytes = e * (rows * s.d_model + s.num_protos * s.d_llm + rows * s.d_llm
                  + he * (s.d_model + 2 * s.d_llm) + s.d_llm * he)
    if backward:
        flops *= 3.5  # attention backward recomputes P: ~2.5x its forward; GEMMs 2x
        nbytes *= 3
    return flops, nbytes


class SdpaFold(torch.nn.Module):
    """docs/spec.md §5 (c): cuBLAS projections + SDPA with all B'·L queries folded into one sequence."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, target, source, value):
        m = self.layer
        return reprogramming_sdpa_fold(
            target, source, value, m.query_projection.weight, m.query_projection.bias,
            m.key_projection.weight, m.key_projection.bias, m.value_projection.weight,
            m.value_projection.bias, m.out_projection.weight, m.out_projection.bias, m.n_heads)


def reprogramming_impls(s: Shape, dtype: torch.dtype) -> Dict[str, Callable]:
    torch.manual_seed(0)
    ours = ReprogrammingLayer(s.d_model, s.n_heads, s.d_keys, s.d_llm, 0.0).to(DEVICE, dtype)
    eager = EagerReprogrammingLayer(s.d_model, s.n_heads, s.d_keys, s.d_llm, 0.0).to(DEVICE, dtype)
    eager.load_state_dict(ours.state_dict())
    impls = {"eager": eager, "sdpa-fold": SdpaFold(eager), "ours": ours}
    if FULL:
        impls["compile"] = torch.compile(eager)
        impls["compile-max-autotune"] = torch.compile(eager, mode="max-autotune-no-cudagraphs")
    return impls


def reprogramming_inputs(s: Shape, dtype: torch.dtype, requires_grad: bool) -> tuple:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(s.rows, s.patches, s.d_model, generator=g).to(DEVICE, dtype)
    protos = (torch.randn(s.num_protos, s.d_llm, generator=g) / math.sqrt(s.d_llm)).to(DEVICE, dtype)
    return target.requires_grad_(requires_grad), protos.requires_grad_(requires_grad)


# ---- the attention core alone (ours vs SDPA on the same folded problem) -----------------------

def attention_core_cost(s: Shape, dtype: torch.dtype, backward: bool) -> tuple:
    """(FLOPs, minimum HBM bytes) of Q = target·Wqᵀ + bq and softmax(QKᵀ/√E)·V over the folded
    rows. Forward + backward counts what a recomputing backward executes: the Q projection three
    times (forward, dQ·Wq, dQᵀ·target) and the attention 3.5 times (FlashAttention's convention:
    the backward is 2.5 forward GEMM-pairs, QKᵀ recomputed)."""
    e = torch.finfo(dtype).bits // 8
    rows = s.rows * s.patches
    he = s.n_heads * s.d_keys
    q_flops, att_flops = 2.0 * rows * s.d_model * he, 4.0 * rows * s.num_protos * he
    nbytes = e * (rows * s.d_model + he * s.d_model + 2 * s.num_protos * he + rows * he)
    if not backward:
        return q_flops + att_flops, nbytes
    # backward reads target, Wq, K, V, O's gradient again and writes dQ, dK, dV (and d target)
    nbytes += e * (rows * s.d_model + 2 * s.num_protos * he + 2 * rows * he + 2 * s.num_protos * he)
    return 3 * q_flops + 3.5 * att_flops, nbytes


def attention_core_factorized_flops(s: Shape, backward: bool) -> float:
    """MMA FLOPs our factorized kernels execute on the core (docs/spec.md §1.3): 2·D + 2·E per (row, prototype,
    head) element forward, 6·D + 4·E more for the default backward; D = d_model padded to the MMA's
    16 (32 at d_model 17..32). The tensor-core bound of a run is these FLOPs at 790 TFLOP/s."""
    d = 16 if s.d_model <= 16 else 32 if s.d_model <= 32 else 64
    elements = s.rows * s.patches * s.num_protos * s.n_heads
    per_element = 2 * d + 2 * s.d_keys + ((6 * d + 4 * s.d_keys) if backward else 0)
    return float(elements * per_element)


def _core_eager(rows, wq, bq, kv, n_heads):
    """Time-LLM's attention on the folded rows (B' = 1, L = R): [1, H, R, S] is materialized."""
    k, v = kv.split(wq.shape[0], dim=1)
    return attention_materialized(F.linear(rows, wq, bq).unsqueeze(0), k, v, n_heads).squeeze(0)


def _core_sdpa(rows, wq, bq, kv, n_heads):
    """docs/spec.md §5 (c) for the core: cuBLAS Q projection, one SDPA call over all rows folded into
    one sequence per head, and the head-merge copy back."""
    k, v = kv.split(wq.shape[0], dim=1)
    return attention_sdpa_folded(F.linear(rows, wq, bq), k, v, n_heads)


def core_from_keys(
    target_rows: torch.Tensor,  # target_rows: [R, DM]
    wq: torch.Tensor, bq: torch.Tensor,  # [H*E, DM], [H*E]
    kv: torch.Tensor,  # kv: [S, 2*H*E], K then V
    n_heads: int,
) -> tuple:  # (x, mc, v, form): the fused core's operands
    """The core's operands from a projected K, the inputs SDPA gets too: on the factorized form
    mc_h = wqb_hᵀ·K_hᵀ by a batched GEMM, 2·S·E·H·(BLOCK_D + 1) FLOPs; on the standard form Kᵀ."""
    HE, DM = wq.shape
    H, E = n_heads, HE // n_heads
    S = kv.shape[0]
    form = core_form(DM, E)
    v = kv[:, HE:].view(S, H, E)
    if form.factorized:
        mc = mc_from_keys(factorized_query_side(wq, bq, form.d_logit), kv[:, :HE], H)  # [H, W, S]
    else:
        mc = kv[:, :HE].t().contiguous().view(H, E, S)  # Kᵀ
    return query_operand(target_rows, wq, bq, form), align_prototypes(mc), v, form


def _core_ours(rows, wq, bq, kv, n_heads):
    """Our fused core given K and V: the factorized operands from K by one small batched GEMM
    (core_from_keys), then the kernels; Q is never formed."""
    x, mc, v, form = core_from_keys(rows, wq, bq, kv, n_heads)
    return attention_core(x, mc, v, form)


def attention_core_impls(s: Shape) -> Dict[str, Callable]:
    """name -> core(rows, wq, bq, kv): [R, H*E]."""
    return {name: functools.partial(fn, n_heads=s.n_heads)
            for name, fn in (("eager", _core_eager), ("sdpa-fold", _core_sdpa), ("ours", _core_ours))}


def attention_core_inputs(s: Shape, dtype: torch.dtype, requires_grad: bool, device: torch.device = DEVICE) -> tuple:
    """(rows [R, DM], wq [H*E, DM], bq [H*E], kv [S, 2*H*E]: K then V, one GEMM output as in the layer)."""
    g = torch.Generator().manual_seed(0)
    he = s.n_heads * s.d_keys
    rows = torch.randn(s.rows * s.patches, s.d_model, generator=g)
    wq = torch.randn(he, s.d_model, generator=g) / math.sqrt(s.d_model)
    bq = torch.randn(he, generator=g) / 10
    kv = torch.randn(s.num_protos, 2 * he, generator=g)
    return tuple(t.to(device, dtype).requires_grad_(requires_grad) for t in (rows, wq, bq, kv))
