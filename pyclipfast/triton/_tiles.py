"""Shared Triton machinery: one tile of S = A·Bᵀ, numerically safe helpers and
launch configuration (the host-side block loop lives in pyclipfast/_blocks.py).

Every fused loss kernel is "score tile + an epilogue": `score_tile` loads a
BLOCK_M×BLOCK_N tile of ⟨A_i, B_j⟩ with fp32 accumulation (tensor cores for
16-bit inputs; IEEE or TF32 for fp32 per torch.backends.cuda.matmul.allow_tf32),
and the loss-specific kernel adds only what it does with the tile.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _blocks
from .._blocks import blocked_grads, merge_lse  # noqa: F401  (re-exported for the kernels' modules)
from .._dispatch import triton_interpreting


@triton.jit
def score_tile(a_ptr, b_ptr, offs_m, offs_n, n_rows, n_cols, dim,
               stride_am, stride_ak, stride_bn, stride_bk,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr):
    """acc[m, n] = ⟨A[offs_m], B[offs_n]⟩ in fp32; rows/cols out of range read as zeros.

    Offsets are int64 for any layout: a column-major (D, N) operand has stride_ak = N, and
    k·N passes 2³¹ long before the memory runs out.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    row_ok = offs_m[:, None] < n_rows
    col_ok = offs_n[None, :] < n_cols
    for k in range(0, dim, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = offs_k < dim
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=row_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None] * stride_bk, mask=k_ok[:, None] & col_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def positive_tile(row_ids_ptr, col_ids_ptr, offs_m, offs_n, n_rows, n_cols, POS_MODE: tl.constexpr):
    """pos[m, n]: 0 = diagonal (i == j), 1 = equal ids, 2 = no positives. Out-of-range is False.
    The ids are contiguous int64 (`ids_or_dummy`)."""
    valid = (offs_m[:, None] < n_rows) & (offs_n[None, :] < n_cols)
    if POS_MODE == 0:
        pos = offs_m[:, None] == offs_n[None, :]
    elif POS_MODE == 1:
        rid = tl.load(row_ids_ptr + offs_m, mask=offs_m < n_rows, other=-1)
        cid = tl.load(col_ids_ptr + offs_n, mask=offs_n < n_cols, other=-2)
        pos = rid[:, None] == cid[None, :]
    else:
        pos = offs_m[:, None] < 0
    return pos & valid


@triton.jit
def finite_or_zero(x):
    """x where finite, 0 where x = -inf: a safe shift for exp(v - shift) when a row is all -inf."""
    return tl.where(x == float("-inf"), 0.0, x)


@triton.jit
def log1p_small(x):
    """log(1 + x) for x in [0, 1], accurate for tiny x (Triton's interpreter has no log1p)."""
    return tl.where(x < 1e-4, x * (1.0 - x * (0.5 - x / 3.0)), tl.log(1.0 + x))


@triton.jit
def softplus(z):
    """log(1 + e^z) without overflow."""
    return tl.maximum(z, 0.0) + log1p_small(tl.exp(-tl.abs(z)))


@triton.jit
def online_lse(run_max, run_sum, x, AXIS: tl.constexpr):
    """Merge tile x, reduced along AXIS, into a running (max, Σ exp(x − max)).

    Returns (new_max, new_sum, rescale, e): rescale = exp(old_max − new_max) and
    e = exp(x − new_max), for callers that keep further exp-weighted sums
    (Σ e·y: multiply the old one by rescale, add tl.sum(e·y, AXIS)). Lines that
    are all −∞ so far (out of range, filtered) stay at max −∞, sum 0, NaN-free.
    """
    new_max = tl.maximum(run_max, tl.max(x, AXIS))
    shift = finite_or_zero(new_max)
    rescale = tl.exp(run_max - shift)
    e = tl.exp(x - tl.expand_dims(shift, AXIS))
    return new_max, run_sum * rescale + tl.sum(e, AXIS), rescale, e


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Block sizes. On the GPU these are starting points (tuned by benchmarks/, see README);
# under TRITON_INTERPRET they are small so tests cover many tiles at N ≤ ~300.
INTERPRET_CONFIG = TileConfig(32, 32, 32, 4, 1)
# Forward split: at most this many row groups (each keeps an M-long column partial).
MAX_ROW_GROUPS = 64
INTERPRET_MAX_ROW_GROUPS = 2


def tile_config(x: torch.Tensor) -> TileConfig:
    if triton_interpreting():
        return INTERPRET_CONFIG
    if x.dtype == torch.float32:
        return TileConfig(64, 64, 32, 4, 3)
    return TileConfig(128, 128, 64, 8, 3)


def dot_precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not triton_interpreting():
        return "tf32"
    return "ieee" if x.dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_target(x: torch.Tensor) -> int:
    """How many programs keep the device busy."""
    if triton_interpreting() or x.device.type != "cuda":
        return 4
    return 2 * _sm_count(x.device.index or 0)


def split_groups(n_row_blocks: int, n_col_blocks: int, x: torch.Tensor):
    """(row_groups, col_groups, row_blocks_per_group, col_blocks_per_group) for the forward sweep."""
    max_row_groups = INTERPRET_MAX_ROW_GROUPS if triton_interpreting() else MAX_ROW_GROUPS
    return _blocks.split_groups(n_row_blocks, n_col_blocks, max_row_groups, parallel_target(x))


def ids_or_dummy(ids: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The ids as the kernels read them (contiguous int64), or a placeholder when there are none."""
    if ids is None:
        return torch.empty(1, dtype=torch.int64, device=like.device)
    return ids.to(torch.int64).contiguous()


def on_input_device(launcher):
    """Run a host launcher with its first tensor's GPU as the current device: Triton launches on the
    current device, so tensors on cuda:1 while cuda:0 is current would otherwise fail or touch the
    wrong device (a no-op for CPU tensors under the interpreter)."""

    @functools.wraps(launcher)
    def launch(x: torch.Tensor, *args, **kwargs):
        guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return launcher(x, *args, **kwargs)

    return launch


def block_grid(r0: int, r1: int, c0: int, c1: int, cfg: TileConfig) -> tuple:
    """(row tiles, column tiles) of the gradient block [r0, r1) × [c0, c1): one program per tile.
    `_blocks.grad_block_shape` keeps the column count within the grid's y limit."""
    grid = (triton.cdiv(r1 - r0, cfg.block_m), triton.cdiv(c1 - c0, cfg.block_n))
    if grid[1] > _blocks.MAX_GRID_Y:
        raise RuntimeError(f"gradient block {r1 - r0}x{c1 - c0} needs {grid[1]} column tiles > {_blocks.MAX_GRID_Y}")
    return grid


def vec_or_dummy(v: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return v.float().contiguous() if v is not None else torch.empty(1, dtype=torch.float32, device=like.device)
