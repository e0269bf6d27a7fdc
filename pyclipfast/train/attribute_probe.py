"""Attribute probe: does the model bind each attribute of an object to the image?

For every val scene and every attribute, one object of the scene (drawn per scene) has that
attribute replaced in the caption by a value the scene does not show:

    colour    "a red circle and a blue square"  →  "a green circle and a blue square"
    shape     "a red circle and a blue square"  →  "a red star and a blue square"
    size      "A large red circle is on the left. …"  →  "A small red circle is on the left. …"
    position  "A large red circle is on the left. …"  →  "A large red circle is at the top. …"

Colour and shape are probed on the short caption, size and position on the detailed one (the
short caption does not name them). The model passes a record when it scores the image higher
with the true caption than with the altered one: accuracy per attribute, chance 0.5. This is the
measure of the misalignment sweep: omitting or perturbing an attribute in the training captions
should cost that attribute's accuracy and leave the others.

Metric names: attribute/colour, attribute/shape, attribute/size, attribute/position.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from .data import (
    SPLITS, SyntheticClipDataset, SyntheticScenes, collate_clip, describe, detailed_caption, short_caption,
)
from .data.captions import VOCABULARY, SceneDescription
from .evaluate import Embedder

Tokenizer = Callable[[list[str]], torch.Tensor]
PROBED_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")
_CAPTION = {"colour": short_caption, "shape": short_caption, "size": detailed_caption, "position": detailed_caption}


@dataclass(frozen=True)
class AttributeRecord:
    """One probe item: the val image, its true caption, the caption with one attribute altered."""

    index: int
    attribute: str
    caption: str
    negative: str


def alter_attribute(description: SceneDescription, attribute: str, rng: np.random.Generator) -> SceneDescription:
    """`description` with one object's `attribute` set to a value no object of the scene has.

    The object is drawn from `rng`, then the value among the absent ones (a size present on every
    object has no absent value: then the object's size is flipped, which still contradicts the image).
    """
    which = int(rng.integers(len(description.objects)))
    present = {getattr(o, attribute) for o in description.objects}
    absent = [v for v in VOCABULARY[attribute] if v not in present]
    if not absent:
        current = getattr(description.objects[which], attribute)
        absent = [v for v in VOCABULARY[attribute] if v != current]
    objects = list(description.objects)
    objects[which] = replace(objects[which], **{attribute: absent[int(rng.integers(len(absent)))]})
    return replace(description, objects=tuple(objects))


def attribute_records(scenes: SyntheticScenes) -> list[AttributeRecord]:
    """One record per (scene, attribute) of `scenes`, deterministic in (seed, split, index)."""
    records = []
    for index in range(len(scenes)):
        description = describe(scenes.scene(index))
        for k, attribute in enumerate(PROBED_ATTRIBUTES):
            rng = np.random.default_rng([scenes.seed, SPLITS.index(scenes.split), index, k])
            caption = _CAPTION[attribute]
            negative = caption(alter_attribute(description, attribute, rng))
            records.append(AttributeRecord(index, attribute, caption(description), negative))
    return records


class AttributeProbe:
    """Accuracy per attribute of `scenes` (usually the val split); inputs prepared once."""

    def __init__(self, scenes: SyntheticScenes, tokenizer: Tokenizer) -> None:
        self.images = collate_clip(list(SyntheticClipDataset(scenes))).images
        records = attribute_records(scenes)
        texts = list(dict.fromkeys(t for r in records for t in (r.caption, r.negative)))
        position = {text: i for i, text in enumerate(texts)}
        self.tokens = tokenizer(texts)
        self.image_index = torch.tensor([r.index for r in records])
        self.true = torch.tensor([position[r.caption] for r in records])
        self.negative = torch.tensor([position[r.negative] for r in records])
        self.attributes = [r.attribute for r in records]

    def __call__(self, embed: Embedder) -> dict[str, float]:
        images = embed.images(self.images)[self.image_index.to(embed.device)]
        texts = embed.texts(self.tokens)
        true = (images * texts[self.true.to(texts.device)]).sum(-1)
        negative = (images * texts[self.negative.to(texts.device)]).sum(-1)
        wins = (true > negative).cpu()
        metrics = {}
        for attribute in PROBED_ATTRIBUTES:
            mask = torch.tensor([a == attribute for a in self.attributes])
            metrics[f"attribute/{attribute}"] = wins[mask].float().mean().item()
        return metrics
