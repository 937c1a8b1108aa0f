"""Host time per call of the op layer, without a GPU: the kernels are compiled for sm_90 and
launched through Triton's whole host path on the recording driver (bench/recording_driver.py),
whose launcher does nothing, and the inputs are tiny CPU tensors, so what is timed is the
Python, dispatcher and Triton work our modules do around the kernels (validation, dispatch,
config lookup, allocations, autograd bookkeeping, the kernel launches up to the driver, the GEMM
calls on tiny operands).

    python bench/host_overhead.py [--calls N] [--rounds N] [--json PATH]    # without TRITON_INTERPRET

Each row times one module call (eval forward without autograd, training forward, training
forward + backward) on the Triton path (the op, every kernel started through Triton's own launch,
``kernel[grid](...)``, JITFunction.run), beside Time-LLM's own eager layers (timellm_fast.models'
copies: the materialized attention) and, for scale, our eager path (the reference math, whose
tiny GEMMs and SDPA do run). This is a proxy: a GPU adds the CUDA launch cost of every kernel (the
driver's launcher), and its host CPU is another CPU. What CUDA graphs leave of the host time is
the graph's replay, a few microseconds whatever the layer does: a column of its own where a CUDA
device is present ("graph replay": the call captured once with torch.cuda.graphs, then replayed),
"-" without one.
The columns of a row take turns, round by round, and each figure is its fastest round
(microseconds_per_call): on a shared machine a slow spell then falls on every column, not on one.

The reprogramming rows also time docs/spec.md §5's strongest simple alternative, SDPA-fold (cuBLAS
projections plus one scaled_dot_product_attention over the folded rows, bench/common.SdpaFold) on
the same layer, both without dropout (as the GPU benchmarks run them): the host time our layer must
not exceed. SDPA-fold's attention is computed for real by the CPU (at this size ~10 us forward,
~80 us forward + backward), where a GPU would only launch it, so its column overstates its host
time a little: the comparison leans our way. One more row times our layer with Time-LLM's default
dropout (0.1: the seed draw and the dropout path), which SDPA-fold has no row for. For the patch
embedding the peer is the eager path (pad + unfold + conv1d).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import sys
import time
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

import torch

from common import SdpaFold
from recording_driver import recording_driver
from timellm_fast import PatchEmbedding, ReprogrammingLayer, dispatch
from timellm_fast.models import EagerPatchEmbedding, EagerReprogrammingLayer


@contextlib.contextmanager
def triton_path_on_cpu():
    """The Triton path chosen on CPU tensors, every launch recorded by nothing (outputs stay
    uninitialized)."""
    saved = dispatch.triton_device_problem
    dispatch.triton_device_problem = lambda device: None
    try:
        with recording_driver(record=False):
            yield
    finally:
        dispatch.triton_device_problem = saved


#: timing rounds per row; each column's figure is its fastest round
ROUNDS = 15


def microseconds_per_call(columns: Dict[str, Tuple[Callable[[], object], Callable[[], ContextManager]]],
                          calls: int, rounds: int = ROUNDS) -> Dict[str, float]:
    """Per column (one call, the context it runs in): the fastest of `rounds` rounds of the mean
    time of `calls` calls. The columns take turns round by round, so that a slow spell of a
    shared machine falls on all of them, and the minimum keeps the spells out of the figures
    (the noise here only ever adds time); each column's context is entered outside its timing."""
    best = {name: float("inf") for name in columns}
    for name, (fn, context) in columns.items():
        with context():
            for _ in range(max(calls // 10, 3)):
                fn()
    for _ in range(rounds):
        for name, (fn, context) in columns.items():
            with context():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
    return best


def _cases() -> List[Tuple[str, str, torch.nn.Module, bool, Callable[[], object], Callable[[], object],
                            Optional[Callable[[], object]]]]:
    """(module name, mode, our module, training?, one call of ours, the same call of Time-LLM's
    eager layer, the SDPA-fold call or None) per row.

    The reprogramming layer is the smallest the kernels take (E = d_model = d_llm = 16, S = 8, 4
    rows): the CPU computes the GEMMs around the kernels for real, which a GPU does
    asynchronously, and at these sizes each is about a microsecond (a 1-MFLOP bmm takes ~14 us on
    a CPU core, and would be counted as host time)."""
    torch.manual_seed(0)
    layer = ReprogrammingLayer(16, 8, 16, 16, attention_dropout=0.0)  # as the GPU benchmarks run it and SDPA-fold
    dropout_layer = ReprogrammingLayer(16, 8, 16, 16, attention_dropout=0.1)  # Time-LLM's training default
    dropout_layer.load_state_dict(layer.state_dict())
    timellm = EagerReprogrammingLayer(16, 8, 16, 16, attention_dropout=0.0)
    timellm_dropout = EagerReprogrammingLayer(16, 8, 16, 16, attention_dropout=0.1)
    for twin in (timellm, timellm_dropout):
        twin.load_state_dict(layer.state_dict())
    target = torch.randn(2, 2, 16, requires_grad=True)
    protos = torch.randn(8, 16)
    patch = PatchEmbedding(32, 16, 8, 0.1)
    timellm_patch = EagerPatchEmbedding(32, 16, 8, 0.1)
    timellm_patch.load_state_dict(patch.state_dict())
    series = torch.randn(2, 3, 64)

    def eval_call(module, *args):
        def run():
            with torch.no_grad():
                return module(*args)
        return run

    def train_call(module, backward, *args):
        def run():
            module.train()
            out = module(*args)
            out = out[0] if isinstance(out, tuple) else out
            if backward:
                out.sum().backward()
        return run

    fold = SdpaFold(layer)
    rp = (target, protos, protos)
    return [
        ("reprogramming layer", "eval fwd (no grad)", layer, False, eval_call(layer, *rp), eval_call(timellm, *rp),
         eval_call(fold, *rp)),
        ("reprogramming layer", "train fwd", layer, True, train_call(layer, False, *rp),
         train_call(timellm, False, *rp), train_call(fold, False, *rp)),
        ("reprogramming layer", "train fwd+bwd", layer, True, train_call(layer, True, *rp),
         train_call(timellm, True, *rp), train_call(fold, True, *rp)),
        ("reprogramming layer", "train fwd+bwd, dropout 0.1", dropout_layer, True,
         train_call(dropout_layer, True, *rp), train_call(timellm_dropout, True, *rp), None),
        ("patch embedding", "eval fwd (no grad)", patch, False, eval_call(patch, series),
         eval_call(timellm_patch, series), None),
        ("patch embedding", "train fwd+bwd (dW)", patch, True, train_call(patch, True, series),
         train_call(timellm_patch, True, series), None),
    ]


def graph_replay_us(module: torch.nn.Module, call: Callable[[], object], calls: int, rounds: int) -> Optional[float]:
    """Host microseconds per replay of `call` captured in a CUDA graph (module and inputs moved to
    the GPU), or None without a CUDA device."""
    if not torch.cuda.is_available():
        return None
    module.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (compiles, allocations)
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            graph.replay()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


@contextlib.contextmanager
def _eager_backend() -> Iterator[None]:
    saved = os.environ.get(dispatch.BACKEND_ENV)
    os.environ[dispatch.BACKEND_ENV] = "eager"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(dispatch.BACKEND_ENV)
        else:
            os.environ[dispatch.BACKEND_ENV] = saved


def measure(calls: int, rounds: int = ROUNDS) -> List[dict]:
    rows = []
    with triton_path_on_cpu():
        for module, mode, instance, training, call, timellm_call, sdpa_fold_call in _cases():
            instance.train(training)  # once, outside the timed calls
            paths = {"ours": collections.Counter(), "eager": collections.Counter()}

            def counted(counter: collections.Counter, recorder, *contexts):
                @contextlib.contextmanager
                def context():
                    with contextlib.ExitStack() as stack:
                        for c in contexts:
                            stack.enter_context(c())
                        seen = stack.enter_context(recorder())  # filled when the recorder exits
                        yield
                    counter.update(seen)
                return context

            columns = {
                "ours_us": (call, counted(paths["ours"], dispatch.record_paths)),
                "timellm_us": (timellm_call, contextlib.nullcontext),
                "eager_us": (call, counted(paths["eager"], dispatch.record_paths, _eager_backend)),
            }
            if sdpa_fold_call is not None:
                columns["sdpa_fold_us"] = (sdpa_fold_call, contextlib.nullcontext)
            row = dict(module=module, mode=mode, sdpa_fold_us=None)
            row.update(microseconds_per_call(columns, calls, rounds))
            # a figure timed on another path than its column names would be a wrong number
            taken = {name: set(p for _, p in counter) for name, counter in paths.items()}
            if taken != {"ours": {"triton"}, "eager": {"eager"}}:
                raise RuntimeError(f"{module} {mode}: paths taken {taken}")
            rows.append(row)
    for row, (_, _, instance, _, call, _, _) in zip(rows, _cases()):  # real kernels: outside the recording driver
        row["graph_replay_us"] = graph_replay_us(instance, call, calls, rounds)
    return rows


def markdown(rows: List[dict]) -> str:
    lines = ["| module | call | ours, eager mode (us) | ours, CUDA graph replay (us) | Time-LLM's layer (us) | "
             "our eager path (us) | SDPA-fold (us) |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def us(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.0f}"
    for r in rows:
        lines.append(f"| {r['module']} | {r['mode']} | {us(r['ours_us'])} | {us(r['graph_replay_us'])} | "
                     f"{us(r['timellm_us'])} | {us(r['eager_us'])} | {us(r['sdpa_fold_us'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per timing round")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="timing rounds (each figure: the fastest)")
    parser.add_argument("--json", default=None, help="also write the rows and the environment here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.calls, args.rounds)
    env = dict(torch=torch.__version__, python=platform.python_version(), cpu=platform.processor() or
               platform.machine(), calls=args.calls, rounds=args.rounds)
    print(f"host time per call, kernels launched on the recording driver, tiny CPU tensors ({env})")
    print(markdown(rows))
    if not torch.cuda.is_available():
        print("graph replay: needs a CUDA device (not measured here)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
