"""torch.library integration: opcheck, torch.compile(fullgraph=True), profiler names."""
import pytest
import torch
from torch.library import opcheck

from helpers import DEVICE, assert_close_to_oracle, bench_module, requires_triton
from timellm_fast import PatchEmbedding, dispatch
from timellm_fast.patch_embedding import draw_seed_tensor
from timellm_fast.reference import patch_embedding_reference


def series(B=2, N=3, T=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, T, N, generator=g).permute(0, 2, 1).to(DEVICE, dtype)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_opcheck_patch_embedding_ops(dtype, dropout_p):
    x = series(dtype=dtype).requires_grad_(True)
    w = torch.randn(16, 8, 3, device=DEVICE, dtype=dtype, requires_grad=True)
    seed = draw_seed_tensor(dropout_p, DEVICE)
    opcheck(torch.ops.timellm_fast.patch_embedding_fwd, (x, w, 8, 4, dtype, dropout_p, seed))
    y = torch.ops.timellm_fast.patch_embedding_fwd(x, w, 8, 4, dtype, dropout_p, seed)
    g = torch.randn_like(y)
    for need_dx, need_dw in [(True, True), (False, True), (True, False)]:
        opcheck(torch.ops.timellm_fast.patch_embedding_bwd,
                (x.detach(), w.detach(), g, 8, 4, dropout_p, seed, need_dx, need_dw))


@requires_triton
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
def test_compile_fullgraph_matches_eager_mode(training):
    torch.manual_seed(0)
    layer = PatchEmbedding(16, 8, 4, 0.2).to(DEVICE).train(training)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = series()
    torch.manual_seed(3)
    y_ref, _ = layer(x)
    y_ref.sum().backward()
    dw_ref = layer.value_embedding.tokenConv.weight.grad.clone()
    layer.zero_grad()
    torch.manual_seed(3)
    with dispatch.record_paths() as seen:
        y, n = compiled(x)
    y.sum().backward()
    assert n == 3 and seen[("patch_embedding", "triton")] >= 1
    # same seed, same kernel: the compiled graph reproduces the mask bit for bit
    assert torch.equal(y, y_ref)
    assert torch.equal(layer.value_embedding.tokenConv.weight.grad, dw_ref)


def test_compile_fullgraph_inductor_eager_fallback(monkeypatch):
    """The CPU fallback path compiles with Inductor with no graph break."""
    monkeypatch.setenv(dispatch.BACKEND_ENV, "eager")
    layer = PatchEmbedding(16, 8, 4, 0.0).eval()
    x = series().cpu()
    compiled = torch.compile(layer, fullgraph=True)
    y, _ = compiled(x)
    y64 = patch_embedding_reference(x.double(), layer.value_embedding.tokenConv.weight.double(), 8, 4)
    assert_close_to_oracle("compiled eager y", y, y64)


@requires_triton
def test_profiler_names_the_ops():
    layer = PatchEmbedding(16, 8, 4, 0.0).to(DEVICE)
    x = series()
    with torch.profiler.profile() as prof:
        y, _ = layer(x)
        y.sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "timellm_fast::patch_embedding_fwd" in names
    assert "timellm_fast::patch_embedding_bwd" in names


# ---- reprogramming attention -------------------------------------------------------------------

from timellm_fast import ReprogrammingLayer  # noqa: E402
core_from_keys = bench_module("common").core_from_keys  # noqa: E305
from timellm_fast.reprogramming_op import draw_seed_tensor as attention_seed  # noqa: E402


def reprogramming_problem(dtype=torch.float32, dropout=0.0, rows=(2, 8), S=37, d_llm=48):
    """A small layer in deterministic mode: the tests below compare gradients bit for bit, which the
    default mode's atomic row-side reduction does not promise on a GPU."""
    torch.manual_seed(0)
    layer = ReprogrammingLayer(16, 2, d_keys=16, d_llm=d_llm, attention_dropout=dropout,
                               deterministic=True).to(DEVICE, dtype)
    target = torch.randn(*rows, 16, device=DEVICE, dtype=dtype)
    prototypes = torch.randn(S, d_llm, device=DEVICE, dtype=dtype)
    return layer, target, prototypes


@requires_triton
@pytest.mark.parametrize("d_model", [16, 24], ids=["factorized", "standard"])  # E = 16: d_model <= E, > E
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck_reprogramming_attention_ops(dtype, dropout_p, d_model):
    g = torch.Generator().manual_seed(0)
    R, H, E, S = 10, 2, 16, 37

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    target, wq, bq = rand(R, d_model), rand(H * E, d_model) / 4, rand(H * E)
    kv = rand(S, 2 * H * E)  # K then V
    x, mc, v, form = core_from_keys(target, wq, bq, kv, H)
    assert form.factorized == (d_model <= E)
    seed = attention_seed(dropout_p, DEVICE)
    x, mc, v = (t.detach().requires_grad_(True) for t in (x, mc, v))
    args = (x, mc, v, *form, dropout_p, seed, False, False)
    opcheck(torch.ops.timellm_fast.reprogramming_attention_core_fwd, args)
    out, lse = torch.ops.timellm_fast.reprogramming_attention_core_fwd(*args)
    for need_x, need_protos, deterministic in ((True, True, False), (True, True, True), (False, True, False),
                                               (True, False, False)):
        opcheck(torch.ops.timellm_fast.reprogramming_attention_core_bwd, (x.detach(), mc.detach(), v.detach(), out.detach(), torch.randn_like(out),
                                   lse.detach(), *form, dropout_p, seed, False, deterministic, need_x, need_protos))


