"""open_clip drop-ins: same constructor, forward signature, outputs, numbers and gradients."""
import inspect

import numpy as np
import pytest
import torch
from open_clip import loss as oc

import pyclipfast as pcf
from helpers import DEVICE, features, leaves

BACKENDS = ["torch", "triton", "reference"]


def _inputs(n=48, d=24, seed=0):
    a, b = features(n, d, seed=seed), features(n, d, seed=seed + 1)
    return a, b, torch.tensor(2.66, device=DEVICE).exp(), torch.tensor(-10.0, device=DEVICE)


def _value_and_grads(module, a, b, scale, *extra, **kw):
    a, b, scale, *extra = leaves(a, b, scale, *extra)
    out = module(a, b, scale, *extra, **kw)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    return out, [loss, *torch.autograd.grad(loss, (a, b, scale, *extra))]


DROP_INS = ["ClipLoss", "SigLipLoss", "DistillClipLoss", "CoCaLoss"]


def _positional(f) -> list:
    """(name, default) of the parameters a caller can pass as open_clip's (keyword-only additions aside)."""
    return [(p.name, p.default) for p in inspect.signature(f).parameters.values() if p.kind != p.KEYWORD_ONLY]


@pytest.mark.parametrize("name", DROP_INS)
def test_same_signatures_as_the_installed_open_clip(name):
    """Every public method of the installed open_clip class, with the same parameters and defaults."""
    ours, theirs = getattr(pcf, name), getattr(oc, name)
    methods = [m for m in dir(theirs) if (not m.startswith("_") or m in ("__init__", "forward"))
               and getattr(getattr(theirs, m), "__module__", None) == theirs.__module__]
    assert "forward" in methods and "__init__" in methods
    for method in methods:
        assert hasattr(ours, method), f"{name}.{method} is missing"
        assert _positional(getattr(ours, method)) == _positional(getattr(theirs, method)), f"{name}.{method}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output_dict", [False, True])
def test_clip_loss_matches_open_clip(backend, output_dict):
    a, b, scale, _ = _inputs()
    out, ours = _value_and_grads(pcf.ClipLoss(backend=backend), a, b, scale, output_dict=output_dict)
    ref, theirs = _value_and_grads(oc.ClipLoss(), a, b, scale, output_dict=output_dict)
    assert type(out) is type(ref) and (not output_dict or out.keys() == ref.keys())
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_loss_with_bias_matches_open_clip(backend):
    a, b, scale, bias = _inputs(seed=3)
    _, ours = _value_and_grads(pcf.ClipLoss(backend=backend), a, b, scale, bias)
    _, theirs = _value_and_grads(oc.ClipLoss(), a, b, scale, bias)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output_dict", [False, True])
def test_siglip_loss_matches_open_clip(backend, output_dict):
    a, b, scale, bias = _inputs(seed=5)
    out, ours = _value_and_grads(pcf.SigLipLoss(backend=backend), a, b, scale, bias, output_dict=output_dict)
    ref, theirs = _value_and_grads(oc.SigLipLoss(), a, b, scale, bias, output_dict=output_dict)
    assert type(out) is type(ref)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-6)


def test_cache_labels_and_ground_truth_like_open_clip():
    ours, theirs = pcf.ClipLoss(cache_labels=True), oc.ClipLoss(cache_labels=True)
    for n in (4, 4, 6):
        torch.testing.assert_close(ours.get_ground_truth("cpu", n), theirs.get_ground_truth("cpu", n))
    assert ours.prev_num_logits == theirs.prev_num_logits == 6
    s_ours, s_theirs = pcf.SigLipLoss(), oc.SigLipLoss()
    for neg in (False, True):
        torch.testing.assert_close(s_ours.get_ground_truth("cpu", torch.float32, 5, neg),
                                   s_theirs.get_ground_truth("cpu", torch.float32, 5, neg))


def test_siglip_rejects_unknown_dist_impl():
    with pytest.raises(ValueError, match="dist_impl"):
        pcf.SigLipLoss(dist_impl="ring")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_clip_loss_under_autocast(backend):
    """Inside torch.autocast the loss still runs its own precision (fp32 statistics)."""
    a, b, scale, _ = _inputs(seed=7)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = pcf.ClipLoss(backend=backend)(a, b, scale)
    torch.testing.assert_close(loss, oc.ClipLoss()(a, b, scale), rtol=2e-5, atol=1e-6)


