"""The trainer's methods: CLIP-C, CLIPin, teacher distillation, recaptions and misalignment."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import pyclipfast
from pyclipfast.train import Hooks, TrainConfig, UsageError, experiments, train
from pyclipfast.train.__main__ import main
from pyclipfast.train.batches import EpochBatches
from pyclipfast.train.checkpoint import load_checkpoint
from pyclipfast.train.config import parse_args, with_method_defaults
from pyclipfast.train.data import (
    CLIP_MEAN, CLIP_STD, COLOUR_NAMES, SyntheticClipDataset, SyntheticScenes, describe, split_sentences,
)
from pyclipfast.train.data.composition import centre_columns
from pyclipfast.train.batches import synthetic_split
from pyclipfast.train.loop import _Run
from pyclipfast.train.methods import ViewAugment, ema_update
from pyclipfast.train.methods import distillation as distillation_module
from pyclipfast.train.methods.clipin import text_view
from pyclipfast.train.metrics import read_metrics, without_timing
from pyclipfast.train.model import create_tokenizer
from pyclipfast.train.runtime import setup_runtime


pytestmark = pytest.mark.usefixtures("real_tiles")


def micro(path, **overrides) -> TrainConfig:
    """A few steps of the 32×32 test model on a tiny synthetic split."""
    settings = dict(model="pcf-micro-32", device="cpu", train_size=64, val_size=24, batch_size=16, chunk_size=8,
                    steps=2, lr=3e-3, warmup=1, output_dir=str(path), progress=False, plots=False,
                    eval_at_start=False, seed=0, threads=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def quiet(_):
    pass


class BatchSpy:
    """A loss term that records the batch it sees (after the methods' transforms) and adds nothing."""

    def __init__(self):
        self.batches = []

    def __call__(self, context):
        self.batches.append(context.batch)
        return {}

    def hooks(self):
        return Hooks(loss_terms=[self])


def new_run(cfg: TrainConfig, hooks: Hooks = None) -> _Run:
    """The loop's run object (one step at a time) for a config, as `train` builds it."""
    return _Run(with_method_defaults(cfg), hooks or Hooks(), setup_runtime("cpu"), quiet)


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A trained-for-two-steps teacher run (its checkpoint.pt is the teacher)."""
    folder = tmp_path_factory.mktemp("teacher")
    return train(micro(folder, steps=2, seed=5), echo=quiet).checkpoint


# ---------------------------------------------------------------------------------------------- CLIP-C

def test_clipc_composites_through_the_trainer(tmp_path):
    """Composites: left half from the element, right half and caption from a partner, fresh ids per image."""
    spy = BatchSpy()
    cfg = micro(tmp_path, clipc_rate=0.5, caption="all", steps=1, batch_size=32)
    train(cfg, spy.hooks(), echo=quiet)
    batch = spy.batches[0]
    dataset = SyntheticClipDataset(SyntheticScenes("train", 64, seed=0, image_size=32), captions="all")
    originals = [dataset[i] for i in next(iter(EpochBatches(64, 32, seed=0, epoch=0)))]
    width = batch.images.shape[-1]
    composite = batch.image_ids >= 64
    assert 0 < int(composite.sum()) < 32
    assert torch.equal(batch.tokens, create_tokenizer("pcf-micro-32")(list(batch.texts)))
    for k, sample in enumerate(originals):
        texts = batch.texts[2 * k:2 * k + 2]
        assert torch.equal(batch.text_ids[2 * k:2 * k + 2], batch.image_ids[k].repeat(2))
        if not composite[k]:
            assert batch.image_ids[k] == sample.image_id and texts == sample.captions
            assert torch.equal(batch.images[k], sample.image)
            continue
        assert torch.equal(batch.images[k, ..., :width - width // 2], centre_columns(sample.image, width - width // 2))
        partners = [p for p in originals if p is not sample
                    and torch.equal(batch.images[k, ..., width - width // 2:], centre_columns(p.image, width // 2))
                    and texts == tuple(f"{a} and {b}" for a, b in zip(sample.captions, p.captions))]
        assert partners, f"composite {k} matches no partner of the batch"
    assert len(set(batch.image_ids[composite].tolist())) == int(composite.sum())  # each composite is new


# ---------------------------------------------------------------------------------------------- CLIPin

def test_ema_update_is_the_formula_with_foreach_ops(monkeypatch):
    target = [torch.randn(3, 4), torch.randn(5)]
    online = [torch.randn(3, 4), torch.randn(5)]
    expected = [0.95 * t + 0.05 * o for t, o in zip(target, online)]
    calls = []
    for name in ("_foreach_mul_", "_foreach_add_"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k)))
    ema_update(target, online, 0.95)
    assert calls == ["_foreach_mul_", "_foreach_add_"]
    for got, want in zip(target, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def step_gradients(cfg: TrainConfig) -> tuple[_Run, dict]:
    """One step of a run; the parameter gradients it left (model and hook modules)."""
    run = new_run(cfg)
    run.train_step(next(run.batches()))
    modules = {"model": run.model, **run.hooks.modules}
    grads = {f"{m}.{n}": p.grad.clone() for m, module in modules.items()
             for n, p in module.named_parameters() if p.grad is not None}
    return run, grads


def test_clipin_targets_get_no_gradient_follow_the_ema_and_work_with_chunks(tmp_path):
    run = new_run(micro(tmp_path, clipin=True))
    parts = run.hooks.modules["clipin"]
    before = [p.clone() for p in parts.target.parameters()]
    run.train_step(next(run.batches()))
    assert all(not p.requires_grad and p.grad is None for p in parts.target.parameters())
    assert all(p.grad is not None for p in parts.online.parameters())  # the heads are trained
    target, online = parts.ema_pairs(run.model)
    for old, new, followed in zip(before, target, online):
        torch.testing.assert_close(new, 0.95 * old + 0.05 * followed, rtol=1e-5, atol=1e-7)

    _, chunked = step_gradients(micro(tmp_path / "a", clipin=True, chunk_size=4))
    _, whole = step_gradients(micro(tmp_path / "b", clipin=True, chunk_size=None))
    assert chunked.keys() == whole.keys() and any(k.startswith("clipin.") for k in whole)
    for name, grad in whole.items():
        torch.testing.assert_close(chunked[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_clipin_terms_are_the_cosine_losses_of_their_views(tmp_path):
    """The logged terms are λ·½[cos + cos] with the losses' usual 2 − 2·cos scale (≈ 2 at random init)."""
    result = train(micro(tmp_path, clipin=True, lambda_inter=0.5, lambda_intra=2.0, steps=1), echo=quiet)
    record = [r for r in read_metrics(result.metrics_path) if r["kind"] == "train"][0]
    assert 0.5 * 1.0 < record["loss/clipin_inter"] < 0.5 * 3.0
    assert 2.0 * 1.0 < record["loss/clipin_intra"] < 2.0 * 3.0
    total = record["loss/contrastive"] + record["loss/clipin_inter"] + record["loss/clipin_intra"]
    assert record["loss"] == pytest.approx(total, rel=1e-6)


def test_view_augment_identity_flip_and_determinism():
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    images = (torch.rand(4, 3, 16, 16) - mean) / std  # normalised images of pixels in [0, 1]
    plain = ViewAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), brightness=0, contrast=0, saturation=0)
    torch.testing.assert_close(plain(images, torch.Generator().manual_seed(0)), images, rtol=1e-5, atol=1e-5)
    flipped = ViewAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=1.0, brightness=0, contrast=0,
                          saturation=0)
    torch.testing.assert_close(flipped(images, torch.Generator().manual_seed(0)), images.flip(-1), rtol=1e-5,
                               atol=1e-5)
    light = ViewAugment()
    first = light(images, torch.Generator().manual_seed(3))
    assert torch.equal(first, light(images, torch.Generator().manual_seed(3)))
    assert not torch.allclose(first, light(images, torch.Generator().manual_seed(4)))


