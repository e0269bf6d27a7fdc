"""Sigmoid loss (math in pyclipfast/siglip.py): pyclipfast.siglip_loss against open_clip and siglip-kernel.

Timed call: loss and gradients w.r.t. both feature sets, the log-scale and the
bias. No normalising statistic, so one sweep gives loss and gradients:
minimum work 6·N·M·D FLOPs; minimum traffic: read A and B, write dA and dB.
"""
from __future__ import annotations

from ..registry import Context, Impl, Op, register
from ._common import (
    SIGLIP_BIAS,
    SIGLIP_LOG_SCALE,
    compile_on_cuda_only,
    compiled,
    contrastive_inputs,
    cuda_only,
    pyclipfast_impls,
)


def _pyclipfast(t, backend: str):
    import pyclipfast

    return pyclipfast.siglip_loss(t["a"], t["b"], t["log_scale"].exp(), t["bias"], backend=backend)


def _open_clip(ctx: Context):
    from open_clip.loss import SigLipLoss

    loss = SigLipLoss()
    return lambda t: loss(t["a"], t["b"], t["log_scale"].exp(), t["bias"])


def _open_clip_compiled(ctx: Context):
    from open_clip.loss import SigLipLoss

    loss = SigLipLoss()
    fn = compiled(lambda a, b, log_scale, bias: loss(a, b, log_scale.exp(), bias))
    return lambda t: fn(t["a"], t["b"], t["log_scale"], t["bias"])


def _siglip_kernel(ctx: Context):
    """``siglip_kernel.fused_siglip_loss`` with its own backend choice ("auto": cuBLAS GEMM + Triton
    BCE for 16-bit inputs, its fused Hopper kernel for float32); it takes the log temperature."""
    from siglip_kernel import fused_siglip_loss

    return lambda t: fused_siglip_loss(t["a"], t["b"], t["log_scale"], t["bias"])


OP = register(Op(
    name="siglip",
    title="Sigmoid loss (siglip_loss)",
    api="siglip_loss",
    flops=lambda s: 6.0 * s.n * s.cols * s.d,
    min_bytes=lambda s, e: 2.0 * (s.n + s.cols) * s.d * e,
    make_inputs=contrastive_inputs(SIGLIP_LOG_SCALE, SIGLIP_BIAS),
    impls=[
        *pyclipfast_impls("siglip", _pyclipfast),
        Impl("open_clip", "peer", _open_clip, requires=("open_clip",),
             notes="open_clip.loss.SigLipLoss, eager: materialises the N×M logits and labels"),
        Impl("open_clip-compile", "peer", _open_clip_compiled, requires=("open_clip",),
             usable=compile_on_cuda_only, notes="open_clip.loss.SigLipLoss under torch.compile"),
        Impl("siglip-kernel", "peer", _siglip_kernel, requires=("siglip_kernel",), usable=cuda_only,
             notes="siglip_kernel.fused_siglip_loss, backend='auto'"),
    ],
))

if __name__ == "__main__":
    from ..__main__ import main

    main(["run", "--only", OP.name, *__import__("sys").argv[1:]])
