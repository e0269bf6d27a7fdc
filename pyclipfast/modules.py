"""Drop-in replacements for open_clip's loss modules.

Same constructor arguments, forward signatures and outputs as
``open_clip.loss.ClipLoss`` / ``SigLipLoss`` / ``DistillClipLoss``; the fused losses do the work, so
no N×N logit matrix is stored. Swap the import and nothing else changes:

    from pyclipfast import ClipLoss          # instead of open_clip.loss.ClipLoss
    loss = ClipLoss()(image_features, text_features, logit_scale.exp())

Losses are returned in float32 (float64 for float64 features) even for 16-bit
features; open_clip returns the features' dtype outside autocast.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import distributed
from .clip import clip_loss
from .distill import distill_loss
from .siglip import siglip_loss


class ClipLoss(nn.Module):
    """Bidirectional InfoNCE, open_clip's ``ClipLoss`` interface.

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: as in open_clip.
        backend: pyclipfast backend ("auto", "triton", "cuda", "torch", "reference").
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend
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

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        if self.world_size > 1:
            loss = distributed.clip_module_loss(self, image_features, text_features, logit_scale, logit_bias)
        else:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """Sigmoid loss, open_clip's ``SigLipLoss`` interface.

    Args:
        cache_labels, rank, world_size, dist_impl ("bidir", "shift", "reduce", "gather"): as in open_clip.
        backend: pyclipfast backend.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: str = "auto"):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be 'bidir', 'shift', 'reduce' or 'gather'; got {dist_impl!r}")
        self.backend = backend
        self.prev_num_logits = 0
        self.labels = {}

    def get_ground_truth(self, device, dtype, num_logits: int, negative_only: bool = False) -> torch.Tensor:
        """open_clip's ±1 label matrix (materialised; kept for API compatibility, not used)."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only: bool = False):
        return siglip_loss(image_features, text_features, logit_scale, logit_bias,
                           negative_only=negative_only, backend=self.backend)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        if self.world_size > 1:
            loss = distributed.siglip_module_loss(self, image_features, text_features, logit_scale, logit_bias)
        else:
            loss = self._loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class DistillClipLoss(ClipLoss):
    """InfoNCE plus soft-label distillation from a frozen teacher, open_clip's ``DistillClipLoss`` interface.

    Computed by the fused `distill_loss` with margin 0, no false-negative filter, kd="ce",
    normalize=False and λ = 1, which is open_clip's objective exactly; no N×N logits are stored.
    The teacher (``dist_*``) gets no gradient. Returns (contrastive_loss, distill_loss), or a dict
    with those keys when ``output_dict``.
    """

    def _losses(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale):
        return distill_loss(image_features, text_features, dist_image_features, dist_text_features, logit_scale,
                            dist_logit_scale, kd="ce", normalize=False, backend=self.backend)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                dist_image_features: torch.Tensor, dist_text_features: torch.Tensor, dist_logit_scale,
                output_dict: bool = False):
        if self.world_size > 1:
            contrastive_loss, distill = distributed.distill_module_loss(
                self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale)
        else:
            contrastive_loss, distill = self._losses(image_features, text_features, logit_scale,
                                                     dist_image_features, dist_text_features, dist_logit_scale)
        if output_dict:
            return {"contrastive_loss": contrastive_loss, "distill_loss": distill}
        return contrastive_loss, distill
