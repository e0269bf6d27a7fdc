"""Non-contrastive cosine loss (math in pyclipfast/cosine.py): pyclipfast.cosine_loss against plain PyTorch.

L = (1/N) Σ_i (2 − 2·cos(p_i, z_i)), z a stop-gradient target. Memory-bound:
one read of p and z and one write of dp, 3·N·D elements, so its figure of
merit is the fraction of the measured copy bandwidth (FLOPs are not counted).
"""
from __future__ import annotations

import torch.nn.functional as F

from ..registry import Context, Impl, Inputs, Op, register
from ._common import compile_on_cuda_only, compiled, pyclipfast_impls, unit_features


def make_inputs(ctx: Context, gen) -> Inputs:
    s = ctx.shape
    tensors = {"p": unit_features(s.n, s.d, ctx, gen), "z": unit_features(s.n, s.d, ctx, gen, grad=False)}
    return Inputs(tensors, ("p",))


def _pyclipfast(t, backend: str):
    import pyclipfast

    return pyclipfast.cosine_loss(t["p"], t["z"], backend=backend)


def eager_cosine_loss(p, z):
    """What one writes in plain PyTorch (BYOL/CLIPin): mean of 2 − 2·cos with a detached target."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


def _eager(ctx: Context):
    return lambda t: eager_cosine_loss(t["p"], t["z"])


def _eager_compiled(ctx: Context):
    fn = compiled(eager_cosine_loss)
    return lambda t: fn(t["p"], t["z"])


OP = register(Op(
    name="cosine",
    title="Cosine loss (cosine_loss)",
    api="cosine_loss",
    flops=lambda s: 0.0,
    min_bytes=lambda s, e: 3.0 * s.n * s.d * e,
    make_inputs=make_inputs,
    baseline=("torch-eager",),
    impls=[
        *pyclipfast_impls("cosine", _pyclipfast, "pyclipfast backend='reference': F.cosine_similarity"),
        Impl("torch-eager", "baseline", _eager, notes="2 − 2·F.cosine_similarity(p, z.detach()), eager"),
        Impl("torch-compile", "baseline", _eager_compiled, usable=compile_on_cuda_only,
             notes="the same expression under torch.compile"),
    ],
))

if __name__ == "__main__":
    from ..__main__ import main

    main(["run", "--only", OP.name, *__import__("sys").argv[1:]])
