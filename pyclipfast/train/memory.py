"""Peak memory of one loss forward + backward: pyclipfast against open_clip, measured the same way.

    CUDA  torch.cuda.max_memory_allocated() over the call, minus what was allocated before
          (the caching allocator's own count of live tensor bytes).
    CPU   PeakTensorMemory: a TorchDispatchMode that sees every tensor an ATen op creates,
          forward and backward, and counts the bytes of storages alive at once (freed when their
          last tensor dies). The CPU has no allocator statistics; this is the same quantity —
          live tensor bytes — without allocator slack, and unlike peak RSS it is not blurred by
          malloc's reuse of freed pages or by other threads.

Both count memory on top of the inputs (features and scale), including the gradients the call
returns (2·N·D floats for either loss).
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created by ATen ops inside the `with` block."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.references: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.references[key] -= 1
        if self.references[key] == 0:
            del self.references[key]
            self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0:
                continue
            key = storage.data_ptr()
            if key not in self.live:
                self.live[key], self.references[key] = storage.nbytes(), 0
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.references[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _inputs(n: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    features = [torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)
                .to(device, dtype).requires_grad_() for _ in range(2)]
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return features[0], features[1], scale, bias


def peak_loss_memory(loss_fn: LossFn, n: int, dim: int, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes on top of the inputs of loss_fn(image, text, scale, bias).backward() on random (n, dim) features."""
    image, text, scale, bias = _inputs(n, dim, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss_fn(image, text, scale, bias).backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    meter = PeakTensorMemory()
    with meter:
        loss_fn(image, text, scale, bias).backward()
    return meter.peak


def memory_method(device: torch.device) -> str:
    """One line saying how `peak_loss_memory` measured on `device`."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over one fwd+bwd, above the inputs"
    return "peak live tensor bytes of one fwd+bwd (TorchDispatchMode over every ATen op), above the inputs"


def compare_loss_memory(loss: str, n: int, dim: int, device: torch.device, backend: str = "auto",
                        dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """{"pyclipfast": bytes, "open_clip": bytes} for the CLIP or SigLIP loss at batch n, width dim."""
    import open_clip

    import pyclipfast

    if loss == "clip":
        ours, theirs = pyclipfast.ClipLoss(backend=backend), open_clip.loss.ClipLoss()
        calls = {"pyclipfast": lambda a, b, s, _: ours(a, b, s), "open_clip": lambda a, b, s, _: theirs(a, b, s)}
    else:
        ours, theirs = pyclipfast.SigLipLoss(backend=backend), open_clip.loss.SigLipLoss()
        calls = {"pyclipfast": ours, "open_clip": theirs}
    return {name: peak_loss_memory(call, n, dim, device, dtype) for name, call in calls.items()}
