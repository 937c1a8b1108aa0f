"""The two routes of the Triton path (dispatch.direct_launch): plain eager mode calls the launchers
through an autograd.Function, everything that must see one operator gets the torch.library custom
op. Both must run the same kernels and give bit-identical outputs and gradients."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DEVICE, LaunchCounter, requires_triton, swap_kernel
from timellm_fast import PatchEmbedding, ReprogrammingLayer, dispatch
from timellm_fast.reprogramming import attention_core_op, core_from_keys, draw_seed_tensor

DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


class PassThrough(TorchDispatchMode):
    """Sees every operator and changes nothing: what FakeTensorMode or make_fx would see."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def reprogramming_step(dtype, training, seed=11, deterministic=True):
    """One forward + backward of a small layer (R = 2·7 rows, S = 37, E = 16, dropout 0.2); in
    deterministic mode by default, so that runs compare bit for bit on a GPU too."""
    torch.manual_seed(0)
    layer = ReprogrammingLayer(16, 2, d_keys=16, d_llm=24, attention_dropout=0.2,
                               deterministic=deterministic).to(DEVICE, dtype).train(training)
    target = torch.randn(2, 7, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    protos = torch.randn(37, 24, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.manual_seed(seed)
    out = layer(target, protos, protos)
    out.square().sum().backward()
    return [out.detach(), target.grad, protos.grad] + [p.grad for p in layer.parameters()]


def patch_step(dtype, training, seed=11):
    torch.manual_seed(0)
    layer = PatchEmbedding(16, 8, 4, 0.3).to(DEVICE, dtype).train(training)
    x = torch.randn(2, 3, 41, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.manual_seed(seed)
    y, _ = layer(x)
    y.square().sum().backward()
    return [y.detach(), x.grad, layer.value_embedding.tokenConv.weight.grad]


STEPS = {"reprogramming_attention": reprogramming_step, "patch_embedding": patch_step}


@requires_triton
@pytest.mark.parametrize("op", sorted(STEPS))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_routes_agree_bit_for_bit(op, training, dtype):
    with dispatch.record_routes() as direct_routes:
        direct = STEPS[op](dtype, training)
    with dispatch.record_routes() as op_routes, PassThrough():
        via_custom_op = STEPS[op](dtype, training)
    with dispatch.custom_op_route():
        forced = STEPS[op](dtype, training)
    assert direct_routes == {(op, "direct"): 1}, direct_routes
    assert op_routes == {(op, "custom_op"): 1}, op_routes
    for a, b, c in zip(direct, via_custom_op, forced):
        assert a.dtype == b.dtype and torch.equal(a, b) and torch.equal(a, c)
    assert all(t.abs().sum() > 0 for t in direct)  # every gradient reached, none trivially zero


@requires_triton
def test_no_grad_direct_route_builds_no_autograd_node():
    layer = ReprogrammingLayer(16, 2, d_keys=16, d_llm=24).to(DEVICE).eval()
    target = torch.randn(2, 7, 16, device=DEVICE)
    protos = torch.randn(37, 24, device=DEVICE)
    with torch.no_grad(), dispatch.record_routes() as routes:
        out = layer(target, protos, protos)
    # without autograd the layer runs the fused core alone on its cached prototype side
    assert routes == {(attention_core_op.name, "direct"): 1}
    assert out.grad_fn is None and not out.requires_grad


@requires_triton
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_direct_training_step_launches_each_attention_kernel_once(monkeypatch, deterministic):
    """The direct route's training step: the forward, then delta and the prototype-stationary
    backward (and in deterministic mode the row-stationary one); lse gets no gradient."""
    counters = {}
    for name in ("attention_fwd_kernel", "attention_bwd_delta_kernel", "attention_bwd_protos_kernel",
                 "attention_bwd_rows_kernel"):
        counters[name] = swap_kernel(monkeypatch, name, LaunchCounter)
    with dispatch.record_routes() as routes:
        reprogramming_step(torch.float32, training=True, deterministic=deterministic)
    assert routes == {("reprogramming_attention", "direct"): 1}
    expected = dict.fromkeys(counters, 1)
    expected["attention_bwd_rows_kernel"] = int(deterministic)
    assert {name: c.launches for name, c in counters.items()} == expected


@requires_triton
def test_residuals_are_saved_not_returned_on_the_direct_route():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(10, 16, generator=g).to(DEVICE).requires_grad_(True)
    wq, bq = torch.randn(32, 16, generator=g).to(DEVICE) / 4, torch.randn(32, generator=g).to(DEVICE)
    kv = torch.randn(37, 64, generator=g).to(DEVICE)
    x, mc, v, form = core_from_keys(target, wq, bq, kv, 2)
    args = (x, mc, v, *form, 0.0, draw_seed_tensor(0.0, DEVICE), False, True)  # deterministic: equal grads
    heads = attention_core_op.function.apply(*args)  # the autograd node wraps one output, not lse too
    assert isinstance(heads, torch.Tensor) and heads.requires_grad and heads.shape == (10, 32)
    with dispatch.custom_op_route():
        via_op = attention_core_op(*args)
    torch.testing.assert_close(heads, via_op, rtol=0, atol=0)
    (grad_direct,) = torch.autograd.grad(heads.sum(), target)
    (grad_op,) = torch.autograd.grad(via_op.sum(), target)
    torch.testing.assert_close(grad_direct, grad_op, rtol=0, atol=0)


def test_direct_launch_rules():
    plain = torch.randn(3)
    param = torch.nn.Parameter(torch.randn(3))
    assert dispatch.direct_launch("demo_op", plain, param)
    with PassThrough():
        assert not dispatch.direct_launch("demo_op", plain)

    class Subclass(torch.Tensor):
        pass
    assert not dispatch.direct_launch("demo_op", plain, plain.as_subclass(Subclass))
    seen = []
    torch.func.vmap(lambda t: seen.append(dispatch.direct_launch("demo_op", t)) or t)(torch.randn(2, 3))
    assert seen == [False]
    escaped = []  # a tensor that outlives the transform it was wrapped by: a "dead" wrapper
    torch.func.grad(lambda t: escaped.append(t) or t.sum())(torch.randn(3))
    assert type(escaped[0]) is torch.Tensor and not dispatch.direct_launch("demo_op", escaped[0])
    with dispatch.record_routes() as routes:
        dispatch.direct_launch("demo_op", plain)
    assert routes == {("demo_op", "direct"): 1}
    with dispatch.custom_op_route():
        assert not dispatch.direct_launch("demo_op", plain)
    assert dispatch.direct_launch("demo_op", plain)


def test_direct_route_env_switch(monkeypatch):
    monkeypatch.setenv(dispatch.DIRECT_ENV, "0")
    assert not dispatch.direct_launch("demo_op", torch.randn(3))
    monkeypatch.setenv(dispatch.DIRECT_ENV, "1")
    assert dispatch.direct_launch("demo_op", torch.randn(3))


@requires_triton
def test_compiled_layer_takes_the_custom_op_route():
    torch.manual_seed(0)
    layer = ReprogrammingLayer(16, 2, d_keys=16, d_llm=24).to(DEVICE).eval()
    target = torch.randn(2, 7, 16, device=DEVICE)
    protos = torch.randn(37, 24, device=DEVICE)
    torch._dynamo.reset()
    with dispatch.record_routes() as routes:
        out = torch.compile(layer, fullgraph=True, backend="aot_eager")(target, protos, protos)
    assert routes[("reprogramming_attention", "direct")] == 0, routes
    assert routes[("reprogramming_attention", "custom_op")] >= 1, routes
    assert torch.equal(out, layer(target, protos, protos))


@requires_triton
def test_direct_eval_forward_of_the_patch_embedding_is_one_launch(monkeypatch):

    layer = PatchEmbedding(32, 16, 8, 0.1).to(DEVICE).eval()
    x = torch.randn(4, 7, 512, device=DEVICE)
    layer(x)  # the cached seed placeholder is made here
    counter = swap_kernel(monkeypatch, "patch_window_fwd", LaunchCounter)
    with torch.no_grad(), dispatch.record_routes() as routes:
        y, _ = layer(x)
    assert routes == {("patch_embedding", "direct"): 1} and counter.launches == 1
    assert y.shape == (28, 64, 32) and y.grad_fn is None


@requires_triton
def test_jit_trace_records_the_custom_op_and_replays_on_new_inputs():
    """torch.jit.trace must record our op (the direct route would run past the tracer: it saw
    the launch arguments as traced values and failed); the trace then computes new inputs."""
    class FirstOutput(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[0]

    torch.manual_seed(0)
    patch = FirstOutput(PatchEmbedding(16, 8, 4, 0.0).to(DEVICE).eval())
    layer = ReprogrammingLayer(16, 2, d_keys=16, d_llm=24).to(DEVICE).eval()
    x, target, protos = (torch.randn(2, 3, 40, device=DEVICE), torch.randn(2, 7, 16, device=DEVICE),
                         torch.randn(37, 24, device=DEVICE))
    with dispatch.record_routes() as routes:
        traced_patch = torch.jit.trace(patch, (x,), check_trace=False)
        traced_layer = torch.jit.trace(layer, (target, protos, protos), check_trace=False)
    assert routes == {("patch_embedding", "custom_op"): 1, ("reprogramming_attention", "custom_op"): 1}, routes
    x2, target2 = torch.randn_like(x), torch.randn_like(target)
    assert torch.equal(traced_patch(x2), patch(x2))
    assert torch.equal(traced_layer(target2, protos, protos), layer(target2, protos, protos))
