"""Kernel edge cases: strided ids, grid limits, exact ties in recall@K; on a GPU also tensors on
another device, N·D past 2³¹ in any layout, and bit-identical repeated runs."""
import math

import pytest
import torch

import pyclipfast as pcf
from helpers import (
    DEVICE, HAS_CUDA, TOLERANCE, as_reference, assert_close_to_reference, fast_backends, features, fresh_seed, leaves,
    rel_err,
)
from pyclipfast import _blocks


def _strided_ids(n, seed):
    """(image_ids, text_ids) as strided views (stride 2, 3): what `x[:, 0]` of a table gives."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, n // 2, (n,), generator=g)
    text = image[torch.randperm(n, generator=g)]
    image_view = torch.stack([image, torch.arange(n)], 1)[:, 0]
    text_view = torch.stack([text, -text, torch.arange(n)], 1)[:, 0]
    assert not image_view.is_contiguous() and not text_view.is_contiguous()
    return image_view.to(DEVICE), text_view.to(DEVICE)


@pytest.mark.parametrize("loss", ["clip", "siglip", "distill"])
@pytest.mark.parametrize("backend", fast_backends())
def test_strided_ids_match_reference(backend, loss):
    seed = fresh_seed()
    n, d = 20, 12
    image_ids, text_ids = _strided_ids(n, seed)
    a, b = features(n, d, seed=seed), features(n, d, seed=seed + 1)
    ta, tb = features(n, 8, seed=seed + 2), features(n, 8, seed=seed + 3)

    def run(name, a, b, ids):
        a, b = leaves(a, b)
        if loss == "clip":
            value = pcf.clip_loss(a, b, 10.0, image_ids=ids[0], text_ids=ids[1], backend=name)
        elif loss == "siglip":
            value = pcf.siglip_loss(a, b, 10.0, -5.0, image_ids=ids[0], text_ids=ids[1], backend=name)
        else:
            t = (ta, tb) if name != "reference" else (ta.double().cpu(), tb.double().cpu())
            value = sum(pcf.distill_loss(a, b, *t, 10.0, 15.0, margin=0.2, false_negative_threshold=0.3,
                                         image_ids=ids[0], text_ids=ids[1], backend=name))
        return [value, *torch.autograd.grad(value, (a, b))]

    out = run(backend, a, b, (image_ids, text_ids))
    ref = run("reference", *as_reference(a, b), (image_ids.cpu().contiguous(), text_ids.cpu().contiguous()))
    assert_close_to_reference(out, ref, torch.float32, ["loss", "d_image", "d_text"])


@pytest.mark.parametrize("backend", fast_backends())
def test_recall_with_strided_ids(backend):
    seed = fresh_seed()
    image_ids, text_ids = _strided_ids(30, seed)
    q, g = features(30, 10, seed=seed), features(30, 10, seed=seed + 1)
    ks = (1, 2, 5)
    out = pcf.recall_at_k(q, g, ks, query_ids=image_ids, gallery_ids=text_ids, backend=backend)
    ref = pcf.recall_at_k(q.double().cpu(), g.double().cpu(), ks, query_ids=image_ids.cpu().contiguous(),
                          gallery_ids=text_ids.cpu().contiguous(), backend="reference")
    assert out == ref


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("with_ids", [False, True], ids=["diagonal", "ids"])
def test_recall_duplicate_of_the_best_positive_is_a_tie(backend, dtype, with_ids):
    """Queries and gallery repeat their first half (duplicate captions): query i's positive is
    its nearest item, and the copy of it under another index is a negative with exactly the same
    score. Ties count in the query's favour, so R@1 = 1."""
    seed = fresh_seed()
    half, d = 27, 96
    q = features(half, d, dtype=torch.float64, seed=seed)
    g = torch.nn.functional.normalize(q + 0.05 * features(half, d, dtype=torch.float64, seed=seed + 1), dim=-1)
    queries, gallery = torch.cat([q, q]).to(dtype), torch.cat([g, g]).to(dtype)
    ids = dict(query_ids=torch.arange(2 * half, device=DEVICE), gallery_ids=torch.arange(2 * half, device=DEVICE))
    out = pcf.recall_at_k(queries, gallery, (1,), backend=backend, **(ids if with_ids else {}))
    assert out == {"R@1": 1.0}


@pytest.mark.parametrize("block", [(64, 64), (128, 128), (16, 16)], ids=["64x64", "128x128", "16x16"])
def test_gradient_blocks_fit_the_grid(block, monkeypatch):
    """A few rows against millions of columns (and the reverse): every gradient block launches
    (the GPU's block budget, not the interpreter's)."""
    monkeypatch.setattr(_blocks, "triton_interpreting", lambda: False)
    cfg = type("Cfg", (), dict(block_m=block[0], block_n=block[1]))
    for n in (1, 7, 8, 16, 17, 1000, 8192, 3 * 10**5):
        for m in (1, 5, 4096, 65535 * 128 - 1, 65535 * 128 + 1, 8_400_000, 2**30 + 3):
            rows, cols = _blocks.grad_block_shape(n, m, cfg)
            assert 1 <= rows <= n and 1 <= cols <= m
            assert math.ceil(cols / cfg.block_n) <= 65535, (n, m, rows, cols)  # CUDA grid.y limit
            assert math.ceil(rows / cfg.block_m) < 2**31
            assert rows == n or rows % cfg.block_m == 0, (n, m, rows)  # blocks are whole tiles
            assert cols == m or cols % cfg.block_n == 0, (n, m, cols)
            assert rows * cols <= max(_blocks.GRAD_BLOCK_ELEMENTS, cfg.block_m * cfg.block_n), (n, m, rows, cols)


