"""Triton sigmoid (SigLIP) loss: loss and gradient tiles in one sweep.

    S_ij = s·⟨A_i, B_j⟩ + b,  y_ij = +1 on positives, −1 elsewhere,  z_ij = −y_ij·S_ij
    loss_sum = Σ_ij softplus(z_ij)
    G_ij = −y_ij·σ(z_ij),  dA = s·G·B,  dB = s·Gᵀ·A,  dscale = Σ G_ij⟨A_i, B_j⟩,  dbias = Σ G_ij

`_siglip_kernel` computes one tile: its share of the loss, dscale and dbias
(per-tile partials, summed on the host: deterministic), and, when gradients are
wanted, the tile of G (|G| < 1, so 16-bit storage is safe). The products with
B and A run as GEMMs on each block of G (`blocked_grads`): 6·N·M·D FLOPs with
gradients, 2·N·M·D without, one block of G in memory at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._blocks import siglip_outputs
from ._tiles import (
    block_grid, blocked_grads, dot_precision, ids_or_dummy, on_input_device, positive_tile, score_tile, softplus,
    tile_config,
)


@triton.jit
def _siglip_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr, row_ids_ptr, col_ids_ptr,
    g_out_ptr, stride_gm, stride_gn, loss_part_ptr, dscale_part_ptr, dbias_part_ptr,
    row0, row1, col0, col1, dim, stride_am, stride_ak, stride_bn, stride_bk,
    HAS_BIAS: tl.constexpr, STORE_G: tl.constexpr, POS_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    part = pid_m * tl.num_programs(1) + pid_n
    offs_m = row0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = col0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = (offs_m[:, None] < row1) & (offs_n[None, :] < col1)
    acc = score_tile(a_ptr, b_ptr, offs_m, offs_n, row1, col1, dim,
                     stride_am, stride_ak, stride_bn, stride_bk, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    s = acc * tl.load(scale_ptr).to(tl.float32)
    if HAS_BIAS:
        s += tl.load(bias_ptr).to(tl.float32)
    pos = positive_tile(row_ids_ptr, col_ids_ptr, offs_m, offs_n, row1, col1, POS_MODE)
    z = tl.where(pos, -s, s)
    # + 0·z: softplus(±∞) is ∞ or 0, never NaN; an infinite score must give a NaN loss
    tl.store(loss_part_ptr + part, tl.sum(tl.sum(tl.where(valid, softplus(z) + 0.0 * z, 0.0), 1), 0))
    sig = 1.0 / (1.0 + tl.exp(-z))
    g = tl.where(valid, tl.where(pos, -sig, sig), 0.0)
    tl.store(dscale_part_ptr + part, tl.sum(tl.sum(g * acc, 1), 0))
    tl.store(dbias_part_ptr + part, tl.sum(tl.sum(g, 1), 0))
    if STORE_G:
        out = g_out_ptr + (offs_m - row0).to(tl.int64)[:, None] * stride_gm + (offs_n - col0)[None, :] * stride_gn
        tl.store(out, g.to(g_out_ptr.dtype.element_ty), mask=valid)


@on_input_device
def siglip_forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                   row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor], negative_only: bool,
                   grad_scale: float, need_a: bool, need_b: bool, need_scale: bool, need_bias: bool):
    """Returns (loss_sum, da, db, dscale, dbias), gradients of grad_scale·loss_sum (None when not needed)."""
    dim = a.shape[1]
    cfg = tile_config(a)
    f32 = dict(dtype=torch.float32, device=a.device)
    scale_f = scale.detach().float().reshape(1)
    bias_f = bias.detach().float().reshape(1) if bias is not None else torch.zeros(1, **f32)
    ids = ids_or_dummy(row_ids, a), ids_or_dummy(col_ids, a)
    pos_mode = 2 if negative_only else (0 if row_ids is None else 1)
    store_g = need_a or need_b
    parts = []

    def write_block(g, r0, r1, c0, c1):
        grid = block_grid(r0, r1, c0, c1, cfg)
        part = torch.empty(3, grid[0] * grid[1], **f32)
        wrap_triton(_siglip_kernel)[grid](
            a, b, scale_f, bias_f, *ids, g, g.stride(0), g.stride(1), part[0], part[1], part[2],
            r0, r1, c0, c1, dim, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            HAS_BIAS=bias is not None, STORE_G=store_g, POS_MODE=pos_mode,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=dot_precision(a),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        parts.append(part.sum(1))

    ga, gb = blocked_grads(a, b, cfg, write_block, need_a, need_b, g_dtype=a.dtype)
    return siglip_outputs(parts, ga, gb, a, b, scale_f, grad_scale, need_scale, need_bias)
