"""The losses on torch.distributed: a global batch split evenly over W ranks.

Rank r holds n image rows A_r and m text rows B_r of the global batch
A = [A_0; …; A_{W−1}] (N = W·n rows) and B (M = W·m rows); NCCL on GPUs, gloo on
CPUs, launched with torchrun. No rank ever stores an n×N or N×N matrix: the
fused losses run on (local rows × gathered columns).

Functional API (`clip_loss`, `siglip_loss`): the loss of the global batch on every
rank. Rank r computes a share ℓ_r of the global loss L = Σ_r ℓ_r,

    CLIP:    ℓ_r = 1/(2N) Σ_{i∈r} (r_i − mean_{j∈P(i)} S_ij) + 1/(2M) Σ_{j∈r} (c_j − mean_{i∈Q(j)} S_ij)
    SigLIP:  ℓ_r = −1/N Σ_{i∈r} Σ_j log σ(y_ij S_ij)

from one block, its rows of S = s·A·Bᵀ against the gathered texts: S_r = s·A_r·B_allᵀ
(n×M, never stored). One fused sweep gives the rows' r_i and, for every column j,
the partial (log-sum-exp, positive sum) over this rank's rows; an all-to-all
sends column j's partials to j's owner, which merges them:

    c_j = logsumexp_k c_j^(k),   Σ_{i∈Q(j)} S_ij = Σ_k pos_j^(k)

So each entry of S is computed once on one rank: 2·n·M·D FLOPs forward and
6·n·M·D backward per rank (8·N·M·D/W, the single-process minimum split W ways;
open_clip's local_loss does 12·N·M·D/W), and only the texts are gathered. The
sum L = Σ_r ℓ_r is an all-reduce whose backward is the identity. Gradient flow,
for the same upstream g on every rank (``loss.backward()``):

    ∂/∂A_r = g·Σ_k ∂ℓ_k/∂A_r = g·∂L/∂A_r

because ℓ_k reaches A_r and B_r only through the gather and the all-to-all, whose
backwards (reduce-scatter, the reverse all-to-all) bring each gradient back to
its owner, summed over ranks. So each shard receives exactly its slice of the
single-process gradient of the concatenated batch; an all-reduce with the usual
summing backward would have made it W·∂L/∂A_r. logit_scale and logit_bias are
replicated like the encoder weights and get their share ∂ℓ_r/∂s, which sums over
ranks to ∂L/∂s. The rule is the same for every replicated tensor: the
single-process gradient is the sum over ranks. DDP and FSDP average instead of
summing, so parameters receive ∇L / W: open_clip's gather_with_grad direction,
scaled by 1/W (multiply the loss by the world size for ∇L itself; Adam-type
optimisers do not notice).

Positive ids are gathered with the features, so captions of one image held by
different ranks are positives, not false negatives.

open_clip modules (`clip_module_loss`, `siglip_module_loss`, `distill_module_loss`,
called by `pyclipfast.ClipLoss` / `SigLipLoss` / `DistillClipLoss` when
world_size > 1) follow open_clip 3.3.0's structure exactly (gather_with_grad,
local_loss, SigLIP's dist_impl), so values and gradients, the scale's on each rank
included, equal open_clip's for the same arguments: with gather_with_grad each
rank's loss is its local mean, and gradients are W·∂L/∂A_r, which DDP's
averaging turns into ∇L. ClipLoss's local_loss runs the rows-only loss in each
direction (16·N·M·D/W FLOPs per rank with the recomputing backward).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import clip as _clip
from . import reference
from . import siglip as _siglip
from ._dispatch import resolve
from .distill import GRADIENT_STATS, TEACHER_STATS, DistillOptions, distill_stats
from ._validation import (
    ScaleLike, as_scale, check_features, check_has_positive, check_ids, data_checks_on, positive_counts,
)

__all__ = ["clip_loss", "siglip_loss", "gather_features", "all_gather_with_grad"]


# --------------------------------------------------------------------------- collectives with autograd

def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """[x_0; x_1; …; x_{W−1}] (rank order) on every rank, no autograd."""
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    dist.all_gather(list(out.chunk(world)), x.contiguous(), group=group)
    return out


class _AllGather(torch.autograd.Function):
    """Forward: all-gather. Backward: reduce-scatter (sum): rank r gets Σ_k ∂ℓ_k/∂(slot r)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter(out, list(grad.contiguous().chunk(world)), group=ctx.group)
        return out, None