# ----------------------------------------------------------------------------- GPU only

def _triton_calls(x_dev):
    """One small call of every Triton op on tensors of device x_dev: name → (value, *gradients)."""
    n, d = 150, 40
    a, b = features(n, d, seed=1, device=x_dev), features(n, d, seed=2, device=x_dev)
    ta, tb = features(n, 16, seed=3, device=x_dev), features(n, 16, seed=4, device=x_dev)

    def grads(fn, *inputs):
        inputs = leaves(*inputs)
        value = fn(*inputs)
        return [value, *torch.autograd.grad(value, inputs)]

    return {
        "clip": grads(lambda x, y: pcf.clip_loss(x, y, 20.0, backend="triton"), a, b),
        "siglip": grads(lambda x, y: pcf.siglip_loss(x, y, 10.0, -10.0, backend="triton"), a, b),
        "distill": grads(lambda x, y: sum(pcf.distill_loss(x, y, ta, tb, 10.0, 20.0, margin=0.2,
                                                           false_negative_threshold=0.5, backend="triton")), a, b),
        "cosine": grads(lambda x, y: pcf.cosine_loss(x, y, target_grad=True, backend="triton"), a, b),
        "recall": [torch.tensor(list(pcf.recall_at_k(a, b, (1, 5), backend="triton").values()))],
    }


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    torch.cuda.set_device(0)
    on_other = _triton_calls("cuda:1")
    assert torch.cuda.current_device() == 0
    on_current = _triton_calls("cuda:0")
    for name, values in on_other.items():
        assert all(v.device == torch.device("cuda:1") for v in values if v.is_cuda), name
        for x, y in zip(values, on_current[name]):
            assert rel_err(x, y) <= TOLERANCE[torch.float32], name


@pytest.mark.gpu
def test_repeated_runs_are_bit_identical():
    first, second = _triton_calls(DEVICE), _triton_calls(DEVICE)
    for name, values in first.items():
        for x, y in zip(values, second[name]):
            assert torch.equal(x, y), name


def _assert_close_on_device(out, ref, names, tol):
    """Relative errors computed in float32 where the tensors are (billions of elements)."""
    assert len(out) == len(ref) == len(names)
    for name, o, r in zip(names, out, ref):
        err = float((o.float() - r.float()).norm() / r.float().norm())
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


def _wide_ids(m, n, device):
    text = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,))])
    return torch.arange(n, device=device), text.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["rowmajor", "colmajor"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_products_past_int32_offsets(loss, layout):
    """16 images against M texts with M·D > 2³¹ (fp16, 4.5 GB per operand): every offset of a
    row-major text operand, and (D − 1)·M of a column-major one, passes 2³¹."""
    n, m, d = 16, 2_200_000, 1024
    torch.manual_seed(0)
    a = features(n, d, dtype=torch.float16, device=DEVICE)
    b = torch.nn.functional.normalize(torch.randn(m, d, device=DEVICE, dtype=torch.float16), dim=-1)
    if layout == "colmajor":
        b = b.t().contiguous().t()
    assert m * d > 2**31
    image_ids, text_ids = _wide_ids(m, n, DEVICE)
    out, ref = [], []
    for backend, store in (("triton", out), ("torch", ref)):
        x = a.detach().requires_grad_()
        if loss == "clip":
            value = pcf.clip_loss(x, b, 10.0, image_ids=image_ids, text_ids=text_ids, bidirectional=False,
                                  backend=backend)
        else:
            value = pcf.siglip_loss(x, b, 10.0, -10.0, image_ids=image_ids, text_ids=text_ids, backend=backend)
        store.extend([value.detach(), *torch.autograd.grad(value, x)])
    _assert_close_on_device(out, ref, ["loss", "d_image"], TOLERANCE[torch.float16])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["rowmajor", "colmajor"])
def test_cosine_past_int32_offsets(layout):
    n, d = 2_200_000, 1024
    torch.manual_seed(0)
    p = torch.randn(n, d, device=DEVICE, dtype=torch.float16)
    z = torch.randn(n, d, device=DEVICE, dtype=torch.float16)
    if layout == "colmajor":
        p = p.t().contiguous().t()
    out, ref = [], []
    for backend, store in (("triton", out), ("torch", ref)):
        x = p.detach().requires_grad_()
        value = pcf.cosine_loss(x, z, backend=backend)
        store.extend([value.detach(), *torch.autograd.grad(value, x)])
        del x, value
    _assert_close_on_device(out, ref, ["loss", "d_online"], TOLERANCE[torch.float16])
