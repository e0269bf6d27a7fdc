"""Chunked PyTorch distillation statistics with adaptive angular margin (SPEC §3).

One tile (rows i0:i1 × columns j0:j1) of each N×M matrix exists at a time:

    c = A·Bᵀ,  α = Tᵃ·Tᵇᵀ,  μ = m·(1 − α)
    ψ = c on positives, cos(max(θ − μ, 0)) = c·cos μ + sin θ·sin μ (θ > μ) or 1 on negatives
    Z = s·ψ (−∞ on negatives with α > φ),  U = s·c,  V = t·α

Forward, one sweep: the row statistics are exact after a row chunk has seen all
its column tiles; the column statistics are merged across row chunks with the
online (max, Σ exp) rule, the teacher's exp-weighted sums of U and V rescaled
with it (row_cross = Σ p·U, row_entropy = lse(V) − Σ p·V).

Backward, second sweep, recomputing each tile (derivation in pyclipfast/distill.py):

    ∂/∂Z = g_row_lse·Pʳ + g_col_lse·Pᶜ + pos·(g_row_pos + g_col_pos)
    ∂/∂U = g_student_row_lse·qʳ + g_student_col_lse·qᶜ + g_row_cross·pʳ + g_col_cross·pᶜ
    H = ∂/∂Z·ψ' + ∂/∂U,  dA = s·H·B,  dB = s·Hᵀ·A,  dscale = Σ H·c + Σ ∂/∂Z·(ψ − ψ'·c)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, NamedTuple, Optional, Sequence

import torch

from . import _tiles
from ..reference import ANGLE_EPS
from ._tiles import add_positive_grad, compute_dtype, positive_tile, spans

if TYPE_CHECKING:
    from ..distill import DistillOptions


class Tile(NamedTuple):
    c: torch.Tensor                   # ⟨A_i, B_j⟩
    alpha: Optional[torch.Tensor]     # ⟨Tᵃ_i, Tᵇ_j⟩, None when the teacher is not needed
    psi: torch.Tensor                 # ψ (c itself without a margin)
    slope: Optional[torch.Tensor]     # ψ' = dψ/dc, None without a margin or when not asked for
    z: torch.Tensor                   # s·ψ, −∞ where filtered


class _Tiles:
    """Recomputes the tiles of one block of rows × columns (compute dtype: float32 or float64)."""

    def __init__(self, a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts: "DistillOptions"):
        self.cd = compute_dtype(a)
        self.a, self.b, self.ta, self.tb = a, b, ta, tb
        self.scale = scale.detach().to(self.cd)
        self.teacher_scale = teacher_scale.detach().to(self.cd)
        self.row_ids, self.col_ids, self.opts = row_ids, col_ids, opts

    def rows(self, i0: int, i1: int):
        teacher = self.ta[i0:i1].to(self.cd) if self.opts.needs_teacher else None
        return self.a[i0:i1].to(self.cd), teacher

    def cols(self, j0: int, j1: int):
        teacher = self.tb[j0:j1].to(self.cd) if self.opts.needs_teacher else None
        return self.b[j0:j1].to(self.cd), teacher

    def tile(self, rows, cols, i0: int, i1: int, j0: int, j1: int, slope: bool = False) -> Tile:
        (a_rows, ta_rows), (b_cols, tb_cols) = rows, cols
        c = a_rows @ b_cols.T
        alpha = ta_rows @ tb_cols.T if ta_rows is not None else None
        positives = positive_tile(self.row_ids, self.col_ids, i0, i1, j0, j1)
        psi, dpsi = c, None
        if self.opts.margin > 0:
            psi, dpsi = angular_margin(c, alpha, self.opts.margin, slope)
            _on_positives(psi, c, positives)
            if dpsi is not None:
                _on_positives(dpsi, 1.0, positives)
        z = psi * self.scale
        if self.opts.threshold is not None:
            filtered = alpha > self.opts.threshold
            _on_positives(filtered, False, positives)
            z.masked_fill_(filtered, float("-inf"))
        return Tile(c, alpha, psi, dpsi, z)


def angular_margin(c: torch.Tensor, alpha: torch.Tensor, margin: float, slope: bool):
    """ψ = cos(max(θ − μ, 0)) and (if slope) ψ' = dψ/dc for every entry, θ = arccos(clamp(c)), μ = m·(1 − α).

    Without arccos: sin θ = √((1 − c)(1 + c)), θ > μ ⇔ μ < 0 or (μ < π and c < cos μ),
    ψ = c·cos μ + sin θ·sin μ and ψ' = cos μ − c·sin μ / sin θ there; ψ = 1, ψ' = 0 elsewhere,
    and ψ' = 0 where the clamp is active (ψ is constant in c there).
    """
    cc = c.clamp(-1 + ANGLE_EPS, 1 - ANGLE_EPS)
    sin_theta = (1 - cc).mul_(1 + cc).sqrt_()
    mu = alpha.mul(-margin).add_(margin)
    cos_mu, sin_mu = mu.cos(), mu.sin()
    active = (cc < cos_mu).logical_and_(mu < math.pi).logical_or_(mu < 0)
    psi = torch.where(active, cc * cos_mu + sin_theta * sin_mu, 1.0)
    if not slope:
        return psi, None
    dpsi = torch.where(active.logical_and_(c == cc), cos_mu - cc * sin_mu / sin_theta, 0.0)
    return psi, dpsi


def _on_positives(x: torch.Tensor, value, positives) -> None:
    """x[pos] = value[pos] (value: a tile or a scalar), in place."""
    kind, pos = positives
    if kind == "diag":
        if pos is not None:
            k = pos[0]
            if torch.is_tensor(value):
                x.diagonal(k).copy_(value.diagonal(k))
            else:
                x.diagonal(k).fill_(value)
        return
    if torch.is_tensor(value):
        torch.where(pos, value, x, out=x)
    else:
        x.masked_fill_(pos, value)


class _RunningLse:
    """Running max and Σ exp(x − max) over tiles along one axis, plus exp-weighted sums Σ exp(x − max)·y."""

    def __init__(self, size: int, like: torch.Tensor, weighted: int = 0):
        opts = dict(dtype=like.dtype, device=like.device)
        self.max = torch.full((size,), float("-inf"), **opts)
        self.sum = torch.zeros(size, **opts)
        self.weighted = [torch.zeros(size, **opts) for _ in range(weighted)]

    def add(self, x: torch.Tensor, dim: int, at: slice = slice(None), weights: Sequence[torch.Tensor] = ()):
        """Merge tile x, reduced along dim, into the entries `at`; weights are tiles y like x."""
        old = self.max[at]
        new = torch.maximum(old, x.amax(dim))
        shift = new.masked_fill(new == float("-inf"), 0.0)  # an all −∞ (filtered) line stays NaN-free
        rescale = (old - shift).exp_()
        e = (x - shift.unsqueeze(dim)).exp_()
        self.sum[at] = self.sum[at] * rescale + e.sum(dim)
        for acc, y in zip(self.weighted, weights):
            acc[at] = acc[at] * rescale + (e * y).sum(dim)
        self.max[at] = new

    def lse(self) -> torch.Tensor:
        return self.sum.log() + self.max

    def mean(self, k: int) -> torch.Tensor:
        """Σ softmax(x)·y for the k-th weighted sum."""
        return self.weighted[k] / self.sum


def distill_forward(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts: "DistillOptions") -> Dict:
    n, m = a.shape[0], b.shape[0]
    tiles = _Tiles(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts)
    like = torch.empty(0, dtype=tiles.cd, device=a.device)
    out = {k: torch.empty(n, dtype=tiles.cd, device=a.device) for k in ("row_lse", "row_pos")}
    col_pos = torch.zeros(m, dtype=tiles.cd, device=a.device)
    z_cols = _RunningLse(m, like)
    if opts.kd_term:
        out.update({k: torch.empty(n, dtype=tiles.cd, device=a.device)
                    for k in ("student_row_lse", "teacher_row_lse", "row_cross", "row_entropy")})
        u_cols, v_cols = _RunningLse(m, like), _RunningLse(m, like, weighted=2)
    for i0, i1 in spans(n, _tiles.TILE_ROWS):
        rows = tiles.rows(i0, i1)
        z_rows = _RunningLse(i1 - i0, like)
        if opts.kd_term:
            u_rows, v_rows = _RunningLse(i1 - i0, like), _RunningLse(i1 - i0, like, weighted=2)
        row_pos = torch.zeros(i1 - i0, dtype=tiles.cd, device=a.device)
        for j0, j1 in spans(m, _tiles.TILE_COLS):
            t = tiles.tile(rows, tiles.cols(j0, j1), i0, i1, j0, j1)
            _add_positive_sums(t.z, row_ids, col_ids, i0, i1, j0, j1, row_pos, col_pos)
            z_rows.add(t.z, 1)
            z_cols.add(t.z, 0, slice(j0, j1))
            if opts.kd_term:
                u, v = t.c * tiles.scale, t.alpha * tiles.teacher_scale
                u_rows.add(u, 1)
                u_cols.add(u, 0, slice(j0, j1))
                v_rows.add(v, 1, weights=(u, v))
                v_cols.add(v, 0, slice(j0, j1), weights=(u, v))
        out["row_lse"][i0:i1], out["row_pos"][i0:i1] = z_rows.lse(), row_pos
        if opts.kd_term:
            out["student_row_lse"][i0:i1] = u_rows.lse()
            out["teacher_row_lse"][i0:i1] = teacher_lse = v_rows.lse()
            out["row_cross"][i0:i1] = v_rows.mean(0)
            out["row_entropy"][i0:i1] = teacher_lse - v_rows.mean(1)
    out.update(col_lse=z_cols.lse(), col_pos=col_pos)
    if opts.kd_term:
        teacher_lse = v_cols.lse()
        out.update(student_col_lse=u_cols.lse(), teacher_col_lse=teacher_lse,
                   col_cross=v_cols.mean(0), col_entropy=teacher_lse - v_cols.mean(1))
    return out


def _add_positive_sums(z, row_ids, col_ids, i0, i1, j0, j1, row_pos, col_pos) -> None:
    """row_pos_i += Σ_j pos_ij Z_ij, col_pos_j += Σ_i pos_ij Z_ij over one tile (positives are finite)."""
    kind, pos = positive_tile(row_ids, col_ids, i0, i1, j0, j1)
    if kind == "diag":
        if pos is not None:
            k, g0, g1 = pos
            d = z.diagonal(k)
            row_pos[g0 - i0:g1 - i0] += d
            col_pos[g0:g1] += d
        return
    masked = torch.where(pos, z, 0.0)
    row_pos += masked.sum(1)
    col_pos[j0:j1] += masked.sum(0)


def distill_backward(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts: "DistillOptions",
                     lse: Dict, grads: Dict, need_a: bool = True, need_b: bool = True, need_scale: bool = True):
    n, m = a.shape[0], b.shape[0]
    tiles = _Tiles(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts)
    opts_f = dict(dtype=tiles.cd, device=a.device)
    da = torch.empty(a.shape, **opts_f) if need_a else None
    db = torch.zeros(b.shape, **opts_f) if need_b else None
    dscale = torch.zeros((), **opts_f)
    need_rows = need_a or need_scale
    margin_scale = need_scale and opts.margin > 0
    for i0, i1 in spans(n, _tiles.TILE_ROWS):
        rows = tiles.rows(i0, i1)
        a_rows = rows[0]
        acc = torch.zeros(i1 - i0, a.shape[1], **opts_f) if need_rows else None
        for j0, j1 in spans(m, _tiles.TILE_COLS):
            cols = tiles.cols(j0, j1)
            t = tiles.tile(rows, cols, i0, i1, j0, j1, slope=True)
            gz = torch.zeros_like(t.z)
            _add_softmax_grad(gz, t.z, lse["row_lse"], lse["col_lse"], grads["row_lse"], grads["col_lse"],
                              i0, i1, j0, j1)
            add_positive_grad(gz, row_ids, col_ids, i0, i1, j0, j1, grads["row_pos"], grads["col_pos"])
            h = gz if t.slope is None else gz * t.slope
            if margin_scale:
                dscale += (gz * (t.psi - t.slope * t.c)).sum()
            if opts.kd_term:
                u, v = t.c * tiles.scale, t.alpha * tiles.teacher_scale
                _add_softmax_grad(h, u, lse["student_row_lse"], lse["student_col_lse"],
                                  grads["student_row_lse"], grads["student_col_lse"], i0, i1, j0, j1)
                _add_softmax_grad(h, v, lse["teacher_row_lse"], lse["teacher_col_lse"],
                                  grads["row_cross"], grads["col_cross"], i0, i1, j0, j1)
            if need_rows:
                acc.addmm_(h, cols[0])
            if need_b:
                db[j0:j1].addmm_(h.T, a_rows)
        if need_scale:
            dscale += (acc * a_rows).sum()
        if need_a:
            da[i0:i1] = acc.mul_(tiles.scale)
    if need_b:
        db.mul_(tiles.scale)
    return (
        da.to(a.dtype) if need_a else None,
        db.to(b.dtype) if need_b else None,
        dscale if need_scale else None,
    )


def _add_softmax_grad(h, x, row_lse, col_lse, g_row, g_col, i0, i1, j0, j1) -> None:
    """h += g_row_i·exp(x_ij − row_lse_i) + g_col_j·exp(x_ij − col_lse_j): the gradient of the two lse."""
    if g_row is not None:
        h.addcmul_((x - row_lse[i0:i1, None]).exp_(), g_row[i0:i1, None])
    if g_col is not None:
        h.addcmul_((x - col_lse[None, j0:j1]).exp_(), g_col[None, j0:j1])
