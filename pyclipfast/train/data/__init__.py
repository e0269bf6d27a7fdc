"""Data for the reference CLIP trainer.

    scenes       structured scenes (Scene, SceneObject), vocabulary, sampling
    render       Scene → (H, W, 3) uint8 image
    captions     short / detailed captions, misalignment (CaptionNoise), sentence sampling
    synthetic    SyntheticScenes: one deterministic split of the procedural dataset
"""

from .captions import (
    ATTRIBUTES,
    CaptionNoise,
    ObjectDescription,
    SceneDescription,
    describe,
    detailed_caption,
    relation_sentence,
    sample_sentences,
    short_caption,
    split_sentences,
)
from .render import render_scene, shape_mask
from .scenes import COLOUR_NAMES, COLOURS, RELATIONS, REGIONS, SHAPES, SIZES, Scene, SceneObject, sample_scene
from .synthetic import CAPTION_MODES, DEFAULT_SPLIT_SIZES, SPLITS, SyntheticScenes

__all__ = [
    "ATTRIBUTES",
    "CAPTION_MODES",
    "COLOURS",
    "COLOUR_NAMES",
    "CaptionNoise",
    "DEFAULT_SPLIT_SIZES",
    "ObjectDescription",
    "REGIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Scene",
    "SceneDescription",
    "SceneObject",
    "SyntheticScenes",
    "describe",
    "detailed_caption",
    "relation_sentence",
    "render_scene",
    "sample_scene",
    "sample_sentences",
    "shape_mask",
    "short_caption",
    "split_sentences",
]
