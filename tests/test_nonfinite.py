"""With the data checks off, a non-finite input gives a NaN loss or metric on every backend.

The inputs are built so the non-finite value can hide: every first feature is positive, and
the poisoned row is (v, 0, …, 0), so its scores are all +∞ or all −∞ — a −∞ score drops out
of a log-sum-exp and of Σ softplus, a clamp or a comparison turns NaN into a finite number.
"""
import math

import pytest
import torch

import pyclipfast as pcf
from helpers import DEVICE, HAS_CUDA, features
from pyclipfast import _validation
from pyclipfast._dispatch import cuda_extension_available, triton_available

BACKENDS = (["reference", "torch"] + (["triton"] if triton_available() else [])
            + (["cuda"] if HAS_CUDA and cuda_extension_available() else []))
VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
N, D = 12, 6
# (value, where): a scale of −∞ is the +∞ case with the features negated
CLIP_CASES = [(v, w) for v in VALUES for w in ("image", "text", "scale") if (v, w) != ("-inf", "scale")]

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def unvalidated(monkeypatch):
    """Data checks off, on CPU tensors too."""
    monkeypatch.setattr(_validation, "_validation_on", False, raising=False)
    monkeypatch.setattr(_validation, "data_checks_on", lambda t: False, raising=False)


def _features(n=N, d=D, seed=0):
    x = features(n, d, seed=seed, normalize=False).abs_()  # positive: one infinite feature gives one-signed scores
    return x


def _poisoned(x, value):
    x = x.clone()
    x[2] = 0.0
    x[2, 0] = value
    return x


def _scalar(v):
    return torch.tensor(v, device=DEVICE)


def _pick(backends, loss):
    """The cuda extension has no cosine or retrieval kernels."""
    return [b for b in backends if not (b == "cuda" and loss in ("cosine", "recall"))]


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidir", "rows"])
@pytest.mark.parametrize("value,where", CLIP_CASES, ids=[f"{v}-{w}" for v, w in CLIP_CASES])
@pytest.mark.parametrize("backend", _pick(BACKENDS, "clip"))
def test_clip(backend, value, where, bidirectional):
    a, b, s = _features(seed=1), _features(seed=2), _scalar(10.0)
    if where == "scale":
        s = _scalar(VALUES[value])
    else:
        a, b = (_poisoned(a, VALUES[value]), b) if where == "image" else (a, _poisoned(b, VALUES[value]))
    loss = pcf.clip_loss(a, b, s, bidirectional=bidirectional, backend=backend)
    assert torch.isnan(loss), f"{backend}: {value} in {where} gave {float(loss)}"


@pytest.mark.parametrize("where", ["image", "text", "scale", "bias"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("backend", _pick(BACKENDS, "siglip"))
def test_siglip(backend, value, where):
    a, b, s, bias = _features(seed=3), _features(seed=4), _scalar(10.0), _scalar(-10.0)
    if where == "scale":
        s = _scalar(VALUES[value])
    elif where == "bias":
        bias = _scalar(VALUES[value])
    elif where == "image":
        a = _poisoned(a, VALUES[value])
    else:
        b = _poisoned(b, VALUES[value])
    loss = pcf.siglip_loss(a, b, s, bias, backend=backend)
    assert torch.isnan(loss), f"{backend}: {value} in {where} gave {float(loss)}"


DISTILL_OPTIONS = {
    "margin": dict(margin=0.3, kd_weight=0.0),
    "filter": dict(false_negative_threshold=0.5, kd_weight=0.0),
    "kd": dict(kd_weight=1.0),
}


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("options", list(DISTILL_OPTIONS))
@pytest.mark.parametrize("where", ["image", "teacher_text"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("backend", _pick(BACKENDS, "distill"))
def test_distill(backend, value, where, options, normalize):
    a, b = (torch.nn.functional.normalize(_features(seed=k), dim=-1) for k in (5, 6))
    ta, tb = (torch.nn.functional.normalize(_features(d=4, seed=k), dim=-1) for k in (7, 8))
    if where == "image":
        a = _poisoned(a, VALUES[value])
    else:
        tb = _poisoned(tb, VALUES[value])
    opts = DISTILL_OPTIONS[options]
    contrastive, distill = pcf.distill_loss(a, b, ta, tb, 10.0, 10.0, normalize=normalize, backend=backend, **opts)
    if where == "image" or options != "kd":  # the contrastive loss depends on the teacher through margin/filter
        assert torch.isnan(contrastive), f"{backend}: {value} in {where} gave contrastive {float(contrastive)}"
    if options == "kd":
        assert torch.isnan(distill), f"{backend}: {value} in {where} gave distill {float(distill)}"


@pytest.mark.parametrize("where", ["online", "target"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("backend", _pick(BACKENDS, "cosine"))
def test_cosine(backend, value, where):
    p, z = _features(seed=9), _features(seed=10)
    p, z = (_poisoned(p, VALUES[value]), z) if where == "online" else (p, _poisoned(z, VALUES[value]))
    loss = pcf.cosine_loss(p, z, target_grad=True, backend=backend)
    assert torch.isnan(loss), f"{backend}: {value} in {where} gave {float(loss)}"


@pytest.mark.parametrize("where", ["queries", "gallery"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("backend", _pick(BACKENDS, "recall"))
def test_recall(backend, value, where):
    q, g = _features(seed=11), _features(seed=12)
    q, g = (_poisoned(q, VALUES[value]), g) if where == "queries" else (q, _poisoned(g, VALUES[value]))
    out = pcf.recall_at_k(q, g, (1, 5), backend=backend)
    assert all(math.isnan(v) for v in out.values()), f"{backend}: {value} in {where} gave {out}"
