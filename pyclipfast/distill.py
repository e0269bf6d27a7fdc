"""Soft-label distillation with adaptive angular margin (KDMCSE's AdapACSE).

Student features A (N×D), B (M×D); frozen teacher features Tᵃ (N×Dt), Tᵇ (M×Dt);
student scale s, teacher scale t, margin m ≥ 0, optional false-negative threshold φ:

    c_ij = ⟨Â_i, B̂_j⟩,   α_ij = ⟨T̂ᵃ_i, T̂ᵇ_j⟩,   θ_ij = arccos(clamp(c_ij, −1+ε, 1−ε)),   μ_ij = m·(1 − α_ij)
    ψ_ij = c_ij on positives,  cos(max(θ_ij − μ_ij, 0)) on negatives
    Z_ij = s·ψ_ij  (−∞ on negatives with α_ij > φ),   U_ij = s·c_ij,   V_ij = t·α_ij
    L_ce = bidirectional InfoNCE of Z (as in pyclipfast/clip.py, with ids)
    L_kd = ½ [mean_i KL(softmax_j V_i· ‖ softmax_j U_i·) + mean_j KL(softmax_i V_·j ‖ softmax_i U_·j)]
    returns (L_ce, λ·L_kd)

Derivation. Everything the loss needs is a handful of O(N + M) statistics of
the three N×M matrices, which `distill_stats` (the fused part, a torch.library
operator per backend) returns without storing any of them. Per row i, with p = softmax_j V_i· (teacher) and
q = softmax_j U_i· (student):

    row_lse_i         = logsumexp_j Z_ij            row_pos_i   = Σ_j pos_ij Z_ij
    student_row_lse_i = logsumexp_j U_ij            teacher_row_lse_i = logsumexp_j V_ij
    row_cross_i       = Σ_j p_ij (U_ij − V_ij)  (kd="kl"),   Σ_j p_ij U_ij  (kd="ce")

and the same down the columns. Since log q_ij = U_ij − student_row_lse_i and
log p_ij = V_ij − teacher_row_lse_i,

    KL_i = Σ_j p_ij (log p_ij − log q_ij) = student_row_lse_i − teacher_row_lse_i − row_cross_i
    CE_i = −Σ_j p_ij log q_ij             = student_row_lse_i − row_cross_i     (open_clip's DistillClipLoss)

(CE − KL is the teacher's entropy.) The teacher terms are constants, so
∂KL_i/∂U_ij = ∂CE_i/∂U_ij = q_ij − p_ij: the gradient of student_row_lse is q,
that of row_cross is p. The log-sum-exps come from online (max, Σ exp) merges,
row_cross from the teacher's exp-weighted sum, rescaled with the teacher's
running max (the flash-attention update).

The margin needs no arccos in a kernel (the chunked backend, which pays per
whole-tile op, takes arccos: fewer ops). With θ ∈ [0, π] and sin θ = √((1 − c)(1 + c)) ≥ 0:

    θ > μ  ⇔  μ < 0, or μ < π and c < cos μ
    ψ  = cos(θ − μ) = c·cos μ + sin θ·sin μ                 where θ > μ, else 1
    ψ' = dψ/dc = sin(θ − μ)/sin θ = cos μ − c·sin μ / sin θ   where θ > μ, else 0

with c clamped to [−1+ε, 1−ε] (ε = 1e-6, so sin θ ≥ 1.4e-3) and ψ' = 0 outside
that range, where the clamped ψ is constant: ψ' is the exact derivative of the
ψ computed, which gradcheck verifies. On positives ψ = c and ψ' = 1. For
upstream gradients g of the eight differentiable statistics (P the row/column
softmax of Z):

    ∂/∂Z_ij = g_row_lse_i·Pʳ_ij + g_col_lse_j·Pᶜ_ij + pos_ij·(g_row_pos_i + g_col_pos_j)
    ∂/∂U_ij = g_student_row_lse_i·qʳ_ij + g_student_col_lse_j·qᶜ_ij + g_row_cross_i·pʳ_ij + g_col_cross_j·pᶜ_ij
    H_ij    = ∂/∂Z_ij·ψ'_ij + ∂/∂U_ij
    dA = s·H·B,   dB = s·Hᵀ·A,   dscale = Σ_ij (∂/∂Z_ij·ψ_ij + ∂/∂U_ij·c_ij)

Filtered entries have Pʳ = Pᶜ = 0 and pos = 0, hence no gradient. The teacher
gets none at all. Work: forward 2·N·M·(D + Dt), backward 2·N·M·(D + Dt) to
recompute the tiles plus 4·N·M·D for dA and dB.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference
from ._dispatch import resolve
from ._ops import distinct, ops, run
from ._validation import (
    ScaleLike, as_scale, check_features, check_finite, check_has_positive, check_ids, check_option,
    positive_counts,
)

KD_KINDS = ("kl", "ce")
# The eight differentiable statistics, in the order distill_stats returns them, then the teacher's.
GRADIENT_STATS = ("row_lse", "col_lse", "row_pos", "col_pos",
                  "student_row_lse", "student_col_lse", "row_cross", "col_cross")
TEACHER_STATS = ("teacher_row_lse", "teacher_col_lse")
# The statistics only the KD term needs (not computed when λ = 0).
KD_STATS = frozenset(GRADIENT_STATS[4:] + TEACHER_STATS)
# The log-sum-exps the backward sweep needs to rebuild the softmaxes tile by tile.
LSE_STATS = ("row_lse", "col_lse", "student_row_lse", "student_col_lse", "teacher_row_lse", "teacher_col_lse")


class DistillOptions(NamedTuple):
    """What the kernels compute: the margin m (0: ψ = c), the threshold φ (None: no filter), and
    the KD statistics' kind ("kl", "ce"; None when λ = 0: no KD term)."""

    margin: float
    threshold: Optional[float]
    kd: Optional[str]

    @property
    def needs_teacher(self) -> bool:
        return self.margin > 0 or self.threshold is not None or self.kd is not None

    @property
    def z_is_u(self) -> bool:
        """Without margin and filter the InfoNCE logits Z are the student logits U."""
        return self.margin == 0 and self.threshold is None