def _plain_clip(a, b, scale, image_ids, text_ids):
    """Multi-positive InfoNCE with plain torch ops."""
    logits = scale * a @ b.T
    positive = (image_ids[:, None] == text_ids[None, :]).to(logits.dtype)
    rows = logits.logsumexp(1) - (logits * positive).sum(1) / positive.sum(1)
    cols = logits.logsumexp(0) - (logits * positive).sum(0) / positive.sum(0)
    return 0.5 * (rows.mean() + cols.mean())


def test_clip_loss_takes_ids():
    a, b = features(30, 12, seed=11), features(34, 12, seed=12)
    image_ids, text_ids = torch.arange(30, device=DEVICE) % 20, torch.arange(34, device=DEVICE) % 20
    scale = torch.tensor(10.0, device=DEVICE)
    _, ours = _value_and_grads(pcf.ClipLoss(backend="torch"), a, b, scale, image_ids=image_ids, text_ids=text_ids)
    a, b, scale = leaves(a, b, scale)
    expected = _plain_clip(a.double(), b.double(), scale.double(), image_ids, text_ids)
    theirs = [expected, *torch.autograd.grad(expected, (a, b, scale))]
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x.double(), y.double(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("clip_loss_weight", [1.5, 0.0])
@pytest.mark.parametrize("output_dict", [False, True])
def test_coca_loss_matches_open_clip(clip_loss_weight, output_dict):
    a, b, scale, _ = _inputs(n=12, seed=13)
    g = torch.Generator().manual_seed(14)
    logits = torch.randn(12, 7, 9, generator=g).to(DEVICE)
    labels = torch.randint(0, 9, (12, 7), generator=g).to(DEVICE)   # token 0 is padding, ignored
    outs = []
    for cls in (pcf.CoCaLoss, oc.CoCaLoss):
        module = cls(caption_loss_weight=2.0, clip_loss_weight=clip_loss_weight, pad_id=0)
        x, y, s, z = leaves(a, b, scale, logits)
        out = module(x, y, z, labels, s, output_dict=output_dict)
        parts = list(out.values()) if output_dict else list(out)
        total = parts[0] + parts[1]
        inputs = (x, y, s, z) if clip_loss_weight else (z,)
        outs.append((out, [*parts, *torch.autograd.grad(total, inputs)]))
    (ours, got), (theirs, expected) = outs
    assert type(ours) is type(theirs) and (not output_dict or ours.keys() == theirs.keys())
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y.to(x.dtype), rtol=2e-5, atol=1e-6)


def test_get_logits_and_dist_loss_match_open_clip():
    """get_logits materialises the matrices, as open_clip's; dist_loss is open_clip's soft cross-entropy."""
    a, b, scale, bias = _inputs(n=10, seed=15)
    for ours, theirs in ((pcf.ClipLoss(), oc.ClipLoss()), (pcf.SigLipLoss(), oc.SigLipLoss())):
        for got, expected in zip(ours.get_logits(a, b, scale, bias), theirs.get_logits(a, b, scale, bias)):
            torch.testing.assert_close(got, expected)
    student, teacher = pcf.ClipLoss().get_logits(a, b, scale)[0], pcf.ClipLoss().get_logits(b, a, 3.0)[0]
    torch.testing.assert_close(pcf.DistillClipLoss().dist_loss(teacher, student),
                               oc.DistillClipLoss().dist_loss(teacher, student))


@pytest.mark.parametrize("kind", [np.float32, np.float64])
def test_numpy_scalars_as_scales(kind):
    a, b, _, _ = _inputs(n=16, seed=17)
    for module, args in ((pcf.ClipLoss(backend="torch"), (kind(14.0),)),
                         (pcf.SigLipLoss(backend="torch"), (kind(14.0), kind(-3.0)))):
        torch.testing.assert_close(module(a, b, *args), module(a, b, *map(float, args)), rtol=0, atol=0)
    distill = pcf.DistillClipLoss(backend="torch")
    torch.testing.assert_close(distill(a, b, kind(14.0), b, a, kind(9.0)), distill(a, b, 14.0, b, a, 9.0),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", DROP_INS)
def test_unknown_backend_or_group_rejected_at_construction(name):
    weights = dict(caption_loss_weight=1.0, clip_loss_weight=1.0) if name == "CoCaLoss" else {}
    with pytest.raises(ValueError, match="backend"):
        getattr(pcf, name)(backend="nonsense", **weights)
    with pytest.raises(TypeError, match="group"):
        getattr(pcf, name)(group="world", **weights)
