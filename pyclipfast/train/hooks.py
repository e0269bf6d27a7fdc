"""Extension points of the training loop, and how several methods' hooks combine.

    Hooks.batch_transform(batch, generator) -> batch     e.g. CLIP-C compositions, CLIPin's views;
        `generator` is drawn from (seed, step), so a resumed run transforms its batches alike
    Hooks.loss(context) -> {name: scalar}                 replaces the contrastive loss (the terms are
        summed), e.g. distill_loss against a teacher
    Hooks.loss_terms: [term(context) -> {name: scalar}]   added to the contrastive loss, e.g. CLIPin's
        cosine losses against EMA targets
    Hooks.after_step(model, step)                         after the optimizer step, e.g. the EMA update
    Hooks.modules: {name: nn.Module}                      parts the hooks own (heads, target encoders):
        their trainable parameters join the optimizer, their state is checkpointed and restored

Loss functions see the full-batch embeddings (LossContext.image_features / text_features, L2
normalised); under gradient caching they are leaves whose gradient reaches the towers chunk by
chunk, so anything computed from them (heads, predictors) works with --chunk-size unchanged.

On several processes (torchrun) a hook still sees the *global* batch: the features of every
rank (gathered with autograd) and `batch`, the batch of all ranks, so its terms are those of one
process on the whole batch. Work that needs no gradient (a teacher, EMA targets) runs on this
rank's `local_batch` and is joined with `gather` (rows in rank order). Every rank computes the
same global terms; the loop scales their gradient by 1/W so that the gradient sum over the
ranks is the single-process gradient.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from .batches import TokenizedBatch

BatchTransform = Callable[[TokenizedBatch, torch.Generator], TokenizedBatch]
LossTerms = Callable[["LossContext"], dict[str, torch.Tensor]]


@dataclass
class LossContext:
    """What a loss term sees: the global batch's embeddings, the batch, the model and the step.

    local_batch: this rank's part of `batch` (`batch` itself in one process).
    gather: rows of every rank joined in rank order, without autograd (the identity in one process).
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    batch: TokenizedBatch
    model: torch.nn.Module
    step: int
    local_batch: Optional[TokenizedBatch] = None
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows

    def __post_init__(self) -> None:
        if self.local_batch is None:
            self.local_batch = self.batch


@dataclass
class Hooks:
    """Extension points of the loop (see the module docstring)."""

    batch_transform: Optional[BatchTransform] = None
    loss_terms: list[LossTerms] = field(default_factory=list)
    after_step: Optional[Callable[[torch.nn.Module, int], None]] = None
    loss: Optional[LossTerms] = None
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)


def chain_transforms(transforms: Sequence[BatchTransform]) -> Optional[BatchTransform]:
    """One transform applying `transforms` in order; each gets its own generator seeded from the step's.

    A single transform is returned as it is (it sees the step's generator itself).
    """
    transforms = list(transforms)
    if len(transforms) <= 1:
        return transforms[0] if transforms else None

    def transform(batch: TokenizedBatch, generator: torch.Generator) -> TokenizedBatch:
        for each in transforms:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            batch = each(batch, torch.Generator().manual_seed(seed))
        return batch
    return transform


def merge_hooks(*hooks: Hooks) -> Hooks:
    """The hooks of several methods as one: transforms chained, terms and modules joined, in order.

    At most one of them may replace the contrastive loss; module names must be distinct.
    """
    losses = [h.loss for h in hooks if h.loss is not None]
    if len(losses) > 1:
        raise ValueError("two hooks replace the contrastive loss; at most one may (e.g. one teacher)")
    modules: dict[str, torch.nn.Module] = {}
    for h in hooks:
        for name, module in h.modules.items():
            if name in modules:
                raise ValueError(f"two hooks own a module named {name!r}")
            modules[name] = module
    steps = [h.after_step for h in hooks if h.after_step is not None]

    def after_step(model: torch.nn.Module, step: int) -> None:
        for each in steps:
            each(model, step)

    return Hooks(batch_transform=chain_transforms([h.batch_transform for h in hooks if h.batch_transform]),
                 loss_terms=[term for h in hooks for term in h.loss_terms],
                 after_step=after_step if steps else None,
                 loss=losses[0] if losses else None,
                 modules=modules)
