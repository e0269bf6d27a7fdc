"""Chunked PyTorch cosine loss (math in pyclipfast/cosine.py): cos and its gradients, a block of rows at a time.

    n_p = max(‖p‖, ε),  n_z = max(‖z‖, ε),  cos = ⟨p, z⟩ / (n_p n_z)
    d cos/dp = z / (n_p n_z) − cos·p / (n_p‖p‖)      (second term 0 where p = 0)
    d cos/dz = p / (n_p n_z) − cos·z / (n_z‖z‖)
"""
from __future__ import annotations

import torch

from ..reference import COSINE_EPS
from ._tiles import compute_dtype, spans

# Rows per block: bounds the float32/float64 copies of the inputs to CHUNK_ROWS × D.
CHUNK_ROWS = 8192


def cosine_forward(online: torch.Tensor, target: torch.Tensor, grad_scale: float, need_online: bool,
                   need_target: bool):
    """(cos (N,), d_online, d_target): the gradients of grad_scale·Σ_i cos_i, None when not needed."""
    cd = compute_dtype(online)
    n = online.shape[0]
    cos = torch.empty(n, dtype=cd, device=online.device)
    d_online = torch.empty(online.shape, dtype=online.dtype, device=online.device) if need_online else None
    d_target = torch.empty(target.shape, dtype=target.dtype, device=target.device) if need_target else None
    for r0, r1 in spans(n, CHUNK_ROWS):
        p, z = online[r0:r1].to(cd), target[r0:r1].to(cd)
        p_norm, z_norm = torch.linalg.vector_norm(p, dim=1), torch.linalg.vector_norm(z, dim=1)
        n_p, n_z = p_norm.clamp_min(COSINE_EPS), z_norm.clamp_min(COSINE_EPS)
        cross = 1.0 / (n_p * n_z)
        c = (p * z).sum(1) * cross
        cos[r0:r1] = c
        if need_online:
            d_online[r0:r1] = _cos_grad(p, z, c, cross, n_p, p_norm, grad_scale)
        if need_target:
            d_target[r0:r1] = _cos_grad(z, p, c, cross, n_z, z_norm, grad_scale)
    return cos, d_online, d_target


def _cos_grad(x, other, cos, cross, n_x, x_norm, grad_scale: float) -> torch.Tensor:
    """grad_scale·(other / (n_x n_other) − cos·x / (n_x‖x‖)), the x-side gradient of cos."""
    own = cos / (n_x * torch.where(x_norm > 0, x_norm, 1.0))  # x = 0 has cos = 0: no second term
    return (other * cross[:, None] - x * own[:, None]).mul_(grad_scale)
