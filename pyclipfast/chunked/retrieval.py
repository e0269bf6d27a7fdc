"""Chunked PyTorch retrieval ranks (SPEC §5): one sweep over the tiles of S = Q·Gᵀ.

    rank_i = #{j ∉ P(i) : S_ij > best_i}

best_i (the best positive score) comes from the caller; positives are left out
of the count (none scores above best_i in exact arithmetic).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _tiles
from ._tiles import compute_dtype, positive_tile, spans


def count_above(queries: torch.Tensor, gallery: torch.Tensor, best: torch.Tensor,
                query_ids: Optional[torch.Tensor], gallery_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """rank (Nq,) int64: per query, the negatives scoring strictly above its best positive."""
    cd = compute_dtype(queries)
    nq, ng = queries.shape[0], gallery.shape[0]
    rank = torch.zeros(nq, dtype=torch.int64, device=queries.device)
    for i0, i1 in spans(nq, _tiles.TILE_ROWS):
        q = queries[i0:i1].to(cd)
        for j0, j1 in spans(ng, _tiles.TILE_COLS):
            above = q @ gallery[j0:j1].to(cd).T > best[i0:i1, None]
            kind, pos = positive_tile(query_ids, gallery_ids, i0, i1, j0, j1)
            if kind == "diag":
                if pos is not None:
                    above.diagonal(pos[0]).fill_(False)
            else:
                above &= ~pos
            rank[i0:i1] += above.sum(1)
    return rank
