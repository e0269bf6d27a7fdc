"""Tests of pyclipfast.train.data: synthetic scenes, captions, CLIP-C, probes and file readers."""

import io
import json
import logging
import re
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from pyclipfast.train.data import (
    CLIP_MEAN,
    CLIP_STD,
    COLOUR_NAMES,
    COLOURS,
    PROBE_KINDS,
    REGIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    CaptionNoise,
    CsvCaptions,
    ResizeCropNormalize,
    Scene,
    SceneObject,
    SyntheticClipDataset,
    SyntheticScenes,
    ToNormalizedTensor,
    WebDatasetCaptions,
    collate_clip,
    compose_pair,
    compositional_probe,
    describe,
    drop_unreadable,
    detailed_caption,
    render_scene,
    sample_sentences,
    semantic_compositions,
    shape_mask,
    short_caption,
    split_sentences,
    zero_shot_classnames,
    zero_shot_label,
    zero_shot_prompts,
    zero_shot_samples,
)
from pyclipfast.train.data.captions import REGION_PHRASES
from pyclipfast.train.data.scenes import GRID
from pyclipfast.train.data.synthetic import STREAMS, VAL_EVERY, sample_rng

# ---------------------------------------------------------------------------------------------
# helpers


def words(text):
    return re.findall(r"[a-z]+", text.lower())


def mentions(text, word):
    """Whether `word` (possibly several words) occurs in `text` as whole words."""
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


def colours_in(text):
    return [c for c in COLOUR_NAMES if mentions(text, c)]


def shapes_in(text):
    return [s for s in SHAPES if mentions(text, s)]


def window(obj):
    """The (rows, cols) slices of an object's mask in the image."""
    rows = slice(obj.y - obj.radius, obj.y + obj.radius + 1)
    cols = slice(obj.x - obj.radius, obj.x + obj.radius + 1)
    return rows, cols


def relation_text(first, relation, second):
    return f"The {first.colour} {first.shape} is {relation} the {second.colour} {second.shape}."


def generator(seed):
    return torch.Generator().manual_seed(seed)


def two_object_scene():
    return Scene(
        image_size=64,
        objects=(
            SceneObject("red", "circle", "large", "left", 10, 32, 8),
            SceneObject("orange", "square", "small", "right", 53, 30, 5),
        ),
        relation="left of",
    )


# ---------------------------------------------------------------------------------------------
# scenes and rendering


def test_same_seed_gives_identical_images_and_captions_in_any_order():
    a = SyntheticScenes("train", 200, seed=3)
    b = SyntheticScenes("train", 200, seed=3)
    for index in [5, 199, 0, 77, 5]:
        np.testing.assert_array_equal(a.image(index), b.image(index))
    for index in reversed(range(0, 200, 13)):
        assert b.scene(index) == a.scene(index)
        assert b.captions(index, "all") == a.captions(index, "all")
        assert b.image(index).tobytes() == a.image(index).tobytes()


def test_different_seeds_give_different_samples():
    a = SyntheticScenes("train", 50, seed=0)
    b = SyntheticScenes("train", 50, seed=1)
    same_images = sum(np.array_equal(a.image(i), b.image(i)) for i in range(50))
    same_scenes = sum(a.scene(i) == b.scene(i) for i in range(50))
    assert same_images == 0
    assert same_scenes <= 1


def test_splits_are_disjoint_and_marked_by_scene_key():
    train = SyntheticScenes("train", 3000, noise=0)
    val = SyntheticScenes("val", 500, noise=0)
    train_keys = {train.scene(i).key() for i in range(len(train))}
    val_keys = {val.scene(i).key() for i in range(len(val))}
    assert all(k % VAL_EVERY != 0 for k in train_keys)
    assert all(k % VAL_EVERY == 0 for k in val_keys)
    assert not train_keys & val_keys
    train_pixels = {train.image(i).tobytes() for i in range(len(train))}
    assert not any(val.image(i).tobytes() in train_pixels for i in range(len(val)))


def test_random_streams_are_distinct_per_purpose_split_index_and_epoch():
    keys = [(p, s, i, e) for p in STREAMS for s in ("train", "val") for i in (0, 1) for e in (0, 1)]
    first_draws = {tuple(sample_rng(p, 0, s, i, e).random(2)) for p, s, i, e in keys}
    assert len(first_draws) == len(keys)
    assert sample_rng("scene", 0, "val", 1, 1).random() == sample_rng("scene", 0, "val", 1, 1).random()
    assert sample_rng("scene", 0, "val", 1).random() != sample_rng("scene", 1, "val", 1).random()


