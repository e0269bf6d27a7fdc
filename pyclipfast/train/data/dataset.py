"""torch Dataset over SyntheticScenes, and the collate that builds multi-positive CLIP batches.

    loader = DataLoader(SyntheticClipDataset(SyntheticScenes("train"), captions="all"),
                        batch_size=256, shuffle=True, collate_fn=collate_clip)
    for batch in loader:   # batch.images (B, 3, H, W); batch.texts, T strings
        ...                # batch.image_ids (B,), batch.text_ids (T,): positives share an id

Call `set_epoch` before each epoch so that caption noise and sentence sampling are redrawn
(DataLoader workers pick the attribute up when they start, i.e. at each epoch unless
persistent_workers=True).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from .synthetic import SyntheticScenes, caption_modes
from .transforms import CLIP_MEAN, CLIP_STD, ToNormalizedTensor


class SyntheticSample(NamedTuple):
    """One image (3, H, W) float32, its captions (one per caption mode) and its id (the index)."""

    image: torch.Tensor
    captions: tuple[str, ...]
    image_id: int


class ClipBatch(NamedTuple):
    """A batch for a multi-positive CLIP loss: text j is a positive of image i iff the ids match."""

    images: torch.Tensor
    texts: list[str]
    image_ids: torch.Tensor
    text_ids: torch.Tensor


class SyntheticClipDataset(Dataset[SyntheticSample]):
    """Normalised image tensors and caption strings from one split of the synthetic data.

    Args:
        scenes: the split.
        captions: "short", "detailed", "sentences", "all" (short and detailed), or a sequence of
            these; each sample carries one caption per mode.
        mean, std: per-channel normalisation (CLIP's by default).
    """

    def __init__(
        self,
        scenes: SyntheticScenes,
        captions: str | Sequence[str] = "short",
        *,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        if not isinstance(scenes, SyntheticScenes):
            raise TypeError(f"scenes must be a SyntheticScenes, got {type(scenes).__name__}")
        self.scenes = scenes
        self.modes = caption_modes(captions)
        self.to_tensor = ToNormalizedTensor(mean, std)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose caption noise and sentence samples are served."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> SyntheticSample:
        image = self.to_tensor(self.scenes.image(index))
        return SyntheticSample(image, self.scenes.captions(index, self.modes, self.epoch), index)


def collate_clip(samples: Sequence[SyntheticSample]) -> ClipBatch:
    """Stack images; flatten captions image by image, each tagged with its image's id."""
    if not samples:
        raise ValueError("samples must not be empty")
    images = torch.stack([s.image for s in samples])
    texts = [caption for s in samples for caption in s.captions]
    image_ids = torch.tensor([s.image_id for s in samples], dtype=torch.long)
    text_ids = torch.tensor([s.image_id for s in samples for _ in s.captions], dtype=torch.long)
    return ClipBatch(images, texts, image_ids, text_ids)
