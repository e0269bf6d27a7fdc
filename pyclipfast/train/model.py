"""open_clip models and tokenizers for the trainer, and the small configs shipped with it.

The configs in pyclipfast/train/configs/ are registered with open_clip under their file names:

    pcf-micro-32   32×32 images, 2+2 layers of width 64, context 24: tests (seconds on a CPU)
    pcf-tiny-48    48×48 images, 3+3 layers of width 96, context 32: the CPU demo
    pcf-tiny-64    64×64 images, 4+4 layers of width 128, context 32: a CPU model 2.5x the demo's cost
    pcf-small-64   64×64 images, 8 layers of width 384 / 6 of width 256, context 64: the GPU preset
    pcf-micro-32-ctx40  pcf-micro-32 with context 40 (detailed captions fit): the methods grid's student
    pcf-mini-32-ctx40   32×32 images, 4+4 layers of width 128, context 40: the methods grid's teacher

`--model` takes any open_clip architecture name (ViT-B-32, RN50, ...), one of these, or the
path of a model-config JSON in open_clip's format (registered under its file name).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from .config import UsageError

CONFIG_DIR = Path(__file__).parent / "configs"
# SigLIP's initialisation (Zhai et al., 2023): t' = log 10, b = −10.
SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}

_registered = False


def register_configs() -> None:
    """Make the shipped configs known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def resolve_model_name(model: str) -> str:
    """The open_clip name of `model`: a registered architecture, or a config JSON (registered here).

    Raises UsageError naming --model when it is neither.
    """
    register_configs()
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise UsageError(f"--model: config file not found: {model}")
        open_clip.add_model_config(path)
        name = path.stem
        if name not in open_clip.list_models():
            raise UsageError(f"--model: {model} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        return name
    if model not in open_clip.list_models():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise UsageError(f"--model: unknown model {model!r}; use an open_clip architecture "
                         f"(open_clip.list_models()), one of {shipped}, or the path of a config .json")
    return model


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config of a resolved model name."""
    return open_clip.get_model_config(name)


def trainer_checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The model state dict of a pyclipfast.train checkpoint.pt, or None when `path` is another file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, or one that needs pickled code: open_clip's loader decides
        return None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "config" in state:
        return state["model"]
    return None


def _load_pretrained(name: str, pretrained: str, device: torch.device, flag: str, **kwargs: Any) -> torch.nn.Module:
    """open_clip's model `name` with the weights of `pretrained`: a trainer checkpoint.pt, a weights file
    (open_clip_weights.pt, open_clip's own checkpoints) or an open_clip pretrained tag (downloaded)."""
    if Path(pretrained).is_file():
        weights = trainer_checkpoint_weights(pretrained)
        if weights is not None:
            model = open_clip.create_model(name, precision="fp32", device=device, **kwargs)
            try:
                model.load_state_dict(weights)
            except RuntimeError as error:
                raise UsageError(f"{flag} {pretrained}: its weights do not fit {name} ({error})") from error
            return model
    try:
        return open_clip.create_model(name, pretrained=pretrained, precision="fp32", device=device, **kwargs)
    except Exception as error:
        if Path(pretrained).is_file():
            raise UsageError(f"{flag} {pretrained}: cannot load it into {name} ({error})") from error
        tags = [tag for arch, tag in open_clip.list_pretrained() if arch == name]
        raise UsageError(f"{flag} {pretrained!r}: not a file, and open_clip could not fetch it as a pretrained tag "
                         f"of {name} (known tags: {', '.join(tags) or 'none'}); without network access, download "
                         f"the weights elsewhere and give the local file ({error})") from error


def create_model(model: str, loss: str, device: torch.device, pretrained: str | None = None,
                 flag: str = "--pretrained") -> torch.nn.Module:
    """An open_clip CLIP model in float32 on `device` (bf16 runs under autocast, weights stay fp32).

    SigLIP models get SigLIP's logit scale and a learnable bias initialised at −10. `pretrained`:
    a trainer checkpoint.pt, a weights file or an open_clip tag (see `_load_pretrained`); errors
    name `flag`.
    """
    name = resolve_model_name(model)
    kwargs = SIGLIP_INIT if loss == "siglip" else {}
    if pretrained is not None:
        return _load_pretrained(name, pretrained, device, flag, **kwargs)
    logging.disable(logging.WARNING)  # random initialisation is the intent: silence open_clip's warning about it
    try:
        return open_clip.create_model(name, precision="fp32", device=device, **kwargs)
    finally:
        logging.disable(logging.NOTSET)


def create_tokenizer(model: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for `model` (the context length of its config)."""
    return open_clip.get_tokenizer(resolve_model_name(model))


def image_size(model: torch.nn.Module) -> int:
    """The (square) input image size of an open_clip model's vision tower."""
    size = getattr(model.visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise UsageError(f"--model: non-square image size {tuple(size)} is not supported")
        size = size[0]
    if not isinstance(size, int):
        raise UsageError(f"--model: cannot tell the image size of {type(model.visual).__name__}")
    return size
