"""Where a run executes: the device, torch.distributed (torchrun), seeding and gradient sync.

Launched by torchrun (WORLD_SIZE > 1 in the environment), each process joins the default
process group (NCCL on CUDA, gloo on CPU) and takes the GPU LOCAL_RANK. Parameter gradients
are summed over the ranks after the backward pass (`sum_gradients`): with pyclipfast's
distributed losses every rank holds its share of the gradient of the *global* loss, so the
sum is the single-process gradient of the global batch.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

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


def setup_runtime(device: str) -> Runtime:
    """Pick the device ("auto", "cpu", "cuda") and join torch.distributed if launched by torchrun.

    Raises UsageError naming --device when CUDA is asked for and absent.
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
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
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


def sum_gradients(parameters, runtime: Runtime) -> None:
    """All-reduce (sum) the gradients of `parameters` over the ranks, flattened into one buffer."""
    if runtime.world_size == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:  # unused on this rank: it still takes part in the sum
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


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
    gradients summed over the ranks (features through the gather's backward, parameters by
    `sum_gradients`) are the single-process gradient of the term.
    """
    share = value / world_size
    return share + (value - share).detach()
