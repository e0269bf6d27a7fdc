"""CUDA InfoNCE: fused forward statistics and fused gradient tiles (kernels in csrc/clip/).

Forward, one sweep over the tiles of S = s·A·Bᵀ (no bias: it cancels):

    row_lse_i = logsumexp_j S_ij,   col_lse_j = logsumexp_i S_ij
    row_pos_i = Σ_j pos_ij S_ij,    col_pos_j = Σ_i pos_ij S_ij
    row_dot_i = Σ_j P^r_ij S_ij,    col_dot_j = Σ_i P^c_ij S_ij    (dots only; P the row / column softmax)

on a (row groups × column groups) grid of programs writing per-group
(max, sum-exp, positive sum[, Σ exp(S − max)·S]) partials, merged here with `merge_lse`
(and `merge_weighted`).

Backward, for upstream gradients of those four vectors:

    G_ij = g_row_i·exp(S_ij − row_lse_i) + g_col_j·exp(S_ij − col_lse_j) + pos_ij·(g_row_pos_i + g_col_pos_j)
    dA = s·G·B,  dB = s·Gᵀ·A,  dscale = Σ_ij G_ij⟨A_i, B_j⟩

The kernel writes G / norm (|·| ≤ 1, stored in the input dtype) for one block of
S at a time with its per-tile dscale partials; `blocked_grads` runs the two
products as GEMMs. Same functions, arguments and results as pyclipfast/triton/clip.py,
including the rows-only pair rules (`rule`, `penalty`: pyclipfast/clip.py `clip_row_lse`).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _kernels
from ._launch import TILE, block_tiles, forward_grid, ids_i64, scalar_f32, use_tf32, vec_f32
from .._blocks import blocked_grads, gradient_norm, lse_partials, merge_lse_allowing_empty, merge_lse_partials


def clip_forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                 row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor], bidirectional: bool,
                 dots: bool = False, rule: int = 0, penalty: float = 0.0):
    n, m = a.shape[0], b.shape[0]
    row_groups, col_groups, rb_per, cb_per = forward_grid(n, m, a)
    parts = lse_partials(n, m, row_groups, col_groups, bidirectional, a.device, dots)
    _kernels.clip_forward(a, b, scalar_f32(scale), ids_i64(row_ids), ids_i64(col_ids),
                    *(parts[k] for k in ("row_max", "row_sum", "row_pos", "col_max", "col_sum", "col_pos")),
                    row_groups, col_groups, rb_per, cb_per, use_tf32(a), pair_rule=rule, penalty=penalty,
                    row_dot=parts["row_dot"], col_dot=parts["col_dot"])
    if rule:  # rows only; row_pos holds 0, or NaN for a non-finite kept score
        return merge_lse_allowing_empty(parts["row_max"], parts["row_sum"]), None, parts["row_pos"].sum(0), None
    return merge_lse_partials(parts)


def clip_backward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                  row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor],
                  row_lse: torch.Tensor, col_lse: Optional[torch.Tensor],
                  g_row: Optional[torch.Tensor], g_col: Optional[torch.Tensor],
                  g_row_pos: Optional[torch.Tensor], g_col_pos: Optional[torch.Tensor],
                  need_a: bool = True, need_b: bool = True, need_scale: bool = True,
                  rule: int = 0, penalty: float = 0.0):
    scale_f = scalar_f32(scale)
    norm = gradient_norm((g_row, g_col, g_row_pos, g_col_pos), a.device)  # G is stored as G / norm
    inv_norm = 1.0 / norm
    vecs = dict(row_lse=vec_f32(row_lse) if g_row is not None else None,
                col_lse=vec_f32(col_lse) if g_col is not None else None,
                g_row=vec_f32(g_row), g_col=vec_f32(g_col), g_row_pos=vec_f32(g_row_pos), g_col_pos=vec_f32(g_col_pos))
    ids = dict(row_ids=ids_i64(row_ids), col_ids=ids_i64(col_ids))
    store = need_a or need_b
    tf32 = use_tf32(a)
    dscale_parts = []

    def write_block(g, r0, r1, c0, c1):
        tiles = block_tiles(r0, r1, c0, c1)
        part = torch.empty(tiles, dtype=torch.float32, device=a.device)
        _kernels.clip_grad(a, b, scale_f, inv_norm=inv_norm, g_out=g if store else None, dscale_part=part,
                     row0=r0, row1=r1, col0=c0, col1=c1, tf32=tf32, **ids, **vecs, pair_rule=rule, penalty=penalty)
        dscale_parts.append(part.sum())

    ga, gb = blocked_grads(a, b, TILE, write_block, need_a, need_b, g_dtype=a.dtype)
    factor = scale_f * norm  # G was stored divided by norm; dA = s·G·B
    da = (ga * factor).to(a.dtype) if need_a else None
    db = (gb * factor).to(b.dtype) if need_b else None
    dscale = torch.stack(dscale_parts).sum() if need_scale else None
    return da, db, dscale
