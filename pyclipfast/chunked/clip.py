"""Chunked PyTorch InfoNCE statistics (the CPU default backend).

Forward (one sweep over the tiles of S = s·A·Bᵀ, no bias: it cancels):

    row_lse_i = logsumexp_j S_ij          col_lse_j = logsumexp_i S_ij
    row_pos_i = Σ_j pos_ij S_ij           col_pos_j = Σ_i pos_ij S_ij
    row_dot_i = Σ_j P^r_ij S_ij           col_dot_j = Σ_i P^c_ij S_ij     (only when asked: dots=True)

with the softmaxes P^r_ij = exp(S_ij − row_lse_i), P^c_ij = exp(S_ij − col_lse_j): the
softmax-weighted mean logits, kept like the sum-exp (Σ exp(S − max)·S, rescaled when the max
moves), so ∂row_lse_i/∂s = row_dot_i / s and ∂col_lse_j/∂s = col_dot_j / s.

Backward (recompute each tile), for upstream gradients g of those four vectors:

    G_ij = g_row_i·exp(S_ij − row_lse_i) + g_col_j·exp(S_ij − col_lse_j) + pos_ij·(g_row_pos_i + g_col_pos_j)
    dA = s·G·B,   dB = s·Gᵀ·A,   dscale = Σ_ij G_ij⟨A_i, B_j⟩ = Σ_i ⟨(G·B)_i, A_i⟩

Row statistics are exact within a row chunk; column statistics are merged
across row chunks with the online (max, sum-exp) rule.

With a pair rule (`rule`, `penalty`: pyclipfast/clip.py `clip_row_lse`) the sweep is rows only
and the ids select excluded or penalised pairs instead of positives (see the end of this file).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _tiles
from ._tiles import TileScores, add_positive_grad, nonfinite_poison, positive_tile, spans


NARROW_SPREAD = 64.0  # the widest score spread of the columns-from-rows forward (far from exp's −87.3)


def clip_forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                 row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor], bidirectional: bool,
                 dots: bool = False, rule: int = 0, penalty: float = 0.0):
    """(row_lse, col_lse, row_pos, col_pos, row_dot, col_dot): the columns None when
    one-directional, the dots None unless asked for. With a pair rule (rows only, no dots):
    (row_lse, None, row_pos, None)."""
    if rule:
        return _pair_rule_forward(a, b, scale, row_ids, col_ids, rule, penalty)
    n, m = a.shape[0], b.shape[0]
    ts = TileScores(a, b, scale)
    opts = dict(dtype=ts.cd, device=a.device)
    # 0 for finite inputs, NaN otherwise: a −∞ score (an infinite feature) leaves no trace in the
    # log-sum-exp, so it is carried into the positive sums instead; O((N + M)·D), no sync.
    poison = nonfinite_poison(ts.cd, a, b, scale)
    row_lse, row_pos = torch.empty(n, **opts), torch.zeros(n, **opts).add_(poison)
    if bidirectional:
        col_max, col_sum = torch.full((m,), float("-inf"), **opts), torch.zeros(m, **opts)
        col_pos = torch.zeros(m, **opts).add_(poison)
    if dots:
        row_dot = torch.empty(n, **opts)
        col_dot = torch.zeros(m, **opts) if bidirectional else None
    lowest = -2 * ts.bound if ts.floors else 0.0  # S − (a row's or column's max) ≥ −2·bound
    # Narrow scores (every S_ij − S_kl ≥ −64, e.g. unit features at scale ≤ 32): the columns' sums
    # come from the rows' exponentials, Σ_i exp(S_ij − M) = Σ_i exp(S_ij − max_i)·exp(max_i − M), one
    # matrix-vector product instead of a max, a subtraction and an exp over the tile; no term can
    # underflow. Wider scores take each column's own max (CPU float32 only: the bound is a host sync).
    narrow = bidirectional and ts.floors and -lowest <= NARROW_SPREAD
    for i0, i1 in spans(n, _tiles.TILE_ROWS):
        a_scaled = ts.scaled(ts.rows(i0, i1))
        run_max = torch.full((i1 - i0,), float("-inf"), **opts)
        run_sum = torch.zeros(i1 - i0, **opts)
        run_dot = torch.zeros(i1 - i0, **opts) if dots else None
        for j0, j1 in spans(m, _tiles.TILE_COLS):
            s = ts.scores(a_scaled, ts.cols(j0, j1))
            kind, pos = positive_tile(row_ids, col_ids, i0, i1, j0, j1)
            if kind == "diag" and pos is not None:
                k, g0, g1 = pos
                d = s.diagonal(k)
                row_pos[g0:g1] += d
                if bidirectional:
                    col_pos[g0:g1] += d
            elif kind == "mask":
                masked = s * pos
                row_pos[i0:i1] += masked.sum(1)
                if bidirectional:
                    col_pos[j0:j1] += masked.sum(0)
            new_max = torch.maximum(run_max, s.amax(1))
            e = _tiles.floor_(torch.sub(s, new_max[:, None], out=ts.scratch(s)), lowest).exp_()
            rescale = (run_max - new_max).exp_()
            run_sum = run_sum.mul_(rescale).add_(e.sum(1))
            if narrow:
                shift = new_max.max()  # M ≥ every score of the tile
                weight = (new_max - shift).exp_()
                col_part = torch.mv(e.T, weight)
            if dots:
                run_dot = run_dot.mul_(rescale).add_(e.mul_(s).sum(1))
                if narrow:
                    col_dot_part = torch.mv(e.T, weight)  # Σ_i exp(S_ij − M)·S_ij
            run_max = new_max
            if narrow:
                cmax = torch.maximum(col_max[j0:j1], shift)
                old_scale, new_scale = (col_max[j0:j1] - cmax).exp(), (shift - cmax).exp()
                col_sum[j0:j1] = col_sum[j0:j1] * old_scale + col_part * new_scale
                if dots:
                    col_dot[j0:j1] = col_dot[j0:j1] * old_scale + col_dot_part * new_scale
                col_max[j0:j1] = cmax
            elif bidirectional:
                cmax = torch.maximum(col_max[j0:j1], s.amax(0))
                rescale = (col_max[j0:j1] - cmax).exp()
                # with dots S is still needed after the exp: the scratch tile, else S in place
                e = torch.sub(s, cmax, out=ts.scratch(s)) if dots else s.sub_(cmax)
                e = _tiles.floor_(e, lowest).exp_()
                col_sum[j0:j1] = col_sum[j0:j1] * rescale + e.sum(0)
                if dots:
                    col_dot[j0:j1] = col_dot[j0:j1] * rescale + e.mul_(s).sum(0)
                col_max[j0:j1] = cmax
        if dots:
            row_dot[i0:i1] = run_dot / run_sum
        row_lse[i0:i1] = run_sum.log_().add_(run_max)
    if not dots:
        row_dot = col_dot = None
    elif bidirectional:
        col_dot.div_(col_sum)
    if not bidirectional:
        return row_lse, None, row_pos, None, row_dot, None
    return row_lse, col_sum.log_().add_(col_max), row_pos, col_pos, row_dot, col_dot


def clip_backward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                  row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor],
                  row_lse: torch.Tensor, col_lse: Optional[torch.Tensor],
                  g_row: Optional[torch.Tensor], g_col: Optional[torch.Tensor],
                  g_row_pos: Optional[torch.Tensor], g_col_pos: Optional[torch.Tensor],
                  need_a: bool = True, need_b: bool = True, need_scale: bool = True,
                  rule: int = 0, penalty: float = 0.0):
    if rule:
        return _pair_rule_backward(a, b, scale, row_ids, col_ids, row_lse, g_row, need_a, need_b, need_scale,
                                   rule, penalty)
    ts = TileScores(a, b, scale)
    row_shift, col_shift = _log_weight_shift(row_lse, g_row), _log_weight_shift(col_lse, g_col)
    row_sub = row_lse if row_shift is None else row_shift
    col_sub = col_lse if col_shift is None else col_shift
    # S − shift ≥ −bound − max(shift), for the exp floor
    row_lowest, col_lowest = (_lowest(ts, x) for x in (row_sub, col_sub))

    def tile_grad(a_rows, a_scaled, b_cols, i0, i1, j0, j1):
        s = ts.scores(a_scaled, b_cols)
        g = ts.scratch(s)
        if g_row is None:
            g.zero_()
        else:  # with a shift, g_row·exp(S − lse) = exp(S − (lse − log g_row))
            _tiles.floor_(torch.sub(s, row_sub[i0:i1, None], out=g), row_lowest).exp_()
            if row_shift is None:
                g.mul_(g_row[i0:i1, None])
        if g_col is not None:
            e = _tiles.floor_(s.sub_(col_sub[j0:j1]), col_lowest).exp_()
            if col_shift is not None:
                g.add_(e)
            else:
                g.addcmul_(e, g_col[None, j0:j1])
        add_positive_grad(g, row_ids, col_ids, i0, i1, j0, j1, g_row_pos, g_col_pos)
        return g

    return _gradient_sweep(ts, tile_grad, need_a, need_b, need_scale)


def _gradient_sweep(ts: TileScores, tile_grad, need_a: bool, need_b: bool, need_scale: bool):
    """dA = s·G·B, dB = s·Gᵀ·A, dscale = Σ_ij G_ij⟨A_i, B_j⟩ = Σ_i ⟨(G·B)_i, A_i⟩, with each tile of G
    from `tile_grad(a_rows, scale·a_rows, b_cols, i0, i1, j0, j1)`."""
    a, b = ts.a, ts.b
    n, m = a.shape[0], b.shape[0]
    opts = dict(dtype=ts.cd, device=a.device)
    da = torch.empty(a.shape, **opts) if need_a else None
    db = torch.zeros(b.shape, **opts) if need_b else None
    dscale = torch.zeros((), **opts)
    need_rows = need_a or need_scale
    for i0, i1 in spans(n, _tiles.TILE_ROWS):
        a_rows = ts.rows(i0, i1)
        a_scaled = ts.scaled(a_rows)
        acc = torch.zeros(i1 - i0, a.shape[1], **opts) if need_rows else None
        for j0, j1 in spans(m, _tiles.TILE_COLS):
            b_cols = ts.cols(j0, j1)
            g = tile_grad(a_rows, a_scaled, b_cols, i0, i1, j0, j1)
            if need_rows:
                acc.addmm_(g, b_cols)
            if need_b:
                db[j0:j1].addmm_(g.T, a_rows)
        if need_scale:
            dscale += (acc * a_rows).sum()
        if need_a:
            da[i0:i1] = acc.mul_(ts.scale)
    if need_b:
        db.mul_(ts.scale)
    return (
        da.to(a.dtype) if need_a else None,
        db.to(b.dtype) if need_b else None,
        dscale if need_scale else None,
    )


def _lowest(ts: TileScores, shift: Optional[torch.Tensor]) -> float:
    """A lower bound of S_ij − shift over the tiles (only computed where the exp floor applies)."""
    return _tiles.lowest_below(ts.bound, shift) if shift is not None and ts.floors else 0.0


def _log_weight_shift(lse: Optional[torch.Tensor], weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """lse − log(weight) when every weight is > 0 (the usual mean reduction), so a tile's
    weight·exp(S − lse) is one exp with no multiply pass; None otherwise. Checked on CPU
    tensors only: on a GPU the check would cost a host sync."""
    if weight is None or weight.device.type != "cpu" or not bool((weight > 0).all()):
        return None
    return lse - weight.to(lse.dtype).log()


# ---------------------------------------------------------------- rows only, with a pair rule
#
#     L_ij = s·⟨A_i, B_j⟩, −∞ on excluded pairs, + α·⟨A_i, B_j⟩ on penalised ones (rule 1: exclude
#     equal ids; 2: penalise unequal ids; 3: penalise equal ids), row_lse_i = logsumexp_j L_ij
#     G_ij = g_row_i·exp(L_ij − row_lse_i),  dA = s·G·B,  dB = s·Gᵀ·A,  dscale = Σ_ij G_ij⟨A_i, B_j⟩
#
# The ids select pairs only (no positive sums). A row with every pair excluded has row_lse −∞ and
# G = 0 (its shift is 0, not −∞).

def _pair_logits(ts: TileScores, a_rows: torch.Tensor, b_cols: torch.Tensor, row_ids: torch.Tensor,
                 col_ids: torch.Tensor, i0: int, i1: int, j0: int, j1: int, rule: int, penalty: float):
    """L of one tile, and the mask of its excluded pairs (rule 1; None otherwise)."""
    dot = a_rows @ b_cols.T
    logit = dot * ts.scale
    selected = row_ids[i0:i1, None] == col_ids[None, j0:j1]
    if rule == 2:
        selected = ~selected
    if rule == 1:
        return logit.masked_fill_(selected, float("-inf")), selected
    return logit.add_(dot * selected, alpha=penalty), None


def _pair_bound(ts: TileScores, penalty: float) -> float:
    """|L_ij| ≤ (|s| + |α|)·max‖A_i‖·max‖B_j‖ on the pairs that are not excluded."""
    scale = abs(float(ts.scale))
    return ts.bound * (1 + abs(penalty) / scale) if scale > 0 else float("inf")


def _pair_exp_(x: torch.Tensor, excluded: Optional[torch.Tensor], lowest: float) -> torch.Tensor:
    """exp(x) in place for x = L − shift; an excluded pair's stays exactly 0 when x is floored."""
    _tiles.floor_(x, lowest).exp_()
    if excluded is not None and _tiles.floored(x, x.dtype, lowest):
        x.masked_fill_(excluded, 0.0)
    return x


