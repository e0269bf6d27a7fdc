"""distill_loss and DistillClipLoss: every backend against the float64 reference."""
import inspect

import pytest
import torch
from open_clip import loss as oc

import pyclipfast as pcf
from helpers import (
    DEVICE, as_reference, assert_close_to_reference, backend_dtype_params, block_params, fast_backends, features,
    fresh_seed, leaves,
)


def _ids(n, m, seed):
    """Every image has ≥ 1 caption, some several; repeated image ids too."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, max(1, (2 * n) // 3), (n,), generator=g)
    text = torch.cat([image, image[torch.randint(0, n, (m - n,), generator=g)]])[torch.randperm(m, generator=g)]
    return dict(image_ids=image.to(DEVICE), text_ids=text.to(DEVICE))


# id, N, M, D, Dt, s, loss options, feature options, with ids
CASES = [
    ("N1-m0.3", 1, 1, 8, 6, 10.0, dict(margin=0.3), {}, False),
    ("N37-D20-Dt12-m0.1", 37, 37, 20, 12, 14.3, dict(margin=0.1), {}, False),
    ("N45-D24-Dt10-m0.3-filter-ce-kd2", 45, 45, 24, 10, 20.0,
     dict(margin=0.3, false_negative_threshold=0.05, kd="ce", kd_weight=2.0), {}, False),
    ("N33-D12-strided-m0.1-filter", 33, 33, 12, 9, 10.0,
     dict(margin=0.1, false_negative_threshold=0.0), {"layout": "strided"}, False),
    ("N40-D16-colmajor-m0.3-kd0", 40, 40, 16, 16, 10.0, dict(margin=0.3, kd_weight=0.0), {"layout": "colmajor"},
     False),
    ("N36-D10-scale100-m0.1", 36, 36, 10, 7, 100.0, dict(margin=0.1), {}, False),
    ("N40-D12-duplicate-rows-m0.3-filter", 40, 40, 12, 12, 30.0,
     dict(margin=0.3, false_negative_threshold=0.2), {"duplicate_rows": True}, False),
    # > 2 Triton row blocks and > 1 chunked column tile: the online merges across tiles in both directions
    ("N70xM100-D16-ids-m0.3-filter", 70, 100, 16, 8, 10.0, dict(margin=0.3, false_negative_threshold=0.0), {}, True),
    ("N35-D20-unnormalized-ce", 35, 35, 20, 12, 5.0, dict(kd="ce", normalize=False), {"normalize": False}, False),
]


def _inputs(n, m, d, dt, s, feature_opts, dtype, seed):
    student = [features(k, d, dtype=dtype, seed=seed + i, **feature_opts) for i, k in enumerate((n, m))]
    teacher = [features(k, dt, dtype=dtype, seed=seed + 2 + i, **feature_opts) for i, k in enumerate((n, m))]
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scales = [torch.tensor(v, dtype=scale_dtype, device=DEVICE) for v in (s, 1.5 * s)]
    return student, teacher, scales


ALL = ("image", "text", "scale")


def run(backend, a, b, ta, tb, scale, teacher_scale, wrt=ALL, **kw):
    """(contrastive, distill, *gradients with respect to wrt) for the objective contrastive + distill."""
    inputs = dict(zip(ALL, (a, b, scale)))
    inputs.update(zip(wrt, leaves(*(inputs[name] for name in wrt))))
    a, b, scale = inputs.values()
    contrastive, distill = pcf.distill_loss(a, b, ta, tb, scale, teacher_scale, backend=backend, **kw)
    return [contrastive, distill, *torch.autograd.grad(contrastive + distill, [inputs[name] for name in wrt])]


@pytest.mark.parametrize("blocks", block_params(), indirect=True)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_matches_float64_reference(backend, dtype, case, blocks):
    check_against_reference(backend, dtype, case)


SMALL_BLOCK_CASES = [
    ("N34xM40-D16-ids-m0.3-filter", 34, 40, 16, 8, 10.0, dict(margin=0.3, false_negative_threshold=0.0), {}, True),
    ("N37-D20-Dt12-m0.1-ce", 37, 37, 20, 12, 14.3, dict(margin=0.1, kd="ce"), {}, False),
]


@pytest.mark.parametrize("case,wrt", [(SMALL_BLOCK_CASES[0], ALL), (SMALL_BLOCK_CASES[1], ALL),
                                      (SMALL_BLOCK_CASES[0], ("scale",))],
                         ids=[f"{SMALL_BLOCK_CASES[0][0]}-all-grads", f"{SMALL_BLOCK_CASES[1][0]}-all-grads",
                              f"{SMALL_BLOCK_CASES[0][0]}-scale-only"])
@pytest.mark.parametrize("backend", fast_backends())
def test_small_blocks_match_float64_reference(backend, case, wrt, small_blocks):
    """16×16 tiles, ≤ 64 row groups, 3-tile gradient blocks: the column partials (eight
    statistics) merged across row groups, H's block offsets, the scale-only sweep."""
    check_against_reference(backend, torch.float32, case, wrt)


def check_against_reference(backend, dtype, case, wrt=ALL):
    _, n, m, d, dt, s, loss_opts, feature_opts, with_ids = case
    seed = fresh_seed()
    (a, b), (ta, tb), (scale, teacher_scale) = _inputs(n, m, d, dt, s, feature_opts, dtype, seed)
    kw = dict(loss_opts, **(_ids(n, m, seed) if with_ids else {}))
    out = run(backend, a, b, ta, tb, scale, teacher_scale, wrt, **kw)
    ref_kw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref = run("reference", *as_reference(a, b, ta, tb, scale, teacher_scale), wrt, **ref_kw)
    plain = run("reference", a, b, ta, tb, scale, teacher_scale, wrt, **kw)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out[0].dtype == out[1].dtype == loss_dtype
    assert all(g.dtype == (dtype if name != "scale" else loss_dtype) for name, g in zip(wrt, out[2:]))
    names = ["contrastive", "distill", *(f"d_{name}" for name in wrt)]
    if loss_opts.get("kd_weight") == 0.0:
        assert float(out[1]) == 0.0
        out, ref, plain, names = out[:1] + out[2:], ref[:1] + ref[2:], plain[:1] + plain[2:], names[:1] + names[2:]
    assert_close_to_reference(out, ref, dtype, names, baseline=plain)


