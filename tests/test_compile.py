"""The losses inside torch.compile(fullgraph=True), torch.func and CUDA graphs.

Compiled cases use the "aot_eager" backend: Dynamo captures the graph and AOTAutograd traces the
forward and backward through the registered operators (their fake implementations and autograd)
exactly as with Inductor, without Inductor's C++ code generation (minutes on a 2-core CPU).
``trace_autograd_ops`` lets Dynamo trace ``loss.backward()`` inside the compiled function.
"""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import pyclipfast as pcf
from pyclipfast import _ops
from pyclipfast._dispatch import resolve, triton_available
from pyclipfast.distill import DistillOptions

from helpers import HAS_CUDA

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield
    torch._dynamo.reset()


def _inputs(n=12, m=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1).requires_grad_()
    ta = torch.nn.functional.normalize(torch.randn(n, 6, generator=g), dim=-1)
    tb = torch.nn.functional.normalize(torch.randn(m, 6, generator=g), dim=-1)
    scale = torch.tensor(7.0, requires_grad=True)
    return a, b, ta, tb, scale


def _clip(a, b, ta, tb, s):
    return pcf.clip_loss(a, b, s)


def _clip_ids(a, b, ta, tb, s):
    ids = torch.arange(a.shape[0], device=a.device) // 2
    return pcf.clip_loss(a, b, s, image_ids=ids, text_ids=ids)


def _siglip(a, b, ta, tb, s):
    return pcf.siglip_loss(a, b, s, -2.0)


def _distill(a, b, ta, tb, s):
    contrastive, kd = pcf.distill_loss(a, b, ta, tb, s, 5.0, margin=0.3, false_negative_threshold=0.8, kd_weight=0.5)
    return contrastive + kd


def _cosine(a, b, ta, tb, s):
    return pcf.cosine_loss(a, b, target_grad=True)


LOSSES = {"clip": _clip, "clip-ids": _clip_ids, "siglip": _siglip, "distill-margin-filter-kd": _distill,
          "cosine": _cosine}


def _step(loss_fn):
    def step(a, b, ta, tb, s):
        loss = loss_fn(a, b, ta, tb, s)
        loss.backward()
        return loss.detach()
    return step


def _grads(*xs):
    out = [x.grad.clone() for x in xs if x.grad is not None]
    for x in xs:
        x.grad = None
    return out


def _rel(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(LOSSES))
def test_fullgraph_one_graph_matches_eager(name):
    a, b, ta, tb, s = _inputs()
    step = _step(LOSSES[name])
    eager = step(a, b, ta, tb, s)
    eager_grads = _grads(a, b, s)
    explained = torch._dynamo.explain(step)(a, b, ta, tb, s)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    _grads(a, b, s)
    compiled = torch.compile(step, fullgraph=True, backend=BACKEND)(a, b, ta, tb, s)
    compiled_grads = _grads(a, b, s)
    assert _rel(compiled, eager) <= 1e-5
    assert len(compiled_grads) == len(eager_grads) >= 2
    for out, ref in zip(compiled_grads, eager_grads):
        assert _rel(out, ref) <= 1e-5


def test_recall_fullgraph_returns_tensors_equal_to_eager():
    a, b, *_ = _inputs(n=20, m=20)
    q, g = a.detach(), b.detach() + 0.3 * a.detach()
    ids = torch.arange(20) // 2

    def recall(q, g):
        return pcf.recall_at_k(q, g, (1, 3), query_ids=ids, gallery_ids=ids)

    eager = recall(q, g)
    explained = torch._dynamo.explain(recall)(q, g)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(recall, fullgraph=True, backend=BACKEND)(q, g)
    assert set(compiled) == {"R@1", "R@3"}
    for k, v in compiled.items():
        assert isinstance(v, torch.Tensor) and v.shape == ()
        assert float(v) == pytest.approx(eager[k])


def test_compiled_graph_skips_data_checks_and_gives_nan():
    """Eager CPU use raises on a non-finite feature; inside the graph the check is skipped and
    the NaN reaches the loss (never a finite wrong value)."""
    a, b, ta, tb, s = _inputs()
    bad = a.detach().clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="image_features"):
        pcf.clip_loss(bad, b, s)
    for fn in (_clip, _siglip, _distill, _cosine):
        torch._dynamo.reset()
        loss = torch.compile(fn, fullgraph=True, backend=BACKEND)(bad, b.detach(), ta, tb, s.detach())
        assert torch.isnan(loss), fn.__name__
    recall = torch.compile(lambda q, g: pcf.recall_at_k(q, g, (1,)), fullgraph=True, backend=BACKEND)(bad, b.detach())
    assert torch.isnan(recall["R@1"])