def test_default_split_sizes():
    assert len(SyntheticScenes("train")) == 20_000
    assert len(SyntheticScenes("val")) == 1_000


def cell_at(x, y, image_size):
    side = image_size / GRID
    return int(y // side), int(x // side)


def cell_of(obj, image_size):
    return cell_at(obj.x, obj.y, image_size)


@pytest.mark.parametrize("image_size", [24, 64, 97])
def test_scene_invariants(image_size):
    scenes = SyntheticScenes("train", 300, image_size=image_size, seed=1)
    counts = Counter()
    for index in range(len(scenes)):
        scene = scenes.scene(index)
        objects = scene.objects
        counts[len(objects)] += 1
        assert len({o.colour for o in objects}) == len(objects)
        assert len({o.shape for o in objects}) == len(objects)
        cells = set()
        for obj in objects:
            assert 0 <= obj.x - obj.radius and obj.x + obj.radius < image_size
            assert 0 <= obj.y - obj.radius and obj.y + obj.radius < image_size
            top_left = cell_at(obj.x - obj.radius, obj.y - obj.radius, image_size)
            bottom_right = cell_at(obj.x + obj.radius, obj.y + obj.radius, image_size)
            assert top_left == bottom_right == cell_of(obj, image_size), "object leaves its cell"
            row, col = cell_of(obj, image_size)
            assert REGIONS[GRID * row + col] == obj.region
            cells.add((row, col))
        assert len(cells) == len(objects)
        assert (scene.relation is not None) == (len(objects) == 2)
        if scene.relation is not None:
            first, second = objects
            same_row = cell_of(first, image_size)[0] == cell_of(second, image_size)[0]
            same_col = cell_of(first, image_size)[1] == cell_of(second, image_size)[1]
            expected = {
                "left of": same_row and first.x < second.x,
                "right of": same_row and first.x > second.x,
                "above": same_col and first.y < second.y,
                "below": same_col and first.y > second.y,
            }
            assert expected[scene.relation]
    assert set(counts) == {1, 2, 3}


def test_object_count_range_is_respected():
    scenes = SyntheticScenes("val", 100, min_objects=2, max_objects=2)
    assert all(len(scenes.scene(i).objects) == 2 for i in range(100))
    relations = Counter(scenes.scene(i).relation for i in range(100))
    assert set(relations) == set(RELATIONS)


def test_rendered_pixels_match_the_scene():
    scenes = SyntheticScenes("train", 60, noise=6)
    for index in range(len(scenes)):
        image = scenes.image(index)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        covered = np.zeros((64, 64), dtype=bool)
        for obj in scenes.scene(index).objects:
            mask = shape_mask(obj.shape, obj.radius)
            assert (image[window(obj)][mask] == COLOURS[obj.colour]).all()
            covered[window(obj)] |= mask
        background = image[~covered]
        assert (background[:, 0] == background[:, 1]).all() and (background[:, 1] == background[:, 2]).all()
        assert background.min() >= 128 - 6 and background.max() <= 128 + 6
    assert scenes.image(0).std() > 0


def test_noise_zero_gives_plain_background_and_needs_no_rng():
    scene = SyntheticScenes("train", 5).scene(2)
    image = render_scene(scene, noise=0)
    covered = np.zeros((64, 64), dtype=bool)
    for obj in scene.objects:
        covered[window(obj)] |= shape_mask(obj.shape, obj.radius)
    assert (image[~covered] == 128).all()
    with pytest.raises(ValueError, match="rng"):
        render_scene(scene, noise=4)


@pytest.mark.parametrize("radius", [3, 5, 8])
def test_shape_masks_are_distinct_and_centred(radius):
    masks = {shape: shape_mask(shape, radius) for shape in SHAPES}
    assert len({m.tobytes() for m in masks.values()}) == len(SHAPES)
    for shape, mask in masks.items():
        assert mask.shape == (2 * radius + 1, 2 * radius + 1)
        rows, cols = np.nonzero(mask)
        assert abs(cols.mean() - radius) < 0.5, shape
        assert abs(rows.mean() - radius) < 0.35 * radius, shape
        assert mask.sum() > 0.3 * mask.size, shape
    assert masks["circle"][radius, radius] and not masks["ring"][radius, radius]


def test_image_cache_returns_the_same_pixels_read_only():
    cached = SyntheticScenes("train", 20, cache_images=True)
    plain = SyntheticScenes("train", 20)
    first = cached.image(7)
    second = cached.image(7)
    np.testing.assert_array_equal(first, plain.image(7))
    np.testing.assert_array_equal(second, plain.image(7))
    with pytest.raises(ValueError):
        second[0, 0, 0] = 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"split": "test"}, ValueError, "split"),
        ({"size": 0}, ValueError, "size"),
        ({"size": 2.5}, TypeError, "size"),
        ({"seed": -1}, ValueError, "seed"),
        ({"image_size": 16}, ValueError, "image_size"),
        ({"image_size": 64.0}, TypeError, "image_size"),
        ({"max_objects": 9}, ValueError, "max_objects"),
        ({"min_objects": 3, "max_objects": 2}, ValueError, "min_objects"),
        ({"noise": -1}, ValueError, "noise"),
        ({"caption_noise": {"colour": 0.5}}, TypeError, "caption_noise"),
    ],
)
def test_synthetic_scenes_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SyntheticScenes(**kwargs)


