"""Chunked PyTorch distillation statistics with adaptive angular margin (math in pyclipfast/distill.py).

One tile (rows i0:i1 × columns j0:j1) of each N×M matrix exists at a time:

    c = A·Bᵀ,  α = Tᵃ·Tᵇᵀ,  θ = arccos(clamp(c)),  μ = m·(1 − α)
    ψ = c on positives, cos(max(θ − μ, 0)) on negatives,  ψ' = sin(max(θ − μ, 0)) / sin θ
    Z = s·ψ (−∞ on negatives with α > φ),  U = s·c,  V = t·α

Forward, one sweep: the row statistics are exact once a row chunk has seen all
its column tiles; the column statistics are merged across row chunks with the
online (max, Σ exp) rule, the teacher's exp-weighted sum (row_cross) rescaled
with it. Backward, second sweep, recomputing each tile (derivation in
pyclipfast/distill.py):

    ∂/∂Z = g_row_lse·Pʳ + g_col_lse·Pᶜ + pos·(g_row_pos + g_col_pos)
    ∂/∂U = g_student_row_lse·qʳ + g_student_col_lse·qᶜ + g_row_cross·pʳ + g_col_cross·pᶜ
    H = ∂/∂Z·ψ' + ∂/∂U,  dA = s·H·B,  dB = s·Hᵀ·A,  dscale = Σ H·c + Σ ∂/∂Z·(ψ − ψ'·c)

The tile work is a chain of whole-tile PyTorch ops, so the op count is the
cost: arccos takes fewer passes than the kernels' sin/cos identity, and
without margin and filter Z = U shares its exponentials (open_clip's
DistillClipLoss).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, NamedTuple, Optional

import torch

from . import _tiles
from ..reference import ANGLE_EPS
from ._tiles import add_positive_grad, compute_dtype, nonfinite_poison, positive_tile, spans

if TYPE_CHECKING:
    from ..distill import DistillOptions


class Tile(NamedTuple):
    u: torch.Tensor                   # U = s·c, straight from the GEMM with s·A
    v: Optional[torch.Tensor]         # V = t·α, straight from the GEMM with t·Tᵃ; None without a teacher
    c: Optional[torch.Tensor]         # c = U / s, with a margin only
    psi: Optional[torch.Tensor]       # ψ, with a margin only (ψ = c without)
    slope: Optional[torch.Tensor]     # ψ' = dψ/dc, with a margin and when asked for
    z: torch.Tensor                   # Z = s·ψ, −∞ where filtered (U itself without margin and filter)


class _Tiles:
    """Recomputes the tiles of one block of rows × columns (compute dtype: float32 or float64)."""

    def __init__(self, a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts: "DistillOptions"):
        self.cd = compute_dtype(a)
        self.a, self.b, self.ta, self.tb = a, b, ta, tb
        self.scale = scale.detach().to(self.cd)
        self.teacher_scale = teacher_scale.detach().to(self.cd)
        self.margin_per_v = opts.margin / float(self.teacher_scale)  # μ = m − (m/t)·V
        self.row_ids, self.col_ids, self.opts = row_ids, col_ids, opts
        self.floors = _tiles.floors(a, self.cd)
        self._bounds: Dict[str, float] = {}

    def bound(self, name: str) -> float:
        """An upper bound of |x| for the tile matrix `name` (z, u or v; −∞ entries aside), for the exp
        floor (inf where it does not apply): |U| ≤ s·max‖A‖·max‖B‖, |Z| ≤ max(that, s) (ψ is a cosine
        on the negatives), |V| ≤ t·max‖Tᵃ‖·max‖Tᵇ‖."""
        if not self.floors:
            return float("inf")
        if name not in self._bounds:
            if name == "v":
                self._bounds[name] = _tiles.score_bound(self.teacher_scale, self.ta, self.tb)
            else:
                u = self._bounds["u"] = _tiles.score_bound(self.scale, self.a, self.b)
                self._bounds["z"] = u if self.opts.margin == 0 else max(u, abs(float(self.scale)))
        return self._bounds[name]

    def lowest(self, name: str, lse: Optional[torch.Tensor] = None) -> float:
        """A lower bound of x − (its line's max) (lse None), or of x − lse: for the exp floor."""
        if not self.floors:
            return 0.0
        bound = self.bound(name)
        if lse is None:
            return -2 * bound
        return _tiles.lowest_below(bound, lse[torch.isfinite(lse)])

    def rows(self, i0: int, i1: int):
        """(A rows, s·A rows, t·Tᵃ rows or None)."""
        a_rows = self.a[i0:i1].to(self.cd)
        teacher = self.ta[i0:i1].to(self.cd) * self.teacher_scale if self.opts.needs_teacher else None
        return a_rows, a_rows * self.scale, teacher

    def cols(self, j0: int, j1: int):
        teacher = self.tb[j0:j1].to(self.cd) if self.opts.needs_teacher else None
        return self.b[j0:j1].to(self.cd), teacher

    def tile(self, rows, cols, i0: int, i1: int, j0: int, j1: int, slope: bool = False) -> Tile:
        (_, a_scaled, ta_scaled), (b_cols, tb_cols) = rows, cols
        opts = self.opts
        u = a_scaled @ b_cols.T
        v = ta_scaled @ tb_cols.T if ta_scaled is not None else None
        if opts.z_is_u:
            return Tile(u, v, None, None, None, u)
        positives = positive_tile(self.row_ids, self.col_ids, i0, i1, j0, j1)
        c = psi = dpsi = None
        z = u
        if opts.margin > 0:
            c = u / self.scale
            psi, dpsi = angular_margin(c, v, self.margin_per_v, opts.margin, slope)
            _on_positives(psi, c, positives)
            if dpsi is not None:
                _on_positives(dpsi, 1.0, positives)
            z = psi * self.scale
        if opts.threshold is not None:
            filtered = v > opts.threshold * self.teacher_scale  # α > φ
            _on_positives(filtered, False, positives)
            z = z.masked_fill(filtered, float("-inf"))
        return Tile(u, v, c, psi, dpsi, z)


def angular_margin(c: torch.Tensor, v: torch.Tensor, margin_per_v: float, margin: float, slope: bool):
    """ψ = cos(max(θ − μ, 0)) and (if slope) ψ' = dψ/dc for every entry, θ = arccos(clamp(c)),
    μ = m·(1 − α) = m − (m/t)·V.

    ψ' = sin(max(θ − μ, 0)) / sin θ is 0 where θ ≤ μ, and is set to 0 where the clamp is
    active (ψ is constant in c there); the clamp keeps sin θ ≥ 1.4e-3.
    """
    theta = c.clamp(-1 + ANGLE_EPS, 1 - ANGLE_EPS)
    clamped = (theta != c) if slope else None
    theta.acos_()
    gap = torch.add(theta, v, alpha=margin_per_v).sub_(margin).clamp_min_(0)  # max(θ − μ, 0)
    psi = gap.cos()
    if not slope:
        return psi, None
    dpsi = gap.sin_().div_(theta.sin_())
    return psi, dpsi.masked_fill_(clamped, 0.0)


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
    """Running max and Σ exp(x − max) over tiles along one axis, plus an exp-weighted sum Σ exp(x − max)·y."""

    def __init__(self, size: int, like: torch.Tensor, weighted: bool = False):
        opts = dict(dtype=like.dtype, device=like.device)
        self.max = torch.full((size,), float("-inf"), **opts)
        self.sum = torch.zeros(size, **opts)
        self.weighted = torch.zeros(size, **opts) if weighted else None

    def add(self, x: torch.Tensor, dim: int, at: slice = slice(None), weight: Optional[torch.Tensor] = None,
            lowest: float = 0.0):
        """Merge tile x, reduced along dim, into the entries `at` (weight: the tile y of Σ exp·y;
        lowest: a lower bound of x − its line's max, for the exp floor)."""
        old = self.max[at]
        new = torch.maximum(old, x.amax(dim))
        shift = new.masked_fill(new == float("-inf"), 0.0)  # an all −∞ (filtered) line stays NaN-free
        rescale = (old - shift).exp_()
        e = _tiles.floor_(x - shift.unsqueeze(dim), lowest).exp_()
        self.sum[at] = self.sum[at] * rescale + e.sum(dim)
        if weight is not None:
            self.weighted[at] = self.weighted[at] * rescale + e.mul_(weight).sum(dim)
        self.max[at] = new

    def lse(self) -> torch.Tensor:
        return self.sum.log() + self.max

    def mean(self) -> torch.Tensor:
        """Σ softmax(x)·y."""
        return self.weighted / self.sum


def distill_forward(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts: "DistillOptions") -> Dict:
    n, m = a.shape[0], b.shape[0]
    tiles = _Tiles(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts)
    like = torch.empty(0, dtype=tiles.cd, device=a.device)
    kd, shared = opts.kd is not None, opts.z_is_u
    row_names = ["row_lse", "row_pos"] + (["student_row_lse", "teacher_row_lse", "row_cross"] if kd else [])
    out = {k: torch.empty(n, dtype=tiles.cd, device=a.device) for k in row_names}
    col_pos = torch.zeros(m, dtype=tiles.cd, device=a.device)
    z_cols = _RunningLse(m, like)
    if kd:
        u_cols, v_cols = (z_cols if shared else _RunningLse(m, like)), _RunningLse(m, like, weighted=True)
    low_z = tiles.lowest("z")
    low_u, low_v = (tiles.lowest("u"), tiles.lowest("v")) if kd else (0.0, 0.0)
    for i0, i1 in spans(n, _tiles.TILE_ROWS):
        rows = tiles.rows(i0, i1)
        z_rows = _RunningLse(i1 - i0, like)
        row_pos = torch.zeros(i1 - i0, dtype=tiles.cd, device=a.device)
        if kd:
            u_rows, v_rows = (z_rows if shared else _RunningLse(i1 - i0, like)), _RunningLse(i1 - i0, like, True)
        for j0, j1 in spans(m, _tiles.TILE_COLS):
            t = tiles.tile(rows, tiles.cols(j0, j1), i0, i1, j0, j1)
            _add_positive_sums(t.z, row_ids, col_ids, i0, i1, j0, j1, row_pos, col_pos)
            z_rows.add(t.z, 1, lowest=low_z)
            z_cols.add(t.z, 0, slice(j0, j1), lowest=low_z)
            if kd:
                if not shared:
                    u_rows.add(t.u, 1, lowest=low_u)
                    u_cols.add(t.u, 0, slice(j0, j1), lowest=low_u)
                weight = t.u - t.v if opts.kd == "kl" else t.u
                v_rows.add(t.v, 1, weight=weight, lowest=low_v)
                v_cols.add(t.v, 0, slice(j0, j1), weight=weight, lowest=low_v)
        out["row_lse"][i0:i1], out["row_pos"][i0:i1] = z_rows.lse(), row_pos
        if kd:
            out["student_row_lse"][i0:i1] = out["row_lse"][i0:i1] if shared else u_rows.lse()
            out["teacher_row_lse"][i0:i1], out["row_cross"][i0:i1] = v_rows.lse(), v_rows.mean()
    out.update(col_lse=z_cols.lse(), col_pos=col_pos)
    if kd:
        out.update(student_col_lse=u_cols.lse(), teacher_col_lse=v_cols.lse(), col_cross=v_cols.mean())
    # A non-finite input can leave no trace in the tiles' math (clamped into ψ, filtered, a −∞
    # dropped by a log-sum-exp): carry it into every statistic as NaN.
    poison = nonfinite_poison(tiles.cd, a, b, scale, *((ta, tb, teacher_scale) if opts.needs_teacher else ()))
    return {k: v + poison for k, v in out.items()}


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
    f_opts = dict(dtype=tiles.cd, device=a.device)
    da = torch.empty(a.shape, **f_opts) if need_a else None
    db = torch.zeros(b.shape, **f_opts) if need_b else None
    dscale = torch.zeros((), **f_opts)
    need_rows = need_a or need_scale
    kd, shared = opts.kd is not None, opts.z_is_u
    # Softmax-gradient weights per tile matrix; with Z = U the student's join Z's (one exp each way).
    g_z = (grads["row_lse"], grads["col_lse"])
    g_u = (grads["student_row_lse"], grads["student_col_lse"]) if kd else (None, None)
    if shared:
        g_z, g_u = (_plus(g_z[0], g_u[0]), _plus(g_z[1], g_u[1])), (None, None)
    # lower bounds of x − lse for the exp floor, per (matrix, statistics)
    low = {name: (tiles.lowest(name[0], lse[row]), tiles.lowest(name[0], lse[col]))
           for name, row, col in (("z", "row_lse", "col_lse"), ("u", "student_row_lse", "student_col_lse"),
                                  ("v", "teacher_row_lse", "teacher_col_lse")) if row in lse}
    for i0, i1 in spans(n, _tiles.TILE_ROWS):
        rows = tiles.rows(i0, i1)
        a_rows = rows[0]
        acc = torch.zeros(i1 - i0, a.shape[1], **f_opts) if need_rows else None
        for j0, j1 in spans(m, _tiles.TILE_COLS):
            cols = tiles.cols(j0, j1)
            t = tiles.tile(rows, cols, i0, i1, j0, j1, slope=True)
            h = torch.zeros_like(t.z)  # ∂/∂Z, then H
            _add_softmax_grad(h, t.z, lse["row_lse"], lse["col_lse"], *g_z, i0, i1, j0, j1, low["z"])
            add_positive_grad(h, row_ids, col_ids, i0, i1, j0, j1, grads["row_pos"], grads["col_pos"])
            if t.slope is not None:
                if need_scale:
                    dscale += (h * (t.psi - t.slope * t.c)).sum()
                h.mul_(t.slope)
            if kd:
                if not shared:
                    _add_softmax_grad(h, t.u, lse["student_row_lse"], lse["student_col_lse"], *g_u, i0, i1, j0, j1,
                                      low["u"])
                _add_softmax_grad(h, t.v, lse["teacher_row_lse"], lse["teacher_col_lse"],
                                  grads["row_cross"], grads["col_cross"], i0, i1, j0, j1, low["v"])
            if need_rows:
                acc.addmm_(h, cols[0])  # Σ_j H_ij B_j
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


def _plus(x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return y if x is None else x if y is None else x + y


def _add_softmax_grad(h, x, row_lse, col_lse, g_row, g_col, i0, i1, j0, j1, lowest=(0.0, 0.0)) -> None:
    """h += g_row_i·exp(x_ij − row_lse_i) + g_col_j·exp(x_ij − col_lse_j): the gradient of the two lse
    (lowest: lower bounds of x − row_lse and x − col_lse, for the exp floor)."""
    if g_row is not None:
        h.addcmul_(_tiles.floor_(x - row_lse[i0:i1, None], lowest[0]).exp_(), g_row[i0:i1, None])
    if g_col is not None:
        h.addcmul_(_tiles.floor_(x - col_lse[None, j0:j1], lowest[1]).exp_(), g_col[None, j0:j1])