def test_text_view_samples_sentences_or_drops_words():
    detailed = "A red circle is on the left. A blue square is at the top. The red circle is below the blue square."
    views = {text_view(detailed, torch.Generator().manual_seed(s)) for s in range(12)}
    assert len(views) > 2 and all(set(split_sentences(v)) <= set(split_sentences(detailed)) for v in views)
    short = "a red circle and a blue square"
    words = {text_view(short, torch.Generator().manual_seed(s)) for s in range(12)}
    assert len(words) > 2 and all(v and set(v.split()) <= set(short.split()) for v in words)


# ---------------------------------------------------------------------------------------------- distillation

def teacher_settings(checkpoint, cache, **overrides):
    return dict(teacher="pcf-micro-32", teacher_checkpoint=str(checkpoint), teacher_cache=str(cache), **overrides)


def test_teacher_features_get_no_gradient(tmp_path, teacher_checkpoint, monkeypatch):
    seen = []
    real = pyclipfast.distill_loss

    def spy(*args, **kwargs):
        seen.append(args[2:4])
        return real(*args, **kwargs)

    monkeypatch.setattr(pyclipfast, "distill_loss", spy)
    run = new_run(micro(tmp_path, **teacher_settings(teacher_checkpoint, "off", distill_margin=0.1)))
    teacher = run.hooks.loss.__self__.teacher
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    run.train_step(next(run.batches()))
    assert seen and all(not t.requires_grad and t.grad_fn is None for t in seen[0])
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    assert any(p.grad is not None for p in run.model.parameters())