# ---------------------------------------------------------------------------------------------
# captions


def test_short_and_detailed_caption_text():
    scene = two_object_scene()
    assert short_caption(scene) == "a red circle and an orange square"
    assert detailed_caption(scene) == (
        "A large red circle is on the left. A small orange square is on the right. "
        "The red circle is left of the orange square."
    )
    three = Scene(64, scene.objects + (SceneObject("blue", "star", "small", "centre", 32, 32, 5),), None)
    assert short_caption(three) == "a red circle, an orange square and a blue star"


def test_detailed_caption_mentions_every_attribute_and_relation():
    scenes = SyntheticScenes("val", 200)
    for index in range(len(scenes)):
        scene = scenes.scene(index)
        sentences = split_sentences(scenes.captions(index, "detailed")[0])
        assert len(sentences) == len(scene.objects) + (scene.relation is not None)
        for obj, sentence in zip(scene.objects, sentences):
            for word in (obj.colour, obj.shape, obj.size):
                assert mentions(sentence, word), (word, sentence)
            assert REGION_PHRASES[obj.region] in sentence
        if scene.relation is not None:
            first, second = scene.objects
            assert sentences[-1] == relation_text(first, scene.relation, second)
        short = scenes.captions(index, "short")[0]
        assert colours_in(short) == sorted({o.colour for o in scene.objects}, key=COLOUR_NAMES.index)
        assert not any(mentions(short, size) for size in SIZES)


def omitted_fraction(scenes, attribute_words, index_range):
    missing = 0
    for index in index_range:
        caption = scenes.captions(index, "detailed")[0]
        missing += not any(mentions(caption, w) for w in attribute_words(scenes.scene(index).objects[0]))
    return missing / len(index_range)


@pytest.mark.parametrize(
    "attribute, attribute_words",
    [
        ("colour", lambda o: [o.colour]),
        ("shape", lambda o: [o.shape]),
        ("size", lambda o: [o.size]),
        ("position", lambda o: [REGION_PHRASES[o.region]]),
    ],
)
@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_omission_removes_the_attribute_at_the_requested_rate(attribute, attribute_words, rate):
    scenes = SyntheticScenes(
        "train", 400, min_objects=1, max_objects=1, caption_noise=CaptionNoise(omit={attribute: rate})
    )
    fraction = omitted_fraction(scenes, attribute_words, range(400))
    assert abs(fraction - rate) < 0.07, fraction
    others = [a for a in ("colour", "shape", "size") if a != attribute]
    for index in range(0, 400, 7):
        caption = scenes.captions(index, "all")
        obj = scenes.scene(index).objects[0]
        for other in others:
            assert mentions(caption[1], getattr(obj, other))


def test_omitted_parts_read_naturally():
    noise = CaptionNoise(omit={"colour": 1.0, "shape": 1.0, "position": 1.0})
    description = noise.apply(two_object_scene(), np.random.default_rng(0))
    assert short_caption(description) == "an object and an object"
    assert detailed_caption(description) == (
        "There is a large object. There is a small object. The object is left of the object."
    )
    no_relation = CaptionNoise(omit={"relation": 1.0}).apply(two_object_scene(), np.random.default_rng(0))
    assert len(split_sentences(detailed_caption(no_relation))) == 2


