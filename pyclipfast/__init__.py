"""pyclipfast: fused kernels for CLIP-style losses in O(N·D) memory.

Public API (SPEC §6): `clip_loss`, `siglip_loss`, `distill_loss`, the open_clip
drop-ins `ClipLoss`, `SigLipLoss` and `DistillClipLoss`, and `set_validation`;
`pyclipfast.distributed` runs the losses on torch.distributed.
"""
from . import distributed
from ._validation import set_validation, validation_enabled
from .clip import clip_loss
from .distill import distill_loss
from .modules import ClipLoss, DistillClipLoss, SigLipLoss
from .siglip import siglip_loss

__version__ = "0.1.0"

__all__ = [
    "ClipLoss",
    "DistillClipLoss",
    "SigLipLoss",
    "clip_loss",
    "distill_loss",
    "set_validation",
    "siglip_loss",
    "validation_enabled",
]