def test_teacher_cache_is_used_exact_and_invalidated(tmp_path, teacher_checkpoint, monkeypatch):
    cache = tmp_path / "cache"
    computed = []
    real = distillation_module.TeacherCache.compute
    monkeypatch.setattr(distillation_module.TeacherCache, "compute",
                        classmethod(lambda cls, *a, **k: (computed.append(1), real.__func__(cls, *a, **k))[1]))

    def run_for(path, **overrides):
        run = new_run(micro(path, **teacher_settings(teacher_checkpoint, cache, **overrides)))
        return run, run.hooks.loss.__self__.features

    run, features = run_for(tmp_path / "first")
    assert len(computed) == 1 and len(list(cache.glob("*.pt"))) == 1
    batch = next(run.batches())
    direct = features.compute_images(batch.images)
    torch.testing.assert_close(features.cache.image_features[batch.image_ids], direct, rtol=1e-5, atol=1e-6)
    features.computed = {"images": 0, "texts": 0}
    run.train_step(batch)
    assert features.computed == {"images": 0, "texts": 0}  # everything came from the cache

    _, again = run_for(tmp_path / "second")
    assert len(computed) == 1 and torch.equal(again.cache.image_features, features.cache.image_features)
    run_for(tmp_path / "detailed", caption="detailed")  # another caption mode: another key
    assert len(computed) == 2 and len(list(cache.glob("*.pt"))) == 2
    changed = tmp_path / "changed.pt"
    state = torch.load(teacher_checkpoint, weights_only=True)
    state["model"]["logit_scale"] += 0.5
    torch.save(state, changed)
    new_run(micro(tmp_path / "retrained", **teacher_settings(changed, cache)))  # other weights: another key
    assert len(computed) == 3

    run, features = run_for(tmp_path / "clipc", clipc_rate=1.0)  # composites are embedded on the fly
    run.train_step(next(run.batches()))
    assert features.computed == {"images": 16, "texts": 16}
    run, features = run_for(tmp_path / "clipin", clipin=True)  # so are augmented views (their captions hit)
    run.train_step(next(run.batches()))
    assert features.computed == {"images": 16, "texts": 0}


def test_distillation_with_and_without_cache_takes_the_same_steps(tmp_path, teacher_checkpoint):
    runs = [train(micro(tmp_path / name, **teacher_settings(teacher_checkpoint, cache, distill_kd="ce",
                                                             false_negative_threshold=0.95)), echo=quiet)
            for name, cache in (("cached", tmp_path / "cache"), ("live", "off"))]
    cached, live = ([r for r in read_metrics(run.metrics_path) if r["kind"] == "train"] for run in runs)
    assert all(r["loss/distill"] > 0 for r in cached)
    for a, b in zip(cached, live):
        assert a["loss/contrastive"] == pytest.approx(b["loss/contrastive"], rel=1e-5)
        assert a["loss/distill"] == pytest.approx(b["loss/distill"], rel=1e-4)


# ---------------------------------------------------------------------------------------------- resume

