"""Tile machinery shared by the chunked PyTorch losses.

The N×M score matrix S = scale·A·Bᵀ is visited one (rows × cols) tile at a
time; a tile is at most ``TILE_ROWS × TILE_COLS`` elements, so the extra memory
is O(tile + (N+M)·D) whatever N and M are. 1024×1024 float32 tiles (4 MB) were
the fastest on the 2-core development CPU (benchmarks/bench_chunked_tiles.py).
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Iterator, Optional, Tuple

import torch

TILE_ROWS = 1024
TILE_COLS = 1024

# float32 exp (and softplus) on the CPU leaves its vector path when the result underflows the normal
# range, an argument below about −87.3: a 1024×1024 tile of such arguments takes 30–85 ms instead of
# 0.5 ms on the development CPU; and exponentials just above it, multiplied by the features in the
# gradient matmuls, give subnormal products that slow the matmul as much. Scores spread that wide
# are the trained regime (logit scale 100, positives far above the negatives: open_clip's own loss
# then runs ~30× slower, benchmarks/bench_score_spread.py), so the sweeps floor such arguments at
# EXP_FLOOR (`floor_`): exp(−64) ≈ 1.6e-28 then stands in for a smaller term (a false negative
# filtered out by the teacher included), far below the float32 resolution of any sum or gradient it
# enters; a pair excluded by a pair rule stays exactly 0. Arguments that cannot reach the floor (the
# bound from `score_bound`) are left alone, so the usual regime pays no extra pass.
EXP_FLOOR = -64.0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 features, float32 otherwise (statistics are never kept in 16 bits)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def nonfinite_poison(dtype: torch.dtype, *tensors: torch.Tensor) -> torch.Tensor:
    """0 when every value of the tensors is finite, NaN otherwise (a 0-dim tensor, no host sync).

    Added to a statistic, it makes a non-finite input show in the loss where the tile math would
    drop it (a −∞ score vanishes from a log-sum-exp and from Σ softplus)."""
    return sum(_finite_times_zero(t.detach(), dtype) for t in tensors)


def _finite_times_zero(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(max·0 + min·0) of t: 0, or NaN when t holds an infinity or a NaN; one pass, no copy of t."""
    low, high = torch.aminmax(t)
    return low.to(dtype) * 0 + high.to(dtype) * 0


