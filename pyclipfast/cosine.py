"""Non-contrastive cosine loss (CLIPin's path).

    L = (1/N) Σ_i (2 − 2·cos(p_i, z_i)),   cos(p, z) = ⟨p, z⟩ / (max(‖p‖, ε)·max(‖z‖, ε))
    dL/dp_i = −(2g/N)·(z_i / (n_p n_z) − cos_i·p_i / (n_p‖p_i‖)),   n_p = max(‖p_i‖, ε), n_z = max(‖z_i‖, ε)

which is −(2g/N)/‖p_i‖·(ẑ_i − cos_i·p̂_i) away from zero vectors, and F.cosine_similarity's
gradient everywhere (ε = 1e-8; a zero p_i gives cos_i = 0 and the second term 0). The
target z is a stop-gradient by default; with target_grad the symmetric gradient flows to
z too. Memory-bound: the fused operator ``pyclipfast::cosine_<backend>`` (pyclipfast/_ops.py)
reads p and z once and writes the gradients in the same pass (kept for the backward,
which only scales them by g), and only those autograd will ask for: none under
``torch.no_grad()`` or for an input that does not require grad.
"""
from __future__ import annotations

import torch

from . import reference
from ._dispatch import resolve
from ._ops import ops, run
from ._validation import check_features, check_finite


def cosine_loss(online: torch.Tensor, target: torch.Tensor, *, target_grad: bool = False,
                backend: str = "auto") -> torch.Tensor:
    """Mean of 2 − 2·cos(p_i, z_i) over the rows of online p (N×D) and target z (N×D).

    Args:
        online: predictions p (N, D).
        target: targets z (N, D), same dtype and device; a stop-gradient unless ``target_grad``.
        target_grad: let the gradient flow to the target too.
        backend: "auto", "triton", "torch" (chunked) or "reference" (F.cosine_similarity).

    Returns:
        The loss, float32 (float64 for float64 inputs). Zero vectors are clamped like
        F.cosine_similarity (ε = 1e-8), not an error.

    Non-finite inputs raise in eager mode on CPU tensors unless ``set_validation(False)``;
    inside a torch.compile'd graph the check is skipped and they give a NaN loss. Works in
    ``torch.compile(fullgraph=True)``, torch.func and CUDA graphs; first-order gradients only.
    """
    check_features("online", online)
    check_features("target", target, like=online, like_name="online")
    if target.shape[0] != online.shape[0]:
        raise ValueError(f"target has {target.shape[0]} rows but online has {online.shape[0]}; they must match")
    if not isinstance(target_grad, bool):
        raise TypeError(f"target_grad must be a bool, got {type(target_grad).__name__}")
    name = resolve("cosine", backend, online)
    check_finite("online", online)
    check_finite("target", target)
    if name == "reference":
        return reference.cosine_loss(online, target, target_grad=target_grad)
    target = target if target_grad else target.detach()
    need = [torch.is_grad_enabled() and x.requires_grad for x in (online, target)]
    return run(ops("cosine", name), online, target, *need)[0]
