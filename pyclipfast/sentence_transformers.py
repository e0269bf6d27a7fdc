"""Drop-ins for sentence-transformers' MultipleNegativesRankingLoss family, on the fused InfoNCE.

    from pyclipfast.sentence_transformers import CachedMultipleNegativesRankingLoss
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=64)   # was: losses.Cached…(model, …)

Each class subclasses the installed ``sentence_transformers.sentence_transformer.losses`` class of
the same name, so it takes the same constructor arguments and inputs ((anchor, positive) pairs and
(anchor, positive, negative_1, …, negative_k) tuples), reports the same config and works wherever
the original does (trainer, model cards, MatryoshkaLoss). Only the loss computation changes.

With anchors q_i, candidates d = [positives; negatives_1; …; negatives_k] (K·n rows) and the
similarity sim (cos_sim: dot products of L2-normalised embeddings, dot_score: raw dot products),
the loss is

    query_to_doc:  t_i = logsumexp_j s·sim(q_i, d_j)  − s·sim(q_i, p_i)
    doc_to_query:  u_i = logsumexp_j s·sim(q_j, p_i)  − s·sim(q_i, p_i)
    L = mean_i t_i                                     (MultipleNegativesRankingLoss)
    L = mean_i logaddexp(t_i, u_i)                     (partition_mode="joint", both directions)
    L = mean_i ½(t_i + u_i)                            (partition_mode="per_direction": the symmetric losses)

Each of t and u is one call of the fused rows-only InfoNCE (`pyclipfast.clip_loss` with
``reduction="none", bidirectional=False``): the positives are given by ids, hard negatives are extra
candidate columns whose ids match no anchor, and the n×(K·n) similarity matrix is never stored.

``duplicates`` (an addition): sentence-transformers counts a candidate whose text is identical to
the positive's (the same document paired with two anchors, a hard negative equal to the positive)
as a negative. ``duplicates="positives"`` makes every candidate with the positive's input ids a
positive (the multi-positive InfoNCE: t_i = logsumexp_j S_ij − mean_{j∈P(i)} S_ij), and
``duplicates="mask"`` removes them from the softmax:

    t_i' = t_i + log1p(−Σ_{j∈dup(i)} exp(S_ij − s·sim(q_i, p_i) − t_i))

which is stable because a duplicate's logit is the positive's (identical texts, identical
embeddings) and the positive stays in the sum. In ``doc_to_query`` the same applies to anchors
with identical texts.

``gather_across_devices=True`` on torch.distributed: every rank computes its own anchors against
the candidates of all ranks (gathered with `pyclipfast.distributed.all_gather_with_grad`, whose
backward sums each rank's gradient back to its owner, as sentence-transformers' does). The
positive ids are global indices gathered with the same collective as the embeddings, so the
labels follow the candidates' order by construction.

What the fused kernels cannot express runs sentence-transformers' own computation, unchanged:
similarity functions other than cos_sim and dot_score, the ``query_to_query`` and ``doc_to_doc``
directions (they remove the self-pairs of a set compared with itself) and ``hardness_mode``
(a stop-gradient term per logit). The cached losses compute those in their row-chunked loop.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

try:
    from sentence_transformers.base.losses.merged_forward import embed_columns
    from sentence_transformers.sentence_transformer import losses as _st_losses
    from sentence_transformers.util import cos_sim, dot_score
except ImportError as error:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError(
        "pyclipfast.sentence_transformers needs sentence-transformers: "
        "pip install 'pyclipfast[sentence-transformers]'"
    ) from error

from .clip import clip_loss
from .distributed import all_gather_with_grad

__all__ = [
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
]

Direction = Literal["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]
DUPLICATE_MODES = (None, "positives", "mask")


# --------------------------------------------------------------------------- ids of texts

def _check_duplicates(duplicates: Optional[str]) -> Optional[str]:
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
    if duplicates == "positives":
        return clip_loss(rows, cols, scale, image_ids=row_keys, text_ids=col_keys,
                         reduction="none", bidirectional=False)
    terms = clip_loss(rows, cols, scale, image_ids=row_index, text_ids=col_index,
                      reduction="none", bidirectional=False)
    if duplicates != "mask":
        return terms
    pair_rows, pair_cols = _duplicate_pairs(row_keys, row_index, col_keys, col_index)
    if pair_rows.numel() == 0:
        return terms
    positive = scale * (rows * own).sum(-1)
    dup_logits = scale * (rows[pair_rows] * cols[pair_cols]).sum(-1)
    share = torch.exp(dup_logits.float() - positive[pair_rows].float() - terms[pair_rows])
    excess = torch.zeros_like(terms).index_add(0, pair_rows, share)
    return terms + torch.log1p(-excess)


def fused_ranking_loss(embeddings: Sequence[Tensor], *, scale: float, normalize: bool,
                       doc_to_query: bool, joint: bool, gather: bool, duplicates: Optional[str] = None,
                       keys: Optional[Sequence[Tensor]] = None) -> Tensor:
    """The MultipleNegativesRankingLoss family on [anchors, positives, negatives_1..k], fused.

    Args:
        embeddings: K + 1 tensors (n, D): anchors, positives, then each column of hard negatives.
        scale: s (1 / temperature).
        normalize: True for cos_sim, False for dot_score.
        doc_to_query: add the positives→anchors direction.
        joint: one softmax over both directions (logaddexp) instead of their mean.
        gather: compare this rank's anchors with the candidates of all ranks.
        duplicates: None, "positives" or "mask" (see the module docstring), with `keys`, one
            int64 text key per row of each embedding column.
    """
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    if duplicates is not None and (keys is None or len(keys) != len(embeddings)):
        raise ValueError("duplicates needs one tensor of text keys per input column")
    embeddings = [F.normalize(e, p=2, dim=1) if normalize else e for e in embeddings]
    anchors, positives = embeddings[0], embeddings[1]
    n = anchors.shape[0]
    gather = gather and dist.is_available() and dist.is_initialized()
    first = dist.get_rank() * n if gather else 0
    index = torch.arange(first, first + n, device=anchors.device)
    no_anchor = torch.full_like(index, -1)
    # The candidates and their ids go through the same gather, so the labels follow the order.
    candidates = torch.cat([_gathered(e, gather) for e in embeddings[1:]])
    candidate_index = torch.cat([_gathered(i, gather) for i in [index] + [no_anchor] * (len(embeddings) - 2)])
    candidate_keys = None if keys is None else torch.cat([_gathered(k, gather) for k in keys[1:]])
    terms = _direction_terms(anchors, positives, candidates, scale, index, candidate_index,
                             None if keys is None else keys[1], candidate_keys, duplicates)
    if doc_to_query:
        all_anchors = _gathered(anchors, gather)
        reverse = _direction_terms(positives, anchors, all_anchors, scale, index, _gathered(index, gather),
                                   None if keys is None else keys[0],
                                   None if keys is None else _gathered(keys[0], gather), duplicates)
        terms = torch.logaddexp(terms, reverse) if joint else 0.5 * (terms + reverse)
    return terms.mean()


# --------------------------------------------------------------------------- the drop-ins

class _FusedRanking:
    """compute_loss_from_embeddings on the fused kernels, for a sentence-transformers MNRL subclass."""

    duplicates: Optional[str] = None

    def fused(self) -> bool:
        """Whether this configuration runs on the fused kernels (else sentence-transformers' own code)."""
        return (
            self.similarity_fct in (cos_sim, dot_score)
            and set(self.directions) <= {"query_to_doc", "doc_to_query"}
            and (self.hardness_mode is None or self.hardness_strength == 0.0)
        )

    def _check_fusable_duplicates(self) -> None:
        if self.duplicates is not None and not self.fused():
            raise ValueError(
                f"duplicates={self.duplicates!r} works with similarity_fct cos_sim or dot_score, the directions "
                "'query_to_doc' and 'doc_to_query' and no hardness_mode"
            )

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        sentence_features = list(sentence_features)
        keys = None
        if self.duplicates is not None:
            self._check_fusable_duplicates()
            keys = [text_keys(feature) for feature in sentence_features]
        embeddings = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels, keys=keys)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Optional[Tensor],
                                     keys: Optional[Sequence[Tensor]] = None) -> Tensor:
        if not self.fused():
            self._check_fusable_duplicates()
            return super().compute_loss_from_embeddings(embeddings, labels)
        if self.duplicates is not None and keys is None:
            raise ValueError(f"duplicates={self.duplicates!r} needs the text keys of the inputs: call the loss "
                             "on tokenized features, not on embeddings")
        return fused_ranking_loss(
            embeddings, scale=self.scale, normalize=self.similarity_fct is cos_sim,
            doc_to_query="doc_to_query" in self.directions, joint=self.partition_mode == "joint",
            gather=self.gather_across_devices, duplicates=self.duplicates, keys=keys,
        )

    def get_config_dict(self) -> dict[str, Any]:
        config = super().get_config_dict()
        if self.duplicates is not None:
            config["duplicates"] = self.duplicates
        return config