def test_larger_omission_rate_omits_a_superset():
    scene = SyntheticScenes("val", 1, min_objects=3, max_objects=3).scene(0)
    for seed in range(30):
        low = CaptionNoise(omit={"colour": 0.3}).apply(scene, np.random.default_rng(seed))
        high = CaptionNoise(omit={"colour": 0.7}).apply(scene, np.random.default_rng(seed))
        for a, b in zip(low.objects, high.objects):
            assert a.colour is not None or b.colour is None


@pytest.mark.parametrize("attribute", ["colour", "shape"])
def test_perturbation_changes_the_attribute_at_the_requested_rate(attribute):
    rate = 0.4
    noise = CaptionNoise(perturb={attribute: rate})
    scenes = SyntheticScenes("train", 400, min_objects=1, max_objects=1, caption_noise=noise)
    find = colours_in if attribute == "colour" else shapes_in
    changed = 0
    for index in range(400):
        said = find(scenes.captions(index, "short")[0])
        assert len(said) == 1
        changed += said[0] != getattr(scenes.scene(index).objects[0], attribute)
    assert abs(changed / 400 - rate) < 0.07


def test_relation_perturbation_says_another_relation():
    noise = CaptionNoise(perturb={"relation": 1.0})
    scenes = SyntheticScenes("val", 100, min_objects=2, max_objects=2, caption_noise=noise)
    for index in range(100):
        last = split_sentences(scenes.captions(index, "detailed")[0])[-1]
        said = [r for r in RELATIONS if f" is {r} the " in last]
        assert len(said) == 1 and said[0] != scenes.scene(index).relation


def test_caption_noise_is_deterministic_per_epoch_and_redrawn_across_epochs():
    noise = CaptionNoise(omit={"colour": 0.5}, perturb={"shape": 0.3})
    a = SyntheticScenes("train", 100, caption_noise=noise)
    b = SyntheticScenes("train", 100, caption_noise=noise)
    epoch0 = [a.captions(i, "all", epoch=0) for i in range(100)]
    assert epoch0 == [b.captions(i, "all", epoch=0) for i in reversed(range(100))][::-1]
    epoch1 = [a.captions(i, "all", epoch=1) for i in range(100)]
    assert sum(x != y for x, y in zip(epoch0, epoch1)) > 30
    faithful = SyntheticScenes("train", 100)
    for index in range(100):
        assert faithful.captions(index, "all", epoch=0) == faithful.captions(index, "all", epoch=5)


def test_short_and_detailed_captions_agree_under_noise():
    noise = CaptionNoise(omit={"colour": 0.5}, perturb={"colour": 0.5})
    scenes = SyntheticScenes("train", 200, caption_noise=noise)
    for index in range(200):
        short, detailed = scenes.captions(index, "all")
        object_sentences = split_sentences(detailed)[: len(scenes.scene(index).objects)]
        assert Counter(colours_in(short)) == Counter(colours_in(" ".join(object_sentences)))


@pytest.mark.parametrize("make_generator", [generator, np.random.default_rng])
def test_sentence_sampling_gives_ordered_nonempty_subsets(make_generator):
    caption = "One a. Two b. Three c! Four d?"
    sentences = split_sentences(caption)
    assert sentences == ["One a.", "Two b.", "Three c!", "Four d?"]
    seen = Counter()
    for seed in range(600):
        sample = sample_sentences(caption, make_generator(seed))
        picked = split_sentences(sample)
        assert picked, sample
        positions = [sentences.index(s) for s in picked]
        assert positions == sorted(set(positions))
        seen[tuple(positions)] += 1
        assert sample == sample_sentences(caption, make_generator(seed))
    assert len(seen) == 2 ** len(sentences) - 1
    assert max(seen.values()) < 3 * min(seen.values())


def test_sentence_sampling_of_one_sentence_and_bad_input():
    assert sample_sentences("A red circle.", np.random.default_rng(0)) == "A red circle."
    assert sample_sentences("no full stop here", np.random.default_rng(0)) == "no full stop here"
    with pytest.raises(ValueError, match="caption"):
        sample_sentences("  ", np.random.default_rng(0))
    with pytest.raises(TypeError, match="generator"):
        sample_sentences("A. B.", 0)


