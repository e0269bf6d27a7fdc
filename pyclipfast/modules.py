"""Drop-in replacements for open_clip's loss modules.

Same constructor arguments, forward signatures and outputs as
``open_clip.loss.ClipLoss`` / ``SigLipLoss`` / ``DistillClipLoss`` / ``CoCaLoss``; the fused losses
do the work, so no N×N logit matrix is stored. Swap the import and nothing else changes:

    from pyclipfast import ClipLoss          # instead of open_clip.loss.ClipLoss
    loss = ClipLoss()(image_features, text_features, logit_scale.exp())

Additions, all keyword-only: ``backend`` and ``group`` (a torch.distributed process group, default
the world) in the constructors, and ``image_ids`` / ``text_ids`` in ``forward`` (integer ids; equal
ids are positives, gathered across ranks, so several captions per image and duplicates work).
``get_logits`` materialises the logit matrices as open_clip's does (for evaluation code that calls
it; the losses never do). Losses are returned in float32 (float64 for float64 features) even for
16-bit features; open_clip returns the features' dtype outside autocast.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn

from . import distributed
from ._dispatch import BACKENDS
from ._validation import check_option
from .clip import clip_loss
from .distill import distill_loss
from .siglip import siglip_loss


def _scale(value):
    """Numbers of any kind (numpy scalars included) as Python floats; tensors as they are."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor)):
        return float(value)
    return value


def _check_common(backend: str, group) -> None:
    """Constructor checks: a known backend; group a ProcessGroup (or None) that contains this process."""
    check_option("backend", backend, BACKENDS)
    if group is not None:
        distributed._group_size(group)


class ClipLoss(nn.Module):
    """Bidirectional InfoNCE, open_clip's ``ClipLoss`` interface.

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: as in open_clip.
            With world_size > 1 the loss runs through one fused sweep per rank
            (`pyclipfast.distributed.clip_module_loss`).
        backend: pyclipfast backend ("auto", "triton", "cuda", "torch", "reference").
        group: the torch.distributed process group (default: the world); rank and world_size are
            this process's rank in it and its size.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str = "auto",
                 group=None):
        super().__init__()
        _check_common(backend, group)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
        self.group = group
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, num_logits: int) -> torch.Tensor:
        """open_clip's labels (arange, offset by rank under local_loss), cached if asked."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
            return labels
        return self.labels[device]

    def get_logits(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None):
        """(logits_per_image, logits_per_text) as open_clip computes them: **materialised** n×N
        (local_loss) or N×N matrices, gathered across ranks when world_size > 1. For code that
        calls it (evaluation); the losses never form these matrices."""
        logit_scale, logit_bias = _scale(logit_scale), _scale(logit_bias)
        if self.world_size > 1:
            distributed._check_module(self)
            all_image, all_text = distributed.gather_features(
                image_features, text_features, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                rank=self.rank, world_size=self.world_size, group=self.group)
            if self.local_loss:
                logits_per_image = logit_scale * image_features @ all_text.T
                logits_per_text = logit_scale * text_features @ all_image.T
            else:
                logits_per_image = logit_scale * all_image @ all_text.T
                logits_per_text = logits_per_image.T
        else:
            logits_per_image = logit_scale * image_features @ text_features.T
            logits_per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:  # in place, as open_clip (the non-local transpose view gets it twice)
            logits_per_image += logit_bias
            logits_per_text += logit_bias
        return logits_per_image, logits_per_text

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False, *, image_ids: Optional[torch.Tensor] = None,
                text_ids: Optional[torch.Tensor] = None):
        logit_scale, logit_bias = _scale(logit_scale), _scale(logit_bias)
        if self.world_size > 1:
            loss = distributed.clip_module_loss(self, image_features, text_features, logit_scale, logit_bias,
                                                image_ids, text_ids)
        else:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, image_ids=image_ids,
                             text_ids=text_ids, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class CoCaLoss(ClipLoss):
    """open_clip's ``CoCaLoss``: the fused contrastive loss (``ClipLoss``, with every option above)
    times clip_loss_weight, and the captioning cross-entropy over the decoder's logits (B, T, V)
    against the labels (B, T), ignoring pad_id, times caption_loss_weight, computed as open_clip
    computes it. Returns (contrastive_loss, caption_loss), or a dict when ``output_dict``."""

    def __init__(self, caption_loss_weight, clip_loss_weight, pad_id: int = 0, local_loss: bool = False,
                 gather_with_grad: bool = False, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto", group=None):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod, backend=backend, group=group)
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, logit_scale, output_dict: bool = False, *,
                image_ids: Optional[torch.Tensor] = None, text_ids: Optional[torch.Tensor] = None):
        if self.clip_loss_weight:
            contrastive = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale,
                                                                  image_ids=image_ids, text_ids=text_ids)
        else:
            contrastive = torch.tensor(0, device=logits.device)
        caption = self.caption_loss(logits.permute(0, 2, 1), labels) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": contrastive, "caption_loss": caption}
        return contrastive, caption


