"""Where a run executes: the device, torch.distributed (torchrun), seeding and gradient sync.

Launched by torchrun (WORLD_SIZE > 1 in the environment), each process joins the default
process group (NCCL on CUDA, gloo on CPU; with a timeout, and on CUDA bound to its device)
and takes the GPU LOCAL_RANK. The model's two towers train inside torch's
DistributedDataParallel (`Towers`): it broadcasts rank 0's parameters at the start and
all-reduces the gradients, overlapped with the backward pass. DDP averages over the ranks
while pyclipfast's distributed losses give every rank its share of the gradient of the
*global* loss (their sum is the single-process gradient), so the trainer back-propagates
W times the loss: the average is then the single-process gradient.

With --fsdp the towers are sharded instead (`sharded_towers`, torch's FSDP2 `fully_shard`): every
transformer block, then the whole model, holds 1/W of its parameters, gradients and optimizer
state; a block's parameters are gathered for its forward and backward, and its gradients
reduce-scattered (averaged, as DDP does). Checkpoints gather whole state dicts (`full_state`).
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import pyclipfast.distributed as pcf_dist

from .config import UsageError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None else int(value)


def setup_runtime(device: str, timeout_minutes: float = 30.0) -> Runtime:
    """Pick the device ("auto", "cpu", "cuda") and join torch.distributed if launched by torchrun.

    A collective that waits longer than `timeout_minutes` (a rank that died, a save slower than
    that) ends the job with an error instead of hanging. Raises UsageError naming --device when
    CUDA is asked for and absent.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                device_id=chosen if use_cuda else None)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return Runtime(chosen, rank, world_size)


def choose_threads(requested: int | None, device: torch.device) -> str | None:
    """Set torch's CPU threads for a CPU run: `requested`, else all cores but one.

    Every OpenMP parallel region waits for its slowest thread: when another process (the data
    loader, an editor, a test run) takes a core, a thread pool as large as the machine stalls at
    every op, and on a 2-core machine shared with other work one thread trained 2-5x faster than
    two. Leaving a core free costs little when the machine is idle. Returns a note saying what
    was chosen (None when nothing was changed).
    """
    if requested is not None:
        torch.set_num_threads(requested)
        return None
    if device.type != "cpu":
        return None
    cores = os.cpu_count() or 1
    threads = max(1, min(torch.get_num_threads(), cores - 1))
    if threads == torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    return f"using {threads} of {cores} CPU threads, leaving one core free (--threads overrides)"


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Towers(torch.nn.Module):
    """A CLIP model's two encoders behind one forward: what DistributedDataParallel wraps.

    DDP synchronises the gradients of what runs through its forward; the towers are called
    apart (gradient caching encodes them in separate chunks), so forward(images=..., tokens=...)
    runs whichever is given and returns their unnormalised features in that order.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Optional[torch.Tensor] = None,
                tokens: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        features = []
        if images is not None:
            features.append(self.model.encode_image(images))
        if tokens is not None:
            features.append(self.model.encode_text(tokens))
        return features


# Parameters the loss uses directly, outside the towers' forward: DDP leaves them alone (`average_scales`).
SCALES = ("logit_scale", "logit_bias")


def distributed_towers(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """`Towers(model)`, inside DistributedDataParallel on several processes.

    find_unused_parameters: a gradient-caching chunk runs one tower only. The logit scale and
    bias get their gradient from the loss, outside any forward of the towers, which DDP's
    bookkeeping cannot follow: it ignores them and `average_scales` averages their gradients.
    """
    towers = Towers(model)
    if runtime.world_size == 1:
        return towers
    ignored = [f"model.{name}" for name, _ in model.named_parameters() if name in SCALES]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(towers, ignored)
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(towers, device_ids=device_ids, find_unused_parameters=True)


def sharded_towers(model: torch.nn.Module, runtime: Runtime) -> Towers:
    """`Towers(model)` with the model sharded by FSDP2 over the processes (--fsdp): the parameters become DTensors.

    Each transformer block (open_clip's ResidualAttentionBlock, or any module with a `resblocks`
    list) is a unit of its own, the rest of the model one more; the logit scale and bias stay whole
    (the loss uses them outside the towers; `average_scales` averages their gradients). Rank 0's
    parameters and buffers are broadcast first, as DDP does. encode_image
    and encode_text gather the parameters as forward does, so evaluation and the towers call them directly.
    Build the optimizer after this: the model's parameters are new objects.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if runtime.world_size == 1:
        return Towers(model)
    blocks = [block for module in model.modules() if isinstance(getattr(module, "resblocks", None), torch.nn.ModuleList)
              for block in module.resblocks]
    with torch.no_grad():  # every rank starts from rank 0's model, as under DDP
        for tensor in (*model.parameters(), *model.buffers()):
            dist.broadcast(tensor, src=0)
    for block in blocks:
        fully_shard(block)
    fully_shard(model, ignored_params={p for name, p in model.named_parameters() if name in SCALES})
    for method in ("encode_image", "encode_text"):
        register_fsdp_forward_method(model, method)
    return Towers(model)


@contextmanager
def fsdp_no_sync(model: torch.nn.Module) -> Iterator[None]:
    """FSDP2's DDP.no_sync: gradients accumulate unsharded on each rank, reduce-scattered at the next synced step."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` has parameters sharded by FSDP2 (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state(value):
    """`value` (a state dict, nested dicts and lists) with every DTensor gathered whole onto the CPU.

    A collective when sharded: every rank calls it with the same structure.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if isinstance(value, dict):
        return {key: full_state(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full_state(item) for item in value)
    return value


def average_scales(model: torch.nn.Module, runtime: Runtime) -> None:
    """Average the gradients of the logit scale and bias over the ranks (DDP averages the rest)."""
    if runtime.world_size == 1:
        return
    grads = [p.grad for name, p in model.named_parameters() if name in SCALES and p.grad is not None]
    if grads:
        flat = torch.stack([g.reshape(()) for g in grads])
        dist.all_reduce(flat)
        for grad, value in zip(grads, flat / runtime.world_size):
            grad.fill_(value)


def all_reduce_mean(value: float, runtime: Runtime) -> float:
    """The mean of a Python float over the ranks."""
    if runtime.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / runtime.world_size


def all_gather_with_grad(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows joined in rank order; the backward returns each rank its rows' gradient summed."""
    return pcf_dist.all_gather_with_grad(rows)


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows joined in rank order, without autograd."""
    with torch.no_grad():
        return pcf_dist.all_gather_with_grad(rows.detach())


def global_term(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """A loss term every rank computes on the global batch, as this rank's share of it.

    The value stays the global value (what is logged); the gradient is 1/W of it, so that the
    gradients summed over the ranks (features through the gather's backward, parameters by DDP's
    all-reduce of W·loss) are the single-process gradient of the term.
    """
    share = value / world_size
    return share + (value - share).detach()


def broadcast_object(value, runtime: Runtime):
    """Rank 0's `value` (any picklable object) on every rank."""
    if runtime.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value, runtime: Runtime) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if runtime.world_size == 1:
        return [value]
    values: list = [None] * runtime.world_size
    dist.all_gather_object(values, value)
    return values