def test_caption_modes():
    scenes = SyntheticScenes("val", 30, min_objects=3, max_objects=3)
    short, detailed, sampled = scenes.captions(4, ("short", "detailed", "sentences"))
    assert scenes.captions(4, "all") == (short, detailed)
    assert set(split_sentences(sampled)) <= set(split_sentences(detailed))
    samples = {scenes.captions(4, "sentences", epoch=e)[0] for e in range(20)}
    assert len(samples) > 2
    with pytest.raises(ValueError, match="captions"):
        scenes.captions(0, "long")
    with pytest.raises(ValueError, match="captions"):
        scenes.captions(0, [])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"omit": {"texture": 0.5}}, "omit: unknown attribute 'texture'"),
        ({"perturb": {"colour": 1.5}}, r"perturb\['colour'\]"),
        ({"omit": {"size": -0.1}}, r"omit\['size'\]"),
    ],
)
def test_caption_noise_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CaptionNoise(**kwargs)


def test_bad_index_epoch_and_caption_input():
    scenes = SyntheticScenes("val", 5)
    for index in (5, -1):
        with pytest.raises(IndexError):
            scenes.image(index)
        with pytest.raises(IndexError):
            scenes.scene(index)
    with pytest.raises(ValueError, match="epoch"):
        scenes.captions(0, "short", epoch=-1)
    with pytest.raises(TypeError, match="scene"):
        short_caption("a red circle")
    assert describe(two_object_scene()).relation == "left of"


# ---------------------------------------------------------------------------------------------
# torch Dataset, collate and image transforms


def test_dataset_normalises_images_and_collates_multi_positive_batches():
    scenes = SyntheticScenes("train", 16)
    dataset = SyntheticClipDataset(scenes, captions="all")
    sample = dataset[3]
    pixels = torch.from_numpy(scenes.image(3)).permute(2, 0, 1).float()
    expected = (pixels / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(sample.image, expected)
    assert sample.captions == scenes.captions(3, "all") and sample.image_id == 3
    batch = next(iter(DataLoader(dataset, batch_size=5, collate_fn=collate_clip)))
    assert batch.images.shape == (5, 3, 64, 64) and batch.images.dtype == torch.float32
    assert len(batch.texts) == 10
    assert batch.image_ids.tolist() == [0, 1, 2, 3, 4]
    assert batch.text_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch.texts[2:4] == list(scenes.captions(1, "all"))


def test_dataset_custom_normalisation_and_epoch():
    scenes = SyntheticScenes("train", 8, min_objects=3, max_objects=3)
    dataset = SyntheticClipDataset(scenes, captions="sentences", mean=(0, 0, 0), std=(1, 1, 1))
    pixels = torch.from_numpy(scenes.image(0)).permute(2, 0, 1).float()
    torch.testing.assert_close(dataset[0].image * 255, pixels)
    first = [dataset[i].captions for i in range(8)]
    dataset.set_epoch(1)
    assert [dataset[i].captions for i in range(8)] != first
    for index in range(8):
        assert dataset[index].captions == scenes.captions(index, "sentences", epoch=1)


def test_resize_crop_normalize_and_uint8_conversion():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 6, 20))
    out = ResizeCropNormalize(10, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert out.shape == (3, 10, 10)
    assert torch.allclose(out[0], torch.ones(10, 10), atol=0.02), "the blue left edge is cropped away"
    tall = ResizeCropNormalize(7)(image.rotate(90, expand=True))
    assert tall.shape == (3, 7, 7)
    with pytest.raises(ValueError, match="size"):
        ResizeCropNormalize(0)
    with pytest.raises(ValueError, match="std"):
        ResizeCropNormalize(8, std=(1, 0, 1))
    with pytest.raises(ValueError, match="image"):
        ToNormalizedTensor()(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="mean"):
        ToNormalizedTensor(mean=(0.5,))


def test_dataset_bad_arguments():
    scenes = SyntheticScenes("val", 5)
    with pytest.raises(TypeError, match="scenes"):
        SyntheticClipDataset([1, 2, 3])
    with pytest.raises(ValueError, match="mean"):
        SyntheticClipDataset(scenes, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="epoch"):
        SyntheticClipDataset(scenes).set_epoch(-2)
    with pytest.raises(ValueError, match="samples"):
        collate_clip([])


# ---------------------------------------------------------------------------------------------
# CLIP-C semantic compositions


@pytest.mark.parametrize("width", [8, 9, 5])
def test_composite_geometry_and_caption(width):
    images = torch.arange(4 * 3 * 6 * width, dtype=torch.float32).view(4, 3, 6, width)
    captions = ["c0", "c1", "c2", "c3"]
    original = images.clone()
    out, texts, mask = semantic_compositions(images, captions, rho=1.0, generator=generator(0))
    torch.testing.assert_close(images, original)
    assert mask.all() and out.shape == images.shape
    left = width - width // 2
    right = width // 2
    for i in range(4):
        partner = int(re.fullmatch(rf"c{i} and c(\d)", texts[i]).group(1))
        assert partner != i
        start_left, start_right = (width - left) // 2, (width - right) // 2
        torch.testing.assert_close(out[i, :, :, :left], images[i, :, :, start_left : start_left + left])
        right_part = images[partner, :, :, start_right : start_right + right]
        torch.testing.assert_close(out[i, :, :, left:], right_part)


def test_composite_partner_is_never_the_element_itself():
    images = torch.zeros(3, 1, 2, 2)
    partners = Counter()
    for seed in range(30):
        texts = semantic_compositions(images, ["c0", "c1", "c2"], rho=1.0, generator=generator(seed))[1]
        partners.update(texts)
    assert set(partners) == {f"c{i} and c{j}" for i in range(3) for j in range(3) if i != j}


def test_compose_pair_centre_halves_exactly():
    a = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]], dtype=torch.uint8)
    b = a + 10
    assert compose_pair(a, b).tolist() == [[2, 3, 4, 5, 12, 13, 14, 15]]
    odd = torch.tensor([[0, 1, 2, 3, 4]])
    assert compose_pair(odd, odd + 10).tolist() == [[1, 2, 3, 11, 12]]


