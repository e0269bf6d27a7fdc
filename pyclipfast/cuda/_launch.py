"""Host-side helpers shared by the CUDA launchers: tile shape, forward grid, argument preparation.

The kernels take float32 device scalars and vectors (contiguous), int64 ids and
features of any strides; these helpers make the first two from what the autograd
Functions pass, without a host sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from . import _kernels
from .._blocks import split_groups


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int


# One tile of S, fixed in csrc/pyclipfast.h (the gradient blocks are whole tiles).
TILE = TileConfig(_kernels.BLOCK_M, _kernels.BLOCK_N)
# Forward split: at most this many row groups (each keeps an M-long column partial), and
# enough programs for 4 per SM: 4 blocks of 128 threads fit an SM by registers (≤ 128 each)
# and shared memory (≤ 37 KB each). Untuned starting points.
MAX_ROW_GROUPS = 64
PROGRAMS_PER_SM = 4


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_target(x: torch.Tensor) -> int:
    """How many forward programs keep the device busy."""
    return PROGRAMS_PER_SM * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())


def forward_grid(n: int, m: int, x: torch.Tensor) -> tuple:
    """(row_groups, col_groups, row_blocks_per_group, col_blocks_per_group) for N × M scores."""
    return split_groups(math.ceil(n / TILE.block_m), math.ceil(m / TILE.block_n), MAX_ROW_GROUPS, parallel_target(x))


def block_tiles(r0: int, r1: int, c0: int, c1: int) -> int:
    """Tiles (one kernel program each) of the block [r0, r1) × [c0, c1) of S: its partial buffers' length."""
    return math.ceil((r1 - r0) / TILE.block_m) * math.ceil((c1 - c0) / TILE.block_n)


def use_tf32(x: torch.Tensor) -> bool:
    """fp32 products on TF32 tensor cores when torch allows it for matmuls (as the Triton backend)."""
    return x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def scalar_f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(1).contiguous()


def vec_f32(v: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if v is None else v.detach().float().contiguous()


def ids_i64(ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if ids is None else ids.long().contiguous()
