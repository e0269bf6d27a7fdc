"""Captions of synthetic scenes, with controlled misalignment and sentence sampling.

Captions are a pure function of a SceneDescription: what the caption *claims* about each
object. `describe` gives the faithful description of a Scene; `CaptionNoise` turns it into a
misaligned one by omitting attributes (selection bias: the caption does not mention them) or by
altering them (perturbation bias: the caption says "blue" where the object is red).

    short    alt-text naming colour and shape only: "a red circle and a blue square".
    detailed one sentence per object stating size, colour, shape and position, plus one for the
             relation: "A large red circle is on the left. A small blue square is in the centre.
             The red circle is left of the blue square."
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .scenes import COLOUR_NAMES, REGIONS, RELATIONS, SHAPES, SIZES, Scene

OBJECT_ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")
ATTRIBUTES: tuple[str, ...] = OBJECT_ATTRIBUTES + ("relation",)
VOCABULARY: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "size": SIZES,
    "position": REGIONS,
    "relation": RELATIONS,
}
REGION_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class ObjectDescription:
    """What a caption says about one object; None means the caption does not mention it."""

    colour: str | None
    shape: str | None
    size: str | None
    position: str | None


@dataclass(frozen=True)
class SceneDescription:
    """What a caption says about a scene; `relation` relates objects[0] to objects[1]."""

    objects: tuple[ObjectDescription, ...]
    relation: str | None


def describe(scene: Scene) -> SceneDescription:
    """The faithful description of `scene`: every attribute as drawn."""
    objects = tuple(ObjectDescription(o.colour, o.shape, o.size, o.region) for o in scene.objects)
    return SceneDescription(objects=objects, relation=scene.relation)


def _as_description(scene: Scene | SceneDescription) -> SceneDescription:
    """Accept either a Scene (described faithfully) or a SceneDescription."""
    if isinstance(scene, Scene):
        return describe(scene)
    if isinstance(scene, SceneDescription):
        return scene
    raise TypeError(f"scene must be a Scene or SceneDescription, got {type(scene).__name__}")


def _with_article(phrase: str) -> str:
    """Prefix "a" or "an"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(obj: ObjectDescription, with_size: bool) -> str:
    """"large red circle", "red object", "circle"... without article; omitted parts are left out."""
    words = [obj.size if with_size else None, obj.colour, obj.shape or "object"]
    return " ".join(w for w in words if w is not None)


def short_caption(scene: Scene | SceneDescription) -> str:
    """Alt-text-like caption naming colour and shape of each object: "a red circle and a blue square"."""
    phrases = [_with_article(noun_phrase(o, with_size=False)) for o in _as_description(scene).objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def object_sentence(obj: ObjectDescription) -> str:
    """"A large red circle is on the left." or, without position, "There is a large red circle."."""
    phrase = _with_article(noun_phrase(obj, with_size=True))
    if obj.position is None:
        return f"There is {phrase}."
    return f"{phrase[0].upper()}{phrase[1:]} is {REGION_PHRASES[obj.position]}."


def relation_sentence(scene: Scene | SceneDescription) -> str:
    """"The red circle is left of the blue square." for a description with a relation."""
    description = _as_description(scene)
    if description.relation is None or len(description.objects) != 2:
        raise ValueError("relation_sentence needs a two-object description with a relation")
    first, second = (noun_phrase(o, with_size=False) for o in description.objects)
    return f"The {first} is {description.relation} the {second}."


def detailed_caption(scene: Scene | SceneDescription) -> str:
    """Every mentioned attribute, one sentence per object, plus the relation sentence if any."""
    description = _as_description(scene)
    sentences = [object_sentence(o) for o in description.objects]
    if description.relation is not None:
        sentences.append(relation_sentence(description))
    return " ".join(sentences)


def _check_rates(name: str, rates: Mapping[str, float]) -> None:
    """Raise unless `rates` maps known attribute names to probabilities."""
    if not isinstance(rates, Mapping):
        raise TypeError(f"{name} must be a mapping from attribute to rate, got {type(rates).__name__}")
    for attribute, rate in rates.items():
        if attribute not in ATTRIBUTES:
            raise ValueError(f"{name}: unknown attribute {attribute!r}, expected one of {ATTRIBUTES}")
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name}[{attribute!r}] must be a number in [0, 1], got {rate!r}")


def _alter(value: str, vocabulary: tuple[str, ...], draw: float) -> str:
    """Another value of `vocabulary`, chosen uniformly by `draw` in [0, 1)."""
    offset = 1 + int(draw * (len(vocabulary) - 1))
    return vocabulary[(vocabulary.index(value) + offset) % len(vocabulary)]


@dataclass(frozen=True)
class CaptionNoise:
    """Misalignment between image and caption, per attribute.

    omit:    {attribute: rate}; each object's attribute (or the scene's relation) is left out of
             the caption with this probability.
    perturb: {attribute: rate}; it is replaced by a different value with this probability.
    Attributes: "colour", "shape", "size", "position", "relation". The decisions are made once
    per description, so the short and detailed captions built from it agree with each other.
    The number of random draws does not depend on the rates, so with one generator state a
    larger rate omits or perturbs a superset.
    """

    omit: Mapping[str, float] = field(default_factory=dict)
    perturb: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_rates("omit", self.omit)
        _check_rates("perturb", self.perturb)

    @property
    def active(self) -> bool:
        """Whether any rate is positive."""
        return any(rate > 0 for rate in (*self.omit.values(), *self.perturb.values()))

    def _decide(self, attribute: str, value: str | None, draws: np.ndarray) -> str | None:
        """Apply perturbation then omission to one value, given three uniform draws."""
        if value is None:
            return None
        if draws[1] < self.perturb.get(attribute, 0.0):
            value = _alter(value, VOCABULARY[attribute], draws[2])
        if draws[0] < self.omit.get(attribute, 0.0):
            return None
        return value

    def apply(self, scene: Scene | SceneDescription, rng: np.random.Generator) -> SceneDescription:
        """A misaligned copy of the description of `scene`, drawn from `rng`."""
        description = _as_description(scene)
        draws = rng.random((len(description.objects) + 1, len(OBJECT_ATTRIBUTES), 3))
        objects = tuple(
            ObjectDescription(
                *(self._decide(a, getattr(obj, a), draws[i, k]) for k, a in enumerate(OBJECT_ATTRIBUTES))
            )
            for i, obj in enumerate(description.objects)
        )
        relation = self._decide("relation", description.relation, draws[-1, 0])
        return replace(description, objects=objects, relation=relation)


def split_sentences(text: str) -> list[str]:
    """Split after ".", "!" or "?" followed by whitespace; a text without them is one sentence."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _coin_flips(count: int, generator: torch.Generator | np.random.Generator) -> list[bool]:
    """`count` fair coin flips from a torch or numpy generator."""
    if isinstance(generator, np.random.Generator):
        return (generator.random(count) < 0.5).tolist()
    if isinstance(generator, torch.Generator):
        return (torch.rand(count, generator=generator) < 0.5).tolist()
    raise TypeError(f"generator must be a torch.Generator or numpy Generator, got {type(generator).__name__}")


def sample_sentences(caption: str, generator: torch.Generator | np.random.Generator) -> str:
    """A uniformly random non-empty subset of the sentences of `caption`, in their original order."""
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption must be a non-empty string, got {caption!r}")
    sentences = split_sentences(caption)
    keep = _coin_flips(len(sentences), generator)
    while not any(keep):
        keep = _coin_flips(len(sentences), generator)
    return " ".join(s for s, k in zip(sentences, keep) if k)