class _AllReduce(torch.autograd.Function):
    """Sum over ranks; backward sums the gradients too (torch.distributed.nn.all_reduce)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllReduce.apply(grad, ctx.group), None


class _SumOverRanks(torch.autograd.Function):
    """L = Σ_r ℓ_r on every rank; backward is the identity: ℓ_r receives the upstream g."""

    @staticmethod
    def forward(ctx, share, group):
        total = share.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllToAll(torch.autograd.Function):
    """Row k of the (W, …) input goes to rank k; row k of the output came from rank k.

    A permutation of the rows across ranks, so the backward is the same exchange of the gradients.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


def _exchange(tensors: Sequence[torch.Tensor], send_to: Sequence[int], recv_from: Sequence[int], group):
    """Send tensors[k] to rank send_to[k] and receive one like it from recv_from[k], all at once."""
    tensors = [t.contiguous() for t in tensors]
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, peer, group) for t, peer in zip(tensors, send_to)]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for t, peer in zip(received, recv_from)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    """Point-to-point exchange; the gradients travel back the opposite way (open_clip's NeighbourExchange)."""

    @staticmethod
    def forward(ctx, send_to, recv_from, group, *tensors):
        ctx.peers = send_to, recv_from, group
        return tuple(_exchange(tensors, send_to, recv_from, group))

    @staticmethod
    def backward(ctx, *grads):
        send_to, recv_from, group = ctx.peers
        return (None, None, None, *_NeighbourExchange.apply(recv_from, send_to, group, *grads))


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """[x_0; …; x_{W−1}] on every rank; the backward sums each slot's gradient back to its owner.

    Same semantics as ``torch.cat(torch.distributed.nn.all_gather(x))`` (deprecated in recent
    torch), with a reduce-scatter backward on every backend.
    """
    return _AllGather.apply(x, group)


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, *, local_loss: bool = False,
                    gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                    group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``gather_features`` (torch.distributed path): the global image and text batches.

    gather_with_grad: the gather is differentiable (each rank's loss reaches every shard).
    Otherwise the gathered copies carry no gradient; unless local_loss, the local features are put
    back at this rank's slot so they still receive one.
    """
    if gather_with_grad:
        return all_gather_with_grad(image_features, group), all_gather_with_grad(text_features, group)
    with torch.no_grad():
        all_image, all_text = _gather(image_features, group), _gather(text_features, group)
    if not local_loss:
        all_image[rank * image_features.shape[0]:(rank + 1) * image_features.shape[0]] = image_features
        all_text[rank * text_features.shape[0]:(rank + 1) * text_features.shape[0]] = text_features
    return all_image, all_text


# --------------------------------------------------------------------------- rank-consistent checks

def _check_shards(image_features: torch.Tensor, text_features: torch.Tensor, group) -> None:
    """Equal shard sizes and finite features on every rank (a data check: one small all-gather).

    Every rank sees the same gathered facts and raises the same error, so no rank is left
    waiting in a collective that the others never reach.
    """
    if not data_checks_on(image_features):
        return
    facts = torch.stack([
        torch.tensor(image_features.shape[0], device=image_features.device),
        torch.tensor(text_features.shape[0], device=image_features.device),
        torch.isfinite(image_features).all().long(),
        torch.isfinite(text_features).all().long(),
    ])
    per_rank = _gather(facts[None], group).tolist()
    for k, name in enumerate(("image_features", "text_features")):
        rows = [f[k] for f in per_rank]
        if len(set(rows)) > 1:
            raise ValueError(
                f"{name} must have the same number of rows on every rank (an evenly split global batch); "
                f"got {rows} on ranks 0..{len(rows) - 1}"
            )
        bad = [r for r, f in enumerate(per_rank) if not f[k + 2]]
        if bad:
            raise ValueError(f"{name} contains non-finite values (nan or inf) on rank(s) {bad}")


def _check_scales(logit_scale: ScaleLike, logit_bias: Optional[ScaleLike], like: torch.Tensor) -> None:
    """The scale and bias checks of the single-process losses, run before any collective."""
    as_scale("logit_scale", logit_scale, like)
    if logit_bias is not None:
        as_scale("logit_bias", logit_bias, like, positive=False)


def _group_size(group) -> int:
    """World size of `group`, or 1 when torch.distributed is not initialised."""
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 1
    if dist.get_rank(group) < 0:
        raise ValueError("group does not contain this process (torch.distributed.get_rank(group) is -1)")
    return dist.get_world_size(group)


# --------------------------------------------------------------------------- functional API

def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: ScaleLike,
    logit_bias: Optional[ScaleLike] = None,
    *,
    image_ids: Optional[torch.Tensor] = None,
    text_ids: Optional[torch.Tensor] = None,
    group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Bidirectional InfoNCE (SPEC §1) of the global batch split over the ranks of `group`.

    Args:
        image_features, text_features: this rank's shards, (n, D) and (m, D); every rank holds the
            same n and m, and rank order is batch order.
        logit_scale, logit_bias: as in `pyclipfast.clip_loss` (the same value on every rank).
        image_ids, text_ids: this rank's ids (n,) and (m,); they are gathered, so equal ids on
            different ranks are positives. Default: the global diagonal (needs n == m).
        group: the process group (default: the world). Without an initialised torch.distributed
            this is `pyclipfast.clip_loss` on the local batch.
        backend: as in `pyclipfast.clip_loss`.

    Returns:
        The global loss L, the same on every rank. After ``loss.backward()`` on every rank the
        features hold their slice of the single-process gradient ∂L/∂A; logit_scale holds this
        rank's share of ∂L/∂s (the shares sum to it).
    """
    world = _group_size(group)
    if world == 1:
        return _clip.clip_loss(image_features, text_features, logit_scale, logit_bias,
                               image_ids=image_ids, text_ids=text_ids, backend=backend)
    check_features("image_features", image_features)
    check_features("text_features", text_features, like=image_features, like_name="image_features")
    image_ids, text_ids = check_ids(image_ids, text_ids, image_features, text_features)
    name = resolve("clip", backend, image_features)
    scale = as_scale("logit_scale", logit_scale, image_features)
    bias = None if logit_bias is None else as_scale("logit_bias", logit_bias, image_features, positive=False)
    _check_shards(image_features, text_features, group)

    rank, n, m = dist.get_rank(group), image_features.shape[0], text_features.shape[0]
    all_text = all_gather_with_grad(text_features, group)
    row_ids, col_ids, row_count, col_count = _clip_ids(image_ids, text_ids, rank, n, m, world, group,
                                                       image_features.device)
    row_lse, col_lse_part, row_pos, col_pos_part = _block_stats(image_features, all_text, scale, row_ids, col_ids,
                                                                name)
    # part[k, j] = rank k's statistics of this rank's column j (over rank k's rows), merged here
    part = _AllToAll.apply(torch.stack([col_lse_part, col_pos_part], 1).view(world, m, 2), group)
    col_lse, col_pos = torch.logsumexp(part[..., 0], 0), part[..., 1].sum(0)
    rows = row_lse - (row_pos if row_count is None else row_pos / row_count)
    cols = col_lse - (col_pos if col_count is None else col_pos / col_count)
    share = rows.sum() / (2 * world * n) + cols.sum() / (2 * world * m)
    if bias is not None and bias.requires_grad:
        share = share + 0 * bias.to(share.dtype)  # db = 0 exactly, as in pyclipfast.clip_loss
    return _SumOverRanks.apply(share, group)


def _clip_ids(image_ids, text_ids, rank: int, n: int, m: int, world: int, group, device):
    """(this rank's row ids, all column ids, row positive counts, this rank's column positive counts).

    Default ids are the global diagonal (counts None: one positive each). Given ids are gathered
    and every row and column of the global batch must have a positive (checked on every rank alike).
    """
    if image_ids is None:
        return torch.arange(rank * n, (rank + 1) * n, device=device), torch.arange(world * m, device=device), None, None
    all_image_ids, all_text_ids = _gather(image_ids, group), _gather(text_ids, group)
    row_count, col_count = positive_counts(all_image_ids, all_text_ids), positive_counts(all_text_ids, all_image_ids)
    check_has_positive(row_count, "image row")
    check_has_positive(col_count, "text column")
    return image_ids, all_text_ids, row_count[rank * n:(rank + 1) * n], col_count[rank * m:(rank + 1) * m]


def _block_stats(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, row_ids: torch.Tensor,
                 col_ids: torch.Tensor, backend: str):
    """(row_lse, col_lse, row_pos, col_pos) of the block S = s·A_r·B_allᵀ: one fused sweep (SPEC §1)."""
    if backend != "reference":
        return _clip.clip_stats(a, b, scale, row_ids, col_ids, True, backend)
    logits = reference.logits(a, b, scale)
    positives = reference.positive_mask(*logits.shape, row_ids, col_ids, logits.device).to(logits.dtype)
    return logits.logsumexp(1), logits.logsumexp(0), (logits * positives).sum(1), (logits * positives).sum(0)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: ScaleLike,
    logit_bias: Optional[ScaleLike],
    *,
    image_ids: Optional[torch.Tensor] = None,
    text_ids: Optional[torch.Tensor] = None,
    group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sigmoid loss (SPEC §2) of the global batch split over the ranks of `group`.

    Each rank scores its n image rows against all M gathered texts (ids gathered with them) and
    the shares are summed: L = −1/N Σ_ij log σ(y_ij S_ij) over the global batch, on every rank.
    Arguments, gradients and the single-process fallback are as in `clip_loss`.
    """
    world = _group_size(group)
    if world == 1:
        return _siglip.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                                   image_ids=image_ids, text_ids=text_ids, backend=backend)
    check_features("image_features", image_features)
    check_features("text_features", text_features, like=image_features, like_name="image_features")
    image_ids, text_ids = check_ids(image_ids, text_ids, image_features, text_features)
    resolve("siglip", backend, image_features)
    _check_scales(logit_scale, logit_bias, image_features)
    _check_shards(image_features, text_features, group)

    rank, n, device = dist.get_rank(group), image_features.shape[0], image_features.device
    all_text = all_gather_with_grad(text_features, group)
    if image_ids is None:  # the global diagonal
        image_ids = torch.arange(rank * n, (rank + 1) * n, device=device)
        all_text_ids = torch.arange(world * n, device=device)
    else:
        all_text_ids = _gather(text_ids, group)
    share = _siglip.siglip_loss(image_features, all_text, logit_scale, logit_bias, image_ids=image_ids,
                                text_ids=all_text_ids, backend=backend) / world
    return _SumOverRanks.apply(share, group)


# --------------------------------------------------------------------------- open_clip module paths

def _check_module(module) -> None:
    """The module's rank/world_size must be this process group's (open_clip would silently mislabel)."""
    if getattr(module, "use_horovod", False):
        raise NotImplementedError(
            "use_horovod=True is not supported: pyclipfast runs on torch.distributed (launch with torchrun "
            "and pass use_horovod=False)"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"world_size={module.world_size} needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    if dist.get_world_size() != module.world_size:
        raise ValueError(f"world_size={module.world_size} but the process group has {dist.get_world_size()} ranks")
    if dist.get_rank() != module.rank:
        raise ValueError(f"rank={module.rank} but this process is rank {dist.get_rank()} of the process group")


def clip_module_loss(module, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                     logit_bias=None) -> torch.Tensor:
    """`pyclipfast.ClipLoss` with world_size > 1: open_clip's ClipLoss, fused.

    local_loss: this rank's n rows against the N gathered columns, in both directions, labels
    offset by rank: ½[CE(s·A_r·B_allᵀ) + CE(s·B_r·A_allᵀ)]. Otherwise the full bidirectional loss
    of the gathered batch (every rank computes all of it, as open_clip does).
    """
    _check_module(module)
    check_features("image_features", image_features)
    check_features("text_features", text_features, like=image_features, like_name="image_features")
    _check_shards(image_features, text_features, None)
    all_image, all_text = gather_features(
        image_features, text_features, local_loss=module.local_loss, gather_with_grad=module.gather_with_grad,
        rank=module.rank, world_size=module.world_size)
    if not module.local_loss:
        return _clip.clip_loss(all_image, all_text, logit_scale, logit_bias, backend=module.backend)
    labels = module.get_ground_truth(image_features.device, image_features.shape[0])
    columns = torch.arange(all_text.shape[0], device=image_features.device)

    def rows(queries, keys):
        return _clip.clip_loss(queries, keys, logit_scale, logit_bias, image_ids=labels, text_ids=columns,
                               bidirectional=False, backend=module.backend)

    return 0.5 * (rows(image_features, all_text) + rows(text_features, all_image))


def _texts_bidir(text: torch.Tensor, rank: int, world: int) -> Iterator[Tuple[int, torch.Tensor]]:
    """Pass texts both ways round the ring: ⌊(W−1)/2⌋ two-way steps, then one one-way step if W is even."""
    right, left = (rank + 1) % world, (rank - 1) % world
    to_left = to_right = text
    steps, remainder = divmod(world - 1, 2)
    for step in range(1, steps + 1):
        from_right, from_left = _NeighbourExchange.apply((left, right), (right, left), None, to_left, to_right)
        yield (rank + step) % world, from_right
        yield (rank - step) % world, from_left
        to_left, to_right = from_right, from_left
    if remainder:
        (from_left,) = _NeighbourExchange.apply((right,), (left,), None, to_right)
        yield (rank - steps - 1) % world, from_left


def _texts_shift(text: torch.Tensor, rank: int, world: int) -> Iterator[Tuple[int, torch.Tensor]]:
    """Pass texts one way round the ring, W−1 steps."""
    right, left = (rank + 1) % world, (rank - 1) % world
    for step in range(1, world):
        (text,) = _NeighbourExchange.apply((right,), (left,), None, text)
        yield (rank - step) % world, text


def _texts_reduce(text: torch.Tensor, rank: int, world: int) -> Iterator[Tuple[int, torch.Tensor]]:
    """Rank i's texts via an all-reduce of (texts on rank i, zeros elsewhere), for every i, own included."""
    for i in range(world):
        yield i, _AllReduce.apply(text * (rank == i), None)


def _texts_gather(text: torch.Tensor, rank: int, world: int) -> Iterator[Tuple[int, torch.Tensor]]:
    """All texts in one all-gather."""
    for i, block in enumerate(all_gather_with_grad(text).chunk(world)):
        if i != rank:
            yield i, block


_OTHER_TEXTS = {"bidir": _texts_bidir, "shift": _texts_shift, "reduce": _texts_reduce, "gather": _texts_gather}


def siglip_module_loss(module, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                       logit_bias) -> torch.Tensor:
    """`pyclipfast.SigLipLoss` with world_size > 1: open_clip's SigLipLoss, fused.

    The loss of this rank's images against its own texts, plus a negative-only loss against every
    other rank's texts, each normalised by the local n; the texts travel as `dist_impl` says.
    """
    _check_module(module)
    check_features("image_features", image_features)
    check_features("text_features", text_features, like=image_features, like_name="image_features")
    _check_shards(image_features, text_features, None)
    loss = module._loss(image_features, text_features, logit_scale, logit_bias)
    for source, texts in _OTHER_TEXTS[module.dist_impl](text_features, module.rank, module.world_size):
        if source == module.rank:
            # 'reduce' hands back our own texts: every rank must run every all-reduce's backward,
            # so it stays in the graph with weight 0 (open_clip multiplies a whole loss by 0).
            loss = loss + 0.0 * texts.sum()
        else:
            loss = loss + module._loss(image_features, texts, logit_scale, logit_bias, negative_only=True)
    return loss


def distill_module_loss(module, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                        dist_image_features: torch.Tensor, dist_text_features: torch.Tensor,
                        dist_logit_scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """`pyclipfast.DistillClipLoss` with world_size > 1: open_clip's DistillClipLoss, fused.

    Student and teacher features are gathered alike (open_clip calls get_logits on both). Without
    local_loss: `distill_loss` of the gathered batch. With it, per direction, this rank's rows
    against all gathered columns (labels offset by rank):

        contrastive = ½[CE(s·A_r·B_allᵀ) + CE(s·B_r·A_allᵀ)]
        distill     = ½[mean_i CE(softmax(t·Tᵃ_r·Tᵇ_allᵀ)_i, softmax(s·A_r·B_allᵀ)_i) + (texts alike)]
    """
    _check_module(module)
    for name, x in (("image_features", image_features), ("text_features", text_features),
                    ("dist_image_features", dist_image_features), ("dist_text_features", dist_text_features)):
        check_features(name, x)
    _check_shards(image_features, text_features, None)
    options = dict(local_loss=module.local_loss, gather_with_grad=module.gather_with_grad, rank=module.rank,
                   world_size=module.world_size)
    all_image, all_text = gather_features(image_features, text_features, **options)
    all_teacher_image, all_teacher_text = gather_features(dist_image_features, dist_text_features, **options)
    if not module.local_loss:
        return module._losses(all_image, all_text, logit_scale, all_teacher_image, all_teacher_text,
                              dist_logit_scale)
    labels = module.get_ground_truth(image_features.device, image_features.shape[0])
    image_ce, image_kd = _distill_rows(image_features, all_text, dist_image_features, all_teacher_text,
                                       logit_scale, dist_logit_scale, labels, module.backend)
    text_ce, text_kd = _distill_rows(text_features, all_image, dist_text_features, all_teacher_image,
                                     logit_scale, dist_logit_scale, labels, module.backend)
    return 0.5 * (image_ce + text_ce), 0.5 * (image_kd + text_kd)


def _distill_rows(queries: torch.Tensor, keys: torch.Tensor, teacher_queries: torch.Tensor,
                  teacher_keys: torch.Tensor, logit_scale, teacher_scale, labels: torch.Tensor,
                  backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows only: mean_i CE(s·Q·Kᵀ, labels), mean_i −Σ_j softmax(t·T_Q·T_Kᵀ)_ij log softmax(s·Q·Kᵀ)_ij.

    The fused distillation statistics of (local rows × gathered columns); only the row statistics
    are used, so no column gradient is formed.
    """
    name = resolve("distill", backend, queries)
    scale = as_scale("logit_scale", logit_scale, queries)
    teacher_scale = as_scale("dist_logit_scale", teacher_scale, queries).detach()
    teacher_queries, teacher_keys = (x.detach().to(queries.dtype) for x in (teacher_queries, teacher_keys))
    if name == "reference":
        logits = reference.logits(queries, keys, scale)
        teacher = reference.logits(teacher_queries, teacher_keys, teacher_scale)
        kd = -(teacher.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        return torch.nn.functional.cross_entropy(logits, labels), kd
    columns = torch.arange(keys.shape[0], device=queries.device)
    stats = dict(zip(GRADIENT_STATS + TEACHER_STATS, distill_stats(
        queries, keys, scale, teacher_queries, teacher_keys, teacher_scale, labels, columns,
        DistillOptions(margin=0.0, threshold=None, kd="ce"), name)))
    return (stats["row_lse"] - stats["row_pos"]).mean(), (stats["student_row_lse"] - stats["row_cross"]).mean()
