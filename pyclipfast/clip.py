"""Bidirectional temperature-scaled InfoNCE (the CLIP loss).

    S_ij = s·⟨A_i, B_j⟩ + b
    r_i  = logsumexp_j S_ij,   c_j = logsumexp_i S_ij
    L    = 1/(2N) Σ_i (r_i − mean_{j∈P(i)} S_ij) + 1/(2M) Σ_j (c_j − mean_{i∈Q(j)} S_ij)

The fused part is `clip_stats`, a torch.library operator per backend
(pyclipfast/_ops.py) with registered autograd, that returns the four O(N+M) vectors (row/column log-sum-exp and row/column sums of positive logits)
without ever storing the N×M matrix (and, on request, the softmax-weighted mean logits of rows and
columns, for scale gradients formed outside it). Everything after it (positive counts,
reduction, one direction or two) is ordinary autograd on vectors. The bias b
cancels between the log-sum-exp and the positive term, so it never enters a
kernel and its gradient is exactly zero.

`clip_row_lse` runs the same kernels rows only with a pair rule on the ids (−∞ on excluded pairs,
or a stop-gradient penalty α·⟨A_i, B_j⟩ on selected ones) through its own operator
``pyclipfast::clip_pairs_forward_<backend>``: the building block of the sentence-transformers
drop-ins' same-type directions and hardness modes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference
from ._dispatch import resolve
from ._ops import distinct, ops, run
from ._validation import (
    ScaleLike, as_scale, check_features, check_finite, check_has_positive, check_ids, check_option,
    positive_counts,
)


def clip_stats(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, row_ids: Optional[torch.Tensor],
               col_ids: Optional[torch.Tensor], bidirectional: bool, backend: str, dots: bool = False) -> tuple:
    """(row_lse, col_lse, row_pos, col_pos), the columns None when one-directional: the fused
    operator ``pyclipfast::clip_forward_<backend>``, whose backward recomputes the tiles.

    dots: also (row_dot, col_dot), the softmax-weighted mean logits of the same sweep,

        row_dot_i = Σ_j softmax_j(S_i·)·S_ij = s·∂row_lse_i/∂s,   col_dot_j = Σ_i softmax_i(S_·j)·S_ij,

    for a scale gradient the caller forms itself; they carry no gradient.
    """
    row_lse, col_lse, row_pos, col_pos, row_dot, col_dot = run(
        ops("clip", backend), a, b, scale, row_ids, distinct(row_ids, col_ids), bidirectional, dots)
    stats = (row_lse, col_lse, row_pos, col_pos) if bidirectional else (row_lse, None, row_pos, None)
    if not dots:
        return stats
    return stats + (row_dot.detach(), col_dot.detach() if bidirectional else None)


# Pair rules of `clip_row_lse`, and their codes in the kernels (0: no rule, the plain InfoNCE).
PAIR_RULES = {"exclude_equal": 1, "penalise_unequal": 2, "penalise_equal": 3}


def clip_row_lse(rows: torch.Tensor, cols: torch.Tensor, scale: ScaleLike, row_ids: torch.Tensor,
                 col_ids: torch.Tensor, *, rule: str, penalty: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Per-row log-sum-exp of the scores under a pair rule on the ids, fused (no N×M matrix).

        L_ij = s·⟨A_i, B_j⟩                          by default
        L_ij = −∞                                     "exclude_equal" and row_ids_i == col_ids_j
        L_ij = s·⟨A_i, B_j⟩ + α·stop_grad(⟨A_i, B_j⟩)  "penalise_equal" (ids equal) or
                                                      "penalise_unequal" (ids differ)
        r_i  = logsumexp_j L_ij

    Gradient, for an upstream g on r, with G_ij = g_i·exp(L_ij − r_i) (0 on excluded pairs):
    dA = s·G·B, dB = s·Gᵀ·A, ds = Σ_ij G_ij⟨A_i, B_j⟩ (α is a constant: no gradient through the
    penalty). A row whose every pair is excluded has r_i = −∞ and a zero gradient.

    Args:
        rows, cols: (N, D) and (M, D) features, same dtype and device.
        scale: s > 0; a tensor receives a gradient.
        row_ids, col_ids: integer ids (N,) and (M,); here they only select pairs (no positives).
        rule: "exclude_equal", "penalise_unequal" or "penalise_equal".
        penalty: α, a finite number (ignored by "exclude_equal").
        backend: as for `clip_loss`.

    Returns:
        r, (N,), float32 (float64 for float64 features).
    """
    check_features("rows", rows)
    check_features("cols", cols, like=rows, like_name="rows")
    check_option("rule", rule, tuple(PAIR_RULES))
    if row_ids is None or col_ids is None:
        raise ValueError("clip_row_lse needs both row_ids and col_ids: the pair rule compares them")
    row_ids, col_ids = check_ids(row_ids, col_ids, rows, cols, names=("row_ids", "col_ids"), require_square=False)
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty):
        raise ValueError(f"penalty must be a finite number, got {penalty!r}")
    name = resolve("clip", backend, rows)
    scale = as_scale("scale", scale, rows)
    check_finite("rows", rows)
    check_finite("cols", cols)
    if name == "reference":
        return reference.clip_row_lse(rows, cols, scale, row_ids, col_ids, rule, float(penalty))
    fused = ops("clip_pairs", name)
    args = (rows, cols, scale, row_ids, distinct(row_ids, col_ids), PAIR_RULES[rule], float(penalty))
    if torch.is_grad_enabled() and any(x.requires_grad for x in (rows, cols, scale)):
        return fused["function"].apply(*args)
    return fused["forward"](*args)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: ScaleLike,
    logit_bias: Optional[ScaleLike] = None,
    *,
    image_ids: Optional[torch.Tensor] = None,
    text_ids: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    bidirectional: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Temperature-scaled InfoNCE between image (N×D) and text (M×D) features.

    Args:
        image_features, text_features: (N, D) and (M, D), same dtype and device. Not normalised
            here (open_clip normalises in the model).
        logit_scale: the *already exponentiated* scale s > 0 (open_clip passes ``logit_scale.exp()``);
            a tensor receives a gradient.
        logit_bias: optional scalar bias; it cancels in the softmax, so its gradient is zero.
        image_ids, text_ids: optional integer ids (N,) and (M,); (i, j) is a positive pair iff the
            ids are equal (several captions per image, duplicates). Default: the diagonal (N == M).
        reduction: "mean" (the formula above), "sum" (½ Σ rows + ½ Σ columns), or "none" (per index
            ½(row_i + col_i), needs N == M; rows only when one-directional).
        bidirectional: False gives the rows-only (image→text) loss mean_i (r_i − mean_{P(i)} S_ij),
            the form open_clip's ``local_loss`` uses per direction.
        backend: "auto", "triton", "cuda", "torch" (chunked) or "reference" (materialised).

    Returns:
        The loss, float32 (float64 for float64 features).

    Data checks (non-finite features or scale, scale <= 0, a row without a positive) run in
    eager mode on CPU tensors unless ``set_validation(False)``; inside a torch.compile'd graph
    they are skipped and a non-finite input gives a NaN loss. Works in
    ``torch.compile(fullgraph=True)``, torch.func (grad, vjp) and CUDA graphs; first-order
    gradients only.
    """
    check_features("image_features", image_features)
    check_features("text_features", text_features, like=image_features, like_name="image_features")
    check_option("reduction", reduction, ("mean", "sum", "none"))
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
    image_ids, text_ids = check_ids(image_ids, text_ids, image_features, text_features)
    n, m = image_features.shape[0], text_features.shape[0]
    if reduction == "none" and bidirectional and n != m:
        raise ValueError(f"reduction='none' pairs row i with column i and needs N == M; got N={n}, M={m}")
    name = resolve("clip", backend, image_features)
    scale = as_scale("logit_scale", logit_scale, image_features)
    bias = None if logit_bias is None else as_scale("logit_bias", logit_bias, image_features, positive=False)
    check_finite("image_features", image_features)
    check_finite("text_features", text_features)
    row_count = col_count = None
    if image_ids is not None:
        row_count = positive_counts(image_ids, text_ids)
        check_has_positive(row_count, "image row")
        if bidirectional:
            col_count = positive_counts(text_ids, image_ids)
            check_has_positive(col_count, "text column")

    if name == "reference":
        return reference.clip_loss(image_features, text_features, scale, bias, image_ids=image_ids,
                                   text_ids=text_ids, reduction=reduction, bidirectional=bidirectional)

    row_lse, col_lse, row_pos, col_pos = clip_stats(
        image_features, text_features, scale, image_ids, text_ids, bidirectional, name)
    rows = row_lse - (row_pos if row_count is None else row_pos / row_count)
    if bidirectional:
        cols = col_lse - (col_pos if col_count is None else col_pos / col_count)
        loss = {
            "mean": lambda: 0.5 * (rows.mean() + cols.mean()),
            "sum": lambda: 0.5 * (rows.sum() + cols.sum()),
            "none": lambda: 0.5 * (rows + cols),
        }[reduction]()
    else:
        loss = {"mean": rows.mean, "sum": rows.sum, "none": lambda: rows}[reduction]()
    if bias is not None and bias.requires_grad:
        loss = loss + 0 * bias.to(loss.dtype)  # db = 0 exactly; a non-finite bias still gives NaN
    return loss
