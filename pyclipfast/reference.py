"""Materialised PyTorch implementations: the ground truth every backend is held to.

These build the full N×M logit matrix and let autograd differentiate it, so they
are O(N·M) in memory: for tests and small batches only (``backend="reference"``).
They compute in float32, or float64 for float64 inputs, like the fast backends.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def positive_mask(n: int, m: int, row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor],
                  device) -> torch.Tensor:
    """pos[i, j] = (row_ids[i] == col_ids[j]), or the diagonal when ids are None."""
    if row_ids is None:
        return torch.eye(n, m, dtype=torch.bool, device=device)
    return row_ids[:, None] == col_ids[None, :]


def logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    cd = compute_dtype(a)
    s = scale.to(cd) * (a.to(cd) @ b.to(cd).T)
    return s if bias is None else s + bias.to(cd)


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, image_ids=None, text_ids=None,
              reduction: str = "mean", bidirectional: bool = True) -> torch.Tensor:
    """Bidirectional (or rows-only) InfoNCE with multi-positive ids."""
    logit = logits(image_features, text_features, logit_scale, logit_bias)
    pos = positive_mask(*logit.shape, image_ids, text_ids, logit.device).to(logit.dtype)
    rows = torch.logsumexp(logit, 1) - (logit * pos).sum(1) / pos.sum(1)
    if not bidirectional:
        return {"mean": rows.mean, "sum": rows.sum, "none": lambda: rows}[reduction]()
    cols = torch.logsumexp(logit, 0) - (logit * pos).sum(0) / pos.sum(0)
    if reduction == "mean":
        return 0.5 * (rows.mean() + cols.mean())
    if reduction == "sum":
        return 0.5 * (rows.sum() + cols.sum())
    return 0.5 * (rows + cols)


def clip_row_lse(rows, cols, scale, row_ids, col_ids, rule: str, penalty: float = 0.0) -> torch.Tensor:
    """r_i = logsumexp_j L_ij with a pair rule on the ids (pyclipfast/clip.py `clip_row_lse`).

    L_ij = s·⟨A_i, B_j⟩, −∞ on the excluded pairs ("exclude_equal"), + α·stop_grad(⟨A_i, B_j⟩) on
    the penalised ones ("penalise_unequal", "penalise_equal"). A row with every pair excluded
    gets r_i = −∞ and a zero gradient.
    """
    cd = compute_dtype(rows)
    dot = rows.to(cd) @ cols.to(cd).T
    logit = scale.to(cd) * dot
    same = row_ids[:, None] == col_ids[None, :]
    if rule == "exclude_equal":
        logit = logit.masked_fill(same, float("-inf"))
    else:
        selected = same if rule == "penalise_equal" else ~same
        logit = logit + penalty * dot.detach() * selected
    empty = torch.isneginf(logit).all(1, keepdim=True)
    lse = torch.logsumexp(logit.masked_fill(empty, 0.0), 1)
    return lse.masked_fill(empty[:, 0], float("-inf"))


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *, image_ids=None, text_ids=None,
                negative_only: bool = False) -> torch.Tensor:
    """L = -(1/N) Σ_ij log σ(y_ij S_ij), y = +1 on positives, -1 elsewhere."""
    logit = logits(image_features, text_features, logit_scale, logit_bias)
    pos = positive_mask(*logit.shape, image_ids, text_ids, logit.device)
    if negative_only:
        pos = torch.zeros_like(pos)
    y = pos.to(logit.dtype) * 2 - 1
    # + 0·ΣS: log σ(±∞) is 0 or −∞, never NaN; an infinite logit must give a NaN loss
    return (-F.logsigmoid(y * logit).sum() + 0 * logit.sum()) / image_features.shape[0]


# Clamp of c before arccos in the angular margin (math in pyclipfast/distill.py); every backend uses the same value.
ANGLE_EPS = 1e-6


def distill_loss(image_features, text_features, teacher_image_features, teacher_text_features, logit_scale,
                 teacher_logit_scale, *, margin: float = 0.0, kd_weight: float = 1.0, kd: str = "kl",
                 false_negative_threshold: Optional[float] = None, normalize: bool = True, image_ids=None,
                 text_ids=None):
    """(L_ce, λ·L_kd), InfoNCE of the margin-adjusted logits Z plus soft-label distillation.

    The teacher gets no gradient; the margin goes through arccos/cos literally (autograd
    differentiates it), the KD term through log-softmax and kl_div.
    """
    cd = compute_dtype(image_features)
    a, b = image_features.to(cd), text_features.to(cd)
    ta, tb = teacher_image_features.detach().to(cd), teacher_text_features.detach().to(cd)
    if normalize:
        a, b, ta, tb = (F.normalize(x, dim=-1) for x in (a, b, ta, tb))
    s, t = logit_scale.to(cd), teacher_logit_scale.detach().to(cd)
    cos, alpha = a @ b.T, ta @ tb.T
    pos = positive_mask(*cos.shape, image_ids, text_ids, cos.device)
    psi = cos
    if margin > 0:
        theta = torch.arccos(cos.clamp(-1 + ANGLE_EPS, 1 - ANGLE_EPS))
        psi = torch.where(pos, cos, torch.cos((theta - margin * (1 - alpha)).clamp_min(0)))
    z = s * psi
    if false_negative_threshold is not None:
        z = z.masked_fill(~pos & (alpha > false_negative_threshold), float("-inf"))
    z_pos, count = torch.where(pos, z, 0), pos.to(cd)
    rows = torch.logsumexp(z, 1) - z_pos.sum(1) / count.sum(1)
    cols = torch.logsumexp(z, 0) - z_pos.sum(0) / count.sum(0)
    u, v = s * cos, t * alpha
    # A non-finite score can leave no trace (clamped into ψ, filtered, a −∞ dropped by a
    # log-sum-exp): carry it into both losses as NaN
    poison = 0 * (u.detach().sum() + v.sum())
    contrastive = 0.5 * (rows.mean() + cols.mean()) + poison
    distill = 0.5 * (_soft_label_loss(v, u, 1, kd).mean() + _soft_label_loss(v, u, 0, kd).mean()) + poison
    return contrastive, kd_weight * distill


def _soft_label_loss(teacher_logits, student_logits, dim: int, kd: str) -> torch.Tensor:
    """Per row (dim=1) or column (dim=0): KL(p‖q) or the cross-entropy −Σ p log q, p/q the softmaxes."""
    log_q, log_p = student_logits.log_softmax(dim), teacher_logits.log_softmax(dim)
    if kd == "ce":
        return -(log_p.exp() * log_q).sum(dim)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim)


# F.cosine_similarity's default: each norm is clamped to at least this (zero vectors give cos = 0).
COSINE_EPS = 1e-8


def cosine_loss(online, target, *, target_grad: bool = False) -> torch.Tensor:
    """(1/N) Σ_i (2 − 2·cos(p_i, z_i)); z is a stop-gradient target unless target_grad."""
    cd = compute_dtype(online)
    z = target if target_grad else target.detach()
    return (2 - 2 * F.cosine_similarity(online.to(cd), z.to(cd), dim=-1, eps=COSINE_EPS)).mean()


def recall_at_k(queries, gallery, ks=(1, 5, 10), *, query_ids=None, gallery_ids=None) -> dict:
    """Recall@K: rank_i = #{j : S_ij > max_{positives} S_ij}; {"R@k": mean(rank_i < k)}."""
    cd = compute_dtype(queries)
    scores = queries.detach().to(cd) @ gallery.detach().to(cd).T
    pos = positive_mask(*scores.shape, query_ids, gallery_ids, scores.device)
    best = scores.masked_fill(~pos, float("-inf")).amax(1)
    rank = (scores > best[:, None]).sum(1)
    return {f"R@{k}": int((rank < k).sum()) / rank.shape[0] for k in ks}