class MultipleNegativesRankingLoss(_FusedRanking, _st_losses.MultipleNegativesRankingLoss):
    """sentence-transformers' MultipleNegativesRankingLoss on the fused InfoNCE (see the module docstring).

    Same arguments as the original, plus ``duplicates`` (None, "positives" or "mask").
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[Direction, ...] = ("query_to_doc",),
        partition_mode: Literal["joint", "per_direction"] = "joint",
        hardness_mode: Optional[Literal["in_batch_negatives", "hard_negatives", "all_negatives"]] = None,
        hardness_strength: float = 0.0,
        *,
        duplicates: Optional[Literal["positives", "mask"]] = None,
    ) -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, hardness_mode=hardness_mode,
                         hardness_strength=hardness_strength)
        self.duplicates = _check_duplicates(duplicates)
        self._check_fusable_duplicates()


class MultipleNegativesSymmetricRankingLoss(_FusedRanking, _st_losses.MultipleNegativesSymmetricRankingLoss):
    """sentence-transformers' MultipleNegativesSymmetricRankingLoss on the fused InfoNCE: ½(t_i + u_i)."""

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        *,
        duplicates: Optional[Literal["positives", "mask"]] = None,
    ) -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                         gather_across_devices=gather_across_devices)
        self.duplicates = _check_duplicates(duplicates)
        self._check_fusable_duplicates()