def test_batch_size_changes_compile_at_most_twice():
    counter = CompileCounterWithBackend(BACKEND)
    step = torch.compile(_step(_clip), fullgraph=True, backend=counter)
    for n in (8, 10, 12, 14):
        a, b, ta, tb, s = _inputs(n=n, m=n, seed=n)
        loss = step(a, b, ta, tb, s)
        ref = pcf.clip_loss(a.detach(), b.detach(), s.detach())
        assert _rel(loss, ref) <= 1e-5
    assert counter.frame_count <= 2


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_torch_func_grad_equals_autograd(loss):
    a, b, _, _, s = _inputs()
    fn = {"clip": lambda x, y: pcf.clip_loss(x, y, s.detach()),
          "siglip": lambda x, y: pcf.siglip_loss(x, y, s.detach(), -2.0)}[loss]
    da, db = torch.func.grad(fn, argnums=(0, 1))(a.detach(), b.detach())
    fn(a, b).backward()
    assert _rel(da, a.grad) <= 1e-6 and _rel(db, b.grad) <= 1e-6


@pytest.mark.parametrize("name", ["clip", "siglip", "distill-margin-filter-kd", "cosine"])
def test_double_backward_is_a_clear_error(name):
    a, b, ta, tb, s = _inputs()
    loss = LOSSES[name](a, b, ta, tb, s)
    (da,) = torch.autograd.grad(loss, a, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        da.square().sum().backward()


@pytest.mark.parametrize("loss", ["siglip", "cosine"])
def test_no_grad_computes_no_gradients(loss, monkeypatch):
    """Under no_grad (or for inputs that do not require grad) the fused sweep is asked for no
    gradient: no dA/dB FLOPs and no N×D buffers kept."""
    from pyclipfast.chunked import cosine as chunked_cosine, siglip as chunked_siglip

    module, fn_name = {"siglip": (chunked_siglip, "siglip_forward"), "cosine": (chunked_cosine, "cosine_forward")}[loss]
    real, asked = getattr(module, fn_name), []

    def spy(*args, **kwargs):
        asked.append({k: v for k, v in kwargs.items() if k.startswith("need_")})
        return real(*args, **kwargs)

    monkeypatch.setattr(module, fn_name, spy)
    a, b, ta, tb, s = _inputs()
    fn = {"siglip": _siglip, "cosine": _cosine}[loss]
    with torch.no_grad():
        out = fn(a, b, ta, tb, s)
    assert out.grad_fn is None and not any(any(need.values()) for need in asked)
    asked.clear()
    fn(a.detach(), b.detach(), ta, tb, s.detach())
    assert not any(any(need.values()) for need in asked)
    asked.clear()
    ref = fn(a, b, ta, tb, s)
    ref.backward()
    assert a.grad is not None and all(asked[-1][k] for k in asked[-1] if k != "need_bias")


# ---------------------------------------------------------------- opcheck

def _op_cases(backend: str):
    """(op, args) for every operator registered for `backend`, at tiny shapes."""
    a, b, ta, tb, s = (x.detach() for x in _inputs(n=6, m=5, d=4))
    ids_a, ids_b = torch.tensor([0, 1, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 4])
    for name in ("clip", "siglip", "distill", "cosine", "retrieval"):
        resolve(name, backend, a)
    req = [x.clone().requires_grad_() for x in (a, b, s)]
    clip, siglip = _ops.ops("clip", backend), _ops.ops("siglip", backend)
    distill, cosine, retrieval = _ops.ops("distill", backend), _ops.ops("cosine", backend), _ops.ops("retrieval", backend)
    row_lse, col_lse, *_ = clip["forward"](a, b, s, ids_a, ids_b, True)
    g = torch.full((6,), 0.1), torch.full((5,), 0.2)
    stats = distill["forward"](a, b, s, ta, tb, s, ids_a, ids_b, 0.2, 0.9, "kl")
    st = dict(zip(_ops.DISTILL_STATS, stats))
    lse = [st[k] for k in _ops.DISTILL_LSE]
    upstream = [torch.full_like(st[k], 0.1) for k in _ops.DISTILL_GRAD]
    square = a[:5]
    return [
        ("clip_forward", clip["forward"], (*req, ids_a, ids_b, True)),
        ("clip_forward-rows", clip["forward"], (*req, None, None, False)),
        ("clip_forward-dots", clip["forward"], (*req, ids_a, ids_b, True, True)),
        ("clip_forward-rows-dots", clip["forward"], (*req, None, None, False, True)),
        ("clip_backward", clip["backward"], (a, b, s, ids_a, ids_b, row_lse, col_lse, *g, *g, True, True, True)),
        ("siglip", siglip["forward"], (*req, torch.tensor(-1.0), ids_a, ids_b, False, True, True, True, True)),
        ("siglip-no-grads", siglip["forward"], (a, b, s, None, None, None, True, False, False, False, False)),
        ("distill_forward", distill["forward"], (*req, ta, tb, s, ids_a, ids_b, 0.2, 0.9, "kl")),
        ("distill_forward-no-kd", distill["forward"], (*req, ta, tb, s, ids_a, ids_b, 0.0, None, None)),
        ("distill_backward", distill["backward"],
         (a, b, s, ta, tb, s, ids_a, ids_b, 0.2, 0.9, "kl", lse, upstream, True, True, True)),
        ("cosine", cosine["forward"], (square.clone().requires_grad_(), b.clone().requires_grad_(), True, True)),
        ("retrieval_count", retrieval["count"], (a, b, ids_a, ids_b)),
    ]


def _backends():
    return ["torch"] + (["triton"] if triton_available() else [])


@pytest.mark.parametrize("backend", _backends())
def test_opcheck_every_registered_op(backend):
    for label, op, args in _op_cases(backend):
        try:
            torch.library.opcheck(op, args)
        except Exception as e:  # name the case that failed
            raise AssertionError(f"opcheck failed for {label} ({backend}): {e}") from e


def test_distill_options_round_trip_through_the_op_schema():
    """The op carries DistillOptions as plain arguments (margin, threshold, kd)."""
    a, b, ta, tb, s = (x.detach() for x in _inputs(n=6, m=6, d=4))
    opts = DistillOptions(0.2, None, "ce")
    direct = _ops.ops("distill", "torch")["forward"](a, b, s, ta, tb, s, None, None, *opts)
    from pyclipfast.chunked.distill import distill_forward

    ref = distill_forward(a, b, s, ta, tb, s, None, None, opts)
    for k, v in zip(_ops.DISTILL_STATS, direct):
        torch.testing.assert_close(v, ref[k])


# ---------------------------------------------------------------- open_clip training step

def _tiny_open_clip():
    import open_clip

    torch.manual_seed(0)
    return open_clip.model.CLIP(
        embed_dim=16, vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, layers=1, heads=2), output_dict=True)