def floors(features: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the exp floor applies to a sweep over these features in this compute dtype (float32 on
    the CPU: see EXP_FLOOR)."""
    return dtype == torch.float32 and features.device.type == "cpu"


def floored(features: torch.Tensor, dtype: torch.dtype, lowest: float) -> bool:
    """Whether an exp argument whose lower bound is `lowest` is floored: not for a non-finite bound
    (a non-finite input, whose statistics are NaN however fast they come)."""
    return floors(features, dtype) and -math.inf < lowest < EXP_FLOOR


def floor_(x: torch.Tensor, lowest: float) -> torch.Tensor:
    """x floored at EXP_FLOOR in place before an exp or softplus, when `lowest` (a lower bound of x)
    says it may reach below (float32 CPU tensors only: see EXP_FLOOR)."""
    if floored(x, x.dtype, lowest):
        x.clamp_min_(EXP_FLOOR)
    return x


def score_bound(scale: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """|scale|·max‖a_i‖·max‖b_j‖ ≥ |scale·⟨a_i, b_j⟩| (one pass over the features, a host sync)."""
    norm = lambda x: float(torch.linalg.vector_norm(x, dim=1).max()) if x.shape[0] else 0.0
    return abs(float(scale)) * norm(a) * norm(b)


def lowest_below(bound: float, shift: torch.Tensor) -> float:
    """A lower bound of x_ij − shift_i when |x_ij| ≤ bound: −bound − max(shift) (0 for no shift)."""
    return -bound - float(shift.max()) if shift.numel() else 0.0


_shared = threading.local()


@contextlib.contextmanager
def shared_scratch():
    """Within it, the chunked sweeps of this thread take their scratch tiles and row buffers from one
    set, allocated by the first sweep that needs them and released at the end. For a loop of sweeps
    (the blocks of one rank's SigLIP step): each block would otherwise allocate and free the same
    buffers, and the freed ones leave holes in the CPU heap between the gradients the blocks keep."""
    outer = getattr(_shared, "buffers", None)
    if outer is None:
        _shared.buffers = {}
    try:
        yield
    finally:
        if outer is None:
            _shared.buffers = None


def scratch_buffer(key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least `numel` elements: a fresh one, or inside `shared_scratch` the set's."""
    buffers = getattr(_shared, "buffers", None)
    if buffers is None:
        return torch.empty(numel, dtype=dtype, device=device)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def spans(total: int, step: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, total, step):
        yield start, min(start + step, total)


class TileScores:
    """Scratch buffers and the score computation for one tile shape."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor):
        self.cd = compute_dtype(a)
        self.a, self.b = a, b
        self.scale = scale.detach().to(self.cd)
        rows, cols = min(TILE_ROWS, a.shape[0]), min(TILE_COLS, b.shape[0])
        self._s = scratch_buffer("scores", rows * cols, self.cd, a.device)
        self._e = scratch_buffer("scratch", rows * cols, self.cd, a.device)

    @functools.cached_property
    def bound(self) -> float:
        """|s|·max‖A_i‖·max‖B_j‖ ≥ |S_ij| for every score (inf where the floor does not apply)."""
        return score_bound(self.scale, self.a, self.b) if self.floors else float("inf")

    @property
    def floors(self) -> bool:
        return floors(self.a, self.cd)

    def rows(self, i0: int, i1: int) -> torch.Tensor:
        return self.a[i0:i1].to(self.cd)

    def scaled(self, a_rows: torch.Tensor) -> torch.Tensor:
        """scale · a_rows: the scale folded into the (small) row block instead of every tile."""
        return a_rows * self.scale

    def cols(self, j0: int, j1: int) -> torch.Tensor:
        return self.b[j0:j1].to(self.cd)

    def scores(self, scaled_rows: torch.Tensor, b_cols: torch.Tensor) -> torch.Tensor:
        """S = (scale · a_rows) · b_colsᵀ in the first scratch buffer."""
        s = self._s[: scaled_rows.shape[0] * b_cols.shape[0]].view(scaled_rows.shape[0], b_cols.shape[0])
        return torch.mm(scaled_rows, b_cols.T, out=s)

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        return self._e[: like.numel()].view_as(like)


def diagonal_span(i0: int, i1: int, j0: int, j1: int) -> Optional[Tuple[int, int, int]]:
    """Where the global diagonal i == j crosses tile [i0:i1, j0:j1].

    Returns (offset, g0, g1): the tile's diagonal ``offset`` (for torch.diagonal)
    and the global indices g0:g1 it covers, or None if it misses the tile.
    """
    g0, g1 = max(i0, j0), min(i1, j1)
    if g0 >= g1:
        return None
    return i0 - j0, g0, g1


def positive_tile(row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor],
                  i0: int, i1: int, j0: int, j1: int):
    """The positive pairs of a tile: ('diag', span) for default ids, ('mask', bool tile) with ids."""
    if row_ids is None:
        return "diag", diagonal_span(i0, i1, j0, j1)
    return "mask", row_ids[i0:i1, None] == col_ids[None, j0:j1]


def add_positive_grad(g: torch.Tensor, row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor],
                      i0: int, i1: int, j0: int, j1: int,
                      g_row_pos: Optional[torch.Tensor], g_col_pos: Optional[torch.Tensor]) -> None:
    """g += pos_ij·(g_row_pos_i + g_col_pos_j) on one tile: the gradient of Σ_j pos_ij S_ij sums."""
    if g_row_pos is None and g_col_pos is None:
        return
    kind, pos = positive_tile(row_ids, col_ids, i0, i1, j0, j1)
    if kind == "diag":
        if pos is None:
            return
        k, g0, g1 = pos
        d = g.diagonal(k)
        if g_row_pos is not None:
            d += g_row_pos[g0:g1]
        if g_col_pos is not None:
            d += g_col_pos[g0:g1]
        return
    w = torch.zeros_like(g)
    if g_row_pos is not None:
        w += g_row_pos[i0:i1, None]
    if g_col_pos is not None:
        w += g_col_pos[None, j0:j1]
    g.add_(w.mul_(pos))
