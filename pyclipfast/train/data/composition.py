"""CLIP-C semantic compositions (Aniruddha et al., 2024), a batch-level transform.

With probability rho, batch element i is replaced by a composite with a partner j ≠ i drawn
afresh at every call: the centre half of image i's width on the left, the centre half of image
j's width on the right, at the original size, with caption "<caption i> and <caption j>".
For an odd width W the left part is ⌈W/2⌉ columns wide and the right part ⌊W/2⌋.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def centre_columns(images: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` middle columns of (..., H, W) images (start at (W − width) // 2)."""
    full = images.shape[-1]
    if not 0 < width <= full:
        raise ValueError(f"width must be in [1, {full}], got {width}")
    start = (full - width) // 2
    return images[..., start : start + width]


def compose_pair(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Centre half of `left` beside centre half of `right`, same (..., H, W) shape as the inputs."""
    if left.shape != right.shape:
        shapes = f"{tuple(left.shape)} and {tuple(right.shape)}"
        raise ValueError(f"left and right must have the same shape, got {shapes}")
    if left.dim() < 2 or left.shape[-1] < 2:
        raise ValueError(f"images need a width of at least 2, got shape {tuple(left.shape)}")
    width = left.shape[-1]
    return torch.cat([centre_columns(left, width - width // 2), centre_columns(right, width // 2)], dim=-1)


def semantic_compositions(
    images: torch.Tensor,
    captions: Sequence[str],
    rho: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Replace a random fraction `rho` of the batch by CLIP-C composites.

    Args:
        images: (B, C, H, W), any dtype (uint8 or normalised float); not modified.
        captions: B strings, caption i describing image i.
        rho: probability that an element becomes a composite, in [0, 1].
        generator: a CPU generator drawing the composite mask and the partners (torch's default
            one if None).

    Returns:
        (new images (B, C, H, W), new captions, is_composite (B,) bool). With B = 1 there is
        no partner and nothing is composed.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {got}")
    batch = images.shape[0]
    if isinstance(captions, str) or len(captions) != batch:
        got = "a string" if isinstance(captions, str) else f"{len(captions)} captions"
        raise ValueError(f"captions must be a sequence of {batch} strings (one per image), got {got}")
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be a number in [0, 1], got {rho!r}")
    is_composite = torch.rand(batch, generator=generator, device="cpu") < rho
    if batch < 2:
        is_composite.zero_()
    # partner = i + offset (mod B) with offset uniform in [1, B - 1]: never the element itself.
    offsets = torch.randint(1, max(batch, 2), (batch,), generator=generator, device="cpu")
    partners = (torch.arange(batch) + offsets) % batch
    chosen = torch.nonzero(is_composite).flatten()
    firsts, seconds = chosen.to(images.device), partners[chosen].to(images.device)
    out = images.clone()
    out[firsts] = compose_pair(images[firsts], images[seconds])
    texts = list(captions)
    for i in chosen.tolist():
        texts[i] = f"{captions[i]} and {captions[int(partners[i])]}"
    return out, texts, is_composite.to(images.device)
