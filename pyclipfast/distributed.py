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
