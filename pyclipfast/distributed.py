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
the partial (log-sum-exp, positive sum) over this rank's rows; one reduce-scatter
(after an all-reduce of the per-column maxima) brings column j's partials to j's
owner, merged:

    c_j = peak_j + log Σ_k exp(c_j^(k) − peak_j),   Σ_{i∈Q(j)} S_ij = Σ_k pos_j^(k)

So each entry of S is computed once on one rank: 2·n·M·D FLOPs forward and
6·n·M·D backward per rank (8·N·M·D/W, the single-process minimum split W ways;
open_clip's local_loss does 12·N·M·D/W), and only the texts are gathered. The
sum L = Σ_r ℓ_r is an all-reduce whose backward is the identity. Gradient flow,
for the same upstream g on every rank (``loss.backward()``):

    ∂/∂A_r = g·Σ_k ∂ℓ_k/∂A_r = g·∂L/∂A_r

because ℓ_k reaches A_r and B_r only through the gather and the reduce-scatter, whose
backwards (reduce-scatter, all-gather) bring each gradient back to
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
world_size > 1) return open_clip 3.3's values and feature gradients for the same
arguments (gather_with_grad, local_loss, SigLIP's dist_impl). ClipLoss and
DistillClipLoss run the one sweep above: open_clip's local_loss on rank r is
½[mean_{i∈r} row term + mean_{j∈r} column term] of the global batch, so it costs
8·N·M·D/W FLOPs instead of open_clip's 12; with gather_with_grad each shard's
gradient is W·∂L/∂A_r (open_clip's), which DDP's averaging turns into ∇L.

The logit scale's gradient is open_clip's on every rank too. With local_loss that is rank r's
own ∂ℓ_r/∂s, which the sweep's backward (Σ over rank r's rows of G_ij·⟨A_i, B_j⟩, column terms of
other ranks' columns included) does not give: the sweep then also keeps the softmax-weighted mean
logits, Σ_j P^r_ij S_ij per row and, per column, the same over this rank's rows (merged at the
column's owner with the log-sum-exp weights, like the column sums), so that

    ∂ℓ_r/∂s = ½[mean_{i∈r}(Σ_j P^r_ij S_ij − mean_{P(i)} S_ij) + mean_{j∈r}(Σ_i P^c_ij S_ij − mean_{Q(j)} S_ij)] / s

with P^c the softmax over all ranks' rows. The loss is computed with s detached and
(s − s.detach())·∂ℓ_r/∂s added: the same value, and exactly that gradient (one multiply-add more
per score in the forward, no extra collective: the column means ride in the reduce-scatter).
Without local_loss every rank's scale gets ∂L/∂s (the per-rank shares summed in the backward, so
this assumes the same upstream gradient on every rank, as ``loss.backward()`` gives).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from . import clip as _clip
from . import reference
from . import siglip as _siglip
from ._dispatch import resolve
from .chunked._tiles import shared_scratch
from ._ops import _first_order
from .distill import GRADIENT_STATS, TEACHER_STATS, DistillOptions, distill_stats
from ._validation import (
    ScaleLike, as_scale, check_features, check_has_positive, check_ids, data_checks_on, positive_counts,
)

__all__ = ["clip_loss", "siglip_loss", "gather_features", "all_gather_with_grad"]


# --------------------------------------------------------------------------- collectives with autograd

# Flat-tensor collectives (no per-rank list to stage); recent torch names them *_single.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """[x_0; x_1; …; x_{W−1}] (rank order) on every rank, no autograd: one flat all-gather."""
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _ALL_GATHER(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """Rank r gets Σ_k (slot r of rank k's x), slots split along dim 0: one flat reduce-scatter."""
    world = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    _REDUCE_SCATTER(out, x.contiguous(), group=group)
    return out


class _AllGather(torch.autograd.Function):
    """Forward: all-gather. Backward: reduce-scatter (sum): rank r gets Σ_k ∂ℓ_k/∂(slot r)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """Forward: reduce-scatter (sum). Backward: all-gather: every rank's slot r receives rank r's gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group), None


class _ReduceFrom(torch.autograd.Function):
    """Rank `source`'s x on every rank, as open_clip's all-reduce of (x on `source`, zeros
    elsewhere): one all-reduce into a single fresh buffer. Backward: the gradients summed over
    ranks (an all-reduce every rank runs), kept by `source` only."""

    @staticmethod
    def forward(ctx, x, source: bool, group):
        ctx.source, ctx.group = source, group
        out = x.detach().clone(memory_format=torch.contiguous_format) if source else torch.zeros_like(
            x, memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return (total if ctx.source else None), None, None


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


class _ReplicatedGrad(torch.autograd.Function):
    """Identity forward; backward: factor · Σ_ranks of the gradient, the same on every rank.

    For a replicated scalar (the logit scale) whose per-rank shares must become the gradient of
    a loss every rank computes whole (open_clip without local_loss).
    """

    @staticmethod
    def forward(ctx, x, group, factor: float):
        ctx.group, ctx.factor = group, factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total * ctx.factor, None, None


class _GradTimes(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _column_merge(lse_parts: torch.Tensor, sum_parts: Optional[torch.Tensor], group,
                  weighted_parts: Optional[torch.Tensor] = None, weight: Union[int, Sequence[int]] = 0):
    """Merge per-rank column partials at each column's owner.

    lse_parts (K, W·m): this rank's log-sum-exps over its rows, for every column; sum_parts (J, W·m):
    sums over its rows; weighted_parts (L, W·m): means over its rows weighted by the softmax
    exp(S_ij − lse_parts[weight]_j) (the teacher's col_cross, the student's col_dot); weight: one
    index for all of them, or one per weighted part. Returns, for this rank's m columns,
    the (K, m) log-sum-exps over all rows, the (J, m) sums and the (L, m) weighted means:

        lse_j  = peak_j + log Σ_k exp(lse_j^(k) − peak_j)         (peak_j = max_k lse_j^(k), an all-reduce)
        mean_j = Σ_k exp(w_j^(k) − peak_j)·mean_j^(k) / Σ_k exp(w_j^(k) − peak_j)   (w = lse_parts[weight], constant)

    The Σ_k are one reduce-scatter, whose backward (an all-gather) sends every rank the gradient
    of its partials; the peaks carry none (the log-sum-exp does not depend on them).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    peak = lse_parts.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    exps = torch.exp(lse_parts - peak)
    if sum_parts is None:
        sum_parts = lse_parts[:0]
    payload = [exps, sum_parts]
    if not isinstance(weight, int):
        weight = list(weight)
    if weighted_parts is not None:
        payload.append(weighted_parts * exps[weight].detach())
    payload = torch.cat(payload)                                                   # (K + J + L, W·m)
    rows, columns = payload.shape[0], payload.shape[1] // world
    merged = _ReduceScatter.apply(payload.view(rows, world, columns).transpose(0, 1).reshape(-1, columns), group)
    k, j = lse_parts.shape[0], sum_parts.shape[0]
    lse = torch.log(merged[:k]) + peak[:, rank * columns:(rank + 1) * columns]
    weighted = None if weighted_parts is None else merged[k + j:] / merged[weight].detach()
    return lse, merged[k:k + j], weighted


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

def _check_shards(image_features: torch.Tensor, text_features: torch.Tensor, group, **more: torch.Tensor) -> None:
    """Equal shard sizes on every rank, always; finite features too when data checks are on.

    One all-gather of a few integers per call, on every rank, before any collective that moves
    features: every rank sees the same gathered facts and raises the same error, so no rank is left
    waiting in a collective (NCCL does not check sizes: a mismatch hangs or corrupts rows). The
    result cannot be cached per shape: a rank whose shape changed would run the check while a rank
    that skipped it runs the next collective. With the data checks off this costs one tiny
    collective and, on a GPU, one host sync per call.
    """
    tensors = {"image_features": image_features, "text_features": text_features, **more}
    finite = data_checks_on(image_features)
    facts = [torch.tensor(x.shape[0], device=image_features.device) for x in tensors.values()]
    if finite:
        facts += [torch.isfinite(x).all().long().to(image_features.device) for x in tensors.values()]
    per_rank = _gather(torch.stack(facts)[None], group).tolist()
    for k, name in enumerate(tensors):
        rows = [f[k] for f in per_rank]
        if len(set(rows)) > 1:
            sizes = ", ".join(f"rank {r}: {size}" for r, size in enumerate(rows))
            raise ValueError(
                f"{name} must have the same number of rows on every rank (an evenly split global batch); "
                f"got {sizes}"
            )
    if finite:
        for k, name in enumerate(tensors):
            bad = [r for r, f in enumerate(per_rank) if not f[len(tensors) + k]]
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
    """Bidirectional InfoNCE (math in pyclipfast/clip.py) of the global batch split over the ranks of `group`.

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
    rows, cols = _clip_terms(image_features, text_features, scale, image_ids, text_ids, name, group)
    share = rows.sum() / (2 * world * rows.shape[0]) + cols.sum() / (2 * world * cols.shape[0])
    return _SumOverRanks.apply(_zero_bias_grad(share, bias), group)


def _zero_bias_grad(loss: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """db = 0 exactly, as in pyclipfast.clip_loss (a scalar bias cancels in the softmax)."""
    if bias is not None and bias.requires_grad:
        return loss + 0 * bias.to(loss.dtype)
    return loss


def _clip_terms(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, image_ids,
                text_ids, backend: str, group, scale_derivatives: bool = False):
    """The global batch's per-row terms r_i − mean_{P(i)} S_ij of this rank's n image rows and
    per-column terms c_j − mean_{Q(j)} S_ij of its m text columns.

    One fused sweep of S_r = s·A_r·B_allᵀ gives the rows' statistics and every column's partials
    over this rank's rows; `_column_merge` brings column j's partials to j's owner.

    scale_derivatives: also return the terms' exact derivatives in s (no graph), from the softmax
    means of the same sweep (`_block_stats` dots), the columns' merged with their log-sum-exp weights:

        ∂row_i/∂s = (Σ_j P^r_ij S_ij − mean_{P(i)} S_ij) / s,   ∂col_j/∂s = (Σ_i P^c_ij S_ij − mean_{Q(j)} S_ij) / s

    (P^c the softmax over all ranks' rows). The terms then carry no scale gradient themselves:
    the caller routes one through these derivatives.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n, m = image_features.shape[0], text_features.shape[0]
    all_text = all_gather_with_grad(text_features, group)
    if scale_derivatives:
        scale = scale.detach()
    if image_ids is None:
        row_lse, col_lse_part, _, _, *row_col_dot = _block_stats(image_features, all_text, scale, None, None, backend,
                                                                 dots=scale_derivatives)
        (col_lse,), _, col_dot = _column_merge(col_lse_part[None], None, group, *_dot_parts(row_col_dot))
        row_pos = col_pos = _diagonal_logits(image_features, text_features, scale)
        row_count = col_count = 1
    else:
        row_count, col_count, all_text_ids = _clip_counts(image_ids, text_ids, rank, n, m, group)
        row_lse, col_lse_part, row_pos, col_pos_part, *row_col_dot = _block_stats(
            image_features, all_text, scale, image_ids, all_text_ids, backend, dots=scale_derivatives)
        (col_lse,), (col_pos,), col_dot = _column_merge(col_lse_part[None], col_pos_part[None], group,
                                                        *_dot_parts(row_col_dot))
    rows, cols = row_lse - row_pos / row_count, col_lse - col_pos / col_count
    if not scale_derivatives:
        return rows, cols
    with torch.no_grad():
        return rows, cols, (row_col_dot[0] - row_pos / row_count) / scale, (col_dot[0] - col_pos / col_count) / scale


def _dot_parts(row_col_dot: Sequence[torch.Tensor]) -> tuple:
    """`_column_merge`'s weighted_parts for the columns' softmax means of a sweep with dots (weighted by
    the column log-sum-exp partials), or nothing."""
    return (row_col_dot[1][None],) if row_col_dot else ()


def _diagonal_logits(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """S_ii = s·⟨A_i, B_i⟩ in the statistics' precision: with the default ids (the global diagonal)
    rank r's positives pair its own images with its own texts, so they never enter the sweep (which
    then runs without ids: no positive mask per tile)."""
    cd = reference.compute_dtype(image_features)
    return scale.to(cd) * (image_features.to(cd) * text_features.to(cd)).sum(1)


def _clip_counts(image_ids: torch.Tensor, text_ids: torch.Tensor, rank: int, n: int, m: int, group):
    """(this rank's row positive counts, its column positive counts, all text ids) for given ids,
    gathered: every row and column of the global batch must have a positive (checked on every
    rank alike)."""
    all_image_ids, all_text_ids = _gather(image_ids, group), _gather(text_ids, group)
    row_count, col_count = positive_counts(all_image_ids, all_text_ids), positive_counts(all_text_ids, all_image_ids)
    check_has_positive(row_count, "image row")
    check_has_positive(col_count, "text column")
    return row_count[rank * n:(rank + 1) * n], col_count[rank * m:(rank + 1) * m], all_text_ids


def _block_stats(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, row_ids: Optional[torch.Tensor],
                 col_ids: Optional[torch.Tensor], backend: str, dots: bool = False):
    """(row_lse, col_lse, row_pos, col_pos) of the block S = s·A_r·B_allᵀ: one fused sweep (math in pyclipfast/clip.py).
    Without ids the positive sums are not used (the caller forms them). dots: also the softmax
    means (row_dot, col_dot) of the same sweep (`pyclipfast.clip.clip_stats`), without gradient."""
    if backend != "reference":
        return _clip.clip_stats(a, b, scale, row_ids, col_ids, True, backend, dots)
    logits = reference.logits(a, b, scale)
    extra = ()
    if dots:
        with torch.no_grad():
            extra = (logits.softmax(1) * logits).sum(1), (logits.softmax(0) * logits).sum(0)
    if row_ids is None:
        return (logits.logsumexp(1), logits.logsumexp(0), None, None) + extra
    positives = reference.positive_mask(*logits.shape, row_ids, col_ids, logits.device).to(logits.dtype)
    return (logits.logsumexp(1), logits.logsumexp(0), (logits * positives).sum(1), (logits * positives).sum(0)) + extra


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
    """Sigmoid loss (math in pyclipfast/siglip.py) of the global batch split over the ranks of `group`.

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
    """The module's rank/world_size must be its process group's (open_clip would silently mislabel)."""
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
    size, rank = _group_size(module.group), dist.get_rank(module.group)
    if size != module.world_size:
        raise ValueError(f"world_size={module.world_size} but the process group has {size} ranks")
    if rank != module.rank:
        raise ValueError(f"rank={module.rank} but this process is rank {rank} of the process group")


def _module_inputs(module, image_features, text_features, image_ids, text_ids, **teacher):
    """Checks shared by the module paths, before any collective; returns the checked ids."""
    _check_module(module)
    check_features("image_features", image_features)
    check_features("text_features", text_features, like=image_features, like_name="image_features")
    for name, x in teacher.items():
        check_features(name, x)
    image_ids, text_ids = check_ids(image_ids, text_ids, image_features, text_features)
    _check_shards(image_features, text_features, module.group, **teacher)
    return image_ids, text_ids


def _replicated_scale(module, scale: torch.Tensor) -> torch.Tensor:
    """Without local_loss open_clip's every rank computes the whole loss, so every rank's scale gets
    the whole ∂L/∂s: the per-rank shares are summed (and the gather_with_grad factor W undone)."""
    if module.local_loss or not scale.requires_grad:
        return scale
    return _ReplicatedGrad.apply(scale, module.group, 1.0 / module.world_size if module.gather_with_grad else 1.0)


def _module_total(module, shares: torch.Tensor) -> torch.Tensor:
    """open_clip's loss without local_loss: the global loss on every rank. Its gradients reach the
    features once (∂L/∂A_r), or from every rank's copy of the loss with gather_with_grad (W·∂L/∂A_r)."""
    if module.gather_with_grad:
        shares = _GradTimes.apply(shares, float(module.world_size))
    return _SumOverRanks.apply(shares, module.group)


def clip_module_loss(module, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                     logit_bias=None, image_ids=None, text_ids=None) -> torch.Tensor:
    """`pyclipfast.ClipLoss` with world_size > 1: open_clip's ClipLoss through one fused sweep per rank.

    open_clip with local_loss (rank r's rows against all columns, in both directions) is
    ½[mean_{i∈r}(r_i − S_ii) + mean_{j∈r}(c_j − S_jj)], the global row and column terms of this
    rank's rows and columns; without it, the global loss L on every rank. Both come from the one
    sweep of `clip_loss` (8·N·M·D/W FLOPs per rank; open_clip's local_loss does 12), with
    open_clip's values and feature gradients (W·∂L/∂A_r with gather_with_grad). Every rank's
    scale gradient is open_clip's on that rank: ∂L/∂s without local_loss; with it, rank r's own
    ∂ℓ_r/∂s, from the softmax-mean statistics of the same sweep (see the module docstring).

    local_loss without gather_with_grad cuts the gradient of the gathered copies, which one
    sweep cannot split off: it runs the rows-only loss in each direction, as open_clip does.
    """
    image_ids, text_ids = _module_inputs(module, image_features, text_features, image_ids, text_ids)
    if module.local_loss and not module.gather_with_grad:
        return _clip_local_rows(module, image_features, text_features, logit_scale, logit_bias, image_ids, text_ids)
    name = resolve("clip", module.backend, image_features)
    scale = _replicated_scale(module, as_scale("logit_scale", logit_scale, image_features))
    bias = None if logit_bias is None else as_scale("logit_bias", logit_bias, image_features, positive=False)
    if module.local_loss:
        exact = _needs_grad(scale)
        rows, cols, *d_terms = _clip_terms(image_features, text_features, scale, image_ids, text_ids, name,
                                           module.group, scale_derivatives=exact)
        loss = 0.5 * (rows.mean() + cols.mean())
        if exact:
            loss = _with_scale_derivative(loss, scale, 0.5 * (d_terms[0].mean() + d_terms[1].mean()))
    else:
        rows, cols = _clip_terms(image_features, text_features, scale, image_ids, text_ids, name, module.group)
        world = module.world_size
        loss = _module_total(module, rows.sum() / (2 * world * rows.shape[0])
                             + cols.sum() / (2 * world * cols.shape[0]))
    return _zero_bias_grad(loss, bias)


def _needs_grad(scale: torch.Tensor) -> bool:
    return scale.requires_grad and torch.is_grad_enabled()


def _with_scale_derivative(loss: torch.Tensor, scale: torch.Tensor, derivative: torch.Tensor) -> torch.Tensor:
    """loss + (s − s.detach())·∂loss/∂s: the same value, and s's gradient is `derivative` times the
    upstream gradient (the loss's other terms were computed with s detached)."""
    return loss + (scale - scale.detach()).to(loss.dtype) * derivative.to(loss.dtype)


def _own_and_all_ids(module, image_ids, text_ids, n: int, device):
    """(this rank's image ids, all text ids, this rank's text ids, all image ids): open_clip's
    labels (arange offset by rank) by default, else the given ids and their gathered copies."""
    if image_ids is None:
        labels = module.get_ground_truth(device, n)
        columns = torch.arange(module.world_size * n, device=device)
        return labels, columns, labels, columns
    return image_ids, _gather(text_ids, module.group), text_ids, _gather(image_ids, module.group)


def _clip_local_rows(module, image_features, text_features, logit_scale, logit_bias, image_ids, text_ids):
    """½[CE(s·A_r·B_allᵀ) + CE(s·B_r·A_allᵀ)], the gathered copies without gradient (open_clip's
    local_loss without gather_with_grad)."""
    all_image, all_text = gather_features(image_features, text_features, local_loss=True, rank=module.rank,
                                          world_size=module.world_size, group=module.group)
    image_rows, text_columns, text_rows, image_columns = _own_and_all_ids(
        module, image_ids, text_ids, image_features.shape[0], image_features.device)

    def rows(queries, keys, query_ids, key_ids):
        return _clip.clip_loss(queries, keys, logit_scale, logit_bias, image_ids=query_ids, text_ids=key_ids,
                               bidirectional=False, backend=module.backend)

    return 0.5 * (rows(image_features, all_text, image_rows, text_columns)
                  + rows(text_features, all_image, text_rows, image_columns))


def _texts_bidir(text: torch.Tensor, rank: int, world: int, group) -> Iterator[Tuple[int, torch.Tensor]]:
    """Pass texts both ways round the ring: ⌊(W−1)/2⌋ two-way steps, then one one-way step if W is even."""
    right, left = _peer(rank + 1, world, group), _peer(rank - 1, world, group)
    to_left = to_right = text
    steps, remainder = divmod(world - 1, 2)
    for step in range(1, steps + 1):
        # what came from the right travels on to the left, and the other way round
        to_left, to_right = _NeighbourExchange.apply((left, right), (right, left), group, to_left, to_right)
        yield (rank + step) % world, to_left
        yield (rank - step) % world, to_right
    if remainder:
        to_left = None  # the last step only sends right: let its texts go
        (to_right,) = _NeighbourExchange.apply((right,), (left,), group, to_right)
        yield (rank - steps - 1) % world, to_right


def _texts_shift(text: torch.Tensor, rank: int, world: int, group) -> Iterator[Tuple[int, torch.Tensor]]:
    """Pass texts one way round the ring, W−1 steps."""
    right, left = _peer(rank + 1, world, group), _peer(rank - 1, world, group)
    for step in range(1, world):
        (text,) = _NeighbourExchange.apply((right,), (left,), group, text)
        yield (rank - step) % world, text


def _texts_reduce(text: torch.Tensor, rank: int, world: int, group) -> Iterator[Tuple[int, torch.Tensor]]:
    """Rank i's texts via an all-reduce of (texts on rank i, zeros elsewhere), for every i, own included."""
    for i in range(world):
        yield i, _ReduceFrom.apply(text, rank == i, group)


def _texts_gather(text: torch.Tensor, rank: int, world: int, group) -> Iterator[Tuple[int, torch.Tensor]]:
    """All texts in one all-gather."""
    for i, block in enumerate(all_gather_with_grad(text, group).chunk(world)):
        if i != rank:
            yield i, block


def _peer(group_rank: int, world: int, group) -> int:
    """The global rank of `group_rank` (mod W) in `group` (point-to-point ops take global ranks)."""
    group_rank %= world
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


_OTHER_TEXTS = {"bidir": _texts_bidir, "shift": _texts_shift, "reduce": _texts_reduce, "gather": _texts_gather}


def siglip_module_loss(module, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                       logit_bias, image_ids=None, text_ids=None) -> torch.Tensor:
    """`pyclipfast.SigLipLoss` with world_size > 1: open_clip's SigLipLoss, fused.

    The loss of this rank's images against its own texts, plus a negative-only loss against every
    other rank's texts, each normalised by the local n; the texts travel as `dist_impl` says. With
    ids, other ranks' texts can hold positives: the texts and their ids are all-gathered and this
    rank's rows are scored against all of them in one call (the same normalisation).

    Each block (these images × one rank's texts) is one fused sweep that also forms its gradients.
    Every block shares the images, so their gradients are summed into one n×D buffer as the blocks
    come; a block keeps only its texts' gradient, which the backward sends back to the texts' owner
    the way the texts came. Per rank that is O(n·D) per block of texts: what open_clip keeps of
    them (the texts themselves), without its n×n logits.
    """
    image_ids, text_ids = _module_inputs(module, image_features, text_features, image_ids, text_ids)
    if image_ids is not None:
        all_text = all_gather_with_grad(text_features, module.group)
        return module._loss(image_features, all_text, logit_scale, logit_bias, image_ids=image_ids,
                            text_ids=_gather(text_ids, module.group))
    rows = _SigLipRows(image_features, logit_scale, logit_bias, module.backend)
    with shared_scratch():  # the chunked sweeps of the blocks share one set of tiles
        loss = rows.block(text_features, negative_only=False)
        for source, texts in _OTHER_TEXTS[module.dist_impl](text_features, module.rank, module.world_size,
                                                            module.group):
            if source == module.rank:
                # 'reduce' hands back our own texts: every rank must run every all-reduce's backward,
                # so it stays in the graph with weight 0 (open_clip multiplies a whole loss by 0).
                loss = loss + 0.0 * texts.sum()
            else:
                loss = loss + rows.block(texts, negative_only=True)
    return rows.attach(loss)


class _SigLipRows:
    """The blocks of one rank's image rows against texts that arrive one block at a time.

    `block` runs one fused sweep and returns its loss, tied to the texts with their gradient
    (for a unit upstream gradient); the images', scale's and bias's gradients of all blocks are
    summed here, and `attach` ties them to the total loss.
    """

    def __init__(self, image_features: torch.Tensor, logit_scale, logit_bias, backend: str):
        self.image = image_features
        self.backend = resolve("siglip", backend, image_features)
        self.scale = as_scale("logit_scale", logit_scale, image_features)
        self.bias = None if logit_bias is None else as_scale("logit_bias", logit_bias, image_features,
                                                             positive=False)
        self.sums = [None, None, None]   # dA, ds, db over the blocks so far

    def _needs(self, x: Optional[torch.Tensor]) -> bool:
        return torch.is_grad_enabled() and x is not None and x.requires_grad

    def block(self, texts: torch.Tensor, negative_only: bool) -> torch.Tensor:
        need = [self._needs(x) for x in (self.image, texts, self.scale, self.bias)]
        loss, da, db, ds, dbias = _siglip.siglip_sweep(self.image, texts, self.scale, self.bias,
                                                       negative_only=negative_only, need=need, backend=self.backend)
        for k, part in enumerate((da, ds, dbias)):
            if part is not None:
                self.sums[k] = part if self.sums[k] is None else self.sums[k].add_(part)
        return _WithGradients.apply(loss, texts, db) if need[1] else loss

    def attach(self, loss: torch.Tensor) -> torch.Tensor:
        pairs = [t for x, dx in zip((self.image, self.scale, self.bias), self.sums) if dx is not None for t in (x, dx)]
        return _WithGradients.apply(loss, *pairs) if pairs else loss


class _WithGradients(torch.autograd.Function):
    """The loss unchanged; its backward gives each x_k the gradient g·dx_k, formed in the forward.

    apply(loss, x_1, dx_1, x_2, dx_2, …). Only the dx_k are kept for the backward, not the x_k
    (received texts are freed once their block is done).
    """

    @staticmethod
    def forward(ctx, loss, *pairs):
        ctx.like = [(x.dtype, x.shape) for x in pairs[::2]]
        ctx.save_for_backward(*pairs[1::2])
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        grads = []
        with torch.no_grad():
            for (dtype, shape), dx in zip(ctx.like, ctx.saved_tensors):
                grads += [(dx * g.to(dx.dtype)).to(dtype).reshape(shape), None]
        return (g, *_first_order(grads, (*ctx.saved_tensors, g)))


def distill_module_loss(module, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                        dist_image_features: torch.Tensor, dist_text_features: torch.Tensor,
                        dist_logit_scale, image_ids=None, text_ids=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`pyclipfast.DistillClipLoss` with world_size > 1: open_clip's DistillClipLoss, one fused sweep per rank.

    Student and teacher texts are gathered (open_clip calls get_logits on both). The sweep of this
    rank's rows against all columns gives the rows' statistics and the columns' partials (the
    teacher's col_cross merged with the teacher's softmax weights), so, as in `clip_module_loss`:

        contrastive = ½[mean_{i∈r}(r_i − S_ii) + mean_{j∈r}(c_j − S_jj)]
        distill     = ½[mean_{i∈r} CE(softmax(t·Tᵃ_i·Tᵇ_allᵀ), softmax(s·A_i·B_allᵀ)) + (columns alike)]

    with local_loss, and the global losses on every rank without it. local_loss without
    gather_with_grad runs the rows-only statistics in each direction, as open_clip does.

    Each rank's logit-scale gradient is open_clip's on that rank. With local_loss and
    gather_with_grad both terms' ∂/∂s need the student's softmax-weighted mean logits (margin 0:
    the contrastive and the KD student softmax are the same), ∂CE_i/∂s = (Σ_j P_ij S_ij − S_ii)/s and
    ∂KD_i/∂s = (Σ_j P_ij S_ij − Σ_j P^T_ij S_ij)/s (columns alike); the distillation sweep does not
    keep them, so a forward-only InfoNCE sweep with the dot statistics runs beside it (2·n·M·D
    FLOPs more per rank, no backward).
    """
    image_ids, text_ids = _module_inputs(module, image_features, text_features, image_ids, text_ids,
                                         dist_image_features=dist_image_features,
                                         dist_text_features=dist_text_features)
    name = resolve("distill", module.backend, image_features)
    teacher_scale = as_scale("dist_logit_scale", dist_logit_scale, image_features).detach()
    teacher_image, teacher_text = (x.detach().to(image_features.dtype) for x in (dist_image_features,
                                                                                    dist_text_features))
    if module.local_loss and not module.gather_with_grad:
        return _distill_local_rows(module, image_features, text_features, logit_scale, teacher_image, teacher_text,
                                   teacher_scale, image_ids, text_ids, name)
    scale = _replicated_scale(module, as_scale("logit_scale", logit_scale, image_features))
    exact = module.local_loss and _needs_grad(scale)
    if exact:  # each rank's own ∂/∂s below, from the softmax means of a forward-only sweep
        scale, live_scale = scale.detach(), scale
    group, world, rank = module.group, module.world_size, module.rank
    n, m = image_features.shape[0], text_features.shape[0]
    all_text = all_gather_with_grad(text_features, group)
    all_ids = None if image_ids is None else _clip_counts(image_ids, text_ids, rank, n, m, group)
    all_text_ids = None if all_ids is None else all_ids[2]
    stats = _distill_block_stats(image_features, all_text, scale, teacher_image, _gather(teacher_text, group),
                                 teacher_scale, image_ids, all_text_ids, name)
    weighted, weight = stats["col_cross"][None], 2
    if exact:
        with torch.no_grad():
            row_dot, col_dot = _block_stats(image_features, all_text.detach(), scale, None, None,
                                            resolve("clip", module.backend, image_features), dots=True)[4:]
        weighted, weight = torch.stack([stats["col_cross"], col_dot]), (2, 1)
    lse, pos, cross = _column_merge(
        torch.stack([stats["col_lse"], stats["student_col_lse"], stats["teacher_col_lse"]]),
        None if all_ids is None else stats["col_pos"][None], group, weighted_parts=weighted, weight=weight)
    if all_ids is None:  # the global diagonal: rank r's positives are its own pairs
        row_pos = col_pos = _diagonal_logits(image_features, text_features, scale)
    else:
        row_pos, col_pos = stats["row_pos"] / all_ids[0], pos[0] / all_ids[1]
    rows_ce, cols_ce = stats["row_lse"] - row_pos, lse[0] - col_pos
    rows_kd, cols_kd = stats["student_row_lse"] - stats["row_cross"], lse[1] - cross[0]
    if module.local_loss:
        contrastive, distill = 0.5 * (rows_ce.mean() + cols_ce.mean()), 0.5 * (rows_kd.mean() + cols_kd.mean())
        if exact:  # margin 0: the student's softmax is the contrastive one, ∂lse/∂s = dot / s for both
            with torch.no_grad():
                d_contrastive = 0.5 * ((row_dot - row_pos).mean() + (cross[1] - col_pos).mean()) / scale
                d_distill = 0.5 * ((row_dot - stats["row_cross"]).mean() + (cross[1] - cross[0]).mean()) / scale
            contrastive = _with_scale_derivative(contrastive, live_scale, d_contrastive)
            distill = _with_scale_derivative(distill, live_scale, d_distill)
        return contrastive, distill
    shares = torch.stack([rows_ce.sum() / (2 * world * n) + cols_ce.sum() / (2 * world * m),
                          rows_kd.sum() / (2 * world * n) + cols_kd.sum() / (2 * world * m)])
    total = _module_total(module, shares)
    return total[0], total[1]


def _distill_block_stats(a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, backend: str) -> dict:
    """The statistics of `distill_loss` (margin 0, no filter, kd="ce") of the block s·A_r·B_allᵀ,
    its teacher t·Tᵃ_r·Tᵇ_allᵀ and the given positives: one fused sweep, or materialised for
    backend="reference"."""
    if backend != "reference":
        return dict(zip(GRADIENT_STATS + TEACHER_STATS, distill_stats(
            a, b, scale, ta, tb, teacher_scale, row_ids, col_ids, DistillOptions(margin=0.0, threshold=None, kd="ce"),
            backend)))
    student, teacher = reference.logits(a, b, scale), reference.logits(ta, tb, teacher_scale)
    positives = reference.positive_mask(*student.shape, row_ids, col_ids, student.device).to(student.dtype)
    lse = dict(row_lse=student.logsumexp(1), col_lse=student.logsumexp(0),
               teacher_row_lse=teacher.logsumexp(1), teacher_col_lse=teacher.logsumexp(0))
    return dict(lse, student_row_lse=lse["row_lse"], student_col_lse=lse["col_lse"],
                row_pos=(student * positives).sum(1), col_pos=(student * positives).sum(0),
                row_cross=(teacher.softmax(1) * student).sum(1), col_cross=(teacher.softmax(0) * student).sum(0))


def _distill_local_rows(module, image_features, text_features, logit_scale, teacher_image, teacher_text,
                        teacher_scale, image_ids, text_ids, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """open_clip's local_loss without gather_with_grad: the rows-only statistics in each direction,
    against gathered copies that carry no gradient."""
    options = dict(local_loss=True, rank=module.rank, world_size=module.world_size, group=module.group)
    all_image, all_text = gather_features(image_features, text_features, **options)
    all_teacher_image, all_teacher_text = gather_features(teacher_image, teacher_text, **options)
    image_rows, text_columns, text_rows, image_columns = _own_and_all_ids(
        module, image_ids, text_ids, image_features.shape[0], image_features.device)
    scale = as_scale("logit_scale", logit_scale, image_features)
    image_ce, image_kd = _distill_rows(image_features, all_text, teacher_image, all_teacher_text, scale,
                                       teacher_scale, image_rows, text_columns, backend)
    text_ce, text_kd = _distill_rows(text_features, all_image, teacher_text, all_teacher_image, scale,
                                     teacher_scale, text_rows, image_columns, backend)
    return 0.5 * (image_ce + text_ce), 0.5 * (image_kd + text_kd)


def _distill_rows(queries: torch.Tensor, keys: torch.Tensor, teacher_queries: torch.Tensor,
                  teacher_keys: torch.Tensor, scale: torch.Tensor, teacher_scale: torch.Tensor,
                  query_ids: torch.Tensor, key_ids: torch.Tensor, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows only: mean_i (r_i − mean_{P(i)} S_ij), mean_i −Σ_j softmax(t·T_Q·T_Kᵀ)_ij log softmax(s·Q·Kᵀ)_ij.

    The fused distillation statistics of (local rows × gathered columns); only the row statistics
    are used, so no column gradient is formed.
    """
    counts = positive_counts(query_ids, key_ids)
    check_has_positive(counts, "row")
    stats = _distill_block_stats(queries, keys, scale, teacher_queries, teacher_keys, teacher_scale, query_ids,
                                 key_ids, backend)
    return (stats["row_lse"] - stats["row_pos"] / counts).mean(), (stats["student_row_lse"] - stats["row_cross"]).mean()
