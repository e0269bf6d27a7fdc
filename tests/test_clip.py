"""clip_loss: every backend against the float64 reference."""
import pytest
import torch

import pyclipfast as pcf
import torch.nn.functional as F

from helpers import (
    DEVICE, as_reference, assert_close_to_reference, backend_dtype_params, block_params, fast_backends, features,
    fresh_seed, leaves,
)


def _ids(n, m, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return {}
    if kind == "rect":  # every image has ≥ 1 caption, some have several
        text = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,), generator=g)])
        text = text[torch.randperm(m, generator=g)]
        return dict(image_ids=torch.arange(n).to(DEVICE), text_ids=text.to(DEVICE))
    # "dup": repeated ids on both sides (duplicates / recaptions), same multiset
    image = torch.randint(0, max(1, n // 3), (n,), generator=g)
    return dict(image_ids=image.to(DEVICE), text_ids=image[torch.randperm(n, generator=g)].to(DEVICE))


# id, N, M, D, scale, feature options, ids kind
CASES = [
    ("N1-D8", 1, 1, 8, 10.0, {}, None),
    ("N37-D20", 37, 37, 20, 14.3, {}, None),
    ("N70-D48-strided", 70, 70, 48, 20.0, {"layout": "strided"}, None),
    ("N33-D24-colmajor", 33, 33, 24, 5.0, {"layout": "colmajor"}, None),
    ("N50-D32-scale100", 50, 50, 32, 100.0, {}, None),
    ("N60-D16-duplicate-rows", 60, 60, 16, 30.0, {"duplicate_rows": True}, None),
    ("N45xM70-D24-ids", 45, 70, 24, 10.0, {}, "rect"),
    ("N40-D12-repeated-ids", 40, 40, 12, 10.0, {}, "dup"),
]


def run(backend, a, b, scale, wrt=("image", "text", "scale"), **kw):
    """[loss, *gradients with respect to wrt] (only those inputs require grad)."""
    inputs = dict(zip(("image", "text", "scale"), (a, b, scale)))
    inputs.update(zip(wrt, leaves(*(inputs[name] for name in wrt))))
    loss = pcf.clip_loss(*inputs.values(), backend=backend, **kw)
    return [loss, *torch.autograd.grad(loss, [inputs[name] for name in wrt])]


def check_against_reference(backend, dtype, case, bidirectional, wrt=("image", "text", "scale")):
    _, n, m, d, s, opts, ids = case
    seed = fresh_seed()
    a = features(n, d, dtype=dtype, seed=seed, **opts)
    b = features(m, d, dtype=dtype, seed=seed + 1, **opts)
    scale = torch.tensor(s, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    kw = dict(_ids(n, m, ids, seed), bidirectional=bidirectional)
    out = run(backend, a, b, scale, wrt=wrt, **kw)
    ref_kw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref = run("reference", *as_reference(a, b, scale), wrt=wrt, **ref_kw)
    plain = run("reference", a, b, scale, wrt=wrt, **kw)
    assert out[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g.dtype == (dtype if name != "scale" else scale.dtype) for name, g in zip(wrt, out[1:]))
    assert_close_to_reference(out, ref, dtype, ["loss", *(f"d_{name}" for name in wrt)], baseline=plain)


@pytest.mark.parametrize("blocks", block_params(), indirect=True)
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidir", "rows"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_matches_float64_reference(backend, dtype, case, bidirectional, blocks):
    check_against_reference(backend, dtype, case, bidirectional)


SMALL_BLOCK_CASES = [c for c in CASES if c[0] in ("N45xM70-D24-ids", "N60-D16-duplicate-rows")]


@pytest.mark.parametrize("bidirectional,wrt", [
    (True, ("image", "text", "scale")), (False, ("image", "text", "scale")), (True, ("scale",)),
], ids=["bidir-all-grads", "rows-all-grads", "bidir-scale-only"])
@pytest.mark.parametrize("case", SMALL_BLOCK_CASES, ids=[c[0] for c in SMALL_BLOCK_CASES])
@pytest.mark.parametrize("backend", fast_backends())
def test_small_blocks_match_float64_reference(backend, case, bidirectional, wrt, small_blocks):
    """16×16 tiles, ≤ 64 row groups, 3-tile gradient blocks: the column partials merged across
    row groups, G's block offsets, the scale-only sweep (no G stored)."""
    check_against_reference(backend, torch.float32, case, bidirectional, wrt)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend, reduction):
    a, b = features(29, 10, seed=1), features(29, 10, seed=2)
    scale = torch.tensor(7.0, device=DEVICE)
    for bidirectional in (True, False):
        out = pcf.clip_loss(a, b, scale, reduction=reduction, bidirectional=bidirectional, backend=backend)
        ref = pcf.clip_loss(a.double().cpu(), b.double().cpu(), scale.double().cpu(), reduction=reduction,
                            bidirectional=bidirectional, backend="reference")
        assert out.shape == ref.shape
        assert_close_to_reference([out], [ref], torch.float32, [f"{reduction} bidir={bidirectional}"])


def test_mean_is_half_of_each_direction():
    a, b = features(20, 8, seed=3), features(20, 8, seed=4)
    both = pcf.clip_loss(a, b, 10.0, backend="torch")
    rows = pcf.clip_loss(a, b, 10.0, bidirectional=False, backend="torch")
    cols = pcf.clip_loss(b, a, 10.0, bidirectional=False, backend="torch")
    torch.testing.assert_close(both, 0.5 * (rows + cols))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_bias_cancels_and_gets_zero_gradient(backend):
    """With a bias, the loss is still open_clip's cross-entropy of the unbiased float64 logits."""
    a, b = leaves(features(25, 12, seed=5), features(25, 12, seed=6))
    bias = torch.tensor(-3.0, device=DEVICE, requires_grad=True)
    with_bias = pcf.clip_loss(a, b, 10.0, bias, backend=backend)
    logits = 10.0 * a.detach().double().cpu() @ b.detach().double().cpu().T
    labels = torch.arange(25)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    assert_close_to_reference([with_bias], [expected], torch.float32, ["loss with bias"])
    (db,) = torch.autograd.grad(with_bias, bias)
    assert float(db) == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_inputs_get_no_gradient(backend):
    """Only what requires grad is differentiated (a frozen text tower, a fixed scale)."""
    a = features(30, 16, seed=7).requires_grad_()
    b = features(30, 16, seed=8)
    loss = pcf.clip_loss(a, b, torch.tensor(10.0, device=DEVICE), backend=backend)
    loss.backward()
    ref_a = as_reference(a)[0]
    pcf.clip_loss(ref_a, b.double().cpu(), 10.0, backend="reference").backward()
    assert b.grad is None
    assert_close_to_reference([a.grad], [ref_a.grad], torch.float32, ["d_image"])


def test_gradcheck_torch_backend():
    a = features(9, 5, dtype=torch.float64, seed=9).requires_grad_()
    b = features(9, 5, dtype=torch.float64, seed=10).requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5], device=DEVICE)
    for kw in ({}, {"image_ids": ids, "text_ids": ids.flip(0)}):
        assert torch.autograd.gradcheck(lambda x, y, s: pcf.clip_loss(x, y, s, backend="torch", **kw),
                                        (a, b, scale))


