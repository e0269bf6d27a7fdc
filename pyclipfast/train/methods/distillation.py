"""Teacher distillation (`--teacher ARCH --teacher-checkpoint PATH`): distill_loss replaces InfoNCE.

    (L_ce, λ·L_kd) = pyclipfast.distill_loss(student image/text features, teacher image/text features,
                                             s, t, margin=m, kd_weight=λ, kd=kl|ce,
                                             false_negative_threshold=φ, image_ids, text_ids)

The teacher is an open_clip model loaded from a pyclipfast.train checkpoint (or an open_clip
checkpoint file / pretrained tag), frozen: requires_grad False, eval mode, run without autograd,
so its features are constants of the student's loss. With a teacher of another image size the
student's images are resized for it (bilinear, antialiased); texts are tokenized with the
teacher's own tokenizer.

Teacher cache (built-in data only). Before the first step the teacher embeds the whole training
split once — every image, and the captions of the epoch-0 draw — and the result is stored in
<cache dir>/<key>.pt, the key being a hash of what the embeddings depend on: the dataset (seed,
size, image size, caption modes, --omit/--perturb), the teacher (architecture, its config, a
SHA-256 of the checkpoint file). Change any of them and the key changes: the old file is not
used and the cache is computed again. At each step a batch's teacher features come from the
cache where they are exact and from the teacher otherwise:

    images  an image that is still its dataset sample comes from the cache (by id); composites
            (CLIP-C) and augmented views (CLIPin) — batch.extra["altered"] — are embedded on the fly;
    texts   looked up by the caption string: the deterministic captions (short, detailed, all)
            always hit; captions redrawn each epoch (sentences, --omit, --perturb) hit in epoch 0
            and are embedded on the fly afterwards; composite captions are always embedded.

So the cache never serves a feature of an input the teacher did not see; it only skips
recomputing ones it did. `features.computed` counts what was embedded on the fly.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyclipfast

from ..checkpoint import atomic_write
from ..config import UsageError
from ..data import SyntheticClipDataset, collate_clip
from ..evaluate import Embedder
from ..hooks import Hooks, LossContext
from ..model import create_model, create_tokenizer, image_size, resolve_model_name

Tokenizer = Callable[[list[str]], torch.Tensor]
CACHE_FORMAT = 1


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_identity(name: str, checkpoint: str) -> dict[str, Any]:
    """What the teacher's features depend on: architecture, its config, and the checkpoint's content."""
    path = Path(checkpoint)
    weights = {"sha256": _file_digest(path)} if path.is_file() else {"pretrained": checkpoint}
    return {"model": name, "config": open_clip.get_model_config(name), "weights": weights}


def load_teacher(name: str, checkpoint: str, device: torch.device) -> nn.Module:
    """The frozen teacher: `name` (resolved) with the weights of `checkpoint`; UsageError naming the flag."""
    with torch.random.fork_rng(devices=[]):  # building the teacher leaves the run's random streams alone
        teacher = create_model(name, "clip", device, pretrained=checkpoint, flag="--teacher-checkpoint")
    teacher.requires_grad_(False)
    return teacher.eval()


class TeacherFeatures:
    """Teacher embeddings of batches: from the cache where exact, else computed (and counted).

    Args:
        teacher: the frozen model.
        tokenizer: the teacher's tokenizer.
        device, precision, chunk_size: how the teacher runs (no autograd, chunks of chunk_size).
        cache: precomputed features of the training split (None: always compute).
    """

    def __init__(self, teacher: nn.Module, tokenizer: Tokenizer, device: torch.device, precision: str,
                 chunk_size: int, cache: Optional["TeacherCache"] = None) -> None:
        self.teacher, self.tokenizer, self.cache = teacher, tokenizer, cache
        self.embed = Embedder(teacher, device, precision, chunk_size)
        self.size = image_size(teacher)
        self.computed = {"images": 0, "texts": 0}

    def compute_images(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher features of (B, 3, H, W) images, resized to the teacher's input size if needed."""
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True,
                                   align_corners=False)
        self.computed["images"] += images.shape[0]
        return self.embed.images(images)

    def compute_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.computed["texts"] += len(texts)
        return self.embed.texts(self.tokenizer(list(texts)))

    def images(self, images: torch.Tensor, ids: Optional[torch.Tensor],
               altered: Optional[torch.Tensor]) -> torch.Tensor:
        """Features of a batch's images; cached rows for unaltered dataset samples (ids < cache size)."""
        if self.cache is None or ids is None:
            return self.compute_images(images)
        ids = ids.to(images.device)
        hit = ids < self.cache.image_features.shape[0]
        if altered is not None:
            hit &= ~altered.to(images.device)
        out = self.cache.image_features.to(images.device)[ids.clamp(max=self.cache.image_features.shape[0] - 1)]
        if not hit.all():
            out = out.clone()
            out[~hit] = self.compute_images(images[~hit])
        return out

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Features of a batch's captions; cached rows for captions in the cache."""
        if self.cache is None:
            return self.compute_texts(texts)
        rows = [self.cache.text_rows.get(t) for t in texts]
        out = self.cache.text_features[[0 if r is None else r for r in rows]].to(self.embed.device)
        missing = [j for j, r in enumerate(rows) if r is None]
        if missing:
            out[missing] = self.compute_texts([texts[j] for j in missing])
        return out