def distill_stats(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts: DistillOptions, backend: str) -> tuple:
    """GRADIENT_STATS + TEACHER_STATS (the KD ones None without KD): the fused operator
    ``pyclipfast::distill_forward_<backend>`` (pyclipfast/_ops.py), whose backward recomputes the
    tiles. The teacher statistics get no gradient, nor do the teacher features."""
    stats = run(ops("distill", backend), a, b, scale, ta, tb, teacher_scale, row_ids, distinct(row_ids, col_ids),
                opts.margin, opts.threshold, opts.kd)
    if opts.kd is None:
        return tuple(None if k in KD_STATS else x for k, x in zip(GRADIENT_STATS + TEACHER_STATS, stats))
    return tuple(stats)


def distill_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    teacher_image_features: torch.Tensor,
    teacher_text_features: torch.Tensor,
    logit_scale: ScaleLike,
    teacher_logit_scale: ScaleLike,
    *,
    margin: float = 0.0,
    kd_weight: float = 1.0,
    kd: str = "kl",
    false_negative_threshold: Optional[float] = None,
    normalize: bool = True,
    image_ids: Optional[torch.Tensor] = None,
    text_ids: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student InfoNCE with a teacher-adaptive angular margin, plus soft-label distillation.

    Args:
        image_features, text_features: student features (N, D) and (M, D), same dtype and device.
        teacher_image_features, teacher_text_features: frozen teacher features (N, Dt) and (M, Dt)
            on the same device; cast to the student's dtype. They never receive a gradient.
        logit_scale: the student's already exponentiated scale s > 0 (a tensor receives a gradient).
        teacher_logit_scale: the teacher's scale t > 0 (no gradient).
        margin: m ≥ 0 in radians; negative (i, j) gets the margin μ = m·(1 − α_ij). 0 disables it.
        kd_weight: λ ≥ 0; 0 skips the KD term (the second output is then 0).
        kd: "kl" (KL(p_teacher ‖ q_student)) or "ce" (−Σ p log q, open_clip's DistillClipLoss).
        false_negative_threshold: φ; negatives the teacher scores α_ij > φ leave the InfoNCE
            denominators. None: no filtering.
        normalize: L2-normalise student and teacher features first (False: use them as given,
            as open_clip's DistillClipLoss does).
        image_ids, text_ids: optional integer ids (N,) and (M,); equal ids are positives (no margin,
            never filtered). Default: the diagonal (N == M).
        backend: "auto", "triton", "torch" (chunked) or "reference" (materialised).

    Returns:
        (contrastive_loss, distill_loss) = (L_ce, λ·L_kd), float32 (float64 for float64 features);
        their sum is the training objective.

    Data checks (non-finite student or teacher features or scales, scale <= 0, a row without a
    positive) run in eager mode on CPU tensors unless ``set_validation(False)``; inside a
    torch.compile'd graph they are skipped and a non-finite input gives a NaN loss. Works in
    ``torch.compile(fullgraph=True)``, torch.func and CUDA graphs; first-order gradients only.
    """
    check_features("image_features", image_features)
    check_features("text_features", text_features, like=image_features, like_name="image_features")
    _check_teacher(teacher_image_features, teacher_text_features, image_features, text_features)
    check_option("kd", kd, KD_KINDS)
    opts = DistillOptions(
        _nonnegative("margin", margin),
        _threshold(false_negative_threshold),
        kd if _nonnegative("kd_weight", kd_weight) > 0 else None,
    )
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    image_ids, text_ids = check_ids(image_ids, text_ids, image_features, text_features)
    name = resolve("distill", backend, image_features)
    scale = as_scale("logit_scale", logit_scale, image_features)
    teacher_scale = as_scale("teacher_logit_scale", teacher_logit_scale, image_features).detach()
    for arg, x in (("image_features", image_features), ("text_features", text_features),
                   ("teacher_image_features", teacher_image_features),
                   ("teacher_text_features", teacher_text_features)):
        check_finite(arg, x)
    row_count = col_count = None
    if image_ids is not None:
        row_count, col_count = positive_counts(image_ids, text_ids), positive_counts(text_ids, image_ids)
        check_has_positive(row_count, "image row")
        check_has_positive(col_count, "text column")

    if name == "reference":
        return reference.distill_loss(
            image_features, text_features, teacher_image_features, teacher_text_features, scale, teacher_scale,
            margin=opts.margin, kd_weight=kd_weight, kd=kd, false_negative_threshold=opts.threshold,
            normalize=normalize, image_ids=image_ids, text_ids=text_ids)

    a, b = image_features, text_features
    ta, tb = (x.detach().to(a.dtype) for x in (teacher_image_features, teacher_text_features))
    if normalize:
        a, b, ta, tb = (_unit(x) for x in (a, b, ta, tb))
    stats = dict(zip(GRADIENT_STATS + TEACHER_STATS,
                     distill_stats(a, b, scale, ta, tb, teacher_scale, image_ids, text_ids, opts, name)))
    contrastive = 0.5 * (_mean_ce(stats["row_lse"], stats["row_pos"], row_count)
                         + _mean_ce(stats["col_lse"], stats["col_pos"], col_count))
    if opts.kd is None:
        return contrastive, torch.zeros_like(contrastive)
    rows = stats["student_row_lse"] - stats["row_cross"]
    cols = stats["student_col_lse"] - stats["col_cross"]
    if kd == "kl":
        rows, cols = rows - stats["teacher_row_lse"], cols - stats["teacher_col_lse"]
    return contrastive, kd_weight * 0.5 * (rows.mean() + cols.mean())


def _mean_ce(lse: torch.Tensor, pos_sum: torch.Tensor, count: Optional[torch.Tensor]) -> torch.Tensor:
    """mean_i (lse_i − mean over i's positives of Z)."""
    return (lse - (pos_sum if count is None else pos_sum / count)).mean()


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows, computed in float32 (float64) and returned in x's dtype."""
    return F.normalize(x.to(reference.compute_dtype(x)), dim=-1).to(x.dtype)


def _check_teacher(ta, tb, a: torch.Tensor, b: torch.Tensor) -> None:
    check_features("teacher_image_features", ta)
    check_features("teacher_text_features", tb, like=ta, like_name="teacher_image_features")
    for name, t, student, student_name in (("teacher_image_features", ta, a, "image_features"),
                                           ("teacher_text_features", tb, b, "text_features")):
        if t.device != student.device:
            raise ValueError(f"{name} is on {t.device} but {student_name} is on {student.device}; they must match")
        if t.shape[0] != student.shape[0]:
            raise ValueError(f"{name} has {t.shape[0]} rows but {student_name} has {student.shape[0]}; "
                             "teacher and student must see the same batch")


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _nonnegative(name: str, value) -> float:
    value = _number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _threshold(value) -> Optional[float]:
    return None if value is None else _number("false_negative_threshold", value)