def test_second_backward_with_retain_graph():
    a, b = leaves(features(12, 6, seed=11), features(12, 6, seed=12))
    loss = pcf.clip_loss(a, b, 5.0, backend="torch")
    (g1,) = torch.autograd.grad(loss, a, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, a)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_signed_and_zero_upstream_weights(backend):
    """Per-row upstream gradients of any sign (reduction='none' weighted by the caller)."""
    a, b = features(37, 12, seed=13), features(37, 12, seed=14)
    w = torch.randn(37, generator=torch.Generator().manual_seed(15)).to(DEVICE)
    w[::5] = 0.0
    out, ref = [], []
    for name, inputs, store in ((backend, leaves(a, b), out), ("reference", as_reference(a, b), ref)):
        x, y = inputs
        per_row = pcf.clip_loss(x, y, 9.0, reduction="none", backend=name)
        store.extend([per_row, *torch.autograd.grad((per_row * w.to(x.device, x.dtype)).sum(), (x, y))])
    assert_close_to_reference(out, ref, torch.float32, ["per-row loss", "d_image", "d_text"])


# --------------------------------------------------------------------------- softmax-mean ("dot") statistics

# N200xM40: a program of the Triton sweep walks several row blocks, so its column partials are
# rescaled when a later row block raises a column's max.
DOT_CASES = [c for c in CASES if c[0] in ("N1-D8", "N70-D48-strided", "N50-D32-scale100", "N60-D16-duplicate-rows",
                                          "N45xM70-D24-ids", "N40-D12-repeated-ids")]
