"""The MultipleNegativesRankingLoss family as calls of the fused rows-only InfoNCE (no sentence-transformers import).

With anchors q_i (n of them on this rank), candidates d = [positives; negatives_1; …; negatives_k]
and s the scale (sim: dot products, of L2-normalised embeddings for cos_sim):

    query_to_doc:    t_i = logsumexp_j s·sim(q_i, d_j)  − s·sim(q_i, p_i)
    doc_to_query:    u_i = logsumexp_j s·sim(q_j, p_i)  − s·sim(q_i, p_i)
    query_to_query:  v_i = logsumexp_{j≠i} s·sim(q_i, q_j)  − s·sim(q_i, p_i)
    doc_to_doc:      w_i = logsumexp_{j: owner(d_j)≠i} s·sim(p_i, d_j)  − s·sim(q_i, p_i)
    L = mean_i t_i  |  mean_i logaddexp(t_i, u_i, …) (joint)  |  mean_i ½(t_i + u_i) (per_direction)

owner(d_j) is the anchor a candidate belongs to (its positive and its own hard negatives). t and
u are each one `pyclipfast.clip_loss(..., reduction="none", bidirectional=False)`: the own pair is
the positive, given by ids; hard negatives are extra columns with an id that matches no anchor.
v and w are each one `pyclipfast.clip.clip_row_lse` with the rule "exclude_equal" on anchor and
owner ids (the self pairs are −∞ inside the kernel: subtracting them afterwards would cancel
catastrophically); a row with nothing left (one anchor, no other) gives v_i = −∞, which drops out
of the logaddexp.

hardness (sentence-transformers' ``hardness_mode`` with strength α) adds α·stop_grad(sim) to the
selected negatives of t, inside the kernel ("penalise_equal"/"penalise_unequal" rules of
`clip_row_lse` on owner ids; the positive term stays s·sim(q_i, p_i)):

    in_batch_negatives: every candidate not owned by q_i;  hard_negatives: q_i's own hard
    negatives;  all_negatives: every candidate but p_i.

Duplicates (candidates with the positive's text, dup(i), found by text keys; with query_to_doc
and doc_to_query only, without hardness):

    "positives":  t_i = logsumexp_j S_ij − logsumexp_{j∈{own}∪dup(i)} S_ij   (−log of the softmax mass on them)
    "mask":       t_i = logsumexp_{j∉dup(i)} S_ij − S_i,own
                      = t_i⁰ + log1p(−Σ_{j∈dup(i)} exp(S_ij − S_i,own − t_i⁰))

with t⁰ the plain term. Both corrections cost O(|dup|·D). The mask is stable because a
duplicate's logit equals the positive's (identical texts give identical embeddings) and the
positive stays in the sum. (The mean-of-positives form of `clip_loss`'s ids would change nothing
here: identical texts have identical logits.)
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..clip import clip_loss, clip_row_lse
from ..distributed import all_gather_with_grad

DUPLICATE_MODES = (None, "positives", "mask")
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")


def check_duplicates(duplicates: Optional[str]) -> Optional[str]:
    if duplicates not in DUPLICATE_MODES:
        raise ValueError(f"duplicates must be None, 'positives' or 'mask'; got {duplicates!r}")
    return duplicates


def text_keys(sentence_feature: dict[str, Tensor]) -> Tensor:
    """One int64 key per text of a tokenized column: equal keys ⇔ equal input ids (padding ignored).

    A 63-bit BLAKE2 digest of the unpadded token ids, the same on every process (Python's
    ``hash`` is salted per process), so keys can be compared across ranks.
    """
    input_ids = sentence_feature.get("input_ids")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("duplicates needs tokenized text inputs with a 2-D 'input_ids' tensor in every column")
    mask = sentence_feature.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    keys = []
    for ids, keep in zip(input_ids.cpu(), mask.cpu()):
        digest = hashlib.blake2b(ids[keep].to(torch.int64).numpy().tobytes(), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little") >> 1)
    return torch.tensor(keys, dtype=torch.int64, device=input_ids.device)


def _duplicate_pairs(row_keys: Tensor, row_index: Tensor, col_keys: Tensor, col_index: Tensor):
    """(rows, cols) of all pairs with equal text keys but different indices, in O((n + M) log M + pairs)."""
    sorted_keys, order = col_keys.sort()
    lo = torch.searchsorted(sorted_keys, row_keys)
    counts = torch.searchsorted(sorted_keys, row_keys, right=True) - lo
    rows = torch.repeat_interleave(torch.arange(row_keys.numel(), device=row_keys.device), counts)
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    cols = order[torch.repeat_interleave(lo, counts) + torch.arange(rows.numel(), device=rows.device) - first]
    keep = col_index[cols] != row_index[rows]
    return rows[keep], cols[keep]


# --------------------------------------------------------------------------- the fused loss

def _gathered(x: Tensor, gather: bool) -> Tensor:
    return all_gather_with_grad(x) if gather else x


def _direction_terms(rows: Tensor, own: Tensor, cols: Tensor, scale: float, row_index: Tensor,
                     col_index: Tensor, row_keys: Optional[Tensor], col_keys: Optional[Tensor],
                     duplicates: Optional[str]) -> Tensor:
    """Per row i: logsumexp_j s·⟨rows_i, cols_j⟩ − s·⟨rows_i, own_i⟩, the own pair among the columns.

    `row_index`/`col_index` are unique ids (the own pair has equal ids), `row_keys`/`col_keys`
    text keys for the duplicates modes.
    """
    terms = clip_loss(rows, cols, scale, image_ids=row_index, text_ids=col_index,
                      reduction="none", bidirectional=False)
    if duplicates is None:
        return terms
    pair_rows, pair_cols = _duplicate_pairs(row_keys, row_index, col_keys, col_index)
    if pair_rows.numel() == 0:
        return terms
    positive = scale * (rows * own).sum(-1)
    # S_ij − S_i,own for each duplicate pair, in the loss's precision
    excess = (scale * (rows[pair_rows] * cols[pair_cols]).sum(-1) - positive[pair_rows]).to(terms.dtype)
    if duplicates == "mask":
        share = torch.zeros_like(terms).index_add(0, pair_rows, torch.exp(excess - terms[pair_rows]))
        return terms + torch.log1p(-share)
    # positives: logsumexp over the own pair and the duplicates, relative to the own pair
    top = torch.zeros_like(terms).scatter_reduce(0, pair_rows, excess, "amax", include_self=True)
    mass = torch.exp(-top).index_add(0, pair_rows, torch.exp(excess - top[pair_rows]))
    return terms - (top + torch.log(mass))


def _hardness_columns(hardness: str, owners: Tensor, k: int) -> tuple:
    """(rule, column ids) of clip_row_lse that penalise hardness mode's negatives of anchor i (row id
    = its global index) among the k candidate columns, whose owners are `owners` (each column's
    anchor) and id −1 matches no anchor."""
    nobody = torch.full_like(owners, -1)
    if hardness == "in_batch_negatives":
        return "penalise_unequal", torch.cat([owners] * k)
    if hardness == "all_negatives":
        return "penalise_unequal", torch.cat([owners] + [nobody] * (k - 1))
    return "penalise_equal", torch.cat([nobody] + [owners] * (k - 1))


def fused_ranking_loss(embeddings: Sequence[Tensor], *, scale: float, normalize: bool,
                       doc_to_query: bool, joint: bool, gather: bool, query_to_query: bool = False,
                       doc_to_doc: bool = False, hardness: Optional[str] = None, hardness_strength: float = 0.0,
                       duplicates: Optional[str] = None, keys: Optional[Sequence[Tensor]] = None) -> Tensor:
    """The MultipleNegativesRankingLoss family on [anchors, positives, negatives_1..k], fused.

    Args:
        embeddings: K + 1 tensors (n, D): anchors, positives, then each column of hard negatives.
        scale: s (1 / temperature).
        normalize: True for cos_sim, False for dot_score.
        doc_to_query: add the positives→anchors direction.
        joint: one softmax over all directions (logaddexp) instead of the mean of two.
        gather: compare this rank's anchors with the candidates of all ranks.
        query_to_query, doc_to_doc: add these directions (joint only).
        hardness: None or one of HARDNESS_MODES, with α = `hardness_strength` (0: no effect).
        duplicates: None, "positives" or "mask" (see the module docstring), with `keys`, one
            int64 text key per row of each embedding column.
    """
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    if hardness not in (None,) + HARDNESS_MODES:
        raise ValueError(f"hardness must be None or one of {', '.join(map(repr, HARDNESS_MODES))}; got {hardness!r}")
    if (query_to_query or doc_to_doc) and not joint:
        raise ValueError("query_to_query and doc_to_doc need joint=True (one softmax over all directions)")
    penalised = hardness is not None and hardness_strength != 0.0
    if duplicates is not None and (query_to_query or doc_to_doc or penalised):
        raise ValueError(f"duplicates={duplicates!r} works with the directions query_to_doc and doc_to_query "
                         "only, without hardness")
    if duplicates is not None and (keys is None or len(keys) != len(embeddings)):
        raise ValueError("duplicates needs one tensor of text keys per input column")
    embeddings = [F.normalize(e, p=2, dim=1) if normalize else e for e in embeddings]
    anchors, positives = embeddings[0], embeddings[1]
    n = anchors.shape[0]
    gather = gather and dist.is_available() and dist.is_initialized()
    first = dist.get_rank() * n if gather else 0
    index = torch.arange(first, first + n, device=anchors.device)
    k = len(embeddings) - 1
    # The candidates and their ids go through the same gather, so the labels follow the order.
    candidates = torch.cat([_gathered(e, gather) for e in embeddings[1:]])
    owners = _gathered(index, gather)  # the global index of every anchor, in the candidates' order
    candidate_index = torch.cat([owners] + [torch.full_like(owners, -1)] * (k - 1))  # positives only
    candidate_keys = None if keys is None else torch.cat([_gathered(key, gather) for key in keys[1:]])
    # s·sim(q_i, p_i), the positive of every direction, in the loss's precision
    cd = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    positive = scale * (anchors.to(cd) * positives.to(cd)).sum(-1)
    if penalised and (hardness != "hard_negatives" or k > 1):
        rule, columns = _hardness_columns(hardness, owners, k)
        terms = clip_row_lse(anchors, candidates, scale, index, columns, rule=rule,
                             penalty=float(hardness_strength)) - positive
    else:
        terms = _direction_terms(anchors, positives, candidates, scale, index, candidate_index,
                                 None if keys is None else keys[1], candidate_keys, duplicates)
    all_anchors = _gathered(anchors, gather) if doc_to_query or query_to_query else None
    if doc_to_query:
        reverse = _direction_terms(positives, anchors, all_anchors, scale, index, owners,
                                   None if keys is None else keys[0],
                                   None if keys is None else _gathered(keys[0], gather), duplicates)
        terms = torch.logaddexp(terms, reverse) if joint else 0.5 * (terms + reverse)
    if query_to_query:  # q_i against every anchor but itself
        lse = clip_row_lse(anchors, all_anchors, scale, index, owners, rule="exclude_equal")
        terms = torch.logaddexp(terms, lse - positive)
    if doc_to_doc:  # p_i against every candidate not owned by anchor i
        lse = clip_row_lse(positives, candidates, scale, index, torch.cat([owners] * k), rule="exclude_equal")
        terms = torch.logaddexp(terms, lse - positive)
    return terms.mean()