def test_compositions_rate_partners_and_determinism():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    captions = [f"c{i}" for i in range(64)]
    out, texts, mask = semantic_compositions(images, captions, rho=0.25, generator=generator(1))
    assert out.dtype == torch.uint8
    assert 6 <= int(mask.sum()) <= 28
    for i in range(64):
        if mask[i]:
            assert texts[i].startswith(f"c{i} and c") and texts[i] != f"c{i} and c{i}"
        else:
            assert texts[i] == captions[i] and torch.equal(out[i], images[i])
    again = semantic_compositions(images, captions, rho=0.25, generator=generator(1))
    assert torch.equal(again[0], out) and again[1] == texts
    redrawn = semantic_compositions(images, captions, rho=1.0, generator=generator(2))[1]
    assert redrawn != semantic_compositions(images, captions, rho=1.0, generator=generator(3))[1]
    unchanged, same_texts, none = semantic_compositions(images, captions, rho=0.0)
    assert torch.equal(unchanged, images) and same_texts == captions and not none.any()
    single = semantic_compositions(images[:1], captions[:1], rho=1.0)
    assert not single[2].any() and single[1] == captions[:1]


def test_compositions_bad_arguments():
    images = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="rho"):
        semantic_compositions(images, ["a", "b"], rho=1.5)
    with pytest.raises(ValueError, match="captions"):
        semantic_compositions(images, ["a"], rho=0.5)
    with pytest.raises(ValueError, match="captions"):
        semantic_compositions(images, "ab", rho=0.5)
    with pytest.raises(ValueError, match="images"):
        semantic_compositions(images[0], ["a", "b", "c"], rho=0.5)
    with pytest.raises(ValueError, match="same shape"):
        compose_pair(images[0], images[0, :, :2])


# ---------------------------------------------------------------------------------------------
# zero-shot classification and compositional probe


def test_zero_shot_classes_prompts_and_labels():
    assert len(zero_shot_classnames("shape")) == 8 and len(zero_shot_classnames("colour")) == 8
    names = zero_shot_classnames("colour_shape")
    assert len(set(names)) == 64 and "red circle" in names
    prompts = zero_shot_prompts("shape")
    assert len(prompts) == 8 and prompts[0][0] == "a photo of a circle."
    val = SyntheticScenes("val", 150)
    indices, labels = zero_shot_samples(val, "colour_shape")
    assert 20 < len(indices) < 100
    for index, label in zip(indices, labels):
        obj = val.scene(index).objects[0]
        assert len(val.scene(index).objects) == 1
        assert names[label] == f"{obj.colour} {obj.shape}"
        assert zero_shot_classnames("shape")[zero_shot_label(val.scene(index), "shape")] == obj.shape
        assert zero_shot_classnames("colour")[zero_shot_label(val.scene(index), "colour")] == obj.colour
    assert len(set(labels)) > 15
    with pytest.raises(ValueError, match="task"):
        zero_shot_classnames("texture")
    with pytest.raises(ValueError, match="single-object"):
        zero_shot_label(two_object_scene(), "shape")
    with pytest.raises(ValueError, match="templates"):
        zero_shot_prompts("shape", ["no placeholder"])


