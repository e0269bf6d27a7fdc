"""Bad input raises a clear ValueError/TypeError naming the argument."""
import pytest
import torch
import torch.nn.functional as F

import pyclipfast as pcf
from helpers import features

A, B = features(8, 4, device="cpu", seed=0), features(8, 4, device="cpu", seed=1)
IDS = torch.arange(8)

LOSSES = {
    "clip": lambda a, b, s=10.0, **kw: pcf.clip_loss(a, b, s, **kw),
    "siglip": lambda a, b, s=10.0, **kw: pcf.siglip_loss(a, b, s, -10.0, **kw),
}

BAD = [
    # id, call(loss), exception, words the message must contain
    ("features-not-tensor", lambda f: f([[1.0]], B), TypeError, "image_features"),
    ("features-1d", lambda f: f(A[0], B), ValueError, "image_features"),
    ("features-3d", lambda f: f(A, B[None]), ValueError, "text_features"),
    ("features-int", lambda f: f(A, B.long()), TypeError, "text_features"),
    ("dtype-mismatch", lambda f: f(A, B.double()), TypeError, "text_features"),
    ("dim-mismatch", lambda f: f(A, features(8, 5, device="cpu")), ValueError, "feature dimension"),
    ("device-mismatch", lambda f: f(A, B.to("meta")), ValueError, "text_features"),
    ("empty-batch", lambda f: f(A[:0], B[:0]), ValueError, "empty"),
    ("N!=M-without-ids", lambda f: f(A, B[:5]), ValueError, "image_ids"),
    ("ids-one-side", lambda f: f(A, B, image_ids=IDS), ValueError, "text_ids"),
    ("ids-wrong-length", lambda f: f(A, B, image_ids=IDS[:7], text_ids=IDS), ValueError, "image_ids"),
    ("ids-float", lambda f: f(A, B, image_ids=IDS.float(), text_ids=IDS), TypeError, "image_ids"),
    ("ids-2d", lambda f: f(A, B, image_ids=IDS, text_ids=IDS[None]), ValueError, "text_ids"),
    ("unknown-backend", lambda f: f(A, B, backend="fast"), ValueError, "backend"),
    ("scale-zero", lambda f: f(A, B, 0.0), ValueError, "logit_scale"),
    ("scale-negative", lambda f: f(A, B, torch.tensor(-1.0)), ValueError, "logit_scale"),
    ("scale-nan", lambda f: f(A, B, float("nan")), ValueError, "logit_scale"),
    ("scale-inf", lambda f: f(A, B, torch.tensor(float("inf"))), ValueError, "logit_scale"),
    ("scale-vector", lambda f: f(A, B, torch.ones(2)), ValueError, "logit_scale"),
    ("scale-string", lambda f: f(A, B, "10"), TypeError, "logit_scale"),
    ("features-nan", lambda f: f(A.clone().fill_(float("nan")), B), ValueError, "image_features"),
    ("features-inf", lambda f: f(A, torch.where(B > 0, float("inf"), B)), ValueError, "text_features"),
]


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(loss, case):
    _, call, exc, words = case
    with pytest.raises(exc, match=words):
        call(LOSSES[loss])


def test_clip_row_without_positive_names_the_row():
    with pytest.raises(ValueError, match="image row 3 has no positive"):
        pcf.clip_loss(A, B, 10.0, image_ids=torch.tensor([0, 1, 2, 99, 4, 5, 6, 7]), text_ids=IDS)


B9, IDS9 = features(9, 4, device="cpu", seed=2), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 99])


def test_clip_column_without_positive_names_the_column():
    with pytest.raises(ValueError, match="text column 8 has no positive"):
        pcf.clip_loss(A, B9, 10.0, image_ids=IDS, text_ids=IDS9)


def test_clip_rows_only_ignores_columns_without_positive():
    """Rows only: text 8 (id 99) is every row's negative and needs no positive of its own."""
    loss = pcf.clip_loss(A, B9, 10.0, image_ids=IDS, text_ids=IDS9, bidirectional=False)
    expected = F.cross_entropy(10.0 * A.double() @ B9.double().T, torch.arange(8))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_clip_reduction_and_option_checks():
    with pytest.raises(ValueError, match="reduction"):
        pcf.clip_loss(A, B, 10.0, reduction="avg")
    with pytest.raises(ValueError, match="reduction='none'"):
        pcf.clip_loss(A, B[:5], 10.0, image_ids=IDS, text_ids=IDS[:5], reduction="none")
    with pytest.raises(TypeError, match="bidirectional"):
        pcf.clip_loss(A, B, 10.0, bidirectional="yes")


def test_siglip_negative_only_allows_rectangular_without_ids():
    """Every pair a negative: −(1/N) Σ log σ(−S_ij) = (1/N) Σ softplus(S_ij)."""
    loss = pcf.siglip_loss(A, B[:5], 10.0, -10.0, negative_only=True)
    expected = F.softplus(10.0 * A.double() @ B[:5].double().T - 10.0).sum() / 8
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_backend_float64_rejected_by_kernel_backends():
    with pytest.raises(TypeError, match="float64"):
        pcf.clip_loss(A.double(), B.double(), 10.0, backend="triton")


def test_cuda_backend_without_extension_or_gpu_says_how():
    with pytest.raises(ValueError, match="backend='cuda'"):
        pcf.clip_loss(A, B, 10.0, backend="cuda")


def test_validation_switch(monkeypatch):
    monkeypatch.setenv("PYCLIPFAST_VALIDATE", "1")
    assert pcf.validation_enabled()
    pcf.set_validation(False)
    try:
        assert not pcf.validation_enabled()
        # Off means off for CPU tensors too: a non-finite input gives NaN, not an error.
        assert torch.isnan(pcf.clip_loss(A.clone().fill_(float("nan")), B, 10.0))
    finally:
        pcf._validation._validation_on = None
    with pytest.raises(ValueError, match="image_features"):  # and the CPU default is back on
        pcf.clip_loss(A.clone().fill_(float("nan")), B, 10.0)
    with pytest.raises(TypeError, match="enabled"):
        pcf.set_validation(1)
