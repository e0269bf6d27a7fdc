"""Evaluation: retrieval recall@K, a compositional probe and zero-shot classification.

    retrieval   image→text and text→image recall@1/5/10 with `pyclipfast.recall_at_k` (no
                N×N score matrix); a caption is a positive of its own image only (with
                --caption all, both captions of an image are).
    probe       ARO/SugarCrepe style, on the two-object val scenes: the model passes a record
                when it scores the image higher with its true relation sentence than with a hard
                negative (attributes swapped, relation swapped, object replaced); accuracy per
                kind (chance 0.5) and their mean.
    zero-shot   the single-object val scenes classified by shape (8 classes), colour (8) and
                colour+shape (64) against prompt-ensembled class embeddings (chance 1/8, 1/8, 1/64).

Metric names: val/i2t_R@K, val/t2i_R@K, probe/<kind>, probe/mean, zeroshot/<task>.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

import pyclipfast

from .data import (
    PROBE_KINDS, ZERO_SHOT_TASKS, SyntheticClipDataset, SyntheticScenes, collate_clip, compositional_probe,
    zero_shot_prompts, zero_shot_samples,
)

Tokenizer = Callable[[list[str]], torch.Tensor]
RECALL_KS = (1, 5, 10)


def autocast_context(device: torch.device, precision: str):
    """bf16 or fp16 autocast on `device` for precision "bf16" / "fp16", else nothing."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()


class Embedder:
    """Normalised float32 embeddings of images and token batches, in chunks, without autograd."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, batch_size: int) -> None:
        self.model, self.device, self.precision, self.batch_size = model, device, precision, batch_size

    @torch.no_grad()
    def _run(self, encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        outputs = []
        with autocast_context(self.device, self.precision):
            for start in range(0, len(inputs), self.batch_size):
                chunk = inputs[start:start + self.batch_size].to(self.device, non_blocking=True)
                outputs.append(encode(chunk).float())
        return F.normalize(torch.cat(outputs), dim=-1)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(lambda x: self.model.encode_image(x, normalize=True), images)

    def texts(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(lambda t: self.model.encode_text(t, normalize=True), tokens)


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      image_ids: Optional[torch.Tensor] = None, text_ids: Optional[torch.Tensor] = None,
                      backend: str = "auto") -> dict[str, float]:
    """val/i2t_R@K and val/t2i_R@K; text j is a positive of image i iff their ids match (default: i == j)."""
    i2t = pyclipfast.recall_at_k(image_features, text_features, RECALL_KS, query_ids=image_ids,
                                 gallery_ids=text_ids, backend=backend)
    t2i = pyclipfast.recall_at_k(text_features, image_features, RECALL_KS, query_ids=text_ids,
                                 gallery_ids=image_ids, backend=backend)
    return {**{f"val/i2t_{k}": v for k, v in i2t.items()}, **{f"val/t2i_{k}": v for k, v in t2i.items()}}


def _unique(texts: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """Distinct texts in first-seen order and each one's position."""
    order: dict[str, int] = {}
    for text in texts:
        order.setdefault(text, len(order))
    return list(order), order


