"""Helpers for holding every backend to the float64 reference."""
from __future__ import annotations

from typing import Sequence

import pytest
import torch
import torch.nn.functional as F

from pyclipfast._dispatch import cuda_extension_available, triton_available

# Relative error ‖out − ref‖ / ‖ref‖ against float64, per input dtype.
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


def assert_close_to_reference(out, ref, dtype, names: Sequence[str], baseline=None) -> None:
    """out/ref: sequences of tensors (loss, gradients...) compared with the dtype's tolerance.

    baseline: the same values computed by plain materialised PyTorch in `dtype` on the same
    inputs. A scalar such as the scale's gradient Σ G_ij·⟨A_i, B_j⟩ can cancel to near zero,
    where no summation order reaches the dtype's relative tolerance; each value then passes
    at up to twice plain PyTorch's own error, never looser than the dtype's tolerance.
    """
    tol = TOLERANCE[dtype]
    assert len(out) == len(ref) and len(out) <= len(names), (
        f"{len(out)} outputs, {len(ref)} reference values, names {', '.join(names)}")
    assert baseline is None or len(baseline) == len(ref), f"{len(baseline)} baseline values"
    for k, (name, o, r) in enumerate(zip(names, out, ref)):
        assert o is not None, f"{name}: no value/gradient produced"
        assert torch.isfinite(o.detach().double()).all(), f"{name}: non-finite values"
        err = rel_err(o, r)
        limit = tol if baseline is None else max(tol, 2 * rel_err(baseline[k], r))
        assert err <= limit, f"{name}: relative error {err:.3g} > {limit:g} ({dtype})"


# The small blocking: 16×16×16 Triton tiles, up to 64 forward row groups and 16 programs' worth
# of column groups, gradient blocks of 3 tiles with at most 2 tiles along the columns (the
# grid.y cap), 8×12 chunked tiles, 5-row cosine chunks.
SMALL_TILE = dict(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
SMALL_GRAD_BLOCK_ELEMENTS = 3 * 16 * 16


def apply_small_blocks(monkeypatch):
    """Many row groups (the column partials merged across groups), many gradient blocks (block
    offsets into G, ids and statistics) and tiny, ragged tiles on every backend."""
    from pyclipfast import _blocks
    from pyclipfast.chunked import _tiles as chunked_tiles
    from pyclipfast.chunked import cosine as chunked_cosine

    monkeypatch.setattr(chunked_tiles, "TILE_ROWS", 8)
    monkeypatch.setattr(chunked_tiles, "TILE_COLS", 12)
    monkeypatch.setattr(chunked_cosine, "CHUNK_ROWS", 5)
    monkeypatch.setattr(_blocks, "GRAD_BLOCK_ELEMENTS", SMALL_GRAD_BLOCK_ELEMENTS)
    monkeypatch.setattr(_blocks, "INTERPRET_GRAD_BLOCK_ELEMENTS", SMALL_GRAD_BLOCK_ELEMENTS)
    monkeypatch.setattr(_blocks, "MAX_GRID_Y", 2)
    from pyclipfast._dispatch import triton_available

    if not triton_available():
        return
    from pyclipfast.triton import _tiles as triton_tiles
    from pyclipfast.triton import clip, cosine, distill, retrieval, siglip

    small = triton_tiles.TileConfig(**SMALL_TILE)
    for module in (clip, siglip, distill, retrieval):
        monkeypatch.setattr(module, "tile_config", lambda x: small)
    monkeypatch.setattr(triton_tiles, "MAX_ROW_GROUPS", 64)
    monkeypatch.setattr(triton_tiles, "INTERPRET_MAX_ROW_GROUPS", 64)
    monkeypatch.setattr(triton_tiles, "parallel_target", lambda x: 16)
    monkeypatch.setattr(retrieval, "parallel_target", lambda x: 16)
    monkeypatch.setattr(cosine, "MAX_BLOCK_D", 16)
    monkeypatch.setattr(cosine, "BLOCK_ELEMENTS", 64)
