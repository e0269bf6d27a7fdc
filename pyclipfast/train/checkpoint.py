"""Checkpoints: written atomically, holding everything a resumed run needs to follow the same trajectory.

A checkpoint stores the model, optimizer and scheduler states, the states of the modules the
methods' hooks own (heads, EMA target encoders), the progress (step, epoch,
batches done in the epoch), the RNG states of torch (CPU and CUDA), numpy and python, and the
configuration. It is written to a temporary file in the destination's directory, flushed and
fsync'ed, then renamed over the destination with os.replace: a reader sees the old checkpoint
or the new one, never a partial file, and a failure mid-write leaves the old one untouched.
Everything in it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from .config import TrainConfig, UsageError

PathLike = Union[str, os.PathLike]
# Settings that change the training trajectory: a resumed run must use the checkpoint's values.
TRAJECTORY_KEYS = ("model", "pretrained", "loss", "train_data", "dataset_type", "train_size", "caption",
                   "batch_size", "seed", "lr", "weight_decay", "warmup", "beta1", "beta2", "eps", "grad_clip",
                   "train_num_samples", "dataset_resampled", "epochs", "lr_scheduler", "epochs_cooldown",
                   "lr_cooldown_power", "lr_cooldown_end", "lock_image", "lock_text", "local_loss", "gather_with_grad",
                   "siglip_dist_impl", "precision", "omit", "perturb", "clipc_rate", "clipin", "lambda_inter", "lambda_intra",
                   "ema_momentum", "view_flip", "teacher", "distill_margin", "distill_weight", "distill_kd",
                   "false_negative_threshold")


@dataclass
class Progress:
    """Where training is: optimizer steps done, the current epoch and the batches of it consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def atomic_write(path: PathLike, write: Callable[[Any], None]) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it to `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the user's group
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_states() -> dict[str, Any]:
    """The states of every generator the trainer draws from, as tensors and plain Python values."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gauss": cached_gauss},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def save_checkpoint(path: PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, progress: Progress, config: dict[str, Any],
                    modules: Optional[Mapping[str, torch.nn.Module]] = None, scaler: Any = None,
                    rng_per_rank: Optional[list[dict[str, Any]]] = None,
                    model_state: Optional[dict[str, Any]] = None,
                    optimizer_state: Optional[dict[str, Any]] = None) -> None:
    """Write a resumable checkpoint to `path` atomically (`modules`: the hooks' own parts, by name;
    `scaler`: fp16's gradient scaler, kept when enabled; `rng_per_rank`: every rank's generator states
    when several processes train, each restored on its rank; `model_state`, `optimizer_state`: the
    whole state dicts when the model is sharded, in place of the model's and optimizer's own)."""
    state = {
        "model": model.state_dict() if model_state is None else model_state,
        "modules": {name: module.state_dict() for name, module in (modules or {}).items()},
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
        "rng": rng_states(),
        "config": config,
    }
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    if rng_per_rank is not None and len(rng_per_rank) > 1:
        state["rng_per_rank"] = rng_per_rank
    atomic_write(path, lambda file: torch.save(state, file))


WEIGHTS_NAME = "open_clip_weights.pt"


def export_weights(path: PathLike, model: torch.nn.Module, state: Optional[dict[str, Any]] = None) -> None:
    """Write the model's state dict alone, atomically: the file open_clip loads.

        open_clip.create_model(name, pretrained=path)   # or: --pretrained path, in this trainer

    (a model config shipped with the trainer must be registered first: ``open_clip.add_model_config``
    with pyclipfast/train/configs; a SigLIP model needs ``init_logit_bias`` for its bias.)
    """
    state = {name: tensor.detach().cpu() for name, tensor in (model.state_dict() if state is None else state).items()}
    atomic_write(path, lambda file: torch.save(state, file))


def load_checkpoint(path: PathLike, device: torch.device) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (tensors mapped to `device`, RNG states to the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which, do not guess
        raise UsageError(f"--resume: {path} is not a readable pyclipfast checkpoint ({error})") from error
    missing = {"model", "optimizer", "scheduler", "progress", "rng", "config"} - set(state)
    if missing:
        raise UsageError(f"--resume: {path} is not a pyclipfast trainer checkpoint (missing {sorted(missing)})")
    return state


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise UsageError naming the first trajectory setting that differs from the checkpoint's.

    A setting the checkpoint predates counts as its default.
    """
    defaults = TrainConfig().to_dict()
    for key in TRAJECTORY_KEYS:
        if saved.get(key, defaults[key]) != current.get(key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"--resume: the checkpoint was trained with {flag} {saved.get(key)!r}, this run has "
                             f"{current.get(key)!r}; resume with the same value")


def restore(state: dict[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, modules: Optional[Mapping[str, torch.nn.Module]] = None, scaler: Any = None,
            rank: int = 0) -> Progress:
    """Load the model, the hooks' modules, optimizer, scheduler and scaler states; set the RNGs; return the progress.

    A model sharded by FSDP2 takes the whole tensors (of a sharded or a single-process run) as its shards.
    """
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if sharded:
        set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state["model"])
    modules = modules or {}
    saved_modules = state.get("modules", {})
    if set(saved_modules) != set(modules):
        raise UsageError(f"--resume: the checkpoint holds the modules {sorted(saved_modules)} but this run has "
                         f"{sorted(modules)}; resume with the same methods")
    for name, module in modules.items():
        module.load_state_dict(saved_modules[name])
    optimizer.load_state_dict(_sharded_like(state["optimizer"], optimizer) if sharded else state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    per_rank = state.get("rng_per_rank", [])
    set_rng_states(per_rank[rank] if rank < len(per_rank) else state["rng"])
    return Progress(**state["progress"])


def _sharded_like(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A whole optimizer state dict, each state of a sharded parameter cut to this rank's shard (no communication)."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in saved["state"].items():
        parameter = parameters[int(index)]
        if isinstance(parameter, DTensor):
            values = {key: distribute_tensor(value.to(parameter.device), parameter.device_mesh, parameter.placements,
                                             src_data_rank=None)
                      if isinstance(value, torch.Tensor) and value.shape == parameter.shape else value
                      for key, value in values.items()}
        state[index] = values
    return {**saved, "state": state}