class TeacherCache:
    """The teacher's features of one training split: image i at row i, texts by string."""

    def __init__(self, key: str, image_features: torch.Tensor, texts: list[str], text_features: torch.Tensor) -> None:
        self.key, self.image_features, self.text_features = key, image_features, text_features
        self.texts = texts
        self.text_rows = {text: row for row, text in enumerate(texts)}

    @staticmethod
    def key_of(description: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    def save(self, path: Path) -> None:
        state = {"format": CACHE_FORMAT, "key": self.key, "image_features": self.image_features.cpu(),
                 "texts": self.texts, "text_features": self.text_features.cpu()}
        atomic_write(path, lambda file: torch.save(state, file))

    @classmethod
    def load(cls, path: Path, key: str) -> Optional["TeacherCache"]:
        """The cache at `path` if it is one for `key`, else None (missing, foreign or unreadable)."""
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None
        if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT or state.get("key") != key:
            return None
        return cls(key, state["image_features"], list(state["texts"]), state["text_features"])

    @classmethod
    def compute(cls, key: str, dataset: SyntheticClipDataset, features: TeacherFeatures,
                batch_size: int) -> "TeacherCache":
        """Embed every image and every epoch-0 caption of `dataset` with the teacher."""
        images, texts = [], {}
        for start in range(0, len(dataset), batch_size):
            batch = collate_clip([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            images.append(features.compute_images(batch.images).cpu())
            texts.update(dict.fromkeys(batch.texts))
        text_list = list(texts)
        text_features = torch.cat([features.compute_texts(text_list[s:s + batch_size]).cpu()
                                   for s in range(0, len(text_list), batch_size)])
        return cls(key, torch.cat(images), text_list, text_features)


def cache_description(cfg, student_image_size: int, teacher: dict[str, Any], modes) -> dict[str, Any]:
    """Everything the cached features depend on (hashed into the cache key)."""
    dataset = {"split": "train", "seed": cfg.seed, "size": cfg.train_size, "image_size": student_image_size,
               "captions": list(modes), "omit": cfg.omit, "perturb": cfg.perturb}
    return {"format": CACHE_FORMAT, "dataset": dataset, "teacher": teacher}


def cache_directory(cfg) -> Optional[Path]:
    """--teacher-cache: 'off' → None; default: teacher-cache/ beside the checkpoint file (or in the output dir)."""
    if cfg.teacher_cache == "off":
        return None
    if cfg.teacher_cache is not None:
        return Path(cfg.teacher_cache)
    checkpoint = Path(cfg.teacher_checkpoint)
    return (checkpoint.parent if checkpoint.is_file() else Path(cfg.output_dir)) / "teacher-cache"


class Distillation:
    """The distillation hooks: `loss` replaces the contrastive loss by distill_loss.

    Args:
        teacher: the frozen teacher (see `load_teacher`).
        features: its features of the batches (cache and counters).
        margin, kd_weight, kd, threshold, backend: distill_loss's settings.
    """

    def __init__(self, teacher: nn.Module, features: TeacherFeatures, *, margin: float, kd_weight: float, kd: str,
                 threshold: Optional[float], backend: str = "auto") -> None:
        self.teacher, self.features = teacher, features
        self.options = dict(margin=margin, kd_weight=kd_weight, kd=kd, false_negative_threshold=threshold,
                            backend=backend)

    def hooks(self) -> Hooks:
        return Hooks(loss=self.loss)

    def loss(self, context: LossContext) -> dict[str, torch.Tensor]:
        """{"contrastive": L_ce, "distill": λ·L_kd} of the batch."""
        batch, local, gather = context.batch, context.local_batch, context.gather
        with torch.no_grad():  # the teacher embeds this rank's inputs; the loss sees the global batch
            teacher_images = gather(self.features.images(local.images, local.image_ids, local.extra.get("altered")))
            teacher_texts = gather(self.features.texts(local.texts))
            teacher_scale = self.teacher.logit_scale.exp()
            dtype = context.image_features.dtype  # the student's (bf16 under bf16 autocast): one dtype for the loss
            teacher_images, teacher_texts = teacher_images.to(dtype), teacher_texts.to(dtype)
        contrastive, distill = pyclipfast.distill_loss(
            context.image_features, context.text_features, teacher_images, teacher_texts,
            context.model.logit_scale.exp(), teacher_scale, image_ids=batch.image_ids, text_ids=batch.text_ids,
            **self.options)
        return {"contrastive": contrastive, "distill": distill}


def build_distillation(cfg, dataset, student_image_size: int, runtime, chunk_size: int,
                       echo: Callable[[str], None]) -> Distillation:
    """The teacher of --teacher/--teacher-checkpoint, its cache (built-in data), and the loss hooks.

    On several processes rank 0 computes and writes the cache first; the others then read it (or,
    when the file is not visible to them, compute it themselves).
    """
    try:
        name = resolve_model_name(cfg.teacher)
    except UsageError as error:
        raise UsageError(str(error).replace("--model", "--teacher", 1)) from None
    device = runtime.device
    teacher = load_teacher(name, cfg.teacher_checkpoint, device)
    features = TeacherFeatures(teacher, create_tokenizer(name), device, cfg.precision, chunk_size)
    directory = cache_directory(cfg)
    if directory is not None and isinstance(dataset, SyntheticClipDataset):
        description = cache_description(cfg, student_image_size, teacher_identity(name, cfg.teacher_checkpoint),
                                        dataset.modes)
        key = TeacherCache.key_of(description)
        path = directory / f"{key[:20]}.pt"
        if not runtime.is_main:
            _barrier(runtime)
        cache = TeacherCache.load(path, key)
        if cache is None:
            cache = TeacherCache.compute(key, dataset, features, chunk_size)
            if runtime.is_main:
                cache.save(path)
            echo(f"teacher cache: embedded {len(cache.image_features)} images and {len(cache.texts)} captions "
                 f"with {name} → {path}")
        else:
            echo(f"teacher cache: {path}")
        if runtime.is_main:
            _barrier(runtime)
        features.cache = cache
        features.computed = {"images": 0, "texts": 0}
    return Distillation(teacher, features, margin=cfg.distill_margin, kd_weight=cfg.distill_weight,
                        kd=cfg.distill_kd, threshold=cfg.false_negative_threshold, backend=cfg.backend)


def _barrier(runtime) -> None:
    if runtime.world_size > 1:
        torch.distributed.barrier()
