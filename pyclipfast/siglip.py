"""Sigmoid (SigLIP) loss.

    S_ij = s·⟨A_i, B_j⟩ + b,   y_ij = +1 if (i, j) is positive else −1
    L    = −(1/N) Σ_ij log σ(y_ij S_ij)          (open_clip's normalisation)
    G_ij = −g/N · y_ij · σ(−y_ij S_ij)

There is no normalising statistic, so the fused operator
``pyclipfast::siglip_<backend>`` (pyclipfast/_ops.py) produces the gradients in the
same sweep as the loss (6·N·M·D FLOPs) and its backward only scales them. It
computes only the gradients autograd will ask for: none under ``torch.no_grad()``
or for inputs that do not require grad.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import reference
from ._dispatch import resolve
from ._ops import distinct, ops, run
from ._validation import ScaleLike, as_scale, check_features, check_finite, check_ids


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: ScaleLike,
    logit_bias: Optional[ScaleLike],
    *,
    image_ids: Optional[torch.Tensor] = None,
    text_ids: Optional[torch.Tensor] = None,
    negative_only: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Sigmoid loss between image (N×D) and text (M×D) features.

    Args:
        image_features, text_features: (N, D) and (M, D), same dtype and device.
        logit_scale: the already exponentiated scale s > 0 (a tensor receives a gradient).
        logit_bias: the scalar bias b (SigLIP initialises it to −10), or None for no bias.
        image_ids, text_ids: optional integer ids; equal ids are positives (y = +1).
            Default: the diagonal.
        negative_only: every pair is a negative (open_clip's SigLIP uses this for the blocks of
            other ranks' texts).
        backend: "auto", "triton", "cuda", "torch" (chunked) or "reference" (materialised).

    Returns:
        −(1/N) Σ_ij log σ(y_ij S_ij), float32 (float64 for float64 features).

    Data checks (non-finite features or scale, scale <= 0) run in eager mode on CPU tensors
    unless ``set_validation(False)``; inside a torch.compile'd graph they are skipped and a
    non-finite input gives a NaN loss. Works in ``torch.compile(fullgraph=True)``, torch.func
    and CUDA graphs; first-order gradients only.
    """
    check_features("image_features", image_features)
    check_features("text_features", text_features, like=image_features, like_name="image_features")
    if not isinstance(negative_only, bool):
        raise TypeError(f"negative_only must be a bool, got {type(negative_only).__name__}")
    image_ids, text_ids = check_ids(image_ids, text_ids, image_features, text_features,
                                    require_square=not negative_only)
    name = resolve("siglip", backend, image_features)
    scale = as_scale("logit_scale", logit_scale, image_features)
    bias = None if logit_bias is None else as_scale("logit_bias", logit_bias, image_features, positive=False)
    check_finite("image_features", image_features)
    check_finite("text_features", text_features)
    if name == "reference":
        return reference.siglip_loss(image_features, text_features, scale, bias, image_ids=image_ids,
                                     text_ids=text_ids, negative_only=negative_only)
    need = [torch.is_grad_enabled() and x is not None and x.requires_grad
            for x in (image_features, text_features, scale, bias)]
    return run(ops("siglip", name), image_features, text_features, scale, bias, image_ids,
               distinct(image_ids, text_ids), negative_only, *need)[0]


def siglip_sweep(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor], *, negative_only: bool, need: Sequence[bool], backend: str) -> list:
    """[loss, dA, dB, dscale, dbias] of `siglip_loss` (default ids) for a unit upstream gradient, outside autograd.

    One call of the fused operator; `need` says which of the four gradients to form (the others
    are None). For backend="reference" the materialised loss is differentiated. The caller checks
    the inputs (scale and bias are the 0-dim tensors of `as_scale`) and attaches the gradients.
    """
    inputs = (image_features, text_features, scale, bias)
    need = [wanted and x is not None for wanted, x in zip(need, inputs)]
    if backend != "reference":
        with torch.no_grad():
            out = ops("siglip", backend)["forward"](*(x if x is None else x.detach() for x in inputs), None, None,
                                                    negative_only, *need)
        return [out[0]] + [grad if wanted else None for grad, wanted in zip(out[1:], need)]
    with torch.enable_grad():
        leaves = [None if x is None else x.detach().requires_grad_(wanted) for x, wanted in zip(inputs, need)]
        loss = reference.siglip_loss(*leaves, negative_only=negative_only)
        wanted = [x for x, w in zip(leaves, need) if w]
        grads = iter(torch.autograd.grad(loss, wanted) if wanted else ())
    return [loss.detach()] + [next(grads) if w else None for w in need]
