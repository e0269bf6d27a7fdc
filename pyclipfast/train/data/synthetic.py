"""The procedural compositional image–caption dataset (the trainer's default, no download).

Everything about sample `index` of a split is a pure function of (seed, split, index) — and of
the epoch for what is re-drawn each epoch (caption noise, sentence sampling) — through
independent numpy streams keyed on those numbers, so any process computes the same sample in
any order.

Splits are disjoint by construction, not by luck: a scene belongs to "val" iff its stable hash
(`Scene.key`) is divisible by VAL_EVERY, and each split redraws until it gets one of its own. So
no val scene (layout, attributes and pixel positions) ever occurs in train, for any seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .captions import (
    CaptionNoise,
    SceneDescription,
    describe,
    detailed_caption,
    sample_sentences,
    short_caption,
)
from .render import BACKGROUND, render_scene
from .scenes import MAX_OBJECTS, Scene, check_image_size, sample_scene

SPLITS: tuple[str, ...] = ("train", "val")
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 20_000, "val": 1_000}
CAPTION_MODES: tuple[str, ...] = ("short", "detailed", "sentences")
ALL_CAPTIONS: tuple[str, ...] = ("short", "detailed")
VAL_EVERY = 8
# One independent random stream per purpose.
STREAMS: dict[str, int] = {"scene": 0, "pixels": 1, "caption_noise": 2, "sentences": 3, "probe": 4}


def sample_rng(purpose: str, seed: int, split: str, index: int, epoch: int = 0) -> np.random.Generator:
    """The generator for one purpose (a key of STREAMS) of one sample, in one epoch.

    A counter-based Philox stream: key (seed, purpose, split, index), epoch in the top word of
    the counter, so streams are independent and cheap to create.
    """
    key = [seed, STREAMS[purpose] << 60 | SPLITS.index(split) << 56 | index]
    return np.random.Generator(np.random.Philox(key=key, counter=[0, 0, 0, epoch]))


def caption_modes(captions: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise a caption choice: one of CAPTION_MODES, "all" (= ALL_CAPTIONS), or a sequence of modes."""
    if isinstance(captions, str):
        modes = ALL_CAPTIONS if captions == "all" else (captions,)
    else:
        modes = tuple(captions)
    if not modes:
        raise ValueError("captions must name at least one caption mode")
    for mode in modes:
        if mode not in CAPTION_MODES:
            raise ValueError(f"captions: unknown mode {mode!r}, expected one of {CAPTION_MODES} or 'all'")
    return modes


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise unless `value` is an int in [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


class SyntheticScenes:
    """One split of the synthetic dataset: scenes, uint8 images and captions by index.

    Args:
        split: "train" or "val".
        size: number of samples; default DEFAULT_SPLIT_SIZES[split].
        seed: base seed; the same (seed, split, index) always gives the same sample.
        image_size: side of the square images in pixels (>= 24).
        min_objects, max_objects: the number of objects is uniform in this range.
        noise: background noise amplitude in grey levels (uniform in [-noise, noise]).
        caption_noise: misalignment applied to every caption (omission / perturbation).
        cache_images: keep each rendered image in memory (per process; ~12 KB per 64×64 image).
    """

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        *,
        seed: int = 0,
        image_size: int = 64,
        min_objects: int = 1,
        max_objects: int = 3,
        noise: int = 8,
        caption_noise: CaptionNoise | None = None,
        cache_images: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        size = DEFAULT_SPLIT_SIZES[split] if size is None else size
        _check_int("size", size, 1, 2**56)
        _check_int("seed", seed, 0, 2**64 - 1)
        check_image_size(image_size)
        _check_int("max_objects", max_objects, 1, MAX_OBJECTS)
        _check_int("min_objects", min_objects, 1, max_objects)
        _check_int("noise", noise, 0, BACKGROUND)
        if caption_noise is not None and not isinstance(caption_noise, CaptionNoise):
            got = type(caption_noise).__name__
            raise TypeError(f"caption_noise must be a CaptionNoise or None, got {got}")
        self.split = split
        self.size = size
        self.seed = seed
        self.image_size = image_size
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.noise = noise
        self.caption_noise = caption_noise
        self._scenes: list[Scene | None] = [None] * size
        self._image_cache: dict[int, np.ndarray] | None = {} if cache_images else None

    def __len__(self) -> int:
        return self.size

    def _check_index(self, index: int) -> None:
        """Raise IndexError unless 0 <= index < len(self)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a {self.split} split of size {self.size}")

    def _rng(self, purpose: str, index: int, epoch: int = 0) -> np.random.Generator:
        """This split's generator for `purpose` of sample `index` in `epoch` (see sample_rng)."""
        return sample_rng(purpose, self.seed, self.split, index, epoch)

    def _in_split(self, scene: Scene) -> bool:
        """Whether `scene` belongs to this split (see the module docstring)."""
        return (scene.key() % VAL_EVERY == 0) == (self.split == "val")

    def scene(self, index: int) -> Scene:
        """The structured scene of sample `index`."""
        self._check_index(index)
        cached = self._scenes[index]
        if cached is not None:
            return cached
        rng = self._rng("scene", index)
        while True:
            count = int(rng.integers(self.min_objects, self.max_objects + 1))
            scene = sample_scene(rng, self.image_size, count)
            if self._in_split(scene):
                self._scenes[index] = scene
                return scene

    def image(self, index: int) -> np.ndarray:
        """The (H, W, 3) uint8 image of sample `index` (read-only when cached)."""
        self._check_index(index)
        if self._image_cache is None:
            return render_scene(self.scene(index), self.noise, self._rng("pixels", index))
        if index not in self._image_cache:
            image = render_scene(self.scene(index), self.noise, self._rng("pixels", index))
            image.flags.writeable = False
            self._image_cache[index] = image
        return self._image_cache[index]

    def description(self, index: int, epoch: int = 0) -> SceneDescription:
        """What the captions of sample `index` say in `epoch`: faithful unless caption_noise is set."""
        _check_int("epoch", epoch, 0)
        description = describe(self.scene(index))
        if self.caption_noise is None or not self.caption_noise.active:
            return description
        return self.caption_noise.apply(description, self._rng("caption_noise", index, epoch))

    def captions(
        self, index: int, captions: str | Sequence[str] = "short", epoch: int = 0
    ) -> tuple[str, ...]:
        """One caption per requested mode ("short", "detailed", "sentences"; "all" = short and detailed)."""
        modes = caption_modes(captions)
        description = self.description(index, epoch)
        detailed = detailed_caption(description)
        result = []
        for mode in modes:
            if mode == "short":
                result.append(short_caption(description))
            elif mode == "detailed":
                result.append(detailed)
            else:
                result.append(sample_sentences(detailed, self._rng("sentences", index, epoch)))
        return tuple(result)
