"""Triton retrieval ranks (math in pyclipfast/retrieval.py): two sweeps over the tiles of S = Q·Gᵀ.

    best_i = max_{j ∈ P(i)} S_ij,   rank_i = #{j ∉ P(i) : S_ij > best_i}

One kernel does both sweeps (BEST selects which), so best_i and the scores it
is compared with come out of the same tile computation: a negative that equals
the best positive (a duplicate caption) ties exactly and is not counted. With
the default diagonal positives the first sweep visits only the tiles crossing
the diagonal. The grid is (query blocks × gallery groups); a program covers its
gallery blocks and writes one partial per query (max or count), reduced on the
host: O(Nq·groups) memory, no atomics, every tile computed once per sweep.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._tiles import (
    dot_precision, ids_or_dummy, on_input_device, parallel_target, positive_tile, score_tile, tile_config,
)


@triton.jit
def _rank_kernel(
    q_ptr, g_ptr, best_ptr, query_ids_ptr, gallery_ids_ptr, part_ptr,  # part: [groups, n_rows]
    n_rows, n_cols, dim, stride_qm, stride_qk, stride_gn, stride_gk, col_blocks_per_group,
    POS_MODE: tl.constexpr, BEST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    cb_lo = pid_c * col_blocks_per_group
    cb_hi = tl.minimum(cb_lo + col_blocks_per_group, tl.cdiv(n_cols, BLOCK_N))
    if BEST:
        if POS_MODE == 0:  # only the tiles crossing the diagonal hold positives
            cb_lo = tl.maximum(cb_lo, pid_m * BLOCK_M // BLOCK_N)
            cb_hi = tl.minimum(cb_hi, ((pid_m + 1) * BLOCK_M - 1) // BLOCK_N + 1)
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    else:
        best = tl.load(best_ptr + offs_m, mask=row_ok, other=float("inf"))
    count = tl.zeros((BLOCK_M,), tl.int32)
    for cb in range(cb_lo, cb_hi):
        offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        s = score_tile(q_ptr, g_ptr, offs_m, offs_n, n_rows, n_cols, dim,
                       stride_qm, stride_qk, stride_gn, stride_gk, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        pos = positive_tile(query_ids_ptr, gallery_ids_ptr, offs_m, offs_n, n_rows, n_cols, POS_MODE)
        if BEST:
            best = tl.maximum(best, tl.max(tl.where(pos, s, float("-inf")), 1), propagate_nan=tl.PropagateNan.ALL)
        else:
            above = (s > best[:, None]) & (offs_n[None, :] < n_cols) & (pos == 0)
            count += tl.sum(above.to(tl.int32), 1)
    if BEST:
        tl.store(part_ptr + pid_c.to(tl.int64) * n_rows + offs_m, best, mask=row_ok)
    else:
        tl.store(part_ptr + pid_c.to(tl.int64) * n_rows + offs_m, count, mask=row_ok)


@on_input_device
def count_above(queries: torch.Tensor, gallery: torch.Tensor, query_ids: Optional[torch.Tensor],
                gallery_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """rank (Nq,) int64: per query, the negatives scoring strictly above its best positive."""
    nq, dim = queries.shape
    ng = gallery.shape[0]
    cfg = tile_config(queries)
    row_blocks, col_blocks = triton.cdiv(nq, cfg.block_m), triton.cdiv(ng, cfg.block_n)
    groups = min(col_blocks, max(1, triton.cdiv(parallel_target(queries), row_blocks)))
    per_group = triton.cdiv(col_blocks, groups)
    groups = triton.cdiv(col_blocks, per_group)
    ids = ids_or_dummy(query_ids, queries), ids_or_dummy(gallery_ids, queries)

    def sweep(part, best, find_best: bool):
        wrap_triton(_rank_kernel)[(row_blocks, groups)](
            queries, gallery, best, *ids, part,
            nq, ng, dim, queries.stride(0), queries.stride(1), gallery.stride(0), gallery.stride(1), per_group,
            POS_MODE=0 if query_ids is None else 1, BEST=find_best,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=dot_precision(queries),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return part

    # groups whose gallery blocks miss the diagonal leave their slots of the first sweep at −∞
    best_part = torch.full((groups, nq), float("-inf"), dtype=torch.float32, device=queries.device)
    best = sweep(best_part, best_part, find_best=True).amax(0)
    count_part = sweep(torch.empty(groups, nq, dtype=torch.int32, device=queries.device), best, find_best=False)
    return count_part.sum(0, dtype=torch.int64)
