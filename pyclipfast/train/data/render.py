"""Rasterise a Scene into an RGB uint8 array: flat objects on a grey, lightly noised background.

Each (shape, radius) mask is computed once by sampling pixel centres and cached, so rendering a
scene is a background fill plus one masked assignment per object.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .scenes import COLOURS, SHAPES, Scene

BACKGROUND = 128

Point = tuple[float, float]


def _regular_polygon(radius: float, corners: int, start_degrees: float) -> list[Point]:
    """Corners of a regular polygon centred on the origin with circumradius `radius` (y down)."""
    angles = [math.radians(start_degrees + 360.0 * k / corners) for k in range(corners)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _star(radius: float) -> list[Point]:
    """A five-pointed star pointing up, inner radius 0.45 of the outer one."""
    outer = _regular_polygon(radius, 5, -90.0)
    inner = _regular_polygon(0.45 * radius, 5, -54.0)
    return [point for pair in zip(outer, inner) for point in pair]


def _cross(radius: float) -> list[Point]:
    """A plus sign with arms of half-width 0.35·radius."""
    a, r = 0.35 * radius, radius
    return [
        (-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a),
        (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a),
    ]


def _polygon(shape: str, radius: float) -> list[Point]:
    """Vertices of a polygonal shape with circumradius about `radius`."""
    if shape == "square":
        return _regular_polygon(0.8 * math.sqrt(2.0) * radius, 4, 45.0)
    if shape == "diamond":
        return _regular_polygon(radius, 4, -90.0)
    if shape == "triangle":
        # Shifted down by radius/4 so that its bounding box is centred.
        return [(x, y + 0.25 * radius) for x, y in _regular_polygon(radius, 3, -90.0)]
    if shape == "hexagon":
        return _regular_polygon(radius, 6, 0.0)
    if shape == "star":
        return _star(radius)
    return _cross(radius)


def _inside_polygon(x: np.ndarray, y: np.ndarray, vertices: list[Point]) -> np.ndarray:
    """Even-odd rule: which points (x, y) lie inside the polygon."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, vertices[1:] + vertices[:1]):
        if y1 == y2:
            continue
        spans = (y1 > y) != (y2 > y)
        inside ^= spans & (x < x1 + (x2 - x1) * (y - y1) / (y2 - y1))
    return inside


@lru_cache(maxsize=None)
def shape_mask(shape: str, radius: int) -> np.ndarray:
    """Boolean mask of `shape`, shape (2·radius + 1, 2·radius + 1), centred on the middle pixel."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    y, x = np.meshgrid(offsets, offsets, indexing="ij")
    outer = radius + 0.5
    if shape in ("circle", "ring"):
        distance2 = x * x + y * y
        mask = distance2 <= outer * outer
        if shape == "ring":
            mask &= distance2 > (0.5 * outer) ** 2
    else:
        mask = _inside_polygon(x, y, _polygon(shape, outer))
    mask.flags.writeable = False
    return mask


def render_scene(scene: Scene, noise: int = 8, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw `scene` as an (H, W, 3) uint8 array.

    The background is grey (128) plus uniform integer noise in [-noise, noise], the same on the
    three channels, drawn from `rng` (required when noise > 0). Objects are flat colours.
    """
    if not isinstance(noise, int) or not 0 <= noise <= BACKGROUND:
        raise ValueError(f"noise must be an int in [0, {BACKGROUND}], got {noise!r}")
    size = scene.image_size
    if noise == 0:
        grey = np.full((size, size), BACKGROUND, dtype=np.uint8)
    elif rng is None:
        raise ValueError("rng is required when noise > 0")
    else:
        grey = rng.integers(BACKGROUND - noise, BACKGROUND + noise + 1, size=(size, size), dtype=np.uint8)
    image = np.repeat(grey[:, :, None], 3, axis=2)
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.radius)
        top, left = obj.y - obj.radius, obj.x - obj.radius
        patch = image[top : top + mask.shape[0], left : left + mask.shape[1]]
        patch[mask] = COLOURS[obj.colour]
    return image
