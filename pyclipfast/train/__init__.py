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
from .config import PRESETS, TrainConfig, UsageError, parse_args, preset_config
from .gradcache import backward_in_chunks, embed_in_chunks, grad_cache_step
from .hooks import Hooks, LossContext
from .loop import TrainResult, train

__all__ = [
    "Hooks",
    "LossContext",
    "PRESETS",
    "TrainConfig",
    "TrainResult",
    "UsageError",
    "backward_in_chunks",
    "embed_in_chunks",
    "grad_cache_step",
    "parse_args",
    "preset_config",
    "train",
]
