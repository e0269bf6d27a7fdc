"""Light image augmentation on normalised tensors, batched: random resized crop, flip, colour jitter.

    views = ViewAugment()(images, generator)       # (B, 3, H, W) → (B, 3, H, W), same size

Per image, drawn from `generator` (so a view is a pure function of the images and the
generator state, e.g. of (seed, step) in the trainer):

    crop     a rectangle of area a·H·W, a ~ U(crop_scale), aspect ratio r ~ logU(crop_ratio),
             anywhere inside the image, resampled to H×W (bilinear; one `grid_sample` for the batch)
    flip     left–right with probability `flip`
    jitter   on pixel values x ∈ [0, 1] (CLIP's normalisation undone first):
             brightness x·b, contrast (x − x̄)·c + x̄ (x̄: the image's mean grey), saturation
             g + (x − g)·s (g: the pixel's grey), with b, c, s ~ U(1 − strength, 1 + strength);
             then clamped to [0, 1] and normalised again.

No hue jitter: the built-in captions name colours, and a hue shift would turn a red circle into
another colour the caption does not name.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import CLIP_MEAN, CLIP_STD

# ITU-R 601 luma weights (what torchvision's rgb_to_grayscale uses).
_GREY = (0.299, 0.587, 0.114)


def _uniform(low: float, high: float, count: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


@dataclass(frozen=True)
class ViewAugment:
    """Random resized crop, flip and colour jitter (see the module docstring)."""

    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if not 0 <= self.flip <= 1:
            raise ValueError(f"flip must be a probability in [0, 1], got {self.flip}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        return self.jitter(self.crop_and_flip(images, generator), generator)

    def crop_and_flip(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each image's random crop (and flip) resampled to the full size."""
        count = images.shape[0]
        area = _uniform(*self.crop_scale, count, generator)
        log_ratio = _uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), count, generator)
        width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)  # fractions of the side
        height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
        centre_x = (1 - width) * (2 * torch.rand(count, generator=generator) - 1)  # in [-1, 1] coordinates
        centre_y = (1 - height) * (2 * torch.rand(count, generator=generator) - 1)
        flips = torch.rand(count, generator=generator) < self.flip
        sign = 1.0 - 2.0 * flips.float()
        theta = torch.zeros(count, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = width * sign, centre_x
        theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
        theta = theta.to(images.device, images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def jitter(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Brightness, contrast and saturation factors per image, in pixel space."""
        count = images.shape[0]
        factors = [_uniform(1 - s, 1 + s, count, generator).to(images.device, images.dtype).view(-1, 1, 1, 1)
                   for s in (self.brightness, self.contrast, self.saturation)]
        brightness, contrast, saturation = factors
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        weights = images.new_tensor(_GREY).view(1, 3, 1, 1)
        pixels = (images * std + mean) * brightness
        image_grey = (pixels * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        pixels = (pixels - image_grey) * contrast + image_grey
        pixel_grey = (pixels * weights).sum(1, keepdim=True)
        pixels = (pixel_grey + (pixels - pixel_grey) * saturation).clamp(0, 1)
        return (pixels - mean) / std
