"""CUDA sigmoid (SigLIP) loss: loss and gradient tiles in one sweep (kernels in csrc/siglip/).

    S_ij = s·⟨A_i, B_j⟩ + b,  y_ij = +1 on positives, −1 elsewhere,  z_ij = −y_ij·S_ij
    loss_sum = Σ_ij softplus(z_ij)
    G_ij = −y_ij·σ(z_ij),  dA = s·G·B,  dB = s·Gᵀ·A,  dscale = Σ G_ij⟨A_i, B_j⟩,  dbias = Σ G_ij

The kernel computes one block of S at a time: per-tile loss/dscale/dbias partials
(summed here: deterministic) and, when gradients are wanted, the block of G in the
input dtype (|G| < 1); `blocked_grads` runs the products with B and A as GEMMs.
Same function, arguments and results as pyclipfast/triton/siglip.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _kernels
from ._launch import TILE, block_tiles, ids_i64, scalar_f32, use_tf32
from .._blocks import blocked_grads, siglip_outputs


def siglip_forward(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                   row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor], negative_only: bool,
                   grad_scale: float, need_a: bool, need_b: bool, need_scale: bool, need_bias: bool):
    """Returns (loss_sum, da, db, dscale, dbias), gradients of grad_scale·loss_sum (None when not needed)."""
    scale_f = scalar_f32(scale)
    bias_f = scalar_f32(bias) if bias is not None else None
    ids = dict(row_ids=ids_i64(row_ids), col_ids=ids_i64(col_ids))
    store = need_a or need_b
    tf32 = use_tf32(a)
    parts = []

    def write_block(g, r0, r1, c0, c1):
        tiles = block_tiles(r0, r1, c0, c1)
        part = torch.empty(3, tiles, dtype=torch.float32, device=a.device)
        _kernels.siglip(a, b, scale_f, bias_f, negative_only=negative_only, g_out=g if store else None,
                  loss_part=part[0], dscale_part=part[1], dbias_part=part[2],
                  row0=r0, row1=r1, col0=c0, col1=c1, tf32=tf32, **ids)
        parts.append(part.sum(1))

    ga, gb = blocked_grads(a, b, TILE, write_block, need_a, need_b, g_dtype=a.dtype)
    return siglip_outputs(parts, ga, gb, a, b, scale_f, grad_scale, need_scale, need_bias)
