"""Backend selection: which implementation computes a loss.

    "reference"  materialised PyTorch (the N×M matrix exists): ground truth for tests
    "torch"      chunked PyTorch, never more than a tile of the N×M matrix: the CPU default
    "triton"     fused Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
    "cuda"       the CUDA C++ kernel library pyclipfast/cuda/libpyclipfast_cuda.so (CUDA tensors)
    "auto"       triton (or cuda) on CUDA tensors when available, torch otherwise

Each fast backend lives in its own folder with one file per loss
(``pyclipfast/chunked/clip.py``, ``pyclipfast/triton/clip.py``, ...); this module
maps a (loss, backend) pair to that file.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cuda", "torch", "reference")
_FOLDER = {"torch": "chunked", "triton": "triton", "cuda": "cuda"}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=None)
def cuda_library_error() -> Optional[str]:
    """Why the CUDA kernel library cannot be used here, or None when it loads."""
    try:
        importlib.import_module("pyclipfast.cuda")
    except ImportError as err:
        return str(err)
    return None


def cuda_extension_available() -> bool:
    return cuda_library_error() is None


def _auto(loss: str, device_type: str, dtype: torch.dtype) -> str:
    if device_type != "cuda" or dtype == torch.float64:
        return "torch"
    if triton_available() and _has_impl(loss, "triton"):
        return "triton"
    if cuda_extension_available() and _has_impl(loss, "cuda"):
        return "cuda"
    return "torch"


@lru_cache(maxsize=None)
def _has_impl(loss: str, backend: str) -> bool:
    try:
        importlib.import_module(f"pyclipfast.{_FOLDER[backend]}.{loss}")
    except ModuleNotFoundError:
        return False
    return True


def resolve(loss: str, backend: str, x: torch.Tensor) -> str:
    """The concrete backend name for `loss` on tensors like `x` (raises if unusable).

    For a fused backend its torch.library operators are registered here (pyclipfast/_ops.py).
    torch.compile runs this once per graph, outside it (it depends only on the device type and
    dtype, which the graph's guards cover), so imports and registration never break a graph.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return _resolve(loss, backend, x.device.type, x.dtype)


@torch.compiler.assume_constant_result
def _resolve(loss: str, backend: str, device_type: str, dtype: torch.dtype) -> str:
    name = _concrete(loss, backend, device_type, dtype)
    if name != "reference" and _has_impl(loss, name):
        from . import _ops

        _ops.ops(loss, name)
        if loss == "clip":  # the rows-only pair-rule operator shares the InfoNCE kernels
            _ops.ops("clip_pairs", name)
    return name


def _concrete(loss: str, backend: str, device_type: str, dtype: torch.dtype) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "auto":
        return _auto(loss, device_type, dtype)
    if backend in ("reference", "torch"):
        return backend
    if dtype == torch.float64:
        raise TypeError(
            f"backend={backend!r} supports float16, bfloat16 and float32 features, got float64; "
            "use backend='torch' (chunked) or 'reference' for float64"
        )
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if device_type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device_type}); set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels on the CPU interpreter"
            )
    if backend == "cuda":
        if device_type != "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"backend='cuda' needs a CUDA GPU and none is present (the tensors are on {device_type})")
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {device_type}")
        if not cuda_extension_available():
            raise ValueError(f"backend='cuda' cannot run: {cuda_library_error()}")
    if not _has_impl(loss, backend):
        raise ValueError(f"backend={backend!r} has no implementation of {loss}")
    return backend


def implementation(loss: str, backend: str) -> ModuleType:
    """The module holding `loss`'s kernels for a concrete (non-reference) backend."""
    return importlib.import_module(f"pyclipfast.{_FOLDER[backend]}.{loss}")
