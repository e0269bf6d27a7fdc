"""Zero-shot classification over the synthetic data: class names, prompts and labels.

Tasks classify the object of single-object scenes (the only scenes where "the object" is
well defined): "shape" (8 classes), "colour" (8) or "colour_shape" (64, e.g. "red circle").
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

from .scenes import COLOUR_NAMES, SHAPES, Scene
from .synthetic import SyntheticScenes

ZERO_SHOT_TASKS: tuple[str, ...] = ("shape", "colour", "colour_shape")
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a {} on a grey background.",
    "a picture of a {}.",
)


def _check_task(task: str) -> None:
    """Raise unless `task` is one of ZERO_SHOT_TASKS."""
    if task not in ZERO_SHOT_TASKS:
        raise ValueError(f"task must be one of {ZERO_SHOT_TASKS}, got {task!r}")


def zero_shot_classnames(task: str) -> tuple[str, ...]:
    """Class names of `task`, in label order."""
    _check_task(task)
    if task == "shape":
        return SHAPES
    if task == "colour":
        return COLOUR_NAMES
    return tuple(f"{colour} {shape}" for colour, shape in product(COLOUR_NAMES, SHAPES))


def zero_shot_prompts(task: str, templates: Sequence[str] = ZERO_SHOT_TEMPLATES) -> list[list[str]]:
    """prompts[c][t]: template t filled with class name c (average the embeddings over t)."""
    if isinstance(templates, str) or not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be a non-empty sequence of strings with '{{}}', got {templates!r}")
    return [[template.format(name) for template in templates] for name in zero_shot_classnames(task)]


def zero_shot_label(scene: Scene, task: str) -> int:
    """The label of a single-object scene under `task`."""
    _check_task(task)
    if len(scene.objects) != 1:
        raise ValueError(f"zero-shot labels need a single-object scene, got {len(scene.objects)} objects")
    obj = scene.objects[0]
    if task == "shape":
        return SHAPES.index(obj.shape)
    if task == "colour":
        return COLOUR_NAMES.index(obj.colour)
    return COLOUR_NAMES.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)


def zero_shot_samples(scenes: SyntheticScenes, task: str) -> tuple[list[int], list[int]]:
    """(indices, labels) of the single-object samples of `scenes` (usually the val split)."""
    _check_task(task)
    indices = [i for i in range(len(scenes)) if len(scenes.scene(i).objects) == 1]
    return indices, [zero_shot_label(scenes.scene(i), task) for i in indices]
