"""The kernels the open performance targets hinge on, each launched twice (a warm-up that compiles,
then the launch to profile), for Nsight Compute:

    ncu --clock-control none --kernel-name regex:"patch_window_fwd|attention_" --launch-skip 6 \\
        --launch-count 6 python bench/ncu_kernels.py

- patch_window_fwd, the patch embedding forward at Traffic-folded (20688 series, bf16): whether
  its windowed 16-byte loads reach the HBM bound (bench/ROOFLINE.md), or latency still limits it;
- attention_fwd_kernel, _bwd_delta_kernel, _bwd_protos_kernel (default mode) and _bwd_rows_kernel
  (the deterministic mode's row side) at ETTh1-folded, E = 128 (bf16), on the factorized form.

Needs CUDA. Without ncu it still runs (and says what it launched), which is how CI checks it
does not rot: with --smoke on a CPU it runs tiny shapes in Triton's interpreter.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from tuning import ON_GPU  # noqa: E402  (first: sets the kernels' environment)
from timellm_fast.kernels import patch_embedding as pe  # noqa: E402
from timellm_fast.kernels import attention as attn  # noqa: E402
from common import CPU_SHAPES, SPEC_SHAPES, attention_core_inputs, core_from_keys, patch_embedding_input  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the default without CUDA)")
    args = parser.parse_args(argv)
    smoke = args.smoke or not ON_GPU
    device = torch.device("cuda" if ON_GPU else "cpu")
    dtype = torch.bfloat16
    by_name = {s.name: s for s in SPEC_SHAPES}
    patch_shape = CPU_SHAPES[0] if smoke else by_name["traffic-folded"]
    attn_shape = CPU_SHAPES[0] if smoke else by_name["etth1-folded"]

    x_series = patch_embedding_input(patch_shape, dtype)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(patch_shape.d_model, patch_shape.patch_len, 3, generator=g) / 8).to(device, dtype)
    seed = torch.zeros((1,), dtype=torch.int64, device=device)

    x, mc, v, form = core_from_keys(*attention_core_inputs(attn_shape, dtype, False, device), attn_shape.n_heads)
    grad = torch.randn(x.shape[0], v.shape[1] * v.shape[2], generator=g).to(device, dtype)

    for launch in ("warm-up", "profiled"):
        pe.patch_embedding_fwd(x_series, weight, dtype, patch_shape.patch_len, patch_shape.stride,
                               patch_shape.patches, seed)
        out, lse = attn.attention_forward(x, mc, v, form)
        attn.attention_backward(x, mc, v, out, grad, lse, form)
        attn.attention_backward(x, mc, v, out, grad, lse, form, need_protos=False)  # the row-stationary pass
        if ON_GPU:
            torch.cuda.synchronize()
        print(f"{launch}: patch_window_fwd at {patch_shape.name} ({patch_shape.rows} series), "
              f"attention fwd, bwd_delta, bwd_protos, bwd_delta, bwd_rows at {attn_shape.name} "
              f"(E = {attn_shape.d_keys}), bf16", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