@requires_triton
@pytest.mark.parametrize("d_model", [16, 24], ids=["factorized", "standard"])  # E = 16: d_model <= E, > E
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck_reprogramming_layer_ops(dtype, dropout_p, d_model):
    """The whole layer's op pair: the forward with its residual outputs, and the backward for
    every input, for the weights alone (a frozen input) and for the input rows alone."""
    g = torch.Generator().manual_seed(0)
    R, H, E, S, d_llm = 10, 2, 16, 37, 24

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_(True)

    tensors = [rand(R, d_model), rand(S, d_llm), rand(S, d_llm), rand(H * E, d_model, scale=0.25), rand(H * E),
               rand(H * E, d_llm, scale=0.25), rand(H * E), rand(H * E, d_llm, scale=0.25), rand(H * E),
               rand(d_llm, H * E, scale=0.25), rand(d_llm)]
    flags = (H, dropout_p, attention_seed(dropout_p, DEVICE), False, True)
    opcheck(torch.ops.timellm_fast.reprogramming_attention_fwd, (*tensors, *flags))
    out, heads, lse, mc, v, query_side, key_side = (t.detach() for t in torch.ops.timellm_fast.reprogramming_attention_fwd(*tensors, *flags))
    target, source, value, wq, bq, wk, bk, wv, bv, wo, bo = (t.detach() for t in tensors)
    saved = (target, source, value, wq, wk, bk, wv, wo, heads, lse, mc, v, query_side, key_side)
    for needs in ([True] * 11, [False] * 3 + [True] * 8, [True] + [False] * 10):
        opcheck(torch.ops.timellm_fast.reprogramming_attention_bwd, (torch.randn_like(out), *saved, *flags, needs))


@requires_triton
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-dropout"])
def test_reprogramming_compile_fullgraph_matches_eager_mode(training):
    layer, target, prototypes = reprogramming_problem(dropout=0.2)
    layer.train(training)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    out_ref = layer(target, prototypes, prototypes)
    out_ref.square().sum().backward()
    grads_ref = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    torch.manual_seed(5)
    with dispatch.record_paths() as seen:
        out = compiled(target, prototypes, prototypes)
    out.square().sum().backward()
    assert seen[("reprogramming_attention", "triton")] >= 1
    assert torch.equal(out, out_ref)
    for p, g_ref in zip(layer.parameters(), grads_ref):
        assert torch.equal(p.grad, g_ref)


@requires_triton
def test_profiler_names_the_attention_ops():
    layer, target, prototypes = reprogramming_problem()
    with torch.profiler.profile() as prof:
        layer(target, prototypes, prototypes).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "timellm_fast::reprogramming_attention_fwd" in names
    assert "timellm_fast::reprogramming_attention_bwd" in names


# ---- CUDA graphs (GPU only) --------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_draws_fresh_dropout_masks():
    """The seed is drawn on the device, so each replay of a captured training step gets a new
    mask, and the backward inside the same graph uses that replay's mask."""
    torch.manual_seed(0)
    layer = PatchEmbedding(16, 8, 4, 0.3).cuda().train()
    x = series().cuda()
    static_y = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph compiles the kernels
        for _ in range(2):
            y, _ = layer(x)
            y.sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    layer.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, _ = layer(x)
        static_y.sum().backward()
    masks, grads = [], []
    for _ in range(2):
        layer.zero_grad(set_to_none=False)
        graph.replay()
        torch.cuda.synchronize()
        masks.append((static_y != 0).clone())
        grads.append(layer.value_embedding.tokenConv.weight.grad.clone())
    assert not torch.equal(masks[0], masks[1]), "replays reused one dropout mask"
    w = layer.value_embedding.tokenConv.weight.detach().double().requires_grad_(True)
    for mask, grad in zip(masks, grads):
        y64 = patch_embedding_reference(x.double(), w, 8, 4) * mask.double() / 0.7
        (dw,) = torch.autograd.grad(y64.sum(), w)
        assert_close_to_oracle("dW of a replay", grad, dw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_reprogramming_with_dropout():
    layer, target, prototypes = reprogramming_problem(dropout=0.3)
    layer.cuda().train()
    target, prototypes = target.cuda(), prototypes.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            layer(target, prototypes, prototypes).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(target, prototypes, prototypes)
        static_out.sum().backward()
    outs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(static_out.clone())
    assert not torch.equal(outs[0], outs[1]), "replays reused one attention-dropout mask"
    assert all(torch.isfinite(o).all() for o in outs)
