"""CUDA cosine loss (math in pyclipfast/cosine.py): cos and its gradients in one pass over p and z (kernel in csrc/cosine/).

    n_p = max(‖p‖, ε),  n_z = max(‖z‖, ε),  cos = ⟨p, z⟩ / (n_p n_z)
    d cos/dp = z / (n_p n_z) − cos·p / (n_p‖p‖)      (second term 0 where p = 0)
    d cos/dz = p / (n_p n_z) − cos·z / (n_z‖z‖)

A group of lanes owns a row. Rows of up to 4 KB (D ≤ 2048 in fp16/bf16, 1024 in fp32) are read
once into registers with 16-byte loads and the gradients written from them; wider rows take two
sweeps over D.
Same function, arguments and results as pyclipfast/triton/cosine.py.
"""
from __future__ import annotations

import torch

from . import _kernels
from ..reference import COSINE_EPS


def cosine_forward(online: torch.Tensor, target: torch.Tensor, grad_scale: float, need_online: bool,
                   need_target: bool):
    """(cos (N,) float32, d_online, d_target): the gradients of grad_scale·Σ_i cos_i, None when not needed."""
    n = online.shape[0]
    cos = torch.empty(n, dtype=torch.float32, device=online.device)
    d_online = torch.empty(online.shape, dtype=online.dtype, device=online.device) if need_online else None
    d_target = torch.empty(target.shape, dtype=target.dtype, device=target.device) if need_target else None
    _kernels.cosine(online, target, cos, d_online, d_target, grad_scale=float(grad_scale), eps=COSINE_EPS)
    return cos, d_online, d_target
