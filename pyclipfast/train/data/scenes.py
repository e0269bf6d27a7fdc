"""Structured scenes of the synthetic dataset: vocabulary, dataclasses and sampling.

A scene is laid out on a 3×3 grid of cells. Every object sits inside its own cell (so objects
never overlap), and the objects of one scene have distinct colours and distinct shapes (so a
caption such as "the red circle" always names exactly one object). A scene with two objects has
a spatial relation between them: both lie in one row ("left of" / "right of") or in one column
("above" / "below"), which makes the relation unambiguous.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
SIZES: tuple[str, ...] = ("small", "large")
# Row-major over the 3×3 grid: REGIONS[3 * row + col].
REGIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

GRID = 3
MIN_IMAGE_SIZE = 24
MAX_OBJECTS = len(COLOURS)
# Object radius as a fraction of the cell side, per size.
_RADIUS_FRACTION = {"small": 0.24, "large": 0.36}


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes and where it is drawn (centre pixel and radius)."""

    colour: str
    shape: str
    size: str
    region: str
    x: int
    y: int
    radius: int


@dataclass(frozen=True)
class Scene:
    """A rendered-to-be scene of `image_size`×`image_size` pixels.

    `relation` is None unless the scene has exactly two objects; then it reads
    "objects[0] <relation> objects[1]", e.g. "left of".
    """

    image_size: int
    objects: tuple[SceneObject, ...]
    relation: str | None

    def key(self) -> int:
        """A stable (process-independent) 64-bit hash of everything that determines the drawing."""
        text = repr((self.image_size, self.objects, self.relation)).encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def object_radius(size: str, image_size: int) -> int:
    """Radius in pixels of an object of `size` ("small" or "large") in an image of `image_size`."""
    if size not in _RADIUS_FRACTION:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return max(1, round(_RADIUS_FRACTION[size] * image_size / GRID))


def check_image_size(image_size: int) -> None:
    """Raise unless `image_size` is an int of at least MIN_IMAGE_SIZE."""
    if not isinstance(image_size, int) or isinstance(image_size, bool):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")


def _first(count: int, draws: np.ndarray) -> list[int]:
    """`count` distinct indices of range(len(draws)): a uniformly random arrangement."""
    return np.argsort(draws)[:count].tolist()


def _cells_for(num_objects: int, relation: str | None, draws: np.ndarray) -> list[tuple[int, int]]:
    """Distinct (row, col) cells; with a relation, two cells in one row or column that satisfy it.

    Uses draws[0] and draws[1 : 1 + GRID * GRID].
    """
    if relation is None:
        return [divmod(c, GRID) for c in _first(num_objects, draws[1 : 1 + GRID * GRID])]
    line = int(draws[0] * GRID)
    first, second = sorted(_first(2, draws[1 : 1 + GRID]))
    if relation in ("right of", "below"):
        first, second = second, first
    if relation in ("left of", "right of"):
        return [(line, first), (line, second)]
    return [(first, line), (second, line)]


def _coordinate(cell_index: int, radius: int, image_size: int, draw: float) -> int:
    """A uniformly random pixel coordinate (by `draw` in [0, 1)) keeping a disc of `radius` in the cell."""
    side = image_size / GRID
    low = math.ceil(cell_index * side + radius)
    high = math.floor((cell_index + 1) * side - 1 - radius)
    return low + int(draw * (high - low + 1))


def sample_scene(rng: np.random.Generator, image_size: int, num_objects: int) -> Scene:
    """Draw a scene with `num_objects` objects from `rng` (one call to rng.random).

    Colours and shapes are distinct within the scene; sizes are independent; cells are distinct.
    """
    check_image_size(image_size)
    if not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in [1, {MAX_OBJECTS}], got {num_objects}")
    draws = rng.random(1 + (1 + GRID * GRID) + len(COLOUR_NAMES) + len(SHAPES) + 3 * num_objects)
    relation = RELATIONS[int(draws[0] * len(RELATIONS))] if num_objects == 2 else None
    cells = _cells_for(num_objects, relation, draws[1:])
    colour_draws = draws[2 + GRID * GRID :]
    colours = _first(num_objects, colour_draws[: len(COLOUR_NAMES)])
    shape_draws = colour_draws[len(COLOUR_NAMES) :]
    shapes = _first(num_objects, shape_draws[: len(SHAPES)])
    object_draws = shape_draws[len(SHAPES) :].reshape(num_objects, 3).tolist()
    objects = []
    for (row, col), colour, shape, (size_draw, x_draw, y_draw) in zip(cells, colours, shapes, object_draws):
        size = SIZES[int(size_draw * len(SIZES))]
        radius = object_radius(size, image_size)
        objects.append(
            SceneObject(
                colour=COLOUR_NAMES[colour],
                shape=SHAPES[shape],
                size=size,
                region=REGIONS[GRID * row + col],
                x=_coordinate(col, radius, image_size, x_draw),
                y=_coordinate(row, radius, image_size, y_draw),
                radius=radius,
            )
        )
    return Scene(image_size=image_size, objects=tuple(objects), relation=relation)
