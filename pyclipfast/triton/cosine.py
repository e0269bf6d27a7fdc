"""Triton cosine loss (math in pyclipfast/cosine.py): cos and its gradients in one pass over p and z.

    n_p = max(‖p‖, ε),  n_z = max(‖z‖, ε),  cos = ⟨p, z⟩ / (n_p n_z)
    d cos/dp = z / (n_p n_z) − cos·p / (n_p‖p‖)      (second term 0 where p = 0)
    d cos/dz = p / (n_p n_z) − cos·z / (n_z‖z‖)

A program owns BLOCK_M rows. When a row fits one BLOCK_D block (ONE_BLOCK), p and
z are read once, kept in registers, and the gradients written from them: one read
of each input and one write per gradient, the memory-bound minimum. Wider rows
loop over D twice (norms and dot product, then gradients). The gradients (of
grad_scale·Σ cos) are kept for the backward, Liger style.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..reference import COSINE_EPS
from ._tiles import on_input_device

# Widest row kept in registers (elements); wider rows take the two-sweep loop.
MAX_BLOCK_D = 8192
# Elements a program handles per block (rows × BLOCK_D).
BLOCK_ELEMENTS = 4096


@triton.jit
def _load(ptr, rows, cols, stride_m, stride_k, mask):
    # int64 offsets along D too: a column-major (D, N) input has stride_k = N
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride_m + cols.to(tl.int64)[None, :] * stride_k, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _store_grads(dp_ptr, dz_ptr, p, z, rows, cols, mask, stride_dm, cross, p_own, z_own,
                 NEED_P: tl.constexpr, NEED_Z: tl.constexpr):
    """dp = cross·z − p_own·p and dz = cross·p − z_own·z (per-row coefficients, grad_scale folded in)."""
    offs = rows.to(tl.int64)[:, None] * stride_dm + cols[None, :]
    if NEED_P:
        dp = cross[:, None] * z - p_own[:, None] * p
        tl.store(dp_ptr + offs, dp.to(dp_ptr.dtype.element_ty), mask=mask)
    if NEED_Z:
        dz = cross[:, None] * p - z_own[:, None] * z
        tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cosine_kernel(
    p_ptr, z_ptr, cos_ptr, dp_ptr, dz_ptr, grad_scale,
    n_rows, dim, stride_pm, stride_pk, stride_zm, stride_zk, stride_dm,
    NEED_P: tl.constexpr, NEED_Z: tl.constexpr, ONE_BLOCK: tl.constexpr, EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    pp = tl.zeros((BLOCK_M,), tl.float32)
    zz = tl.zeros((BLOCK_M,), tl.float32)
    pz = tl.zeros((BLOCK_M,), tl.float32)
    if ONE_BLOCK:
        mask = row_ok[:, None] & (cols[None, :] < dim)
        p = _load(p_ptr, rows, cols, stride_pm, stride_pk, mask)
        z = _load(z_ptr, rows, cols, stride_zm, stride_zk, mask)
        pp = tl.sum(p * p, 1)
        zz = tl.sum(z * z, 1)
        pz = tl.sum(p * z, 1)
    else:
        for k in range(0, dim, BLOCK_D):
            mask = row_ok[:, None] & ((k + cols)[None, :] < dim)
            p = _load(p_ptr, rows, k + cols, stride_pm, stride_pk, mask)
            z = _load(z_ptr, rows, k + cols, stride_zm, stride_zk, mask)
            pp += tl.sum(p * p, 1)
            zz += tl.sum(z * z, 1)
            pz += tl.sum(p * z, 1)
    p_norm = tl.sqrt(pp)
    z_norm = tl.sqrt(zz)
    n_p = tl.maximum(p_norm, EPS)
    n_z = tl.maximum(z_norm, EPS)
    cos = pz / (n_p * n_z)
    tl.store(cos_ptr + rows, cos, mask=row_ok)
    if NEED_P or NEED_Z:
        cross = grad_scale / (n_p * n_z)
        # p = 0 has cos = 0 and no second term (the nonzero stand-in for its norm keeps 0/0 out)
        p_own = grad_scale * cos / (n_p * tl.where(p_norm > 0, p_norm, 1.0))
        z_own = grad_scale * cos / (n_z * tl.where(z_norm > 0, z_norm, 1.0))
        if ONE_BLOCK:
            _store_grads(dp_ptr, dz_ptr, p, z, rows, cols, mask, stride_dm, cross, p_own, z_own, NEED_P, NEED_Z)
        else:
            for k in range(0, dim, BLOCK_D):
                mask = row_ok[:, None] & ((k + cols)[None, :] < dim)
                p = _load(p_ptr, rows, k + cols, stride_pm, stride_pk, mask)
                z = _load(z_ptr, rows, k + cols, stride_zm, stride_zk, mask)
                _store_grads(dp_ptr, dz_ptr, p, z, rows, k + cols, mask, stride_dm, cross, p_own, z_own,
                             NEED_P, NEED_Z)


@on_input_device
def cosine_forward(online: torch.Tensor, target: torch.Tensor, grad_scale: float, need_online: bool,
                   need_target: bool):
    """(cos (N,) float32, d_online, d_target): the gradients of grad_scale·Σ_i cos_i, None when not needed."""
    n, dim = online.shape
    block_d = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
    block_m = max(1, min(BLOCK_ELEMENTS // block_d, triton.next_power_of_2(n)))
    cos = torch.empty(n, dtype=torch.float32, device=online.device)
    d_online = torch.empty(online.shape, dtype=online.dtype, device=online.device) if need_online else None
    d_target = torch.empty(target.shape, dtype=target.dtype, device=target.device) if need_target else None
    dummy = cos  # never written when its flag is off
    wrap_triton(_cosine_kernel)[(triton.cdiv(n, block_m),)](
        online, target, cos, dummy if d_online is None else d_online, dummy if d_target is None else d_target,
        grad_scale, n, dim, online.stride(0), online.stride(1), target.stride(0), target.stride(1), dim,
        NEED_P=need_online, NEED_Z=need_target, ONE_BLOCK=dim <= block_d, EPS=COSINE_EPS,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4 if block_m * block_d <= 4096 else 8,
    )
    return cos, d_online, d_target