def test_probe_negatives_differ_in_the_intended_way():
    val = SyntheticScenes("val", 200)
    records = compositional_probe(val)
    assert records == compositional_probe(SyntheticScenes("val", 200))
    two_object = [i for i in range(200) if len(val.scene(i).objects) == 2]
    assert sorted({r.index for r in records}) == two_object
    assert Counter(r.kind for r in records) == {k: len(two_object) for k in PROBE_KINDS}
    for record in records:
        first, second = val.scene(record.index).objects
        assert record.caption == relation_text(first, val.scene(record.index).relation, second)
        assert record.negative != record.caption
        true_words, negative_words = words(record.caption), words(record.negative)
        if record.kind in ("swap_attributes", "swap_relation"):
            assert sorted(true_words) == sorted(negative_words)
        if record.kind == "swap_attributes":
            assert shapes_in(record.negative) == shapes_in(record.caption)
            assert record.negative.index(second.colour) < record.negative.index(first.colour)
            assert record.negative.index(first.shape) < record.negative.index(second.shape)
        elif record.kind == "swap_relation":
            assert record.negative.startswith(f"The {second.colour} {second.shape} is")
        else:
            changed = [(t, n) for t, n in zip(true_words, negative_words) if t != n]
            assert len(changed) == 1 and len(true_words) == len(negative_words)
            old, new = changed[0]
            assert old in (first.shape, second.shape)
            assert new in SHAPES and new not in (first.shape, second.shape)
    with pytest.raises(ValueError, match="kinds"):
        compositional_probe(val, ["swap_everything"])


# ---------------------------------------------------------------------------------------------
# real data: CSV and webdataset readers


