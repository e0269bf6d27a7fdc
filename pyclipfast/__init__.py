"""pyclipfast: fused kernels for CLIP-style losses in O(N·D) memory.

Public API (SPEC §6): `clip_loss`, `siglip_loss`, the open_clip drop-ins
`ClipLoss` and `SigLipLoss`, and `set_validation`.
"""
from ._validation import set_validation, validation_enabled
from .clip import clip_loss
from .modules import ClipLoss, SigLipLoss
from .siglip import siglip_loss

__version__ = "0.1.0"

__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "clip_loss",
    "set_validation",
    "siglip_loss",
    "validation_enabled",
]
