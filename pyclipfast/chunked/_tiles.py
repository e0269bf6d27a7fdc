"""Tile machinery shared by the chunked PyTorch losses.

The N×M score matrix S = scale·A·Bᵀ is visited one (rows × cols) tile at a
time; a tile is at most ``TILE_ROWS × TILE_COLS`` elements, so the extra memory
is O(tile + (N+M)·D) whatever N and M are. 1024×1024 float32 tiles (4 MB) were
the fastest on the 2-core development CPU (benchmarks/bench_chunked_tiles.py).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional, Tuple

import torch

TILE_ROWS = 1024
TILE_COLS = 1024


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
