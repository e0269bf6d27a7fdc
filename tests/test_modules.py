"""open_clip drop-ins: same constructor, forward signature, outputs, numbers and gradients."""
import inspect

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


@pytest.mark.parametrize("ours,theirs", [(pcf.ClipLoss, oc.ClipLoss), (pcf.SigLipLoss, oc.SigLipLoss)])
def test_same_constructor_and_forward_signature(ours, theirs):
    def params(f, drop=()):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()
                if p.name not in drop and p.kind != p.KEYWORD_ONLY]
    assert params(ours.__init__) == params(theirs.__init__)
    assert params(ours.forward) == params(theirs.forward)


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
