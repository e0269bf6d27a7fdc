"""Bad input to distill_loss, cosine_loss and recall_at_k: a ValueError/TypeError naming the argument."""
import pytest
import torch

import pyclipfast as pcf
from helpers import features

A, B = features(8, 4, device="cpu", seed=0), features(8, 4, device="cpu", seed=1)
TA, TB = features(8, 3, device="cpu", seed=2), features(8, 3, device="cpu", seed=3)
IDS = torch.arange(8)


def distill(a=A, b=B, ta=TA, tb=TB, s=10.0, t=10.0, **kw):
    return pcf.distill_loss(a, b, ta, tb, s, t, **kw)


DISTILL_BAD = [
    # id, call, exception, words the message must contain
    ("teacher-image-rows", lambda: distill(ta=TA[:7]), ValueError, "teacher_image_features has 7 rows"),
    ("teacher-text-rows", lambda: distill(tb=TB[:6]), ValueError, "teacher_text_features has 6 rows"),
    ("teacher-dims-differ", lambda: distill(tb=features(8, 5, device="cpu")), ValueError, "teacher_text_features"),
    ("teacher-not-tensor", lambda: distill(ta=TA.tolist()), TypeError, "teacher_image_features"),
    ("teacher-1d", lambda: distill(tb=TB[0]), ValueError, "teacher_text_features"),
    ("teacher-int", lambda: distill(ta=TA.long(), tb=TB.long()), TypeError, "teacher_image_features"),
    ("teacher-empty", lambda: distill(ta=TA[:, :0], tb=TB[:, :0]), ValueError, "teacher_image_features"),
    ("teacher-device", lambda: distill(ta=TA.to("meta"), tb=TB.to("meta")), ValueError, "teacher_image_features"),
    ("teacher-nan", lambda: distill(tb=TB.clone().fill_(float("nan"))), ValueError, "teacher_text_features"),
    ("teacher-scale-zero", lambda: distill(t=0.0), ValueError, "teacher_logit_scale"),
    ("teacher-scale-vector", lambda: distill(t=torch.ones(3)), ValueError, "teacher_logit_scale"),
    ("student-scale-negative", lambda: distill(s=-1.0), ValueError, "logit_scale"),
    ("student-rows-without-ids", lambda: distill(b=B[:5], tb=TB[:5]), ValueError, "image_ids"),
    ("student-dims", lambda: distill(b=features(8, 6, device="cpu")), ValueError, "text_features"),
    ("negative-margin", lambda: distill(margin=-0.1), ValueError, "margin"),
    ("margin-nan", lambda: distill(margin=float("nan")), ValueError, "margin"),
    ("margin-string", lambda: distill(margin="0.1"), TypeError, "margin"),
    ("margin-tensor", lambda: distill(margin=torch.tensor(0.1)), TypeError, "margin"),
    ("negative-kd-weight", lambda: distill(kd_weight=-1.0), ValueError, "kd_weight"),
    ("kd-weight-bool", lambda: distill(kd_weight=True), TypeError, "kd_weight"),
    ("unknown-kd", lambda: distill(kd="js"), ValueError, "kd"),
    ("threshold-nan", lambda: distill(false_negative_threshold=float("nan")), ValueError, "false_negative_threshold"),
    ("threshold-inf", lambda: distill(false_negative_threshold=float("inf")), ValueError, "false_negative_threshold"),
    ("threshold-string", lambda: distill(false_negative_threshold="0.5"), TypeError, "false_negative_threshold"),
    ("normalize-not-bool", lambda: distill(normalize=1), TypeError, "normalize"),
    ("ids-one-side", lambda: distill(image_ids=IDS), ValueError, "text_ids"),
    ("ids-wrong-length", lambda: distill(image_ids=IDS[:7], text_ids=IDS), ValueError, "image_ids"),
    ("ids-float", lambda: distill(image_ids=IDS, text_ids=IDS.float()), TypeError, "text_ids"),
    ("row-without-positive", lambda: distill(image_ids=torch.tensor([0, 1, 2, 99, 4, 5, 6, 7]), text_ids=IDS),
     ValueError, "image row 3 has no positive"),
    ("unknown-backend", lambda: distill(backend="fast"), ValueError, "backend"),
    ("float64-on-triton", lambda: distill(a=A.double(), b=B.double(), backend="triton"), TypeError, "float64"),
]

