"""InfoNCE / CLIP loss (math in pyclipfast/clip.py): pyclipfast.clip_loss against open_clip and Inf-CL.

Timed call: loss and gradients w.r.t. both feature sets and the log-scale.
Minimum work 8·N·M·D FLOPs (2 for the logits, 2 to recompute them in the
backward, 4 for dA and dB); minimum traffic: read A and B, write dA and dB.
"""
from __future__ import annotations

from typing import Optional

from ..registry import Context, Impl, Op, register
from ._common import CLIP_LOG_SCALE, compile_on_cuda_only, compiled, contrastive_inputs, pyclipfast_impls

INF_CL_HEAD_DIMS = (256, 128, 64, 32, 16)


def _pyclipfast(t, backend: str):
    import pyclipfast

    return pyclipfast.clip_loss(t["a"], t["b"], t["log_scale"].exp(), backend=backend)


def _open_clip(ctx: Context):
    from open_clip.loss import ClipLoss

    loss = ClipLoss()
    return lambda t: loss(t["a"], t["b"], t["log_scale"].exp())


def _open_clip_compiled(ctx: Context):
    from open_clip.loss import ClipLoss

    loss = ClipLoss()
    fn = compiled(lambda a, b, log_scale: loss(a, b, log_scale.exp()))
    return lambda t: fn(t["a"], t["b"], t["log_scale"])


def inf_cl_head_dim(d: int) -> Optional[int]:
    """The largest head_dim Inf-CL accepts that divides D (it views features as D/head_dim heads)."""
    return next((h for h in INF_CL_HEAD_DIMS if d % h == 0), None)


def _inf_cl_usable(ctx: Context) -> Optional[str]:
    if ctx.device != "cuda":
        return "Inf-CL's Triton kernels run on CUDA only"
    if inf_cl_head_dim(ctx.shape.d) is None:
        return f"Inf-CL needs D divisible by one of {INF_CL_HEAD_DIMS}; D={ctx.shape.d}"
    return None


def _inf_cl(ctx: Context):
    """Both directions through ``inf_cl.cal_inf_loss`` (one direction per call), averaged like CLIP."""
    from inf_cl import cal_inf_loss

    head_dim = inf_cl_head_dim(ctx.shape.d)

    def call(t):
        s = t["log_scale"].exp()
        return 0.5 * (cal_inf_loss(t["a"], t["b"], scale=s, head_dim=head_dim)
                      + cal_inf_loss(t["b"], t["a"], scale=s, head_dim=head_dim))

    return call


OP = register(Op(
    name="clip",
    title="InfoNCE (clip_loss)",
    api="clip_loss",
    flops=lambda s: 8.0 * s.n * s.cols * s.d,
    min_bytes=lambda s, e: 2.0 * (s.n + s.cols) * s.d * e,
    make_inputs=contrastive_inputs(CLIP_LOG_SCALE),
    impls=[
        *pyclipfast_impls("clip", _pyclipfast),
        Impl("open_clip", "peer", _open_clip, requires=("open_clip",),
             notes="open_clip.loss.ClipLoss, eager: two N×M logit GEMMs in the features' dtype"),
        Impl("open_clip-compile", "peer", _open_clip_compiled, requires=("open_clip",),
             usable=compile_on_cuda_only, notes="open_clip.loss.ClipLoss under torch.compile"),
        Impl("inf-cl", "peer", _inf_cl, requires=("inf_cl",), usable=_inf_cl_usable,
             notes="inf_cl.cal_inf_loss both directions; upcasts to float32 (tf32 dots) internally"),
    ],
))

if __name__ == "__main__":
    from ..__main__ import main

    main(["run", "--only", OP.name, *__import__("sys").argv[1:]])
