"""Chunked PyTorch sigmoid (SigLIP) loss: loss and gradients in one sweep.

    S_ij = s·⟨A_i, B_j⟩ + b,  y_ij = +1 on positives, −1 elsewhere
    loss_sum = Σ_ij softplus(−y_ij S_ij)
    G_ij = ∂loss_sum/∂S_ij = −y_ij·σ(−y_ij S_ij)
    dA = s·G·B,  dB = s·Gᵀ·A,  dscale = Σ G_ij⟨A_i, B_j⟩,  dbias = Σ G_ij

No normalising statistic, so the gradients (for a unit upstream gradient of
loss_sum) come out of the same sweep as the loss; the caller scales them.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _tiles
from ._tiles import TileScores, nonfinite_poison, positive_tile, scratch_buffer, spans


def siglip_forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                   row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor], negative_only: bool,
                   grad_scale: float, need_a: bool, need_b: bool, need_scale: bool, need_bias: bool):
    """Returns (loss_sum, da, db, dscale, dbias), gradients of grad_scale·loss_sum (None when not needed)."""
    n, m = a.shape[0], b.shape[0]
    ts = TileScores(a, b, scale)
    opts = dict(dtype=ts.cd, device=a.device)
    bias_c = None if bias is None else bias.detach().to(ts.cd)
    # softplus(±∞) is ∞ or 0, never NaN: carry a non-finite input into the loss as NaN
    loss_sum = torch.zeros((), **opts).add_(nonfinite_poison(ts.cd, a, b, scale, *([] if bias is None else [bias])))
    dscale, dbias = torch.zeros((), **opts), torch.zeros((), **opts)
    da = torch.empty(a.shape, **opts) if need_a else None
    db = torch.zeros(b.shape, **opts) if need_b else None
    need_rows = need_a or need_scale
    any_grad = need_rows or need_b or need_bias
    # −y·S ≥ −(bound + |b|), for the exp floor (no host sync off the CPU)
    lowest = -ts.bound - (0.0 if bias_c is None else abs(float(bias_c))) if ts.floors else 0.0
    # One buffer each for the row block's scale·A_rows and its G·B, reused by every row block.
    rows = min(n, _tiles.TILE_ROWS)
    row_buffers = scratch_buffer("rows", (2 if need_rows else 1) * rows * a.shape[1], ts.cd, a.device).view(
        -1, rows, a.shape[1])
    for i0, i1 in spans(n, _tiles.TILE_ROWS):
        a_rows = ts.rows(i0, i1)
        a_scaled = torch.mul(a_rows, ts.scale, out=row_buffers[0, : i1 - i0])
        acc = row_buffers[1, : i1 - i0].zero_() if need_rows else None
        for j0, j1 in spans(m, _tiles.TILE_COLS):
            b_cols = ts.cols(j0, j1)
            z = ts.scores(a_scaled, b_cols)  # becomes −y·S in place
            if bias_c is not None:
                z.add_(bias_c)
            sign = _negate_positives(z, row_ids, col_ids, i0, i1, j0, j1, negative_only)
            _tiles.floor_(z, lowest)
            g = torch.sigmoid(z, out=ts.scratch(z)) if any_grad else None  # ∂/∂(−yS) softplus = σ(−yS)
            loss_sum += torch.ops.aten.softplus.out(z, 1, 20, out=z).sum()  # softplus(−yS), in place
            if not any_grad:
                continue
            sign(g)  # G = −y·σ(−yS)
            if need_bias:
                dbias += g.sum()
            if need_rows:
                acc.addmm_(g, b_cols)
            if need_b:
                db[j0:j1].addmm_(g.T, a_rows)
        if need_scale:
            dscale += torch.mul(acc, a_rows, out=a_scaled).sum()
        if need_a:
            da[i0:i1] = acc.mul_(ts.scale * grad_scale)
    if need_b:
        db.mul_(ts.scale * grad_scale)
    return (
        loss_sum,
        da.to(a.dtype) if need_a else None,
        db.to(b.dtype) if need_b else None,
        dscale * grad_scale if need_scale else None,
        dbias * grad_scale if need_bias else None,
    )


def _negate_positives(z, row_ids, col_ids, i0, i1, j0, j1, negative_only: bool):
    """Negate the positive entries of z in place; return a function doing the same to another tile."""
    if negative_only:
        return lambda t: t
    kind, pos = positive_tile(row_ids, col_ids, i0, i1, j0, j1)
    if kind == "diag":
        if pos is None:
            return lambda t: t
        k = pos[0]

        def flip_diagonal(t):
            t.diagonal(k).neg_()
        flip_diagonal(z)
        return flip_diagonal
    sign = 1 - 2 * pos.to(z.dtype)

    def flip_mask(t):
        t.mul_(sign)
    flip_mask(z)
    return flip_mask
