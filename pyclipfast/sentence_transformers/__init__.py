"""Drop-ins for sentence-transformers' MultipleNegativesRankingLoss family, on the fused InfoNCE.

    from pyclipfast.sentence_transformers import CachedMultipleNegativesRankingLoss
    loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=64)   # was: losses.Cached…(model, …)

`MultipleNegativesRankingLoss`, `CachedMultipleNegativesRankingLoss`,
`MultipleNegativesSymmetricRankingLoss` and `CachedMultipleNegativesSymmetricRankingLoss` (in
`.losses`, which needs ``pip install 'pyclipfast[sentence-transformers]'``) subclass the installed
sentence-transformers classes of the same names; `.ranking` holds the fused loss on embeddings
and needs only torch.
"""
from __future__ import annotations

__all__ = [
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
]


def __getattr__(name: str):
    # The losses import sentence-transformers (and transformers): only when one is asked for.
    if name in __all__:
        from . import losses
        return getattr(losses, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
