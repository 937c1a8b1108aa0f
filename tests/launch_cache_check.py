"""Child process of tests/test_launch_cache.py (no interpreter: compiled kernels, the recording
driver): every launch the cached path makes starts the compiled kernel Triton's own path picks
for the same arguments, with the same arguments, and repeats hit the cache.

    python tests/launch_cache_check.py [--quick]   # prints one JSON line per case, exits non-zero on a failure
"""
import json
import sys

import torch

from timellm_fast import PatchEmbedding, ReprogrammingLayer, dispatch
from timellm_fast.kernels import _launch
from timellm_fast.kernels import reprogramming_attention as attn
from timellm_fast.kernels.recording_driver import recording_driver, triton_choice


def _shape(a):
    """An argument as a launch of the same specialization must repeat it: a tensor by dtype,
    shape, strides and address mod 16 (fresh outputs have fresh addresses), anything else itself."""
    if isinstance(a, torch.Tensor):
        return ("tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16)
    return a


def _layer_step(d_model, n_heads, d_keys, dtype, dropout, rows, deterministic=False):
    torch.manual_seed(0)
    layer = ReprogrammingLayer(d_model, n_heads, d_keys, 32, attention_dropout=dropout,
                               deterministic=deterministic).to(dtype).train()
    target = torch.randn(rows, 1, d_model, dtype=dtype, requires_grad=True)
    protos = torch.randn(24, 32, dtype=dtype, requires_grad=True)

    def step():
        layer(target, protos, protos).float().sum().backward()
    return step


def _misaligned_core():
    """The core's forward on aligned operands, then on the same shapes at addresses that are not
    16-byte aligned (views at an odd element offset): Triton specializes on alignment, so the
    second launch must not reuse the first one's kernel."""
    torch.manual_seed(0)
    H, E, S, R, D = 2, 16, 16, 8, 16
    x_buf = torch.randn(R, D + 4)
    mc = torch.randn(H, D + 1, 16)
    v_buf = torch.randn(S * H * E + 4)

    def step():
        for offset in (0, 1):  # data_ptr % 16: 0, then 4
            x = x_buf[:, offset:offset + D]
            v = v_buf[offset:offset + S * H * E].view(S, H, E)
            attn.attention_forward(x, mc, v, D, 0, True, 0.25, 16)
    return step


def _rows_then_one(rows):
    """Two layer steps, `rows` rows then a single one: the row count specializes (1 is a constant
    to Triton), so the second step must not reuse the first one's kernels."""
    steps = [_layer_step(16, 8, 16, torch.float32, 0.0, n) for n in (rows, 1)]

    def step():
        for one in steps:
            one()
    return step


def _patch_step(dtype, dropout, transposed):
    torch.manual_seed(0)
    module = PatchEmbedding(16, 16, 8, dropout).to(dtype).train()
    series = torch.randn(2, 64, 3, dtype=dtype).transpose(1, 2) if transposed else torch.randn(2, 3, 64, dtype=dtype)
    series.requires_grad_(True)

    def step():
        module(series)[0].float().sum().backward()
    return step


CASES = {
    "layer fp32, factorized from K, 4 rows": lambda: _layer_step(16, 8, 16, torch.float32, 0.0, 4),
    "layer fp32, 16 rows then one (ints equal to 1)": lambda: _rows_then_one(16),
    "layer bf16, dropout, deterministic": lambda: _layer_step(32, 4, 16, torch.bfloat16, 0.1, 6, True),
    "layer fp16, standard form (d_model > E)": lambda: _layer_step(64, 4, 16, torch.float16, 0.0, 5),
    "core forward, misaligned operands": _misaligned_core,
    "patch embedding fp32": lambda: _patch_step(torch.float32, 0.0, False),
    "patch embedding bf16, dropout, strided input": lambda: _patch_step(torch.bfloat16, 0.1, True),
}
QUICK = ("layer fp32, 16 rows then one (ints equal to 1)", "core forward, misaligned operands",
         "patch embedding bf16, dropout, strided input")


def check(name, make_step, recorder) -> dict:
    step = make_step()
    recorder.launches.clear()
    with _launch.tritons_own_launch_path():
        step()  # what Triton's own path launches for these arguments
    theirs = list(recorder.launches)
    recorder.launches.clear()
    _launch.clear_launch_cache()  # the entries counted below are this case's
    step()  # first with the cache: Triton's path again, remembered
    entries = _launch.cached_launches()
    recorder.launches.clear()
    step()  # every launch from the cache
    ours = list(recorder.launches)
    problems = []
    if _launch.cached_launches() != entries:
        problems.append(f"the repeat added cache entries ({entries} -> {_launch.cached_launches()})")
    if len(ours) != len(theirs) or not ours:
        problems.append(f"{len(ours)} launches from the cache, {len(theirs)} by Triton")
    _launch.clear_launch_cache()
    step()  # cleared: nothing may start from a kernel remembered before (a launch plan's included)
    if _launch.cached_launches() != entries:
        problems.append(f"after clear_launch_cache the step remembered {_launch.cached_launches()} entries, "
                        f"not {entries}: some launch bypassed the cleared cache")
    for i, (mine, triton) in enumerate(zip(ours, theirs)):
        where = f"launch {i} ({mine.kernel.__name__})"
        if mine.kernel is not triton.kernel or mine.function != triton.function or mine.grid != triton.grid:
            problems.append(f"{where}: started {mine.function} on {mine.grid}, Triton {triton.function} on {triton.grid}")
        if [_shape(a) for a in mine.args] != [_shape(a) for a in triton.args]:
            problems.append(f"{where}: arguments differ from Triton's binding")
        if triton_choice(mine).function != mine.function:
            problems.append(f"{where}: Triton picks another compiled kernel for these arguments")
    return dict(case=name, launches=len(ours), problems=problems)


def main(argv) -> int:
    names = QUICK if "--quick" in argv else tuple(CASES)
    dispatch.triton_device_problem = lambda device: None  # CPU tensors take the Triton path
    failed = False
    with recording_driver() as recorder:
        for name in names:
            result = check(name, CASES[name], recorder)
            failed |= bool(result["problems"])
            print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