COSINE_BAD = [
    ("online-not-tensor", lambda: pcf.cosine_loss([[1.0]], A), TypeError, "online"),
    ("target-1d", lambda: pcf.cosine_loss(A, B[0]), ValueError, "target"),
    ("rows-differ", lambda: pcf.cosine_loss(A, B[:5]), ValueError, "target has 5 rows"),
    ("dims-differ", lambda: pcf.cosine_loss(A, features(8, 5, device="cpu")), ValueError, "feature dimension"),
    ("dtypes-differ", lambda: pcf.cosine_loss(A, B.double()), TypeError, "target"),
    ("empty", lambda: pcf.cosine_loss(A[:0], B[:0]), ValueError, "online"),
    ("nan", lambda: pcf.cosine_loss(A, B.clone().fill_(float("nan"))), ValueError, "target"),
    ("target-grad-not-bool", lambda: pcf.cosine_loss(A, B, target_grad="yes"), TypeError, "target_grad"),
    ("unknown-backend", lambda: pcf.cosine_loss(A, B, backend="cuda-fast"), ValueError, "backend"),
]

RECALL_BAD = [
    ("queries-not-tensor", lambda: pcf.recall_at_k(A.numpy(), B), TypeError, "queries"),
    ("gallery-dims", lambda: pcf.recall_at_k(A, features(8, 5, device="cpu")), ValueError, "feature dimension"),
    ("gallery-dtype", lambda: pcf.recall_at_k(A, B.half()), TypeError, "gallery"),
    ("sizes-without-ids", lambda: pcf.recall_at_k(A, B[:5]), ValueError, "query_ids"),
    ("ids-one-side", lambda: pcf.recall_at_k(A, B, gallery_ids=IDS), ValueError, "query_ids"),
    ("ids-wrong-length", lambda: pcf.recall_at_k(A, B, query_ids=IDS, gallery_ids=IDS[:3]), ValueError,
     "gallery_ids"),
    ("query-without-positive", lambda: pcf.recall_at_k(A, B[:5], query_ids=torch.tensor([0, 1, 2, 3, 4, 9, 9, 9]),
                                                        gallery_ids=torch.arange(5)), ValueError,
     "query 5 has no positive"),
    ("ks-empty", lambda: pcf.recall_at_k(A, B, ()), ValueError, "ks"),
    ("ks-zero", lambda: pcf.recall_at_k(A, B, (0, 1)), ValueError, "ks"),
    ("ks-float", lambda: pcf.recall_at_k(A, B, (1.5,)), TypeError, "ks"),
    ("ks-bool", lambda: pcf.recall_at_k(A, B, (True,)), TypeError, "ks"),
    ("ks-not-iterable", lambda: pcf.recall_at_k(A, B, 5), TypeError, "ks"),
    ("nan", lambda: pcf.recall_at_k(A.clone().fill_(float("inf")), B), ValueError, "queries"),
    ("unknown-backend", lambda: pcf.recall_at_k(A, B, backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("case", DISTILL_BAD + COSINE_BAD + RECALL_BAD,
                         ids=[f"{fn}-{c[0]}" for fn, cases in (("distill", DISTILL_BAD), ("cosine", COSINE_BAD),
                                                               ("recall", RECALL_BAD)) for c in cases])
def test_bad_input(case):
    _, call, exc, words = case
    with pytest.raises(exc, match=words):
        call()


def test_teacher_in_another_dtype_is_cast_not_rejected():
    out = distill(ta=TA.double(), tb=TB.double(), margin=0.1)
    ref = distill(margin=0.1)
    torch.testing.assert_close(out, ref)


def test_zero_vectors_are_not_an_error():
    """A zero vector has cos = 0 (F.cosine_similarity's eps clamp): the loss is 2 − 2·0."""
    assert float(pcf.cosine_loss(torch.zeros_like(A), B)) == 2.0