class SyntheticEvaluation:
    """Retrieval, probe and zero-shot metrics on a synthetic val split (inputs prepared once).

    Args:
        scenes: the val split.
        tokenizer: the model's tokenizer.
        caption: caption mode of the retrieval texts ("short", "detailed", "sentences", "all").
        backend: pyclipfast backend of recall_at_k.
    """

    def __init__(self, scenes: SyntheticScenes, tokenizer: Tokenizer, caption: str = "short",
                 backend: str = "auto") -> None:
        self.backend = backend
        batch = collate_clip([sample for sample in SyntheticClipDataset(scenes, captions=caption)])
        self.images, self.image_ids, self.text_ids = batch.images, batch.image_ids, batch.text_ids
        self.retrieval_tokens = tokenizer(batch.texts)

        # Row i of self.images is val sample i, so probe and zero-shot records index it directly.
        self.probe = compositional_probe(scenes)
        self.probe_images = torch.tensor([r.index for r in self.probe], dtype=torch.long)
        probe_texts, position = _unique(t for r in self.probe for t in (r.caption, r.negative))
        self.probe_true = torch.tensor([position[r.caption] for r in self.probe], dtype=torch.long)
        self.probe_negative = torch.tensor([position[r.negative] for r in self.probe], dtype=torch.long)
        self.probe_kinds = [r.kind for r in self.probe]
        self.probe_tokens = tokenizer(probe_texts) if probe_texts else None

        self.zero_shot: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for task in ZERO_SHOT_TASKS:
            indices, labels = zero_shot_samples(scenes, task)
            if not indices:
                continue
            prompts = zero_shot_prompts(task)
            tokens = tokenizer([p for class_prompts in prompts for p in class_prompts])
            tokens = tokens.view(len(prompts), -1, tokens.shape[-1])
            self.zero_shot[task] = (torch.tensor(indices), torch.tensor(labels), tokens)

    def __call__(self, embed: Embedder) -> dict[str, float]:
        images = embed.images(self.images)
        metrics = retrieval_metrics(images, embed.texts(self.retrieval_tokens),
                                    self.image_ids.to(images.device), self.text_ids.to(images.device),
                                    backend=self.backend)
        metrics.update(self._probe(embed, images))
        metrics.update(self._zero_shot(embed, images))
        return metrics

    def _probe(self, embed: Embedder, images: torch.Tensor) -> dict[str, float]:
        if self.probe_tokens is None:
            return {}
        texts = embed.texts(self.probe_tokens)
        image_features = images[self.probe_images.to(images.device)]
        true = (image_features * texts[self.probe_true.to(texts.device)]).sum(-1)
        negative = (image_features * texts[self.probe_negative.to(texts.device)]).sum(-1)
        wins = (true > negative).cpu()
        metrics = {}
        for kind in PROBE_KINDS:
            mask = torch.tensor([k == kind for k in self.probe_kinds])
            if mask.any():
                metrics[f"probe/{kind}"] = wins[mask].float().mean().item()
        metrics["probe/mean"] = sum(metrics.values()) / len(metrics)
        return metrics

    def _zero_shot(self, embed: Embedder, images: torch.Tensor) -> dict[str, float]:
        metrics = {}
        for task, (indices, labels, tokens) in self.zero_shot.items():
            classes, templates, length = tokens.shape
            prompts = embed.texts(tokens.view(-1, length)).view(classes, templates, -1)
            class_features = F.normalize(prompts.mean(dim=1), dim=-1)
            predictions = (images[indices.to(images.device)] @ class_features.T).argmax(dim=-1).cpu()
            metrics[f"zeroshot/{task}"] = (predictions == labels).float().mean().item()
        return metrics


class PairRetrievalEvaluation:
    """Retrieval recall@K on real (image, caption) pairs, one caption per image."""

    def __init__(self, batches: Iterable, backend: str = "auto") -> None:
        self.batches, self.backend = batches, backend

    def __call__(self, embed: Embedder) -> dict[str, float]:
        images, texts = [], []
        for batch in self.batches:
            images.append(embed.images(batch.images))
            texts.append(embed.texts(batch.tokens))
        if not images:
            return {}
        return retrieval_metrics(torch.cat(images), torch.cat(texts), backend=self.backend)


def evaluate(model: torch.nn.Module, evaluations: Sequence[Callable[[Embedder], dict[str, float]]],
             device: torch.device, precision: str = "fp32", batch_size: int = 256) -> dict[str, float]:
    """Run every evaluation on `model` in eval mode (its training mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        embed = Embedder(model, device, precision, batch_size)
        metrics: dict[str, float] = {}
        for evaluation in evaluations:
            metrics.update(evaluation(embed))
        return metrics
    finally:
        model.train(was_training)
