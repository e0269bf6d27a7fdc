"""Image conversions shared by the synthetic and real datasets: uint8 arrays → normalised tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    """Raise unless mean and std are three numbers each and std is positive."""
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3:
            raise ValueError(f"{name} must have 3 values (one per RGB channel), got {len(values)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")


class ToNormalizedTensor:
    """(H, W, 3) uint8 array → (3, H, W) float32 tensor, (x / 255 − mean) / std per channel."""

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        _check_mean_std(mean, std)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._shift = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self._scale = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1) * 255.0

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image must be an (H, W, 3) uint8 array, got {type(image).__name__}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
        channels_first = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        return torch.from_numpy(channels_first).sub_(self._shift).div_(self._scale)


class ResizeCropNormalize:
    """PIL image → (3, size, size) normalised float32 tensor, for real data.

    Resize so the short side is `size` (bicubic), crop the centre square, normalise. Picklable,
    so DataLoader workers can use it.
    """

    def __init__(self, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size
        self.to_tensor = ToNormalizedTensor(mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        scale = self.size / min(width, height)
        new_size = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        resized = image.convert("RGB").resize(new_size, Image.Resampling.BICUBIC)
        left = (resized.width - self.size) // 2
        top = (resized.height - self.size) // 2
        cropped = resized.crop((left, top, left + self.size, top + self.size))
        return self.to_tensor(np.asarray(cropped))
