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
    """SPEC §1: bidirectional (or rows-only) InfoNCE with multi-positive ids."""
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


def siglip_loss(image_features, text_features, logit_scale, logit_bias=None, *, image_ids=None, text_ids=None,
                negative_only: bool = False) -> torch.Tensor:
    """SPEC §2: L = -(1/N) Σ_ij log σ(y_ij S_ij), y = +1 on positives, -1 elsewhere."""
    logit = logits(image_features, text_features, logit_scale, logit_bias)
    pos = positive_mask(*logit.shape, image_ids, text_ids, logit.device)
    if negative_only:
        pos = torch.zeros_like(pos)
    y = pos.to(logit.dtype) * 2 - 1
    return -F.logsigmoid(y * logit).sum() / image_features.shape[0]
