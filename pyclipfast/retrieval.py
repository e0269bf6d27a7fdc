"""Retrieval recall@K without the Nq×Ng score matrix.

    S_ij   = ⟨Q_i, G_j⟩
    best_i = max_{j ∈ P(i)} S_ij                     (P(i): gallery items with query i's id)
    rank_i = #{j : S_ij > best_i}                    (0 = the best positive comes first)
    R@K    = mean_i [rank_i < K]

The backends sweep the tiles of S twice, with the same score computation: the
first takes best_i from the positives' tiles, the second counts, per query, the
negatives scoring strictly above it (positives are left out). Ties count in the
query's favour, exactly: a negative equal to the best positive (a duplicate
caption) rounds alike and is not counted. O(Nq·Ng·D) work, O(Nq + Ng) memory.
Unvalidated, a non-finite query or gallery item makes every R@K NaN.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

import torch

from . import reference
from ._dispatch import resolve
from ._ops import ops
from ._validation import check_features, check_finite, check_ids, positive_counts


def recall_at_k(queries: torch.Tensor, gallery: torch.Tensor, ks: Iterable[int] = (1, 5, 10), *,
                query_ids: Optional[torch.Tensor] = None, gallery_ids: Optional[torch.Tensor] = None,
                backend: str = "auto") -> Dict[str, Union[float, torch.Tensor]]:
    """Recall@K of retrieving gallery items (Ng×D) for queries (Nq×D) by dot product.

    Args:
        queries, gallery: (Nq, D) and (Ng, D) features, same dtype and device (normalise them
            first for cosine similarity).
        ks: the cut-offs K, positive integers.
        query_ids, gallery_ids: optional integer ids (Nq,) and (Ng,); gallery item j is a positive
            of query i iff the ids are equal (e.g. image→text with 5 captions per image: the
            image index as id on both sides). Default: query i's positive is gallery item i.
        backend: "auto" (Triton on CUDA tensors, chunked torch otherwise), "triton", "torch" or
            "reference" (materialised).

    Returns:
        ``{"R@1": r1, "R@5": r5, ...}``, one Python float per K in the order given: the
        fraction of queries whose best positive is among the top K (open_clip's retrieval
        metrics ``image_to_text_R@1`` etc. use the same names and definition). No gradients.
        Inside a torch.compile'd graph the values are 0-dim float32 tensors instead (a Python
        float would need a host sync), and the data checks are skipped: a query without a
        positive then counts as a miss.

    Raises:
        ValueError naming the first query that has no positive in the gallery.
    """
    check_features("queries", queries)
    check_features("gallery", gallery, like=queries, like_name="queries")
    ks = _check_ks(ks)
    query_ids, gallery_ids = check_ids(query_ids, gallery_ids, queries, gallery, names=("query_ids", "gallery_ids"))
    name = resolve("retrieval", backend, queries)
    check_finite("queries", queries)
    check_finite("gallery", gallery)
    if query_ids is not None and not torch.compiler.is_compiling():
        _check_every_query_has_a_positive(query_ids, gallery_ids)
    if name == "reference":
        if not (bool(torch.isfinite(queries).all()) and bool(torch.isfinite(gallery).all())):
            return {f"R@{k}": float("nan") for k in ks}  # reached only with the data checks off
        return reference.recall_at_k(queries, gallery, ks, query_ids=query_ids, gallery_ids=gallery_ids)
    with torch.no_grad():
        rank = ops("retrieval", name)["count"](queries, gallery, query_ids, gallery_ids)
        finite = torch.isfinite(queries).all() & torch.isfinite(gallery).all()
    if torch.compiler.is_compiling():
        return {f"R@{k}": torch.where(finite, (rank < k).float().mean(), float("nan")) for k in ks}
    if not bool(finite):
        return {f"R@{k}": float("nan") for k in ks}  # reached only with the data checks off
    return {f"R@{k}": int((rank < k).sum()) / rank.shape[0] for k in ks}


def _check_ks(ks) -> tuple:
    try:
        ks = tuple(ks)
    except TypeError:
        raise TypeError(f"ks must be an iterable of positive integers, got {type(ks).__name__}") from None
    if not ks:
        raise ValueError("ks is empty; give at least one cut-off K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"ks must hold integers, got {k!r}")
        if k < 1:
            raise ValueError(f"ks must hold positive integers, got {k}")
    return ks


def _check_every_query_has_a_positive(query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> None:
    """Checked in eager mode on every device (recall_at_k returns Python floats, so it
    synchronises anyway); skipped inside a torch.compile'd graph."""
    missing = (positive_counts(query_ids, gallery_ids) == 0).nonzero()
    if missing.numel():
        raise ValueError(f"query {int(missing[0, 0])} has no positive in the gallery (no gallery item with its "
                         f"id); {missing.numel()} such queries in total")
