"""Retrieval recall@K (math in pyclipfast/retrieval.py): pyclipfast.recall_at_k, fused/chunked against materialised.

Forward only (a metric): rank_i = #gallery items scoring strictly above query
i's positive (gallery item i here), recall@K = mean(rank_i < K), K = 1, 5, 10.
Work 2·Nq·Ng·D FLOPs for the scores; traffic: read Q and G once. The
reference backend materialises the whole Nq×Ng score matrix.
"""
from __future__ import annotations

from ..registry import Context, Inputs, Op, register
from ._common import pyclipfast_impls, unit_features

KS = (1, 5, 10)


def make_inputs(ctx: Context, gen) -> Inputs:
    s = ctx.shape
    tensors = {"q": unit_features(s.n, s.d, ctx, gen, grad=False),
               "g": unit_features(s.cols, s.d, ctx, gen, grad=False)}
    return Inputs(tensors, ())


def _pyclipfast(t, backend: str):
    import pyclipfast

    return pyclipfast.recall_at_k(t["q"], t["g"], KS, backend=backend)


OP = register(Op(
    name="recall",
    title="Recall@K (recall_at_k)",
    api="recall_at_k",
    dispatch="retrieval",
    flops=lambda s: 2.0 * s.n * s.cols * s.d,
    min_bytes=lambda s, e: (s.n + s.cols) * s.d * e,
    make_inputs=make_inputs,
    mode="fwd",
    baseline=("reference",),
    impls=pyclipfast_impls("retrieval", _pyclipfast,
                           "pyclipfast backend='reference': the whole Nq×Ng score matrix"),
))

if __name__ == "__main__":
    from ..__main__ import main

    main(["run", "--only", OP.name, *__import__("sys").argv[1:]])