DOT_CASES.append(("N200xM40-D16", 200, 40, 16, 30.0, {}, None))


def check_dots(backend, dtype, case, bidirectional):
    """row_dot_i = Σ_j softmax_j(S_i·)·S_ij and col_dot_j = Σ_i softmax_i(S_·j)·S_ij of the fused sweep
    against the float64 materialised values on the same inputs; the other statistics unchanged."""
    from pyclipfast.clip import clip_stats

    _, n, m, d, s, opts, ids = case
    seed = fresh_seed()
    a = features(n, d, dtype=dtype, seed=seed, **opts)
    b = features(m, d, dtype=dtype, seed=seed + 1, **opts)
    scale = torch.tensor(s, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    kw = _ids(n, m, ids, seed)
    row_ids, col_ids = kw.get("image_ids"), kw.get("text_ids")
    stats = clip_stats(a, b, scale, row_ids, col_ids, bidirectional, backend, dots=True)
    logits = scale.double().cpu() * a.double().cpu() @ b.double().cpu().T
    ref = [(logits.softmax(1) * logits).sum(1)] + ([(logits.softmax(0) * logits).sum(0)] if bidirectional else [])
    assert len(stats) == 6 and (stats[5] is None) == (not bidirectional)
    assert_close_to_reference(stats[4:4 + len(ref)], ref, dtype, ["row_dot", "col_dot"])
    plain = clip_stats(a, b, scale, row_ids, col_ids, bidirectional, backend)
    for name, with_dots, without in zip(("row_lse", "col_lse", "row_pos", "col_pos"), stats, plain):
        assert (with_dots is None) == (without is None), name
        assert with_dots is None or torch.equal(with_dots, without), f"{name} changed when the dots are computed"


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidir", "rows"])
@pytest.mark.parametrize("case", DOT_CASES, ids=[c[0] for c in DOT_CASES])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_dots_match_float64(backend, dtype, case, bidirectional):
    check_dots(backend, dtype, case, bidirectional)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidir", "rows"])
@pytest.mark.parametrize("case", SMALL_BLOCK_CASES + [c for c in CASES if c[0] == "N50-D32-scale100"],
                         ids=[c[0] for c in SMALL_BLOCK_CASES] + ["N50-D32-scale100"])
@pytest.mark.parametrize("backend", fast_backends())
def test_dots_small_blocks_match_float64(backend, case, bidirectional, small_blocks):
    """Many row groups and column groups: each group's Σ exp(S − max)·S merged with its sum-exp's
    weights, the running sums rescaled whenever a later tile raises the max."""
    check_dots(backend, torch.float32, case, bidirectional)


@pytest.mark.parametrize("backend", fast_backends())
def test_dots_of_non_finite_features_are_nan(backend):
    from pyclipfast.clip import clip_stats

    a, b = features(20, 8, seed=1), features(30, 8, seed=2)
    a[3, 2] = float("inf")
    stats = clip_stats(a, b, torch.tensor(5.0, device=DEVICE), None, None, True, backend, dots=True)  # unchecked
    row_dot, col_dot = stats[4].cpu(), stats[5].cpu()
    assert torch.isnan(row_dot[3]) and torch.isfinite(torch.cat([row_dot[:3], row_dot[4:]])).all()
    assert torch.isnan(col_dot).all()


def test_dots_do_not_take_a_gradient():
    """The dots feed scale gradients formed outside the operator: the operator's backward is the
    one of the four statistics, whatever reaches the dots."""
    from pyclipfast.clip import clip_stats

    a, b = leaves(features(12, 6, seed=5), features(12, 6, seed=6))
    scale = torch.tensor(4.0, device=DEVICE, requires_grad=True)
    row_lse, col_lse, _, _, row_dot, col_dot = clip_stats(a, b, scale, None, None, True, "torch", dots=True)
    assert not row_dot.requires_grad and not col_dot.requires_grad
    grads = torch.autograd.grad(row_lse.sum() + col_lse.sum(), (a, b, scale))
    plain = [x.detach().requires_grad_() for x in (a, b, scale)]
    row_lse, col_lse, _, _ = clip_stats(*plain, None, None, True, "torch")
    for got, want in zip(grads, torch.autograd.grad(row_lse.sum() + col_lse.sum(), plain)):
        assert torch.equal(got, want)
    # ∂row_lse/∂s = row_dot / s
    assert torch.allclose(grads[2], (row_dot.sum() + col_dot.sum()) / 4.0, rtol=1e-5)
