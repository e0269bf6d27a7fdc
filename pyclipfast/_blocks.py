"""Device-neutral host helpers shared by the kernel backends (Triton, CUDA).

`blocked_grads` turns gradient tiles written by a fused kernel into
dA = G·B and dB = Gᵀ·A: G exists one block (rows × cols) at a time and the
two products run as GEMMs (cuBLAS on the GPU), so a backward pass does the
minimum 4·N·M·D FLOPs beyond the score recomputation. `merge_lse` and
`merge_weighted` combine per-group (max, sum-exp[, exp-weighted sum]) partials
from a split forward sweep, whose grid `split_groups` chooses.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Dict

import torch

from ._dispatch import triton_interpreting

# Elements of the N×M gradient held at once by the blocked dA/dB GEMMs (128 MB in bf16).
GRAD_BLOCK_ELEMENTS = 1 << 26
# Under TRITON_INTERPRET (CPU tests) blocks are tiny so small shapes span several.
INTERPRET_GRAD_BLOCK_ELEMENTS = 64 * 96
# CUDA's grid.y limit: a gradient block has at most this many tiles along its columns (the kernels
# put row tiles on grid.x, limit 2³¹ − 1).
MAX_GRID_Y = 65535


def merge_lse(part_max: torch.Tensor, part_sum: torch.Tensor) -> torch.Tensor:
    """Combine (max, sum-exp) partials along dim 0 into log-sum-exp."""
    top = part_max.amax(0)
    return top + torch.log((part_sum * torch.exp(part_max - top)).sum(0))


def merge_lse_allowing_empty(part_max: torch.Tensor, part_sum: torch.Tensor) -> torch.Tensor:
    """`merge_lse` where a line may have no finite score at all (every pair excluded by a pair
    rule): −∞ there instead of NaN."""
    top = part_max.amax(0)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    return top + torch.log((part_sum * torch.exp(part_max - shift)).sum(0))


def merge_weighted(part_max: torch.Tensor, part_sum: torch.Tensor, part_weighted: torch.Tensor) -> torch.Tensor:
    """Σ softmax(x)·y from per-group partials (max, Σ exp(x − max), Σ exp(x − max)·y) along dim 0."""
    w = torch.exp(part_max - part_max.amax(0))
    return (part_weighted * w).sum(0) / (part_sum * w).sum(0)


def split_groups(n_row_blocks: int, n_col_blocks: int, max_row_groups: int, target_programs: int) -> tuple:
    """(row_groups, col_groups, row_blocks_per_group, col_blocks_per_group) of a forward sweep.

    At most `max_row_groups` row groups (each keeps an M-long column partial), enough
    column groups for about `target_programs` programs, and no group left empty.
    """
    row_groups = min(n_row_blocks, max_row_groups)
    rb_per = math.ceil(n_row_blocks / row_groups)
    row_groups = math.ceil(n_row_blocks / rb_per)
    col_groups = min(n_col_blocks, max(1, math.ceil(target_programs / row_groups)))
    cb_per = math.ceil(n_col_blocks / col_groups)
    col_groups = math.ceil(n_col_blocks / cb_per)
    return row_groups, col_groups, rb_per, cb_per


def lse_partials(n: int, m: int, row_groups: int, col_groups: int, bidirectional: bool, device,
                 dots: bool = False) -> dict:
    """Buffers of a split InfoNCE forward sweep: per column group the rows' (max, sum-exp, positive
    sum), per row group the columns' (initialised to the empty merge: -inf, 0, 0); columns are
    None for a rows-only sweep. dots: also the exp-weighted sums Σ exp(S − max)·S (row_dot,
    col_dot; None without)."""
    f32 = dict(dtype=torch.float32, device=device)
    parts = dict(row_max=torch.empty(col_groups, n, **f32), row_sum=torch.empty(col_groups, n, **f32),
                 row_pos=torch.empty(col_groups, n, **f32), col_max=None, col_sum=None, col_pos=None,
                 row_dot=torch.empty(col_groups, n, **f32) if dots else None, col_dot=None)
    if bidirectional:
        parts.update(col_max=torch.full((row_groups, m), float("-inf"), **f32),
                     col_sum=torch.zeros(row_groups, m, **f32), col_pos=torch.zeros(row_groups, m, **f32))
        if dots:
            parts.update(col_dot=torch.zeros(row_groups, m, **f32))
    return parts


def merge_lse_partials(parts: dict) -> tuple:
    """(row_lse, col_lse, row_pos, col_pos, row_dot, col_dot) from `lse_partials` buffers filled by
    a kernel; row_dot_i = Σ_j softmax_j(S_i·)·S_ij (col_dot alike), None where not asked for."""
    row_lse, row_pos = merge_lse(parts["row_max"], parts["row_sum"]), parts["row_pos"].sum(0)
    row_dot = col_dot = None
    if parts.get("row_dot") is not None:
        row_dot = merge_weighted(parts["row_max"], parts["row_sum"], parts["row_dot"])
    if parts["col_max"] is None:
        return row_lse, None, row_pos, None, row_dot, None
    if parts.get("col_dot") is not None:
        col_dot = merge_weighted(parts["col_max"], parts["col_sum"], parts["col_dot"])
    return row_lse, merge_lse(parts["col_max"], parts["col_sum"]), row_pos, parts["col_pos"].sum(0), row_dot, col_dot


def gradient_norm(vectors, device) -> torch.Tensor:
    """A bound on |G| from the upstream gradients that build it (Σ max|g|), shape (1,), ≥ 1e-30.

    Gradient tiles are stored divided by it, so 16-bit storage keeps its precision (G itself can be
    ~1/N, in fp16's subnormal range)."""
    norm = sum(v.detach().abs().amax().float() for v in vectors if v is not None)
    return torch.as_tensor(norm, dtype=torch.float32, device=device).clamp_min(1e-30).reshape(1)


def grad_block_shape(n: int, m: int, cfg) -> tuple:
    """(rows, cols) of one gradient block: whole-tile multiples of cfg.block_m × cfg.block_n within
    budget, and at most MAX_GRID_Y column tiles (a few rows against millions of columns)."""
    budget = INTERPRET_GRAD_BLOCK_ELEMENTS if triton_interpreting() else GRAD_BLOCK_ELEMENTS
    max_cols = MAX_GRID_Y * cfg.block_n
    if n * m <= budget and m <= max_cols:
        return n, m
    side = max(cfg.block_m, int(math.sqrt(budget)) // cfg.block_m * cfg.block_m)
    rows = min(n, side)
    cols = min(m, max_cols, max(cfg.block_n, budget // rows // cfg.block_n * cfg.block_n))
    return rows, cols


@lru_cache(maxsize=None)
def _mm_out_dtype_supported(device_type: str) -> bool:
    if device_type != "cuda":
        return False
    try:
        x = torch.zeros(16, 16, dtype=torch.bfloat16, device="cuda")
        torch.mm(x, x, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return False
    return True


def mm_accumulate(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, first: bool) -> None:
    """out (fp32) (+)= x @ y with fp32 accumulation and output, whatever x and y's dtype."""
    if x.dtype == torch.float32:
        if first:
            torch.mm(x, y, out=out)
        else:
            out.addmm_(x, y)
        return
    if _mm_out_dtype_supported(x.device.type):
        prod = torch.mm(x, y, out_dtype=torch.float32)
    else:
        prod = torch.mm(x.float(), y.float())
    if first:
        out.copy_(prod)
    else:
        out.add_(prod)


def blocked_grads(a: torch.Tensor, b: torch.Tensor, cfg,
                  write_block: Callable[[torch.Tensor, int, int, int, int], None],
                  need_a: bool, need_b: bool, g_dtype: torch.dtype):
    """Accumulate ga = G·B and gb = Gᵀ·A (fp32) block by block.

    `write_block(g, r0, r1, c0, c1)` runs the fused kernel on the block
    [r0:r1, c0:c1]; it fills g (rows r1-r0 × cols c1-c0) with the gradient tile
    G[r0:r1, c0:c1] unless neither product is wanted, when g is a 1×1 dummy it
    must not write. The two products run as GEMMs on each block while only one
    block of G exists at a time.
    """
    n, m = a.shape[0], b.shape[0]
    rows, cols = grad_block_shape(n, m, cfg)
    ga = torch.empty(a.shape, dtype=torch.float32, device=a.device) if need_a else None
    gb = torch.empty(b.shape, dtype=torch.float32, device=a.device) if need_b else None
    store = need_a or need_b
    buf = torch.empty(rows * cols if store else 1, dtype=g_dtype, device=a.device)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        for c0 in range(0, m, cols):
            c1 = min(c0 + cols, m)
            g = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0) if store else buf.view(1, 1)
            write_block(g, r0, r1, c0, c1)
            if need_a:
                mm_accumulate(ga[r0:r1], g, b[c0:c1], first=c0 == 0)
            if need_b:
                mm_accumulate(gb[c0:c1], g.T, a[r0:r1], first=r0 == 0)
    return ga, gb


def siglip_outputs(parts: list, ga, gb, a: torch.Tensor, b: torch.Tensor, scale_f: torch.Tensor,
                   grad_scale: float, need_scale: bool, need_bias: bool) -> tuple:
    """(loss_sum, da, db, dscale, dbias) of a SigLIP sweep from its per-block (loss, dscale, dbias)
    partial sums and the blocked products ga = G·B, gb = Gᵀ·A (None when not wanted)."""
    loss_sum, dscale, dbias = torch.stack(parts).sum(0)
    factor = scale_f * grad_scale
    return (
        loss_sum,
        None if ga is None else (ga * factor).to(a.dtype),
        None if gb is None else (gb * factor).to(b.dtype),
        dscale * grad_scale if need_scale else None,
        dbias * grad_scale if need_bias else None,
    )


def packed_distill_vectors(side: str, lse: Dict, grads: Dict, kd: bool, length: int,
                           like: torch.Tensor) -> torch.Tensor:
    """The per-row (or per-column) vectors a distillation gradient kernel reads, stacked in
    (lse, g_lse, g_pos[, student_lse, g_student_lse, teacher_lse, g_cross]) order."""
    zeros = torch.zeros(length, dtype=torch.float32, device=like.device)

    def grad(name):
        g = grads[name]
        return zeros if g is None else g

    vectors = [lse[f"{side}_lse"], grad(f"{side}_lse"), grad(f"{side}_pos")]
    if kd:
        vectors += [lse[f"student_{side}_lse"], grad(f"student_{side}_lse"), lse[f"teacher_{side}_lse"],
                    grad(f"{side}_cross")]
    return torch.stack([v.detach().float() for v in vectors]).contiguous()
