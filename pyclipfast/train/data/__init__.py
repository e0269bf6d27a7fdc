"""Data for the reference CLIP trainer.

    scenes       structured scenes (Scene, SceneObject), vocabulary, sampling
    render       Scene → (H, W, 3) uint8 image
    captions     short / detailed captions, misalignment (CaptionNoise), sentence sampling
    synthetic    SyntheticScenes: one deterministic split of the procedural dataset
    dataset      SyntheticClipDataset + collate_clip: normalised tensors, captions, ids
    composition  CLIP-C semantic compositions (batch transform)
    zeroshot     zero-shot classes, prompts and labels over the synthetic data
    probe        ARO/SugarCrepe-style compositional probe records
    files        CsvCaptions (open_clip CSV) and WebDatasetCaptions (tar shards) readers
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
from .files import CsvCaptions, SkipCounter, WebDatasetCaptions, drop_unreadable, expand_shards, load_rgb
from .probe import PROBE_KINDS, ProbeRecord, compositional_probe
from .render import render_scene, shape_mask
from .scenes import COLOUR_NAMES, COLOURS, RELATIONS, REGIONS, SHAPES, SIZES, Scene, SceneObject, sample_scene
from .synthetic import CAPTION_MODES, DEFAULT_SPLIT_SIZES, SPLITS, SyntheticScenes
from .transforms import CLIP_MEAN, CLIP_STD, ResizeCropNormalize, ToNormalizedTensor
from .zeroshot import (
    ZERO_SHOT_TASKS,
    ZERO_SHOT_TEMPLATES,
    zero_shot_classnames,
    zero_shot_label,
    zero_shot_prompts,
    zero_shot_samples,
)

__all__ = [
    "ATTRIBUTES",
    "CAPTION_MODES",
    "CLIP_MEAN",
    "CLIP_STD",
    "COLOURS",
    "COLOUR_NAMES",
    "CaptionNoise",
    "ClipBatch",
    "CsvCaptions",
    "DEFAULT_SPLIT_SIZES",
    "ObjectDescription",
    "PROBE_KINDS",
    "ProbeRecord",
    "ResizeCropNormalize",
    "REGIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Scene",
    "SceneDescription",
    "SceneObject",
    "SkipCounter",
    "SyntheticClipDataset",
    "SyntheticSample",
    "SyntheticScenes",
    "ToNormalizedTensor",
    "WebDatasetCaptions",
    "ZERO_SHOT_TASKS",
    "ZERO_SHOT_TEMPLATES",
    "collate_clip",
    "compose_pair",
    "compositional_probe",
    "describe",
    "drop_unreadable",
    "detailed_caption",
    "expand_shards",
    "load_rgb",
    "relation_sentence",
    "render_scene",
    "sample_scene",
    "sample_sentences",
    "semantic_compositions",
    "shape_mask",
    "short_caption",
    "split_sentences",
    "zero_shot_classnames",
    "zero_shot_label",
    "zero_shot_prompts",
    "zero_shot_samples",
]