def test_resume_is_exact_with_clipc_clipin_and_a_teacher(tmp_path, teacher_checkpoint):
    """Targets, heads and their optimizer state come back: the resumed run is the uninterrupted one."""
    common = dict(steps=4, save_every=1, clipc_rate=0.5, clipin=True, train_size=48,
                  **teacher_settings(teacher_checkpoint, tmp_path / "cache"))
    whole = train(micro(tmp_path / "whole", **common), echo=quiet)
    train(micro(tmp_path / "split", stop_at=2, **common), echo=quiet)
    resumed = train(micro(tmp_path / "split", resume="auto", **common), echo=quiet)
    assert without_timing(read_metrics(resumed.metrics_path)) == without_timing(read_metrics(whole.metrics_path))
    final = [load_checkpoint(r.checkpoint, torch.device("cpu")) for r in (whole, resumed)]
    for part in ("model", "modules"):
        flat = [dict(_flatten(state[part])) for state in final]
        assert flat[0].keys() == flat[1].keys() and any("target" in k for k in flat[0]) == (part == "modules")
        for name, tensor in flat[0].items():
            assert torch.equal(tensor, flat[1][name]), name
    with pytest.raises(UsageError, match="--clipin"):
        train(micro(tmp_path / "split", resume="auto", **{**common, "clipin": False}), echo=quiet)


def _flatten(state, prefix=""):
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# ---------------------------------------------------------------------------------------------- recaptions

def test_sentence_sampling_through_the_trainer(tmp_path):
    """Each caption is a non-empty in-order subset of its image's detailed sentences, redrawn each epoch;
    with short,sentences both captions of an image share its id."""
    spy = BatchSpy()
    train(micro(tmp_path, caption="short,sentences", train_size=32, steps=4), spy.hooks(), echo=quiet)
    scenes = SyntheticScenes("train", 32, seed=0, image_size=32)
    drawn = {}
    for epoch, batch in enumerate(spy.batches):
        assert torch.equal(batch.text_ids, batch.image_ids.repeat_interleave(2))
        for k, image_id in enumerate(batch.image_ids.tolist()):
            short, sampled = batch.texts[2 * k:2 * k + 2]
            detailed = split_sentences(scenes.captions(image_id, "detailed")[0])
            assert short == scenes.captions(image_id, "short")[0]
            kept = split_sentences(sampled)
            assert kept and kept == [s for s in detailed if s in kept]
            drawn.setdefault(image_id, set()).add(sampled)
    assert len(spy.batches) == 4  # two epochs of two batches
    assert any(len(samples) > 1 for samples in drawn.values())


# ---------------------------------------------------------------------------------------------- misalignment

def test_omission_and_perturbation_reach_the_training_captions(tmp_path):
    colour = re.compile(r"\b(" + "|".join(COLOUR_NAMES) + r")\b")
    scenes = SyntheticScenes("train", 64, seed=0, image_size=32)
    omitted, perturbed = BatchSpy(), BatchSpy()
    train(micro(tmp_path / "omit", omit="colour=1.0", steps=1), omitted.hooks(), echo=quiet)
    train(micro(tmp_path / "perturb", perturb="colour=1.0,shape=0.0", steps=1), perturbed.hooks(), echo=quiet)
    assert not any(colour.search(t) for t in omitted.batches[0].texts)
    for text, image_id in zip(perturbed.batches[0].texts, perturbed.batches[0].image_ids.tolist()):
        truth = [o.colour for o in describe(scenes.scene(image_id)).objects]
        said = colour.findall(text)
        assert len(said) == len(truth) and all(s != t for s, t in zip(said, truth))
    cfg = micro(tmp_path / "val", omit="colour=1.0")
    assert synthetic_split(cfg, "train", 32).caption_noise.omit == {"colour": 1.0}
    assert synthetic_split(cfg, "val", 32).caption_noise is None  # evaluation keeps the faithful captions


# ---------------------------------------------------------------------------------------------- bad flags

