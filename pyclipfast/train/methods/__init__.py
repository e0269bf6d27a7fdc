"""The training methods of the reference trainer, each a set of loop hooks (see ..hooks).

    compositions  CLIP-C semantic compositions (--clipc-rate): a batch transform
    clipin        CLIPin non-contrastive plug-in (--clipin): views, heads, EMA targets, cosine losses
    distillation  teacher distillation (--teacher): distill_loss instead of InfoNCE, teacher cache
    augment       the light tensor augmentation of CLIPin's views

Recaptions (--caption) and misalignment (--omit, --perturb) are data settings (batches.py).
`build_methods` turns a config into the merged hooks; transforms run in the order CLIP-C, then
CLIPin's views (composites are augmented like any image).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import IterableDataset

from ..batches import TrainData
from ..config import TrainConfig
from ..hooks import Hooks, merge_hooks
from ..model import image_size, model_config, resolve_model_name
from ..runtime import Runtime
from .augment import ViewAugment
from .clipin import Clipin, ema_update
from .compositions import Compositions
from .distillation import Distillation, TeacherCache, TeacherFeatures, build_distillation, load_teacher

Tokenizer = Callable[[list[str]], torch.Tensor]

__all__ = [
    "Clipin", "Compositions", "Distillation", "TeacherCache", "TeacherFeatures", "ViewAugment", "build_methods",
    "ema_update", "load_teacher",
]


def build_methods(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Tokenizer, data: TrainData,
                  runtime: Runtime, echo: Callable[[str], None] = print) -> Hooks:
    """The hooks of the methods `cfg` enables (empty Hooks when none is).

    Building them draws nothing from the run's random streams: CLIPin's heads are initialised
    from their own seed, so a method never shifts the rest of the run's trajectory. On several
    processes the loop hands the transforms and loss terms the global batch (see ..hooks), so a
    method acts as it does in one process; composites are numbered in the global batch.
    """
    per_rank = cfg.batch_size // runtime.world_size
    chunk = min(cfg.chunk_size or per_rank, per_rank)
    hooks = []
    if cfg.clipc_rate > 0:
        offset = 0 if isinstance(data.dataset, IterableDataset) else len(data.dataset)
        hooks.append(Hooks(batch_transform=Compositions(cfg.clipc_rate, tokenizer, offset)))
    if cfg.clipin:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1_000_003 + 17)
            clipin = Clipin(model, tokenizer, model_config(resolve_model_name(cfg.model))["embed_dim"],
                            lambda_inter=cfg.lambda_inter, lambda_intra=cfg.lambda_intra, momentum=cfg.ema_momentum,
                            augment=ViewAugment(flip=cfg.view_flip), device=runtime.device, precision=cfg.precision,
                            chunk_size=chunk, backend=cfg.backend)
        hooks.append(clipin.hooks())
    if cfg.teacher is not None:
        hooks.append(build_distillation(cfg, data.dataset, image_size(model), runtime, chunk, echo).hooks())
    return merge_hooks(*hooks)
