"""Triton InfoNCE: fused forward statistics and fused gradient tiles.

Forward, one sweep over the tiles of S = s·A·Bᵀ (no bias: it cancels):

    row_lse_i = logsumexp_j S_ij,   col_lse_j = logsumexp_i S_ij
    row_pos_i = Σ_j pos_ij S_ij,    col_pos_j = Σ_i pos_ij S_ij
    row_dot_i = Σ_j P^r_ij S_ij,    col_dot_j = Σ_i P^c_ij S_ij    (DOTS only; P the row / column softmax)

The grid is (row groups × column groups). A program keeps the online
(max, sum-exp[, Σ exp(S − max)·S]) of its rows in registers while it sweeps its column blocks, and
merges each tile's column statistics into its own row-group slot of a column
partial buffer; the partials of the groups are merged on the host. No atomics,
deterministic, O((N + M)·groups) extra memory, every tile computed once.

Backward, for upstream gradients of those four vectors:

    G_ij = g_row_i·exp(S_ij − row_lse_i) + g_col_j·exp(S_ij − col_lse_j) + pos_ij·(g_row_pos_i + g_col_pos_j)
    dA = s·G·B,  dB = s·Gᵀ·A,  dscale = Σ_ij G_ij⟨A_i, B_j⟩

`_clip_grad_kernel` recomputes each tile and writes G for one block of rows ×
columns (normalised to |G| ≤ 1 so 16-bit storage keeps its precision), and
sums dscale per tile; the two products with B and A run as GEMMs on the block
(`blocked_grads`), so the work is the minimum 8·N·M·D FLOPs and only one block
of G exists at a time.

With a pair rule (PAIR_RULE, penalty: pyclipfast/clip.py `clip_row_lse`) the sweep is rows only,
S_ij becomes −∞ (rule 1, equal ids) or S_ij + penalty·⟨A_i, B_j⟩ (rule 2: ids differ, rule 3:
equal ids), the ids select those pairs instead of positives, and G_ij = g_row_i·exp(S_ij − row_lse_i)
with the products still dA = s·G·B, dB = s·Gᵀ·A, dscale = Σ_ij G_ij⟨A_i, B_j⟩ (no gradient
through the penalty).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._blocks import gradient_norm, lse_partials, merge_lse_allowing_empty, merge_lse_partials
from ._tiles import (
    block_grid, blocked_grads, dot_precision, finite_or_zero, ids_or_dummy, on_input_device, positive_tile, score_tile,
    split_groups, tile_config, vec_or_dummy,
)


@triton.jit
def _clip_fwd_kernel(
    a_ptr, b_ptr, scale_ptr, row_ids_ptr, col_ids_ptr,
    row_max_ptr, row_sum_ptr, row_pos_ptr,  # [col_groups, n_rows]
    col_max_ptr, col_sum_ptr, col_pos_ptr,  # [row_groups, n_cols]
    n_rows, n_cols, dim, stride_am, stride_ak, stride_bn, stride_bk,
    row_blocks_per_group, col_blocks_per_group,
    POS_MODE: tl.constexpr, BIDIRECTIONAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    row_dot_ptr, col_dot_ptr,  # [col_groups, n_rows], [row_groups, n_cols]: Σ exp(S − max)·S, DOTS only
    DOTS: tl.constexpr,
    penalty, PAIR_RULE: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    rb_lo = pid_r * row_blocks_per_group
    rb_hi = tl.minimum(rb_lo + row_blocks_per_group, tl.cdiv(n_rows, BLOCK_M))
    cb_lo = pid_c * col_blocks_per_group
    cb_hi = tl.minimum(cb_lo + col_blocks_per_group, tl.cdiv(n_cols, BLOCK_N))
    col_part = pid_r.to(tl.int64) * n_cols
    row_part = pid_c.to(tl.int64) * n_rows
    for rb in range(rb_lo, rb_hi):
        offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float32)
        row_pos = tl.zeros((BLOCK_M,), tl.float32)
        row_dot = tl.zeros((BLOCK_M,), tl.float32)
        for cb in range(cb_lo, cb_hi):
            offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = score_tile(a_ptr, b_ptr, offs_m, offs_n, n_rows, n_cols, dim,
                             stride_am, stride_ak, stride_bn, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            valid = (offs_m[:, None] < n_rows) & (offs_n[None, :] < n_cols)
            s = tl.where(valid, acc * scale, float("-inf"))
            if PAIR_RULE != 0:
                s = pair_rule(s, acc, row_ids_ptr, col_ids_ptr, offs_m, offs_n, n_rows, n_cols, penalty, PAIR_RULE)
            # 0·S off the positives: a −∞ score (an infinite feature) leaves no trace in the
            # log-sum-exp, so carry it into the positive sums as NaN.
            s_pos = tl.where(positive_tile(row_ids_ptr, col_ids_ptr, offs_m, offs_n, n_rows, n_cols, POS_MODE),
                             s, 0.0 * (acc * scale))
            row_pos += tl.sum(s_pos, 1)
            new_max = tl.maximum(row_max, tl.max(s, 1))
            shift = finite_or_zero(new_max)  # rows past the end stay -inf; keep them NaN-free
            if DOTS:
                # Σ e·S with the unmasked scores (0 out of range, where e = 0 too).
                rescale = tl.exp(row_max - shift)
                e = tl.exp(s - shift[:, None])
                row_sum = row_sum * rescale + tl.sum(e, 1)
                row_dot = row_dot * rescale + tl.sum(e * (acc * scale), 1)
            else:
                row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(s - shift[:, None]), 1)
            row_max = new_max
            if BIDIRECTIONAL:
                col_ok = offs_n < n_cols
                old_max = tl.load(col_max_ptr + col_part + offs_n, mask=col_ok, other=float("-inf"))
                old_sum = tl.load(col_sum_ptr + col_part + offs_n, mask=col_ok, other=0.0)
                old_pos = tl.load(col_pos_ptr + col_part + offs_n, mask=col_ok, other=0.0)
                cmax = tl.maximum(old_max, tl.max(s, 0))
                shift = finite_or_zero(cmax)
                if DOTS:
                    old_dot = tl.load(col_dot_ptr + col_part + offs_n, mask=col_ok, other=0.0)
                    rescale = tl.exp(old_max - shift)
                    e = tl.exp(s - shift[None, :])
                    csum = old_sum * rescale + tl.sum(e, 0)
                    tl.store(col_dot_ptr + col_part + offs_n, old_dot * rescale + tl.sum(e * (acc * scale), 0),
                             mask=col_ok)
                else:
                    csum = old_sum * tl.exp(old_max - shift) + tl.sum(tl.exp(s - shift[None, :]), 0)
                tl.store(col_max_ptr + col_part + offs_n, cmax, mask=col_ok)
                tl.store(col_sum_ptr + col_part + offs_n, csum, mask=col_ok)
                tl.store(col_pos_ptr + col_part + offs_n, old_pos + tl.sum(s_pos, 0), mask=col_ok)
                # The next row block of this program reads these columns back, possibly
                # from other threads: make the writes visible block-wide first.
                tl.debug_barrier()
        row_ok = offs_m < n_rows
        tl.store(row_max_ptr + row_part + offs_m, row_max, mask=row_ok)
        tl.store(row_sum_ptr + row_part + offs_m, row_sum, mask=row_ok)
        tl.store(row_pos_ptr + row_part + offs_m, row_pos, mask=row_ok)
        if DOTS:
            tl.store(row_dot_ptr + row_part + offs_m, row_dot, mask=row_ok)


@triton.jit
def _clip_grad_kernel(
    a_ptr, b_ptr, scale_ptr, row_ids_ptr, col_ids_ptr,
    row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, g_row_pos_ptr, g_col_pos_ptr, inv_norm_ptr,
    g_out_ptr, stride_gm, stride_gn, dscale_part_ptr,
    row0, row1, col0, col1, dim, stride_am, stride_ak, stride_bn, stride_bk,
    HAS_G_ROW: tl.constexpr, HAS_G_COL: tl.constexpr, HAS_G_ROW_POS: tl.constexpr, HAS_G_COL_POS: tl.constexpr,
    POS_MODE: tl.constexpr, STORE_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    penalty, PAIR_RULE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = col0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < row1
    col_ok = offs_n < col1
    scale = tl.load(scale_ptr).to(tl.float32)
    acc = score_tile(a_ptr, b_ptr, offs_m, offs_n, row1, col1, dim,
                     stride_am, stride_ak, stride_bn, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    s = acc * scale
    if PAIR_RULE != 0:
        s = pair_rule(s, acc, row_ids_ptr, col_ids_ptr, offs_m, offs_n, row1, col1, penalty, PAIR_RULE)
    g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if HAS_G_ROW:
        lse = tl.load(row_lse_ptr + offs_m, mask=row_ok, other=0.0)
        if PAIR_RULE != 0:
            lse = finite_or_zero(lse)  # a row with every pair excluded: exp(−∞ − 0) = 0, not NaN
        w = tl.load(g_row_ptr + offs_m, mask=row_ok, other=0.0)
        g += w[:, None] * tl.exp(s - lse[:, None])
    if HAS_G_COL:
        lse = tl.load(col_lse_ptr + offs_n, mask=col_ok, other=0.0)
        w = tl.load(g_col_ptr + offs_n, mask=col_ok, other=0.0)
        g += w[None, :] * tl.exp(s - lse[None, :])
    if HAS_G_ROW_POS or HAS_G_COL_POS:
        wp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_G_ROW_POS:
            wp += tl.load(g_row_pos_ptr + offs_m, mask=row_ok, other=0.0)[:, None]
        if HAS_G_COL_POS:
            wp += tl.load(g_col_pos_ptr + offs_n, mask=col_ok, other=0.0)[None, :]
        pos = positive_tile(row_ids_ptr, col_ids_ptr, offs_m, offs_n, row1, col1, POS_MODE)
        g += tl.where(pos, wp, 0.0)
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    tl.store(dscale_part_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(g * acc, 1), 0))
    if STORE_G:
        inv_norm = tl.load(inv_norm_ptr)
        out = g_out_ptr + (offs_m - row0).to(tl.int64)[:, None] * stride_gm + (offs_n - col0)[None, :] * stride_gn
        tl.store(out, (g * inv_norm).to(g_out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def pair_rule(s, acc, row_ids_ptr, col_ids_ptr, offs_m, offs_n, n_rows, n_cols, penalty, PAIR_RULE: tl.constexpr):
    """Scores s = scale·acc under a pair rule on the ids: 1, −∞ where they are equal; 2 (3),
    + penalty·acc where they differ (are equal). Out of range counts as "differ"."""
    same = positive_tile(row_ids_ptr, col_ids_ptr, offs_m, offs_n, n_rows, n_cols, 1)
    if PAIR_RULE == 1:
        out = tl.where(same, float("-inf"), s)
    elif PAIR_RULE == 2:
        out = tl.where(same, s, s + penalty * acc)
    else:
        out = tl.where(same, s + penalty * acc, s)
    return out


def _pos_mode(row_ids: Optional[torch.Tensor], rule: int = 0) -> int:
    """0 the diagonal, 1 equal ids, 2 none (with a pair rule the ids select pairs, not positives)."""
    if rule:
        return 2
    return 0 if row_ids is None else 1


@on_input_device
def clip_forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                 row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor], bidirectional: bool,
                 dots: bool = False, rule: int = 0, penalty: float = 0.0):
    n, dim = a.shape
    m = b.shape[0]
    cfg = tile_config(a)
    row_groups, col_groups, rb_per, cb_per = split_groups(triton.cdiv(n, cfg.block_m), triton.cdiv(m, cfg.block_n), a)
    parts = lse_partials(n, m, row_groups, col_groups, bidirectional, a.device, dots)
    dummy = torch.empty(1, dtype=torch.float32, device=a.device)
    wrap_triton(_clip_fwd_kernel)[(row_groups, col_groups)](
        a, b, scale.detach().float().reshape(1), ids_or_dummy(row_ids, a), ids_or_dummy(col_ids, a),
        *(dummy if parts[k] is None else parts[k] for k in ("row_max", "row_sum", "row_pos", "col_max", "col_sum",
                                                             "col_pos")),
        n, m, dim, a.stride(0), a.stride(1), b.stride(0), b.stride(1), rb_per, cb_per,
        POS_MODE=_pos_mode(row_ids, rule), BIDIRECTIONAL=bidirectional,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=dot_precision(a),
        row_dot_ptr=dummy if parts["row_dot"] is None else parts["row_dot"],
        col_dot_ptr=dummy if parts["col_dot"] is None else parts["col_dot"], DOTS=dots,
        penalty=float(penalty), PAIR_RULE=rule,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if rule:  # rows only; row_pos holds 0, or NaN for a non-finite kept score
        return merge_lse_allowing_empty(parts["row_max"], parts["row_sum"]), None, parts["row_pos"].sum(0), None
    return merge_lse_partials(parts)


@on_input_device
def clip_backward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                  row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor],
                  row_lse: torch.Tensor, col_lse: Optional[torch.Tensor],
                  g_row: Optional[torch.Tensor], g_col: Optional[torch.Tensor],
                  g_row_pos: Optional[torch.Tensor], g_col_pos: Optional[torch.Tensor],
                  need_a: bool = True, need_b: bool = True, need_scale: bool = True,
                  rule: int = 0, penalty: float = 0.0):
    dim = a.shape[1]
    cfg = tile_config(a)
    scale_f = scale.detach().float().reshape(1)
    norm = gradient_norm((g_row, g_col, g_row_pos, g_col_pos), a.device)  # G is stored as G / norm
    inv_norm = 1.0 / norm
    vecs = [vec_or_dummy(v, a) for v in (row_lse, col_lse, g_row, g_col, g_row_pos, g_col_pos)]
    ids = ids_or_dummy(row_ids, a), ids_or_dummy(col_ids, a)
    dscale_parts = []

    def write_block(g, r0, r1, c0, c1):
        grid = block_grid(r0, r1, c0, c1, cfg)
        part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=a.device)
        wrap_triton(_clip_grad_kernel)[grid](
            a, b, scale_f, *ids, *vecs, inv_norm, g, g.stride(0), g.stride(1), part,
            r0, r1, c0, c1, dim, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            HAS_G_ROW=g_row is not None, HAS_G_COL=g_col is not None,
            HAS_G_ROW_POS=g_row_pos is not None, HAS_G_COL_POS=g_col_pos is not None,
            POS_MODE=_pos_mode(row_ids, rule), STORE_G=need_a or need_b,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=dot_precision(a),
            penalty=float(penalty), PAIR_RULE=rule,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        dscale_parts.append(part.sum())

    ga, gb = blocked_grads(a, b, cfg, write_block, need_a, need_b, g_dtype=a.dtype)
    factor = scale_f * norm  # G was stored divided by norm; dA = s·G·B
    da = (ga * factor).to(a.dtype) if need_a else None
    db = (gb * factor).to(b.dtype) if need_b else None
    dscale = torch.stack(dscale_parts).sum() if need_scale else None
    return da, db, dscale