def png_bytes(colour, size=(20, 14), fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


CORRUPT = b"\xff\xd8\xff\xe0 this is not a jpeg at all"


@pytest.fixture()
def csv_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        (images / f"{i}.png").write_bytes(png_bytes(colour))
        rows.append((f"images/{i}.png", f"a {colour} picture"))
    (images / "bad.jpg").write_bytes(CORRUPT)
    rows.insert(2, ("images/bad.jpg", "a corrupt picture"))
    (tmp_path / "train.tsv").write_text("filepath\ttitle\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    return tmp_path


def test_csv_reader_resolves_paths_and_skips_corrupt_images(csv_folder, monkeypatch, caplog):
    monkeypatch.chdir(csv_folder.parent)
    dataset = CsvCaptions(csv_folder / "train.tsv", transform=ResizeCropNormalize(8))
    assert len(dataset) == 5 and dataset.resolution.startswith("relative to the CSV's folder")
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(len(dataset))]
        again = dataset[2]
    # Row 2 (bad.jpg) is unreadable: it is skipped (None), not replaced by a row the batch may hold already.
    assert items[2] is None and again is None
    captions = [caption for _, caption in drop_unreadable(items)]
    assert captions == [f"a {c} picture" for c in ("red", "green", "blue", "white")]
    assert all(image.shape == (3, 8, 8) for image, _ in drop_unreadable(items))
    assert dataset.skipped.value == 2
    assert caplog.text.count("bad.jpg") == 1  # warned once however often the row is read
    plain = CsvCaptions(csv_folder / "train.tsv")
    image, caption = plain[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.getpixel((0, 0)) == (255, 0, 0)


def test_csv_reader_counts_skips_in_dataloader_workers(csv_folder):
    dataset = CsvCaptions(csv_folder / "train.tsv", transform=ResizeCropNormalize(8))
    loader = DataLoader(dataset, batch_size=2, num_workers=2,
                        collate_fn=lambda samples: default_collate(drop_unreadable(samples)))
    batches = list(loader)
    assert sum(len(captions) for _, captions in batches) == 4
    assert batches[0][0].shape == (2, 3, 8, 8)
    assert dataset.skipped.value == 1


def test_csv_reader_options_and_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes("black"))
    (tmp_path / "data.csv").write_text(f"image,caption\n{tmp_path / 'a.png'},an absolute path\n")
    dataset = CsvCaptions(tmp_path / "data.csv", sep=",", img_key="image", caption_key="caption")
    assert dataset[0][1] == "an absolute path"
    with pytest.raises(IndexError):
        dataset[1]
    with pytest.raises(ValueError, match="caption_key: column 'title'"):
        CsvCaptions(tmp_path / "data.csv", sep=",", img_key="image")
    with pytest.raises(ValueError, match="img_key: column 'filepath'"):
        CsvCaptions(tmp_path / "data.csv", sep=",", caption_key="caption")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        CsvCaptions(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("image,caption\nmissing.png,gone\n")
    with pytest.raises(ValueError, match="'missing.png', was tried as given .*working directory"):
        CsvCaptions(tmp_path / "bad.csv", sep=",", img_key="image", caption_key="caption")


@pytest.fixture()
def shards(tmp_path):
    green_json = json.dumps({"caption": "green one"}).encode()
    samples = [
        [
            {"__key__": "s00", "png": png_bytes("red"), "txt": b"red one"},
            {"__key__": "s01", "jpg": png_bytes("green", fmt="JPEG"), "json": green_json},
            {"__key__": "s02", "jpg": CORRUPT, "txt": b"corrupt one"},
        ],
        [
            {"__key__": "s10", "webp": png_bytes("blue", fmt="WEBP"), "txt": b"blue one"},
            {"__key__": "s11", "png": png_bytes("white"), "cls": b"3"},
            {"__key__": "s12", "jpeg": png_bytes("black", fmt="JPEG"), "txt": b"black one"},
        ],
    ]
    for number, shard in enumerate(samples):
        with wds.TarWriter(str(tmp_path / f"{number:03d}.tar")) as writer:
            for sample in shard:
                writer.write(sample)
    return tmp_path


def test_webdataset_reader_reads_formats_and_skips_bad_samples(shards):
    dataset = WebDatasetCaptions(str(shards / "{000..001}.tar"), transform=ResizeCropNormalize(4))
    items = list(dataset)
    assert [caption for _, caption in items] == ["red one", "green one", "blue one", "black one"]
    assert all(image.shape == (3, 4, 4) for image, _ in items)
    assert dataset.skipped.value == 2
    raw = list(WebDatasetCaptions([str(shards / "001.tar")]))
    assert raw[0][0].mode == "RGB" and raw[0][1] == "blue one"


def test_webdataset_reader_with_workers_reads_every_sample_once(shards):
    dataset = WebDatasetCaptions(str(shards / "{000..001}.tar"), transform=ResizeCropNormalize(4))
    captions = [c for _, batch in DataLoader(dataset, batch_size=2, num_workers=2) for c in batch]
    assert sorted(captions) == ["black one", "blue one", "green one", "red one"]
    assert dataset.skipped.value == 2


def test_webdataset_shuffle_is_reproducible_per_epoch(shards):
    def order(epoch, buffer=10):
        dataset = WebDatasetCaptions(str(shards / "{000..001}.tar"), shuffle_buffer=buffer, seed=0)
        dataset.set_epoch(epoch)
        return tuple(caption for _, caption in dataset)

    assert order(0) == order(0)
    orders = {order(epoch) for epoch in range(8)}
    assert len(orders) > 2
    assert all(sorted(o) == ["black one", "blue one", "green one", "red one"] for o in orders)
    # A buffer of one keeps samples in shard order, so only the shard order changes.
    shard_orders = {order(epoch, buffer=1) for epoch in range(8)}
    assert shard_orders == {
        ("red one", "green one", "blue one", "black one"),
        ("blue one", "black one", "red one", "green one"),
    }


def test_webdataset_reader_errors(shards):
    with pytest.raises(FileNotFoundError, match="002.tar"):
        WebDatasetCaptions(str(shards / "{000..002}.tar"))
    with pytest.raises(ValueError, match="shuffle_buffer"):
        WebDatasetCaptions(str(shards / "000.tar"), shuffle_buffer=-1)
    with pytest.raises(ValueError, match="urls"):
        WebDatasetCaptions([])
    with pytest.raises(TypeError, match="seed"):
        WebDatasetCaptions(str(shards / "000.tar"), seed="0")
    with pytest.raises(ValueError, match="epoch"):
        WebDatasetCaptions(str(shards / "000.tar")).set_epoch(-1)


def test_truncated_shard_is_counted_not_fatal(shards):
    data = (shards / "000.tar").read_bytes()
    (shards / "000.tar").write_bytes(data[: len(data) // 3])
    dataset = WebDatasetCaptions(str(shards / "{000..001}.tar"))
    captions = [caption for _, caption in dataset]
    assert captions[-2:] == ["blue one", "black one"]
    # One skip is shard 001's sample without caption; the truncated tar adds at least one.
    assert dataset.skipped.value >= 2
