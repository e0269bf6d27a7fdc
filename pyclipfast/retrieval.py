"""Retrieval recall@K without the Nq×Ng score matrix, SPEC §5.

    S_ij   = ⟨Q_i, G_j⟩
    best_i = max_{j ∈ P(i)} S_ij                     (P(i): gallery items with query i's id)
    rank_i = #{j : S_ij > best_i}                    (0 = the best positive comes first)
    R@K    = mean_i [rank_i < K]

`best_i` needs only the positive pairs: the gallery is sorted by id, each
query's positives are one run of it, and the pairs are scored in fixed-size
chunks (O(#pairs·D) work, O(Nq + Ng + chunk) memory). One sweep over the tiles
of S then counts, per query, the negatives scoring strictly above best_i
(positives never do; leaving them out keeps rounding from counting the best
positive against itself). Ties count in the query's favour.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

import torch

from . import reference
from ._dispatch import resolve
from ._ops import ops, retrieval_best
from ._validation import check_features, check_finite, check_ids, positive_counts

# Positive pairs scored at once when computing best_i.
PAIR_CHUNK = 1 << 14


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
        return reference.recall_at_k(queries, gallery, ks, query_ids=query_ids, gallery_ids=gallery_ids)
    with torch.no_grad():
        best = retrieval_best(queries, gallery, query_ids, gallery_ids)
        rank = ops("retrieval", name)["count"](queries, gallery, best, query_ids, gallery_ids)
    if torch.compiler.is_compiling():
        return {f"R@{k}": (rank < k).float().mean() for k in ks}
    return {f"R@{k}": int((rank < k).sum()) / rank.shape[0] for k in ks}


def best_positive_scores(queries: torch.Tensor, gallery: torch.Tensor, query_ids: Optional[torch.Tensor],
                         gallery_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """best_i = max over query i's positives of ⟨Q_i, G_j⟩ (float32, float64 for float64), no Nq×Ng matrix."""
    cd = reference.compute_dtype(queries)
    best = torch.full((queries.shape[0],), float("-inf"), dtype=cd, device=queries.device)
    for query_of, gallery_of in _positive_pairs(query_ids, gallery_ids, queries.shape[0], queries.device):
        scores = (queries[query_of].to(cd) * gallery[gallery_of].to(cd)).sum(1)
        best.scatter_reduce_(0, query_of, scores, "amax")
    return best


def _positive_pairs(query_ids: Optional[torch.Tensor], gallery_ids: Optional[torch.Tensor], nq: int, device):
    """(query index, gallery index) of every positive pair, PAIR_CHUNK pairs at a time.

    With ids, query i's positives are the run [lo_i, hi_i) of the gallery sorted by id, and
    pair k (in query order) belongs to the query whose cumulative count first exceeds k.
    """
    if query_ids is None:
        for p0 in range(0, nq, PAIR_CHUNK):
            pair = torch.arange(p0, min(p0 + PAIR_CHUNK, nq), device=device)
            yield pair, pair
        return
    sorted_ids, order = torch.sort(gallery_ids)
    lo = torch.searchsorted(sorted_ids, query_ids)
    ends = (torch.searchsorted(sorted_ids, query_ids, right=True) - lo).cumsum(0)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    total = int(ends[-1])
    for p0 in range(0, total, PAIR_CHUNK):
        pair = torch.arange(p0, min(p0 + PAIR_CHUNK, total), device=device)
        query_of = torch.searchsorted(ends, pair, right=True)
        yield query_of, order[lo[query_of] + pair - starts[query_of]]


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
