"""pyclipfast: fused kernels for CLIP-style losses in O(N·D) memory.

Public API: `clip_loss`, `siglip_loss`, `distill_loss`, `cosine_loss`,
`recall_at_k`, the open_clip drop-ins `ClipLoss`, `SigLipLoss`,
`DistillClipLoss` and `CoCaLoss`, and `set_validation`;
`pyclipfast.distributed` runs the losses on torch.distributed.
"""
from . import distributed
from ._validation import set_validation, validation_enabled
from .clip import clip_loss
from .cosine import cosine_loss
from .distill import distill_loss
from .modules import ClipLoss, CoCaLoss, DistillClipLoss, SigLipLoss
from .retrieval import recall_at_k
from .siglip import siglip_loss

__version__ = "0.1.0"

__all__ = [
    "ClipLoss",
    "CoCaLoss",
    "DistillClipLoss",
    "SigLipLoss",
    "clip_loss",
    "cosine_loss",
    "distill_loss",
    "recall_at_k",
    "set_validation",
    "siglip_loss",
    "validation_enabled",
]