@pytest.mark.parametrize("loss_name", ["ClipLoss", "SigLipLoss", "DistillClipLoss"])
def test_open_clip_step_compiled_matches_eager(loss_name):
    pytest.importorskip("open_clip")
    model = _tiny_open_clip()
    teacher = _tiny_open_clip().eval().requires_grad_(False) if loss_name == "DistillClipLoss" else None
    loss_fn = getattr(pcf, loss_name)()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 64, (6, 8), generator=g)) for _ in range(3)]

    def step(model, images, texts):
        out = model(images, texts)
        if loss_name == "DistillClipLoss":
            t = teacher(images, texts)
            contrastive, kd = loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                                      t["image_features"], t["text_features"], t["logit_scale"])
            loss = contrastive + kd
        elif loss_name == "SigLipLoss":
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], -2.0)
        else:
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        return loss.detach()

    def train(model, run):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for images, texts in batches:
            opt.zero_grad()
            losses.append(run(model, images, texts))
            opt.step()
        return torch.stack(losses)

    eager_model = copy.deepcopy(model)
    eager = train(eager_model, step)
    compiled = train(model, torch.compile(step, fullgraph=True, backend=BACKEND))
    assert _rel(compiled, eager) <= 1e-5
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- CUDA graphs (GPU)

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(LOSSES))
def test_cuda_graph_capture_replays_forward_and_backward(name):
    """Every loss's default GPU path (scale a tensor or a Python number) is capturable: no host
    sync, no host-to-device copy. Replaying the graph on new inputs equals eager."""
    a, b, ta, tb, s = (x.detach().cuda() for x in _inputs(n=300, m=300, d=64))
    static = [x.clone().requires_grad_(x.is_floating_point() and i in (0, 1, 4)) for i, x in enumerate((a, b, ta, tb, s))]
    fn = LOSSES[name]
    for _ in range(2):  # warm up on a side stream (kernel compilation, allocator)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*static).backward()
        torch.cuda.current_stream().wait_stream(stream)
    for x in static:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fn(*static)
        loss.backward()
    fresh = [x.detach().cuda() for x in _inputs(n=300, m=300, d=64, seed=7)]
    for x, y in zip(static, fresh):
        x.data.copy_(y)
    graph.replay()
    torch.cuda.synchronize()
    ref_inputs = [y.clone().requires_grad_(i in (0, 1, 4)) for i, y in enumerate(fresh)]
    ref = fn(*ref_inputs)
    ref.backward()
    assert _rel(loss, ref) <= 1e-3
    assert _rel(static[0].grad, ref_inputs[0].grad) <= 1e-3
