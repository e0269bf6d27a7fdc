"""Pieces the op modules share: random inputs, pyclipfast backends as `Impl`s, peer checks."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..registry import Context, Impl, Inputs

PYCLIPFAST_BACKENDS = ("torch", "triton", "cuda")
# open_clip's initial scales: exp(log(1/0.07)) for InfoNCE; SigLIP starts at s = 10, b = -10.
CLIP_LOG_SCALE = math.log(1 / 0.07)
SIGLIP_LOG_SCALE, SIGLIP_BIAS = math.log(10.0), -10.0
FEATURE_BLOCK_ROWS = 1 << 16


def unit_features(rows: int, cols: int, ctx: Context, gen: torch.Generator, grad: bool = True) -> torch.Tensor:
    """Random L2-normalised rows (rows × cols) in the case's dtype: what a CLIP tower emits.

    Drawn in float32 blocks of `FEATURE_BLOCK_ROWS` rows, so building a batch of millions of rows
    never needs more than one block of float32 scratch beside the result.
    """
    out = torch.empty(rows, cols, dtype=ctx.dtype, device=ctx.device)
    for start in range(0, rows, FEATURE_BLOCK_ROWS):
        stop = min(start + FEATURE_BLOCK_ROWS, rows)
        block = torch.randn(stop - start, cols, generator=gen, device=ctx.device, dtype=torch.float32)
        out[start:stop] = torch.nn.functional.normalize(block, dim=1)
    return out.requires_grad_(grad)


def scalar(value: float, ctx: Context, grad: bool = True) -> torch.Tensor:
    """A float32 scalar leaf (scales and biases are kept in float32, as open_clip keeps them)."""
    return torch.tensor(value, dtype=torch.float32, device=ctx.device, requires_grad=grad)


def contrastive_inputs(log_scale: float, bias: Optional[float] = None) -> Callable[[Context, torch.Generator], Inputs]:
    """Input builder for image/text losses: features a (N×D), b (M×D), log_scale, optional bias."""

    def make(ctx: Context, gen: torch.Generator) -> Inputs:
        s = ctx.shape
        tensors = {"a": unit_features(s.n, s.d, ctx, gen), "b": unit_features(s.cols, s.d, ctx, gen),
                   "log_scale": scalar(log_scale, ctx)}
        if bias is not None:
            tensors["bias"] = scalar(bias, ctx)
        return Inputs(tensors, tuple(tensors))

    return make


def pyclipfast_impls(loss: str, call: Callable[[dict, str], object],
                     reference_note: str = "pyclipfast backend='reference': materialised N×M PyTorch") -> list:
    """One `Impl` per pyclipfast backend of `loss` ("pcf-torch", "pcf-triton", "pcf-cuda") and the
    plain PyTorch reference backend ("reference").

    `loss` is the dispatcher's name for the op; `call(tensors, backend)` computes it with ``backend=...``.
    """
    impls = [Impl(name=f"pcf-{backend}", kind="pyclipfast", make_call=_bind(call, backend),
                  usable=_backend_check(loss, backend), notes=_backend_note(backend))
             for backend in PYCLIPFAST_BACKENDS]
    impls.append(Impl(name="reference", kind="baseline", make_call=_bind(call, "reference"), notes=reference_note))
    return impls


def _bind(call, backend: str):
    return lambda ctx: (lambda tensors: call(tensors, backend))


def _backend_note(backend: str) -> str:
    if backend == "triton" and not torch.cuda.is_available():
        return "Triton interpreter on the CPU: times the interpreter, not a kernel"
    return ""


def _backend_check(loss: str, backend: str) -> Callable[[Context], Optional[str]]:
    """`usable` for a pyclipfast backend: asks the dispatcher, which names what is missing."""

    def check(ctx: Context) -> Optional[str]:
        from pyclipfast import _dispatch

        if backend == "triton" and ctx.device == "cpu" and ctx.dtype == torch.bfloat16:
            return "the Triton interpreter has no bf16 (triton issue 11584)"
        probe = torch.zeros(0, dtype=ctx.dtype, device=ctx.device)
        try:
            _dispatch.resolve(loss, backend, probe)
        except (ValueError, TypeError) as exc:
            return str(exc)
        return None

    return check


def cuda_only(ctx: Context) -> Optional[str]:
    return None if ctx.device == "cuda" else "runs on CUDA only"


def compile_on_cuda_only(ctx: Context) -> Optional[str]:
    if ctx.device != "cuda":
        return "torch.compile'd peers are benchmarked on CUDA only (on the CPU, compile time dominates)"
    return None


def compiled(fn: Callable) -> Callable:
    """`fn` through torch.compile with static shapes; dynamo's cache is reset first so a sweep over
    many shapes never hits the recompile limit (past which dynamo silently runs eager code)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)