@pytest.mark.parametrize("options", [
    dict(margin=0.3, false_negative_threshold=0.1, kd="kl"),
    dict(margin=0.2, kd="ce", kd_weight=0.5, normalize=False),
], ids=["margin-filter-kl", "margin-ce-unnormalized"])
def test_gradcheck_torch_backend(options):
    a = features(9, 5, dtype=torch.float64, seed=9).requires_grad_()
    b = features(9, 5, dtype=torch.float64, seed=10).requires_grad_()
    ta, tb = features(9, 4, dtype=torch.float64, seed=11), features(9, 4, dtype=torch.float64, seed=12)
    scale = torch.tensor(3.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5], device=DEVICE)

    def objective(x, y, s):
        contrastive, distill = pcf.distill_loss(x, y, ta, tb, s, 4.0, image_ids=ids, text_ids=ids.flip(0),
                                                backend="torch", **options)
        return contrastive + distill

    assert torch.autograd.gradcheck(objective, (a, b, scale))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_teacher_gets_no_gradient(backend):
    """Teacher tensors that require grad still get none; the student's gradients do not change."""
    student = features(20, 8, seed=1), features(20, 8, seed=2)
    teacher = features(20, 6, seed=3), features(20, 6, seed=4), torch.tensor(20.0, device=DEVICE)
    kw = dict(margin=0.2, false_negative_threshold=0.3, backend=backend)

    def student_grads(ta, tb, teacher_scale):
        a, b = leaves(*student)
        contrastive, distill = pcf.distill_loss(a, b, ta, tb, 10.0, teacher_scale, **kw)
        return torch.autograd.grad(contrastive + distill, (a, b))

    trainable = leaves(*teacher)
    with_grad = student_grads(*trainable)
    assert all(t.grad is None for t in trainable)
    for x, y in zip(with_grad, student_grads(*teacher)):
        torch.testing.assert_close(x, y)
    contrastive, distill = pcf.distill_loss(*student, *trainable[:2], 10.0, trainable[2], **kw)
    assert not contrastive.requires_grad and not distill.requires_grad


def test_margin_raises_negative_logits_and_filter_drops_them():
    a, b = features(24, 8, seed=5), features(24, 8, seed=6)
    ta, tb = features(24, 6, seed=7), features(24, 6, seed=8)

    def contrastive(**kw):
        return float(pcf.distill_loss(a, b, ta, tb, 10.0, 10.0, kd_weight=0.0, backend="torch", **kw)[0])

    plain = pcf.clip_loss(torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1), 10.0)
    assert contrastive() == pytest.approx(float(plain), rel=1e-6)
    assert contrastive(margin=0.3) > contrastive(margin=0.1) > contrastive()
    # φ below every α: every negative leaves the denominators, only the positive remains.
    assert contrastive(false_negative_threshold=-2.0) == pytest.approx(0.0, abs=1e-6)


def test_kl_and_ce_differ_by_the_teacher_entropy():
    a, b = features(16, 8, dtype=torch.float64, seed=9), features(16, 8, dtype=torch.float64, seed=10)
    ta, tb = features(16, 6, dtype=torch.float64, seed=11), features(16, 6, dtype=torch.float64, seed=12)
    kl = pcf.distill_loss(a, b, ta, tb, 10.0, 8.0, kd="kl", backend="torch")[1]
    ce = pcf.distill_loss(a, b, ta, tb, 10.0, 8.0, kd="ce", backend="torch")[1]
    v = 8.0 * ta @ tb.T
    p_rows, p_cols = v.softmax(1), v.softmax(0)
    entropy = 0.5 * (-(p_rows * p_rows.log()).sum(1).mean() - (p_cols * p_cols.log()).sum(0).mean())
    torch.testing.assert_close(ce - kl, entropy)


# ---------------------------------------------------------------------------- open_clip drop-in

def test_drop_in_has_open_clips_constructor_and_forward():
    def params(f):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values() if p.kind != p.KEYWORD_ONLY]
    assert params(pcf.DistillClipLoss.__init__) == params(oc.DistillClipLoss.__init__)
    assert params(pcf.DistillClipLoss.forward) == params(oc.DistillClipLoss.forward)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("output_dict", [False, True])
def test_drop_in_matches_open_clip(backend, output_dict):
    a, b = features(40, 24, seed=13), features(40, 24, seed=14)
    ta, tb = features(40, 16, seed=15), features(40, 16, seed=16)
    scale, teacher_scale = torch.tensor(2.66, device=DEVICE).exp(), torch.tensor(4.0, device=DEVICE).exp()

    def value_and_grads(module):
        x, y, s = leaves(a, b, scale)
        out = module(x, y, s, ta, tb, teacher_scale, output_dict=output_dict)
        losses = list(out.values()) if output_dict else list(out)
        return out, [*losses, *torch.autograd.grad(sum(losses), (x, y, s))]

    out, ours = value_and_grads(pcf.DistillClipLoss(backend=backend))
    ref, theirs = value_and_grads(oc.DistillClipLoss())
    assert type(out) is type(ref) and (not output_dict or list(out) == list(ref))
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-6)

