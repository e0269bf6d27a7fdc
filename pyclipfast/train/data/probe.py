"""Compositional probe in the style of ARO / SugarCrepe over two-object val scenes.

For each two-object scene the true caption is its relation sentence, "The red circle is left of
the blue square.", and each hard negative changes it in one controlled way:

    swap_attributes  colours of the two objects exchanged: "The blue circle is left of the red square."
    swap_relation    objects exchanged in the relation:     "The blue square is left of the red circle."
    replace_object   one shape replaced by a shape absent from the scene:
                                                            "The red star is left of the blue square."

The two swaps keep the bag of words, so a bag-of-words text encoder cannot tell them apart.
A model passes a record when it scores (image, caption) above (image, negative).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .captions import SceneDescription, describe, relation_sentence
from .scenes import SHAPES
from .synthetic import SyntheticScenes, sample_rng

PROBE_KINDS: tuple[str, ...] = ("swap_attributes", "swap_relation", "replace_object")


@dataclass(frozen=True)
class ProbeRecord:
    """One probe item: the image index, its true caption, a hard negative and the negative's kind."""

    index: int
    caption: str
    negative: str
    kind: str


def swap_attributes(description: SceneDescription) -> SceneDescription:
    """Exchange the colours of the two objects."""
    first, second = description.objects
    objects = (replace(first, colour=second.colour), replace(second, colour=first.colour))
    return replace(description, objects=objects)


def swap_relation(description: SceneDescription) -> SceneDescription:
    """Exchange the two objects, keeping the relation word."""
    first, second = description.objects
    return replace(description, objects=(second, first))


def replace_object(description: SceneDescription, which: int, shape: str) -> SceneDescription:
    """Replace the shape of object `which` by `shape`."""
    objects = list(description.objects)
    objects[which] = replace(objects[which], shape=shape)
    return replace(description, objects=tuple(objects))


def _negative(
    scenes: SyntheticScenes, index: int, description: SceneDescription, kind: str
) -> SceneDescription:
    """The hard negative of `kind`; replace_object draws its object and shape from the probe stream."""
    if kind == "swap_attributes":
        return swap_attributes(description)
    if kind == "swap_relation":
        return swap_relation(description)
    rng = sample_rng("probe", scenes.seed, scenes.split, index)
    absent = [s for s in SHAPES if s not in {o.shape for o in description.objects}]
    return replace_object(description, int(rng.integers(2)), absent[int(rng.integers(len(absent)))])


def compositional_probe(scenes: SyntheticScenes, kinds: Sequence[str] = PROBE_KINDS) -> list[ProbeRecord]:
    """Records for every two-object scene of `scenes` (usually the val split), scene by scene.

    Deterministic: the same split and seed always give the same records.
    """
    if isinstance(kinds, str) or not kinds or any(k not in PROBE_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty sequence of {PROBE_KINDS}, got {kinds!r}")
    records = []
    for index in range(len(scenes)):
        scene = scenes.scene(index)
        if scene.relation is None:
            continue
        description = describe(scene)
        caption = relation_sentence(description)
        for kind in kinds:
            negative = relation_sentence(_negative(scenes, index, description, kind))
            records.append(ProbeRecord(index, caption, negative, kind))
    return records