def _finite_shift(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == float("-inf"), torch.zeros_like(x), x)


def _pair_rule_forward(a, b, scale, row_ids, col_ids, rule: int, penalty: float):
    n, m = a.shape[0], b.shape[0]
    ts = TileScores(a, b, scale)
    opts = dict(dtype=ts.cd, device=a.device)
    row_lse = torch.empty(n, **opts)
    # L − (its row's max) on the pairs that are not excluded, for the exp floor
    lowest = -2 * _pair_bound(ts, penalty) if ts.floors else 0.0
    for i0, i1 in spans(n, _tiles.TILE_ROWS):
        a_rows = ts.rows(i0, i1)
        run_max = torch.full((i1 - i0,), float("-inf"), **opts)
        run_sum = torch.zeros(i1 - i0, **opts)
        for j0, j1 in spans(m, _tiles.TILE_COLS):
            logit, excluded = _pair_logits(ts, a_rows, ts.cols(j0, j1), row_ids, col_ids, i0, i1, j0, j1, rule,
                                           penalty)
            new_max = torch.maximum(run_max, logit.amax(1))
            shift = _finite_shift(new_max)
            e = _pair_exp_(logit.sub_(shift[:, None]), excluded, lowest)
            run_sum = run_sum * (run_max - shift).exp() + e.sum(1)
            run_max = new_max
        row_lse[i0:i1] = run_sum.log() + run_max
    # 0, or NaN for a non-finite input (an excluded pair could hide it)
    poison = nonfinite_poison(ts.cd, a, b, scale).expand(n)
    return row_lse, None, poison, None


def _pair_rule_backward(a, b, scale, row_ids, col_ids, row_lse, g_row, need_a: bool, need_b: bool,
                        need_scale: bool, rule: int, penalty: float):
    ts = TileScores(a, b, scale)
    shift = _finite_shift(row_lse.to(ts.cd))
    weight = g_row.to(ts.cd)
    lowest = _tiles.lowest_below(_pair_bound(ts, penalty), shift) if ts.floors else 0.0

    def tile_grad(a_rows, a_scaled, b_cols, i0, i1, j0, j1):
        logit, excluded = _pair_logits(ts, a_rows, b_cols, row_ids, col_ids, i0, i1, j0, j1, rule, penalty)
        return _pair_exp_(logit.sub_(shift[i0:i1, None]), excluded, lowest).mul_(weight[i0:i1, None])

    return _gradient_sweep(ts, tile_grad, need_a, need_b, need_scale)
