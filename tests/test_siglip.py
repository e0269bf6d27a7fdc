"""siglip_loss: every backend against the float64 reference."""
import pytest
import torch

import pyclipfast as pcf
from helpers import (
    DEVICE, as_reference, assert_close_to_reference, backend_dtype_params, block_params, fast_backends, features,
    fresh_seed, leaves,
)

# id, N, M, D, scale, bias, feature options, mode
CASES = [
    ("N1-D8", 1, 1, 8, 10.0, -10.0, {}, "diag"),
    ("N37-D20", 37, 37, 20, 10.0, -10.0, {}, "diag"),
    ("N70-D48-strided", 70, 70, 48, 20.0, -5.0, {"layout": "strided"}, "diag"),
    ("N33-D24-colmajor", 33, 33, 24, 5.0, 0.0, {"layout": "colmajor"}, "diag"),
    ("N50-D32-scale100", 50, 50, 32, 100.0, -10.0, {}, "diag"),
    ("N60-D16-duplicate-rows", 60, 60, 16, 30.0, -3.0, {"duplicate_rows": True}, "diag"),
    ("N45xM70-D24-ids", 45, 70, 24, 10.0, -10.0, {}, "ids"),
    ("N30xM41-D12-negative-only", 30, 41, 12, 10.0, -10.0, {}, "negative_only"),
]


ALL = ("image", "text", "scale", "bias")


def run(backend, a, b, scale, bias, wrt=ALL, **kw):
    """[loss, *gradients with respect to wrt] (only those inputs require grad)."""
    inputs = dict(zip(ALL, (a, b, scale, bias)))
    inputs.update(zip(wrt, leaves(*(inputs[name] for name in wrt))))
    loss = pcf.siglip_loss(*inputs.values(), backend=backend, **kw)
    return [loss, *torch.autograd.grad(loss, [inputs[name] for name in wrt])]


@pytest.mark.parametrize("blocks", block_params(), indirect=True)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_matches_float64_reference(backend, dtype, case, blocks):
    check_against_reference(backend, dtype, case)


SMALL_BLOCK_CASES = [c for c in CASES if c[0] in ("N45xM70-D24-ids", "N60-D16-duplicate-rows")]


@pytest.mark.parametrize("wrt", [ALL, ("scale", "bias")], ids=["all-grads", "scalars-only"])
@pytest.mark.parametrize("case", SMALL_BLOCK_CASES, ids=[c[0] for c in SMALL_BLOCK_CASES])
@pytest.mark.parametrize("backend", fast_backends())
def test_small_blocks_match_float64_reference(backend, case, wrt, small_blocks):
    """16×16 tiles and 3-tile gradient blocks: G's block offsets; the sweep without G stored."""
    check_against_reference(backend, torch.float32, case, wrt)


def check_against_reference(backend, dtype, case, wrt=ALL):
    _, n, m, d, s, bias, opts, mode = case
    seed = fresh_seed()
    a = features(n, d, dtype=dtype, seed=seed, **opts)
    b = features(m, d, dtype=dtype, seed=seed + 1, **opts)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    scale, bias = torch.tensor(s, dtype=sdt, device=DEVICE), torch.tensor(bias, dtype=sdt, device=DEVICE)
    kw = {}
    if mode == "ids":
        g = torch.Generator().manual_seed(seed)
        kw = dict(image_ids=torch.randint(0, 20, (n,), generator=g).to(DEVICE),
                  text_ids=torch.randint(0, 20, (m,), generator=g).to(DEVICE))
    elif mode == "negative_only":
        kw = dict(negative_only=True)
    out = run(backend, a, b, scale, bias, wrt, **kw)
    ref = run("reference", *as_reference(a, b, scale, bias), wrt,
              **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
    plain = run("reference", a, b, scale, bias, wrt, **kw)
    assert all(g.dtype == (dtype if name in ("image", "text") else sdt) for name, g in zip(wrt, out[1:]))
    assert_close_to_reference(out, ref, dtype, ["loss", *(f"d_{name}" for name in wrt)], baseline=plain)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_without_bias_and_without_grad(backend):
    a, b = features(40, 16, seed=1), features(40, 16, seed=2)
    ref = pcf.siglip_loss(a.double().cpu(), b.double().cpu(), 10.0, None, backend="reference")
    with torch.no_grad():
        out = pcf.siglip_loss(a, b, 10.0, None, backend=backend)
    assert_close_to_reference([out], [ref], torch.float32, ["loss"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_upstream_gradient_is_applied(backend):
    a, b = leaves(features(20, 8, seed=3), features(20, 8, seed=4))
    (3.0 * pcf.siglip_loss(a, b, 10.0, -10.0, backend=backend)).backward()
    ra, rb = as_reference(a, b)
    (3.0 * pcf.siglip_loss(ra, rb, 10.0, -10.0, backend="reference")).backward()
    assert_close_to_reference([a.grad, b.grad], [ra.grad, rb.grad], torch.float32, ["d_image", "d_text"])


def test_gradcheck_torch_backend():
    a = features(7, 5, dtype=torch.float64, seed=5).requires_grad_()
    b = features(9, 5, dtype=torch.float64, seed=6).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ids = dict(image_ids=torch.tensor([0, 1, 1, 2, 3, 4, 5], device=DEVICE),
               text_ids=torch.tensor([1, 0, 2, 2, 3, 9, 5, 5, 1], device=DEVICE))
    assert torch.autograd.gradcheck(
        lambda x, y, s, c: pcf.siglip_loss(x, y, s, c, backend="torch", **ids), (a, b, scale, bias))


def test_sweeps_inside_shared_scratch_reuse_one_set_of_tiles():
    """The blocks of one rank's SigLIP step share their scratch tiles; outside, each sweep has its own."""
    from pyclipfast.chunked import _tiles
    a, b = torch.randn(40, 8), torch.randn(30, 8)
    one, two = (_tiles.TileScores(a, b, torch.tensor(2.0)) for _ in range(2))
    assert one._s.data_ptr() != two._s.data_ptr()
    with _tiles.shared_scratch():
        first = _tiles.TileScores(a, b, torch.tensor(2.0))
        second = _tiles.TileScores(a[:20], b, torch.tensor(2.0))  # smaller: a view of the same buffer
        assert second._s.data_ptr() == first._s.data_ptr() and second._e.data_ptr() == first._e.data_ptr()
    assert _tiles._shared.buffers is None
    with _tiles.shared_scratch():
        x = torch.randn(50, 8, requires_grad=True)
        y = torch.randn(50, 8, requires_grad=True)
        shared = pcf.siglip_loss(x, y, 10.0, -10.0, backend="torch")
        shared.backward()
    plain_x, plain_y = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    plain = pcf.siglip_loss(plain_x, plain_y, 10.0, -10.0, backend="torch")
    plain.backward()
    assert torch.equal(shared, plain) and torch.equal(x.grad, plain_x.grad) and torch.equal(y.grad, plain_y.grad)
