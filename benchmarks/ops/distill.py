"""Soft-label distillation (math in pyclipfast/distill.py): pyclipfast.distill_loss against open_clip's DistillClipLoss.

Both sides are run in the configuration where they compute the same function
(margin 0, no false-negative filter, λ = 1, kd="ce", normalize=False, teacher
scale fixed), so the times compare like for like. Timed call: both losses and
the gradients w.r.t. the student features and log-scale (the teacher is frozen).
Minimum work ≈ 8·N·M·D + 4·N·M·Dt FLOPs; minimum traffic: read A, B, Tᵃ, Tᵇ,
write dA and dB.
"""
from __future__ import annotations

from ..registry import Context, Impl, Inputs, Op, register
from ._common import CLIP_LOG_SCALE, compile_on_cuda_only, compiled, pyclipfast_impls, scalar, unit_features

TEACHER_LOG_SCALE = CLIP_LOG_SCALE


def make_inputs(ctx: Context, gen) -> Inputs:
    s = ctx.shape
    tensors = {
        "a": unit_features(s.n, s.d, ctx, gen), "b": unit_features(s.cols, s.d, ctx, gen),
        "log_scale": scalar(CLIP_LOG_SCALE, ctx),
        "ta": unit_features(s.n, s.teacher_dim, ctx, gen, grad=False),
        "tb": unit_features(s.cols, s.teacher_dim, ctx, gen, grad=False),
        "teacher_log_scale": scalar(TEACHER_LOG_SCALE, ctx, grad=False),
    }
    return Inputs(tensors, ("a", "b", "log_scale"))


def _pyclipfast(t, backend: str):
    import pyclipfast

    return pyclipfast.distill_loss(t["a"], t["b"], t["ta"], t["tb"], t["log_scale"].exp(),
                                   t["teacher_log_scale"].exp(), margin=0.0, kd_weight=1.0, kd="ce",
                                   normalize=False, backend=backend)


def _open_clip_call(loss):
    return lambda a, b, log_scale, ta, tb, t_log_scale: loss(a, b, log_scale.exp(), ta, tb, t_log_scale.exp())


def _open_clip(ctx: Context):
    from open_clip.loss import DistillClipLoss

    fn = _open_clip_call(DistillClipLoss())
    return lambda t: fn(t["a"], t["b"], t["log_scale"], t["ta"], t["tb"], t["teacher_log_scale"])


def _open_clip_compiled(ctx: Context):
    from open_clip.loss import DistillClipLoss

    fn = compiled(_open_clip_call(DistillClipLoss()))
    return lambda t: fn(t["a"], t["b"], t["log_scale"], t["ta"], t["tb"], t["teacher_log_scale"])


OP = register(Op(
    name="distill",
    title="Distillation (distill_loss, open_clip-equivalent settings)",
    api="distill_loss",
    flops=lambda s: 8.0 * s.n * s.cols * s.d + 4.0 * s.n * s.cols * s.teacher_dim,
    min_bytes=lambda s, e: (2.0 * s.d + s.teacher_dim) * (s.n + s.cols) * e,
    make_inputs=make_inputs,
    impls=[
        *pyclipfast_impls("distill", _pyclipfast),
        Impl("open_clip", "peer", _open_clip, requires=("open_clip",),
             notes="open_clip.loss.DistillClipLoss, eager: four N×M logit matrices"),
        Impl("open_clip-compile", "peer", _open_clip_compiled, requires=("open_clip",),
             usable=compile_on_cuda_only, notes="open_clip.loss.DistillClipLoss under torch.compile"),
    ],
))

if __name__ == "__main__":
    from ..__main__ import main

    main(["run", "--only", OP.name, *__import__("sys").argv[1:]])
