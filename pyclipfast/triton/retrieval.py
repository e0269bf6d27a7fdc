"""Triton retrieval ranks (SPEC §5): one sweep over the tiles of S = Q·Gᵀ.

    rank_i = #{j ∉ P(i) : S_ij > best_i}

best_i (the best positive score) comes from the caller. The grid is (query
blocks × gallery groups); a program counts over its gallery blocks and writes
one partial count per query, summed on the host: O(Nq·groups) memory, no
atomics, every tile computed once.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._tiles import dot_precision, ids_or_dummy, parallel_target, positive_tile, score_tile, tile_config


@triton.jit
def _count_above_kernel(
    q_ptr, g_ptr, best_ptr, query_ids_ptr, gallery_ids_ptr, count_part_ptr,  # count_part: [groups, n_rows]
    n_rows, n_cols, dim, stride_qm, stride_qk, stride_gn, stride_gk, col_blocks_per_group,
    POS_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    best = tl.load(best_ptr + offs_m, mask=row_ok, other=float("inf"))
    count = tl.zeros((BLOCK_M,), tl.int32)
    cb_lo = pid_c * col_blocks_per_group
    cb_hi = tl.minimum(cb_lo + col_blocks_per_group, tl.cdiv(n_cols, BLOCK_N))
    for cb in range(cb_lo, cb_hi):
        offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        s = score_tile(q_ptr, g_ptr, offs_m, offs_n, n_rows, n_cols, dim,
                       stride_qm, stride_qk, stride_gn, stride_gk, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        pos = positive_tile(query_ids_ptr, gallery_ids_ptr, offs_m, offs_n, n_rows, n_cols, POS_MODE)
        above = (s > best[:, None]) & (offs_n[None, :] < n_cols) & (pos == 0)
        count += tl.sum(above.to(tl.int32), 1)
    tl.store(count_part_ptr + pid_c.to(tl.int64) * n_rows + offs_m, count, mask=row_ok)


def count_above(queries: torch.Tensor, gallery: torch.Tensor, best: torch.Tensor,
                query_ids: Optional[torch.Tensor], gallery_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """rank (Nq,) int64: per query, the negatives scoring strictly above its best positive."""
    nq, dim = queries.shape
    ng = gallery.shape[0]
    cfg = tile_config(queries)
    row_blocks, col_blocks = triton.cdiv(nq, cfg.block_m), triton.cdiv(ng, cfg.block_n)
    groups = min(col_blocks, max(1, triton.cdiv(parallel_target(queries), row_blocks)))
    per_group = triton.cdiv(col_blocks, groups)
    groups = triton.cdiv(col_blocks, per_group)
    count_part = torch.empty(groups, nq, dtype=torch.int32, device=queries.device)
    wrap_triton(_count_above_kernel)[(row_blocks, groups)](
        queries, gallery, best.float().contiguous(), ids_or_dummy(query_ids, queries),
        ids_or_dummy(gallery_ids, queries), count_part,
        nq, ng, dim, queries.stride(0), queries.stride(1), gallery.stride(0), gallery.stride(1), per_group,
        POS_MODE=0 if query_ids is None else 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=dot_precision(queries),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return count_part.sum(0, dtype=torch.int64)
