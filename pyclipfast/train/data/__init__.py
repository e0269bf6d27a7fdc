"""Data for the reference CLIP trainer.

    scenes       structured scenes (Scene, SceneObject), vocabulary, sampling
    render       Scene → (H, W, 3) uint8 image
    captions     short / detailed captions, misalignment (CaptionNoise), sentence sampling
    synthetic    SyntheticScenes: one deterministic split of the procedural dataset
    dataset      SyntheticClipDataset + collate_clip: normalised tensors, captions, ids
    composition  CLIP-C semantic compositions (batch transform)
    transforms   CLIP normalisation, uint8 → tensor, ResizeCropNormalize for real data
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
from .composition import compose_pair, semantic_compositions
from .dataset import ClipBatch, SyntheticClipDataset, SyntheticSample, collate_clip
from .render import render_scene, shape_mask
from .scenes import COLOUR_NAMES, COLOURS, RELATIONS, REGIONS, SHAPES, SIZES, Scene, SceneObject, sample_scene
from .synthetic import CAPTION_MODES, DEFAULT_SPLIT_SIZES, SPLITS, SyntheticScenes
from .transforms import CLIP_MEAN, CLIP_STD, ResizeCropNormalize, ToNormalizedTensor

__all__ = [
    "ATTRIBUTES",
    "CAPTION_MODES",
    "CLIP_MEAN",
    "CLIP_STD",
    "COLOURS",
    "COLOUR_NAMES",
    "CaptionNoise",
    "ClipBatch",
    "DEFAULT_SPLIT_SIZES",
    "ObjectDescription",
    "ResizeCropNormalize",
    "REGIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Scene",
    "SceneDescription",
    "SceneObject",
    "SyntheticClipDataset",
    "SyntheticSample",
    "SyntheticScenes",
    "ToNormalizedTensor",
    "collate_clip",
    "compose_pair",
    "describe",
    "detailed_caption",
    "relation_sentence",
    "render_scene",
    "sample_scene",
    "sample_sentences",
    "semantic_compositions",
    "shape_mask",
    "short_caption",
    "split_sentences",
]