@pytest.mark.parametrize("argv, flag", [
    (["--omit", "color=0.5"], "--omit"),
    (["--omit", "colour"], "--omit"),
    (["--perturb", "colour=1.5"], "--perturb"),
    (["--perturb", "shape=-0.1"], "--perturb"),
    (["--omit", "colour=0.5", "--train-data", "x.csv"], "--omit"),
    (["--clipc-rate", "1.5"], "--clipc-rate"),
    (["--lambda-inter", "1"], "--lambda-inter"),
    (["--clipin", "--ema-momentum", "1.5"], "--ema-momentum"),
    (["--clipin", "--lambda-intra", "-1"], "--lambda-intra"),
    (["--teacher", "pcf-micro-32"], "--teacher-checkpoint"),
    (["--distill-margin", "0.1"], "--distill-margin"),
    (["--teacher", "pcf-micro-32", "--teacher-checkpoint", "t.pt", "--loss", "siglip"], "--loss"),
    (["--teacher", "pcf-micro-32", "--teacher-checkpoint", "t.pt", "--distill-kd", "js"], "--distill-kd"),
    (["--caption", "short,long"], "--caption"),
])
def test_bad_method_flags_exit_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("teacher, checkpoint, flag", [
    ("no-such-model", "TEACHER", "--teacher"),
    ("pcf-micro-32", "missing-teacher.pt", "--teacher-checkpoint"),
    ("pcf-tiny-48", "TEACHER", "--teacher-checkpoint"),  # weights of another architecture
])
def test_unusable_teacher_exits_naming_the_flag(teacher, checkpoint, flag, teacher_checkpoint, tmp_path, capsys):
    checkpoint = str(teacher_checkpoint) if checkpoint == "TEACHER" else checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "pcf-micro-32", "--device", "cpu", "--train-size", "64", "--batch-size", "16",
              "--output-dir", str(tmp_path), "--teacher", teacher, "--teacher-checkpoint", checkpoint])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- experiments

def fake_report(tmp_path):
    """A report as run_grid builds it, from made-up runs of two seeds."""
    grid = experiments.variants((0.5,), "teacher.pt", "pcf-micro-32")
    runs = []
    for v_index, variant in enumerate(grid):
        for seed in range(2):
            metrics = {key: 0.5 + 0.01 * v_index + 0.02 * seed for key, _ in experiments.COLUMNS}
            runs.append({"variant": variant.name, "seed": seed, "metrics": metrics, "seconds": 10.0 + seed})
    rows = [{**dataclasses.asdict(v), "summary": experiments.summarise([r for r in runs if r["variant"] == v.name])}
            for v in grid]
    return {"preset": "quick", "command": "python -m pyclipfast.train experiments", "seeds": 2, "jobs": 1,
            "settings": experiments.PRESETS["quick"], "machine": {"description": "a test"}, "minutes": 1.0,
            "variants": rows, "runs": runs, "teacher": None}


def test_experiments_table_rows_mean_std_and_plot(tmp_path):
    report = fake_report(tmp_path)
    names = [row["name"] for row in report["variants"]]
    assert names == ["baseline", "clipc", "clipin", "distill", "detailed", "sentences", "omit-colour-0.5",
                     "perturb-colour-0.5"]
    assert report["variants"][3]["overrides"]["teacher_checkpoint"] == "teacher.pt"
    table = experiments.markdown(report)
    assert "| baseline (InfoNCE, short captions) | 51.0 ± 1.4 |" in table  # mean of 50 and 52, std √2
    assert "| omit | 0.5 | 57.0 ± 1.4 |" in table and "| perturb | 0 | 51.0 ± 1.4 |" in table
    experiments.plot(report, tmp_path / "methods.png")
    assert (tmp_path / "methods.png").stat().st_size > 10_000


def test_experiments_reuse_a_finished_run_and_check_flags(tmp_path, capsys):
    cfg = experiments.run_config(experiments.PRESETS["quick"], tmp_path, "baseline", 0, {})
    Path(cfg.output_dir).mkdir(parents=True)
    saved = {"config": cfg.to_dict(), "metrics": {"short/i2t_R@1": 0.25}, "seconds": 1.0}
    (Path(cfg.output_dir) / "result.json").write_text(json.dumps(saved))
    assert experiments.run_one((cfg.to_dict(), False)) == {**saved, "reused": True}  # not trained again
    with pytest.raises(SystemExit):
        main(["experiments", "--jobs", "0"])
    assert "--jobs" in capsys.readouterr().err
