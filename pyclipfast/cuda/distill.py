"""CUDA distillation with adaptive angular margin: fused statistics and gradient tiles (math in pyclipfast/distill.py;
kernels in csrc/distill/, derivation in pyclipfast/distill.py).

Per tile, from the student tile c = A·Bᵀ and the teacher tile α = Tᵃ·Tᵇᵀ:

    μ = m·(1 − α),  ψ = c (positives) | c·cos μ + sin θ·sin μ (θ > μ) | 1
    Z = s·ψ (−∞ on negatives with α > φ),  U = s·c,  V = t·α

Forward: one sweep on a (row groups × column groups) grid writes per-group
(max, Σ exp) partials of Z, U and V along rows and columns, the positive sums of Z
and the teacher's exp-weighted Σ e·W (W = U − V for kd="kl", U for "ce"), merged
here (`merge_lse`, `merge_weighted`). Backward: each tile is recomputed and

    ∂/∂Z = g_row_lse·Pʳ + g_col_lse·Pᶜ + pos·(g_row_pos + g_col_pos)
    ∂/∂U = g_student_row_lse·qʳ + g_student_col_lse·qᶜ + g_row_cross·pʳ + g_col_cross·pᶜ
    H = ∂/∂Z·ψ' + ∂/∂U,   dscale = Σ (∂/∂Z·ψ + ∂/∂U·c)

is written (divided by a bound on |H|) one block at a time; `blocked_grads` runs
dA = s·H·B and dB = s·Hᵀ·A as GEMMs. Same functions, arguments and results as
pyclipfast/triton/distill.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch

from . import _kernels
from .._blocks import blocked_grads, gradient_norm, merge_lse, merge_weighted, packed_distill_vectors
from ..reference import ANGLE_EPS
from ._launch import TILE, block_tiles, forward_grid, ids_i64, scalar_f32, use_tf32

if TYPE_CHECKING:
    from ..distill import DistillOptions

# Forward partial statistics along dim 0 of the partial buffers (csrc/pyclipfast.h DistillStat).
Z_MAX, Z_SUM, Z_POS, U_MAX, U_SUM, V_MAX, V_SUM, V_CROSS = range(8)
# Backward per-row / per-column vectors along dim 0 of the packed buffers (DistillVector).
LSE, G_LSE, G_POS, STUDENT_LSE, G_STUDENT_LSE, TEACHER_LSE, G_CROSS = range(7)
KD = {None: 0, "kl": 1, "ce": 2}


def _options(opts: "DistillOptions") -> dict:
    return dict(margin=opts.margin, threshold=opts.threshold, kd=KD[opts.kd], angle_eps=ANGLE_EPS)


def _teacher(ta, tb, teacher_scale, opts: "DistillOptions") -> dict:
    """The teacher's tensors when the options read α (margin, filter or KD), else none."""
    if not opts.needs_teacher:
        return dict(ta=None, tb=None, teacher_scale=None)
    return dict(ta=ta, tb=tb, teacher_scale=scalar_f32(teacher_scale))


def distill_forward(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts: "DistillOptions") -> Dict:
    n, m = a.shape[0], b.shape[0]
    row_groups, col_groups, rb_per, cb_per = forward_grid(n, m, a)
    kd = opts.kd is not None
    stats = V_CROSS + 1 if kd else Z_POS + 1
    f32 = dict(dtype=torch.float32, device=a.device)
    row_part = torch.empty(stats, col_groups, n, **f32)
    col_part = torch.zeros(stats, row_groups, m, **f32)
    for running_max in ([Z_MAX, U_MAX, V_MAX] if kd else [Z_MAX]):  # fills on the device: no index tensor copied
        col_part[running_max].fill_(float("-inf"))
    _kernels.distill_forward(a, b, scalar_f32(scale), **_teacher(ta, tb, teacher_scale, opts),
                       row_ids=ids_i64(row_ids), col_ids=ids_i64(col_ids), row_part=row_part, col_part=col_part,
                       row_groups=row_groups, col_groups=col_groups, row_blocks_per_group=rb_per,
                       col_blocks_per_group=cb_per, tf32=use_tf32(a), **_options(opts))
    out = {}
    for side, part in (("row", row_part), ("col", col_part)):
        out[f"{side}_lse"] = merge_lse(part[Z_MAX], part[Z_SUM])
        out[f"{side}_pos"] = part[Z_POS].sum(0)
        if kd:
            out[f"student_{side}_lse"] = merge_lse(part[U_MAX], part[U_SUM])
            out[f"teacher_{side}_lse"] = merge_lse(part[V_MAX], part[V_SUM])
            out[f"{side}_cross"] = merge_weighted(part[V_MAX], part[V_SUM], part[V_CROSS])
    return out



def distill_backward(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, opts: "DistillOptions",
                     lse: Dict, grads: Dict, need_a: bool = True, need_b: bool = True, need_scale: bool = True):
    scale_f = scalar_f32(scale)
    kd = opts.kd is not None
    row_vec = packed_distill_vectors("row", lse, grads, kd, a.shape[0], a)
    col_vec = packed_distill_vectors("col", lse, grads, kd, b.shape[0], a)
    # |H_ij| ≤ Σ max|g|·max(1, |ψ'|) and |ψ'| ≤ 1 + 1/sin θ < 10³: H / Σ max|g| fits 16-bit storage.
    norm = gradient_norm(grads.values(), a.device)  # H is stored as H / norm
    inv_norm = 1.0 / norm
    fixed = dict(_teacher(ta, tb, teacher_scale, opts), row_ids=ids_i64(row_ids), col_ids=ids_i64(col_ids),
                 row_vec=row_vec, col_vec=col_vec, inv_norm=inv_norm, tf32=use_tf32(a), **_options(opts))
    store = need_a or need_b
    dscale_parts = []

    def write_block(g, r0, r1, c0, c1):
        part = torch.empty(block_tiles(r0, r1, c0, c1), dtype=torch.float32, device=a.device)
        _kernels.distill_grad(a, b, scale_f, g_out=g if store else None, dscale_part=part,
                        row0=r0, row1=r1, col0=c0, col1=c1, **fixed)
        dscale_parts.append(part.sum())

    ga, gb = blocked_grads(a, b, TILE, write_block, need_a, need_b, g_dtype=a.dtype)
    factor = scale_f * norm  # H was stored divided by norm; dA = s·H·B
    da = (ga * factor).to(a.dtype) if need_a else None
    db = (gb * factor).to(b.dtype) if need_b else None
    dscale = torch.stack(dscale_parts).sum() if need_scale else None
    return da, db, dscale
