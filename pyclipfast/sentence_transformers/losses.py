"""The drop-in loss classes: sentence-transformers' MultipleNegativesRankingLoss family on the fused InfoNCE.

    from pyclipfast.sentence_transformers import CachedMultipleNegativesRankingLoss
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=64)   # was: losses.Cached…(model, …)

Each class subclasses the installed ``sentence_transformers.sentence_transformer.losses`` class of
the same name, so it takes the same constructor arguments and inputs ((anchor, positive) pairs and
(anchor, positive, negative_1, …, negative_k) tuples), reports the same config and works wherever
the original does (trainer, model cards, MatryoshkaLoss). Only the loss computation changes.

The loss (see `.ranking` for the formulas) is one call of the fused rows-only InfoNCE per
direction: the n×(K·n) similarity matrix is never stored.

``duplicates`` (an addition): sentence-transformers counts a candidate whose text is identical to
the positive's (the same document paired with two anchors, a hard negative equal to the positive)
as a negative. ``duplicates="positives"`` counts every candidate with the positive's input ids
as a positive (the loss becomes −log of the softmax mass on all of them), ``duplicates="mask"``
removes them from the softmax. In ``doc_to_query`` the same applies to anchors with identical
texts. Formulas in `.ranking`.

``gather_across_devices=True`` on torch.distributed: every rank computes its own anchors against
the candidates of all ranks (gathered with `pyclipfast.distributed.all_gather_with_grad`, whose
backward sums each rank's gradient back to its owner, as sentence-transformers' does). The
positive ids are global indices gathered with the same collective as the embeddings, so the
labels follow the candidates' order by construction.

Every direction (``query_to_doc``, ``doc_to_query``, ``query_to_query``, ``doc_to_doc``), both
partition modes and every ``hardness_mode`` run fused: the self pairs of ``query_to_query`` and
``doc_to_doc`` are excluded and the hardness term α·stop_grad(sim) is added inside the kernels
(`pyclipfast.clip.clip_row_lse`). ``duplicates`` works with ``query_to_doc`` and ``doc_to_query``
and no ``hardness_mode`` (a ValueError otherwise). Similarity functions other than cos_sim and
dot_score run sentence-transformers' own computation, unchanged (the cached losses in their
row-chunked loop); ``loss.fused()`` says which path a configuration takes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Optional

import torch
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

from .ranking import check_duplicates, fused_ranking_loss, text_keys

__all__ = [
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
]

Direction = Literal["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]


# --------------------------------------------------------------------------- the drop-ins

class _DuplicatesInConfig:
    """The ``duplicates`` option in the saved configuration, beside the original's arguments."""

    def get_config_dict(self) -> dict[str, Any]:
        config = super().get_config_dict()
        if self.duplicates is not None:
            config["duplicates"] = self.duplicates
        return config


class _FusedRanking(_DuplicatesInConfig):
    """compute_loss_from_embeddings on the fused kernels, for a sentence-transformers MNRL subclass."""

    duplicates: Optional[str] = None

    def fused(self) -> bool:
        """Whether this configuration runs on the fused kernels (else sentence-transformers' own code)."""
        return self.similarity_fct in (cos_sim, dot_score)

    def _hardness(self) -> Optional[str]:
        """The hardness mode in effect (None when off or of strength 0)."""
        return self.hardness_mode if self.hardness_mode is not None and self.hardness_strength > 0.0 else None

    def _check_fusable_duplicates(self) -> None:
        if self.duplicates is not None and (
                not self.fused() or not set(self.directions) <= {"query_to_doc", "doc_to_query"}
                or self._hardness() is not None):
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
        loss = fused_ranking_loss(
            embeddings, scale=self.scale, normalize=self.similarity_fct is cos_sim,
            doc_to_query="doc_to_query" in self.directions, joint=self.partition_mode == "joint",
            gather=self.gather_across_devices, query_to_query="query_to_query" in self.directions,
            doc_to_doc="doc_to_doc" in self.directions, hardness=self._hardness(),
            hardness_strength=self.hardness_strength, duplicates=self.duplicates, keys=keys,
        )
        # Computed in float32 at least; returned in the embeddings' dtype, as sentence-transformers does
        # (under autocast: the reduced precision its callers expect).
        return loss.to(embeddings[0].dtype)


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
        self.duplicates = check_duplicates(duplicates)
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
        self.duplicates = check_duplicates(duplicates)
        self._check_fusable_duplicates()


class _FusedCached(_DuplicatesInConfig):
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
        self._use_fused_inner_loss(check_duplicates(duplicates))


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
        self._use_fused_inner_loss(check_duplicates(duplicates))