class _FusedCached:
    """GradCache (sentence-transformers' CachedLossMixin) with the fused loss on the whole batch.

    Step 1 embeds the mini-batches without autograd, step 2 runs the fused loss on all n·(K+1)
    embeddings at once and back-propagates it to them (O(n·D) memory: no similarity block is
    stored), step 3 re-embeds each mini-batch with autograd under its recorded RNG state and
    back-propagates the cached gradients, all inherited from sentence-transformers.
    """

    _keys: Optional[list[Tensor]] = None

    def _use_fused_inner_loss(self, duplicates: Optional[str]) -> None:
        inner = self.loss
        self.loss = MultipleNegativesRankingLoss(
            self.model, scale=inner.scale, similarity_fct=inner.similarity_fct,
            gather_across_devices=inner.gather_across_devices, directions=inner.directions,
            partition_mode=inner.partition_mode, hardness_mode=inner.hardness_mode,
            hardness_strength=inner.hardness_strength, duplicates=duplicates,
        )

    @property
    def duplicates(self) -> Optional[str]:
        return self.loss.duplicates

    def fused(self) -> bool:
        """Whether the loss stage runs on the fused kernels (else sentence-transformers' chunked loop)."""
        return self.loss.fused()

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        sentence_features = list(sentence_features)
        if self.duplicates is not None:
            self.loss._check_fusable_duplicates()
            self._keys = [text_keys(feature) for feature in sentence_features]
        try:
            return super().forward(sentence_features, labels)
        finally:
            self._keys = None

    def calculate_loss(self, reps: list[list[Tensor]], labels: Optional[Tensor] = None, *,
                       with_backward: bool = False) -> Tensor:
        if not self.fused():
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        embeddings = [torch.cat(column) for column in reps]
        loss = self.loss.compute_loss_from_embeddings(embeddings, labels, keys=self._keys)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        config = super().get_config_dict()
        if self.duplicates is not None:
            config["duplicates"] = self.duplicates
        return config


class CachedMultipleNegativesRankingLoss(_FusedCached, _st_losses.CachedMultipleNegativesRankingLoss):
    """sentence-transformers' CachedMultipleNegativesRankingLoss with the fused loss stage.

    Same arguments as the original, plus ``duplicates`` (None, "positives" or "mask").
    """

    _delegated_to_wrapped_loss = _st_losses.CachedMultipleNegativesRankingLoss._delegated_to_wrapped_loss + (
        "duplicates",)

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: Optional[int] = None,
        gather_across_devices: bool = False,
        directions: tuple[Direction, ...] = ("query_to_doc",),
        partition_mode: Literal["joint", "per_direction"] = "joint",
        show_progress_bar: bool = False,
        hardness_mode: Optional[Literal["in_batch_negatives", "hard_negatives", "all_negatives"]] = None,
        hardness_strength: float = 0.0,
        *,
        duplicates: Optional[Literal["positives", "mask"]] = None,
    ) -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens,
                         gather_across_devices=gather_across_devices, directions=directions,
                         partition_mode=partition_mode, show_progress_bar=show_progress_bar,
                         hardness_mode=hardness_mode, hardness_strength=hardness_strength)
        self._use_fused_inner_loss(_check_duplicates(duplicates))


class CachedMultipleNegativesSymmetricRankingLoss(
        _FusedCached, _st_losses.CachedMultipleNegativesSymmetricRankingLoss):
    """sentence-transformers' CachedMultipleNegativesSymmetricRankingLoss with the fused loss stage."""

    _delegated_to_wrapped_loss = CachedMultipleNegativesRankingLoss._delegated_to_wrapped_loss

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: Optional[int] = None,
        gather_across_devices: bool = False,
        show_progress_bar: bool = False,
        *,
        duplicates: Optional[Literal["positives", "mask"]] = None,
    ) -> None:
        super().__init__(model, scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size,
                         mini_batch_num_tokens=mini_batch_num_tokens,
                         gather_across_devices=gather_across_devices, show_progress_bar=show_progress_bar)
        self._use_fused_inner_loss(_check_duplicates(duplicates))
