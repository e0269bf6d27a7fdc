"""Helpers for holding every backend to the float64 reference (SPEC §8)."""
from __future__ import annotations

from typing import Sequence

import pytest
import torch
import torch.nn.functional as F

from pyclipfast._dispatch import cuda_extension_available, triton_available

# Relative error ‖out − ref‖ / ‖ref‖ against float64, per input dtype (SPEC §8).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Seeds drawn by `fresh_seed` in the running test; conftest prints them when it fails.
SEEDS: list = []


def fresh_seed() -> int:
    """A new seed for fresh random inputs on every run, recorded so a failure can be replayed."""
    seed = torch.seed() % 2**31
    SEEDS.append(seed)
    return seed


def block_params() -> list:
    """The `blocks` fixture's values: each backend's own blocking, and on a GPU the small one too
    (on the CPU the small blocking runs in each file's small-blocks test, on fewer cases)."""
    return ["default"] + ([pytest.param("small", marks=pytest.mark.gpu)] if HAS_CUDA else [])


def fast_backends() -> list:
    """Backends held to the reference here: chunked torch always; Triton (interpreted on the CPU);
    the CUDA extension when built and a GPU is present."""
    names = ["torch"]
    if triton_available():
        names.append("triton")
    if HAS_CUDA and cuda_extension_available():
        names.append("cuda")
    return names


def dtypes_for(backend: str) -> list:
    """float64 is the torch backend's; bf16 on the CPU only there (the Triton interpreter has no bf16)."""
    if backend == "torch":
        return [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def backend_dtype_params() -> list:
    return [pytest.param(b, d, id=f"{b}-{str(d).removeprefix('torch.')}") for b in fast_backends() for d in dtypes_for(b)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def features(n: int, d: int, *, dtype=torch.float32, device=DEVICE, seed=None, layout: str = "contiguous",
             duplicate_rows: bool = False, normalize: bool = True) -> torch.Tensor:
    """Fresh random (n, d) features.

    layout: "contiguous", "strided" (a view of every other column) or "colmajor" (stride (1, n)).
    duplicate_rows: the second half of the rows repeats the first half.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if duplicate_rows and n > 2:
        x[n // 2:] = x[: n - n // 2]
    if normalize:
        x = F.normalize(x, dim=-1)
    x = x.to(dtype=dtype, device=device)
    if layout == "strided":
        wide = torch.zeros(n, 2 * d, dtype=dtype, device=device)
        wide[:, ::2] = x
        x = wide[:, ::2]
    elif layout == "colmajor":
        x = x.t().contiguous().t()
    return x


def leaves(*tensors: torch.Tensor) -> list:
    """Fresh leaves sharing the values (and strides) that require grad: one backend's inputs."""
    return [t.detach().requires_grad_() for t in tensors]


def as_reference(*tensors: torch.Tensor) -> list:
    """float64 CPU leaves of the same values (the reference's inputs)."""
    return [t.detach().double().cpu().requires_grad_() for t in tensors]


def assert_close_to_reference(out, ref, dtype, names: Sequence[str]) -> None:
    """out/ref: sequences of tensors (loss, gradients...) compared with the dtype's tolerance."""
    tol = TOLERANCE[dtype]
    assert len(out) == len(ref) and len(out) <= len(names), (
        f"{len(out)} outputs, {len(ref)} reference values, names {', '.join(names)}")
    for name, o, r in zip(names, out, ref):
        assert o is not None, f"{name}: no value/gradient produced"
        assert torch.isfinite(o.detach().double()).all(), f"{name}: non-finite values"
        err = rel_err(o, r)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g} ({dtype})"
