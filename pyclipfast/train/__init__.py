"""Reference trainer: CLIP/SigLIP training with pyclipfast's fused losses and gradient caching.

    python -m pyclipfast.train --preset cpu-demo        # the README's demo, a few minutes on a CPU

Layout:
    __main__    command line (`pyclipfast-train`)
    config      TrainConfig, presets, flags and their checks
    model       open_clip model/tokenizer creation; small configs in configs/
    data/       the built-in compositional dataset and real-data readers
    batches     tokenized, sharded, resumable training batches
    gradcache   gradient caching: batch size independent of activation memory
    loop        the training loop (`train`)
    hooks       its extension points: batch transforms, loss replacement and terms, modules
    methods/    CLIP-C compositions, CLIPin, teacher distillation (flags --clipc-rate, --clipin, --teacher)
    evaluate    retrieval recall@K, compositional probe, zero-shot accuracy
    attribute_probe  accuracy per attribute (colour, shape, size, position) of altered captions
    experiments the methods' results table (`python -m pyclipfast.train experiments`)
    checkpoint  atomic, resumable checkpoints
    metrics     metrics.jsonl and plots;  memory: loss peak memory;  report: the final table
    runtime     device, torch.distributed, seeding, gradient sum over ranks
"""
from __future__ import annotations

import importlib
from typing import Any

TRAIN_EXTRA_HINT = "the trainer needs its extra dependencies: pip install 'pyclipfast[train]'"
_EXPORTS = {
    "PRESETS": "config", "TrainConfig": "config", "UsageError": "config", "parse_args": "config",
    "preset_config": "config", "backward_in_chunks": "gradcache", "embed_in_chunks": "gradcache",
    "grad_cache_step": "gradcache", "Hooks": "hooks", "LossContext": "hooks", "TrainResult": "loop", "train": "loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (a base install can import the package and be told what is missing)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    except ImportError as error:
        raise ImportError(f"{TRAIN_EXTRA_HINT} ({error})") from error
    return getattr(module, name)