class SigLipLoss(nn.Module):
    """Sigmoid loss, open_clip's ``SigLipLoss`` interface.

    Args:
        cache_labels, rank, world_size, dist_impl ("bidir", "shift", "reduce", "gather"): as in open_clip.
        backend: pyclipfast backend.
        group: the torch.distributed process group (default: the world).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: str = "auto", group=None):
        super().__init__()
        _check_common(backend, group)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be 'bidir', 'shift', 'reduce' or 'gather'; got {dist_impl!r}")
        self.backend = backend
        self.group = group
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits: int, negative_only: bool = False) -> torch.Tensor:
        """open_clip's ±1 label matrix (materialised; kept for API compatibility, not used)."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None):
        """s·A·Bᵀ (+ b) of the local features, **materialised**, as open_clip's (for evaluation code)."""
        logits = _scale(logit_scale) * image_features @ text_features.T
        if logit_bias is not None:
            logits += _scale(logit_bias)
        return logits

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only: bool = False,
              image_ids=None, text_ids=None):
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, image_ids=image_ids,
                           text_ids=text_ids, negative_only=negative_only, backend=self.backend)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias,
                output_dict: bool = False, *, image_ids: Optional[torch.Tensor] = None,
                text_ids: Optional[torch.Tensor] = None):
        logit_scale, logit_bias = _scale(logit_scale), _scale(logit_bias)
        if self.world_size > 1:
            loss = distributed.siglip_module_loss(self, image_features, text_features, logit_scale, logit_bias,
                                                  image_ids, text_ids)
        else:
            loss = self._loss(image_features, text_features, logit_scale, logit_bias, image_ids=image_ids,
                              text_ids=text_ids)
        return {"contrastive_loss": loss} if output_dict else loss


class DistillClipLoss(ClipLoss):
    """InfoNCE plus soft-label distillation from a frozen teacher, open_clip's ``DistillClipLoss`` interface.

    Computed by the fused `distill_loss` with margin 0, no false-negative filter, kd="ce",
    normalize=False and λ = 1, which is open_clip's objective exactly; no N×N logits are stored.
    The teacher (``dist_*``) gets no gradient. Returns (contrastive_loss, distill_loss), or a dict
    with those keys when ``output_dict``.
    """

    def dist_loss(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """open_clip's soft cross-entropy of materialised logits: mean_i −Σ_j softmax(T)_ij log softmax(S)_ij."""
        return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                dist_image_features: torch.Tensor, dist_text_features: torch.Tensor, dist_logit_scale,
                output_dict: bool = False, *, image_ids: Optional[torch.Tensor] = None,
                text_ids: Optional[torch.Tensor] = None):
        logit_scale, dist_logit_scale = _scale(logit_scale), _scale(dist_logit_scale)
        if self.world_size > 1:
            contrastive_loss, distill = distributed.distill_module_loss(
                self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, image_ids, text_ids)
        else:
            contrastive_loss, distill = distill_loss(
                image_features, text_features, dist_image_features, dist_text_features, logit_scale,
                dist_logit_scale, kd="ce", normalize=False, image_ids=image_ids, text_ids=text_ids,
                backend=self.backend)
        if output_dict:
            return {"contrastive_loss": contrastive_loss, "distill_loss": distill}
        return contrastive_loss, distill
