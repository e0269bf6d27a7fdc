"""Chunked PyTorch retrieval ranks (math in pyclipfast/retrieval.py): two sweeps over the tiles of S = Q·Gᵀ.

    best_i = max_{j ∈ P(i)} S_ij,   rank_i = #{j ∉ P(i) : S_ij > best_i}

Both sweeps score the same tiles with the same call (`_scores`), so best_i and
the scores compared with it round alike: a negative equal to the best positive
(a duplicate caption) ties exactly and is not counted. With the default
diagonal positives the first sweep visits only the tiles crossing the diagonal.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _tiles
from ._tiles import compute_dtype, diagonal_span, positive_tile, spans


def _scores(queries: torch.Tensor, gallery: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
    cd = compute_dtype(queries)
    return queries[i0:i1].to(cd) @ gallery[j0:j1].to(cd).T


def best_positive(queries: torch.Tensor, gallery: torch.Tensor, query_ids: Optional[torch.Tensor],
                  gallery_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """best_i = max over query i's positives of S_ij, from the tiles `count_above` sweeps."""
    nq, ng = queries.shape[0], gallery.shape[0]
    best = torch.full((nq,), float("-inf"), dtype=compute_dtype(queries), device=queries.device)
    for i0, i1 in spans(nq, _tiles.TILE_ROWS):
        for j0, j1 in spans(ng, _tiles.TILE_COLS):
            if query_ids is None and diagonal_span(i0, i1, j0, j1) is None:
                continue
            s = _scores(queries, gallery, i0, i1, j0, j1)
            kind, pos = positive_tile(query_ids, gallery_ids, i0, i1, j0, j1)
            if kind == "diag":
                k, g0, g1 = pos
                best[g0:g1] = torch.maximum(best[g0:g1], s.diagonal(k))
            else:
                best[i0:i1] = torch.maximum(best[i0:i1], s.masked_fill(~pos, float("-inf")).amax(1))
    return best


def count_above(queries: torch.Tensor, gallery: torch.Tensor, query_ids: Optional[torch.Tensor],
                gallery_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """rank (Nq,) int64: per query, the negatives scoring strictly above its best positive."""
    best = best_positive(queries, gallery, query_ids, gallery_ids)
    nq, ng = queries.shape[0], gallery.shape[0]
    rank = torch.zeros(nq, dtype=torch.int64, device=queries.device)
    for i0, i1 in spans(nq, _tiles.TILE_ROWS):
        for j0, j1 in spans(ng, _tiles.TILE_COLS):
            above = _scores(queries, gallery, i0, i1, j0, j1) > best[i0:i1, None]
            kind, pos = positive_tile(query_ids, gallery_ids, i0, i1, j0, j1)
            if kind == "diag":
                if pos is not None:
                    above.diagonal(pos[0]).fill_(False)
            else:
                above &= ~pos
            rank[i0:i1] += above.sum(1)
    return rank
